"""Model loading from real files: .keras local and on S3, SavedModel, keras.applications
with a weights file at a URL, labels, and the clear errors when a model cannot load."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rayvid import models, samples
from rayvid.config import ModelConfig
from rayvid.errors import ModelError


def test_imagenet_labels_are_shipped():
    labels = models.imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[999] == "toilet_tissue"


def test_keras_file_local_and_s3_with_sibling_labels(shapes_model, s3fs_client):
    model, info = models.load(ModelConfig(name=shapes_model["path"]))
    assert info.input_size == (64, 64) and info.num_classes == 6 and info.preprocess == "raw"
    assert info.labels[:3] == ("blank", "checker", "circle")

    s3fs_client.put_file(shapes_model["path"], "s3://rayvid-test/m1/shapes.keras")
    s3fs_client.put_file(shapes_model["labels"], "s3://rayvid-test/m1/shapes.labels.txt")
    s3_model, s3_info = models.load(ModelConfig(name="s3://rayvid-test/m1/shapes.keras"))
    assert s3_info.labels == info.labels and s3_info.name == "s3://rayvid-test/m1/shapes.keras"
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), s3_model.predict(x, verbose=0), rtol=1e-6)


def test_labels_must_match_the_model(shapes_model, tmp_path, caplog):
    bad = tmp_path / "labels.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ModelError, match="has 2 entries but the model outputs 6 classes"):
        models.load(ModelConfig(name=shapes_model["path"], labels=str(bad)))
    # an editor's byte-order mark was kept in the first label (which then matched no `find`);
    # a Latin-1 file failed as "cannot run model ...: UnicodeDecodeError", naming the model
    names = ["café", "b", "c", "d", "e", "f"]
    (tmp_path / "bom.txt").write_bytes("\n".join(names).encode("utf-8-sig"))
    assert models.load(ModelConfig(name=shapes_model["path"], labels=str(tmp_path / "bom.txt")))[1].labels == tuple(names)
    # a label named twice: both classes keep it, with a warning (their rows share the label)
    (tmp_path / "twice.txt").write_text("a\nb\na\nc\nd\ne\n")
    with caplog.at_level("WARNING", "rayvid.models"):
        assert models.load(ModelConfig(name=shapes_model["path"], labels=str(tmp_path / "twice.txt")))[1].labels[2] == "a"
    assert f"labels {tmp_path}/twice.txt name 1 label(s) more than once ('a'): those classes share a label" in caplog.text
    (tmp_path / "latin1.txt").write_bytes("\n".join(names).encode("latin-1"))
    with pytest.raises(ModelError, match=rf"^labels {tmp_path}/latin1.txt is not UTF-8 text \(byte 3: b'\\xe9'\): "
                                         r"save it as UTF-8$"):
        models.load(ModelConfig(name=shapes_model["path"], labels=str(tmp_path / "latin1.txt")))


def test_a_ray_worker_holding_no_gpu_keeps_tensorflow_off_the_nodes_gpus(ray_session):
    """Ray 2.60 no longer hides a node's GPUs from a worker that holds none (ray#54868): a CPU
    inference actor or the model's probe on a GPU node would run on GPU 0. In such a worker,
    before TensorFlow is imported, CUDA_VISIBLE_DEVICES is "" ; a worker holding a GPU (the
    session's logical one), the driver, or a process with TensorFlow loaded keep theirs."""
    import os

    def visible():
        import sys

        had_tf = "tensorflow" in sys.modules
        return models.hide_unassigned_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"), had_tf

    cpu = ray_session.remote(num_cpus=1, max_calls=1)(visible)
    gpu = ray_session.remote(num_cpus=0, num_gpus=1, max_calls=1)(visible)
    hidden, env, had_tf = ray_session.get(cpu.remote())
    assert (hidden, env, had_tf) == (True, "", False)
    hidden, env, _ = ray_session.get(gpu.remote())
    assert not hidden and env != ""  # (Ray's "0" for the logical GPU it assigned)
    assert models.hide_unassigned_gpus() is False  # the driver: its own devices


def test_application_with_weights_file_at_a_url(tmp_path, s3fs_client):
    import keras

    size = (96, 96)
    src = keras.applications.MobileNetV3Small(weights=None, input_shape=(*size, 3), classifier_activation=None)
    path = str(tmp_path / "mnv3.weights.h5")
    src.save_weights(path)
    s3fs_client.put_file(path, "s3://rayvid-test/weights/mnv3.weights.h5")

    model, info = models.load(ModelConfig(name="mobilenet_v3_small", weights="s3://rayvid-test/weights/mnv3.weights.h5", input_size=size))
    assert info.input_size == size and info.num_classes == 1000 and info.labels[0] == "tench"
    x = np.random.default_rng(1).uniform(0, 255, (2, *size, 3)).astype("float32")
    want = keras.ops.softmax(src(x, training=False)).numpy()
    np.testing.assert_allclose(model(x, training=False).numpy(), want, rtol=1e-5, atol=1e-6)


def test_efficientnet_with_a_weights_file_is_the_imagenet_model(tmp_path, monkeypatch):
    """EfficientNet B0-B3 given their ImageNet weights as a file (offline) are the model
    Keras builds for weights="imagenet", which adds a rescaling those weights need: its
    inputs were 2.1x too large (pooled features 70% off). Keras' own ImageNet build is the
    reference, its download pointed at the same file."""
    import keras
    from keras.src.applications import efficientnet

    size = (224, 224)  # (Keras' ImageNet build takes no other)
    keras.utils.set_random_seed(3)
    src = keras.applications.EfficientNetB0(weights=None, input_shape=(*size, 3), classifier_activation=None)
    path = str(tmp_path / "effb0.weights.h5")
    src.save_weights(path)
    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *a, **k: path)  # (Keras' download: offline)
    reference = keras.applications.EfficientNetB0(weights="imagenet", input_shape=(*size, 3),
                                                  classifier_activation=None)
    model, info = models.load(ModelConfig(name="efficientnet_b0", weights=path, input_size=size))
    logits = keras.Model(model.inputs, model.get_layer("rayvid_softmax").input)  # (random weights: a flat softmax)
    x = np.random.default_rng(1).uniform(0, 255, (2, *size, 3)).astype("float32")
    want = reference(x, training=False).numpy()
    off = lambda got: np.linalg.norm(got - want) / np.linalg.norm(want)  # noqa: E731 - (logits are small)
    assert off(logits(x, training=False).numpy()) < 1e-4
    assert off(src(x, training=False).numpy()) > 0.1  # the plain build differs


