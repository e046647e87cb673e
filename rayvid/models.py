"""Load the tf.keras model a run uses, from a keras.applications name or any URL.

- keras.applications by name (`resnet50`, `mobilenet_v2`, `mobilenet_v3_small`,
  `efficientnet_b0`, ... see APPLICATIONS) with ImageNet weights through Keras' own cache
  (`$KERAS_HOME/models`, downloaded on first use where the network allows) or a weights
  file at any URL (`--weights`).
- a `.keras` (or legacy `.h5`) file at any URL, loaded with Keras' `safe_mode=True`: no
  arbitrary Python (Lambda layers) is deserialised. A presigned URL too: the extension and
  the local copy's name come from the URL's path, never from its query (a secret).
- a TensorFlow SavedModel directory at any URL. A SavedModel is code: load one only from a
  source you trust.

Labels: `--labels URL` (one per line), else ImageNet's for 1000-way models (shipped in the
package: Keras' `decode_predictions` would download them), else `<model>.labels.txt` beside
a model file (`labels.txt` inside a SavedModel), else `class_<i>`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
import zipfile
from dataclasses import dataclass
from importlib import resources as _res
from typing import Optional

from rayvid import storage
from rayvid.config import ModelConfig, is_code_file
from rayvid.errors import ModelError

log = logging.getLogger(__name__)

# name -> (keras.applications attribute, default input size, preprocessing mode)
APPLICATIONS: dict[str, tuple[str, int, str]] = {
    "resnet50": ("ResNet50", 224, "caffe"),
    "resnet101": ("ResNet101", 224, "caffe"),
    "resnet152": ("ResNet152", 224, "caffe"),
    "resnet50_v2": ("ResNet50V2", 224, "tf"),
    "mobilenet": ("MobileNet", 224, "tf"),
    "mobilenet_v2": ("MobileNetV2", 224, "tf"),
    "mobilenet_v3_small": ("MobileNetV3Small", 224, "raw"),
    "mobilenet_v3_large": ("MobileNetV3Large", 224, "raw"),
    "efficientnet_b0": ("EfficientNetB0", 224, "raw"),
    "efficientnet_b1": ("EfficientNetB1", 240, "raw"),
    "efficientnet_b2": ("EfficientNetB2", 260, "raw"),
    "efficientnet_b3": ("EfficientNetB3", 300, "raw"),
    "efficientnet_v2_b0": ("EfficientNetV2B0", 224, "raw"),
    "inception_v3": ("InceptionV3", 299, "tf"),
    "xception": ("Xception", 299, "tf"),
    "densenet121": ("DenseNet121", 224, "torch"),
    "convnext_tiny": ("ConvNeXtTiny", 224, "raw"),
}
MODEL_FILE_EXTENSIONS = (".keras", ".h5")


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model, described (from the inference actors, or a probe before the run)."""

    name: str  # as recorded in the output's `model` column
    input_size: tuple[int, int]  # (height, width)
    num_classes: int
    labels: tuple[str, ...]
    preprocess: str
    embedding_dim: int = 0  # with --embed: the width of the `embedding` column
    clip_len: int = 0  # video models (input [batch, N, H, W, 3]): N; -1 if not fixed; 0: images

    @property
    def shape(self) -> Shape:
        return Shape(self.input_size, self.clip_len)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["labels"] = f"{len(self.labels)} labels"
        return d


@dataclass(frozen=True)
class Shape:
    """What the decode stage needs of a model: the frame size and, for video models, the
    frames per clip (0: single frames; -1: any number)."""

    input_size: tuple[int, int]  # (height, width)
    clip_len: int = 0


def static_shape(cfg: ModelConfig) -> Optional[Shape]:
    """The model's input shape without TensorFlow, where the name or the file says it:
    keras.applications names and `.keras` files (their config.json, a few ranged reads on
    object stores). None where only loading the model can tell (SavedModels, `.h5`, inputs
    of unknown size). Raises ModelError for a model, weights or labels file that does not
    exist (here, in one line, not when the inference actors load it)."""
    # (weights are a keras.applications model's only: a model file's own are in it)
    weights = cfg.weights if cfg.name in APPLICATIONS and cfg.weights not in (None, "imagenet", "none") else None
    files = [("custom objects", spec) for spec in cfg.custom_objects if is_code_file(spec)]
    for what, url in (("weights", weights), ("labels", cfg.labels), *files):
        if url:
            _require_file(url, what)
    _check_output_named(cfg)
    if cfg.name in APPLICATIONS:
        size = APPLICATIONS[cfg.name][1]
        return Shape(tuple(cfg.input_size) if cfg.input_size else (size, size))
    fs, path, is_dir = _locate(cfg.name)
    if is_dir or not _url_path(path).lower().endswith(".keras"):
        return None
    try:
        with fs.open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            config = json.loads(archive.read("config.json"))
        shape = _input_shape(config)
        outputs = _config_outputs(config)
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, *storage.ACCESS_ERRORS):
        return None  # the loader says what is wrong with it
    custom = None if cfg.custom_objects else _custom_class(config)
    if custom:  # said here in one line, not by an inference actor after Ray's lines about its death
        kind, what, module = custom
        where = f"from {module}" if module else "defined in the script that saved it"
        raise ModelError(f"cannot load model {storage.public_uri(cfg.name)}: it uses the {kind} {what!r} ({where}), "
                         f"which is no Keras one: {CUSTOM_OBJECTS_HINT}")
    if outputs is not None:  # --model-output checked here, not first when an inference actor loads it
        _choose_output(outputs, cfg, cfg.name)
    if shape is None or len(shape) not in (4, 5):
        return None
    _check_channels(shape, cfg.name)
    clip_len = 0
    if len(shape) == 5:
        clip_len = shape[1] if shape[1] is not None else -1
        shape = [shape[0], *shape[2:]]
    h, w = _fixed_size(shape[1], shape[2], cfg)
    if h is None:
        return None
    return Shape((int(h), int(w)), int(clip_len))


CUSTOM_OBJECTS_HINT = "give the Python module or .py file that defines it with --custom-objects"
_KERAS_PACKAGES = {"keras", "keras_hub", "keras_cv", "keras_nlp", "builtins"}  # what Keras finds alone


