from rayvid.cli import console

console()
