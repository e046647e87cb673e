"""Which decord build reads which file right, and how fast: the measurement behind
rayvid's decoder choice (README, "Decoders").

    python bench/decord_matrix.py            # with .venv's decord 0.6.0
    python -m venv /tmp/d2 && /tmp/d2/bin/pip install decord2==3.4.0 av==18.1.0 imageio-ffmpeg pyyaml \\
        && PYTHONPATH=. /tmp/d2/bin/python bench/decord_matrix.py     # decord2 (same `import decord`)

For each frame-code video of tests/framecode.py (codecs x containers x rotations), it reads
every frame sequentially and every 7th frame (get_batch, which seeks), and counts frames
that show another index; then times sequential decoding at 224x224 of 720p and 1080p clips.
"""

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import decord  # noqa: E402
import framecode  # noqa: E402

from rayvid import samples  # noqa: E402


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="decord-matrix-")
    matrix = framecode.make_matrix(tmp)
    print(f"decord {decord.__version__}")
    h, w = framecode.SIZE
    for name, (path, _) in sorted(matrix.items()):
        try:
            vr = decord.VideoReader(path, width=w, height=h, num_threads=1)
            n = len(vr)
            seq = vr.get_batch(list(range(n))).asnumpy()
            bad_seq = sum(framecode.read_code(f) != i for i, f in enumerate(seq))
            idx = list(range(0, n, 7))
            sparse = vr.get_batch(idx).asnumpy()
            bad_sparse = sum(framecode.read_code(f) != i for i, f in zip(idx, sparse))
            print(f"  {name:20s} frames={n:3d} wrong sequential={bad_seq} wrong every-7th={bad_sparse}")
        except Exception as e:  # noqa: BLE001 - a measurement: record and go on
            print(f"  {name:20s} cannot decode: {str(e).strip().splitlines()[0][:70]}")
    for size in ("1280x720", "1920x1080"):
        path = os.path.join(tmp, f"{size}.mp4")
        subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"testsrc2=size={size}:rate=30", "-t", "10", "-c:v", "libx264", "-preset", "ultrafast",
                        path], check=True)
        vr = decord.VideoReader(path, width=224, height=224, num_threads=1)
        start, n = time.perf_counter(), 0
        for s in range(0, len(vr), 64):
            n += len(vr.get_batch(list(range(s, min(s + 64, len(vr))))).asnumpy())
        print(f"  {size} H.264 -> 224x224, 1 thread: {n / (time.perf_counter() - start):.0f} frames/s")


if __name__ == "__main__":
    main()
