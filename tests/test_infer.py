"""The inference stage: parity with model.predict, one trace, preprocessing in the graph."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from rayvid.config import ModelConfig
from rayvid.infer import Predictor, preprocess_graph, topk_arrays
from rayvid.schema import INFERRED_SCHEMA, KIND_END, KIND_FRAME


@pytest.fixture(scope="module")
def predictor(shapes_model):
    return Predictor(ModelConfig(name=shapes_model["path"], topk=3), batch_size=8)


def _frames(n, seed=0):
    from rayvid import samples

    rng = np.random.default_rng(seed)
    import tensorflow as tf

    imgs = [samples.render(samples.CLASSES[i % 6], rng) for i in range(n)]
    return np.clip(np.round(tf.image.resize(np.stack(imgs), (64, 64), method="bicubic").numpy()), 0, 255).astype(np.uint8)


def test_parity_with_model_predict_and_a_single_trace(predictor, shapes_model):
    import keras

    frames = _frames(21)  # not a multiple of the batch size: the last batch is padded
    got = predictor.scores(frames)
    want = keras.saving.load_model(shapes_model["path"]).predict(frames.astype("float32"), verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got.argmax(1) == want.argmax(1)).all()
    predictor.scores(frames[:3])
    assert predictor._predict.experimental_get_tracing_count() == 1


def test_call_emits_typed_rows_and_passes_end_rows_through(predictor):
    frames = _frames(3)
    batch = {
        "video_uri": np.array(["v", "v", "w", "v"], dtype=object),
        "segment": np.zeros(4, np.int32),
        "n_segments": np.ones(4, np.int32),
        "kind": np.array([KIND_FRAME, KIND_FRAME, KIND_END, KIND_FRAME], dtype=object),
        "frame_index": np.array([0, 1, -1, 2]),
        "timestamp_s": np.array([0.0, 0.1, np.nan, 0.2]),
        "frame": np.concatenate([frames[:2], np.zeros((1, 64, 64, 3), np.uint8), frames[2:]]),
        "n_frames": np.array([0, 0, 0, 0]),
        "error_stage": np.array(["", "", "decode", ""], dtype=object),
        "error_type": np.array(["", "", "VideoError", ""], dtype=object),
        "message": np.array(["", "", "boom", ""], dtype=object),
        "decoder": np.array(["", "", "pyav", ""], dtype=object),
        "codec": np.array(["", "", "av1", ""], dtype=object),
        "width": np.array([0, 0, 160, 0]),
        "height": np.array([0, 0, 120, 0]),
        "fps": np.array([0, 0, 25.0, 0]),
        "duration_s": np.array([0, 0, 2.0, 0]),
        "reused_from": np.array([-1, -1, -1, -1]),
        "bytes_read": np.array([0, 0, 4096, 0]),
    }
    t = predictor(batch)
    assert t.schema.equals(INFERRED_SCHEMA)
    rows = t.to_pylist()
    assert rows[2]["label"] is None and rows[2]["topk"] is None and rows[2]["message"] == "boom"
    assert (rows[2]["decoder"], rows[2]["codec"], rows[2]["width"], rows[2]["fps"]) == ("pyav", "av1", 160, 25.0)
    assert rows[2]["bytes_read"] == 4096
    truth = [samples_class(i) for i in range(3)]
    assert [rows[i]["label"] for i in (0, 1, 3)] == truth
    for r in (rows[0], rows[1], rows[3]):
        assert len(r["topk"]) == 3 and r["topk"][0]["label"] == r["label"]
        assert r["topk"][0]["score"] == pytest.approx(r["score"])

    # --skip-similar: a row that reuses frame 0 is not inferred; the committer fills it in
    batch["reused_from"] = np.array([-1, 0, -1, -1])
    rows = predictor(batch).to_pylist()
    assert rows[1]["label"] is None and rows[1]["topk"] is None and rows[1]["reused_from"] == 0
    assert [rows[i]["label"] for i in (0, 3)] == [truth[0], truth[2]]


def _frame_batch(frames: np.ndarray) -> dict:
    n = len(frames)
    text = lambda value: np.array([value] * n, dtype=object)  # noqa: E731
    return {"video_uri": text("v"), "segment": np.zeros(n, np.int32), "n_segments": np.ones(n, np.int32),
            "kind": text(KIND_FRAME), "frame_index": np.arange(n), "timestamp_s": np.arange(n) / 10,
            "frame": frames, "n_frames": np.zeros(n, np.int64), "error_stage": text(""),
            "error_type": text(""), "message": text(""), "decoder": text(""), "codec": text(""),
            "width": np.zeros(n, np.int64), "height": np.zeros(n, np.int64), "fps": np.zeros(n),
            "duration_s": np.zeros(n), "reused_from": np.full(n, -1), "bytes_read": np.zeros(n, np.int64)}


def test_concurrent_calls_give_the_same_rows_and_account_for_all_of_the_time(shapes_model):
    """Ray Data runs CALLS_PER_ACTOR calls of an inference actor at once (pipeline.py)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from rayvid.infer import CALLS_PER_ACTOR

    predictor = Predictor(ModelConfig(name=shapes_model["path"], topk=3), batch_size=8, threads=2)
    batches = [_frame_batch(_frames(13 + k, seed=k)) for k in range(6)]  # padded last chunks
    want = [predictor(b) for b in batches]
    with ThreadPoolExecutor(CALLS_PER_ACTOR) as pool:
        got = list(pool.map(predictor, batches))
    assert all(g.equals(w) for g, w in zip(got, want))
    now = time.perf_counter()
    clock = predictor._clock(now)
    assert clock["batches"] == 12 and clock["frames"] == 2 * sum(13 + k for k in range(6))
    # a batch holding only a video's end row runs no model: not a batch ("35 frames in 37 batches")
    end_only = {**_frame_batch(_frames(1)), "kind": np.array([KIND_END], dtype=object)}
    predictor(end_only)
    assert predictor._clock(time.perf_counter())["batches"] == 12
    # a partition of the actor's time since its first batch: with a model call running,
    # with a batch in hand and no model call running, with no batch in hand
    assert clock["model_s"] > 0 and clock["other_s"] > 0 and clock["wait_s"] >= 0
    spent = clock["model_s"] + clock["other_s"] + clock["wait_s"]
    assert spent == pytest.approx(now - predictor._first, abs=1e-6)
    assert predictor._in_call.inside == 0 and predictor._in_model.inside == 0