def _custom_class(config) -> Optional[tuple]:
    """("class" or "function", its name, its module or None) of the first object in a saved
    model's config that Keras cannot find alone: one from a module outside Keras, or from a
    script's `__main__` (saved with module null). Custom functions from a module are saved
    as builtins: told only on loading. What the model was compiled with (a custom loss,
    metric, schedule) is not looked at: rayvid loads models uncompiled."""
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            module, name = node.get("module", ""), node.get("class_name")
            if isinstance(name, str) and (module is None or isinstance(module, str) and module
                                          and module.split(".", 1)[0] not in _KERAS_PACKAGES):
                if name == "function":
                    return "function", str(node.get("config")), module
                return "class", name, module
            stack.extend(reversed([v for k, v in node.items() if k != "compile_config"]))
        elif isinstance(node, list):
            stack.extend(reversed(node))
    return None


def _check_channels(shape, name: str) -> None:
    """ModelError unless the model takes RGB frames (its input's last axis 3, or open)."""
    if shape[-1] not in (3, None):
        first = " (channels first, as PyTorch orders them? rayvid feeds channels last)" if shape[-3] == 3 else ""
        raise ModelError(f"model {storage.public_uri(name)} takes {shape[-1]} channel(s) per pixel "
                         f"(input {tuple(shape)}){first}; rayvid feeds RGB frames (3): give it a model that takes "
                         f"[batch, H, W, 3] (e.g. one that converts RGB to what it needs as its first layer)")


def _fixed_size(h, w, cfg: ModelConfig) -> tuple:
    """The input size: the model's own where it fixes one (a different --input-size is an
    error: it was ignored), else --input-size, else (None, None)."""
    if h is not None and w is not None:
        if cfg.input_size and tuple(cfg.input_size) != (int(h), int(w)):
            raise ModelError(f"model {storage.public_uri(cfg.name)} takes {int(h)}x{int(w)} frames (H x W); "
                             f"--input-size {cfg.input_size[0]} {cfg.input_size[1]} differs: leave it out")
        return int(h), int(w)
    if cfg.input_size:
        return tuple(int(x) for x in cfg.input_size)
    return None, None


def _config_outputs(config: dict) -> Optional[list]:
    """A saved Keras model's outputs, each as the set of names `--model-output` may give it
    (as `_keras_outputs` names them once loaded), from its config; None where it does not
    say in a form known here (then the loader checks)."""
    body = config.get("config") or {}
    if config.get("class_name") == "Sequential":
        layers = body.get("layers") or []
        return [{layers[-1]["config"]["name"]}] if layers else None
    outs = body.get("output_layers")

    def leaf(o) -> bool:  # one output: [layer, node, tensor]
        return isinstance(o, list) and len(o) == 3 and isinstance(o[0], str)

    if isinstance(outs, dict) and all(leaf(o) for o in outs.values()):  # Keras flattens a dict by its sorted keys
        return [{key, outs[key][0]} for key in sorted(outs)]
    if leaf(outs):
        return [{outs[0]}]
    if isinstance(outs, list) and outs and all(leaf(o) for o in outs):
        return [{o[0]} for o in outs]
    return None  # nested outputs: the loader names them


def _input_shape(config: dict) -> Optional[list]:
    """A saved Keras model's one input shape (with its batch axis), from its config."""
    inputs = [layer["config"].get("batch_shape") for layer in config["config"].get("layers", [])
              if layer.get("class_name") == "InputLayer"]
    if len(inputs) == 1 and isinstance(inputs[0], list):
        return inputs[0]
    built = (config.get("build_config") or {}).get("input_shape")
    if not inputs and isinstance(built, list) and all(d is None or isinstance(d, int) for d in built):
        return built
    return None


def display_name(cfg: ModelConfig) -> str:
    if cfg.name in APPLICATIONS:
        return cfg.name
    return storage.public_uri(cfg.name)


def imagenet_labels() -> tuple[str, ...]:
    text = _res.files("rayvid").joinpath("data/imagenet_class_index.json").read_text()
    index = json.loads(text)
    return tuple(index[str(i)][1] for i in range(len(index)))


def load(cfg: ModelConfig, workdir: Optional[str] = None):
    """Build or load the Keras model. Returns (keras_model, ModelInfo).

    The model maps float32 RGB (after `preprocess`) at `input_size` to scores per class.
    """
    import keras  # heavy import: only where a model is loaded

    own_tmp = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="rayvid-model-")
    try:
        clip_len, folder = 0, False
        _check_output_named(cfg)
        if cfg.name in APPLICATIONS:
            with _policy(keras, "mixed_float16" if cfg.mixed_precision else None):
                model, size, preprocess = _application(keras, cfg, workdir)
            full = model
        else:
            model, size, preprocess, clip_len, dtype, full, folder = _model_file(keras, cfg, workdir)
            if cfg.preprocess not in ("auto", "raw") and not dtype.startswith(("float", "bfloat")):
                raise ModelError(f"{display_name(cfg)} takes {dtype} input (its own 0-255 pixels): --preprocess "
                                 f"{cfg.preprocess} would hand it fractions, cut to 0 or 1; use --preprocess raw "
                                 f"(the default for model files)")
        binary = cfg.head == "classify" and _sigmoid_unit(model)
        if cfg.head == "detect":
            num_classes = detection_classes(model.output_shape)
        else:
            num_classes = 2 if binary else classes_of(model.output_shape)
        labels = _labels(cfg, num_classes, binary, folder)
        if cfg.preprocess != "auto":
            preprocess = cfg.preprocess
            scaler = _scales_its_input(keras, model) if preprocess != "raw" else None
            if scaler:
                log.warning("%s scales its input itself (its first layers include %r) and --preprocess %s "
                            "scales the frames before that: twice, and its scores are likely wrong; "
                            "--preprocess raw feeds it 0-255 RGB", display_name(cfg), scaler, preprocess)
        dim = 0
        if cfg.embed:
            model, dim = with_embedding(keras, model, cfg.embed, source=full)
        if binary:
            model = _both_classes(keras, model)
        info = ModelInfo(display_name(cfg), size, num_classes, labels, preprocess, dim, clip_len)
        return model, info
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def _scales_its_input(keras, model) -> Optional[str]:
    """The name of a layer among the model's first (before any with weights; in a base
    model nested first, as transfer learning builds them) that takes 0-255 input to a
    small range: a Rescaling by at most 1/100, or a Normalization whose mean is above 2.
    None where there is none (a Rescaling(2, offset=-1) or a Normalization by ImageNet's
    0-1 mean expects 0-1 input: `--preprocess unit` is right for those)."""
    import numpy as np

    for layer in getattr(model, "layers", [])[:8]:
        if isinstance(layer, keras.Model):
            return _scales_its_input(keras, layer)
        try:
            if isinstance(layer, keras.layers.Rescaling):
                return layer.name if np.max(np.abs(np.asarray(layer.scale, np.float64))) <= 0.01 else None
            if isinstance(layer, keras.layers.Normalization):
                mean = np.asarray(keras.ops.convert_to_numpy(layer.mean), np.float64)
                return layer.name if mean.size and np.max(mean) > 2 else None
        except (AttributeError, TypeError, ValueError):  # (a layer not built, an odd scale: no word)
            return None
        if layer.weights:
            return None
    return None


