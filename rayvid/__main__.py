import sys

from rayvid.cli import main

sys.exit(main())
