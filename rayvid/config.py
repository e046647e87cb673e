"""One typed, frozen configuration for a run, built from CLI flags or one YAML file.

The resolved config (every default filled in) is what `runs/<run_id>.json` records, so a
run can be repeated from its record alone: `rayvid run --config runs/<run_id>.json`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
import secrets
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from rayvid.errors import ConfigError

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ModelConfig:
    # keras.applications name (resnet50, mobilenet_v2, ...) or a URL/path of a .keras file
    # or SavedModel directory.
    name: str = "mobilenet_v3_small"
    # For keras.applications: "imagenet" (Keras' cache/download), a path or URL of a weights
    # file, or "none" for random init (tests only). Ignored for .keras / SavedModel.
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
    max_boxes: int = 20  # detections kept per frame
    iou_threshold: float = 0.5  # NMS: boxes of a class overlapping more are suppressed
    min_box_score: float = 0.3  # NMS: boxes scoring less are dropped

    def __post_init__(self) -> None:
        if self.head not in ("classify", "detect"):
            raise ConfigError(f"--head must be classify or detect, got {self.head!r}")
        if self.head == "detect" and self.embed:
            raise ConfigError("--embed works with --head classify only")
        if self.topk < 1:
            raise ConfigError(f"--topk must be >= 1, got {self.topk}")
        if self.max_boxes < 1 or not 0 < self.iou_threshold <= 1 or not 0 <= self.min_box_score < 1:
            raise ConfigError("--max-boxes must be >= 1, --iou-threshold in (0, 1], --min-box-score in [0, 1)")


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


@dataclass(frozen=True)
class DecodeConfig:
    decoder: str = "auto"  # auto (decord where it is exact, else PyAV), decord, pyav
    segment_s: float = 600.0  # split longer videos into segments decoded in parallel; 0: never
    # CPUs per decode actor and its decoder threads (never 0: that means every core of the
    # node); where inference runs on the CPU, at least decode.SHARED_NODE_THREADS threads for
    # sources of decode.LARGE_SOURCE_PIXELS and more
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
        if self.infer.batch_size is not None and self.infer.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if self.decode.threads < 1:
            raise ConfigError("decode threads must be >= 1")
        if self.decode.decoder not in ("auto", "decord", "pyav"):
            raise ConfigError(f"--decoder must be auto, decord or pyav, got {self.decode.decoder!r}")
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
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and is_dataclass(sub) and value is not None:
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        elif name == "input_size" and value is not None:
            kwargs[name] = tuple(int(v) for v in value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into `base` (overrides win; None in overrides means unset)."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            out[key] = merge(out.get(key) or {}, value)
        else:
            out[key] = value
    return out