@contextlib.contextmanager
def _policy(keras, name: Optional[str]):
    """Build layers under Keras' dtype policy `name` (None: as they are): each layer keeps
    the policy it was built with, so the process-global one is put back afterwards, and
    nothing else loaded in the process (a model file, the next test) is built under it.
    Only keras.applications are built here: model files run in the dtypes they were saved
    with (a `.keras` file's layers carry their policy; a SavedModel's graph is fixed)."""
    if name is None:
        yield
        return
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def _application(keras, cfg: ModelConfig, workdir: str):
    attr, default_size, preprocess = APPLICATIONS[cfg.name]
    size = tuple(cfg.input_size) if cfg.input_size else (default_size, default_size)
    weights = cfg.weights or "imagenet"
    ctor = getattr(keras.applications, attr)
    kwargs = dict(input_shape=(size[0], size[1], 3), classifier_activation=None)
    if weights == "none":
        weights_arg = None
    elif weights == "imagenet":
        weights_arg = "imagenet"
    else:
        weights_arg = _fetch(weights, workdir, "weights")
    try:
        model = ctor(weights=weights_arg, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot load this model"
        hint = ""
        if weights_arg == "imagenet" and "input_shape" not in str(e):  # (not about its size: a download)
            hint = (
                " ImageNet weights come from Keras' cache ($KERAS_HOME/models, default "
                "~/.keras/models) or are downloaded on first use; offline, pass the weights "
                "file with --weights PATH|URL."
            )
        raise ModelError(
            f"cannot build {cfg.name} with weights {storage.public_uri(weights)!r}: "
            f"{storage.redact(_first_line(e))}.{hint}"
        ) from None
    if attr.startswith("EfficientNetB") and weights_arg not in (None, "imagenet"):
        _as_imagenet_efficientnet(keras, model)
    # The classifier's softmax runs in float32 in our graph (numerically safe under mixed
    # precision); applications are built without it.
    softmax = keras.layers.Activation("softmax", dtype="float32", name="rayvid_softmax")
    model = keras.Model(model.inputs, softmax(model.outputs[0]), name=cfg.name)
    return model, size, preprocess


# ImageNet's per-channel standard deviations, as keras.applications.efficientnet has them
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def _as_imagenet_efficientnet(keras, model) -> None:
    """EfficientNet B0-B7 built with weights="imagenet" divide the stem's normalised input
    once more by sqrt(stddev) (a Rescaling layer Keras adds for those weights alone, after
    its Normalization layer: the original model normalised by the variance); built for a
    weights file, they lack it, and ImageNet weights (`--weights FILE`) saw inputs about
    2.1x too large. The same function: the Normalization layer's variance times stddev."""
    import numpy as np

    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    norm.adapt_variance.assign(np.asarray(norm.adapt_variance) * np.array(IMAGENET_STDDEV_RGB, dtype="float32"))
    norm.finalize_state()


def classes_of(shape) -> int:
    """Classification: the model's one output is [batch, classes], classes >= 2 (a one-unit
    output, a binary classifier's or a regression's, was every frame's label); returns classes. Other shapes (several outputs, a feature map, a
    convolutional head without its flatten) loaded and then failed the run at its first
    batch with a traceback."""
    if isinstance(shape, list) or len(shape) != 2 or not shape[-1]:
        several = isinstance(shape, list) and len(shape) > 1
        raise ModelError(f"a classifier's output must be one [batch, classes] tensor; this model outputs "
                         f"{'several: ' if several else ''}{shape}"
                         f"{' (name the one to use: --model-output NAME)' if several else ''}"
                         f"{' (--head detect takes a grid detector)' if not several and len(shape) == 4 else ''}")
    if shape[-1] == 1:  # its one class would be every frame's top-1, whatever its score
        raise ModelError(f"this model outputs one value per frame {shape}, not a score per class, and rayvid found "
                         f"no sigmoid at its end (a binary classifier's, which runs as two classes): a logit or a "
                         f"regression has no labels; if it is a binary classifier, save it with both classes "
                         f"(keras.layers.Concatenate()([1 - p, p]) and a two-line labels file)")
    return int(shape[-1])


_PASS_THROUGH = {"Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianDropout", "AlphaDropout",
                 "Identity", "Reshape", "Flatten", "ActivityRegularization"}  # (at inference: the value as it is)


def _sigmoid_unit(model) -> bool:
    """Whether a Keras model's one output is [batch, 1] from a sigmoid (a Dense's activation,
    an Activation layer, `keras.ops.sigmoid`; inside a nested model; before dropout or a
    reshape): a binary classifier's probability of its positive class. Walked back tensor
    by tensor, the output's own path (a layer shared between branches, or a nested model's
    other output, is not taken for it)."""
    try:
        shape = model.output_shape
    except (AttributeError, ValueError):
        return False
    if isinstance(shape, list) or len(shape) != 2 or shape[-1] != 1:
        return False
    return _ends_in_sigmoid(model)


def _ends_in_sigmoid(model, index: int = 0, depth: int = 0) -> bool:
    """Whether `model`'s output `index` comes from a sigmoid through layers that pass their
    one input on (`_PASS_THROUGH`)."""
    try:
        tensor = model.outputs[index]
    except (AttributeError, ValueError, IndexError, TypeError):  # a Sequential that tells no tensors: its layers
        for layer in reversed(getattr(model, "layers", None) or []):
            if getattr(layer, "layers", None) is not None:
                return depth < 8 and _ends_in_sigmoid(layer, 0, depth + 1)
            if _is_sigmoid(layer):
                return True
            if type(layer).__name__ not in _PASS_THROUGH:
                return False
        return False
    for _ in range(64):
        made = _call_of(tensor)
        if made is None:
            return False
        op, tensor_index, inputs = made
        if getattr(op, "layers", None) is not None and hasattr(op, "outputs"):  # a nested model: that output of it
            return depth < 8 and _ends_in_sigmoid(op, tensor_index, depth + 1)
        if _is_sigmoid(op):
            return True
        if type(op).__name__ not in _PASS_THROUGH or len(inputs) != 1:
            return False
        tensor = inputs[0]
    return False


def _call_of(tensor) -> Optional[tuple]:
    """(the layer or op that made a Keras tensor, which of its outputs the tensor is, its
    inputs in that call: not in the layer's first call, where it is shared); None for a
    model's input."""
    history = getattr(tensor, "_keras_history", None)
    if history is None or type(history[0]).__name__ == "InputLayer":
        return None
    op, node_index, tensor_index = history
    try:
        inputs = list(op._inbound_nodes[node_index].input_tensors)
    except (AttributeError, IndexError):
        inputs = []
    return op, tensor_index, inputs


def _is_sigmoid(op) -> bool:
    return getattr(getattr(op, "activation", None), "__name__", "") == "sigmoid" or type(op).__name__ == "Sigmoid"


def _both_classes(keras, model):
    """The model with its sigmoid unit p as two classes' scores, [1 - p, p] (its other
    outputs, an embedding's, as they are)."""
    try:
        inputs, outputs = model.inputs, list(model.outputs)
    except (AttributeError, ValueError):
        inputs = keras.Input(batch_shape=model.input_shape)
        outputs = [model(inputs)]
    p = outputs[0]
    outputs[0] = keras.layers.Concatenate(name="rayvid_binary_classes")([keras.ops.subtract(1.0, p), p])
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)


