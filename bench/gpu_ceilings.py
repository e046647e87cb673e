"""The two numbers that size a GPU node, measured on that node without Ray: the model's
frames/s on one GPU, and decoding's CPU-seconds per frame on its CPUs. Their product is
how many decode CPUs keep one GPU fed (BENCHMARKS.md, "GPUs").

    python bench/gpu_ceilings.py --videos a.mp4 b.mp4 --json gpu.json
    python bench/gpu_ceilings.py --videos a.mp4 --models mobilenet_v3_small --batches 8 \\
        --precisions float32 --seconds 0.5 --procs 1            # a quick check on a CPU

Model: keras.applications MobileNetV3-Small and ResNet-50 at 224 (random weights: speed
does not depend on their values), fed uint8 batches from host memory, cast and preprocessed
on the device inside one compiled function as rayvid's Predictor does, the scores copied
back after every batch; float32 and mixed_float16 (rayvid's --mixed-precision); one stream
and two (threads calling the model at once, as rayvid's inference actor overlaps one
batch's host work with the next one's device work). Compiled with XLA on a GPU. Keras runs
on the backend KERAS_BACKEND names, else TensorFlow (rayvid's own) where it is installed,
else JAX: a lent GPU machine without TensorFlow measures Keras on JAX, both through XLA.

Decode: raw decord (1 thread, resize on decode to 224x224, 64-frame batches, as `make
bench`'s decode_raw row) and rayvid's decode stage (its Decoder: probe, decode child,
batches, as the decode_rayvid row), in one process and in one process per core at once (a
loaded node's CPUs run slower per core than an idle one's), as CPU-seconds per frame
(of each process and its children: rayvid decodes in a child process).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import queue
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # rayvid, also where it is not installed

SIZE = (224, 224)
DECODERS = ("raw", "rayvid")
MODELS = ("mobilenet_v3_small", "resnet50")
CAFFE_MEAN = (103.939, 116.779, 123.68)  # BGR, keras.applications.resnet50.preprocess_input


# ---------------------------------------------------------------- decode

def bench_module():
    """bench/bench.py (its decode passes, its CPU accounting), loaded by its path: run as a
    script, this folder is first on sys.path, and there `import bench` is bench.py itself."""
    if "rayvid_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("rayvid_bench", os.path.join(ROOT, "bench", "bench.py"))
        sys.modules["rayvid_bench"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["rayvid_bench"]


def _cpu_s() -> float:
    """CPU-seconds of this process and its live children (rayvid's decode child), as `make
    bench` counts them."""
    return bench_module().tree_cpu_s(os.getpid())


def _raw_pass(path: str):
    return lambda: bench_module().decord_frames(path, *SIZE)


def _rayvid_pass(path: str):
    from rayvid.decode import Decoder

    dec = Decoder(SIZE, threads=1)  # its child process starts here, before the clock
    return lambda: bench_module().rayvid_frames(dec.decode_video(path))


def _decode_for(path: str, seconds: float, decoder: str, start, results) -> None:
    """Whole passes of `decoder` over `path` until `seconds` have gone by, after one
    untimed pass (library loads, page cache) and once every process is ready (`start`).
    Puts its measurement, or its error as a string, on `results`."""
    try:
        one_pass = (_raw_pass if decoder == "raw" else _rayvid_pass)(path)
        one_pass()
        start.wait(timeout=600)
        t0, c0, frames = time.perf_counter(), _cpu_s(), 0
        while True:
            frames += one_pass()
            if time.perf_counter() - t0 >= seconds:
                break
        results.put({"frames": frames, "wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0})
    except BaseException as e:  # noqa: BLE001 - the parent says it and stops the others
        start.abort()
        results.put(f"{type(e).__name__}: {e}")


def decode(path: str, procs: int, seconds: float, decoder: str = "raw") -> dict:
    """`procs` processes decoding `path` with `decoder`, timed together; frames/s summed.
    The first worker's error ends the measurement (RuntimeError, saying it)."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_decode_for, args=(path, seconds, decoder, start, results)) for _ in range(procs)]
    for w in workers:
        w.start()
    runs = []
    try:
        deadline = time.monotonic() + seconds + 900
        while len(runs) < procs:
            try:
                run = results.get(timeout=1)
            except queue.Empty:
                if time.monotonic() > deadline or not any(w.is_alive() for w in workers):
                    raise RuntimeError(f"{decoder} on {path}: {procs - len(runs)} of {procs} workers "
                                       "gave no result (died, or too slow)") from None
                continue
            if isinstance(run, str):
                raise RuntimeError(f"{decoder} on {path}: {run}")
            runs.append(run)
    finally:
        for w in workers:
            w.join(timeout=5 if runs and len(runs) == procs else 0.1)
            if w.is_alive():
                w.kill()
    frames = sum(r["frames"] for r in runs)
    cpu = sum(r["cpu_s"] for r in runs)
    return {"decoder": decoder, "procs": procs, "frames": frames, "frames_per_s": round(sum(r["frames"] / r["wall_s"] for r in runs), 1),
            "cpu_ms_per_frame": round(1000 * cpu / frames, 3)}


def _source(path: str) -> dict:
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0))
    h, w = vr[0].shape[:2]
    return {"video": os.path.basename(path), "height": h, "width": w, "video_frames": len(vr),
            "fps": round(vr.get_avg_fps(), 3)}


# ---------------------------------------------------------------- the model

def _keras():
    if "KERAS_BACKEND" not in os.environ:
        try:
            import tensorflow  # noqa: F401
            os.environ["KERAS_BACKEND"] = "tensorflow"
        except ImportError:
            os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


def build(name: str, precision: str):
    """uint8 frames in, float32 scores out: cast and preprocessing in the graph."""
    keras = _keras()
    keras.config.set_dtype_policy(precision)
    try:
        frames = keras.Input((*SIZE, 3), dtype="uint8")
        x = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32"), dtype="float32")(frames)
        if name == "resnet50":
            x = keras.layers.Lambda(lambda t: keras.ops.flip(t, axis=-1) - keras.ops.array(CAFFE_MEAN),
                                    dtype="float32")(x)
            app = keras.applications.ResNet50(weights=None, input_shape=(*SIZE, 3))
        elif name == "mobilenet_v3_small":  # rescales to [-1, 1] itself
            app = keras.applications.MobileNetV3Small(weights=None, input_shape=(*SIZE, 3))
        else:
            raise ValueError(f"unknown model {name!r}: one of {', '.join(MODELS)}")
        scores = keras.layers.Activation("linear", dtype="float32")(app(x))
        return keras.Model(frames, scores)
    finally:
        keras.config.set_dtype_policy("float32")


def compiled(model, xla: bool):
    """`predict(uint8 numpy batch) -> numpy scores`, one compiled call per batch."""
    keras = _keras()
    if keras.backend.backend() == "jax":
        import jax
        import numpy as np

        trainable = [v.value for v in model.trainable_variables]
        fixed = [v.value for v in model.non_trainable_variables]
        fn = jax.jit(lambda t, f, x: model.stateless_call(t, f, x, training=False)[0])
        return lambda x: np.asarray(fn(trainable, fixed, x))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda x: model(x, training=False), jit_compile=xla)
        return lambda x: fn(x).numpy()
    return lambda x: keras.ops.convert_to_numpy(model(x, training=False))


def throughput(predict, batch: int, streams: int, seconds: float) -> dict:
    import numpy as np

    x = np.random.default_rng(0).integers(0, 256, (batch, *SIZE, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    predict(x)  # compiles for this batch size
    compile_s = time.perf_counter() - t0
    predict(x)
    counts = [0] * streams
    end = time.perf_counter() + seconds

    def loop(i):
        while time.perf_counter() < end:
            predict(x)
            counts[i] += batch

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"batch": batch, "streams": streams, "frames": sum(counts),
            "frames_per_s": round(sum(counts) / wall, 1), "first_call_s": round(compile_s, 2)}


def _gpu() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _devices(keras) -> list:
    """What the backend computes on (a GPU-less backend build runs on the CPU silently)."""
    if keras.backend.backend() == "jax":
        import jax

        return [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_logical_devices()]
    return []


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", nargs="+", required=True, help="local video files (decode measurements)")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS,
                    help="none: decoding alone (no Keras needed)")
    ap.add_argument("--precisions", nargs="+", default=["float32", "mixed_float16"],
                    choices=["float32", "mixed_float16", "mixed_bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement")
    ap.add_argument("--procs", nargs="+", type=int, default=[1, os.cpu_count() or 1],
                    help="decode processes at once")
    ap.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=DECODERS,
                    help="raw decord, rayvid's decode stage; the last one sizes the decode CPUs")
    ap.add_argument("--json", help="write the results here (rewritten after every measurement)")
    args = ap.parse_args(argv)

    words = sys.argv[1:] if argv is None else list(argv)
    res = {"command": " ".join(["python", os.path.relpath(__file__)] + words),
           "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "gpu": _gpu(), "python": platform.python_version()},
           "decode": [], "model": [], "decode_cpus_per_gpu": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)

    # decode first: the decode processes start before any GPU runtime is in this process
    for path in args.videos:
        src = _source(path)
        for decoder in args.decoders:
            for n in args.procs:
                row = dict(src, **decode(path, n, args.seconds, decoder))
                res["decode"].append(row)
                print(f"decode ({decoder}) {src['video']} {src['width']}x{src['height']} -> {SIZE[1]}x{SIZE[0]}, "
                      f"{n} procs: {row['frames_per_s']} frames/s, {row['cpu_ms_per_frame']} ms CPU/frame", flush=True)
                save()

    if not args.models:
        return 0
    keras = _keras()
    res["machine"].update(keras=keras.__version__, backend=keras.backend.backend(), devices=_devices(keras))
    gpu = bool(res["machine"]["gpu"])
    for name in args.models:
        for precision in args.precisions:
            predict = compiled(build(name, precision), xla=gpu)
            for batch in args.batches:
                for streams in (1, 2) if batch == max(args.batches) else (1,):
                    row = dict(model=name, precision=precision, **throughput(predict, batch, streams, args.seconds))
                    res["model"].append(row)
                    print(f"model {name} {precision} batch {batch}, {streams} stream(s): "
                          f"{row['frames_per_s']} frames/s (first call {row['first_call_s']} s)", flush=True)
                    save()

    # decode CPUs one GPU needs: its best frames/s for the model x decode CPU-s per frame
    # with every core busy (the most processes measured), of the last decoder measured
    for name in args.models:
        best = max((r for r in res["model"] if r["model"] == name), key=lambda r: r["frames_per_s"])
        for path in args.videos:
            rows = [r for r in res["decode"] if r["video"] == os.path.basename(path)
                    and r["decoder"] == args.decoders[-1]]
            loaded = max(rows, key=lambda r: r["procs"])
            row = {"model": name, "precision": best["precision"], "batch": best["batch"],
                   "streams": best["streams"], "model_frames_per_s": best["frames_per_s"],
                   "video": loaded["video"], "height": loaded["height"], "decoder": loaded["decoder"],
                   "decode_cpu_ms_per_frame": loaded["cpu_ms_per_frame"],
                   "decode_cpus": round(best["frames_per_s"] * loaded["cpu_ms_per_frame"] / 1000, 2)}
            res["decode_cpus_per_gpu"].append(row)
            print(f"{name} ({row['model_frames_per_s']} frames/s) on {row['height']}p sources: "
                  f"{row['decode_cpus']} decode CPUs", flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
