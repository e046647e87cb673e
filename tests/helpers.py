"""Helpers shared by the tests: reference values from PyAV, reading outputs back."""

from __future__ import annotations

import os

import numpy as np

# Known fake credentials: tests grep every output for them (they must never leak).
FAKE_KEY_ID = "AKIAFAKEKEYID0000TEST"
FAKE_SECRET = "fake-secret-5c2e1d/ShouldNeverAppear+InOutput"
BUCKET = "rayvid-test"


def pts_of(path: str) -> np.ndarray:
    """Reference presentation times from PyAV: (pts - start_time) x time_base, sorted."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        pts = sorted(f.pts for f in c.decode(s))
        start = s.start_time or 0
        tb = s.time_base
    return np.array([(p - start) * tb.numerator / tb.denominator for p in pts])


def read_output(output: str, what: str = "predictions"):
    import pyarrow.dataset as ds

    from rayvid import storage

    fs, path = storage.resolve(output.rstrip("/") + "/" + what)
    if not fs.exists(path):
        return None
    return ds.dataset(path, filesystem=fs, format="parquet").to_table()


def upload_tree(fs, local_dir, url_prefix: str) -> None:
    for dirpath, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, local_dir)
            fs.put_file(src, url_prefix.rstrip("/") + "/" + rel)


def processes(title_prefix: str) -> list:
    """(pid, title) of this machine's processes whose command line starts with the prefix
    (Ray names worker processes after what they run: `ray::MapWorker(MapBatches(Decoder))`)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith(title_prefix):
            found.append((int(pid), title))
    return found


def frames_per_video(table) -> dict:
    """video_uri -> sorted frame indices (duplicates kept, so a test can see them)."""
    seen: dict = {}
    for uri, idx in zip(table.column("video_uri").to_pylist(), table.column("frame_index").to_pylist()):
        seen.setdefault(uri, []).append(idx)
    return {u: sorted(v) for u, v in seen.items()}
