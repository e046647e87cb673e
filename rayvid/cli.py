"""Command line: `rayvid run INPUT OUTPUT [flags]`, `rayvid samples DIR`, and the verbs
that read an OUTPUT: `summary`, `runs`, `segments`, `find`, `similar`, `export`, `compact`,
`report`, `render`.

Exit codes: 0 the job ran (some videos may have failed: they are in OUTPUT/errors/);
2 the job could not run (bad URL, no credentials, model not loadable, bad flags), with
one line saying why; 130 interrupted (Ctrl-C: the videos complete by then are committed);
1 a bug (traceback).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import logging
import math
import os
import select
import signal
import sys
import threading
from typing import NoReturn, Optional, Sequence

from rayvid import storage
from rayvid.config import DECODERS, HEADS, PREPROCESS, SAMPLING_MODES, RunConfig, is_model_path, merge
from rayvid.errors import ConfigError, InputError, RayvidError, StorageError

SKIP_SIMILAR_DEFAULT = 2.0  # grey levels: above the sensor noise of a still camera, below a moving object
# Options whose value is optional: `--embed` alone, `--embed=LAYER`, or `--embed LAYER`
# where INPUT and OUTPUT are given too (else the word could be INPUT: `detached`).
OPTIONAL_VALUES = {"--embed": "LAYER", "--skip-similar": "T"}


def number(text: str) -> float:
    """argparse type of the float flags: a finite number (float() also takes nan and inf,
    which would pass every range check and fail deep in a stage)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line on stderr (exit 2) like rayvid's own, not its
    usage block first (20 lines for `run`). Subcommands' parsers are of this class too."""

    def error(self, message: str):
        # (the word it refused, said back: a URL's credentials taken out)
        self.exit(2, f"{self.prog}: error: {storage.redact(message)} (see `{self.prog} --help`)\n")

    def _parse_optional(self, arg_string):
        """A number is a value, never an option: argparse takes only `-1`, `-0.5` for one, so
        `--min-score -1e-3` or `--time -inf` was "expected one argument", not its value."""
        try:
            float(arg_string)
            return None
        except ValueError:
            return super()._parse_optional(arg_string)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rayvid", description="Run tf.keras models over video archives with Ray Data.")
    sub = p.add_subparsers(dest="verb", required=True)

    r = sub.add_parser("run", help="classify every frame of every video under INPUT, write Parquet to OUTPUT")
    r.add_argument("input", nargs="?", help="folder/prefix URL (s3://, gs://, local) or manifest (.txt/.lst/.csv/.parquet/.orc, "
                   "an S3 Inventory manifest.json)")
    r.add_argument("output", nargs="?", help="output URL (s3://, gs://, local)")
    r.add_argument("--config", help="YAML (or a runs/<id>.json record) with any of the settings below")
    m = r.add_argument_group("model")
    m.add_argument("--model", help="keras.applications name (resnet50, mobilenet_v3_small, ...) or URL of a .keras/.h5 file or SavedModel")
    m.add_argument("--weights", help="for keras.applications: imagenet (default), none, or a weights file PATH|URL")
    m.add_argument("--labels", help="labels file URL, one label per line")
    m.add_argument("--preprocess", choices=PREPROCESS)
    m.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"))
    m.add_argument("--topk", type=int)
    m.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None, help="float16 compute on GPU (float32 softmax)")
    m.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None, help="compile the model with XLA")
    m.add_argument("--embed", nargs="?", const="auto", metavar="LAYER",
                   help="also write an `embedding` column per frame: the classifier's input (default), "
                        "or LAYER's output, average-pooled if it is a feature map "
                        "(before INPUT OUTPUT: --embed=LAYER)")
    m.add_argument("--no-embed", action="store_true", help="no embedding column (a config file's --embed off)")
    m.add_argument("--embed-normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise the embeddings (cosine similarity = dot product)")
    m.add_argument("--head", choices=HEADS,
                   help="detect: a grid detector; boxes decoded and NMS'd in the inference graph (README)")
    m.add_argument("--model-output", metavar="NAME",
                   help="which output of a model with several: a SavedModel's output key, a Keras output layer's name or dict key")
    m.add_argument("--custom-objects", action="append", metavar="MODULE|FILE",
                   help="a Python module (pkg.layers) or .py file (any URL) defining a model file's custom layers "
                        "or functions; imported before the model loads (repeatable)")
    m.add_argument("--max-boxes", type=int, help="detect: boxes kept per frame (default 20)")
    m.add_argument("--iou-threshold", type=number, help="detect: NMS overlap threshold (default 0.5)")
    m.add_argument("--min-box-score", type=number, help="detect: drop boxes scoring less (default 0.3)")
    s = r.add_argument_group("sampling (default: every frame)")
    ex = s.add_mutually_exclusive_group()
    ex.add_argument("--every", type=int, metavar="N", help="keep frames 0, N, 2N, ...")
    ex.add_argument("--fps", type=number, metavar="F", help="keep the frame nearest each t = k/F (by pts)")
    ex.add_argument("--keyframes", action="store_true", default=None, help="keep key frames only (decodes only those)")
    s.add_argument("--no-keyframes", dest="keyframes", action="store_false", default=None,
                   help="not key frames only (a config file's); every frame unless it gives another mode")
    s.add_argument("--no-skip-similar", action="store_true", help="infer every kept frame (a config file's --skip-similar off)")
    s.add_argument("--clip-len", type=int, metavar="N",
                   help="video models: N consecutive frames per model input, one output row per clip")
    s.add_argument("--clip-stride", type=int, metavar="S", help="a clip every S frames (default N: side by side)")
    s.add_argument("--skip-similar", nargs="?", const=SKIP_SIMILAR_DEFAULT, metavar="T",
                   help="reuse the last inferred frame's prediction for frames that differ from it by less "
                        "than T grey levels (mean abs. difference of 16x16 thumbnails; "
                        f"default T {SKIP_SIMILAR_DEFAULT:g}; before INPUT OUTPUT: --skip-similar=T)")
    e = r.add_argument_group("execution")
    e.add_argument("--batch-size", type=int, metavar="B",
                   help="inference batch size (default 32 on CPU, 128 per GPU actor, halved at start-up until it fits)")
    e.add_argument("--decoder", choices=DECODERS, help="auto (default): decord where it is exact, else PyAV")
    e.add_argument("--decode-threads", type=int, help="CPUs each decode actor holds, and its decoder threads (default 1; "
                   "where inference runs on the CPU, HD and larger sources decode on at least 2 threads)")
    e.add_argument("--segment-seconds", type=number, metavar="S",
                   help="split videos longer than S seconds into segments decoded in parallel (default 600; 0: never)")
    e.add_argument("--decode-actors", nargs=2, type=int, metavar=("MIN", "MAX"))
    e.add_argument("--decode-timeout", type=number, metavar="S",
                   help="seconds of decoding one segment may take per attempt before its process is killed (default 600)")
    e.add_argument("--decode-retries", type=int, metavar="N",
                   help="retries of a segment whose decoder process crashed or timed out (default 1)")
    e.add_argument("--infer-actors", nargs=2, type=int, metavar=("MIN", "MAX"))
    e.add_argument("--gpus-per-actor", type=number, help="default: 1 if the cluster has GPUs, else 0 (CPU)")
    e.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded local Ray)")
    e.add_argument("--run-id")
    e.add_argument("--limit", type=int, help="process at most N videos")
    e.add_argument("--dry-run", action="store_true",
                   help="list INPUT, read what OUTPUT has, plan; print what the run would do, writing nothing")
    e.add_argument("--commit-interval", type=number, metavar="S",
                   help="publish complete videos at least every S seconds (default 60)")
    e.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=None,
                   help="also redo videos that failed in earlier runs into the same OUTPUT")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on)")

    def shown(parser):
        parser.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
        parser.add_argument("--out", metavar="FILE", help="write there (any URL) instead of stdout")
        return parser

    q = shown(sub.add_parser("summary", help="the per-video table of an OUTPUT"))
    q.add_argument("output")
    q = shown(sub.add_parser("runs", help="the runs recorded in an OUTPUT: status (interrupted ones too), times, counts"))
    q.add_argument("output")
    seg = shown(sub.add_parser("segments", help="contiguous runs of each video's top-1 label, as start/end times"))
    seg.add_argument("output")
    seg.add_argument("--label", help="only this label")
    seg.add_argument("--video", metavar="URI", help="only this video")
    fnd = shown(sub.add_parser("find", help="videos showing LABEL, and when"))
    fnd.add_argument("output")
    fnd.add_argument("label")
    for q in (seg, fnd):
        q.add_argument("--min-score", type=number, default=-math.inf, metavar="S",
                       help="ignore frames scoring below S (default: none; a model's raw scores may be negative)")
        q.add_argument("--min-duration", type=number, default=0.0, metavar="D", help="drop segments shorter than D s")
        q.add_argument("--gap", type=number, default=None, metavar="G",
                       help="merge runs of a label less than G s apart (default 0.5)")
    sim = shown(sub.add_parser("similar", help="the frames nearest a frame or an image (runs with --embed)"))
    sim.add_argument("output")
    sim.add_argument("--video", metavar="URI", help="the query frame's video (with --time)")
    sim.add_argument("--time", type=number, metavar="T", help="seconds: the frame shown at T")
    sim.add_argument("--image", metavar="PATH", help="an image file (any URL), embedded by the run's model")
    sim.add_argument("-k", type=int, default=10, help="how many frames (default 10)")
    sim.add_argument("--model", metavar="URL", help="with --image: the model file to embed it with (default: the "
                     "run's own, from its record; give it where that was a signed URL, whose signature is not recorded)")
    q = sub.add_parser("export", help="per-frame predictions as CSV (top-k as columns)")
    q.add_argument("output")
    q.add_argument("dest", help="CSV file to write (any URL)")
    q.add_argument("--video", metavar="URI", help="only this video")
    q = sub.add_parser("compact", help="merge an OUTPUT's small files (safe for readers and resumes)")
    q.add_argument("output")
    q.add_argument("--target-rows", type=int, default=None, metavar="N",
                   help="merge parts of fewer than N/2 rows into parts of at most N (default 1000000)")
    q.add_argument("--include-running", action="store_true",
                   help="also merge files of runs that may still be running (a run killed on another "
                        "host counts as running for 5 minutes after its last heartbeat)")
    q = sub.add_parser("report", help="label-timeline PNGs per video and an HTML index")
    q.add_argument("output")
    q.add_argument("dir", help="folder to write index.html and timelines/ into (any URL)")
    q.add_argument("--limit", type=int, default=1000, metavar="N",
                   help="the first N videos by video_uri (default 1000; 0: every video)")
    q.add_argument("--match", metavar="GLOB", help="only videos whose video_uri matches GLOB (fnmatch: *, ?, [..])")
    q = sub.add_parser("render", help="a video with its top-k labels drawn on every frame")
    q.add_argument("video", help="the video's URI, as the run listed it")
    q.add_argument("output")
    q.add_argument("dest", help="the MP4 to write (any URL)")
    q.add_argument("--topk", type=int, default=3, metavar="K", help="labels drawn per frame (default 3; 0: none)")

    smp = sub.add_parser("samples", help="generate labelled sample videos and train the small sample model")
    smp.add_argument("dir", help="folder to write videos/ and model/ into")
    smp.add_argument("--videos", type=int, default=6)
    smp.add_argument("--seconds", type=number, default=4.0)
    smp.add_argument("--force", action="store_true", help="rebuild even if present")
    smp.add_argument("--detector", action="store_true",
                     help="also train the sample grid detector (model/detector.keras: --head detect)")
    smp.add_argument("--clip-model", action="store_true",
                     help="also train the sample video model (model/clips.keras: --clip-len 4)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line, parsed; for `run`, `detached` also holds the optional values that
    came as a word of their own (`--embed LAYER`: config_from_args takes one only where
    INPUT and OUTPUT are given too)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb == "run":
        # argparse fills INPUT and OUTPUT (both optional) from the first run of words, so
        # `run IN --model X OUT` left OUT unrecognised: a later word fills what is empty
        dashes = bool(extra) and extra[0] == "--" and (args.input is None or args.output is None)
        if dashes:
            extra.pop(0)  # `run IN --flags -- OUT`: what follows "--" is positional, whatever it looks like
        for name in ("input", "output"):
            if getattr(args, name) is None and extra and (dashes or not extra[0].startswith("-")):
                setattr(args, name, extra.pop(0))
        args.detached = _detached(argv)
    if extra:
        parser.prog = f"rayvid {args.verb}"  # the hint names the verb's --help
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _detached(argv: list) -> dict:
    """{option: value} for each `--embed LAYER` / `--skip-similar T` (or a prefix of the
    option, as argparse takes it) whose value is the next word, not `--option=VALUE`."""
    out = {}
    for word, after in zip(argv, argv[1:]):
        if word == "--":
            break
        option = next((o for o in OPTIONAL_VALUES if word.startswith("--") and o.startswith(word)), None)
        if option and not after.startswith("-"):
            out[option] = after
    return out


def config_from_args(args: argparse.Namespace) -> RunConfig:
    for option, value in getattr(args, "detached", {}).items():
        # that word may have been INPUT or OUTPUT (with --config and neither: they come from it)
        if (args.input is None) != (args.output is None) or (args.input is None and not args.config):
            shown = storage.public_uri(value)
            raise ConfigError(
                f"{option} takes {shown!r} as its {OPTIONAL_VALUES[option]} here, and then INPUT OUTPUT are not "
                f"both given: write {option}={shown} if that is the {OPTIONAL_VALUES[option]}, or put {option} "
                f"after INPUT OUTPUT")
    skip_similar = args.skip_similar
    if isinstance(skip_similar, str):
        try:
            skip_similar = number(skip_similar)
        except (ValueError, argparse.ArgumentTypeError):
            raise ConfigError(f"--skip-similar T must be a finite number, got {storage.public_uri(skip_similar)!r}") from None
    if args.run_id == "":  # (it read as no --run-id: a new run id, unsaid)
        raise ConfigError("--run-id needs a value (leave it out for a new run id)")
    if args.config is not None and not args.config.strip():  # (it read as no config file, unsaid)
        raise ConfigError("--config needs a value: a YAML file or a runs/<id>.json record")
    if args.address is not None and not args.address.strip():  # (it read as none: an embedded Ray, unsaid)
        raise ConfigError("--address needs a value (leave it out for RAY_ADDRESS, else an embedded local Ray)")
    base: dict = {}
    if args.config:
        base = _load_config_file(args.config)
        if base.get("run_id") == "" and args.run_id is None:  # (as on the command line)
            raise ConfigError(f"config {storage.public_uri(args.config)}: run_id needs a value (null, or leave it "
                              f"out, for a new run id)")
        if isinstance(base.get("address"), str) and not base["address"].strip() and args.address is None:
            raise ConfigError(f"config {storage.public_uri(args.config)}: address needs a value (null, or leave it "
                              f"out, for RAY_ADDRESS, else an embedded local Ray)")
    if any(getattr(args, mode) not in (None, False) for mode in SAMPLING_MODES) and isinstance(base.get("sampling"), dict):
        # a sampling mode given as a flag replaces the config's (the modes are exclusive)
        base["sampling"] = {k: v for k, v in base["sampling"].items() if k not in SAMPLING_MODES}
    decode_actors = args.decode_actors or (None, None)
    infer_actors = args.infer_actors or (None, None)
    flags = {
        "input": args.input,
        "output": args.output,
        "model": {
            "name": args.model,
            "weights": args.weights,
            "labels": args.labels,
            "preprocess": args.preprocess,
            "input_size": args.input_size,
            "topk": args.topk,
            "mixed_precision": args.mixed_precision,
            "xla": args.xla,
            "embed": args.embed,
            "embed_normalize": args.embed_normalize,
            "head": args.head,
            "output": args.model_output,
            "custom_objects": args.custom_objects,
            "max_boxes": args.max_boxes,
            "iou_threshold": args.iou_threshold,
            "min_box_score": args.min_box_score,
        },
        "sampling": {"every": args.every, "fps": args.fps, "keyframes": args.keyframes,
                     "skip_similar": skip_similar, "clip_len": args.clip_len,
                     "clip_stride": args.clip_stride},
        "decode": {"decoder": args.decoder, "threads": args.decode_threads, "segment_s": args.segment_seconds, "min_actors": decode_actors[0], "max_actors": decode_actors[1],
                   "timeout_s": args.decode_timeout, "retries": args.decode_retries},
        "infer": {
            "batch_size": args.batch_size,
            "gpus_per_actor": args.gpus_per_actor,
            "min_actors": infer_actors[0],
            "max_actors": infer_actors[1],
        },
        "run_id": args.run_id,
        "address": args.address,
        "limit": args.limit,
        "retry_failed": args.retry_failed,
        "commit_interval_s": args.commit_interval,
        "progress": args.progress,
    }
    merged = merge(base, flags)
    model = merged.get("model")
    if args.model is not None and args.weights is None and isinstance(model, dict) and is_model_path(args.model):
        # --model FILE over a config file's model: that model's weights are not this one's
        # (a model file holds its own; ModelConfig refuses any with one)
        merged["model"] = {**model, "weights": None}
    for flag, on, section, key in (("embed", args.embed, "model", "embed"),
                                   ("skip-similar", skip_similar, "sampling", "skip_similar")):
        if getattr(args, f"no_{key}"):
            if on is not None:
                raise ConfigError(f"--{flag} and --no-{flag} contradict each other: give one")
            if isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], key: None}
    for key in ("input", "output"):
        if not merged.get(key):
            raise ConfigError(f"{key.upper()} is required (as an argument or in --config)")
    _refuse_redacted(merged)
    return RunConfig.from_dict(merged)


