"""Model loading from real files: .keras local and on S3, SavedModel, keras.applications
with a weights file at a URL, labels, and the clear errors when a model cannot load."""

from __future__ import annotations

import numpy as np
import pytest

from rayvid import models
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


def test_labels_must_match_the_model(shapes_model, tmp_path):
    bad = tmp_path / "labels.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ModelError, match="has 2 entries but the model outputs 6 classes"):
        models.load(ModelConfig(name=shapes_model["path"], labels=str(bad)))


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


def test_savedmodel_folder(tmp_path, shapes_model):
    import keras

    src = keras.saving.load_model(shapes_model["path"])
    export = str(tmp_path / "sm")
    src.export(export)
    model, info = models.load(ModelConfig(name=export))
    assert info.input_size == (64, 64) and info.num_classes == 6
    x = np.random.default_rng(2).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(model(x).numpy(), src(x).numpy(), rtol=1e-5, atol=1e-6)


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


def test_not_a_model_file(tmp_path):
    p = tmp_path / "model.keras"
    p.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot load model"):
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
