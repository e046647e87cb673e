"""Driver memory of what the committer looks up for each video's videos/ row (its size and
version as listed), for 1,000,000 S3-style URIs: a dict from URI to (size, version), what
rayvid held before, against `commit.Listed` (16 bytes per video beside the listing's Arrow
columns). Each way in a fresh process: its RSS growth after the listing table is built, and
the CPU time of a lookup (100,000 of them).
Run: `.venv/bin/python bench/listed_memory.py`."""

import gc
import os
import subprocess
import sys
import time

N = 1_000_000


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(way: str) -> None:
    import pyarrow as pa

    from rayvid import commit

    table = pa.table({"video_uri": [f"s3://my-bucket/archive/2026/11/{i:08d}/camera-{i % 97:02d}-clip.mp4"
                                    for i in range(N)],
                      "size_bytes": list(range(N)), "version": [f'"{i:032x}"' for i in range(N)]})
    gc.collect()
    before = rss_mb()
    if way == "dict":
        held = dict(zip(table.column("video_uri").to_pylist(),
                        zip(table.column("size_bytes").to_pylist(), table.column("version").to_pylist())))
    else:
        held = commit.Listed(table)
    gc.collect()
    grown = rss_mb() - before
    uris = table.column("video_uri").slice(0, 100_000).to_pylist()
    t0 = time.process_time()
    for uri in uris:
        held.get(uri)
    lookup_us = (time.process_time() - t0) / len(uris) * 1e6
    print(f"{way:6s} {grown:6.0f} MB for {N:,} videos, {lookup_us:.2f} us a lookup")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        measure(sys.argv[1])
    else:
        for way in ("dict", "Listed"):
            subprocess.run([sys.executable, __file__, way], check=True)
