"""Inference stage: uint8 frames in, top-k predictions out, one tf.keras model per actor.

Input columns:  the decode stage's (`video_uri, kind, frame_index, timestamp_s, frame,
  n_frames, error_stage, error_type, message`).
Output: an Arrow table in `schema.INFERRED_SCHEMA`: the same rows and columns without
  `frame`, plus `label`, `score` and `topk` for frame rows (null on the terminal `end` rows,
  which pass through untouched).

The cast to float and the model's preprocessing run inside one `tf.function` with a fixed
input signature `[batch_size, H, W, 3] uint8`; the last, short batch is padded, so the
graph is traced once per actor (at construction, as warm-up) and never again.
"""

from __future__ import annotations

import os
import numpy as np
import pyarrow as pa

from rayvid.config import ModelConfig
from rayvid.schema import INFERRED_SCHEMA, KIND_FRAME, TOPK_TYPE


def resources(gpus_per_actor: float, cpus_per_actor: float) -> dict:
    """Ray resources of one inference actor, declared next to the stage."""
    if gpus_per_actor > 0:
        return {"num_gpus": gpus_per_actor, "num_cpus": cpus_per_actor}
    return {"num_cpus": cpus_per_actor}


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
        threads: int = 1,
    ):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf  # heavy import: only inside the stage
        import keras

        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:  # before TF touches the GPU, or it takes all of its memory
            tf.config.experimental.set_memory_growth(gpu, True)
        if not gpus:
            try:  # an actor owns its process; in-process use (tests) may find TF started
                tf.config.threading.set_intra_op_parallelism_threads(max(1, int(threads)))
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

        @tf.function(
            input_signature=[tf.TensorSpec([self.batch_size, h, w, 3], tf.uint8)],
            jit_compile=bool(model.xla),
            reduce_retracing=False,
        )
        def predict(frames):
            x = pre(tf.cast(frames, tf.float32))
            return tf.cast(keras_model(x, training=False), tf.float32)

        self._predict = predict
        self._zeros = np.zeros((self.batch_size, h, w, 3), dtype=np.uint8)
        self._predict(self._zeros)  # trace + warm up now, not on the first real batch

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
            out.append(self._predict(chunk).numpy()[:n])
        if not out:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(out)

    def __call__(self, batch: dict) -> pa.Table:
        kind = batch["kind"]
        is_frame = kind == KIND_FRAME
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