def samples_class(i):
    from rayvid import samples

    return samples.CLASSES[i % 6]


def test_topk_order_and_ties():
    scores = np.array([[0.1, 0.5, 0.5, 0.2]], np.float32)
    ids, s = topk_arrays(scores, 3)
    assert ids.tolist() == [[1, 2, 3]]
    np.testing.assert_allclose(s, [[0.5, 0.5, 0.2]])
    ids, s = topk_arrays(scores, 100)  # more than the model's classes: all of them
    assert ids.tolist() == [[1, 2, 3, 0]]


@pytest.mark.parametrize(
    "mode, module",
    [("caffe", "resnet50"), ("tf", "mobilenet_v2"), ("torch", "densenet")],
)
def test_preprocessing_matches_keras_applications(mode, module):
    import importlib

    import tensorflow as tf

    x = np.random.default_rng(3).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ref = importlib.import_module(f"keras.applications.{module}").preprocess_input(x.copy())
    got = preprocess_graph(tf, mode)(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_on_a_gpu_xla_agrees_with_cpu_float32(shapes_model):
    """Skipped without a physical GPU: the same frames scored on the GPU with XLA and on
    the CPU agree on top-1 for every frame."""
    import tensorflow as tf

    assert tf.config.list_physical_devices("GPU")
    frames = _frames(48)
    gpu = Predictor(ModelConfig(name=shapes_model["path"], xla=True), batch_size=16).scores(frames)
    with tf.device("/CPU:0"):
        cpu = Predictor(ModelConfig(name=shapes_model["path"]), batch_size=16).scores(frames)
    assert (gpu.argmax(1) == cpu.argmax(1)).all()
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)