def detection_classes(shape) -> int:
    """Detection: a grid detector's output is [batch, S, S, 5 + C]: per cell an objectness
    logit, the box centre within the cell (tx, ty, through a sigmoid), its width and height
    as fractions of the image (tw, th, through a sigmoid), and C class logits (`infer.
    decode_grid` turns it into boxes). Returns C."""
    if isinstance(shape, list) or len(shape) != 4 or shape[1] != shape[2] or (shape[-1] or 0) <= 5:
        raise ModelError(f"--head detect needs a grid detector with output [batch, S, S, 5 + classes]; "
                         f"this model outputs {shape}")
    return int(shape[-1]) - 5


SAVEDMODEL_FRAME_BY_FRAME = "rayvid_savedmodel_frame_by_frame"  # the layer that holds a batch-1 SavedModel


def _check_output_named(cfg: ModelConfig) -> None:
    if cfg.name in APPLICATIONS and cfg.output is not None:
        raise ModelError(f"--model-output {cfg.output}: {cfg.name} has one output (it names an output of a "
                         f"model file with several)")


def with_embedding(keras, model, layer: str = "auto", source=None):
    """(a model with two outputs, [scores, embedding], and the embedding's width).
    `source`: the model `model` was cut from (its other outputs' layers too, for LAYER).
    `auto`: the input of the classifier, found by walking back from the output past
    layers without weights (softmax, flatten, dropout) to the first layer with weights;
    else the output of the layer of that name. Outputs of rank > 2 (feature maps) are
    averaged over their spatial axes. A SavedModel has none to take: its layers are out of
    Keras' reach (one TFSMLayer), so walking back would find the image itself."""
    if any(isinstance(lay, keras.layers.TFSMLayer) or lay.name == SAVEDMODEL_FRAME_BY_FRAME for lay in model.layers):
        raise ModelError("--embed needs a Keras model (a .keras or .h5 file, or a keras.applications name): "
                         "a SavedModel's layers cannot be reached; save the model as .keras")
    if layer == "auto":
        op, tensor = _classifier_input(model)
        if isinstance(tensor, (list, tuple)):
            raise ModelError(f"--embed: the classifier {op.name!r} has several inputs; name a layer: --embed LAYER")
        if any(tensor is inp for inp in model.inputs):
            raise ModelError(f"--embed: the classifier {op.name!r} takes the image itself; "
                             "name a layer: --embed LAYER")
    else:
        source = model if source is None else source  # (any branch's layer: --model-output cut the others)
        try:
            tensor = source.get_layer(layer).output
        except ValueError:
            names = ", ".join(lay.name for lay in source.layers[-8:])
            raise ModelError(f"--embed: no layer named {layer!r} (the last layers: {names})") from None
    if len(tensor.shape) > 2:
        tensor = keras.ops.mean(tensor, axis=tuple(range(1, len(tensor.shape) - 1)))
    dim = tensor.shape[-1]
    if dim is None:
        raise ModelError("--embed: the embedding's width is not fixed")
    return keras.Model(model.inputs, [model.outputs[0], tensor], name=model.name), int(dim)


def _classifier_input(model) -> tuple:
    """(the classifier layer, its input on the output's path): walked back from the model's
    first output, tensor by tensor, past layers without weights (softmax, flatten, dropout)
    to the first layer with weights (a nested head is one: its input is taken). A model that
    tells no output tensors (a Sequential without an Input) is walked by its layers."""
    try:
        tensor = model.outputs[0]
    except (AttributeError, ValueError, IndexError, TypeError):
        tensor = None
    if getattr(tensor, "_keras_history", None) is None:
        op = model.layers[-1]
        while not op.weights:
            inbound = _producer(op.input)
            if inbound is None:
                raise ModelError("--embed: found no classifier layer (a layer with weights) to take the input of")
            op = inbound
        return op, op.input
    while True:
        made = _call_of(tensor)
        if made is None:
            raise ModelError("--embed: found no classifier layer (a layer with weights) to take the input of")
        op, _, inputs = made
        if getattr(op, "weights", None):  # (a keras.ops operation has none)
            return op, inputs[0] if len(inputs) == 1 else inputs
        if len(inputs) != 1:
            raise ModelError(f"--embed: the layer {op.name!r} before the classifier has several inputs; name a layer: "
                             f"--embed LAYER")
        tensor = inputs[0]