def test_savedmodel_folder(tmp_path, shapes_model, monkeypatch):
    import keras
    import tensorflow as tf

    src = keras.saving.load_model(shapes_model["path"])
    export = str(tmp_path / "sm")
    src.export(export)
    loads, load = [], tf.saved_model.load
    monkeypatch.setattr(tf.saved_model, "load", lambda *a, **k: loads.append(a) or load(*a, **k))
    model, info = models.load(ModelConfig(name=export))
    assert len(loads) == 1, loads  # read once (its layer's, whose signature gives the input)
    assert info.input_size == (64, 64) and info.num_classes == 6
    x = np.random.default_rng(2).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(model(x).numpy(), src(x).numpy(), rtol=1e-5, atol=1e-6)


def test_a_savedmodel_folder_over_http_with_its_own_labels_not_a_neighbours(tmp_path, shapes_model):
    """A SavedModel folder served over HTTP (a URL ending in "/", as README says) failed to
    load ("Is a directory": fsspec's HTTP `get` of a folder); one named with a dot
    (`shapes.v2/`) took the labels of `shapes.labels.txt` beside it, another model's, over
    its own labels.txt (QA finds). It loads, file by file as the server lists them, with
    the labels inside it; a folder without labels inside takes `<folder>.labels.txt`."""
    import os
    import shutil

    import keras
    from helpers import listing_http_server

    src = keras.saving.load_model(shapes_model["path"])
    served = tmp_path / "www"
    export = served / "shapes.v2"
    src.export(str(export))
    own = [f"own_{i}" for i in range(6)]
    (export / "labels.txt").write_text("\n".join(own) + "\n")
    (served / "shapes.labels.txt").write_text("\n".join(f"other_{i}" for i in range(6)) + "\n")
    shutil.copytree(export, served / "plain")
    os.remove(served / "plain" / "labels.txt")
    shutil.copy(shapes_model["labels"], served / "plain.labels.txt")
    with listing_http_server(str(served)) as base:
        x = np.random.default_rng(2).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
        for name in (str(export), f"{base}/shapes.v2/"):
            model, info = models.load(ModelConfig(name=name))
            assert info.labels == tuple(own), name
            np.testing.assert_allclose(model(x).numpy(), src(x).numpy(), rtol=1e-5, atol=1e-6)
        _, info = models.load(ModelConfig(name=f"{base}/plain/"))
        assert info.labels[:3] == ("blank", "checker", "circle")
        # every file as the folder holds it (a name with a space: its URL's %20 undone)
        (export / "assets").mkdir(exist_ok=True)
        (export / "assets" / "a b.txt").write_text("x")
        got = models._fetch(f"{base}/shapes.v2/", str(tmp_path / "work"), "model")

        def files(root):
            return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

        assert files(got) == files(export) and "assets/a b.txt" in files(got)
        with pytest.raises(ModelError, match=r"a SavedModel folder URL with a query \(http://127\.0\.0\.1:\d+/"
                                             r"shapes\.v2/\) cannot be copied file by file") as caught:
            models.load(ModelConfig(name=f"{base}/shapes.v2/?X-Amz-Signature=s3cr3t"))
        assert "s3cr3t" not in str(caught.value)


def test_a_one_entry_dict_output_named_by_model_output_and_savedmodel_input_types(tmp_path):
    """`--model-output probs` on a model whose one output is the dict {"probs": ...} failed
    at load ("Expected any non-tensor type"), where README says its key names it; a
    SavedModel taking float16 or int32 frames failed on the float32 it was handed: frames
    are cast to the type its signature takes (QA finds)."""
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(inp)
    net = keras.Model(inp, {"probs": keras.layers.Dense(3, activation="softmax", name="dense_out")(x)})
    path = str(tmp_path / "dict1.keras")
    net.save(path)
    frames = np.random.default_rng(3).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    want = models.load(ModelConfig(name=path))[0](frames).numpy()
    for output in ("probs", "dense_out"):
        model, info = models.load(ModelConfig(name=path, output=output))
        np.testing.assert_allclose(model(frames).numpy(), want, rtol=1e-6)
    import tensorflow as tf

    for dtype in (tf.float16, tf.int32):
        class Net(tf.Module):
            @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], dtype)])
            def serve(self, x):
                return {"scores": tf.nn.softmax(tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2]))}

        folder = str(tmp_path / f"sm-{dtype.name}")
        net = Net()
        tf.saved_model.save(net, folder, signatures={"serving_default": net.serve})
        model, _ = models.load(ModelConfig(name=folder))
        got = model(frames).numpy()
        expected = tf.nn.softmax(tf.reduce_mean(tf.cast(tf.cast(frames, dtype), tf.float32), axis=[1, 2])).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)

    class Small(tf.Module):  # (int8 cannot hold 128..255: refused, naming it; it failed in TF's words)
        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.int8)])
        def serve(self, x):
            return {"scores": tf.nn.softmax(tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2]))}

    folder = str(tmp_path / "sm-int8")
    net = Small()
    tf.saved_model.save(net, folder, signatures={"serving_default": net.serve})
    with pytest.raises(ModelError, match="takes int8 input, which cannot hold frames"):
        models.load(ModelConfig(name=folder))


def test_a_label_may_hold_unicode_line_separators(tmp_path):
    """"One label per line" split a label at U+0085 or U+2028 too (`str.splitlines`): a file
    of 4 labels read as 5 (a QA find). Lines end at LF, CRLF or CR."""
    path = tmp_path / "l.txt"
    path.write_bytes("a\u2028b\r\nc\x85d\re\nf\n".encode())
    assert models._read_labels(str(path)) == ("a\u2028b", "c\x85d", "e", "f")


def test_unsafe_lambda_model_is_refused(tmp_path):
    import keras

    inp = keras.Input((8, 8, 3))
    out = keras.layers.Lambda(lambda t: t * 2)(inp)
    path = str(tmp_path / "lambda.keras")
    keras.Model(inp, keras.layers.GlobalAveragePooling2D()(out)).save(path)
    with pytest.raises(ModelError, match="cannot load model"):
        models.load(ModelConfig(name=path))


@pytest.mark.parametrize(
    "name, match",
    [
        ("/no/such/model.keras", "model not found: /no/such/model.keras"),
        ("s3://rayvid-test/none/model.keras", "model not found: s3://rayvid-test/none/model.keras"),
        ("not_a_model_name", "nor a keras.applications name"),
    ],
)
def test_unloadable_models_say_why(name, match, s3_endpoint):
    with pytest.raises(ModelError, match=match):
        models.load(ModelConfig(name=name))