_YAML_INT = r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"  # YAML 1.2's core schema
_YAML_FLOAT = (r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
               r"|\.(?:nan|NaN|NAN))$")


def _yaml_loader():
    """PyYAML's safe loader, whose numbers are YAML 1.2's (core schema): `1e3`, `-1e-3`,
    `1.5e3` are floats (YAML 1.1, which PyYAML follows, wants a dot and a signed exponent:
    `fps: 1e3` was the string '1e3'); `010` is ten, not octal eight, and `1:30`, `0b11`,
    `1_000` are no numbers (base 60, binary, digits apart: 90, 3 and 1000 before)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            """A key given twice in one mapping (the second silently won) is an error;
            `<<:` merges may still be overridden."""
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                            key_node.start_mark)
                seen.add(key) if isinstance(key, (str, int, float, bool)) else None
            return super().construct_mapping(node, deep=deep)

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
    Loader.yaml_implicit_resolvers = {first: [(tag, regex) for tag, regex in resolvers if tag not in (int_tag, float_tag)]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(int_tag, re.compile(_YAML_INT), list("-+0123456789"))  # (before floats: 10 is one)
    Loader.add_implicit_resolver(float_tag, re.compile(_YAML_FLOAT), list("-+0123456789."))

    def integer(loader, node):
        text = loader.construct_scalar(node)
        try:
            return int(text[2:], 8 if text[1] == "o" else 16) if text[:2] in ("0o", "0x") else int(text, 10)
        except ValueError:  # (`!!int` on something else)
            raise yaml.constructor.ConstructorError(None, None, f"{text!r} is no integer", node.start_mark) from None

    Loader.add_constructor(int_tag, integer)
    return Loader


def _yaml_reason(e) -> str:
    """A YAML error in one line: what is wrong, and where (PyYAML's own text spans lines and
    names the file "<unicode string>")."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    problem = f"{context}, {problem}" if context else problem
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def _load_config_file(url: str) -> dict:
    import yaml

    try:
        data = yaml.load(storage.read_bytes(url).decode("utf-8"), Loader=_yaml_loader()) or {}
    except FileNotFoundError as e:
        if not storage.absent(e):  # fsspec's HTTP filesystem: a server it cannot reach, or a 403
            raise ConfigError(f"cannot read config {storage.public_uri(url)}: {storage.describe(e)}") from None
        raise ConfigError(f"config file not found: {storage.public_uri(url)}") from None
    except storage.ACCESS_ERRORS as e:
        raise ConfigError(f"cannot read config {storage.public_uri(url)}: {storage.describe(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {storage.public_uri(url)} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {storage.public_uri(url)} is not valid YAML: {storage.redact(_yaml_reason(e))}") from None
    if isinstance(data, dict) and "config" in data and "run_id" in data:
        # a runs/<id>.json record: repeat its config, new run id; the settings it says lost
        # their credentials (a record before it said so: those that look it) must be given again
        taken = data.get("redacted")
        taken = set(taken) if isinstance(taken, list) and all(isinstance(t, str) for t in taken) else None
        data = data["config"]
        if isinstance(data, dict):
            data = _without_redacted({k: v for k, v in data.items() if k != "run_id"}, url, taken=taken)
            if data.get("address") == "":  # (a run before `--address ''` was refused: it meant none)
                data["address"] = None
    if not isinstance(data, dict):
        raise ConfigError(f"config {storage.public_uri(url)}: expected a mapping of settings, "
                          f"got {type(data).__name__}")
    return data


