"""`make bench`: rayvid against the ways people run video models today, on this machine.

    make bench                                  # every regime (BENCHMARKS.md has the results)
    make bench BENCH_ARGS="--regimes mobilenet" # one regime
    make bench BENCH_ARGS="--quick"             # a tiny corpus: checks the harness (tests)
    make bench BENCH_ARGS="--gpus 1"            # on a GPU machine: inference on the GPU

For each regime (a corpus and a model) it measures, in this order and in one run:
1. the stage ceilings alone: raw decord (resize on decode, 1 thread) and the model alone
   (a tf.function on uint8 batches, every core), as frames/s and CPU-seconds per frame, and
   from them the CPU-bound limit: cores / (decode + inference CPU-s per frame) (with
   --gpus, no more than the GPUs infer: JSON `limit_by` says which);
2. rayvid's decode stage alone (its Decoder: probe, child process, batches) on the same
   settings as raw decord; then the two side by side in one process, whole passes
   alternating (`w_decode_pair`): the decode target's ratio, which the machine's drift
   between two separate processes would move by 10-30%;
3. end to end, side by side on the same videos and model: rayvid; a serial
   decode->predict loop; a tf.data pipeline (generator -> batch -> parallel map ->
   prefetch); Ray Data's own recipe (read_videos -> map_batches model actor ->
   write_parquet). Each writes per-frame top-1 predictions to Parquet.
Every measurement runs in a fresh process; frames/s counts from after `ray.init` (Ray's
start-up excluded, actor and model start-up included) to the last Parquet file written.
Peak RSS is each process's high-water mark (VmHWM), sampled through /proc; spilled bytes
and peak object-store use come from the raylet's store stats.

Then the experiments of BENCHMARKS.md: memory against video length, sparse sampling,
content-adaptive frame skipping, and inference sharing cores with a decoder. Its tables
print on stderr as it measures; the results go to `--json` and, at the end, to stdout as
the same JSON. Bad arguments are exit 2 before any work; Ctrl-C is exit 130, `--json` left
as it was; a kept `--workdir`'s videos are reused only where the same command made them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("rayvid", "serial", "tf_data", "ray_recipe")
EXPERIMENTS = ("memory", "sparse", "skip", "contention", "threads", "remote", "segments")

# name -> corpus (videos, seconds, height, width, fps) and model
REGIMES = {
    "mobilenet": dict(videos=4, seconds=20, height=360, width=640, fps=30, model="mobilenet_v3_small"),
    "resnet50": dict(videos=2, seconds=5, height=360, width=640, fps=30, model="resnet50"),
    "1080p": dict(videos=4, seconds=5, height=1080, width=1920, fps=30, model="mobilenet_v3_small"),
}
QUICK = dict(videos=2, seconds=1, height=120, width=160, fps=30, model="mobilenet_v3_small")


# ---------------------------------------------------------------- the corpus

def encode(path: str, seconds: float, height: int, width: int, fps: int, seed: int,
           gop: int | None = None, extra: list | None = None) -> str:
    """A deterministic H.264 test video with texture and motion (ffmpeg's testsrc2 plus
    temporal noise), at a bitrate like real 360p-1080p footage."""
    from rayvid.samples import ffmpeg_exe

    src = (f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds},"
           f"noise=alls=14:allf=t+u:all_seed={seed},hue=h={seed * 40}")
    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", src,
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p"]
    if gop:
        cmd += ["-g", str(gop), "-keyint_min", str(gop)]
    cmd += extra or []
    # a kept --workdir's video is reused only where it was made by this very command, whole:
    # the command is recorded beside it once it is written (a --quick run's 2 s video of the
    # same name was measured by a full run; one cut short by a Ctrl-C failed every rerun)
    made = path + ".cmd"
    with contextlib.suppress(OSError), open(made) as f:
        if os.path.exists(path) and f.read() == json.dumps(cmd[1:]):
            return path
    with contextlib.suppress(FileNotFoundError):  # (gone before the video changes: never another's record)
        os.remove(made)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp{os.path.splitext(path)[1]}")  # (hidden: never listed as input)
    subprocess.run(cmd + [tmp], check=True)
    os.replace(tmp, path)
    with open(made, "w") as f:
        f.write(json.dumps(cmd[1:]))
    return path


def _remux(src: str, dst: str, args: list) -> str:
    """`src`'s stream copied into `dst` (its container from its extension), unless `dst` is
    newer than `src` (a kept --workdir); written under a temporary name, then renamed."""
    from rayvid.samples import ffmpeg_exe

    if os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
        return dst
    folder, name = os.path.split(dst)
    tmp = os.path.join(folder, f".{name}.tmp{os.path.splitext(dst)[1]}")
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", src, "-c", "copy", *args, tmp], check=True)
    os.replace(tmp, dst)
    return dst


def corpus(root: str, spec: dict) -> list[str]:
    os.makedirs(root, exist_ok=True)
    return [encode(os.path.join(root, f"v{i}.mp4"), spec["seconds"], spec["height"], spec["width"],
                   spec["fps"], seed=i + 1) for i in range(spec["videos"])]


# ---------------------------------------------------------------- /proc accounting

def _children(pid: int) -> list[int]:
    out, todo = [], [pid]
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_cpu_s(pid: int) -> float:
    """CPU-seconds (user + system, every thread) of a process and its live descendants."""
    return sum(_cpu_s(p) for p in _children(pid))


def _hwm_mb(pid: int) -> tuple[str, float]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return cmd, int(line.split()[1]) / 1024
    except OSError:
        pass
    return "", 0.0


def _role(cmd: str) -> str:
    """A short name for a process: Ray's process title, or what it runs."""
    if cmd.startswith("ray::"):
        return cmd.split(" ")[0]
    if "rayvid.decode import serve" in cmd:
        return "rayvid decode child"
    for name in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py",
                 "runtime_env", "default_worker", "bench.py --worker"):
        if name in cmd:
            return "driver" if name == "bench.py --worker" else name
    return os.path.basename(cmd.split(" ")[0]) or "?"


class PeakRSS:
    """Samples VmHWM and CPU time of a process tree; keeps each process's peak RSS and last
    CPU-seconds, grouped by role (where a method's CPU goes)."""

    def __init__(self, pid: int, interval_s: float = 0.25):
        self.pid, self.interval_s = pid, interval_s
        self.peaks: dict[int, tuple[str, float]] = {}
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self):
        for p in _children(self.pid):
            cmd, mb = _hwm_mb(p)
            if mb and mb >= self.peaks.get(p, ("", 0.0))[1]:
                self.peaks[p] = (cmd, mb)
            self.cpu[p] = max(self.cpu.get(p, 0.0), _cpu_s(p))

    def stop(self) -> tuple[dict, dict]:
        """(peak RSS MB per role, CPU-seconds per role over the whole process lifetimes)."""
        self._stop.set()
        self._thread.join()
        by_role: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for pid, (cmd, mb) in self.peaks.items():
            role = _role(cmd)
            by_role[role] = max(by_role.get(role, 0.0), round(mb, 1))
            cpu[role] = round(cpu.get(role, 0.0) + self.cpu.get(pid, 0.0), 2)
        return (dict(sorted(by_role.items(), key=lambda kv: -kv[1])),
                dict(sorted(cpu.items(), key=lambda kv: -kv[1])))


class StoreStats:
    """Peak object-store bytes in use, and bytes spilled, from the raylet (Ray's own
    `ray memory --stats-only` numbers). Each sample asks the raylet, which asks every worker
    process: sampled every 2 s (the store's use under Ray Data's backpressure is a plateau),
    so that measuring does not slow what is measured."""

    def __init__(self, interval_s: float = 2.0):
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self._reply = lambda: get_memory_info_reply(state).store_stats  # noqa: E731
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, int(self._reply().object_store_bytes_used))
            except Exception:  # noqa: BLE001 - a missed sample is not a result
                pass
            self._stop.wait(self.interval_s)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        stats = self._reply()
        return {"object_store_peak_mb": round(max(self.peak, stats.object_store_bytes_used) / 2**20, 1),
                "spilled_bytes": int(stats.spilled_bytes_total)}


# ---------------------------------------------------------------- workers (one process each)

def _tf(threads: int):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def _load(tf, spec: dict):
    """The same model and uint8 -> float graph every method uses (rayvid's loader)."""
    from rayvid import infer, models
    from rayvid.config import ModelConfig

    model, info = models.load(ModelConfig(**spec["model"]))
    return model, infer.preprocess_graph(tf, info.preprocess), info


def _model_fn(tf, spec: dict):
    model, pre, info = _load(tf, spec)

    @tf.function(reduce_retracing=True)
    def predict(frames):
        return model(pre(tf.cast(frames, tf.float32)), training=False)

    return predict, info


def _write_top1(rows: dict, out: str, name: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.table(rows), os.path.join(out, name))


def _top1(scores, labels, uri, idx, rows):
    import numpy as np

    best = np.argmax(scores, axis=1)
    rows["video_uri"] += [uri] * len(best)
    rows["frame_index"] += list(idx)
    rows["label"] += [labels[b] for b in best]
    rows["score"] += scores[np.arange(len(best)), best].tolist()


