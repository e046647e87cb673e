"""Driver memory and time of a rerun's bookkeeping: `commit.recover` (what OUTPUT has
committed of the listed videos) and `commit.pending` (what is left to do), over an OUTPUT
holding 1,000,000 committed S3-style videos (100 videos/ parts of 10,000; 2% failed, half
of those because the video changed while read) and a listing of 1,050,000 (5% new, 10%
with a new version). In a fresh process, with Arrow on the system allocator and
`malloc_trim` before each reading, so that RSS counts what is held, not what allocators
keep: RSS growth from before `recover` to after `pending` with its results dropped (what
the run holds while it runs: the committed rows and their index), and the time of each.
Run: `.venv/bin/python bench/rerun_memory.py` (`--list` passes the listing's URIs as a
Python list, as rayvid did before; with PYTHONPATH at an older checkout it measures that)."""

import ctypes
import gc
import os
import subprocess
import sys
import tempfile
import time

COMMITTED = 1_000_000
PER_FILE = 10_000


def uri(i: int) -> str:
    return f"s3://my-bucket/archive/2026/11/{i:08d}/camera-{i % 97:02d}-clip.mp4"


def build(out: str) -> None:
    import pyarrow as pa

    from rayvid import commit, schema

    for d in ("videos", "errors"):
        os.makedirs(f"{out}/{d}", exist_ok=True)
    for f in range(COMMITTED // PER_FILE):
        ids, n = range(f * PER_FILE, (f + 1) * PER_FILE), PER_FILE
        name = f"part-r1-{f:05d}.parquet"
        commit.write_parquet(f"{out}/videos/{name}", pa.table(
            {"video_uri": [uri(i) for i in ids], "size_bytes": list(ids), "version": [f'"{i:032x}"' for i in ids],
             "frames": [600] * n, "duration_s": [20.0] * n, "fps": [30.0] * n, "width": [640] * n,
             "height": [360] * n, "codec": ["h264"] * n, "decoder": ["decord"] * n,
             "top_labels": [[{"label": "cat", "share": 1.0}]] * n, "error": [i % 50 == 0 for i in ids],
             "run_id": ["r1"] * n}, schema=schema.VIDEOS_SCHEMA))
        bad = [i for i in ids if i % 50 == 0]
        commit.write_parquet(f"{out}/errors/{name}", pa.table(
            {"video_uri": [uri(i) for i in bad], "stage": ["decode"] * len(bad),
             "error_type": [commit.CHANGED if i % 100 == 0 else "DecodeError" for i in bad],
             "message": ["x"] * len(bad), "run_id": ["r1"] * len(bad)}, schema=schema.ERRORS_SCHEMA))


def rss_mb() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(out: str, as_list: bool) -> None:
    import pyarrow as pa

    from rayvid import commit

    listed = COMMITTED + COMMITTED // 20
    listing = pa.table({"video_uri": [uri(i) for i in range(listed)], "size_bytes": list(range(listed)),
                        "version": [f'"{i + (i % 10 == 0):032x}"' for i in range(listed)]})
    before = rss_mb()
    t0 = time.perf_counter()
    only = listing.column("video_uri")
    committed = commit.recover(out, only=only.to_pylist() if as_list else only)
    t1 = time.perf_counter()
    todo, skipped, redo = commit.pending(listing, committed, retry_failed=False)
    t2 = time.perf_counter()
    counts = len(todo), skipped, len(redo)
    del todo, redo
    held = rss_mb() - before
    print(f"{held:5.0f} MB held, recover {t1 - t0:.1f} s, pending {t2 - t1:.1f} s "
          f"({counts[0]:,} to do, {counts[1]:,} skipped, {counts[2]:,} redone; {commit.__file__})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        measure(sys.argv[2], "--list" in sys.argv)
    else:
        with tempfile.TemporaryDirectory() as out:
            build(out)
            env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}
            for _ in range(2):
                subprocess.run([sys.executable, __file__, "measure", out, *sys.argv[1:]], check=True, env=env)
