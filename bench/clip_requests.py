"""Short clips on S3 (or GCS) through one decode actor's Decoder (its two calls in flight,
as the job runs it on remote input), with every request answered after a store's latency:
each clip's copy asked first for the object's size and version and again after (a HEAD, a
GET and a HEAD; on GCS two metadata requests around the GET), against a copy whose GETs
are conditional on the listed version (S3: If-Match on the ETag; GCS: ifGenerationMatch;
one GET: what a clip listed from a prefix gets now, `storage._conditional`). The two
alternate, on the same clips. Run:
`.venv/bin/python bench/clip_requests.py [--store s3|gs] [--clips 60] [--latency-ms 30]`."""

import argparse
import collections
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gcs_server  # noqa: E402
import s3_server  # noqa: E402
from bench import encode  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=60)
    p.add_argument("--latency-ms", type=float, default=30.0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--store", choices=("s3", "gs"), default="s3")
    args = p.parse_args()
    seen, lock = collections.Counter(), threading.Lock()

    def count(kind):
        with lock:
            seen[kind] += 1
        time.sleep(args.latency_ms / 1000)

    def s3_hook(environ):
        if environ["PATH_INFO"].startswith("/bench/clips/"):
            count(environ["REQUEST_METHOD"])
        else:
            time.sleep(args.latency_ms / 1000)

    def gcs_hook(kind, name):  # (gcsfs asks a file's metadata as objects.get and objects.list at once)
        label = {"info": "GET (metadata)", "list": "GET (listing)", "media": "GET"}[kind]
        count(label) if name.startswith("clips/c") else time.sleep(args.latency_ms / 1000)

    server = s3_server.start(s3_hook) if args.store == "s3" else gcs_server.start("bench", gcs_hook)
    try:
        import fsspec

        from rayvid import storage
        from rayvid.decode import REMOTE_CALLS_PER_ACTOR, Decoder

        if args.store == "s3":
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
        fs = fsspec.filesystem("s3" if args.store == "s3" else "gs", **({} if args.store == "s3" else {"token": "anon"}))
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.clips):  # 0.3 s of 64x64 at 10 fps: a few KB, as in the QA pass's archive
                fs.put_file(encode(os.path.join(tmp, f"c{i:04d}.mp4"), 0.3, 64, 64, 10, seed=i), f"bench/clips/c{i:04d}.mp4")
        listed = [row for page in storage.iter_files(f"{args.store}://bench/clips/") for row in page]
        assert len(listed) == args.clips
        dec = Decoder(size=(64, 64), batch_frames=64)

        def clip(url, size, version):
            rows = [b for b in dec.decode_video(url, version=version, size=size)]
            end = rows[-1]
            assert end["error_type"][0] == "", end["message"][0]
            return int(end["n_frames"][0])

        ways = {"metadata, GET, metadata (size unknown)": -1, "one conditional GET (listed size and version)": None}
        results = collections.defaultdict(list)
        for way in list(ways) * args.reps:
            seen.clear()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(REMOTE_CALLS_PER_ACTOR) as pool:
                frames = sum(pool.map(lambda r: clip(r[0], r[1] if ways[way] is None else -1, r[2]), listed))
            wall = time.perf_counter() - t0
            results[way].append((args.clips / wall, frames, dict(seen)))
        print(f"{args.clips} clips of 0.3 s (64x64, 10 fps) on {args.store.upper()} answering each request after "
              f"{args.latency_ms:g} ms; one Decoder, {REMOTE_CALLS_PER_ACTOR} calls in flight:")
        for way, runs in results.items():
            rates = ", ".join(f"{r:.1f}" for r, _, _ in runs)
            print(f"  {way:45s} clips/s: {rates}   frames {runs[0][1]}   requests per run {runs[0][2]}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