def _producer(tensor):
    """The layer that produced a Keras tensor (None for the model's input)."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    op = history[0]
    return None if op.__class__.__name__ == "InputLayer" else op


_IMPORTED: dict = {}  # --custom-objects entry -> its module: run once per process, as an import is
# where Keras looks a function saved by its bare name up (an .h5 file's `relu`)
_KERAS_FUNCTIONS = ("activations", "losses", "metrics", "initializers", "regularizers", "constraints")


def custom_objects(cfg: ModelConfig, workdir: str, h5: bool = False) -> dict:
    """What each `--custom-objects` module hands Keras, by name (what Keras looks a saved
    object up by where it was not registered): the names its `__all__` lists, else its
    public classes and functions that it or its own package's modules define. Importing
    them runs their `register_keras_serializable` decorators too. For an `.h5` file (`h5`),
    which names built-in and custom functions alike by their bare names and takes a custom
    one first, a function named as one of Keras' (a helper `relu`) is left out unless
    `__all__` lists it (then a warning says so). Two modules defining one name: the later
    one's is handed, unless only the earlier one's `__all__` lists it."""
    import keras

    found: dict = {}
    listed_names: set = set()  # of `found`, those an `__all__` named (handed even if Keras has the name)
    for spec in cfg.custom_objects:
        module = _IMPORTED.get(spec) or _import_custom(spec, workdir)
        _IMPORTED[spec] = module
        listed = getattr(module, "__all__", None)
        for name, obj in vars(module).items():
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            own = str(getattr(obj, "__module__", None) or "")
            if listed is not None:
                if name in listed:
                    found[name] = obj
                    listed_names.add(name)
            elif (name not in listed_names and not name.startswith("_")
                  and (own == module.__name__ or own.startswith(module.__name__ + "."))):
                found[name] = obj  # (a later module's wins, but never over one an __all__ named)
    shadowing = sorted(n for n, obj in found.items() if h5 and inspect.isfunction(obj) and _keras_function(keras, n))
    kept = [n for n in shadowing if n in listed_names]
    for name in set(shadowing) - set(kept):
        del found[name]
    if kept:
        log.warning("%s: --custom-objects hands Keras its own %s (listed in __all__), which this .h5 file's layers use "
                    "wherever they name Keras' function of that name", display_name(cfg), ", ".join(kept))
    return found


def _keras_function(keras, name: str) -> bool:
    """Whether Keras has a function of that name where an `.h5` file's bare names are
    looked up (`get`, `serialize`, `deserialize` are every namespace's helpers, not saved)."""
    return name not in ("get", "serialize", "deserialize") and any(
        hasattr(getattr(keras, space), name) for space in _KERAS_FUNCTIONS)


def _import_custom(spec: str, workdir: str):
    """Import one `--custom-objects` entry: a .py file (any URL: fetched, then run as a module
    of its own) or a module name (as Python finds it, then in the current folder: Ray's
    workers have the driver's on their path, a command line's own process not)."""
    shown = storage.public_uri(spec)
    try:
        if is_code_file(spec):
            local = _fetch(spec, workdir, "custom objects")
            stem = re.sub(r"\W", "_", os.path.basename(local)[: -len(".py")] if local.endswith(".py") else "module")
            name = f"rayvid_custom_{stem}_{hashlib.sha1(spec.encode()).hexdigest()[:8]}"
            loader = importlib.machinery.SourceFileLoader(name, local)  # (whatever the file's name ends in)
            found = importlib.util.spec_from_loader(name, loader)
            module = importlib.util.module_from_spec(found)
            sys.modules[name] = module  # (what dataclasses and pickling look a class's module up in)
            try:
                found.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            return module
        try:
            return importlib.import_module(spec)
        except ModuleNotFoundError as e:
            if os.getcwd() in sys.path or not (e.name and (spec == e.name or spec.startswith(e.name + "."))):
                raise
            sys.path.append(os.getcwd())
            return importlib.import_module(spec)
    except ModelError:
        raise
    except ModuleNotFoundError as e:
        if not is_code_file(spec) and e.name and (spec == e.name or spec.startswith(e.name + ".")):
            raise ModelError(f"cannot import --custom-objects {shown}: {e} (a module must be importable wherever the "
                             f"model loads: installed on every node, in the current folder, or shipped with `ray job "
                             f"submit --working-dir`; or give its .py file)") from None
        raise ModelError(f"cannot import --custom-objects {shown}: it imports {e.name!r}, which is not installed "
                         f"where the model loads") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code: whatever it raises is said in one line
        raise ModelError(f"cannot import --custom-objects {shown}: {type(e).__name__}: "
                         f"{storage.redact(_first_line(e))}") from None


def _require_file(url: str, what: str) -> None:
    """ModelError unless `url` is a file that can be read (its metadata, one request)."""
    fs, path = storage.resolve(url)
    try:
        info = fs.info(path)
    except FileNotFoundError as e:
        if storage.is_unavailable(e):
            raise ModelError(f"cannot reach {what} {storage.public_uri(url)}: {storage.describe(e)}") from None
        if not storage.absent(e):  # an HTTP server's error status other than 404 (a refusal, a 500)
            raise ModelError(f"cannot read {what} {storage.public_uri(url)}: {storage.describe(e)}") from None
        raise ModelError(f"{what} file not found: {storage.public_uri(url)}") from None
    except storage.ACCESS_ERRORS as e:
        raise ModelError(f"cannot read {what} {storage.public_uri(url)}: {storage.describe(e)}") from None
    if info.get("type") == "directory":
        raise ModelError(f"{what} {storage.public_uri(url)} is a folder, not a file")


def _locate(url: str):
    """(filesystem, path, is a folder) of a model URL; ModelError if there is nothing there."""
    fs, path = storage.resolve(url)
    try:
        is_dir = _isdir(fs, path)
        exists = is_dir or _exists(fs, path)
    except storage.ACCESS_ERRORS as e:
        raise ModelError(f"cannot {'reach' if storage.is_unavailable(e) else 'read'} model "
                         f"{storage.public_uri(url)}: {storage.describe(e)}") from None
    if not exists:
        known = ", ".join(sorted(APPLICATIONS))
        raise ModelError(
            f"model not found: {storage.public_uri(url)} (neither a file, a SavedModel folder, "
            f"nor a keras.applications name: {known})"
        )
    return fs, path, is_dir


def _model_file(keras, cfg: ModelConfig, workdir: str):
    """(model, size, preprocess, clip_len, input dtype, the model before --model-output's
    choice, whether it is a SavedModel folder) of a model file or folder."""
    url = cfg.name
    fs, path, is_dir = _locate(url)
    if is_dir:
        local = _fetch(url, workdir, "model")
        if not os.path.exists(os.path.join(local, "saved_model.pb")):
            raise ModelError(f"{storage.public_uri(url)} is a folder but not a SavedModel (no saved_model.pb)")
        try:
            # float32, whatever the global policy: the signature takes what it was saved with
            layer = keras.layers.TFSMLayer(local, call_endpoint="serving_default", dtype="float32")
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot load SavedModel {storage.public_uri(url)}: {storage.redact(_first_line(e))}") from None
        loaded = getattr(layer, "_reloaded_obj", None)  # (what TFSMLayer loaded: not read a second time)
        if loaded is None:
            import tensorflow as tf

            loaded = tf.saved_model.load(local)
        size, dtype, batch, clip_len, outputs = _savedmodel_input(loaded.signatures["serving_default"], cfg)
        if dtype != "float32":  # (Keras cast the float16 frames given to a float32 layer back to float32)
            layer.autocast = False
        if cfg.output is not None and cfg.output not in outputs:
            raise ModelError(f"SavedModel {storage.public_uri(url)} has no output {cfg.output!r} (--model-output): its "
                             f"serving signature's outputs are {', '.join(sorted(outputs))}")
        if len(outputs) > 1 and cfg.output is None:  # (the first by name was taken: an embedding scored as classes)
            raise ModelError(f"SavedModel {storage.public_uri(url)}: its serving signature has {len(outputs)} outputs "
                             f"({', '.join(sorted(outputs))}); rayvid uses one, [batch, classes]: name it with "
                             f"--model-output NAME")
        key = cfg.output if cfg.output is not None else next(iter(outputs))
        frames = (clip_len,) if clip_len > 0 else ()
        inp = keras.Input(shape=(*frames, size[0], size[1], 3), dtype="float32")

        def call(x):  # a signature taking uint8 is given uint8 (the frames' own values)
            y = layer(keras.ops.cast(x, dtype) if dtype != "float32" else x)
            return y[key] if isinstance(y, dict) else y

        try:
            if batch == 1:  # a signature that fixes batches of one frame: one at a time, in the graph
                import tensorflow as tf

                spec = outputs[key]
                out = keras.layers.Lambda(
                    lambda x: tf.map_fn(lambda f: call(f[None])[0], x, fn_output_signature=spec.dtype),
                    output_shape=tuple(spec.shape[1:]), name=SAVEDMODEL_FRAME_BY_FRAME)(inp)
            elif batch is not None:
                raise ModelError(f"SavedModel {storage.public_uri(url)}: its serving signature takes batches of "
                                 f"exactly {batch}: export it with a free batch axis (None), or with 1")
            else:
                out = call(inp)
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001
            shown = ", ".join(str(d) for d in inp.shape[1:])
            raise ModelError(f"cannot run SavedModel {storage.public_uri(url)} on [batch, {shown}] "
                             f"{dtype}: {storage.redact(_first_line(e))}") from None
        model = keras.Model(inp, out)
        return model, size, "raw", clip_len, dtype, model, True
    if not _url_path(path).lower().endswith(MODEL_FILE_EXTENSIONS):
        raise ModelError(
            f"unsupported model file {storage.public_uri(url)}: expected .keras, .h5 or a "
            "SavedModel folder"
        )
    local = _fetch(url, workdir, "model")
    if local.lower().endswith(".keras") and not zipfile.is_zipfile(local):  # Keras says "File not found"
        raise ModelError(f"cannot load model {storage.public_uri(url)}: not a .keras file (a .keras file is a zip "
                         f"archive; this one is not: damaged, or another format under that name)")
    custom = custom_objects(cfg, workdir, h5=not local.lower().endswith(".keras"))
    try:
        model = keras.saving.load_model(local, compile=False, safe_mode=True, custom_objects=custom or None)
    except Exception as e:  # noqa: BLE001
        missing = (re.search(r"Could not locate (class|function) '([^']+)'", str(e))  # (.keras)
                   or re.search(r"Unknown (layer|activation|loss|metric|initializer|regularizer|constraint|optimizer)"
                                r": '([^']+)'", str(e)))  # (.h5)
        if missing:  # (Keras' first line says only that the model "could not be deserialized properly")
            given = f" (not in --custom-objects {', '.join(map(storage.public_uri, cfg.custom_objects))})" \
                if cfg.custom_objects else ""
            raise ModelError(f"cannot load model {storage.public_uri(url)}: it uses the {missing.group(1)} "
                             f"{missing.group(2)!r}, which is no Keras one{given}: {CUSTOM_OBJECTS_HINT}") from None
        raise ModelError(f"cannot load model {storage.public_uri(url)}: {storage.redact(_first_line(e))}") from None
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):  # a Sequential saved without an Input, a subclassed Model
        raise ModelError(f"model {storage.public_uri(url)} does not say what input it takes (a Sequential saved "
                         f"without keras.Input, or a subclassed Model): save it as a functional model or a Sequential "
                         f"that starts with keras.Input(shape=(H, W, 3))") from None
    if isinstance(shape, list):
        raise ModelError(f"model {storage.public_uri(url)} has several inputs; rayvid feeds one image")
    if len(shape) in (4, 5):
        _check_channels(shape, url)
    full, model = model, _pick_output(keras, model, cfg, url)
    clip_len = 0
    if len(shape) == 5:  # a video model: [batch, N frames, H, W, 3]
        clip_len = shape[1] if shape[1] is not None else -1
        shape = (shape[0], *shape[2:])
    h, w = _fixed_size(shape[1], shape[2], cfg)
    if h is None:
        raise ModelError(f"model {storage.public_uri(url)} does not fix its input size: pass --input-size H W")
    dtype = getattr(model.inputs[0], "dtype", "float32")
    return model, (int(h), int(w)), "raw", int(clip_len), str(getattr(dtype, "name", dtype)), full, False