def _decord_windows(path: str, h: int, w: int, window: int):
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), width=w, height=h, num_threads=1)
    for start in range(0, len(vr), window):
        stop = min(start + window, len(vr))
        yield range(start, stop), vr.get_batch(list(range(start, stop))).asnumpy()


def decord_frames(path: str, h: int, w: int, window: int = 64) -> int:
    """One pass of raw decord over `path` (1 thread, resize on decode): frames decoded."""
    return sum(len(frames) for _, frames in _decord_windows(path, h, w, window))


def rayvid_frames(batches) -> int:
    """Frames in rayvid decode batches (a Decoder's or a FrameReader's); an error row raises."""
    frames = 0
    for batch in batches:
        if batch["kind"][0] == "frame":
            frames += len(batch["frame_index"])
        elif batch["message"][0]:
            raise RuntimeError(batch["message"][0])
    return frames


def _timed(work) -> dict:
    """frames, wall and CPU-seconds (this process and its children) of `work()`."""
    t0, c0 = time.perf_counter(), tree_cpu_s(os.getpid())
    frames = work()
    return {"frames": frames, "wall_s": time.perf_counter() - t0, "cpu_s": tree_cpu_s(os.getpid()) - c0}


def _passes(spec, one_pass) -> dict:
    """`one_pass(videos)` -> frames, timed: with `decode_seconds`, after an untimed warm-up
    on the first video (lazy library loads, page cache), whole passes over the videos until
    that many seconds have gone by (a small corpus decodes in well under a second: too short
    to time on a noisy machine); without, one pass."""
    seconds = spec.get("decode_seconds", 0)
    if seconds:
        one_pass(spec["videos"][:1])

    counted = {}

    def work():
        frames, counted["passes"] = _for_at_least(seconds, lambda: one_pass(spec["videos"]))
        return frames

    return dict(_timed(work), passes=counted["passes"])


def _for_at_least(seconds: float, one_pass) -> tuple[int, int]:
    """(frames, passes) of `one_pass()` run again and again until `seconds` have gone by
    (once at least)."""
    t0, frames, passes = time.perf_counter(), one_pass(), 1
    while time.perf_counter() - t0 < seconds:
        frames += one_pass()
        passes += 1
    return frames, passes


def w_decode_raw(spec):
    import decord  # noqa: F401 - imported before the clock starts

    h, w = spec["size"]
    return _passes(spec, lambda videos: sum(decord_frames(path, h, w) for path in videos))


def w_decode_decord_sparse(spec):
    """What decord users write for 1 frame per second: get_batch of every fps-th index."""
    import decord

    h, w = spec["size"]

    def one_pass(videos):
        frames = 0
        for path in videos:
            vr = decord.VideoReader(path, ctx=decord.cpu(0), width=w, height=h, num_threads=1)
            step = max(1, round(vr.get_avg_fps() / spec["fps"]))
            frames += len(vr.get_batch(list(range(0, len(vr), step))).asnumpy())
        return frames

    return _passes(spec, one_pass)


def w_decode_rayvid(spec):
    """rayvid's decode stage alone: its Decoder (started before the clock: its child
    process is a one-off per actor), on the same videos and settings as raw decord."""
    from rayvid.decode import Decoder

    dec = Decoder(tuple(spec["size"]), threads=1, **spec.get("reader", {}))
    return _passes(spec, lambda videos: sum(rayvid_frames(dec.decode_video(path)) for path in videos))


def w_decode_pair(spec):
    """rayvid's decode stage against raw decord side by side in one process: raw decord's
    and rayvid's Decoder's (started before, as for decode_rayvid) whole passes over the
    videos, for at least `decode_seconds` each way in a round (a pass of a few short
    clips is under half a second: CPU time counts in 10 ms ticks), alternating, which goes
    first swapped every round, after one untimed pass of each. The machine's drift falls
    on both alike within a round; the target is the median of the rounds' ratios."""
    import statistics

    import decord  # noqa: F401 - imported before the clock starts

    from rayvid.decode import Decoder

    h, w = spec["size"]
    dec = Decoder(tuple(spec["size"]), threads=1, **spec.get("reader", {}))
    one_pass = {"raw": lambda: sum(decord_frames(path, h, w) for path in spec["videos"]),
                "rayvid": lambda: sum(rayvid_frames(dec.decode_video(path)) for path in spec["videos"])}
    seconds = spec.get("decode_seconds", 0)

    ways = {name: (lambda way=way: _for_at_least(seconds, way)[0]) for name, way in one_pass.items()}
    for way in one_pass.values():
        way()
    rounds, frames = [], 0
    for i in range(spec.get("decode_pair_rounds", 6)):
        timed = {name: _timed(ways[name]) for name in (("raw", "rayvid") if i % 2 == 0 else ("rayvid", "raw"))}
        frames += sum(t["frames"] for t in timed.values())
        rounds.append({name: {"frames_per_s": round(t["frames"] / t["wall_s"], 1),
                              "cpu_ms_per_frame": round(1000 * t["cpu_s"] / t["frames"], 3)} for name, t in timed.items()})
    ratio = [r["rayvid"]["frames_per_s"] / r["raw"]["frames_per_s"] for r in rounds]
    cpu = [r["raw"]["cpu_ms_per_frame"] / r["rayvid"]["cpu_ms_per_frame"] for r in rounds]
    return {"frames": frames, "rounds": rounds,
            "ratio_median": round(statistics.median(ratio), 3), "cpu_ratio_median": round(statistics.median(cpu), 3),
            "ratios": [round(x, 3) for x in ratio]}


def w_model_startup(spec):
    """What any TensorFlow method pays before its first prediction, in a fresh process:
    import TensorFlow, load the model, trace the function and run one batch of real frames
    (its first call builds the kernels). The clock starts before the import."""
    import numpy as np

    h, w = spec["size"]
    path = spec["videos"][0]
    frames = next(_decord_windows(path, h, w, spec["batch"]))[1]  # decoded before the clock
    t0, c0 = time.perf_counter(), tree_cpu_s(os.getpid())
    predict, _ = _model_fn(_tf(spec["cores"]), spec)
    predict(np.ascontiguousarray(frames)).numpy()
    return {"frames": len(frames), "wall_s": time.perf_counter() - t0, "cpu_s": tree_cpu_s(os.getpid()) - c0}


def best_end_to_end_fps(frames: int, startup_s: float, decode_s: float, infer_s: float, cores: int,
                        gpu_fps: Optional[float] = None) -> float:
    """The most frames/s any method running this model could reach end to end: the model's
    start-up (`model_startup`) on one core while every other core decodes (decoding needs
    no model), then all the remaining work at the CPU-bound limit, every core busy; with
    GPUs (`gpu_fps`: what they infer, together), no faster than they infer every frame."""
    work = frames * (decode_s + infer_s)
    ahead = min((cores - 1) * startup_s, frames * decode_s)
    after = (work - ahead) / cores
    return frames / (startup_s + (max(after, frames / gpu_fps) if gpu_fps else after))


def limit_fps(decode_s: float, infer_s: float, cores: int, gpus: int, infer_fps: float) -> tuple:
    """(the rate no method can beat on this machine, what sets it: "cpu" or "gpu"): cores ÷
    the CPU-seconds per frame of decoding and inference (with GPUs, inference's are the
    host's: feeding the GPU), and with GPUs no more than they infer (each GPU at
    `infer_fps`, the model alone on one)."""
    cpu = cores / (decode_s + infer_s)
    if gpus and gpus * infer_fps < cpu:
        return gpus * infer_fps, "gpu"
    return cpu, "cpu"


