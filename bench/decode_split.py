"""Where rayvid's decode stage spends CPU beyond raw decord, per frame, in one process:

    python bench/decode_split.py VIDEO [SECONDS]

Two rounds of four measurements, each whole passes over VIDEO for SECONDS (default 3)
after one untimed pass: raw decord (1 thread, resize on decode to 224x224, 64-frame
batches), rayvid's FrameReader run in this process, its Decoder (the reader in a child
process: CPU here and in the child apart), and the probe alone (per frame of the video).
"""

import os
import sys
import time


def main(path: str, seconds: float = 3.0) -> None:
    from gpu_ceilings import SIZE, bench_module  # beside this script; it puts rayvid on sys.path
    from rayvid import decode, video

    bench = bench_module()
    pid = os.getpid()
    reader = video.FrameReader(SIZE, threads=1)
    decoder = decode.Decoder(SIZE, threads=1)
    n_frames = len(video.probe(path).pts)
    ways = (("raw decord", lambda: bench.decord_frames(path, *SIZE)),
            ("reader in this process", lambda: bench.rayvid_frames(reader.read(path, path))),
            ("Decoder: here | child", lambda: bench.rayvid_frames(decoder.decode_video(path))),
            ("probe alone", lambda: video.probe(path) and n_frames))
    for round_ in range(2):
        for name, one_pass in ways:
            one_pass()
            own0, tree0, t0, n = bench._cpu_s(pid), bench.tree_cpu_s(pid), time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                n += one_pass()
            own, tree = bench._cpu_s(pid) - own0, bench.tree_cpu_s(pid) - tree0
            print(f"{round_} {name:24s} frames {n:6d}  here {1000 * own / n:.3f} ms/frame  "
                  f"children {1000 * (tree - own) / n:.3f} ms/frame", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *(float(a) for a in sys.argv[2:3]))
