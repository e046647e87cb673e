"""One typed, frozen configuration for a run, built from CLI flags or one YAML file.

Both go through the same checks (types, choices, ranges: a ConfigError naming the setting
and its value). The resolved config is what `runs/<run_id>.json` records, so a run can be
repeated from its record alone: `rayvid run --config runs/<run_id>.json`. Resolved: every
setting with its default filled in and local paths made absolute (INPUT, OUTPUT, a model,
weights or labels file), so the record reads the same files from any working directory.
Some defaults depend on the cluster or the model and stay null (None) in the config, to be
decided again where the record is repeated: the inference batch size, GPUs per actor and
both pool sizes (the record's `plan` says what the run used), and the model's input size,
labels and preprocessing (its `model`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import re
import secrets
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from rayvid.errors import ConfigError

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")  # else a local path (as storage.resolve reads it)

PREPROCESS = ("auto", "raw", "unit", "tf", "caffe", "torch")
HEADS = ("classify", "detect")
DECODERS = ("auto", "decord", "pyav")
SAMPLING_MODES = ("every", "fps", "keyframes")  # exclusive: one sampling mode per run


@dataclass(frozen=True)
class ModelConfig:
    # keras.applications name (resnet50, mobilenet_v2, ...) or a URL/path of a .keras file
    # or SavedModel directory.
    name: str = "mobilenet_v3_small"
    # For keras.applications: "imagenet" (Keras' cache/download), a path or URL of a weights
    # file, or "none" for random init (tests only). Refused with a model file (.keras,
    # SavedModel, .h5): it holds its own.
    weights: Optional[str] = None
    # Labels file (one label per line, line i = class i). Default: ImageNet for 1000-way
    # models, "<model>.labels.txt" beside a model file, else "class_<i>".
    labels: Optional[str] = None
    # How uint8 RGB is turned into model input, inside the graph: "auto" (what the
    # keras.applications model expects; "raw" for model files), "raw" (float 0..255),
    # "unit" (0..1), "tf" (-1..1), "caffe" (BGR, ImageNet mean subtracted), "torch".
    preprocess: str = "auto"
    # Input size (height, width) when the model does not fix it.
    input_size: Optional[tuple[int, int]] = None
    topk: int = 5
    mixed_precision: bool = False
    xla: bool = False
    # Per-frame embeddings (`--embed [LAYER]`): "auto" is the input of the classifier (the
    # layer before it), else a layer name; outputs of rank > 2 are average-pooled.
    embed: Optional[str] = None
    embed_normalize: bool = False  # L2-normalise embeddings (cosine = dot product)
    # "classify" (scores per class) or "detect": a grid detector (models.py, "Detection"),
    # whose boxes are decoded and pruned by tf.image.combined_non_max_suppression inside
    # the inference graph.
    head: str = "classify"
    # Which output of a model with several (`--model-output NAME`): a SavedModel signature's
    # output key, or a Keras model's output layer name (or its key, where it outputs a dict).
    output: Optional[str] = None
    max_boxes: int = 20  # detections kept per frame
    iou_threshold: float = 0.5  # NMS: boxes of a class overlapping more are suppressed
    min_box_score: float = 0.3  # NMS: boxes scoring less are dropped
    # `--custom-objects`: Python modules (`pkg.layers`, importable where the model loads) or
    # `.py` files (any URL) defining the custom layers, losses or functions a model file
    # names; each is imported before the model loads, its classes and functions handed to
    # Keras by name (as are those it registers with `register_keras_serializable`).
    custom_objects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_types(self, "config.model")
        if not self.name:
            raise ConfigError("--model must name a model")
        if self.preprocess not in PREPROCESS:
            raise ConfigError(f"--preprocess must be one of {', '.join(PREPROCESS)}, got {self.preprocess!r}")
        if self.input_size is not None and min(self.input_size) < 1:
            raise ConfigError(f"--input-size must be two sizes >= 1 (H W), got {list(self.input_size)}")
        if self.output is not None and not self.output:
            raise ConfigError("--model-output must name an output of the model")
        if self.weights == "":  # (it read as no --weights: ImageNet's, unsaid)
            raise ConfigError("--weights needs a value: imagenet, none, or a weights file's path or URL")
        if self.labels == "":
            raise ConfigError("--labels needs a labels file's path or URL")
        if self.head not in HEADS:
            raise ConfigError(f"--head must be classify or detect, got {self.head!r}")
        if self.embed == "":
            raise ConfigError("--embed needs a layer name, or auto (the classifier's input)")
        if self.head == "detect" and self.embed:
            raise ConfigError("--embed works with --head classify only")
        if self.topk < 1:
            raise ConfigError(f"--topk must be >= 1, got {self.topk}")
        if self.max_boxes < 1:
            raise ConfigError(f"--max-boxes must be >= 1, got {self.max_boxes}")
        if not 0 < self.iou_threshold <= 1:
            raise ConfigError(f"--iou-threshold must be in (0, 1], got {self.iou_threshold:g}")
        if not 0 <= self.min_box_score < 1:
            raise ConfigError(f"--min-box-score must be in [0, 1), got {self.min_box_score:g}")
        # local files by absolute path (the record repeats the run from anywhere)
        if is_model_path(self.name):  # a file or folder, not a keras.applications name
            if self.weights is not None:  # (it was ignored: the run went on, its record saying them)
                raise ConfigError(f"--weights is for keras.applications models (resnet50, mobilenet_v3_small, ...): "
                                  f"a model file or SavedModel holds its own weights; drop --weights "
                                  f"{self.weights!r} or give a model name")
            object.__setattr__(self, "name", _absolute(self.name))
        if self.weights and self.weights.lower() in ("imagenet", "none"):
            object.__setattr__(self, "weights", self.weights.lower())  # `--weights None` is none
        elif self.weights:
            object.__setattr__(self, "weights", _absolute(self.weights))
        if self.labels:
            object.__setattr__(self, "labels", _absolute(self.labels))
        for spec in self.custom_objects:
            if not (is_code_file(spec) or _MODULE_NAME.fullmatch(spec)):
                raise ConfigError(f"--custom-objects takes a Python module name (pkg.layers) or a .py file "
                                  f"(path or URL), got {spec!r}")
        object.__setattr__(self, "custom_objects", tuple(_absolute(s) if is_code_file(s) else s
                                                         for s in self.custom_objects))


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_code_file(spec: str) -> bool:
    """Whether a `--custom-objects` entry names a file (a path or URL, a `.py` name), not a module."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec or bool(_URL.match(spec))