def test_decode_grid_boxes_and_nms_in_the_graph():
    """Two cells fire for the same object (one suppressed by NMS), one cell for another
    class; the boxes come out where the grid says, as fractions of the frame."""
    import tensorflow as tf

    from rayvid.infer import decode_grid

    s, c = 4, 2
    raw = np.full((1, s, s, 5 + c), -10.0, np.float32)  # objectness ~0 everywhere

    def cell(i, j, cls, obj, cx_in, cy_in, w, h):
        logit = lambda p: np.log(p / (1 - p))  # noqa: E731
        raw[0, i, j, :5] = [logit(obj), logit(cx_in), logit(cy_in), logit(w), logit(h)]
        raw[0, i, j, 5:] = -10.0
        raw[0, i, j, 5 + cls] = 10.0

    cell(1, 1, 0, 0.95, 0.5, 0.5, 0.5, 0.5)  # centre (0.375, 0.375)
    cell(1, 2, 0, 0.80, 0.1, 0.5, 0.5, 0.5)  # centre (0.525, 0.375): IoU 0.54, lower score
    cell(3, 0, 1, 0.90, 0.5, 0.5, 0.2, 0.1)  # centre (0.125, 0.875)
    boxes, scores, classes, valid = (t.numpy() for t in decode_grid(tf, tf.constant(raw), 5, 0.5, 0.3))
    assert valid.tolist() == [2]
    np.testing.assert_allclose(scores[0, :2], [0.95, 0.90], atol=1e-3)
    assert classes[0, :2].tolist() == [0, 1]
    np.testing.assert_allclose(boxes[0, 0], [0.125, 0.125, 0.625, 0.625], atol=1e-4)  # y0, x0, y1, x1
    np.testing.assert_allclose(boxes[0, 1], [0.825, 0.025, 0.925, 0.225], atol=1e-4)


def test_embeddings_are_the_classifier_input(shapes_model):
    """--embed: the shapes model's pooled features (the Dense classifier's input), exactly
    what a Keras sub-model computes; L2-normalised on request."""
    import keras

    frames = _frames(5)
    p = Predictor(ModelConfig(name=shapes_model["path"], embed="auto", embed_normalize=True), batch_size=4)
    scores, vectors = p.outputs(frames)
    model = keras.saving.load_model(shapes_model["path"])
    features = keras.Model(model.inputs, model.get_layer("classes").input).predict(frames.astype("float32"), verbose=0)
    np.testing.assert_allclose(vectors, features / np.linalg.norm(features, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(scores, model.predict(frames.astype("float32"), verbose=0), atol=1e-6)
    table = p({"kind": np.array([KIND_FRAME] * 5 + [KIND_END], object), "frame": np.concatenate([frames, frames[:1]]),
               "reused_from": np.array([-1] * 6), **_passthrough(6)})
    assert table.schema.field("embedding").type.list_size == 64
    assert table.column("embedding").null_count == 1


def test_frames_the_model_scores_nan_have_no_label(tmp_path, caplog):
    """A model whose output is NaN for some frames (here: sqrt of a negative for dark ones)
    stored them as class 0 at a NaN score (the summary: "class_0 100% of frames"): their
    label is null, the NaN scores kept, and the actor warns once."""
    import tensorflow as tf

    class Dark(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
        def serve(self, x):
            v = tf.sqrt(tf.reduce_mean(x, axis=[1, 2, 3]) - 100.0)
            return {"probs": tf.stack([v, -v], axis=1)}

    m = Dark()
    tf.saved_model.save(m, str(tmp_path / "dark"), signatures={"serving_default": m.serve})
    frames = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 200, 10, 255)])
    p = Predictor(ModelConfig(name=str(tmp_path / "dark")), batch_size=4)
    table = p({"kind": np.array([KIND_FRAME] * 4, object), "frame": frames, "reused_from": np.array([-1] * 4),
               **_passthrough(4)})
    assert table.column("label").to_pylist() == [None, "class_0", None, "class_0"]
    score = table.column("score").to_numpy(zero_copy_only=False)
    assert np.isnan(score[[0, 2]]).all() and np.allclose(score[[1, 3]], [10.0, np.sqrt(155.0)])
    assert [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()] == [
        "the model's scores are NaN for 2 of 4 frames in a batch (its output, not the frames': an input it "
        "cannot take, or a numeric overflow, e.g. float16): their label is null"]