def test_a_classifier_needs_one_batch_by_classes_output(tmp_path):
    """Models whose output is not one [batch, classes] tensor: several outputs (a .keras
    file and a SavedModel, which had its alphabetically first output scored, an
    embedding as classes, no word said), a feature map (loaded, then failed the run at its
    first batch with a traceback), a rank-1 output (a TypeError): each a ModelError
    saying what the model outputs, before any work."""
    import keras
    import tensorflow as tf

    inp = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inp)
    cases = {
        "two.keras": (keras.Model(inp, [keras.layers.Dense(3, name="scores")(pooled), keras.layers.Dense(2, name="x")(pooled)]),
                      r"two.keras has 2 outputs \(scores; x\); rayvid uses one: name it with --model-output NAME$"),
        "fmap.keras": (keras.Model(inp, keras.layers.Conv2D(5, 1)(inp)),
                       r"one \[batch, classes\] tensor; this model outputs \(None, 32, 32, 5\) \(--head detect"),
        "rank1.keras": (keras.Model(inp, keras.layers.Reshape(())(keras.layers.Dense(1)(pooled))),
                        r"this model outputs \(None,\)$"),
    }
    for name, (model, match) in cases.items():
        model.save(str(tmp_path / name))
        with pytest.raises(ModelError, match=match):
            models.load(ModelConfig(name=str(tmp_path / name)))

    class Two(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def serve(self, x):
            pooled = tf.reduce_mean(x, axis=[1, 2])
            return {"scores": tf.nn.softmax(pooled), "embedding": tf.concat([pooled, pooled], axis=1)}

    module = Two()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    with pytest.raises(ModelError, match=r"serving signature has 2 outputs \(embedding, scores\); rayvid uses one, "
                                         r"\[batch, classes\]: name it with --model-output NAME$"):
        models.load(ModelConfig(name=str(tmp_path / "sm"), input_size=(32, 32)))


def test_model_output_names_the_output_of_a_model_with_several(tmp_path):
    """`--model-output NAME` picks one output of a model with several (a SavedModel signature's
    key; a Keras model's output layer name, or its dict key): the scores are that output's,
    exactly; a name it does not have says which it has."""
    import keras
    import numpy as np
    import tensorflow as tf

    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    pooled = tf.reduce_mean(frames, axis=[1, 2])

    class Two(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def serve(self, x):
            p = tf.reduce_mean(x, axis=[1, 2])
            return {"scores": tf.nn.softmax(p / 100), "embedding": tf.concat([p, p], axis=1)}

    module = Two()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    model, info = models.load(ModelConfig(name=str(tmp_path / "sm"), input_size=(32, 32), output="scores"))
    assert len(info.labels) == 3
    np.testing.assert_allclose(model.predict(frames, verbose=0), tf.nn.softmax(pooled / 100), rtol=1e-5)
    with pytest.raises(ModelError, match=r"has no output 'probs' \(--model-output\): its serving signature's "
                                         r"outputs are embedding, scores$"):
        models.load(ModelConfig(name=str(tmp_path / "sm"), input_size=(32, 32), output="probs"))

    inp = keras.Input((32, 32, 3))
    avg = keras.layers.GlobalAveragePooling2D()(inp)
    scores = keras.layers.Dense(3, activation="softmax", name="scores")(avg)
    emb = keras.layers.Dense(5, name="emb")(avg)
    for name, outputs, pick in (("list.keras", [emb, scores], "scores"), ("dict.keras", {"p": scores, "e": emb}, "p"),
                                ("dict_by_layer.keras", {"p": scores, "e": emb}, "scores")):
        source = keras.Model(inp, outputs)
        source.save(str(tmp_path / name))
        model, info = models.load(ModelConfig(name=str(tmp_path / name), output=pick))
        assert models.static_shape(ModelConfig(name=str(tmp_path / name), output=pick)).input_size == (32, 32)
        expected = source.predict(frames, verbose=0)
        expected = expected[1] if isinstance(expected, list) else expected["p"]
        np.testing.assert_allclose(model.predict(frames, verbose=0), expected, rtol=1e-6)
        assert len(info.labels) == 3, name
    # what is wrong with --model-output: from the .keras file's config.json (the driver's
    # static_shape, before any work) as from the loaded model (the inference actor's load)
    checks = (models.static_shape, models.load)
    for check in checks:
        with pytest.raises(ModelError, match=r"list.keras has 2 outputs \(emb; scores\); rayvid uses one: name it with "
                                             r"--model-output NAME$"):
            check(ModelConfig(name=str(tmp_path / "list.keras")))
        with pytest.raises(ModelError, match=r"has no outputs named 'x' \(--model-output\): its outputs are e/emb; p/scores$"):
            check(ModelConfig(name=str(tmp_path / "dict.keras"), output="x"))
    # --embed LAYER of another branch than the output picked (cut off by the pick, it was "no layer named")
    model, info = models.load(ModelConfig(name=str(tmp_path / "list.keras"), output="scores", embed="emb"))
    scores_got, emb_got = model.predict(frames, verbose=0)
    emb_want, scores_want = keras.saving.load_model(str(tmp_path / "list.keras")).predict(frames, verbose=0)
    np.testing.assert_allclose(scores_got, scores_want, rtol=1e-6)
    np.testing.assert_allclose(emb_got, emb_want, rtol=1e-6)
    assert info.embedding_dim == 5
    # one layer making both outputs: a name that fits two is refused, not the first taken
    shared = keras.layers.Dense(3, activation="softmax", name="shared")
    keras.Model(inp, [shared(avg), shared(keras.layers.Dense(3)(avg))]).save(str(tmp_path / "shared.keras"))
    for check in checks:
        with pytest.raises(ModelError, match=r"has 2 outputs named 'shared' \(--model-output\)"):
            check(ModelConfig(name=str(tmp_path / "shared.keras"), output="shared"))
    # a Sequential (a loaded one tells no output tensors): its one output, by its last layer's name
    keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
                      keras.layers.Dense(3, activation="softmax", name="head")]).save(str(tmp_path / "seq.keras"))
    model, info = models.load(ModelConfig(name=str(tmp_path / "seq.keras"), output="head"))
    assert len(info.labels) == 3 and models.static_shape(ModelConfig(name=str(tmp_path / "seq.keras"), output="head"))
    for check in checks:
        with pytest.raises(ModelError, match=r"has no outputs named 'probs' \(--model-output\): its outputs are head$"):
            check(ModelConfig(name=str(tmp_path / "seq.keras"), output="probs"))
    # a keras.applications name has one output: said before any work (the driver's static_shape)
    for check in (models.static_shape, lambda cfg: models.load(cfg)):
        with pytest.raises(ModelError, match=r"--model-output scores: resnet50 has one output"):
            check(ModelConfig(name="resnet50", weights="none", output="scores"))


def test_imagenet_weights_at_another_input_size_say_so_without_the_cache_hint():
    """An application at a size its ImageNet weights were not trained at: Keras' reason,
    without the hint about Keras' cache and --weights PATH (which then built the model at
    that size with those weights, no word said)."""
    with pytest.raises(ModelError) as caught:
        models.load(ModelConfig(name="mobilenet_v2", input_size=(160, 200)))
    assert "input_shape" in str(caught.value) and "Keras' cache" not in str(caught.value)


