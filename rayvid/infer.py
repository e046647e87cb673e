"""Inference stage: uint8 frames in, top-k predictions out, one tf.keras model per actor.

Input columns:  the decode stage's (`video_uri, kind, frame_index, timestamp_s, frame,
  n_frames, error_stage, error_type, message`).
Output: an Arrow table in `schema.INFERRED_SCHEMA`: the same rows and columns without
  `frame`, plus `label`, `score` and `topk` for frame rows (null on the terminal `end` rows,
  which pass through untouched, and on rows whose `reused_from` names an earlier frame:
  the committer fills those in).

The cast to float and the model's preprocessing run inside one `tf.function` with a fixed
input signature `[batch_size, H, W, 3] uint8`; the last, short batch is padded, so the
graph is traced once per actor (at construction, as warm-up) and never again.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa

from rayvid.config import ModelConfig
from rayvid.schema import INFERRED_SCHEMA, KIND_FRAME, TOPK_TYPE


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


class Predictor:
    """Callable class run by Ray Data as an actor; the model loads once per actor."""

    def __init__(
        self,
        model: ModelConfig,
        batch_size: int,
        threads: int = 0,
        timings=None,
    ):
        """`threads`: TF's intra-op threads on CPU; 0: as many as the node has, up to
        `MAX_CPU_THREADS` (the decode actors on the node share the cores; they only run
        ahead as far as Ray Data's backpressure lets them). `timings`: a handle of a Ray actor running `Timings`, told after every batch how
        long the model ran and how long this actor waited for frames."""
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf  # heavy import: only inside the stage
        import keras

        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:  # before TF touches the GPU, or it takes all of its memory
            tf.config.experimental.set_memory_growth(gpu, True)
        if not gpus:
            try:  # an actor owns its process; in-process use (tests) may find TF started
                tf.config.threading.set_intra_op_parallelism_threads(cpu_threads(threads))
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                pass
        if model.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")

        from rayvid import models

        self.model, self.info = models.load(model)
        self.batch_size = int(batch_size)
        self.topk = int(model.topk)
        self.labels = np.array(self.info.labels, dtype=object)
        h, w = self.info.input_size
        keras_model = self.model
        pre = preprocess_graph(tf, self.info.preprocess)

        def build(batch_size: int):
            @tf.function(
                input_signature=[tf.TensorSpec([batch_size, h, w, 3], tf.uint8)],
                jit_compile=bool(model.xla),
                reduce_retracing=False,
            )
            def predict(frames):
                x = pre(tf.cast(frames, tf.float32))
                return tf.cast(keras_model(x, training=False), tf.float32)

            return predict

        while True:  # trace + warm up now, not on the first real batch
            self._predict = build(self.batch_size)
            self._zeros = np.zeros((self.batch_size, h, w, 3), dtype=np.uint8)
            try:
                self._predict(self._zeros).numpy()
                break
            except tf.errors.ResourceExhaustedError:  # the batch does not fit the device
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
        self._timings = timings
        self._key = f"{os.uname().nodename}:{os.getpid()}"
        self._clock = {"model_s": 0.0, "other_s": 0.0, "wait_s": 0.0, "frames": 0, "batches": 0}
        self._returned_at = None  # waiting counts from the end of one batch to the next
        self._model_s = 0.0

    def scores(self, frames: np.ndarray) -> np.ndarray:
        """Model scores for any number of frames, in fixed-size (padded) batches."""
        out = []
        for start in range(0, len(frames), self.batch_size):
            chunk = frames[start : start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                padded = self._zeros.copy()
                padded[:n] = chunk
                chunk = padded
            t0 = time.perf_counter()
            out.append(self._predict(chunk).numpy()[:n])  # .numpy(): waits for the device
            self._model_s += time.perf_counter() - t0
        if not out:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(out)

    def __call__(self, batch: dict) -> pa.Table:
        entered = time.perf_counter()
        self._model_s = 0.0
        table = self._call(batch)
        clock = self._clock
        now = time.perf_counter()
        if self._returned_at is not None:
            clock["wait_s"] += entered - self._returned_at
        clock["model_s"] += self._model_s
        clock["other_s"] += now - entered - self._model_s
        clock["frames"] += int(_count_valid(table.column("score")))
        clock["batches"] += 1
        self._returned_at = now
        if self._timings is not None:  # fire and forget: never waits on the driver
            self._timings.report.remote(self._key, dict(clock))
        return table

    def _call(self, batch: dict) -> pa.Table:
        kind = batch["kind"]
        # frames the decoder marked as near-identical to an earlier one are not inferred
        is_frame = (kind == KIND_FRAME) & (batch["reused_from"] < 0)
        n = len(kind)
        scores = self.scores(batch["frame"][is_frame])
        ids, top_scores = topk_arrays(scores, self.topk)
        k = ids.shape[1] if len(ids) else min(self.topk, len(self.labels))

        rows = np.flatnonzero(is_frame)
        label = np.full(n, None, dtype=object)
        score = np.full(n, np.nan, dtype=np.float32)
        if len(rows):
            label[rows] = self.labels[ids[:, 0]]
            score[rows] = top_scores[:, 0]
        topk = _topk_column(ids, top_scores, self.labels, is_frame, k)

        computed = {
            "label": pa.array(label.tolist(), pa.string()),
            "score": pa.array(score, pa.float32(), mask=~is_frame),
            "topk": topk,
        }
        columns = {  # everything else passes through from the decoder, minus the frames
            f.name: computed[f.name] if f.name in computed else pa.array(_plain(batch[f.name]), f.type)
            for f in INFERRED_SCHEMA
        }
        return pa.table(columns, schema=INFERRED_SCHEMA)


class Timings:
    """Where the inference actors' time goes, summed over actors (run by the driver as a
    Ray actor): `model_s` in the model (device compute, waited for), `other_s` in the rest
    of the stage (top-k, Arrow), `wait_s` between batches, waiting for frames. An actor
    busy in the model most of the time is the bottleneck; one that mostly waits needs
    more decode CPUs (README, "Performance")."""

    def __init__(self):
        self.actors: dict[str, dict] = {}

    def report(self, key: str, clock: dict) -> None:
        self.actors[key] = clock

    def summary(self) -> dict:
        total = {"model_s": 0.0, "other_s": 0.0, "wait_s": 0.0, "frames": 0, "batches": 0}
        for clock in self.actors.values():
            for k in total:
                total[k] += clock[k]
        span = total["model_s"] + total["other_s"] + total["wait_s"]
        total["actors"] = len(self.actors)
        total["model_busy"] = round(total["model_s"] / span, 3) if span else 0.0
        total["waiting"] = round(total["wait_s"] / span, 3) if span else 0.0
        for k in ("model_s", "other_s", "wait_s"):
            total[k] = round(total[k], 3)
        return total


def _count_valid(column) -> int:
    return len(column) - column.null_count


def _plain(values: np.ndarray):
    return values.tolist() if values.dtype == object else values


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