def _passthrough(n: int) -> dict:
    """The decoder's other columns, for n rows."""
    return {
        "video_uri": np.array(["v"] * n, dtype=object), "segment": np.zeros(n, np.int32),
        "n_segments": np.ones(n, np.int32), "frame_index": np.arange(n), "timestamp_s": np.arange(n) / 10,
        "n_frames": np.zeros(n, np.int64), "error_stage": np.array([""] * n, object),
        "error_type": np.array([""] * n, object), "message": np.array([""] * n, object),
        "decoder": np.array([""] * n, object), "codec": np.array([""] * n, object),
        "width": np.zeros(n, np.int64), "height": np.zeros(n, np.int64), "fps": np.zeros(n),
        "duration_s": np.zeros(n), "bytes_read": np.zeros(n, np.int64),
    }


def test_detect_with_xla_compiles_the_network_and_keeps_the_nms_outside(detector):
    """XLA has no kernel for CombinedNonMaxSuppression: `--xla --head detect` compiles the
    network alone and gives the same boxes."""
    frames = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    cfg = dict(name=detector["model"], head="detect", min_box_score=0.0)
    plain = Predictor(ModelConfig(**cfg), batch_size=4).outputs(frames)
    xla = Predictor(ModelConfig(**cfg, xla=True), batch_size=4).outputs(frames)
    assert xla[0].shape == (5, 20, 4)
    for a, b in zip(plain, xla):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_xla_on_a_model_it_cannot_compile_runs_without_it_and_says_so(tmp_path, caplog):
    """XLA has no kernel for some ops (ResizeArea: a Resizing layer with "area"): `--xla`
    warns naming them and runs the model without XLA (the warm-up failed: ModelError),
    with the same scores; a model it can compile stays compiled."""
    import keras

    inp = keras.Input((64, 64, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Resizing(32, 32, interpolation="area")(inp))
    path = str(tmp_path / "area.keras")
    keras.Model(inp, keras.layers.Dense(6, activation="softmax")(x)).save(path)
    frames = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    plain = Predictor(ModelConfig(name=path), batch_size=4)
    with caplog.at_level(logging.WARNING, logger="rayvid.infer"):
        asked = Predictor(ModelConfig(name=path, xla=True), batch_size=4)
    assert plain.xla is False and asked.xla is False
    said = [r.getMessage() for r in caplog.records if "--xla" in r.getMessage()]
    assert said == ["--xla: XLA cannot compile this model (no XLA kernel on the CPU for ResizeArea): it runs "
                    "without XLA"], said
    np.testing.assert_allclose(asked.scores(frames), plain.scores(frames), atol=1e-6)
    inp = keras.Input((64, 64, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Resizing(32, 32, interpolation="bilinear")(inp))
    keras.Model(inp, keras.layers.Dense(6, activation="softmax")(x)).save(path)
    assert Predictor(ModelConfig(name=path, xla=True), batch_size=4).xla is True


def _detection_rows(outputs, rows, n, labels, topk):
    """The rows `Predictor._detections` must build, written the obvious way (a loop per box)."""
    boxes, scores, classes, valid = outputs
    label, score, top, lists = [None] * n, [None] * n, [None] * n, [None] * n
    for j, row in enumerate(rows):
        found = [{"label": labels[int(classes[j, b])], "class_id": int(classes[j, b]), "score": float(scores[j, b]),
                  "x_min": float(boxes[j, b, 1]), "y_min": float(boxes[j, b, 0]),
                  "x_max": float(boxes[j, b, 3]), "y_max": float(boxes[j, b, 2])} for b in range(int(valid[j]))]
        lists[row] = found
        best: dict = {}
        for f in found:
            best.setdefault(f["class_id"], f)
        top[row] = [{"class_id": f["class_id"], "label": f["label"], "score": f["score"]}
                    for f in list(best.values())[:topk]]
        if found:
            label[row], score[row] = found[0]["label"], found[0]["score"]
    return label, score, top, lists


def test_detection_rows_are_built_without_a_loop_and_say_the_same(detector):
    """Inferred rows 0, 2, 3, 5 of 7 (1, 4, 6: end rows or reused frames), with no boxes,
    repeated classes and more classes than --topk."""
    p = Predictor(ModelConfig(name=detector["model"], head="detect", topk=2), batch_size=4)
    rng = np.random.default_rng(3)
    m = 6
    boxes = np.sort(rng.uniform(0, 1, (4, m, 4)), axis=-1).astype(np.float32)
    scores = -np.sort(-rng.uniform(0, 1, (4, m)), axis=1).astype(np.float32)
    classes = rng.integers(0, len(p.labels), (4, m)).astype(np.int32)
    classes[1, :3] = classes[1, 0]
    valid = np.array([3, 6, 0, 5], np.int32)
    rows = np.array([0, 2, 3, 5])
    got = p._detections((boxes, scores, classes, valid), rows, 7)
    label, score, top, lists = _detection_rows((boxes, scores, classes, valid), rows, 7, list(p.labels), 2)
    assert got["label"].to_pylist() == label
    np.testing.assert_array_equal(np.array(got["score"].to_pylist(), dtype=float),
                                  np.array([np.nan if s is None else np.float32(s) for s in score]))
    assert got["topk"].to_pylist() == [None if t is None else [dict(x, score=pytest.approx(x["score"])) for x in t]
                                       for t in top]
    assert got["boxes"].to_pylist() == [None if b is None else [{k: pytest.approx(v) if isinstance(v, float) else v
                                                                 for k, v in x.items()} for x in b] for b in lists]
    assert got["topk"][3].as_py() == [] and got["label"][3].as_py() is None  # a frame with no boxes
    empty = p._detections((boxes[:1], scores[:1], classes[:1], np.array([0], np.int32)), np.array([0]), 2)
    assert empty["boxes"].to_pylist() == [[], None] and empty["label"].to_pylist() == [None, None]


def test_mixed_precision_runs_a_savedmodel_as_saved(shapes_model, tmp_path):
    """--mixed-precision with a SavedModel: its signature takes float32, so it runs in
    float32 (the same scores), and the process-wide policy is left as it was."""
    import keras

    src = keras.saving.load_model(shapes_model["path"])
    src.export(str(tmp_path / "sm"))
    frames = _frames(5)
    p = Predictor(ModelConfig(name=str(tmp_path / "sm"), mixed_precision=True), batch_size=4)
    np.testing.assert_allclose(p.scores(frames), src.predict(frames.astype("float32"), verbose=0), rtol=1e-5, atol=1e-6)
    assert keras.mixed_precision.global_policy().name == "float32"


def test_mixed_precision_on_a_cpu_runs_in_float32_and_says_so(caplog):
    """--mixed-precision where the model runs on the CPU (no GPU, or --gpus-per-actor 0): float16
    compute there is about half as fast (ResNet-50 on one thread: 132 ms a frame against 64);
    the model is built in float32, with a warning."""
    p = None
    with caplog.at_level("WARNING", logger="rayvid"):
        p = Predictor(ModelConfig(name="mobilenet_v3_small", weights="none", input_size=(32, 32),
                                  mixed_precision=True), batch_size=2)
    assert p.device == "CPU"
    assert {layer.dtype_policy.name for layer in p.model.layers} == {"float32"}
    assert "--mixed-precision is for GPUs: the model runs on the CPU here, in float32" in caplog.text


def test_a_model_that_fails_while_traced_says_why(tmp_path):
    """A model whose graph cannot be traced on the frames (one of any size that reshapes
    them to a fixed length, at another --input-size) said only "ValueError: in user code:",
    the first line of TensorFlow's trace: the reason is Keras' own, further down."""
    import keras

    from rayvid.errors import ModelError

    inp = keras.Input((None, None, 3))
    keras.Model(inp, keras.layers.Dense(3)(keras.layers.Reshape((32 * 32 * 3,))(inp))).save(str(tmp_path / "r.keras"))
    with pytest.raises(ModelError, match=r"cannot run model .*r.keras: ValueError: The total size of the tensor must be "
                                         r"unchanged. Received: input_shape=\(16, 16, 3\), target_shape=\(3072,\)$"):
        Predictor(ModelConfig(name=str(tmp_path / "r.keras"), input_size=(16, 16)), batch_size=2, threads=1)


def test_an_inference_actor_that_cannot_start_says_why(ray_session, tmp_path, shapes_model):
    """Whatever stops an inference actor's constructor (here a model that rejects its
    warm-up batch: it loads, so the driver's probe passes) reaches the driver as a
    ModelError with the reason, through the Reports actor, not as Ray's report of a dead
    actor."""
    import json

    from helpers import refusing_model
    from rayvid import pipeline, samples
    from rayvid.config import RunConfig
    from rayvid.errors import ModelError

    refusing_model(str(tmp_path / "dark"),  # refuses an all-black batch (the warm-up's)
                   lambda tf, x: tf.debugging.assert_greater(tf.reduce_max(x), 0.5, message="all black"))
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    samples.make_video(str(videos / "a.mp4"), 0.5, seed=1)
    cfg = RunConfig(input=str(videos), output=str(out), progress=False, run_id="dark",
                    model=ModelConfig(name=str(tmp_path / "dark")))
    reason = r"cannot run model .*dark: InvalidArgumentError: assertion failed: \[all black\]"
    with pytest.raises(ModelError, match=reason):
        pipeline.run(cfg)
    record = json.loads((out / "runs" / "dark.json").read_text())
    assert record["status"] == "failed" and "all black" in record["error"]
    assert sorted(p.name for p in out.iterdir()) == ["runs"]  # nothing committed
    # the command says it in one line: the dying actor's traceback and Ray's C++ stack trace
    # (forwarded from its process), and Ray Data's "internal code" traceback, were ~170 lines before it
    import os
    import subprocess
    import sys

    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    done = subprocess.run([sys.executable, "-m", "rayvid", "run", str(videos), str(tmp_path / "out2"), "--model",
                           str(tmp_path / "dark"), "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(r"rayvid: error: " + reason, done.stderr.splitlines()[-1]), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Stack trace" not in done.stderr, done.stderr[-3000:]
    # nor on stdout: Ray's driver printed the actor's failed `get_location`, which it retries,
    # with both tracebacks (about 100 lines)
    # (a one-line "actor is temporarily unavailable" retry notice may remain: a race as the
    # dying actor's process exits)
    assert "Traceback" not in done.stdout and "rayvid.errors" not in done.stdout, done.stdout[-3000:]
    # a batch whose input alone would fill the node: on a CPU the OOM killer ended the actor,
    # Ray restarted it, again and again (a 224x224 model at --batch-size 65536: no end in
    # 5 minutes); said before the warm-up allocates it
    from rayvid.config import InferConfig
    from rayvid.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--batch-size 10000000: a batch of 64x64x3 inputs is 491.5 GB as float32 "
                                          r"before the model's own activations, and this node has .* GB free: use "
                                          r"--batch-size \d+ or less"):
        pipeline.run(RunConfig(input=str(videos), output=str(tmp_path / "out3"), progress=False,
                               model=ModelConfig(name=shapes_model["path"]),
                               infer=InferConfig(batch_size=10_000_000)))


def test_a_batch_too_large_for_the_node_is_refused_on_a_gpu_too():
    """On a GPU the batch's frames stay in the node's memory as uint8 (the GPU's own memory
    is sized by halving the warm-up batch): a batch whose frames alone take over a quarter
    of the node's free memory is refused there as on a CPU, where float32 inputs count."""
    from rayvid.errors import ConfigError
    from rayvid.infer import _check_batch_fits, _free_bytes

    frame = [224, 224, 3]
    _check_batch_fits(128, frame, on_gpu=True)  # the GPU default
    _check_batch_fits(32, frame)
    free = _free_bytes()
    eighth = max(int(free / 8), int(300e6)) // (224 * 224 * 3)  # frames filling an eighth of it as uint8
    if eighth * 224 * 224 * 3 * 4 <= free / 4:  # (a node with under 2.4 GB free: cannot tell the two apart)
        pytest.skip("too little free memory here")
    _check_batch_fits(eighth, frame, on_gpu=True)  # uint8 on the host: fits
    with pytest.raises(ConfigError, match=rf"^--batch-size {eighth}: a batch of 224x224x3 inputs is .* as float32"):
        _check_batch_fits(eighth, frame)  # as float32, 4x: over a quarter
    with pytest.raises(ConfigError, match=r"^--batch-size 10000000: a batch of 224x224x3 frames is 1505.3 GB in "
                                          r"this node's memory \(uint8\) before it reaches the GPU, and this node has "
                                          r".* free: use --batch-size \d+ or less$"):
        _check_batch_fits(10_000_000, frame, on_gpu=True)


def test_an_out_of_memory_under_another_name_is_one():
    """The warm-up halves a batch that does not fit the device: TensorFlow says so with
    ResourceExhaustedError, but XLA's compiled code and autotuning with InternalError or
    UnknownError saying RESOURCE_EXHAUSTED; any other error is not one (it is raised)."""
    import tensorflow as tf

    from rayvid.infer import _out_of_memory

    said = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes."
    assert _out_of_memory(tf, tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))
    assert _out_of_memory(tf, tf.errors.InternalError(None, None, said))
    assert _out_of_memory(tf, tf.errors.UnknownError(None, None, "Failed to allocate request for 2.00GiB"))
    assert not _out_of_memory(tf, tf.errors.InternalError(None, None, "Graph execution error: ptxas exited"))
    assert not _out_of_memory(tf, tf.errors.UnknownError(None, None, "Failed to get convolution algorithm"))


def test_free_memory_counts_a_containers_limit_less_its_working_set(tmp_path):
    """What the batch-size check compares with: MemAvailable, or a cgroup's limit less its
    working set where lower (its page cache is not counted as used: a pod that had read
    videos sat at its limit and was refused the default batch of 32)."""
    from rayvid.infer import _free_bytes

    def tree(name, files):
        for path, text in files.items():
            (tmp_path / name / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / path).write_text(text)
        return str(tmp_path / name)

    meminfo = {"proc/meminfo": "MemTotal: 64000000 kB\nMemAvailable: 48000000 kB\n"}
    assert _free_bytes(tree("host", meminfo)) == 48000000 * 1024
    v2 = {**meminfo, "sys/fs/cgroup/memory.max": str(8 << 30), "sys/fs/cgroup/memory.current": str((8 << 30) - (40 << 20)),
          "sys/fs/cgroup/memory.stat": f"anon {1 << 30}\ninactive_file {6 << 30}\nactive_file 0\n"}
    assert _free_bytes(tree("v2", v2)) == (6 << 30) + (40 << 20)  # the cache is there to be taken
    v1 = {**meminfo, "sys/fs/cgroup/memory/memory.limit_in_bytes": str(4 << 30),
          "sys/fs/cgroup/memory/memory.usage_in_bytes": str(3 << 30),
          "sys/fs/cgroup/memory/memory.stat": f"cache 0\ntotal_inactive_file {1 << 30}\n"}
    assert _free_bytes(tree("v1", v1)) == 2 << 30
    unlimited = {**meminfo, "sys/fs/cgroup/memory.max": "max", "sys/fs/cgroup/memory.current": "1"}
    assert _free_bytes(tree("unlimited", unlimited)) == 48000000 * 1024
    assert _free_bytes(str(tmp_path / "nothing")) == 0  # (no /proc: no check)


def test_an_inference_actor_leaves_no_autograph_files_behind(shapes_model):
    """autograph writes each function it converts to a temporary .py file, deleted at exit;
    Ray kills an actor, so every inference actor left two in the node's temporary folder.
    Once its graph is traced, a Predictor deletes those of its process (autograph converts
    a function once a process: a later Predictor's are the first's); it still predicts."""
    import os
    import sys

    from rayvid import infer

    p = Predictor(ModelConfig(name=shapes_model["path"], topk=3), batch_size=4)
    files = [m.__file__ for n, m in list(sys.modules.items()) if n.startswith(infer.AUTOGRAPH_PREFIX)]
    assert files, "no function converted: nothing tested"
    assert not [f for f in files if os.path.exists(f)], files
    assert p.scores(_frames(5)).shape == (5, 6)