def test_models_that_take_or_give_what_rayvid_cannot_use_are_said_in_one_line(tmp_path):
    """A one-unit output not through a sigmoid (a logit or a regression: every frame was
    labelled its one class, at any score), a model taking other than RGB (1 or 4 channels: a traceback from
    the inference actor), and an --input-size other than a model's fixed one (ignored, no
    word said): each a ModelError in one line, the channels and size before any work."""
    import keras
    import tensorflow as tf

    inp = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inp)
    keras.Model(inp, keras.layers.Dense(1)(pooled)).save(str(tmp_path / "logit.keras"))
    with pytest.raises(ModelError, match=r"outputs one value per frame \(None, 1\), not a score per class, and "
                                         r"rayvid found no sigmoid at its end"):
        models.load(ModelConfig(name=str(tmp_path / "logit.keras")))
    for channels in (1, 4):
        gray = keras.Input((32, 32, channels))
        model = keras.Model(gray, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(gray)))
        model.save(str(tmp_path / f"c{channels}.keras"))
        for check in (models.static_shape, models.load):
            with pytest.raises(ModelError, match=rf"takes {channels} channel\(s\) per pixel .* rayvid feeds RGB"):
                check(ModelConfig(name=str(tmp_path / f"c{channels}.keras")))
        model.export(str(tmp_path / f"c{channels}_sm"), verbose=False)
        with pytest.raises(ModelError, match=rf"takes {channels} channel\(s\) per pixel") as e:
            models.load(ModelConfig(name=str(tmp_path / f"c{channels}_sm")))
        assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    first = keras.Input((3, 32, 32))  # channels first, as a PyTorch port has it
    keras.Model(first, keras.layers.Dense(2)(keras.layers.Flatten()(first))).save(str(tmp_path / "cf.keras"))
    with pytest.raises(ModelError, match=r"takes 32 channel\(s\) per pixel \(input \(None, 3, 32, 32\)\) \(channels "
                                         r"first, as PyTorch orders them\? rayvid feeds channels last\)"):
        models.static_shape(ModelConfig(name=str(tmp_path / "cf.keras")))
    fixed = keras.Input((24, 40, 3))
    model = keras.Model(fixed, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(fixed)))
    model.save(str(tmp_path / "fixed.keras"))
    model.export(str(tmp_path / "fixed_sm"), verbose=False)
    for name in ("fixed.keras", "fixed_sm"):
        for check in ((models.static_shape, models.load) if name.endswith(".keras") else (models.load,)):
            with pytest.raises(ModelError, match=r"takes 24x40 frames \(H x W\); --input-size 32 32 differs"):
                check(ModelConfig(name=str(tmp_path / name), input_size=(32, 32)))
        assert models.load(ModelConfig(name=str(tmp_path / name), input_size=(24, 40)))[1].input_size == (24, 40)
    del tf


def test_models_rayvid_reads_as_keras_does(tmp_path, caplog):
    """A one-entry dict output (`{"probs": ...}`: a TypeError at the first batch), a
    SavedModel taking uint8 (refused: float fed), and a 1000-class model with its own labels
    file beside it (ImageNet's were taken): the scores and labels Keras' own give."""
    import keras
    import numpy as np

    from rayvid.infer import Predictor

    frames = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    inp = keras.Input((16, 16, 3))
    probs = keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inp))
    keras.Model(inp, {"probs": probs}).save(str(tmp_path / "dict.keras"))
    want = keras.Model(inp, probs).predict(frames.astype(np.float32), verbose=0)
    got = Predictor(ModelConfig(name=str(tmp_path / "dict.keras")), batch_size=8).scores(frames)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    u8 = keras.Input((16, 16, 3), dtype="uint8")
    scaled = keras.layers.Rescaling(1 / 255)(u8)
    model = keras.Model(u8, keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(scaled)))
    model.export(str(tmp_path / "u8_sm"), verbose=False)
    got = Predictor(ModelConfig(name=str(tmp_path / "u8_sm")), batch_size=8).scores(frames)
    np.testing.assert_allclose(got, model.predict(frames, verbose=0), rtol=1e-5, atol=1e-6)
    k1000 = keras.Model(inp, keras.layers.Dense(1000, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inp)))
    k1000.save(str(tmp_path / "k1000.keras"))
    (tmp_path / "k1000.labels.txt").write_text("".join(f"mine_{i}\n" for i in range(1000)))
    assert models.load(ModelConfig(name=str(tmp_path / "k1000.keras")))[1].labels[:2] == ("mine_0", "mine_1")
    # without its labels file: ImageNet's, with a warning (a model of 1000 other classes gets them too)
    (tmp_path / "k1000.labels.txt").unlink()
    with caplog.at_level("WARNING", "rayvid.models"):
        assert models.load(ModelConfig(name=str(tmp_path / "k1000.keras")))[1].labels[0] == "tench"
    assert "outputs 1000 classes and has no labels file beside it: its labels are ImageNet's" in caplog.text


def test_not_a_model_file(tmp_path):
    """A .keras file that is no zip archive: not "File not found" (Keras' words for it)."""
    p = tmp_path / "model.keras"
    p.write_bytes(b"garbage")
    with pytest.raises(ModelError, match=rf"cannot load model {p}: not a .keras file \(a .keras file is a zip archive"):
        models.load(ModelConfig(name=str(p)))


def test_static_shape_agrees_with_loading(shapes_model, s3fs_client, tmp_path):
    import keras

    free = keras.Input((None, None, 3))
    keras.Model(free, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(free))).save(tmp_path / "free.keras")
    clip = keras.Input((8, 16, 16, 3))
    keras.Model(clip, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling3D()(clip))).save(tmp_path / "clip.keras")
    keras.Sequential([keras.Input((32, 48, 3)), keras.layers.Flatten(), keras.layers.Dense(3)]).save(tmp_path / "seq.keras")
    s3fs_client.put_file(shapes_model["path"], "s3://rayvid-test/static/shapes.keras")
    configs = [
        ModelConfig(name="mobilenet_v3_small", weights="none"),
        ModelConfig(name="efficientnet_b1", weights="none"),  # 240 by default
        ModelConfig(name="mobilenet_v3_small", weights="none", input_size=(96, 128)),
        ModelConfig(name=shapes_model["path"]),
        ModelConfig(name="s3://rayvid-test/static/shapes.keras"),
        ModelConfig(name=str(tmp_path / "free.keras"), input_size=(40, 50)),
        ModelConfig(name=str(tmp_path / "clip.keras")),
        ModelConfig(name=str(tmp_path / "seq.keras")),
    ]
    for cfg in configs:  # read without TensorFlow, and what loading the model says
        assert models.static_shape(cfg) == models.load(cfg)[1].shape, cfg.name
    assert models.static_shape(configs[1]).input_size == (240, 240)
    assert models.static_shape(configs[6]) == models.Shape((16, 16), 8)

    # only loading can tell: the loader (or the probe) says what it is, or what is wrong
    assert models.static_shape(ModelConfig(name=str(tmp_path / "free.keras"))) is None
    src = keras.saving.load_model(shapes_model["path"])
    src.export(str(tmp_path / "sm"))
    src.save(tmp_path / "legacy.h5")
    (tmp_path / "garbage.keras").write_bytes(b"garbage")
    for name in ("sm", "legacy.h5", "garbage.keras"):
        assert models.static_shape(ModelConfig(name=str(tmp_path / name))) is None
    with pytest.raises(ModelError, match="model not found: s3://rayvid-test/static/none.keras"):
        models.static_shape(ModelConfig(name="s3://rayvid-test/static/none.keras"))