def _keras_outputs(model) -> list:
    """[(names, tensor)] of a Keras model's outputs: each named by the layer that makes it,
    and by its key where the model outputs a dict. A loaded Sequential tells no output
    tensors: its one output, by its last layer's name, and None."""
    try:
        tensors = list(model.outputs)
    except (AttributeError, ValueError):
        return [({model.layers[-1].name}, None)] if getattr(model, "layers", None) else []
    try:
        out = model.output
    except (AttributeError, ValueError):
        out = None
    keys = {id(t): k for k, t in out.items()} if isinstance(out, dict) else {}
    named = []
    for t in tensors:
        op = (getattr(t, "_keras_history", None) or [None])[0]
        named.append(({n for n in (getattr(op, "name", None), keys.get(id(t))) if n}, t))
    return named


def _choose_output(outputs: list, cfg: ModelConfig, url: str) -> int:
    """Which of a Keras model's outputs (each a set of names) rayvid runs: `--model-output
    NAME`'s (a name that fits no output, or several, is a ModelError naming them), else its
    only one (0)."""
    shown = "; ".join("/".join(sorted(names)) for names in outputs)
    if cfg.output is None:
        if len(outputs) > 1:
            raise ModelError(f"model {storage.public_uri(url)} has {len(outputs)} outputs ({shown}); rayvid uses one: "
                             f"name it with --model-output NAME")
        return 0
    matches = [i for i, names in enumerate(outputs) if cfg.output in names]
    if len(matches) != 1:
        raise ModelError(f"model {storage.public_uri(url)} has {'no' if not matches else len(matches)} outputs named "
                         f"{cfg.output!r} (--model-output): its outputs are {shown or 'unnamed'}")
    return matches[0]


