"""The bookkeeping of a large OUTPUT on a far store. A run's start-up: `commit.recover` (orphans, compactions,
retractions, and what is committed of the listed videos) against a moto S3 server on
127.0.0.1 that answers each request after DELAY_S (an S3 request's latency from an EC2
instance is tens of milliseconds; moto's loopback answer is not). The OUTPUT: PARTS parts
written by the real Committer, each of VIDEOS_PER_PART videos (20 frame rows each, 1 in
10 failed); the listing: every video. Prints the wall time and the requests by method,
then those of `commit.retract` of the failed videos (what `--retry-failed` does first),
then of `rayvid segments` reading them, then of `rayvid compact` merging them.
Run: `.venv/bin/python bench/output_latency.py` (PYTHONPATH at an older checkout measures that)."""

import collections
import sys
import threading
import time

PARTS, VIDEOS_PER_PART, DELAY_S = 200, 50, 0.03


def main() -> None:
    import pyarrow as pa

    import s3_server

    seen: collections.Counter = collections.Counter()
    lock = threading.Lock()
    slow = threading.Event()  # set once the OUTPUT is written: then each request waits DELAY_S

    def hook(environ):
        if slow.is_set():
            with lock:
                seen[environ["REQUEST_METHOD"]] += 1
            time.sleep(DELAY_S)

    server = s3_server.start(hook)
    from rayvid import commit, storage
    from rayvid.schema import INFERRED_SCHEMA, KIND_END, KIND_FRAME

    out = "s3://recover-bench/out"
    fs, _ = storage.resolve(out)
    fs.mkdir("recover-bench")
    uris = []
    for p in range(PARTS):
        c = commit.Committer(out, "r1", "m", rows_per_file=VIDEOS_PER_PART * 20)
        rows = []
        for v in range(VIDEOS_PER_PART):
            uri = f"s3://archive/cams/{p:04d}/{v:03d}.mp4"
            uris.append(uri)
            bad = v % 10 == 0
            n = 0 if bad else 20
            rows.append(pa.table({
                "video_uri": [uri] * (n + 1), "segment": [0] * (n + 1), "n_segments": [1] * (n + 1),
                "kind": [KIND_FRAME] * n + [KIND_END], "frame_index": list(range(n)) + [-1],
                "timestamp_s": [i / 10 for i in range(n)] + [0.0], "label": ["a"] * n + [None],
                "score": [0.5] * n + [None], "topk": [[]] * (n + 1), "n_frames": [0] * n + [n],
                "error_stage": [""] * n + ["decode" if bad else ""], "error_type": [""] * n + ["VideoError" if bad else ""],
                "message": [""] * n + ["bad" if bad else ""], "decoder": [""] * (n + 1), "codec": [""] * (n + 1),
                "width": [0] * (n + 1), "height": [0] * (n + 1), "fps": [10.0] * (n + 1), "duration_s": [2.0] * (n + 1),
                "reused_from": [-1] * (n + 1), "bytes_read": [0] * (n + 1)}, schema=INFERRED_SCHEMA))
        c.add(pa.concat_tables(rows))
        c.close()
    listing = pa.table({"video_uri": uris, "size_bytes": [-1] * len(uris), "version": [""] * len(uris)})
    slow.set()
    for _ in range(2):
        seen.clear()
        t0 = time.perf_counter()
        committed = commit.recover(out, only=listing.column("video_uri").to_pylist())  # (as older checkouts took it)
        wall = time.perf_counter() - t0
        print(f"recover: {len(getattr(committed, 'videos', committed)):,} videos in {PARTS} parts, {wall:.2f} s at {DELAY_S * 1000:.0f} ms a request; "
              f"requests {dict(sorted(seen.items()))} ({commit.__file__})")
    # --retry-failed: the failed videos' rows retracted from every part (5 a part)
    failed = {u for u in uris if int(u.rsplit("/", 1)[1][:3]) % 10 == 0}
    seen.clear()
    t0 = time.perf_counter()
    commit.retract(out, failed, committed, "bench")
    wall = time.perf_counter() - t0
    print(f"retract: {len(failed):,} failed videos from {PARTS} parts, {wall:.2f} s; requests {dict(sorted(seen.items()))}")
    from rayvid import compact, query

    seen.clear()
    t0 = time.perf_counter()
    found = query.segments(out)
    wall = time.perf_counter() - t0
    print(f"segments: {len(found):,} segments of {PARTS} parts, {wall:.2f} s; requests {dict(sorted(seen.items()))}")
    seen.clear()
    t0 = time.perf_counter()
    done = compact.compact(out)
    wall = time.perf_counter() - t0
    print(f"compact: {done['merged']} parts into {done['into']}, {wall:.2f} s; requests {dict(sorted(seen.items()))}")
    server.stop()


if __name__ == "__main__":
    sys.exit(main())