def test_missing_weights_or_labels_are_said_before_any_work(store, shapes_model, tmp_path):
    """A --labels or --weights file that is not there was found by the inference actors
    (their tracebacks, then `cannot read labels …: b/<bucket>/o/…` on GCS): the driver
    says it in one line first, where the model's shape is read."""
    _, bucket = store
    here = ModelConfig(name=shapes_model["path"])
    for cfg, said in (
            (dataclasses.replace(here, labels=f"{bucket}/static/no-labels.txt"),
             f"labels file not found: {bucket}/static/no-labels.txt"),
            (ModelConfig(name="mobilenet_v3_small", weights=f"{bucket}/static/no-weights.h5"),
             f"weights file not found: {bucket}/static/no-weights.h5"),
            (dataclasses.replace(here, labels=str(tmp_path)), f"labels {tmp_path} is a folder, not a file")):
        with pytest.raises(ModelError) as e:
            models.static_shape(cfg)
        assert str(e.value) == said
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(samples.CLASSES))
    # over HTTP fsspec says "not found" for any error status: a refusal (an expired signed URL) is said as one
    import http.server
    import threading

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(403)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/labels.txt?X-Amz-Signature=S3CRET"
        with pytest.raises(ModelError) as e:
            models.static_shape(dataclasses.replace(here, labels=url))
        assert str(e.value) == (f"cannot read labels http://127.0.0.1:{server.server_address[1]}/labels.txt: HTTP 403 "
                                "Forbidden (the server refused it: a signed URL may have expired, or its token is "
                                "wrong)"), str(e.value)
        assert "S3CRET" not in str(e.value)
        model = f"http://127.0.0.1:{server.server_address[1]}/m.keras?X-Amz-Signature=S3CRET"
        with pytest.raises(ModelError) as e:  # the model itself: was "model not found: … (neither a file, …)"
            models.static_shape(ModelConfig(name=model))
        assert str(e.value).startswith(f"cannot read model http://127.0.0.1:{server.server_address[1]}/m.keras: HTTP 403 "
                                       "Forbidden (the server refused") and "S3CRET" not in str(e.value), str(e.value)
    finally:
        server.shutdown()
        server.server_close()
    assert models.static_shape(dataclasses.replace(here, labels=str(labels))) == models.Shape((64, 64))


SIGNED = "?X-Amz-Signature=s3cr3tsig&X-Amz-Credential=AKIAFAKE%2F20240101&X-Amz-Expires=600"


def test_presigned_model_and_weights_urls(shapes_model, tmp_path):
    """A .keras model and a weights file at URLs with a query string (presigned URLs):
    loaded by their path's extension, labels found beside the model, and the signature in
    no file name, message or model name."""
    import os
    import shutil

    import keras
    from helpers import http_server

    served, work = tmp_path / "served", tmp_path / "work"
    served.mkdir()
    work.mkdir()
    shutil.copy(shapes_model["path"], served / "shapes.keras")
    shutil.copy(shapes_model["labels"], served / "shapes.labels.txt")
    size = (32, 32)
    src = keras.applications.MobileNetV3Small(weights=None, input_shape=(*size, 3), classifier_activation=None)
    src.save_weights(str(served / "mnv3.weights.h5"))
    from helpers import HTTP_SENT

    with http_server(str(served), "ranges") as base:
        cfg = ModelConfig(name=f"{base}/shapes.keras{SIGNED}")
        HTTP_SENT.clear()
        model, info = models.load(cfg, workdir=str(work))
        assert HTTP_SENT["/shapes.keras"] == os.path.getsize(served / "shapes.keras")  # read once
        assert models.static_shape(cfg) == info.shape == models.Shape((64, 64))
        assert info.name == f"{base}/shapes.keras" and info.labels[:3] == ("blank", "checker", "circle")
        x = np.random.default_rng(4).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
        local = keras.saving.load_model(shapes_model["path"])
        np.testing.assert_allclose(model.predict(x, verbose=0), local.predict(x, verbose=0), rtol=1e-6)

        weights = f"{base}/mnv3.weights.h5{SIGNED}"
        app, _ = models.load(ModelConfig(name="mobilenet_v3_small", weights=weights, input_size=size),
                             workdir=str(work))
        x = np.random.default_rng(5).uniform(0, 255, (2, *size, 3)).astype("float32")
        np.testing.assert_allclose(app(x, training=False).numpy(), keras.ops.softmax(src(x, training=False)).numpy(),
                                   rtol=1e-5, atol=1e-6)
        assert sorted(os.listdir(work)) == ["model-shapes.keras", "weights-mnv3.weights.h5"]

        for name, match in [(f"{base}/none.keras{SIGNED}", rf"model not found: {base}/none\.keras \(neither"),
                            (f"{base}/shapes.labels.txt{SIGNED}", "unsupported model file")]:
            with pytest.raises(ModelError, match=match) as caught:
                models.load(ModelConfig(name=name))
            assert "s3cr3t" not in str(caught.value) and "AKIAFAKE" not in str(caught.value)


def test_embed_on_a_savedmodel_is_a_clear_error(shapes_model, tmp_path):
    """A SavedModel's layers are out of Keras' reach: --embed would take the image."""
    import keras

    keras.saving.load_model(shapes_model["path"]).export(str(tmp_path / "sm"))
    for layer in ("auto", "classes"):
        with pytest.raises(ModelError, match=r"--embed needs a Keras model \(a .keras or .h5 file"):
            models.load(ModelConfig(name=str(tmp_path / "sm"), embed=layer))
    inp = keras.Input((8, 8, 3))  # a classifier on the pixels themselves: no features to take
    keras.Model(inp, keras.layers.EinsumDense("bhwc,hwcd->bd", output_shape=2)(inp)).save(tmp_path / "pixels.keras")
    with pytest.raises(ModelError, match="takes the image itself; name a layer"):
        models.load(ModelConfig(name=str(tmp_path / "pixels.keras"), embed="auto"))


