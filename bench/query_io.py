"""What the query verbs read from an OUTPUT, and how long they take: bytes read (from
local files: the process's `rchar`, every read() from them; from S3, a moto server on
127.0.0.1: the bytes each GET of a predictions part asked for) and wall time of `segments`, `find`,
`segments --video`, `render`'s read of one video (`query.read(video=...)`), `export --video`
and `report`'s pass over the predictions (`query.parts` as it asks), against the
predictions' bytes on disk.

The OUTPUT: 4 parts of 30 videos x 1,000 frames (120,000 frame rows), top-5 labels and a
256-dim `--embed` vector per frame; row groups of 10,000 rows (the committer writes 128 Ki
row groups into parts of up to 1 Mi rows: a part of a long run has about 8), each part
sorted by video_uri as the committer writes it.
Run: `.venv/bin/python bench/query_io.py` (PYTHONPATH at an older checkout measures that)."""

import os
import sys
import tempfile
import time

VIDEOS_PER_PART, PARTS, FRAMES, DIM, GROUP = 30, 4, 1000, 256, 10_000


def build(out: str) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayvid import schema

    rng = np.random.default_rng(0)
    labels = [f"class_{i}" for i in range(20)]
    pred_schema = schema.with_head(schema.PREDICTIONS_SCHEMA, [schema.embedding_field(DIM)])
    for d in ("predictions", "videos"):
        os.makedirs(f"{out}/{d}", exist_ok=True)
    for p in range(PARTS):
        uris = [f"s3://bucket/cams/{p * VIDEOS_PER_PART + v:04d}.mp4" for v in range(VIDEOS_PER_PART)]
        n = len(uris) * FRAMES
        top = rng.integers(0, len(labels), n)
        scores = rng.random(n).astype(np.float32)
        emb = rng.standard_normal(n * DIM).astype(np.float32)
        table = pa.table({
            "video_uri": np.repeat(uris, FRAMES), "frame_index": np.tile(np.arange(FRAMES), len(uris)),
            "timestamp_s": np.tile(np.arange(FRAMES) / 25.0, len(uris)),
            "label": [labels[i] for i in top], "score": scores,
            "topk": [[{"class_id": int(t), "label": labels[t], "score": float(s)}] +
                     [{"class_id": (int(t) + j) % 20, "label": labels[(t + j) % 20], "score": 0.01}
                      for j in range(1, 5)] for t, s in zip(top, scores)],
            "reused_from": pa.nulls(n, pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb), DIM),
            "model": ["m"] * n, "run_id": ["r"] * n}, schema=pred_schema)
        name = f"part-r-{p:05d}.parquet"
        pq.write_table(table, f"{out}/predictions/{name}", compression="zstd", row_group_size=GROUP,
                       use_dictionary=["video_uri", "label", "model", "run_id"])
        k = len(uris)
        pq.write_table(pa.table({
            "video_uri": uris, "size_bytes": [1] * k, "version": ["v"] * k, "frames": [FRAMES] * k,
            "duration_s": [FRAMES / 25.0] * k, "fps": [25.0] * k, "width": [640] * k, "height": [360] * k,
            "codec": ["h264"] * k, "decoder": ["decord"] * k, "top_labels": [[]] * k, "error": [False] * k,
            "run_id": ["r"] * k}, schema=schema.VIDEOS_SCHEMA), f"{out}/videos/{name}")


def rchar() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar")


def moto_s3():
    """moto's S3 server (`s3_server`) and a list that each GET's bytes go into (its Range,
    else the object's size)."""
    import s3_server

    fetched: list = []

    def counted(environ):
        if environ["REQUEST_METHOD"] == "GET" and "/predictions/" in environ["PATH_INFO"]:
            first, last = (environ.get("HTTP_RANGE") or "bytes=0-").split("=")[1].split("-")
            fetched.append((int(last) + 1 - int(first)) if last else -1)

    return s3_server.start(counted), fetched


def main() -> None:
    from rayvid import query, storage

    with tempfile.TemporaryDirectory() as out:
        build(out)
        on_disk = sum(os.path.getsize(f"{out}/predictions/{f}") for f in os.listdir(f"{out}/predictions"))
        server, fetched = moto_s3()
        s3 = "s3://query-bench/out"
        fs, _ = storage.resolve(s3)
        fs.mkdir("query-bench")
        fs.put(out + "/", "query-bench/out/", recursive=True)
        video = "s3://bucket/cams/0045.mp4"
        report_columns = getattr(__import__("rayvid.report").report, "TIMELINE_COLUMNS", None)
        ways = {
            "segments": lambda o: query.segments(o),
            "find class_3": lambda o: query.find(o, "class_3"),
            "segments --video": lambda o: query.segments(o, video=video),
            "read(video) (render)": lambda o: query.read(o, video=video),
            "export --video": lambda o: query.export_csv(o, f"{out}/x.csv", video=video),
            "parts (report)": lambda o: sum(len(t) for t in query.parts(o, columns=report_columns)),
        }
        print(f"predictions: {on_disk / 2**20:.1f} MB in 4 parts ({query.__file__})")
        for name, fn in ways.items():
            for where, url in (("local", out), ("S3", s3)):
                fetched.clear()
                r0, t0 = rchar(), time.perf_counter()
                fn(url)
                wall, got = time.perf_counter() - t0, (rchar() - r0 if where == "local" else sum(fetched))
                gets = f" ({len(fetched)} GETs)" if where == "S3" else ""
                print(f"  {name:22s} {where:5s} read {got / 2**20:7.1f} MB{gets} in {wall:5.2f} s")
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