@dataclass(frozen=True)
class SamplingConfig:
    every: int = 1  # keep frames 0, N, 2N, ...
    fps: Optional[float] = None  # keep the frame whose pts is nearest each t = k / fps
    keyframes: bool = False  # keep key frames only (decodes only those)
    # Content-adaptive frame skipping: a kept frame whose 16x16 grey thumbnail differs from
    # the last inferred frame's by less than this (mean absolute difference, grey levels
    # 0..255) reuses that frame's prediction instead of running the model. None: off.
    skip_similar: Optional[float] = None
    # Clip models (`--clip-len N`): N consecutive kept frames per model input, a clip every
    # `clip_stride` kept frames (default N). None: the model's own N if it fixes one.
    clip_len: Optional[int] = None
    clip_stride: Optional[int] = None

    def __post_init__(self) -> None:
        _check_types(self, "config.sampling")
        if self.clip_len is not None and self.clip_len < 1:
            raise ConfigError(f"--clip-len must be >= 1, got {self.clip_len}")
        if self.clip_stride is not None and self.clip_stride < 1:
            raise ConfigError(f"--clip-stride must be >= 1, got {self.clip_stride}")
        if self.clip_len and self.skip_similar is not None:
            raise ConfigError("--skip-similar works per frame: not with --clip-len")
        if self.skip_similar is not None and self.skip_similar < 0:
            raise ConfigError(f"--skip-similar must be >= 0, got {self.skip_similar}")
        if self.every < 1:
            raise ConfigError(f"--every must be >= 1, got {self.every}")
        if self.fps is not None and self.fps <= 0:
            raise ConfigError(f"--fps must be > 0, got {self.fps}")
        if (self.fps is not None) + (self.every != 1) + bool(self.keyframes) > 1:
            raise ConfigError("--every, --fps and --keyframes are exclusive: pick one sampling mode")


MIN_SEGMENT_S = 0.1  # the shortest segment --segment-seconds may ask for