def test_mixed_precision_builds_applications_under_the_policy_and_model_files_as_saved(shapes_model, tmp_path):
    """keras.applications are built in float16 (softmax in float32) and the process-wide
    policy is put back; a SavedModel runs in float32 even where the caller set the policy."""
    import keras

    size = (32, 32)
    model, _ = models.load(ModelConfig(name="mobilenet_v3_small", weights="none", input_size=size,
                                       mixed_precision=True))
    assert keras.mixed_precision.global_policy().name == "float32"
    assert {layer.compute_dtype for layer in model.layers if layer.weights} == {"float16"}
    assert model.get_layer("rayvid_softmax").compute_dtype == "float32"
    assert model(np.zeros((1, *size, 3), "float32")).dtype == "float32"

    src = keras.saving.load_model(shapes_model["path"])
    src.export(str(tmp_path / "sm"))
    x = np.random.default_rng(6).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        saved, _ = models.load(ModelConfig(name=str(tmp_path / "sm"), mixed_precision=True))
        got = saved(x).numpy()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    np.testing.assert_allclose(got, src(x).numpy(), rtol=1e-5, atol=1e-6)


def test_a_model_that_scales_its_input_itself_warns_of_a_second_scaling(shapes_model, tmp_path, caplog):
    """`--preprocess unit` on a model whose first layer is Rescaling(1/255) (the sample's,
    as many saved models are) scaled the frames twice: every frame nearly black to the model,
    its scores quietly wrong. Loading it says so; the default (raw) and a model without its
    own scaling say nothing."""
    import keras

    for preprocess in ("unit", "torch"):
        caplog.clear()
        models.load(ModelConfig(name=shapes_model["path"], preprocess=preprocess))
        assert [r.getMessage() for r in caplog.records if r.name == "rayvid.models"] == [
            f"{shapes_model['path']} scales its input itself (its first layers include 'rescaling') and "
            f"--preprocess {preprocess} scales the frames before that: twice, and its scores are likely wrong; "
            f"--preprocess raw feeds it 0-255 RGB"]
    def head(x):
        return keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))

    inp = keras.Input((16, 16, 3))
    keras.Model(inp, head(inp)).save(tmp_path / "plain.keras")
    # models that expect 0-1 input (--preprocess unit is right for them): no warning
    keras.Model(inp, head(keras.layers.Rescaling(2.0, offset=-1.0)(inp))).save(tmp_path / "to_pm1.keras")
    norm = keras.layers.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.052, 0.05, 0.051])
    keras.Model(inp, head(norm(inp))).save(tmp_path / "imagenet01.keras")
    caplog.clear()
    models.load(ModelConfig(name=shapes_model["path"]))
    for name in ("plain", "to_pm1", "imagenet01"):
        models.load(ModelConfig(name=str(tmp_path / f"{name}.keras"), preprocess="unit"))
    assert not [r.getMessage() for r in caplog.records if r.name == "rayvid.models"]
    # a base model nested first (transfer learning) that takes 0-255 itself: warned of
    base = keras.Model(inp, keras.layers.Conv2D(4, 3)(keras.layers.Normalization(
        mean=[120.0, 115.0, 100.0], variance=[3000.0, 3000.0, 3000.0], name="norm255")(inp)), name="base")
    keras.Model(inp, head(base(inp))).save(tmp_path / "nested.keras")
    models.load(ModelConfig(name=str(tmp_path / "nested.keras"), preprocess="tf"))
    assert [r.getMessage().split(" and ")[0] for r in caplog.records if r.name == "rayvid.models"] == [
        f"{tmp_path / 'nested.keras'} scales its input itself (its first layers include 'norm255')"]


def test_savedmodels_with_a_fixed_batch_or_clips(tmp_path):
    """A SavedModel whose signature fixes batches of 1 (`tf.saved_model.save` with a
    TensorSpec([1, ...])) failed at the first batch with TensorFlow's binding error: it now
    runs frame by frame inside the graph, the same scores. One fixing another batch size is
    refused, saying how to export it. A video model's SavedModel ([batch, N, H, W, 3]) was
    read as frames of N x H and failed: it is a clip model of N frames."""
    import tensorflow as tf

    def saved(name, spec, fn):
        class M(tf.Module):
            @tf.function(input_signature=[tf.TensorSpec(spec, tf.float32)])
            def serve(self, x):
                return {"probs": fn(x)}

        m = M()
        tf.saved_model.save(m, str(tmp_path / name), signatures={"serving_default": m.serve})
        return str(tmp_path / name)

    def mean_rgb(x):
        return tf.nn.softmax(tf.reduce_mean(x, axis=[1, 2]) / 50.0)

    x = np.random.default_rng(0).uniform(0, 255, (5, 32, 24, 3)).astype(np.float32)
    model, info = models.load(ModelConfig(name=saved("b1", [1, 32, 24, 3], mean_rgb)))
    assert (info.input_size, info.num_classes, info.clip_len) == ((32, 24), 3, 0)
    np.testing.assert_allclose(model(x).numpy(), mean_rgb(x).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match=r"--embed needs a Keras model"):  # (its layer is out of reach, as any SavedModel's)
        models.load(ModelConfig(name=str(tmp_path / "b1"), embed="auto"))
    with pytest.raises(ModelError, match=r"its serving signature takes batches of exactly 4: export it with a free "
                                         r"batch axis \(None\), or with 1"):
        models.load(ModelConfig(name=saved("b4", [4, 32, 24, 3], mean_rgb)))

    def clip_mean(c):
        return tf.nn.softmax(tf.reduce_mean(c, axis=[1, 2, 3]) / 50.0)

    clips = np.random.default_rng(1).uniform(0, 255, (3, 4, 32, 24, 3)).astype(np.float32)
    model, info = models.load(ModelConfig(name=saved("clip4", [None, 4, 32, 24, 3], clip_mean)))
    assert (info.input_size, info.num_classes, info.clip_len) == ((32, 24), 3, 4)
    np.testing.assert_allclose(model(clips).numpy(), clip_mean(clips).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match=r"takes clips of any length: export it with a fixed N"):
        models.load(ModelConfig(name=saved("clipn", [None, None, 32, 24, 3], clip_mean)))