def w_infer(spec):
    """The model alone on every core, on uint8 batches of real frames, laid out as
    `spec["layout"]` says: "ops" (one call at a time, every op split over every core: TF's
    default, what the other methods do) or "streams" (rayvid's Predictor: one
    single-threaded call per core, side by side)."""
    import numpy as np

    h, w = spec["size"]
    # real frames of the corpus, decoded before the clock starts (content can change a
    # model's speed on CPU: random noise is not what it sees)
    frames = np.concatenate([b for _, (_, b) in zip(range(4), _decord_windows(spec["videos"][0], h, w, spec["batch"]))])
    frames = np.concatenate([frames] * -(-spec["batch"] // len(frames)))  # at least one batch
    batches = [frames[i:i + spec["batch"]] for i in range(0, len(frames) - spec["batch"] + 1, spec["batch"])]
    if spec["layout"] == "streams":
        from rayvid import infer
        from rayvid.config import ModelConfig

        run = infer.Predictor(ModelConfig(**spec["model"]), batch_size=spec["batch"], threads=spec["cores"]).scores
    else:
        predict, _ = _model_fn(_tf(spec["cores"]), spec)
        run = lambda x: predict(x).numpy()  # noqa: E731
    run(batches[0])  # trace and warm up outside the timing
    t0, c0 = time.perf_counter(), tree_cpu_s(os.getpid())
    n = 0
    while time.perf_counter() - t0 < spec.get("infer_seconds", 10.0) or n < 4 * spec["batch"]:
        run(batches[(n // spec["batch"]) % len(batches)])
        n += spec["batch"]
    return {"frames": n, "wall_s": time.perf_counter() - t0, "cpu_s": tree_cpu_s(os.getpid()) - c0}


def w_serial(spec):
    tf = _tf(spec["cores"])
    predict, info = _model_fn(tf, spec)
    h, w = info.input_size
    rows = {"video_uri": [], "frame_index": [], "label": [], "score": []}
    for path in spec["videos"]:
        for idx, batch in _decord_windows(path, h, w, spec["batch"]):
            _top1(predict(batch).numpy(), info.labels, path, idx, rows)
    _write_top1(rows, spec["out"], "part-0.parquet")
    return {"frames": len(rows["label"])}


def w_tf_data(spec):
    import numpy as np

    tf = _tf(spec["cores"])
    model, pre, info = _load(tf, spec)
    h, w = info.input_size
    paths = spec["videos"]

    def frames():
        for v, path in enumerate(paths):
            for idx, batch in _decord_windows(path, h, w, 16):
                for i, frame in zip(idx, batch):
                    yield v, i, frame

    ds = tf.data.Dataset.from_generator(frames, output_signature=(
        tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.int64), tf.TensorSpec((h, w, 3), tf.uint8)))
    ds = ds.batch(spec["batch"]).map(lambda v, i, f: (v, i, pre(tf.cast(f, tf.float32))),
                                     num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    @tf.function(reduce_retracing=True)
    def infer(x):
        return model(x, training=False)

    rows = {"video_uri": [], "frame_index": [], "label": [], "score": []}
    for v, i, x in ds:
        scores = infer(x).numpy()
        best = np.argmax(scores, axis=1)
        rows["video_uri"] += [paths[k] for k in v.numpy()]
        rows["frame_index"] += i.numpy().tolist()
        rows["label"] += [info.labels[b] for b in best]
        rows["score"] += scores[np.arange(len(best)), best].tolist()
    _write_top1(rows, spec["out"], "part-0.parquet")
    return {"frames": len(rows["label"])}


def w_ray_recipe(spec):
    import ray

    h, w = spec["size"]
    model_spec, cores, gpus = spec["model"], spec["cores"], spec.get("gpus", 0)

    class Classifier:
        def __init__(self):
            import numpy as np

            self.np = np
            tf = _tf(cores)
            self.predict, self.info = _model_fn(tf, {"model": model_spec})

        def __call__(self, batch):
            scores = self.predict(batch["frame"]).numpy()
            best = self.np.argmax(scores, axis=1)
            return {"video_uri": batch["path"], "frame_index": batch["frame_index"],
                    "label": self.np.array([self.info.labels[b] for b in best], dtype=object),
                    "score": scores[self.np.arange(len(best)), best]}

    ds = ray.data.read_videos(spec["videos"], resize=(h, w), include_paths=True)
    ds = ds.map_batches(Classifier, batch_size=spec["batch"], concurrency=1,
                        num_gpus=1 if gpus else 0, num_cpus=1)
    ds.write_parquet(spec["out"])
    import pyarrow.dataset as pads

    return {"frames": pads.dataset(spec["out"], format="parquet").count_rows()}


def w_rayvid(spec):
    from rayvid import decode, pipeline, video
    from rayvid.config import DecodeConfig, InferConfig, ModelConfig, RunConfig, SamplingConfig

    cfg = RunConfig(input=spec["input"], output=spec["out"], model=ModelConfig(**spec["model"]),
                    sampling=SamplingConfig(**spec.get("sampling", {})),
                    decode=DecodeConfig(**spec.get("decode", {})),
                    infer=InferConfig(batch_size=spec["batch"], **spec.get("infer", {})),
                    progress=False)
    if "shared_node_threads" in spec:  # the threads experiment: this many on every source
        decode.SHARED_NODE_THREADS, video.LARGE_SOURCE_PIXELS = spec["shared_node_threads"], 0
    if "remote_calls" in spec:  # the remote experiment: calls per decode actor on remote videos
        decode.REMOTE_CALLS_PER_ACTOR = spec["remote_calls"]
    result = pipeline.run(cfg)
    out = {"frames": result.frames, "plan": result.plan}
    if getattr(result, "inference", None):
        out["inference"] = result.inference
    return out


def w_contend_infer(spec):
    """Inference for `seconds` per phase on uint8 batches, as `mode` says: "ops" (one call
    at a time, every op split over every core: the classic) or "streams" (rayvid's
    Predictor: side-by-side single-threaded calls). One process for every phase (the model
    loads once): for each of `phases` it writes `ready`-phase once warmed up, waits for
    `go`-phase (the caller starts that phase's decoder, if any, right after), then measures."""
    import numpy as np

    batch = np.random.default_rng(0).integers(0, 255, (spec["batch"], *spec["size"], 3), dtype=np.uint8)
    if spec["mode"] == "streams":
        from rayvid import infer
        from rayvid.config import ModelConfig

        run = infer.Predictor(ModelConfig(**spec["model"]), batch_size=spec["batch"]).scores
    else:
        tf = _tf(spec["cores"])
        predict, _ = _model_fn(tf, spec)
        run = lambda x: predict(x).numpy()  # noqa: E731
    run(batch)
    phases = {}
    for phase in spec["phases"]:
        open(f"{spec['ready']}-{phase}", "w").close()
        deadline = time.time() + 600
        while not os.path.exists(f"{spec['go']}-{phase}"):
            if time.time() > deadline:  # the caller failed: no go will come
                raise RuntimeError(f"contention: no go for phase {phase!r}")
            time.sleep(0.01)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < spec["seconds"]:
            run(batch)
            n += len(batch)
        phases[phase] = {"frames": n, "frames_per_s": n / (time.perf_counter() - t0)}
    return {"frames": sum(p["frames"] for p in phases.values()), "phases": phases}


def w_contend_decode(spec):
    """decord at full speed (as fast as it can go) for `seconds`, at CPU priority `nice`."""
    os.nice(spec["nice"])
    h, w = spec["size"]
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < spec["seconds"]:
        for idx, _ in _decord_windows(spec["video"], h, w, 64):
            n += len(idx)
            if time.perf_counter() - t0 >= spec["seconds"]:
                break
    return {"frames": n, "wall_s": time.perf_counter() - t0}


WORKERS = {"decode_raw": w_decode_raw, "decode_rayvid": w_decode_rayvid, "decode_pair": w_decode_pair, "infer": w_infer,
           "model_startup": w_model_startup,
           "decode_decord_sparse": w_decode_decord_sparse,
           "serial": w_serial, "tf_data": w_tf_data, "ray_recipe": w_ray_recipe, "rayvid": w_rayvid,
           "contend_infer": w_contend_infer, "contend_decode": w_contend_decode}
RAY_WORKERS = ("ray_recipe", "rayvid")


def worker_main(name: str, spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    store = None
    if name in RAY_WORKERS:
        import logging

        import ray

        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 num_cpus=spec["cores"], num_gpus=spec.get("gpus", 0),
                 object_store_memory=spec.get("object_store_mb", 1024) * 2**20)
        ray.data.DataContext.get_current().enable_progress_bars = False
        store = StoreStats()
    t0, c0 = time.perf_counter(), tree_cpu_s(os.getpid())
    result = WORKERS[name](spec)
    result.setdefault("wall_s", time.perf_counter() - t0)
    result.setdefault("cpu_s", tree_cpu_s(os.getpid()) - c0)
    if store is not None:
        result.update(store.stop())
    print("RESULT " + json.dumps(result), flush=True)
    if name in RAY_WORKERS:
        import ray

        ray.shutdown()


def measure(name: str, spec: dict, tmp: str, timeout_s: float = 1800) -> dict:
    """Runs one worker in a fresh process; adds peak RSS per process role."""
    spec_path = os.path.join(tmp, f"spec-{name}-{time.monotonic_ns()}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", name, spec_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    rss = PeakRSS(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    peaks, cpu = rss.stop()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{err[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["frames_per_s"] = round(result["frames"] / result["wall_s"], 1)
    result["cpu_s_per_frame"] = round(result["cpu_s"] / result["frames"], 6)
    result["wall_s"], result["cpu_s"] = round(result["wall_s"], 2), round(result["cpu_s"], 2)
    result["peak_rss_mb"] = peaks
    result["cpu_s_by_process"] = cpu  # whole lifetimes, start-up included
    return result


# ---------------------------------------------------------------- a regime, end to end

def archive_b(root: str, videos: list) -> tuple[str, list]:
    """root/b: archive A's videos and two copies of each (hard links), 3x the frames."""
    b_dir = os.path.join(root, "b")
    os.makedirs(b_dir, exist_ok=True)
    b_videos = []
    for copy in range(3):
        for v in videos:
            dst = os.path.join(b_dir, f"c{copy}_{os.path.basename(v)}")
            with contextlib.suppress(FileNotFoundError):  # (a link to a video encoded again since: stale)
                os.remove(dst)
            os.link(v, dst)
            b_videos.append(dst)
    return b_dir, b_videos


def run_regime(name: str, spec: dict, tmp: str, cores: int, gpus: int, methods, with_b: bool = True) -> dict:
    """Stage ceilings, then every method on archive A (the regime's videos) and on archive
    B (A and two copies of each: 3x the frames). End to end counts each method's fixed
    start-up (model load, actors); the steady rate, (frames B - frames A) / (time B - time
    A), is what the method sustains once started: what a large archive sees."""
    root = os.path.join(tmp, "corpus", name)
    t0 = time.time()
    videos = corpus(os.path.join(root, "a"), spec)
    b_dir, b_videos = archive_b(root, videos)
    model = {"name": spec["model"], "weights": "none"}
    # every method at one batch size: rayvid's default for its device (32 on CPUs, 128 per GPU)
    common = {"videos": videos, "input": os.path.join(root, "a"), "model": model, "size": [224, 224],
              "batch": 128 if gpus else 32, "cores": cores, "gpus": gpus}
    log(f"[{name}] corpus: {len(videos)} x {spec['seconds']} s {spec['width']}x{spec['height']} "
        f"{spec['fps']} fps H.264 ({time.time() - t0:.0f} s to encode)")
    res = {"corpus": {k: spec[k] for k in ("videos", "seconds", "height", "width", "fps")},
           "model": spec["model"], "stages": {}, "methods": {}}
    # the two decode stages in alternating pairs, each keeping its best pass (the machine's
    # noise moves one measurement by 10-20%: their ratio is the target)
    decodes = {"decode_raw": [], "decode_rayvid": []}
    for _ in range(spec.get("decode_reps", 2)):
        for stage in decodes:
            r = measure(stage, dict(common, decode_seconds=spec.get("decode_seconds", 5)), tmp)
            decodes[stage].append(r)
            log(f"[{name}] {stage:14s} {r['frames_per_s']:8.1f} frames/s  {1000 * r['cpu_s_per_frame']:.2f} ms CPU/frame")
    for stage, runs in decodes.items():
        res["stages"][stage] = dict(min(runs, key=lambda r: r["cpu_s_per_frame"]),
                                    runs_frames_per_s=[r["frames_per_s"] for r in runs])
    for stage, extra in (("infer_ops", {"layout": "ops"}), ("infer_streams", {"layout": "streams"})):
        res["stages"][stage] = r = measure("infer", dict(common, infer_seconds=spec.get("infer_seconds", 10), **extra), tmp)
        log(f"[{name}] {stage:14s} {r['frames_per_s']:8.1f} frames/s  {1000 * r['cpu_s_per_frame']:.2f} ms CPU/frame")
    # the limit takes the cheaper way to run the model on this machine: no method may beat it
    layout = min(("ops", "streams"), key=lambda k: res["stages"]["infer_" + k]["cpu_s_per_frame"])
    res["stages"]["infer"] = dict(res["stages"]["infer_" + layout], layout=layout)
    dec, inf = res["stages"]["decode_raw"], res["stages"]["infer"]
    # (with GPUs, what one infers: the faster layout's, not the one cheaper in host CPU)
    one_gpu = max(res["stages"]["infer_" + k]["frames_per_s"] for k in ("ops", "streams"))
    limit, limit_by = limit_fps(dec["cpu_s_per_frame"], inf["cpu_s_per_frame"], cores, gpus, one_gpu)
    # (named so in every run; with GPUs it is theirs where they infer less than the cores feed)
    res["cpu_bound_limit_fps"], res["limit_by"] = round(limit, 1), limit_by
    gpu_fps = gpus * one_gpu if gpus else None
    # the two stages' ceilings above come from separate processes, minutes apart: their
    # ratio moves with the machine. The target is measured side by side (w_decode_pair)
    res["decode_stage_vs_raw_decord_separate"] = round(res["stages"]["decode_rayvid"]["frames_per_s"]
                                                       / dec["frames_per_s"], 3)
    pair = measure("decode_pair", dict(common, decode_pair_rounds=spec.get("decode_pair_rounds", 6),
                                       decode_seconds=spec.get("decode_pair_seconds", 3)), tmp)
    res["decode_pair"] = {k: pair[k] for k in ("rounds", "ratios", "ratio_median", "cpu_ratio_median")}
    res["decode_stage_vs_raw_decord"] = pair["ratio_median"]
    log(f"[{name}] decode side by side, {len(pair['rounds'])} rounds: rayvid / raw decord frames/s "
        f"{', '.join(f'{x:.2f}' for x in pair['ratios'])} (median {pair['ratio_median']:.2f}); CPU per frame, "
        f"raw / rayvid: median {pair['cpu_ratio_median']:.2f}")
    log(f"[{name}] CPU-bound limit: {cores} cores / ({1000 * dec['cpu_s_per_frame']:.2f} + "
        f"{1000 * inf['cpu_s_per_frame']:.2f} ms, {layout})"
        + (f", at most {gpus} GPU x {one_gpu:.1f}" if gpus else "")
        + f" = {limit:.1f} frames/s ({limit_by}-bound); rayvid's decode stage "
        f"{res['decode_stage_vs_raw_decord']:.2f} of raw decord")
    startup = measure("model_startup", common, tmp)
    res["model_startup_s"] = startup["wall_s"]

    def best(frames: int) -> float:  # the most any method could do end to end on this archive
        return best_end_to_end_fps(frames, startup["wall_s"], dec["cpu_s_per_frame"], inf["cpu_s_per_frame"], cores,
                                   gpu_fps)

    log(f"[{name}] model start-up (import TensorFlow, load, trace, first batch) {startup['wall_s']:.1f} s: "
        f"no method can beat {best(len(videos) * round(spec['seconds'] * spec['fps'])):.1f} frames/s end to end "
        f"on archive A")
    for method in methods:
        runs = {}
        for archive, vids, inp in (("a", videos, common["input"]), ("b", b_videos, b_dir))[: 2 if with_b else 1]:
            out = os.path.join(tmp, "out", name, method, archive)
            shutil.rmtree(out, ignore_errors=True)
            runs[archive] = measure(method, dict(common, videos=vids, input=inp, out=out), tmp)
        a = runs["a"]
        b = runs.get("b")  # --quick: no archive B, so no B rates and no steady rate (None)
        steady = ((b["frames"] - a["frames"]) / (b["wall_s"] - a["wall_s"])
                  if b and b["wall_s"] > a["wall_s"] + 1 else None)
        fps_b = b["frames_per_s"] if b else None
        ratio = lambda x: round(x / limit, 3) if x else None  # noqa: E731
        r = res["methods"][method] = {
            "archive_a": a, "archive_b": b,
            "end_to_end_fps": a["frames_per_s"], "end_to_end_fps_b": fps_b,
            "steady_fps": round(steady, 1) if steady else None,
            "vs_limit": {"end_to_end": ratio(a["frames_per_s"]), "end_to_end_b": ratio(fps_b),
                         "steady": ratio(steady)},
            # against the most any method could do end to end (best_end_to_end_fps)
            "best_fps": {"a": round(best(a["frames"]), 1), "b": round(best(b["frames"]), 1) if b else None},
            "vs_best": {"end_to_end": round(a["frames_per_s"] / best(a["frames"]), 3),
                        "end_to_end_b": round(fps_b / best(b["frames"]), 3) if b else None},
            "startup_s": round(a["wall_s"] - a["frames"] / steady, 1) if steady else None,
        }
        last = b or a
        extra = ""
        if "inference" in last:
            extra = f"  model busy {100 * last['inference']['model_busy']:.0f}%"
        if "spilled_bytes" in last:
            extra += (f"  spilled {sum(x['spilled_bytes'] for x in runs.values())} B  object store peak "
                      + "/".join(f"{x['object_store_peak_mb']:.0f}" for x in runs.values())
                      + f" MB ({'/'.join(runs).upper()})")
        steady_text = f"steady {steady:6.1f} = {r['vs_limit']['steady']:.2f} of the limit" if steady else "no steady rate"
        on_b = (f"{b['frames_per_s']:6.1f} (B) frames/s = {r['vs_limit']['end_to_end_b']:.2f} of the limit (B)"
                if b else f"frames/s = {r['vs_limit']['end_to_end']:.2f} of the limit (A)")
        log(f"[{name}] {method:10s} end to end {a['frames_per_s']:6.1f} (A) {on_b}, {steady_text}{extra}")
    frames = {m: (r["archive_a"]["frames"], (r["archive_b"] or {}).get("frames")) for m, r in res["methods"].items()}
    if len(set(frames.values())) > 1:
        raise RuntimeError(f"methods disagree on the number of frames: {frames}")
    if "rayvid" in res["methods"]:
        ours = res["methods"]["rayvid"]
        res["rayvid_vs"] = {m: {"end_to_end": round(ours["end_to_end_fps"] / r["end_to_end_fps"], 2),
                                "end_to_end_b": round(ours["end_to_end_fps_b"] / r["end_to_end_fps_b"], 2)
                                if ours["end_to_end_fps_b"] and r["end_to_end_fps_b"] else None,
                                "steady": round(ours["steady_fps"] / r["steady_fps"], 2)
                                if ours["steady_fps"] and r["steady_fps"] else None}
                            for m, r in res["methods"].items() if m != "rayvid"}
    return res


# ---------------------------------------------------------------- experiments

def exp_memory(tmp: str, quick: bool) -> dict:
    """Peak RSS of rayvid's decode stage (the actor's process and its decode child) on a
    short and a 10x longer 1080p video: memory must not grow with video length."""
    h, w, fps = (120, 160, 10) if quick else (1080, 1920, 10)
    short_s, long_s = (2, 20) if quick else (60, 600)
    d = os.path.join(tmp, "memory")
    os.makedirs(d, exist_ok=True)
    t0 = time.time()
    paths = {n: encode(os.path.join(d, f"{n}.mp4"), s, h, w, fps, seed=7) for n, s in (("short", short_s), ("long", long_s))}
    log(f"[memory] {short_s} s and {long_s} s at {w}x{h}, {fps} fps ({time.time() - t0:.0f} s to encode)")
    res = {"video": {"height": h, "width": w, "fps": fps, "short_s": short_s, "long_s": long_s}}
    for n, path in paths.items():
        r = measure("decode_rayvid", {"videos": [path], "size": [224, 224]}, tmp)
        peaks = r["peak_rss_mb"]
        res[n] = {"frames": r["frames"], "frames_per_s": r["frames_per_s"],
                  "actor_mb": peaks.get("driver", 0.0), "child_mb": peaks.get("rayvid decode child", 0.0)}
        res[n]["total_mb"] = round(res[n]["actor_mb"] + res[n]["child_mb"], 1)
        log(f"[memory] {n:5s} {r['frames']:6d} frames: decode actor {res[n]['actor_mb']:.0f} MB + "
            f"child {res[n]['child_mb']:.0f} MB peak RSS")
    res["long_vs_short"] = round(res["long"]["total_mb"] / res["short"]["total_mb"], 3)
    log(f"[memory] peak RSS, {long_s} s video / {short_s} s video: {res['long_vs_short']:.2f}")
    return res


def exp_sparse(tmp: str, quick: bool) -> dict:
    """CPU to decode every frame vs 1 frame per second vs key frames only, on one video
    encoded three ways: x264's default key-frame interval (250 frames, plus scene cuts);
    at most 1 s (-g 30; x264's scene cuts make the intervals irregular: key frames at 0,
    29, 58, 87, 111, ... here, so the 1 s samples fall a frame or more after them); and a
    fixed 1 s interval (-g 30 -sc_threshold 0: what HLS/DASH packagers encode, so that
    segments start on key frames); and decord's get_batch of the same 1 fps indices."""
    seconds, h, w = (2, 120, 160) if quick else (20, 360, 640)
    d = os.path.join(tmp, "sparse")
    os.makedirs(d, exist_ok=True)
    res = {}
    videos = {"gop_250": (None, None), "gop_30": (30, None), "gop_30_fixed": (30, ["-sc_threshold", "0"])}
    for name, (gop, extra) in videos.items():
        if quick and name != "gop_30_fixed":
            continue
        path = encode(os.path.join(d, f"{name}.mp4"), seconds, h, w, 30, seed=3, gop=gop, extra=extra)
        # a pass costs a tenth of a CPU-second or so: after a warm-up, whole passes for a while
        common = {"videos": [path], "size": [224, 224], "decode_seconds": 0 if quick else 3}
        runs = {
            "all_frames": measure("decode_rayvid", common, tmp),
            "fps_1": measure("decode_rayvid", dict(common, reader={"fps": 1.0}), tmp),
            "keyframes": measure("decode_rayvid", dict(common, reader={"keyframes": True}), tmp),
            "decord_get_batch_fps_1": measure("decode_decord_sparse", dict(common, fps=1), tmp),
        }
        # per pass over the video: frames kept, CPU-seconds
        per = {k: (r["frames"] // r["passes"], r["cpu_s"] / r["passes"]) for k, r in runs.items()}
        full = per["all_frames"][1]
        res[name] = {k: {"frames": n, "cpu_s": round(cpu, 4), "passes": runs[k]["passes"],
                         "cheaper_than_all": round(full / max(cpu, 1e-6), 1)}
                     for k, (n, cpu) in per.items()}
        log(f"[sparse] {name}: " + ", ".join(f"{k} {v['frames']} frames {v['cpu_s']:.2f} CPU-s ({v['cheaper_than_all']}x less)"
                                             for k, v in res[name].items()))
    return res


def exp_threads(tmp: str, quick: bool, cores: int, reps: int = 3) -> dict:
    """rayvid end to end on the 360p (MobileNetV3) and 1080p corpora of the regimes, archives
    A and B, with decode actors that share the cores with CPU inference decoding every
    source on 1 or on 2 threads (rayvid itself uses 2 from HD sources up:
    video.LARGE_SOURCE_PIXELS), in alternating pairs of runs."""
    corpora = {"quick": QUICK} if quick else {n: REGIMES[n] for n in ("mobilenet", "1080p")}
    res = {}
    for name, spec in corpora.items():
        root = os.path.join(tmp, "corpus", name)
        archive_b(root, corpus(os.path.join(root, "a"), spec))
        runs = {1: [], 2: []}
        for rep in range(1 if quick else reps):
            for threads in (1, 2):
                pair = {}
                for archive in ("a",) if quick else ("a", "b"):
                    out = os.path.join(tmp, "out", "threads", name, archive)
                    shutil.rmtree(out, ignore_errors=True)
                    r = measure("rayvid", {"input": os.path.join(root, archive), "out": out, "batch": 32,
                                           "cores": cores, "shared_node_threads": threads,
                                           "model": {"name": spec["model"], "weights": "none"}}, tmp)
                    pair[archive] = {"frames": r["frames"], "wall_s": r["wall_s"], "frames_per_s": r["frames_per_s"],
                                     "decode_threads": r["plan"]["decode_threads"]}
                runs[threads].append(pair)
                log(f"[threads] {name} {threads} thread(s): " + ", ".join(
                    f"{a.upper()} {x['frames_per_s']:.1f} frames/s" for a, x in pair.items()))
        res[name] = {str(t): runs[t] for t in runs}
    return res


class SlowLink:
    """A TCP proxy on 127.0.0.1 in front of `upstream` (host, port) that delivers each
    connection's replies at most `mb_per_s` MB/s: a far or busy object store, in one
    process."""

    def __init__(self, upstream: tuple, mb_per_s: float):
        import socket

        self.upstream, self.rate = upstream, mb_per_s * 1e6
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:  # the store is down: this connection fails, the next may not
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, 0), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.rate), daemon=True).start()

    @staticmethod
    def _pump(src, dst, rate: float):
        t0, sent = time.monotonic(), 0
        try:
            while data := src.recv(64 * 1024):
                dst.sendall(data)
                if rate:
                    sent += len(data)
                    time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
                else:
                    t0, sent = time.monotonic(), 0
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(2)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@contextlib.contextmanager
def slow_s3(mb_per_s: float):
    """S3 (moto on 127.0.0.1) behind SlowLink at `mb_per_s` MB/s per connection, set in the
    AWS environment of this process and its workers; yields a boto3 client that reaches the
    store directly (uploads skip the slow link) and has made the bucket `bench`."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    with contextlib.redirect_stdout(sys.stderr):  # (its "Starting a new Thread" line: stdout is the JSON)
        moto.start()
    host, port = moto.get_host_and_port()
    link = SlowLink((host, port), mb_per_s)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{link.port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the workers inherit it
    try:
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
        s3.create_bucket(Bucket="bench")
        yield s3
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        link.close()
        moto.stop()


def exp_remote(tmp: str, quick: bool, cores: int, mb_per_s: float = 4.0, reps: int = 2) -> dict:
    """rayvid end to end on the 1080p regime's archive B (12 videos of 5.9 MB) read from S3
    (moto on 127.0.0.1 behind SlowLink: `mb_per_s` MB/s per connection), with one call per
    decode actor (fetch, then decode) and with rayvid's two (decode.REMOTE_CALLS_PER_ACTOR:
    the next video is fetched while one decodes), in alternating pairs of runs."""
    spec = QUICK if quick else REGIMES["1080p"]
    videos = corpus(os.path.join(tmp, "corpus", "quick" if quick else "1080p", "a"), spec)
    with slow_s3(mb_per_s) as s3:
        for copy in range(1 if quick else 3):
            for v in videos:
                s3.upload_file(v, "bench", f"in/c{copy}_{os.path.basename(v)}")
        runs = {1: [], 2: []}
        for _ in range(1 if quick else reps):
            for calls in (1, 2):
                out = os.path.join(tmp, "out", "remote")
                shutil.rmtree(out, ignore_errors=True)
                r = measure("rayvid", {"input": "s3://bench/in/", "out": out, "batch": 32, "cores": cores,
                                       "remote_calls": calls,
                                       "model": {"name": spec["model"], "weights": "none"}}, tmp)
                runs[calls].append({"frames": r["frames"], "wall_s": r["wall_s"], "frames_per_s": r["frames_per_s"],
                                    "decode_calls": r["plan"]["decode_calls"]})
                log(f"[remote] {calls} call(s) per decode actor: {r['frames_per_s']:.1f} frames/s")
    return {"mb_per_s_per_connection": mb_per_s, "videos": len(videos) * (1 if quick else 3),
            "video_mb": round(sum(os.path.getsize(v) for v in videos) / len(videos) / 1e6, 2),
            "calls": {str(c): runs[c] for c in runs}}


def _segment_frames(dec, url: str, k: int, bounds: list) -> int:
    """Frames of segment `k` of `url` decoded by `dec` (a Decoder); a segment's error raises."""
    frames = 0
    for batch in dec.decode_video(url, k, len(bounds), *bounds[k]):
        if batch["kind"][0] == "frame":
            frames += len(batch["frame_index"])
        elif batch["message"][0]:
            raise RuntimeError(batch["message"][0])
    return frames


def exp_segments(tmp: str, quick: bool, mb_per_s: float = 4.0, reps: int = 2) -> dict:
    """Remote videos read through partial copies against whole copies (`ranged=False`,
    what rayvid did before), on S3 behind SlowLink (`mb_per_s` MB/s per connection), each
    decoded by one Decoder in this process (no Ray: only the fetching differs) on as many
    threads as the pipeline gives a decode actor over remote videos
    (REMOTE_CALLS_PER_ACTOR: one fetches while another decodes), in alternating pairs.
    `segments`: one long 360p video cut into segments, every frame
    (partial: the index, then each segment's own bytes). `segments_mkv`: the same video
    in Matroska (no index of where frames lie: copied whole; "shared": one copy for the
    segments decoded at the same time, against one per segment). `segments_fmp4`: the HD
    video below remuxed into a fragmented MP4 (a fragment per key frame, an mfra table),
    cut into 10 s segments: partial copies (every moof, then each segment's own bytes)
    against the shared whole copy rayvid made of fragmented MP4s before (in --quick the
    fragments are too small for partial copies to be worth it: there the partial way asks
    for them anyway, `fetch_gap_bytes=0`); `segments_fmp4_apart`: the same, its segments
    decoded one after another (one thread), as segments on different nodes are: no
    whole copy is shared then. `sparse`: one HD video with
    x264's default key-frame interval (250 frames) sampled sparsely in one segment
    (partial: the index, then the runs of packets the sampled frames need). Bytes read
    from the store, seconds, frames."""
    from rayvid import segments
    from rayvid.decode import REMOTE_CALLS_PER_ACTOR, Decoder

    os.makedirs(os.path.join(tmp, "corpus"), exist_ok=True)
    seconds, height, width, segment_s = (6, 240, 320, 1.0) if quick else (120, 360, 640, 20.0)
    long_video = encode(os.path.join(tmp, "corpus", f"segments-{seconds}s.mp4"), seconds, height, width, 30,
                        seed=11, gop=60)  # a key frame every 2 s, as streaming encoders do
    long_mkv = os.path.join(tmp, "corpus", f"segments-{seconds}s.mkv")
    _remux(long_video, long_mkv, [])  # the same stream, remuxed
    hd_seconds, hd_height, hd_width = (4, 240, 320) if quick else (60, 1080, 1920)
    hd_video = encode(os.path.join(tmp, "corpus", f"sparse-{hd_seconds}s-{hd_height}p.mp4"), hd_seconds,
                      hd_height, hd_width, 30, seed=12)
    hd_frag = os.path.join(tmp, "corpus", f"fragmented-{hd_seconds}s-{hd_height}p.mp4")
    _remux(hd_video, hd_frag, ["-movflags", "+frag_keyframe+empty_moov"])  # a fragment per key frame
    partial, whole = {}, {"ranged": False}
    cases = {  # case -> (video, segments, sampling, {way: Decoder arguments}), rayvid's way first
        "segments": (long_video, segments.bounds(segments.header_duration(long_video), segment_s), {},
                     {"partial": partial, "whole": whole}),
        "segments_mkv": (long_mkv, segments.bounds(segments.header_duration(long_mkv), segment_s), {},
                         {"shared": partial, "whole": whole}),
        "segments_fmp4": (hd_frag, segments.bounds(segments.header_duration(hd_frag), segment_s / 2), {},
                          {"partial": {"fetch_gap_bytes": 0} if quick else partial,
                           "shared": {"fetch_gap_bytes": 2**62}}),  # never worth it: copied whole, shared
        "segments_fmp4_apart": (hd_frag, segments.bounds(segments.header_duration(hd_frag), segment_s / 2), {},
                                {"partial": {"fetch_gap_bytes": 0} if quick else partial,
                                 "shared": {"fetch_gap_bytes": 2**62}}),
        "sparse_keyframes": (hd_video, [(-math.inf, math.inf)], {"keyframes": True},
                             {"partial": partial, "whole": whole}),
        "sparse_fps_1": (hd_video, [(-math.inf, math.inf)], {"fps": 1.0}, {"partial": partial, "whole": whole}),
    }
    out = {"mb_per_s_per_connection": mb_per_s, "calls_per_actor": REMOTE_CALLS_PER_ACTOR}
    with slow_s3(mb_per_s) as s3:
        for video in (long_video, long_mkv, hd_video, hd_frag):
            s3.upload_file(video, "bench", f"in/{os.path.basename(video)}")
        for case, (video, bounds, sampling, ways) in cases.items():
            url = f"s3://bench/in/{os.path.basename(video)}"
            ranged, other = ways  # rayvid's way, and the one it is measured against
            runs = {way: [] for way in ways}
            threads = 1 if case.endswith("_apart") else REMOTE_CALLS_PER_ACTOR
            for _ in range(1 if quick else reps):
                for way in runs:
                    dec = Decoder((224, 224), **ways[way], **sampling)
                    t0 = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                        frames = sum(pool.map(lambda k: _segment_frames(dec, url, k, bounds), range(len(bounds))))
                    runs[way].append({"frames": frames, "wall_s": round(time.perf_counter() - t0, 2),
                                      "bytes_fetched": dec.bytes_fetched})
                    del dec
                    log(f"[{case}] {way:7s} copies: {runs[way][-1]['bytes_fetched'] / 1e6:.1f} MB read, "
                        f"{runs[way][-1]['wall_s']:.1f} s")
            size = os.path.getsize(video)
            best = {way: min(r["wall_s"] for r in rs) for way, rs in runs.items()}
            c = segments.header_duration(video)
            out[case] = {"video": f"{c:.0f} s {os.path.basename(video)}", "video_mb": round(size / 1e6, 2),
                         "sampling": " ".join(f"--{k}" if v is True else f"--{k} {v:g}" for k, v in sampling.items())
                         or "every frame", "segments": len(bounds), "runs": runs,
                         "read_vs_size": {w: round(rs[0]["bytes_fetched"] / size, 3) for w, rs in runs.items()},
                         "whole_vs_partial_wall": round(best[other] / best[ranged], 2), "threads": threads}
    return out


def exp_contention(tmp: str, quick: bool, cores: int) -> dict:
    """Inference (MobileNetV3-Small, 224, batch 32) on every core, alone and next to a
    decoder decoding as fast as it can at CPU priority 0 and 10; inference as one call
    with every op split over the cores ("ops") and as rayvid's side-by-side single-threaded
    calls ("streams"). Frames/s of each: what sharing cores costs each side. One inference
    process per layout measures its three phases in turn (the model loads once)."""
    seconds = 1 if quick else 20
    video = encode(os.path.join(tmp, f"contention-{2 if quick else 10}s.mp4"), 2 if quick else 10, 360, 640, 30, seed=5)
    model = {"name": "mobilenet_v3_small", "weights": "none"}
    nices = {"alone": None, "decoder at nice 0": 0, "decoder at nice 10": 10}
    res = {}
    for mode in ("ops", "streams"):
        ready, go = os.path.join(tmp, f"ready-{mode}"), os.path.join(tmp, f"go-{mode}")
        spec = {"mode": mode, "model": model, "batch": 32, "size": [224, 224], "cores": cores,
                "seconds": seconds, "ready": ready, "go": go, "phases": list(nices)}
        box: dict = {}
        worker = threading.Thread(target=lambda: box.update(measure("contend_infer", spec, tmp)))
        worker.start()
        decoded = {}
        try:
            for phase, nice in nices.items():
                while not os.path.exists(f"{ready}-{phase}") and worker.is_alive():
                    time.sleep(0.05)
                open(f"{go}-{phase}", "w").close()
                if nice is not None and worker.is_alive():
                    decoded[phase] = measure("contend_decode", {"nice": nice, "video": video, "size": [224, 224],
                                                                "seconds": seconds}, tmp)["frames_per_s"]
        finally:  # a decoder that failed: the worker's remaining phases go, and it ends
            for phase in nices:
                open(f"{go}-{phase}", "a").close()
            worker.join()
        if "phases" not in box:
            raise RuntimeError(f"contention: inference ({mode}) failed")
        for phase in nices:
            row = {"infer_fps": round(box["phases"][phase]["frames_per_s"], 1)}
            if phase in decoded:
                row["decoder_fps"] = decoded[phase]
            res[f"{mode}, {phase}"] = row
            log(f"[contention] {mode}, {phase}: {row}")
            for f in (f"{ready}-{phase}", f"{go}-{phase}"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f)
    return res


def exp_skip(tmp: str, quick: bool, cores: int) -> dict:
    """--skip-similar on static-camera footage (still scenes with sensor noise, every third
    scene moving), with the sample shapes classifier: model calls saved, and top-1
    agreement with a run that infers every frame."""
    import pyarrow.dataset as pads

    from rayvid import samples

    d = os.path.join(tmp, "skip")
    seconds = 4 if quick else 60
    videos = os.path.join(d, f"videos-{seconds}s")  # (a --quick run's and a full run's apart in a kept --workdir)
    os.makedirs(videos, exist_ok=True)
    for i in range(1 if quick else 2):
        path = os.path.join(videos, f"still_{i}.mp4")
        if not os.path.exists(path):
            partial = os.path.join(videos, f".still_{i}.tmp.mp4")
            samples.make_still_video(partial, seconds, seed=20 + i)
            os.replace(partial, path)
    model_dir = os.path.join(d, "model")
    if not samples._model_saved(model_dir, "shapes"):
        samples.train_model(model_dir)
    spec = {"input": videos, "model": {"name": os.path.join(model_dir, "shapes.keras")}, "batch": 32, "cores": cores}
    runs, tables = {}, {}
    for name, sampling in (("every_frame", {}), ("skip_similar", {"skip_similar": 2.0})):
        out = os.path.join(d, "out", name)
        shutil.rmtree(out, ignore_errors=True)
        runs[name] = measure("rayvid", dict(spec, out=out, sampling=sampling), tmp)
        tables[name] = pads.dataset(os.path.join(out, "predictions"), format="parquet").to_table(
            columns=["video_uri", "frame_index", "label", "reused_from"]).sort_by([("video_uri", "ascending"), ("frame_index", "ascending")])
    a, b = tables["every_frame"], tables["skip_similar"]
    assert a.column("frame_index").equals(b.column("frame_index"))
    inferred = b.column("reused_from").null_count  # rows the model saw
    agree = sum(x == y for x, y in zip(a.column("label").to_pylist(), b.column("label").to_pylist())) / len(a)
    res = {"frames": len(a), "inferred_every_frame": len(a), "inferred_skip_similar": inferred,
           "fewer_inferences": round(len(a) / max(1, inferred), 2), "top1_agreement": round(agree, 4),
           "threshold": 2.0, "wall_s": {k: r["wall_s"] for k, r in runs.items()}}
    log(f"[skip] {len(a)} frames: {inferred} inferred with --skip-similar 2 ({res['fewer_inferences']}x fewer), "
        f"top-1 agreement {100 * agree:.2f}%")
    return res


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("NAME", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated: {', '.join(REGIMES)}")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--experiments", default=",".join(EXPERIMENTS), help=f"comma-separated: {', '.join(EXPERIMENTS)}")
    p.add_argument("--quick", action="store_true", help="a tiny corpus and model run: checks the harness")
    p.add_argument("--gpus", type=int, default=0, help="GPUs for inference (default 0: CPU)")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    # not bench/results.json: that is the record BENCHMARKS.md is printed from (a full run and
    # the earlier runs and experiments it names), which a run, whole or partial, would replace
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "last_run.json"),
                   help="where the results go (default bench/last_run.json; bench/results.json is the record "
                        "BENCHMARKS.md is printed from: merge a run into it by hand)")
    p.add_argument("--markdown", metavar="JSON", help="print BENCHMARKS.md's tables from a results file")
    p.add_argument("--workdir", help="keep the corpus and outputs here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.markdown:
        try:
            with open(args.markdown) as f:
                print(markdown(json.load(f)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            p.error(f"--markdown {args.markdown}: not a results file of this bench ({type(e).__name__}: {e})")
        return 0
    if args.worker:
        worker_main(*args.worker)
        return 0
    # everything a run needs, checked before its minutes of work (each was a traceback, the
    # --json path only after the whole run, its results lost)
    names = {"--regimes": (args.regimes, REGIMES), "--methods": (args.methods, METHODS),
             "--experiments": (args.experiments, EXPERIMENTS)}
    for flag, (given, known) in names.items():
        unknown = [x for x in given.split(",") if x and x not in known]
        if unknown:
            p.error(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if args.quick and args.regimes != p.get_default("regimes"):
        p.error("--quick runs its own tiny regime: leave out --regimes")
    if args.cores < 1 or args.gpus < 0:
        p.error(f"--cores must be >= 1 and --gpus >= 0, got {args.cores} and {args.gpus}")
    folder = os.path.dirname(os.path.abspath(args.json))
    if (os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK)
            or (os.path.exists(args.json) and not os.access(args.json, os.W_OK))):
        p.error(f"--json {args.json}: not a file that can be written (its folder must exist)")
    if args.workdir and os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        p.error(f"--workdir {args.workdir} is a file")
    if args.gpus and not _gpus_seen():
        log(f"warning: --gpus {args.gpus}, but no NVIDIA GPU is visible here (nvidia-smi): Ray gives the "
            f"inference actors logical GPUs and the model runs on the CPU; these are CPU numbers")
    tmp = args.workdir or tempfile.mkdtemp(prefix="rayvid-bench-")
    os.makedirs(tmp, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    regimes = {"quick": dict(QUICK, infer_seconds=1, decode_seconds=0.5, decode_reps=1, decode_pair_rounds=2, decode_pair_seconds=0)} if args.quick else {r: REGIMES[r] for r in args.regimes.split(",") if r}
    results = {"command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
               "machine": _machine(args.cores, args.gpus), "regimes": {}}
    try:
        for name, spec in regimes.items():
            results["regimes"][name] = run_regime(name, spec, tmp, args.cores, args.gpus, methods,
                                                  with_b=not args.quick)
        exps = [e for e in args.experiments.split(",") if e]
        if "memory" in exps:
            results["memory"] = exp_memory(tmp, args.quick)
        if "sparse" in exps:
            results["sparse"] = exp_sparse(tmp, args.quick)
        if "skip" in exps:
            results["skip"] = exp_skip(tmp, args.quick, args.cores)
        if "contention" in exps:
            results["contention"] = exp_contention(tmp, args.quick, args.cores)
        if "threads" in exps:
            results["threads"] = exp_threads(tmp, args.quick, args.cores)
        if "remote" in exps:
            results["remote"] = exp_remote(tmp, args.quick, args.cores)
        if "segments" in exps:
            results["segments"] = exp_segments(tmp, args.quick)
    except KeyboardInterrupt:  # (a traceback, exit 1, and --json replaced by the nothing measured yet)
        log(f"bench: interrupted; {args.json} left as it was")
        return 130
    except Exception:  # what was measured before it failed, as before
        _write_json(args.json, results)
        raise
    else:
        _write_json(args.json, results)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


def _write_json(path: str, results: dict) -> None:
    """Whole or not at all (a Ctrl-C during the dump left it cut short)."""
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


def _gpus_seen() -> bool:
    """Whether nvidia-smi lists a GPU here."""
    try:
        return "GPU" in subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False


def markdown(results: dict) -> str:
    """The tables of BENCHMARKS.md, from a results JSON."""
    out = [f"Command: `{results['command']}`  ", f"Machine: {results['machine']}", ""]
    fmt = lambda v, f="{:.1f}": f.format(v) if v is not None else "n/a"  # noqa: E731
    for name, r in results.get("regimes", {}).items():
        c = r["corpus"]
        out += [f"### {name}: {r['model']}, {c['videos']} videos x {c['seconds']} s, {c['width']}x{c['height']} "
                f"{c['fps']} fps H.264", ""]
        if r.get("command"):  # measured by another run than the file's command
            out += [f"Command: `{r['command']}`", ""]
        out += ["| stage alone | frames/s | CPU ms/frame |", "| --- | --- | --- |"]
        for stage, s in r["stages"].items():
            if stage != "infer" or "infer_ops" not in r["stages"]:  # else a copy of the cheaper layout
                runs = s.get("runs_frames_per_s", [])
                each = f" (each run: {', '.join(f'{x:.1f}' for x in runs)})" if len(runs) > 1 else ""
                out.append(f"| {stage} | {s['frames_per_s']:.1f}{each} | {1000 * s['cpu_s_per_frame']:.2f} |")
        layout = r["stages"]["infer"].get("layout")
        out += ["", f"CPU-bound limit: **{r['cpu_bound_limit_fps']:.1f} frames/s**"
                + (f" (decode_raw + infer_{layout}, the cheaper layout)" if layout else "")
                + (" (set by the GPUs: what they infer, the model alone on each)" if r.get("limit_by") == "gpu" else "")
                + "; rayvid's decode stage runs at "
                f"**{r['decode_stage_vs_raw_decord']:.2f}** of raw decord"
                + (f" (side by side in one process, the median of {len(r['decode_pair']['ratios'])} rounds: "
                   f"{', '.join(f'{x:.2f}' for x in r['decode_pair']['ratios'])}; CPU per frame, raw / rayvid, "
                   f"{r['decode_pair']['cpu_ratio_median']:.2f}; the two stages' runs above, apart: "
                   f"{r['decode_stage_vs_raw_decord_separate']:.2f})" if "decode_pair" in r
                   else " (the two stages' runs above, in separate processes)") + ".", ""]
        best = next((x["best_fps"] for x in r["methods"].values() if "best_fps" in x), None)
        if best:
            has_b = any(x["archive_b"] for x in r["methods"].values())
            on_b = f" and **{best['b']:.1f}** on archive B" if has_b else " (no archive B: a --quick run)"
            out += [f"The model's start-up alone (import TensorFlow, load, trace, first batch): "
                    f"**{r['model_startup_s']:.1f} s**; so no method can beat **{best['a']:.1f}** frames/s end to "
                    f"end on archive A{on_b} (`best_end_to_end_fps`: that start-up "
                    f"with every other core decoding, then everything at the limit).", ""]
        out += ["| method | end to end A | end to end B | steady | steady / limit | B / limit | B / best | start-up s | "
                "peak RSS MB (largest processes) | spilled |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m, x in r["methods"].items():
            b = x["archive_b"] or x["archive_a"]  # (the RSS and spill of A where there is no B: --quick)
            rss = ", ".join(f"{k} {v:.0f}" for k, v in list(b["peak_rss_mb"].items())[:3])
            spilled = f"{b['spilled_bytes']} B" if "spilled_bytes" in b else "n/a"
            # (older results files: B's rates were A's where there was no archive B)
            b_only = lambda v: v if x["archive_b"] else None  # noqa: E731
            # A's wall less A's frames at the steady rate; below 0 when B ran slower per frame than A
            startup = lambda v: fmt(v) if v is None or v >= 0 else f"{v:.1f} (B slower than A)"  # noqa: E731
            out.append(f"| {m} | {x['end_to_end_fps']:.1f} | {fmt(b_only(x['end_to_end_fps_b']))} | {fmt(x['steady_fps'])} | "
                       f"{fmt(x['vs_limit']['steady'], '{:.2f}')} | {fmt(b_only(x['vs_limit']['end_to_end_b']), '{:.2f}')} | "
                       f"{fmt(b_only(x.get('vs_best', {}).get('end_to_end_b')), '{:.2f}')} | "
                       f"{startup(x['startup_s'])} | {rss} | {spilled} |")
        if "rayvid_vs" in r:
            if (r["methods"].get("rayvid") or {}).get("archive_b"):
                out += ["", "rayvid / baseline: " + "; ".join(
                    f"{m}: {v['end_to_end_b']}x end to end (B), {fmt(v['steady'], '{}x')} steady"
                    for m, v in r["rayvid_vs"].items())]
            else:  # --quick: archive A alone
                out += ["", "rayvid / baseline: " + "; ".join(
                    f"{m}: {v['end_to_end']}x end to end (A)" for m, v in r["rayvid_vs"].items())]
        ours = r["methods"].get("rayvid", {})
        t = (ours.get("archive_b") or ours.get("archive_a") or {}).get("inference")
        if t:
            archive = "B" if ours.get("archive_b") else "A"
            out += ["", f"rayvid's inference actors (archive {archive}): model busy {100 * t['model_busy']:.0f}%, "
                        f"waiting for frames {100 * t['waiting']:.0f}%."]
        out.append("")
    if "memory" in results:
        m = results["memory"]
        v = m["video"]
        out += _section("memory against video length", m)
        out += [
                f"| {v['width']}x{v['height']}, {v['fps']} fps | frames | decode actor MB | decode child MB | total MB |",
                "| --- | --- | --- | --- | --- |"]
        for n in ("short", "long"):
            out.append(f"| {v[n + '_s']} s | {m[n]['frames']} | {m[n]['actor_mb']:.0f} | {m[n]['child_mb']:.0f} | "
                       f"{m[n]['total_mb']:.0f} |")
        out += ["", f"Peak RSS, long / short: **{m['long_vs_short']:.2f}**", ""]
    if "sparse" in results:
        out += _section("sparse sampling", results["sparse"])
        out += ["| video | mode | frames | CPU-s | cheaper than every frame |", "| --- | --- | --- | --- | --- |"]
        for video, modes in _entries(results["sparse"]):
            for mode, x in modes.items():
                out.append(f"| {video} | {mode} | {x['frames']} | {x['cpu_s']:.2f} | {x['cheaper_than_all']}x |")
        out.append("")
    if "contention" in results:
        out += _section("sharing cores: inference next to a decoder", results["contention"])
        out += ["| inference | next to | inference frames/s | decoder frames/s |", "| --- | --- | --- | --- |"]
        for key, row in _entries(results["contention"]):
            mode, beside = key.split(", ", 1)
            out.append(f"| {mode} | {beside} | {row['infer_fps']:.1f} | {row.get('decoder_fps', 'n/a')} |")
        out.append("")
    if "threads" in results:
        out += _section("decode threads next to CPU inference (every source on 1 or 2 threads)", results["threads"])
        out += ["| corpus | threads | end to end A (each run) | end to end B (each run) |", "| --- | --- | --- | --- |"]
        for name, by in _entries(results["threads"]):
            for threads, pairs in by.items():
                rates = lambda a: ", ".join(f"{p[a]['frames_per_s']:.1f}" for p in pairs if a in p) or "n/a"  # noqa: E731
                out.append(f"| {name} | {threads} | {rates('a')} | {rates('b')} |")
        out.append("")
    if "remote" in results:
        r = results["remote"]
        out += _section("videos on a slow object store: fetching the next video while one decodes", r)
        out += [f"{r['videos']} videos of {r['video_mb']} MB on {_slow_store(r)}; rayvid end to end (1080p corpus, "
                "MobileNetV3).", "",
                "| calls per decode actor | frames/s (each run) |", "| --- | --- |"]
        for calls, runs in r["calls"].items():
            out.append(f"| {calls} | {_each(runs, 'frames_per_s')} |")
        out.append("")
    if "segments" in results:
        r = results["segments"]
        out += _section("remote videos: partial copies against whole ones", r)
        out += [f"{_slow_store(r)}; each case decoded (224x224) by one Decoder in the bench's process on {r.get('calls_per_actor', 1)} "
                "thread(s) (a decode actor's calls over remote videos; `_apart` cases on one: segments one after "
                "another, as on different nodes), alternating.", "",
                "| case | video | sampling | segments | copies | read (x the file) | seconds (each run) | frames |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for case, c in _entries(r):
            if not isinstance(c, dict):
                continue
            for way, runs in c["runs"].items():
                out.append(f"| {case} | {c['video']}, {c['video_mb']} MB | {c['sampling']} | {c['segments']} | {way} | "
                           f"{c['read_vs_size'][way]:.2f} | {_each(runs, 'wall_s')} | {runs[0]['frames']} |")
        out.append("")
    if "skip" in results:
        s = results["skip"]
        out += _section("--skip-similar on static-camera footage", s)
        out += [
                f"{s['frames']} frames; model calls: {s['inferred_every_frame']} without, {s['inferred_skip_similar']} "
                f"with `--skip-similar {s['threshold']:g}` (**{s['fewer_inferences']}x fewer**); top-1 agreement with "
                f"the full run **{100 * s['top1_agreement']:.2f}%**; wall {s['wall_s']}.", ""]
    return "\n".join(out)


def _slow_store(r: dict) -> str:
    """The store an experiment behind `slow_s3` read from."""
    return f"S3 (moto on 127.0.0.1) behind a link of {r['mb_per_s_per_connection']:g} MB/s per connection"


def _each(runs: list, key: str) -> str:
    """A table cell with every run's value of `key`."""
    return ", ".join(f"{x[key]:.1f}" for x in runs)


def _entries(part: dict) -> list:
    """A section's (key, value) pairs, less the command that measured it."""
    return [(k, v) for k, v in part.items() if k != "command"]


def _section(title: str, part: dict) -> list:
    """A section's heading, and the command that measured it where another run did."""
    return [f"### {title}", ""] + ([f"Command: `{part['command']}`", ""] if part.get("command") else [])


def _machine(cores: int, gpus: int) -> dict:
    import ray

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": cores, "gpus": gpus, "python": platform.python_version(),
            "ray": ray.__version__}


if __name__ == "__main__":
    sys.exit(main())