# what storage.redact leaves where it took a secret out
_REDACTED = ("***", "<redacted>")
# the command-line form of a record's settings (else --<key>)
_FLAG_OF = {"input": "INPUT", "output": "OUTPUT", "model.name": "--model", "model.output": "--model-output"}


class _Redacted(str):
    """A record's setting that was written with a secret taken out: a rerun must be given it."""

    def __new__(cls, value: str, key: str, record: str):
        self = super().__new__(cls, value)
        self.key, self.record = key, record
        return self

    def refuse(self) -> NoReturn:
        flag = _FLAG_OF.get(self.key, "--" + self.key.rsplit(".", 1)[-1].replace("_", "-"))
        raise ConfigError(f"{self.record} recorded {self.key} with its credentials taken out ({self}): "
                          f"give {flag} on the command line (a URL with an '@' in its path after a port "
                          f"number is recorded the same way)")


def _without_redacted(data: dict, url: str, where: str = "", taken: Optional[set] = None) -> dict:
    """A run record's config with each redacted URL marked (`_Redacted`), so that repeating
    it is refused unless the command line gives that setting again: never a rerun against
    `https://***@host/...` or `...?<redacted>`. `taken`: the settings the record says were
    redacted (dotted paths); None (a record from before it said so): those holding `***` or
    `<redacted>`."""
    def redacted(path: str, value: str) -> bool:
        return path in taken if taken is not None else any(m in value for m in _REDACTED)

    out = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if isinstance(value, dict):
            value = _without_redacted(value, url, path + ".", taken)
        elif isinstance(value, str) and redacted(path, value):
            value = _Redacted(value, path, storage.public_uri(url))
        elif isinstance(value, list) and any(isinstance(v, str) and redacted(path, v) for v in value):
            strings = [v for v in value if isinstance(v, str)]
            shown = next((v for v in strings if any(m in v for m in _REDACTED)), strings[0])
            value = _Redacted(shown, path, storage.public_uri(url))
        out[key] = value
    return out