def test_a_model_that_takes_uint8_refuses_a_preprocessing_that_makes_fractions(tmp_path):
    """A uint8-input model with --preprocess unit/tf/torch was handed 0-1 floats cast to
    uint8 (every pixel 0 or 1): its scores wrong, exit 0, no word. Refused; raw (the
    default for model files) is exact."""
    import keras

    u8 = keras.Input((16, 16, 3), dtype="uint8")
    scaled = keras.layers.Rescaling(1 / 255)(u8)
    model = keras.Model(u8, keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(scaled)))
    model.save(str(tmp_path / "u8.keras"))
    model.export(str(tmp_path / "u8_sm"), verbose=False)
    for name in ("u8.keras", "u8_sm"):
        for mode in ("unit", "torch"):
            with pytest.raises(ModelError, match=rf"{tmp_path}/{name} takes uint8 input \(its own 0-255 pixels\): "
                                                 rf"--preprocess {mode} would hand it fractions, cut to 0 or 1; use "
                                                 r"--preprocess raw \(the default for model files\)"):
                models.load(ModelConfig(name=str(tmp_path / name), preprocess=mode))
        models.load(ModelConfig(name=str(tmp_path / name), preprocess="raw"))


CUSTOM = """
import keras


class Halve(keras.layers.Layer):  # not registered: Keras finds it by its class name
    def call(self, x):
        return x * 0.5


def twice(x):  # a custom activation
    return x * 2.0


def relu(x):  # a helper with a Keras name, left out by __all__: the .h5 model's relu stays Keras'
    return x * 0.0


__all__ = ["Halve", "twice"]
"""


def test_custom_objects_from_a_module_a_file_on_s3_or_nowhere(s3fs_client, tmp_path, monkeypatch, caplog):
    """`--custom-objects` takes a module name (found as Python finds it, then in the current
    folder, as Ray's workers find the driver's; a package re-exporting its module's classes
    too) or a .py file at any URL (named anything): its unregistered classes and functions
    are found by name, a `.keras` and an `.h5` model's outputs equal those of the model it
    saved: a helper `relu` the module's `__all__` leaves out, or one an `.h5` file (which
    names functions by bare name, a custom one first) would take for Keras', stays out; one
    `__all__` lists is handed, said in a warning. A module that is not there, one importing what is
    not installed, one that raises or exits, or a file that is not there is one line naming
    it (the file's before any work: static_shape)."""
    import logging
    import sys

    import keras

    monkeypatch.setattr(sys, "path", list(sys.path))  # (restored after: the current-folder fallback appends)
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    (tmp_path / "halving.py").write_text(CUSTOM)
    (tmp_path / "halvpkg").mkdir()
    (tmp_path / "halvpkg" / "layers.py").write_text(CUSTOM)
    (tmp_path / "halvpkg" / "__init__.py").write_text("from .layers import Halve, twice\n__all__ = ['Halve', 'twice']\n")
    (tmp_path / "halving_code").write_text(CUSTOM)  # (a file by any name: a download link's)
    sys.path.insert(0, str(tmp_path))
    import halving

    inp = keras.Input((4, 4, 3))
    x = keras.layers.GlobalAveragePooling2D()(halving.Halve()(inp))
    x = keras.layers.Dense(6, activation="relu")(x)
    model = keras.Model(inp, keras.layers.Dense(3, activation=halving.twice)(x))
    model.save(tmp_path / "custom.keras")
    model.save(tmp_path / "custom.h5")
    frames = np.random.default_rng(0).uniform(0, 255, (5, 4, 4, 3)).astype("float32")
    expected = model.predict(frames, verbose=0)
    sys.path.remove(str(tmp_path))  # (from here on, only the current folder holds it)
    del sys.modules["halving"]
    s3fs_client.put(str(tmp_path / "halving.py"), "rayvid-test/code/halving.py")
    name = str(tmp_path / "custom.keras")
    with pytest.raises(ModelError, match=r"it uses the class 'Halve' \(from halving\), which is no Keras one"):
        models.static_shape(ModelConfig(name=name))  # the driver, from config.json
    for file in ("custom.keras", "custom.h5"):  # an inference actor (a SavedModel's driver task, an .h5)
        with pytest.raises(ModelError, match=r"it uses the (class|function|layer|activation) '(Halve|twice)', which "
                                             r"is no Keras one: give the Python module or .py file"):
            models.load(ModelConfig(name=str(tmp_path / file)))
    with pytest.raises(ModelError, match=r"cannot import --custom-objects halving: No module named 'halving'"):
        models.load(ModelConfig(name=name, custom_objects=("halving",)))
    monkeypatch.chdir(tmp_path)
    for file in ("custom.keras", "custom.h5"):
        for spec in ("halving", "halvpkg", "s3://rayvid-test/code/halving.py", str(tmp_path / "halving_code")):
            loaded, info = models.load(ModelConfig(name=str(tmp_path / file), custom_objects=(spec,)))
            assert info.input_size == (4, 4) and np.allclose(loaded.predict(frames, verbose=0), expected), (file, spec)
    (tmp_path / "everything.py").write_text(CUSTOM.replace('__all__ = ["Halve", "twice"]', ""))
    with caplog.at_level(logging.WARNING, logger="rayvid"):
        for file in ("custom.keras", "custom.h5"):  # (without __all__ its relu is handed, except to the .h5)
            loaded, _ = models.load(ModelConfig(name=str(tmp_path / file), custom_objects=(str(tmp_path / "everything.py"),)))
            assert np.allclose(loaded.predict(frames, verbose=0), expected), file
        assert "--custom-objects hands Keras" not in caplog.text
        (tmp_path / "listing.py").write_text(CUSTOM.replace('__all__ = ["Halve", "twice"]', '__all__ = ["Halve", "twice", "relu"]'))
        loaded, _ = models.load(ModelConfig(name=str(tmp_path / "custom.h5"), custom_objects=(str(tmp_path / "listing.py"),)))
    assert not np.allclose(loaded.predict(frames, verbose=0), expected)  # (its relu, as __all__ says)
    assert ("custom.h5: --custom-objects hands Keras its own relu (listed in __all__), which this .h5 file's layers "
            "use wherever they name Keras' function of that name") in caplog.text
    listing, everything = str(tmp_path / "listing.py"), str(tmp_path / "everything.py")
    for order in ((listing, everything), (everything, listing)):  # a module's unlisted relu never replaces it
        handed = models.custom_objects(ModelConfig(name=str(tmp_path / "custom.h5"), custom_objects=order),
                                       str(tmp_path), h5=True)
        assert handed["relu"].__module__.startswith("rayvid_custom_listing_"), order
    (tmp_path / "raising.py").write_text("import keras\nraise RuntimeError('no GPU here\\nmore')\n")
    (tmp_path / "exiting.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "needing.py").write_text("import not_installed_here_xyz\n")
    for file, said in (("raising.py", "RuntimeError: no GPU here"), ("exiting.py", "SystemExit: 3"),
                       ("needing.py", "it imports 'not_installed_here_xyz', which is not installed where the model "
                                      "loads")):
        with pytest.raises(ModelError) as e:
            models.load(ModelConfig(name=name, custom_objects=(str(tmp_path / file),)))
        assert str(e.value) == f"cannot import --custom-objects {tmp_path / file}: {said}"
    with pytest.raises(ModelError, match="custom objects file not found: s3://rayvid-test/code/gone.py"):
        models.static_shape(ModelConfig(name=name, custom_objects=("s3://rayvid-test/code/gone.py",)))


def test_the_driver_tells_custom_classes_from_what_only_compiling_needs(tmp_path):
    """The driver reads a .keras file's config.json: a layer defined in the script that saved
    the model (saved with module null) is refused there, naming it; a custom loss the model
    was compiled with is not (rayvid loads models uncompiled: it needs no --custom-objects)."""
    import zipfile

    import keras

    class MainLayer(keras.layers.Layer):
        def call(self, x):
            return x

    class FocalLoss(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return keras.ops.mean(y_pred)

    MainLayer.__module__ = "__main__"  # (as a training script's own class is)
    inp = keras.Input((4, 4, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inp)
    keras.Model(inp, keras.layers.Dense(2)(MainLayer()(pooled))).save(tmp_path / "main.keras")
    with pytest.raises(ModelError, match=r"it uses the class 'MainLayer' \(defined in the script that saved it\), "
                                         r"which is no Keras one: give the Python module or .py file"):
        models.static_shape(ModelConfig(name=str(tmp_path / "main.keras")))
    compiled = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(pooled))
    compiled.compile(loss=FocalLoss())
    compiled.save(tmp_path / "compiled.keras")
    with zipfile.ZipFile(tmp_path / "compiled.keras") as archive:  # (the loss is in its config, from another module)
        assert '"class_name": "FocalLoss"' in archive.read("config.json").decode()
    assert models.static_shape(ModelConfig(name=str(tmp_path / "compiled.keras"))).input_size == (4, 4)
    assert models.load(ModelConfig(name=str(tmp_path / "compiled.keras")))[1].num_classes == 2


@pytest.mark.parametrize("form", ["dense", "activation", "sequential", "nested", "dropout", "ops"])
def test_a_one_unit_sigmoid_classifier_runs_as_two_classes(tmp_path, form):
    """A binary classifier's one sigmoid unit p (a Dense's activation, an Activation layer, a
    Sequential's last layer, a nested head's, one before Dropout and a Reshape, or
    keras.ops.sigmoid) runs as two classes' scores [1 - p, p]; a labels file naming
    its positive class alone gives the other "not <label>"; --embed auto takes the input
    of its Dense, as for any classifier. A labels file of three lines is refused."""
    import keras

    keras.utils.set_random_seed(1)
    if form == "sequential":
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(1, activation="sigmoid")])
    else:
        inp = keras.Input((8, 8, 3))
        pooled = keras.layers.GlobalAveragePooling2D(name="pooled")(inp)
        if form == "dense":
            out = keras.layers.Dense(1, activation="sigmoid")(pooled)
        elif form == "activation":
            out = keras.layers.Activation("sigmoid")(keras.layers.Dense(1)(pooled))
        elif form == "nested":
            head_in = keras.Input((3,))
            out = keras.Model(head_in, keras.layers.Dense(1, activation="sigmoid")(head_in), name="head")(pooled)
        elif form == "dropout":
            out = keras.layers.Reshape((1,))(keras.layers.Dropout(0.5)(keras.layers.Dense(1, activation="sigmoid")(pooled)))
        else:
            out = keras.ops.sigmoid(keras.layers.Dense(1)(pooled))
        model = keras.Model(inp, out)
    name = str(tmp_path / "cat.keras")
    model.save(name)
    (tmp_path / "cat.labels.txt").write_text("cat\n")
    frames = np.random.default_rng(0).uniform(0, 1, (6, 8, 8, 3)).astype("float32")
    p = model.predict(frames, verbose=0)[:, 0]
    loaded, info = models.load(ModelConfig(name=name))
    assert info.labels == ("not cat", "cat") and info.num_classes == 2
    assert np.allclose(loaded.predict(frames, verbose=0), np.stack([1 - p, p], axis=1), atol=1e-6)
    (tmp_path / "cat.labels.txt").write_text("dog\ncat\n")
    loaded, info = models.load(ModelConfig(name=name, embed="auto"))  # (a nested head: its input, on the outer path)
    scores, vectors = loaded.predict(frames, verbose=0)
    assert info.labels == ("dog", "cat") and info.embedding_dim == 3
    assert np.allclose(scores[:, 1], p, atol=1e-6) and np.allclose(vectors, frames.mean(axis=(1, 2)), atol=1e-5)
    (tmp_path / "cat.labels.txt").write_text("a\nb\nc\n")
    with pytest.raises(ModelError, match=r"has 3 entries but the model outputs 2 classes \(a binary classifier"):
        models.load(ModelConfig(name=name))