@dataclass(frozen=True)
class DecodeConfig:
    decoder: str = "auto"  # auto (decord where it is exact, else PyAV), decord, pyav
    segment_s: float = 600.0  # split longer videos into segments decoded in parallel; 0: never
    # CPUs per decode actor and its decoder threads (never 0: that means every core of the
    # node); where inference runs on the CPU, at least decode.SHARED_NODE_THREADS threads for
    # sources of video.LARGE_SOURCE_PIXELS and more
    threads: int = 1
    batch_frames: int = 64  # frames per batch handed downstream, at most
    batch_bytes: int = 32 * 2**20  # bytes per batch handed downstream, at most
    min_actors: int = 1
    max_actors: Optional[int] = None  # default: the cluster's CPUs left after inference
    # Each segment is decoded in a child process of the decode actor: a crash or a hang
    # costs that attempt. Seconds per attempt, and retries (with PyAV, from the frame after
    # the last one delivered) before the segment becomes an error row.
    timeout_s: float = 600.0
    retries: int = 1

    def __post_init__(self) -> None:
        _check_types(self, "config.decode")
        if self.decoder not in DECODERS:
            raise ConfigError(f"--decoder must be auto, decord or pyav, got {self.decoder!r}")
        if self.threads < 1:
            raise ConfigError(f"--decode-threads must be >= 1, got {self.threads}")
        if self.segment_s < 0 or 0 < self.segment_s < MIN_SEGMENT_S:  # (1e-300 planned 3e300 segments: a hang)
            raise ConfigError(f"--segment-seconds must be 0 (never split) or >= {MIN_SEGMENT_S:g}, "
                              f"got {self.segment_s:g}")
        if self.batch_frames < 1 or self.batch_bytes < 1:
            raise ConfigError("decode batch_frames and batch_bytes must be >= 1")
        _check_pool("--decode-actors", self.min_actors, self.max_actors)
        if self.timeout_s <= 0:
            raise ConfigError(f"--decode-timeout must be > 0, got {self.timeout_s}")
        if self.retries < 0:
            raise ConfigError(f"--decode-retries must be >= 0, got {self.retries}")


@dataclass(frozen=True)
class InferConfig:
    # Frames per model call. Default: 32 on CPU, 128 per GPU actor (halved at start-up
    # until a warm-up batch fits the device's memory).
    batch_size: Optional[int] = None
    gpus_per_actor: Optional[float] = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    min_actors: Optional[int] = None  # default: number of GPUs, or 1 on CPU
    max_actors: Optional[int] = None

    def __post_init__(self) -> None:
        _check_types(self, "config.infer")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor:g}")
        if self.cpus_per_actor < 0:
            raise ConfigError(f"infer cpus_per_actor must be >= 0, got {self.cpus_per_actor:g}")
        # (Ray refused it as its actors started: a traceback; fractions share one GPU)
        for flag, n in (("--gpus-per-actor", self.gpus_per_actor), ("infer cpus_per_actor", self.cpus_per_actor)):
            if n is not None and n > 1 and n != int(n):
                raise ConfigError(f"{flag} above 1 must be a whole number (Ray shares out fractions of one only), "
                                  f"got {n:g}")
        _check_pool("--infer-actors", self.min_actors, self.max_actors)


