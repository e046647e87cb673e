"""Inference stage: uint8 frames in, top-k predictions out, one tf.keras model per actor.

Input columns:  the decode stage's output columns (decode.py): `frame` is read (uint8, at
  the model's size), `kind` and `reused_from` say which rows the model runs on (frame rows
  whose `reused_from` is -1); every other column passes through.
Output: an Arrow table in `schema.INFERRED_SCHEMA`: the same rows and columns without
  `frame`, plus `label`, `score` and `topk` for frame rows (null on the terminal `end` rows,
  which pass through untouched, and on rows whose `reused_from` names an earlier frame:
  the committer fills those in); with `--embed`, also `embedding:
  fixed_size_list<float32>[D]`; with `--head detect`, `boxes` (fractions of the frame:
  the committer makes them pixels); with a video model, the clip columns pass through
  (`schema.with_head`).

The cast to float and the model's preprocessing run inside one `tf.function` with a fixed
input signature `[batch_size, H, W, 3] uint8`; the last, short batch is padded, so the
graph is traced once per actor (at construction, as warm-up) and never again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayvid.config import ModelConfig
from rayvid.errors import ConfigError, ModelError, RayvidError
from rayvid.schema import (BOX_TYPE, INFERRED_SCHEMA, KIND_FRAME, TOPK_TYPE, boxes_field, clip_fields, embedding_field,
                           with_head)
from rayvid.storage import redact

log = logging.getLogger(__name__)


# Batches an inference actor holds at once (Ray Data's `max_concurrent_calls_per_actor`):
# two, so that one's host work overlaps the other's model calls (the model itself runs on
# the actor's own `streams` threads, never more at once).
CALLS_PER_ACTOR = 2


def resources(gpus_per_actor: float, cpus_per_actor: float) -> dict:
    """Ray resources of one inference actor, declared next to the stage."""
    if gpus_per_actor > 0:
        return {"num_gpus": gpus_per_actor, "num_cpus": cpus_per_actor}
    return {"num_cpus": cpus_per_actor}


MAX_CPU_THREADS = 4  # beyond this, one more actor beats more threads in one model


def cpu_threads(threads: int) -> int:
    if threads > 0:
        return int(threads)
    return max(1, min(MAX_CPU_THREADS, len(os.sched_getaffinity(0))))


def decode_grid(tf, raw, max_boxes: int, iou_threshold: float, score_threshold: float):
    """A grid detector's raw output [B, S, S, 5 + C] (models.detection_classes) -> boxes,
    as TF ops: cell (i, j) holds a box centred at ((j + sigmoid(tx)) / S, (i + sigmoid(ty))
    / S) of size (sigmoid(tw), sigmoid(th)), scored sigmoid(objectness) x softmax(classes);
    then tf.image.combined_non_max_suppression per class. Returns (boxes [B, M, 4] as
    y_min, x_min, y_max, x_max fractions of the frame, scores [B, M], classes [B, M] int32,
    valid [B] int32)."""
    s = tf.shape(raw)[1]
    grid = tf.cast(s, tf.float32)
    cells = tf.range(s, dtype=tf.float32)
    gy, gx = tf.meshgrid(cells, cells, indexing="ij")
    cx = (gx + tf.sigmoid(raw[..., 1])) / grid
    cy = (gy + tf.sigmoid(raw[..., 2])) / grid
    w, h = tf.sigmoid(raw[..., 3]), tf.sigmoid(raw[..., 4])
    corners = tf.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)
    b = tf.shape(raw)[0]
    boxes = tf.reshape(corners, [b, -1, 1, 4])
    scores = tf.sigmoid(raw[..., :1]) * tf.nn.softmax(raw[..., 5:], axis=-1)
    scores = tf.reshape(scores, [b, s * s, -1])
    nms = tf.image.combined_non_max_suppression(
        boxes, scores, max_output_size_per_class=max_boxes, max_total_size=max_boxes,
        iou_threshold=iou_threshold, score_threshold=score_threshold, clip_boxes=True)
    return (nms.nmsed_boxes, nms.nmsed_scores, tf.cast(nms.nmsed_classes, tf.int32),
            tf.cast(nms.valid_detections, tf.int32))


def preprocess_graph(tf, mode: str):
    """float32 RGB 0..255 -> model input, as TF ops (runs on the inference device)."""
    if mode in ("raw", "auto"):
        return lambda x: x
    if mode == "unit":
        return lambda x: x / 255.0
    if mode == "tf":
        return lambda x: x / 127.5 - 1.0
    if mode == "caffe":
        mean = tf.constant([103.939, 116.779, 123.68], tf.float32)
        return lambda x: x[..., ::-1] - mean
    if mode == "torch":
        mean = tf.constant([0.485, 0.456, 0.406], tf.float32)
        std = tf.constant([0.229, 0.224, 0.225], tf.float32)
        return lambda x: (x / 255.0 - mean) / std
    raise ValueError(f"unknown preprocess mode {mode!r}")


def topk_arrays(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(class ids, scores), each [n, k], best first; ties go to the lower class id."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order.astype(np.int32), np.take_along_axis(scores, order, axis=1).astype(np.float32)


def _check_batch_fits(batch_size: int, frame_shape: list, on_gpu: bool = False) -> None:
    """ConfigError where a batch's input alone (all its calls' shares) would take more than
    a quarter of the memory this node has free: on a CPU as float32, the model's
    activations several times that; on a GPU its uint8 frames, which stay in the node's
    memory (the warm-up's batch, the blocks it is cut from) while the GPU's own memory is
    sized by halving. The kernel's OOM killer (or Ray's memory monitor) ends the actor
    instead of an error Ray Data could report: restarted, killed again, the run never
    ended (a 224x224 model at --batch-size 65536 on a CPU: 39 GB)."""
    free = _free_bytes()
    need = int(batch_size) * int(np.prod(frame_shape)) * (1 if on_gpu else 4)
    # (never below 256 MB of input: the default batches, 32 or 128 frames, are far from it,
    # and a cgroup's count of memory in use can be off by its page cache)
    if free and need > max(free / 4, 256e6):
        shape = "x".join(str(d) for d in frame_shape)
        fits = max(1, int(batch_size * free / 4 / need))
        if on_gpu:
            raise ConfigError(f"--batch-size {batch_size}: a batch of {shape} frames is {_size(need)} in this "
                              f"node's memory (uint8) before it reaches the GPU, and this node has {_size(free)} "
                              f"free: use --batch-size {min(fits, 4096)} or less")
        raise ConfigError(f"--batch-size {batch_size}: a batch of {shape} inputs is {_size(need)} as float32 "
                          f"before the model's own activations, and this node has {_size(free)} free: "
                          f"use --batch-size {min(fits, 256)} or less (on a CPU more than a few hundred "
                          f"frames per batch buys no speed)")


def _not_in_xla(error: Exception) -> list:
    """The ops TensorFlow's error says XLA cannot compile ("Detected unsupported operations
    ... ResizeArea (No registered 'ResizeArea' OpKernel for XLA_CPU_JIT devices ..."), in
    order, once each; [] for any other error."""
    return list(dict.fromkeys(re.findall(r"No registered '(\w+)' OpKernel for XLA", str(error))))


def _out_of_memory(tf, error: Exception) -> bool:
    """Whether TensorFlow's error says the device ran out of memory: ResourceExhaustedError,
    or the InternalError/UnknownError that XLA's compiled code and its autotuning raise
    for the same ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate ...")."""
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return True
    text = str(getattr(error, "message", "") or error)
    return bool(re.search(r"RESOURCE_EXHAUSTED|out of memory|\bOOM\b|failed to allocate", text, re.I))


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _free_bytes(root: str = "") -> int:
    """Memory this process may still take: MemAvailable, or where lower its cgroup's limit
    less its working set (use less inactive page cache, as the kubelet counts it; cgroup v2,
    then v1); 0 where none can be read (no /proc: no check)."""
    def read(path: str) -> str:
        with open(root + path) as f:
            return f.read()

    def inactive(stat: str, key: str) -> int:
        return next((int(line.split()[1]) for line in stat.splitlines() if line.startswith(key + " ")), 0)

    free = 0
    with contextlib.suppress(OSError, ValueError, StopIteration):
        free = int(next(line for line in read("/proc/meminfo").splitlines()
                        if line.startswith("MemAvailable:")).split()[1]) * 1024
    for limit_file, usage_file, stat_file, key in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file")):
        with contextlib.suppress(OSError, ValueError):
            limit = read(f"/sys/fs/cgroup/{limit_file}").strip()
            if limit == "max" or int(limit) >= 1 << 60:  # (v1's "no limit": a huge number)
                break
            used = int(read(f"/sys/fs/cgroup/{usage_file}")) - inactive(read(f"/sys/fs/cgroup/{stat_file}"), key)
            left = int(limit) - max(0, used)
            free = min(free, left) if free else left
            break
    return max(0, free)


class Predictor:
    """Callable class run by Ray Data as an actor; the model loads once per actor."""

    def __init__(
        self,
        model: ModelConfig,
        batch_size: int,
        threads: int = 0,
        reports=None,
        clip_len: int = 0,
    ):
        """`threads`: on CPU, how many model calls run side by side (`streams`), each on
        one core, each on its share of the batch; 0: as many as the node has cores, up to
        `MAX_CPU_THREADS` (the decode actors on the node share the cores; they only run
        ahead as far as Ray Data's backpressure lets them). `reports`: a handle of a Ray
        actor running `Reports`, told the loaded model (or why it cannot load), and after
        every batch how long the model ran and how long this actor waited for frames.

        Any failure here (the model cannot load, an unknown preprocessing mode, a warm-up
        batch the model rejects) is told to `reports` before it is raised, as a
        RayvidError: the driver raises that, with its message, instead of Ray's report of a
        dead actor (`pipeline._raise_model_error`)."""
        try:
            self._start(model, batch_size, threads, clip_len)
        except RayvidError as e:
            _tell_failed(reports, e)
            raise
        except Exception as e:  # noqa: BLE001 - whatever stops the stage, said the same way
            from rayvid import models

            error = ModelError(f"cannot run model {models.display_name(model)}: {_reason(e)}")
            _tell_failed(reports, error)
            raise error from e
        if reports is not None:
            reports.loaded.remote(self.info)
        self._reports = reports

    def _start(self, model: ModelConfig, batch_size: int, threads: int, clip_len: int) -> None:
        """Load the model, trace the graph and run it once (`__init__`)."""
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from rayvid import models

        models.hide_unassigned_gpus()  # (a CPU actor on a GPU node: the model on the CPU, as planned)
        import tensorflow as tf  # heavy import: only inside the stage

        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:  # before TF touches the GPU, or it takes all of its memory
            tf.config.experimental.set_memory_growth(gpu, True)
        # On CPU, independent single-threaded model calls run side by side, one per core,
        # instead of every op being split across the cores: no barrier after each op, so a
        # core taken by something else (a decoder, Ray) slows one call, not all of them.
        # Measured (BENCHMARKS.md, "sharing cores"): MobileNetV3 on 2 cores next to a busy
        # decoder, 118 frames/s this way against 108 with each op on both cores.
        self.device = "GPU" if gpus else "CPU"
        held = _gpus_held()
        if held and not gpus:  # Ray gave this actor a GPU that TensorFlow cannot use
            log.warning("this inference actor holds %d GPU(s) from Ray, but TensorFlow finds none (no NVIDIA "
                        "driver or CUDA libraries where it runs?): the model runs on the CPU", len(held))
        self.streams = 1 if gpus else cpu_threads(threads)
        if not gpus:
            try:  # an actor owns its process; in-process use (tests) may find TF started
                tf.config.threading.set_intra_op_parallelism_threads(1)
                tf.config.threading.set_inter_op_parallelism_threads(self.streams)
            except RuntimeError:
                pass
        self._key = f"{os.uname().nodename}:{os.getpid()}"
        if model.mixed_precision and not gpus:  # float16 on a CPU: about half as fast (ResNet-50: 132 ms a frame, 64)
            log.warning("--mixed-precision is for GPUs: the model runs on the CPU here, in float32")
            model = dataclasses.replace(model, mixed_precision=False)
        # --mixed-precision: models.load builds keras.applications under the policy
        self.model, self.info = models.load(model)
        self.batch_size = max(1, int(batch_size) // self.streams)  # per call; a stream each
        self.topk = int(model.topk)
        self.labels = np.array(self.info.labels, dtype=object)
        h, w = self.info.input_size
        keras_model = self.model
        pre = preprocess_graph(tf, self.info.preprocess)
        embed = self.info.embedding_dim > 0
        self.head = model.head
        head = [embedding_field(self.info.embedding_dim)] if embed else []
        if self.head == "detect":
            head = [boxes_field()]
        # a video model takes clips: [batch, N, H, W, 3] (the decoder's clip rows)
        self.clip_len = int(clip_len) or max(0, self.info.clip_len)
        if self.info.clip_len and not self.clip_len:
            raise ValueError("a video model with no fixed clip length needs clip_len")
        frame_shape = [self.clip_len, h, w, 3] if self.clip_len else [h, w, 3]
        if self.clip_len:
            head = head + clip_fields()
        self.schema = with_head(INFERRED_SCHEMA, head)

        def network(x):
            return keras_model(x, training=False)

        detect = self.head == "detect"

        def build(batch_size: int, xla: bool):
            # (XLA has no kernel for the NMS: with --head detect it compiles the network alone)
            net = tf.function(network, jit_compile=True) if xla and detect else network

            @tf.function(
                input_signature=[tf.TensorSpec([batch_size, *frame_shape], tf.uint8)],
                jit_compile=xla and not detect,
                reduce_retracing=False,
            )
            def predict(frames):
                x = pre(tf.cast(frames, tf.float32))
                out = net(x)
                if model.head == "detect":  # decoding and NMS stay on the inference device
                    return decode_grid(tf, tf.cast(out, tf.float32), model.max_boxes,
                                       model.iou_threshold, model.min_box_score)
                if not embed:
                    return tf.cast(out, tf.float32), tf.zeros([batch_size, 0], tf.float32)
                scores, vectors = out
                vectors = tf.cast(vectors, tf.float32)
                if model.embed_normalize:
                    vectors = tf.math.l2_normalize(vectors, axis=-1)
                return tf.cast(scores, tf.float32), vectors

            return predict

        # (on a GPU a batch too large for the GPU halves below; one too large for the node,
        # or any on a CPU, the OS kills the actor, again and again)
        _check_batch_fits(batch_size, frame_shape, on_gpu=bool(gpus))
        xla = bool(model.xla)
        while True:  # trace + warm up now, not on the first real batch
            self._predict = build(self.batch_size, xla)
            self._zeros = np.zeros((self.batch_size, *frame_shape), dtype=np.uint8)
            try:
                warm = [t.numpy() for t in self._predict(self._zeros)]
                self._empty = tuple(t[:0] for t in warm)  # the outputs of zero frames
                break
            except (tf.errors.ResourceExhaustedError, tf.errors.InternalError, tf.errors.UnknownError) as e:
                if not _out_of_memory(tf, e):  # (the batch does not fit the device: else raised)
                    raise
                if self.batch_size == 1:
                    raise
                log.warning("a batch of %d does not fit the %s's memory: trying %d", self.batch_size * self.streams,
                            self.device, self.batch_size // 2 * self.streams)
                self.batch_size //= 2
            except tf.errors.InvalidArgumentError as e:  # ops XLA has no kernel for: run without it
                ops = _not_in_xla(e)
                if not (xla and ops):
                    raise
                log.warning("--xla: XLA cannot compile this model (no XLA kernel on the %s for %s): it runs "
                            "without XLA", self.device, ", ".join(ops))
                xla = False
        self.xla = xla
        drop_autograph_sources()
        # Model calls run on `streams` threads, whatever the number of batches in flight:
        # Ray Data hands this actor CALLS_PER_ACTOR batches at once (pipeline.py), so one
        # batch's host work (batching, top-k, Arrow) overlaps another's model calls, and a
        # stream that finishes its share of a batch starts on the next batch's.
        self._pool = ThreadPoolExecutor(self.streams)
        self._lock = threading.Lock()
        self._in_call, self._in_model = _Busy(), _Busy()
        self._first = None  # when the first batch came in: waiting counts from there
        self._counts = {"frames": 0, "batches": 0}
        self._warned_nan = False

    def scores(self, frames: np.ndarray) -> np.ndarray:
        """Model scores for any number of frames, in fixed-size (padded) batches."""
        return self.outputs(frames)[0]

    def outputs(self, frames: np.ndarray) -> tuple[np.ndarray, ...]:
        """The graph's outputs for any number of frames, in fixed-size (padded) batches:
        classify: (scores [n, classes], embeddings [n, D], D = 0 without --embed);
        detect: (boxes [n, M, 4] as y_min, x_min, y_max, x_max fractions, scores [n, M],
        classes [n, M], valid [n]), M = max_boxes, the first `valid` of each row real."""
        if len(frames) == 0:
            return self._empty
        chunks = [frames[start : start + self.batch_size] for start in range(0, len(frames), self.batch_size)]
        parts = list(self._pool.map(self._call_model, chunks))
        return tuple(np.concatenate(column) for column in zip(*parts))

    def _call_model(self, chunk: np.ndarray) -> list:
        n = len(chunk)
        if n < self.batch_size:
            padded = self._zeros.copy()
            padded[:n] = chunk
            chunk = padded
        with self._lock:
            self._in_model.enter(time.perf_counter())
        try:
            return [t.numpy()[:n] for t in self._predict(chunk)]  # .numpy(): waits for the device
        finally:
            with self._lock:
                self._in_model.leave(time.perf_counter())

    def __call__(self, batch: dict) -> pa.Table:
        """Thread-safe: Ray Data runs up to CALLS_PER_ACTOR calls at once."""
        with self._lock:
            now = time.perf_counter()
            self._first = now if self._first is None else self._first
            self._in_call.enter(now)
        table = None
        try:
            table = self._call(batch)
        finally:
            with self._lock:
                now = time.perf_counter()
                self._in_call.leave(now)
                if table is not None:
                    inferred = int(_count_valid(table.column("score")))
                    self._counts["frames"] += inferred
                    self._counts["batches"] += 1 if inferred else 0  # (a batch of end rows alone ran no model)
                    clock = self._clock(now)
        if self._reports is not None:  # fire and forget: never waits on the driver
            self._reports.report.remote(self._key, clock)
        return table

    def _clock(self, now: float) -> dict:
        """Where this actor's time went since its first batch, as a partition of it:
        `model_s` with a model call running, `other_s` with a batch in hand but no model
        call running, `wait_s` with no batch in hand (waiting for frames)."""
        in_call, in_model = self._in_call.total(now), self._in_model.total(now)
        return dict(self._counts, model_s=in_model, other_s=max(0.0, in_call - in_model),
                    wait_s=max(0.0, now - self._first - in_call), device=self.device)

    def _call(self, batch: dict) -> pa.Table:
        kind = batch["kind"]
        # frames the decoder marked as near-identical to an earlier one are not inferred
        is_frame = (kind == KIND_FRAME) & (batch["reused_from"] < 0)
        n = len(kind)
        rows = np.flatnonzero(is_frame)
        outputs = self.outputs(batch["frame"][is_frame])
        if self.head == "detect":
            computed = self._detections(outputs, rows, n)
        else:
            computed = self._classes(outputs, rows, n, is_frame)
        columns = {  # everything else passes through from the decoder, minus the frames
            f.name: computed[f.name] if f.name in computed else pa.array(_plain(batch[f.name]), f.type)
            for f in self.schema
        }
        return pa.table(columns, schema=self.schema)

    def _classes(self, outputs, rows, n, is_frame) -> dict:
        scores, vectors = outputs
        ids, top_scores = topk_arrays(scores, self.topk)
        k = ids.shape[1] if len(ids) else min(self.topk, len(self.labels))

        label = np.full(n, None, dtype=object)
        score = np.full(n, np.nan, dtype=np.float32)
        if len(rows):
            label[rows] = self.labels[ids[:, 0]]
            score[rows] = top_scores[:, 0]
            # a frame the model scored NaN in every class has no label (it was class 0's,
            # "100% of frames", at a NaN score); its NaN scores stay in `score` and `topk`
            nan = np.isnan(top_scores[:, 0])
            if nan.any():
                label[rows[nan]] = None
                if not self._warned_nan:
                    self._warned_nan = True
                    log.warning("the model's scores are NaN for %d of %d frames in a batch (its output, "
                                "not the frames': an input it cannot take, or a numeric overflow, e.g. "
                                "float16): their label is null", int(nan.sum()), len(rows))
        computed = {
            "label": pa.array(label.tolist(), pa.string()),
            "score": pa.array(score, pa.float32(), mask=~is_frame),
            "topk": _topk_column(ids, top_scores, self.labels, is_frame, k),
        }
        if self.info.embedding_dim:
            computed["embedding"] = _vectors_column(vectors, rows, n, self.info.embedding_dim)
        return computed

    def _detections(self, outputs, rows, n) -> dict:
        """boxes per frame row; label/score: the best box's (null: nothing detected);
        topk: each detected class's best score, best first. Built as Arrow arrays from the
        graph's outputs (no Python loop per box: this runs at the device's frame rate)."""
        boxes, scores, classes, valid = outputs
        valid = np.asarray(valid, np.int64)
        keep = np.arange(boxes.shape[1])[None, :] < valid[:, None]  # the first valid[j] of row j
        frame = np.repeat(np.arange(len(valid)), valid)  # inferred row of each kept box
        coords = boxes[keep].astype(np.float32).reshape(-1, 4)  # y_min, x_min, y_max, x_max
        score = scores[keep].astype(np.float32)
        cls = classes[keep].astype(np.int32)
        label = pa.array(self.labels[cls].tolist() if len(cls) else [], pa.string())
        flat = pa.StructArray.from_arrays(
            [label, pa.array(cls), pa.array(score), pa.array(coords[:, 1]), pa.array(coords[:, 0]),
             pa.array(coords[:, 3]), pa.array(coords[:, 2])], fields=list(BOX_TYPE))
        inferred = np.zeros(n, bool)
        inferred[rows] = True

        def per_row(values: pa.Array, counts: np.ndarray, type_: pa.DataType) -> pa.Array:
            per = np.zeros(n, np.int64)
            per[rows] = counts
            offsets = pa.array(np.concatenate([[0], np.cumsum(per)]), pa.int32())
            return pa.ListArray.from_arrays(offsets, values, type=type_, mask=pa.array(~inferred))

        # topk: a class's first box in a frame is its best (NMS sorts by score)
        first = np.zeros(len(cls), bool)
        first[np.unique(frame * (int(cls.max(initial=0)) + 1) + cls, return_index=True)[1]] = True
        first_frame = frame[first]
        rank = np.arange(len(first_frame)) - np.searchsorted(first_frame, first_frame)
        top = np.flatnonzero(first)[rank < self.topk]
        top_values = pa.StructArray.from_arrays(
            [pa.array(cls[top]), label.take(pa.array(top, pa.int64())), pa.array(score[top])],
            fields=list(TOPK_TYPE.value_type))
        best = np.full(n, -1, np.int64)  # the flat index of each detecting row's best box
        starts = np.concatenate([[0], np.cumsum(valid)[:-1]]).astype(np.int64)
        best[rows] = np.where(valid > 0, starts, -1)
        hit = best >= 0
        take = pa.array(np.where(hit, best, 0), pa.int64())
        return {
            "label": pc.if_else(pa.array(hit), label.take(take) if len(label) else pa.nulls(n, pa.string()),
                                pa.scalar(None, pa.string())),
            "score": pc.if_else(pa.array(hit), pa.array(score).take(take) if len(score) else pa.nulls(n, pa.float32()),
                                pa.scalar(None, pa.float32())),
            "topk": per_row(top_values, np.bincount(frame[top], minlength=len(valid)), TOPK_TYPE),
            "boxes": per_row(flat, valid, boxes_field().type),
        }


def _tell_failed(reports, error: RayvidError) -> None:
    """Tell the `Reports` actor why this actor cannot run, and wait until it knows: the
    actor dies right after, and the driver asks `Reports` why."""
    if reports is not None:
        import ray

        ray.get(reports.failed.remote(type(error).__name__, str(error)))
        # The driver says why, in one line. The dying actor's own report (its traceback,
        # then Ray's C++ stack trace as it exits: 150-200 lines the driver printed before
        # that line) would say nothing more: this process writes nothing else.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(devnull, fd)


def _reason(e: BaseException) -> str:
    """An exception as one line for a message, without secrets. TensorFlow's runtime errors
    open with "Graph execution error:" and a trace of the graph, then say what went wrong,
    then name the node: their last line but that one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("[[")]
    if not lines:
        return type(e).__name__
    text = lines[-1] if lines[0].endswith("execution error:") and len(lines) > 1 else lines[0]
    if lines[0] == "in user code:":  # a tf.function's trace: the cause follows the user code's frames
        said = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in lines[1:]]
        said = [line for line in said if not line.startswith(("File ", "return ", "outputs = ", "raise ", "•"))
                and not line.startswith("Arguments received by")]
        at = next((k for k, line in enumerate(said) if re.match(r"\w+(Error|Exception): ", line)), None)
        if at is not None:
            name, first = said[at].split(": ", 1)
            rest = said[at + 1:at + 2] if first.startswith("Exception encountered when calling") else [first]
            return f"{name}: {redact(' '.join(rest) or first)}"
    return f"{type(e).__name__}: {redact(text)}"


AUTOGRAPH_PREFIX = "__autograph_generated_file"  # TensorFlow's (tensorflow/python/autograph/pyct/loader.py)


def drop_autograph_sources() -> int:
    """Delete the temporary .py files TensorFlow's autograph wrote for the functions this
    process has converted (it deletes them at exit; Ray ends an actor by killing it, so each
    inference actor left two in the node's temporary folder, for good). Once a function is
    traced, its file is not read again (a traceback's line text at most). Returns how many."""
    import sys

    dropped = 0
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) if name.startswith(AUTOGRAPH_PREFIX) else None
        if path and os.path.basename(path).startswith(AUTOGRAPH_PREFIX):
            with contextlib.suppress(OSError):
                os.remove(path)
                dropped += 1
    return dropped


class _Busy:
    """Wall time during which at least one of several threads is inside something."""

    def __init__(self):
        self.inside, self.since, self.done = 0, 0.0, 0.0

    def enter(self, now: float) -> None:
        if self.inside == 0:
            self.since = now
        self.inside += 1

    def leave(self, now: float) -> None:
        self.inside -= 1
        if self.inside == 0:
            self.done += now - self.since

    def total(self, now: float) -> float:
        return self.done + (now - self.since if self.inside else 0.0)


class Reports:
    """What the inference actors tell the driver (run by the driver as a Ray actor): the
    model they loaded, or the error that stopped one loading it, and where their time goes,
    summed over actors: `model_s` with a model call running (device compute, waited for),
    `other_s` with a batch in hand and no model call running (top-k, Arrow), `wait_s` with
    no batch in hand, waiting for frames. An
    actor busy in the model most of the time is the bottleneck; one that mostly waits
    needs more decode CPUs (README, "Performance")."""

    def __init__(self):
        self.actors: dict[str, dict] = {}
        self.info = None  # models.ModelInfo, from the first actor that loaded the model
        self.error = None  # (exception class name, message) of a model that cannot load

    def loaded(self, info) -> None:
        self.info = self.info or info

    def failed(self, kind: str, message: str) -> None:
        self.error = self.error or (kind, message)

    def outcome(self) -> tuple:
        """(ModelInfo or None, (error class name, message) or None)."""
        return self.info, self.error

    def report(self, key: str, clock: dict) -> None:
        self.actors[key] = clock

    def summary(self) -> dict:
        total = {"model_s": 0.0, "other_s": 0.0, "wait_s": 0.0, "frames": 0, "batches": 0}
        for clock in self.actors.values():
            for k in total:
                total[k] += clock[k]
        span = total["model_s"] + total["other_s"] + total["wait_s"]
        total["actors"] = len(self.actors)
        total["devices"] = sorted({c.get("device", "") for c in self.actors.values()} - {""})  # where the model ran
        total["model_busy"] = round(total["model_s"] / span, 3) if span else 0.0
        total["waiting"] = round(total["wait_s"] / span, 3) if span else 0.0
        for k in ("model_s", "other_s", "wait_s"):
            total[k] = round(total[k], 3)
        return total


def _gpus_held() -> list:
    """The GPUs Ray assigned this process (none outside a Ray worker)."""
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - information only
        return []


def _count_valid(column) -> int:
    return len(column) - column.null_count


def _plain(values: np.ndarray):
    return values.tolist() if values.dtype == object else values


def _vectors_column(vectors: np.ndarray, rows: np.ndarray, n: int, dim: int) -> pa.Array:
    """fixed_size_list<float32>[dim]: the vectors at `rows` of n rows, null elsewhere."""
    full = np.zeros((n, dim), np.float32)
    full[rows] = vectors
    valid = np.zeros(n, bool)
    valid[rows] = True
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1), pa.float32()), dim,
                                             mask=pa.array(~valid))


def _topk_column(ids, scores, labels, is_frame, k) -> pa.Array:
    """list<struct<class_id, label, score>> for frame rows, null for the others."""
    values = pa.StructArray.from_arrays(
        [
            pa.array(ids.reshape(-1), pa.int32()),
            pa.array(labels[ids.reshape(-1)].tolist() if ids.size else [], pa.string()),
            pa.array(scores.reshape(-1), pa.float32()),
        ],
        fields=list(TOPK_TYPE.value_type),
    )
    lengths = np.where(is_frame, k, 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), values, type=TOPK_TYPE, mask=pa.array(~is_frame)
    )
