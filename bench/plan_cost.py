"""What a partial copy's planning costs next to decoding it: CPU time of the probe, of the
plan of packet ranges (`plan_ranges`) and of the decode child's whole read (probe, plan and
decode), on a local partial copy of a 120 s 360p MP4 with 2 s key-frame intervals, for a
20 s segment, --keyframes and --fps 1. Run: `.venv/bin/python bench/plan_cost.py`."""

import math
import os
import sys
import tempfile
import time

import fsspec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import encode  # noqa: E402
from rayvid import storage  # noqa: E402
from rayvid.mp4 import index_only  # noqa: E402
from rayvid.video import FrameReader, plan_ranges, probe  # noqa: E402


def main() -> None:
    video = encode(os.path.join(tempfile.gettempdir(), "plan-120s.mp4"), 120, 360, 640, 30, seed=11, gop=60)
    fs, size = fsspec.filesystem("file"), os.path.getsize(video)
    cases = [("segment 20 s", {}, (40.0, 60.0)), ("keyframes", {"keyframes": True}, (-math.inf, math.inf)),
             ("fps 1", {"fps": 1.0}, (-math.inf, math.inf))]
    for name, sampling, bounds in cases:
        reader = FrameReader(size=(224, 224), **sampling)
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "copy.mp4")
            open(copy, "wb").close()
            os.truncate(copy, size)
            part = storage.RangeCopy(fs, video, size, copy)
            assert index_only(part)
            t0 = time.process_time()
            info = probe(copy, partial=True)
            t_probe = time.process_time() - t0
            keep = reader._keep(info, *bounds, -1)
            t0 = time.process_time()
            ranges = plan_ranges(copy, info, keep, reader.fetch_gap_bytes)
            t_plan = time.process_time() - t0
            part.fetch_ranges(ranges)  # as the actor does before the read
            t0 = time.process_time()
            for _ in reader.read(copy, "video", 0, 1, *bounds, partial=True, on_fetch=part.fetch_ranges):
                pass
            t_read = time.process_time() - t0
        print(f"{name:14s} frames {len(keep):4d}  probe {t_probe * 1e3:6.1f} ms  plan {t_plan * 1e3:6.1f} ms  "
              f"read (probe, plan, decode) {t_read * 1e3:7.1f} ms  plan/read {t_plan / t_read:.3f}")


if __name__ == "__main__":
    main()