def test_a_one_unit_output_off_the_sigmoid_path_is_not_taken_for_a_probability(tmp_path):
    """The sigmoid is looked for on the output's own path: a logit from a nested model whose
    other output is a sigmoid, or from a Dropout shared with a sigmoid branch, is refused as
    any logit (it ran as [1 - x, x] with scores of -196 and 197); a Sequential saved without
    an Input (no input shape) is a ModelError, not an AttributeError."""
    import keras

    inp = keras.Input((4, 4, 3))
    feat = keras.layers.GlobalAveragePooling2D()(inp)
    j = keras.Input((3,))
    inner = keras.Model(j, [keras.layers.Dense(1, activation="sigmoid")(j), keras.layers.Dense(1)(j)])
    keras.Model(inp, inner(feat)[1]).save(tmp_path / "nested_logit.keras")
    drop = keras.layers.Dropout(0.1)
    keras.Model(inp, {"prob": drop(keras.layers.Dense(1, activation="sigmoid")(feat)),
                      "logit": drop(keras.layers.Dense(1)(feat))}).save(tmp_path / "shared.keras")
    for name, output in (("nested_logit.keras", None), ("shared.keras", "logit")):
        with pytest.raises(ModelError, match=r"rayvid found no sigmoid at its end"):
            models.load(ModelConfig(name=str(tmp_path / name), output=output))
    assert models.load(ModelConfig(name=str(tmp_path / "shared.keras"), output="prob"))[1].num_classes == 2
    keras.Sequential([keras.layers.Dense(2)]).save(tmp_path / "no_input.keras")
    with pytest.raises(ModelError, match=r"does not say what input it takes \(a Sequential saved without keras.Input"):
        models.load(ModelConfig(name=str(tmp_path / "no_input.keras"), input_size=(4, 4)))