def _pick_output(keras, model, cfg: ModelConfig, url: str):
    """The model with the one output rayvid runs (`_choose_output`)."""
    outputs = _keras_outputs(model)
    chosen = _choose_output([names for names, _ in outputs], cfg, url)
    if cfg.output is None or len(outputs) == 1:  # (one output, named or not)
        if isinstance(getattr(model, "output", None), dict):
            return keras.Model(model.inputs, model.outputs[0], name=model.name)  # {"probs": x}: x
        return model
    tensor = outputs[chosen][1]
    return model if tensor is None else keras.Model(model.inputs, tensor, name=model.name)


def _savedmodel_input(sig, cfg: ModelConfig) -> tuple:
    """((height, width), dtype, batch, clip_len, outputs) of a SavedModel's serving
    signature `sig`: its own frame size where it fixes one (else --input-size), after checking it
    takes RGB; the batch size it fixes (None: any); N for a video model's [batch, N, H, W,
    3] input (-1 where N is open: not supported, ModelError), else 0; its outputs' specs
    by name."""
    spec = list(sig.structured_input_signature[1].values())[0]
    shape = list(spec.shape)
    if len(shape) not in (4, 5):
        raise ModelError(f"SavedModel {storage.public_uri(cfg.name)} takes input of shape {tuple(shape)}; rayvid "
                         f"feeds [batch, H, W, 3] frames or [batch, N, H, W, 3] clips")
    _check_channels(shape, cfg.name)
    clip_len = 0
    if len(shape) == 5:
        if shape[1] is None:
            raise ModelError(f"SavedModel {storage.public_uri(cfg.name)} takes clips of any length: export it "
                             f"with a fixed N, or save it as .keras (then --clip-len N)")
        clip_len = int(shape[1])
        shape = [shape[0], *shape[2:]]
    h, w = _fixed_size(shape[1], shape[2], cfg)
    if h is None:
        raise ModelError("the SavedModel does not fix its input size: pass --input-size H W")
    outputs = sig.structured_outputs if isinstance(sig.structured_outputs, dict) else {"output": sig.structured_outputs}
    # frames are cast to what it takes (float32 frames for one taking float16 or int32 failed)
    if not (spec.dtype.is_floating or spec.dtype.is_integer and spec.dtype.max >= 255):
        raise ModelError(f"SavedModel {storage.public_uri(cfg.name)} takes {spec.dtype.name} input, which cannot "
                         f"hold frames (0..255 RGB): export it taking uint8 or float32")
    dtype = spec.dtype.name
    return (int(h), int(w)), dtype, shape[0], clip_len, dict(outputs)


def _labels(cfg: ModelConfig, num_classes: int, binary: bool = False, folder: bool = False) -> tuple[str, ...]:
    """The classes' labels (a labels file's, ImageNet's, else class_<i>); `folder`: the
    model is a SavedModel folder (its labels.txt inside it). A binary
    classifier's (one sigmoid unit, run as [1 - p, p]) file may name its positive class
    alone: its other class is then "not <label>"."""
    labels: Optional[tuple[str, ...]] = None
    source = ""
    if cfg.labels:
        source = cfg.labels
        try:
            labels = _read_labels(cfg.labels)
        except storage.ACCESS_ERRORS as e:
            raise ModelError(f"cannot read labels {storage.public_uri(source)}: {storage.describe(e)}") from None
    elif cfg.name not in APPLICATIONS:  # a model file's own labels, then (1000 classes) ImageNet's
        base = _without_query(cfg.name).rstrip("/")
        # a SavedModel folder's own labels.txt, else `<folder>.labels.txt` beside it (its
        # name's dots are no extension: `sm.v2` took `sm.labels.txt`, another model's, over
        # its own); a file's `<model>.labels.txt` beside it
        candidates = ([base + "/labels.txt", base + ".labels.txt"] if folder else
                      [os.path.splitext(base)[0] + ".labels.txt"])
        for cand in candidates:
            try:
                labels = _read_labels(cand)
                source = cand
                break
            except (*storage.ACCESS_ERRORS, ValueError):
                continue
    if labels is None and num_classes == 1000:
        labels = imagenet_labels()
        if cfg.name not in APPLICATIONS:  # (documented; a model trained on 1000 other classes gets them too)
            log.warning("%s outputs 1000 classes and has no labels file beside it: its labels are ImageNet's "
                        "(give --labels if they are not)", display_name(cfg))
    if labels is None:
        return tuple(f"class_{i}" for i in range(num_classes))
    if binary and len(labels) == 1:
        labels = (f"not {labels[0]}", labels[0])
    if len(labels) != num_classes:
        raise ModelError(
            f"labels {storage.public_uri(source) or 'file'} has {len(labels)} entries but the model outputs "
            f"{num_classes} classes" + (" (a binary classifier: its positive class alone, or both)" if binary else "")
        )
    twice = sorted(x for x, n in collections.Counter(labels).items() if n > 1)
    if twice:  # (their classes' rows cannot be told apart by label; `topk` keeps class_id)
        log.warning("labels %s name %d label(s) more than once (%s): those classes share a label",
                    storage.public_uri(source) or "file", len(twice), ", ".join(repr(x) for x in twice[:5]))
    return labels