@dataclass(frozen=True)
class RunConfig:
    input: str
    output: str
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    run_id: str = ""
    address: Optional[str] = None  # Ray address; None = RAY_ADDRESS or an embedded local Ray
    limit: Optional[int] = None  # process at most this many videos (in listing order)
    retry_failed: bool = False  # also redo videos that failed in earlier runs
    commit_interval_s: float = 60.0  # publish complete videos at least this often
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("INPUT is required")
        if not self.output:
            raise ConfigError("OUTPUT is required")
        _check_types(self, "config")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        if self.commit_interval_s < 0:
            raise ConfigError(f"--commit-interval must be >= 0, got {self.commit_interval_s:g}")
        _refuse_relative_in_job(self.output)
        object.__setattr__(self, "input", _absolute(self.input))
        object.__setattr__(self, "output", _absolute(self.output))
        if not self.run_id:
            object.__setattr__(self, "run_id", new_run_id())
        if not _RUN_ID.fullmatch(self.run_id):
            # it names output files: no path separators, no "..", no control characters
            raise ConfigError(f"--run-id must match {_RUN_ID.pattern} (it names output files), got {self.run_id!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return _build(cls, data, "config")


def new_run_id() -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    named = [k for k in data if not isinstance(k, str)]
    if named:  # (YAML 1.1 reads `yes:` as True, `1:` as 1)
        raise ConfigError(f"{where}: keys are setting names; got {', '.join(repr(k) for k in named)}; "
                          f"known: {', '.join(known)}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        if value is None and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING):
            continue  # null: the setting's default (as a flag not given)
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and is_dataclass(sub) and value is not None:
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def merge(base: dict[str, Any], overrides: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """Deep-merge `overrides` into `base` (overrides win; None in overrides means unset)."""
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(base).__name__}")
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            out[key] = merge(out[key] if out.get(key) is not None else {}, value, f"{where}.{key}")  # (`model: false`: refused)
        else:
            out[key] = value
    return out


def _check_pool(flag: str, low: Optional[int], high: Optional[int]) -> None:
    if (low is not None and low < 1) or (high is not None and high < max(1, low or 1)):
        raise ConfigError(f"{flag} MIN MAX must be 1 <= MIN <= MAX, got {low} {high}")


@functools.lru_cache(maxsize=None)
def _kinds(cls) -> dict[str, tuple[Any, bool]]:
    """Each field's type (bool, int, float, str, tuple or a config class) and whether None is allowed."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) is typing.Union and type(None) in args
        if optional:
            hint = next(a for a in args if a is not type(None))
        out[name] = (_STRS if typing.get_args(hint) == (str, ...) else typing.get_origin(hint) or hint, optional)
    return out


_STRS = "strs"  # a tuple[str, ...] setting's kind (a tuple's is two integers, a size)
_EXPECTED = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             tuple: "two integers [H, W]", _STRS: "a list of strings"}


def _check_types(obj, where: str) -> None:
    """ConfigError naming the setting and its value where the value is not of the setting's
    type (flags are typed by argparse; a YAML file or a record can hold anything). An int
    stands for a float, a list of two ints for a size."""
    for name, (kind, optional) in _kinds(type(obj)).items():
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif kind in (tuple, _STRS) and isinstance(value, list):
            value = tuple(value)
        elif kind is _STRS and isinstance(value, str):  # (a YAML file's one entry, unlisted)
            value = (value,)
        if kind is _STRS:
            ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        elif kind is tuple:
            ok = isinstance(value, tuple) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:  # nan passes every range check (a YAML .nan, a record's NaN)
            ok = isinstance(value, float) and math.isfinite(value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            from rayvid.storage import redact  # (before it is cut: a URL's user-info cut off its "@" is no URL's)

            shown = redact(repr(value))
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            expected = _EXPECTED.get(kind, f"a {getattr(kind, '__name__', kind)}")
            raise ConfigError(f"{where}.{name}: expected {expected}, got {shown}")
        if value is not getattr(obj, name):
            object.__setattr__(obj, name, value)


def _refuse_relative_in_job(output: str) -> None:
    """A relative local OUTPUT in a job `ray job submit --working-dir` started is relative
    to Ray's copy of the working dir (`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`,
    the current folder of its driver), not to the user's checkout: its rows would go to a
    temporary folder on the head node (another one once the code changes: no resume)."""
    local = re.match(r"(?i)(local://|file:(?!//))", output)  # (paths under the current folder too)
    if (_URL.match(output) and not local) or output[local.end() if local else 0:].startswith(("/", "~")):
        return
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        working_dir = (job.get("runtime_env") or {}).get("working_dir") if isinstance(job, dict) else None
    except ValueError:
        return
    if working_dir:
        raise ConfigError(f"OUTPUT {output!r} is a relative path: in a `ray job submit --working-dir` job it "
                          f"would be inside Ray's temporary copy of the working dir ({os.getcwd()}), not your "
                          f"folder; give a URL (s3://...) or an absolute path every node sees")


def _absolute(url: str) -> str:
    """A local path as storage.resolve reads it (absolute; `~` and fsspec's `file:` prefix
    resolved); URLs as they are, but for their scheme in lower case (`S3://b/in` is
    `s3://b/in`: runs over one INPUT or into one OUTPUT compare them as written)."""
    from rayvid import storage

    if _URL.match(url) and not url.lower().startswith("local://"):  # (local://x: a path under this folder)
        scheme, sep, rest = url.partition("://")
        return scheme.lower() + sep + rest
    fs, path = storage.resolve(url)
    return path if storage.is_local(fs) else url


def is_model_path(name: str) -> bool:
    """Whether --model names a file or folder (else a keras.applications name, even where
    a file of that name is in the working directory: an OUTPUT called resnet50)."""
    return ("/" in name or os.sep in name or name.lower().endswith((".keras", ".h5"))
            or os.path.isfile(os.path.join(name, "saved_model.pb")))