def _refuse_redacted(data) -> None:
    """Refuse a record's redacted setting the command line did not give again."""
    if isinstance(data, _Redacted):
        data.refuse()
    if isinstance(data, dict):
        for value in data.values():
            _refuse_redacted(value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    # rayvid's own messages, and other libraries' warnings: not their INFO lines (fsspec logs
    # one for every file it opens with read-ahead; Ray logs through handlers of its own)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("rayvid").setLevel(logging.INFO)
    try:
        if args.verb == "run":
            return _run(args)
        if args.verb in QUERY_VERBS:
            code = _query(args)
            if sys.stdout is not None:  # (None: started with it closed, `>&-`)
                sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
            return code
        if args.verb == "samples":
            from rayvid import samples

            try:
                paths = samples.ensure_samples(args.dir, n_videos=args.videos, seconds=args.seconds, force=args.force)
                model_dir = os.path.join(args.dir, "model")
                if args.detector:
                    paths["detector"] = samples.train_detector(model_dir)["model"]
                if args.clip_model:
                    paths["clip_model"] = samples.train_clip_model(model_dir)["model"]
            except OSError as e:  # (DIR a file, a folder that cannot be made, a full disk)
                raise StorageError(f"cannot write samples into {args.dir}: {storage.describe(e)}") from None
            from rayvid import query

            with query.stdout() as out:
                out.write((json.dumps(paths, indent=2) + "\n").encode())
            return 0
    except RayvidError as e:
        print(f"rayvid: error: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout's reader is gone (`rayvid export out - | head`): stop quietly, as `yes | head`
        if not _stdout_gone():
            raise
        with contextlib.suppress(OSError):  # and nothing more goes to the closed pipe (the exit's flush)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except SystemExit as e:  # Ray's SIGTERM handler in a driver: sys.exit(SIGTERM), through the run
        if e.code != signal.SIGTERM or args.verb != "run":
            raise
        done = "" if getattr(args, "dry_run", False) else \
            "; the videos complete by now are committed: run the same command again to finish"
        _drop_interrupted(e)
        print(f"rayvid: terminated (SIGTERM){done}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt as e:  # Ctrl-C: what `run` finished is committed (pipeline.run), the rest is not
        done = "; the videos complete by now are committed: run the same command again to finish" \
            if args.verb == "run" and not args.dry_run else ""
        _drop_interrupted(e)
        print(f"rayvid: interrupted{done}", file=sys.stderr)
        # the `rayvid` command, exiting: a second Ctrl-C would interrupt Ray's own shutdown at
        # exit (a Ray started before rayvid knew it had: its atexit hook), a traceback after
        # this line (a caller in its own process, main(argv), keeps its Ctrl-C)
        if argv is None:
            with contextlib.suppress(ValueError):  # (main called from another thread)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        return 130
    return 1


def _drop_interrupted(e: BaseException) -> None:
    """Free, before rayvid's last line, what the interrupted work's frames held, their
    errors unsaid: an object a library was building when the signal came (a Ray Dataset
    half made) failed in its `__del__` once freed ("Exception ignored in: Dataset.__del__
    ... AttributeError"), a traceback after the line that ends the command's output."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        while e is not None:
            e.__traceback__ = None
            e = e.__context__
        gc.collect()
    finally:
        sys.unraisablehook = hook


def console(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """The `rayvid` command, `python -m rayvid` and the job entrypoint: `main`, then an exit
    that leaves out the interpreter's teardown. Arrow's thread pools can still be winding
    down just after a Parquet scan, and the C++ static destructors that run at a normal exit
    then abort the process ("terminate called without an active exception", SIGABRT) after
    all the work was done and said (apache/arrow#39862): seen in CI, 1 run in 60 of
    `rayvid summary` on a loaded machine. What an exit must do is done first, in the
    interpreter's order: other Python threads joined, the atexit hooks run (Ray's shutdown,
    logging's flush), stdout and stderr flushed (exit 120 where that fails, as Python's);
    a Ctrl-C or SIGTERM meanwhile is ignored (what the command did is done; in Ray's exit
    hook, a driver's disconnect, a Ctrl-C ended the process with Ray's C++ error, exit 1,
    and a SIGTERM a finished run's job with 143, its summary unsaid). An exception out of
    `main` (argparse's exit 2, a bug's traceback) exits as usual."""
    code = main(argv)
    if threading.current_thread() is threading.main_thread():
        # nothing is left to stop: a Ctrl-C in Ray's exit hook was its C++ error, exit 1
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # the interpreter's first step at exit: threading's exit hooks (concurrent.futures wakes
        # a pool's idle workers, which would wait for work for ever), then the other threads joined
        threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # (started with it closed: `>&-`)
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # (a full disk behind a redirect; a stream closed)
            code = code or 120
    os._exit(code)


QUERY_VERBS = ("summary", "runs", "segments", "find", "similar", "export", "compact", "report", "render")


def _say_missing(output: str, video: str) -> None:
    """A read verb asked for one video found no rows: say why where OUTPUT lacks it."""
    from rayvid import query

    why = query.missing_video(output, video)
    if why:
        print(f"rayvid: {why}", file=sys.stderr)


def _check_destinations(args) -> None:
    """Before any work: what a verb writes never replaces what it reads (OUTPUT's own
    files, render's video), and counts are counts."""
    from rayvid import query

    if getattr(args, "out", None) not in (None, "-"):
        query.check_destination(args.out, args.output, "--out")
    if args.verb == "export" and args.dest != "-":
        query.check_destination(args.dest, args.output, "export's file")
    elif args.verb == "report":
        if args.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {args.limit}")
        query.check_destination(args.dir, args.output, "report's folder", folder=True)
    elif args.verb == "render":
        query.check_destination(args.dest, args.output, "render's file", source=args.video)
        if args.topk < 0:
            raise ValueError(f"--topk must be >= 0, got {args.topk}")
    elif args.verb == "similar" and (args.k < 1 or (args.time is not None and args.time < 0)):
        raise ValueError(f"-k must be >= 1, got {args.k}" if args.k < 1 else f"--time must be >= 0, got {args.time:g}")


def _query(args) -> int:
    """The verbs that read an OUTPUT (query.py, compact.py, report.py, render.py)."""
    from rayvid import query

    try:
        _check_destinations(args)
        if args.verb == "summary":
            query.write(query.summary(args.output), args.format, args.out)
        elif args.verb == "runs":
            query.write(query.runs(args.output), args.format, args.out)
        elif args.verb in ("segments", "find"):
            gap = query.GAP_S if args.gap is None else args.gap
            if gap < 0 or args.min_duration < 0:
                raise ConfigError(f"--gap and --min-duration must be >= 0 seconds, got {gap:g} and {args.min_duration:g}")
            if args.verb == "segments":
                table = query.segments(args.output, args.label, args.min_score, args.min_duration, gap, args.video)
            else:
                table = query.find(args.output, args.label, args.min_score, args.min_duration, gap)
            query.write(table, args.format, args.out)
            if not len(table) and getattr(args, "video", None) is not None:
                _say_missing(args.output, args.video)
            if not len(table) and args.label is not None and args.label not in (known := query.labels(args.output)):
                shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
                print(f"rayvid: no frame's top-1 label is {args.label!r} (labels are case-sensitive; "
                      f"OUTPUT has: {shown or 'none'})", file=sys.stderr)
        elif args.verb == "similar":
            if (args.image is None) == (args.video is None or args.time is None):
                raise ConfigError("similar: give --video URI --time T, or --image PATH")
            if args.model is not None and args.image is None:
                raise ConfigError("similar: --model is for --image (the run's embeddings are already there)")
            query.write(query.similar(args.output, k=args.k, video=args.video, time_s=args.time,
                                      image=args.image, model=args.model), args.format, args.out)
        elif args.verb == "export":
            n = query.export_csv(args.output, args.dest, args.video)
            print(f"{n} rows -> {storage.public_uri(args.dest)}", file=sys.stderr)
            if not n and args.video is not None:
                _say_missing(args.output, args.video)
        elif args.verb == "compact":
            from rayvid import compact

            rows = compact.TARGET_ROWS if args.target_rows is None else args.target_rows
            done = compact.compact(args.output, rows, args.include_running)  # (it checks rows >= 1)
            with query.stdout() as out:
                out.write((json.dumps(done) + "\n").encode())
        elif args.verb == "report":
            from rayvid import report

            pngs = report.write_report(args.output, args.dir, args.limit, args.match)
            with query.stdout() as out:
                out.write(f"{len(pngs)} timelines; open {storage.public_uri(storage.join(args.dir, 'index.html'))}\n".encode())
        elif args.verb == "render":
            from rayvid import render

            n = render.render(args.video, args.output, args.dest, args.topk)
            print(f"{n} frames -> {storage.public_uri(args.dest)}", file=sys.stderr)
    except BrokenPipeError:
        if _stdout_gone():
            raise  # main: quietly, as the end of a pipe's reader
        raise InputError(f"cannot read {storage.public_uri(args.output)}: broken pipe") from None
    except FileNotFoundError as e:
        if not storage.absent(e):  # fsspec's HTTP filesystem: a server it cannot reach, or a 403
            raise InputError(f"cannot read {storage.public_uri(args.output)}: {storage.describe(e)}") from None
        raise InputError(storage.redact(str(e))) from None
    except ValueError as e:
        raise ConfigError(storage.redact(str(e))) from None
    except storage.ACCESS_ERRORS as e:
        raise InputError(f"cannot read {storage.public_uri(args.output)}: {storage.describe(e)}") from None
    return 0


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader closed it (polling its write end says so)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (captured), or no poll
        return False


def _run(args) -> int:
    from rayvid import pipeline, query, report

    cfg = config_from_args(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = pipeline.run(cfg, dry_run=args.dry_run)
    with query.stdout() as out:  # (a full disk behind a redirect: one line, the run done all the same)
        out.write((report.summary(result) + "\n").encode())
    return 0