def _read_labels(url: str) -> tuple[str, ...]:
    """A labels file's non-blank lines, stripped; UTF-8, its byte-order mark dropped (an
    editor's: it was kept in the first label, which then matched no `find`). A line ends
    at LF, CRLF or CR."""
    data = storage.read_bytes(url)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ModelError(f"labels {storage.public_uri(url)} is not UTF-8 text (byte {e.start}: "
                         f"{data[e.start:e.start + 1]!r}): save it as UTF-8") from None
    # (lines end at "\n", "\r\n" or "\r" only: `splitlines` also cut a label at U+0085 or U+2028)
    return tuple(line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                 if line.strip())


def _fetch(url: str, workdir: str, what: str) -> str:
    """A local path for a model/weights URL (remote files and folders are copied)."""
    fs, path = storage.resolve(url)
    if storage.is_local(fs):
        if not os.path.exists(path):
            raise ModelError(f"{what} not found: {path}")
        return path
    dest = os.path.join(workdir, what + "-" + os.path.basename(_url_path(path).rstrip("/")))
    try:
        if _isdir(fs, path):
            # file by file, as listed (fsspec's HTTP `get` of a folder opened the folder's
            # own name as a file to write: "Is a directory")
            if "://" in path and urllib.parse.urlsplit(path).query:  # (each file would need its own)
                raise ModelError(f"a SavedModel folder URL with a query ({storage.public_uri(url)}) cannot be "
                                 f"copied file by file: serve the folder without one, or give a .keras file")
            root = path.rstrip("/") + "/"
            unschemed = lambda u: u.split("://", 1)[-1]  # noqa: E731
            for name in fs.find(root):
                # (a server's listing may link its files by http where the folder is https, and
                # has links that are no files: Apache's sort orders, `?C=N;O=D`)
                at = unschemed(name)
                rel = at[len(unschemed(root)):] if at.startswith(unschemed(root)) else None
                local = urllib.parse.unquote(rel) if "://" in name else rel  # (a URL's name: %20 a space)
                if (not rel or "://" in name and ("?" in rel or "#" in rel) or local.startswith("/")
                        or ".." in local.split("/")):
                    continue  # (no file, or a link out of the folder)
                os.makedirs(os.path.dirname(os.path.join(dest, local)), exist_ok=True)
                fs.get_file(root + rel, os.path.join(dest, local))  # (by the folder's own scheme)
            if not os.path.isdir(dest):
                raise FileNotFoundError(path)
        else:
            fs.get_file(path, dest)
    except FileNotFoundError:
        raise ModelError(f"{what} not found: {storage.public_uri(url)}") from None
    except storage.ACCESS_ERRORS as e:
        raise ModelError(f"cannot fetch {what} {storage.public_uri(url)}: {storage.describe(e)}") from None
    return dest


def _exists(fs, path: str) -> bool:
    """By the object's metadata (a HEAD request): fsspec's HTTP `exists` GETs the URL, and
    a server sends the whole file to it."""
    try:
        fs.info(path)
    except FileNotFoundError as e:
        if not storage.absent(e):  # (fsspec's HTTP: a 403 or a 500 is "not found" there too)
            raise
        return False
    return True


def _isdir(fs, path: str) -> bool:
    """Whether a model URL is a folder (a SavedModel). Over HTTP(S) only a URL ending in "/"
    is asked: fsspec answers isdir by GETting the URL and reading links out of its body,
    all of it when the server sends no Content-Type (a model file read whole, once more)."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"http", "https"} and not _url_path(path).endswith("/"):
        return False
    return fs.isdir(path)


def _url_path(path: str) -> str:
    """The name part of a path as `storage.resolve` gives it: an HTTP(S) URL's path, without
    its query (a presigned URL's signature: a secret, never part of an extension or of a
    file name); other filesystems' paths as they are."""
    return urllib.parse.urlsplit(path).path if "://" in path else path


def _without_query(url: str) -> str:
    """An HTTP(S) URL without its query and fragment (a file beside a presigned model is
    not signed by the model's signature); other URLs as they are ("?" may be in a key)."""
    if not url.lower().startswith(("http://", "https://")):
        return url
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(query="", fragment=""))


def _first_line(e: BaseException) -> str:
    """An exception's first line, without terminal colours; with Keras' reason where its
    first line is generic (a class it could not find: a custom layer)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    if not text:
        return type(e).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line[line.index("Could not locate"):] for line in lines[1:] if "Could not locate" in line), None)
    return lines[0] + (f" ({reason})" if reason else "")


def probe(cfg: ModelConfig) -> ModelInfo:
    """Load the model once and describe it (run as a Ray task, so the driver stays light)."""
    hide_unassigned_gpus()
    _, info = load(cfg)
    return info


def hide_unassigned_gpus() -> bool:
    """In a Ray worker that holds no GPU, keep TensorFlow off the node's GPUs: Ray 2.60 no
    longer sets CUDA_VISIBLE_DEVICES="" for a worker holding none (ray#54868), so a CPU
    inference actor (or the model's probe) on a GPU node ran on GPU 0, which Ray had given
    to another actor, and made a CUDA context on every GPU there. Before TensorFlow is
    imported (where it is already, nothing: it may use its GPUs). True where hidden."""
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return False
        if ray.get_gpu_ids():
            return False
    except Exception:  # noqa: BLE001 - information only: outside Ray, an older Ray
        return False
    if "tensorflow" in sys.modules:
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return True
