"""The command line and the `ray job submit` entrypoint, end to end on the session's Ray."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from helpers import FAKE_KEY_ID, FAKE_SECRET, read_output, write_output
from rayvid import query, samples
from rayvid.cli import SKIP_SIMILAR_DEFAULT, config_from_args, main, parse_args
from rayvid.config import RunConfig, SamplingConfig, merge
from rayvid.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def one_video(media, tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    src = next(p for p in media["truth"] if p.endswith("c.mkv"))
    os.symlink(src, d / "c.mkv")
    return {"dir": d, "n": len(media["truth"][src])}


def test_run_verb_prints_a_summary_and_exits_0(ray_session, one_video, shapes_model, tmp_path, capsys):
    out = str(tmp_path / "out")
    code = main(["run", str(one_video["dir"]), out, "--model", shapes_model["path"], "--batch-size", "4",
                 "--run-id", "cli-1", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "rayvid run cli-1" in text and "1 listed, 0 skipped (already done), 1 ok, 0 failed" in text
    assert f"frames:  {one_video['n']} (" in text and f"{out}/predictions/" in text
    assert read_output(out).num_rows == one_video["n"]

    # the query verbs on what the run wrote: one scene (seed 3: stripes for its 1 s)
    assert set(samples.scene_labels(one_video["n"], 3)) == {"stripes"}
    # results go to files: the session's Ray prints its workers' log lines to stdout
    res = tmp_path / "res"
    assert main(["segments", out, "--min-duration", "0.3", "--format", "json", "--out", str(res)]) == 0
    [seg] = json.loads(res.read_text())
    assert (seg["label"], seg["start_s"], round(seg["end_s"], 6)) == ("stripes", 0.0, one_video["n"] / 15)
    assert main(["find", out, "stripes", "--format", "csv", "--out", str(res)]) == 0
    assert res.read_text().splitlines()[1].startswith(str(one_video["dir"] / "c.mkv"))
    assert main(["summary", out, "--out", str(res)]) == 0
    assert "  stripes " in res.read_text()  # the top label, first in top_labels


REVERSE_LAYER = """
import keras


@keras.saving.register_keras_serializable(package="rayvid_test")
class Reverse(keras.layers.Layer):
    \"\"\"The scores in reverse class order (a custom layer: Keras cannot load it alone).\"\"\"

    def call(self, x):
        return keras.ops.flip(x, axis=-1)
"""


def test_custom_objects_load_a_model_file_with_a_custom_layer(ray_session, one_video, shapes_model, tmp_path, capsys):
    """A `.keras` file with a custom layer (the sample classifier, its scores reversed by a
    registered `Reverse`): without `--custom-objects` the run is exit 2 in one line naming
    the class and the flag, before any work; with the layer's .py file it runs, each frame
    labelled by the reversed scores, and its record keeps the file."""
    import importlib.util

    import keras

    code = tmp_path / "reverse_layer.py"
    code.write_text(REVERSE_LAYER)
    found = importlib.util.spec_from_file_location("reverse_layer_here", code)
    here = importlib.util.module_from_spec(found)
    found.loader.exec_module(here)
    classifier = keras.saving.load_model(shapes_model["path"], compile=False)
    model = keras.Model(classifier.inputs, here.Reverse()(classifier.outputs[0]))
    model.save(tmp_path / "reversed.keras")
    shutil.copy(shapes_model["labels"], tmp_path / "reversed.labels.txt")
    labels = open(shapes_model["labels"]).read().split()
    out = str(tmp_path / "out")
    args = ["run", str(one_video["dir"]), out, "--model", str(tmp_path / "reversed.keras"), "--no-progress"]
    assert main(args) == 2  # said by the driver from the file's config.json, before any actor starts
    assert capsys.readouterr().err == (
        f"rayvid: error: cannot load model {tmp_path / 'reversed.keras'}: it uses the class 'Reverse' (from "
        f"reverse_layer_here), which is no Keras one: give the Python module or .py file that defines it with "
        f"--custom-objects\n")
    assert not os.path.exists(os.path.join(out, "predictions"))
    assert main([*args, "--custom-objects", str(code), "--run-id", "custom"]) == 0, capsys.readouterr().err
    # (the classifier labels this video stripes: test_run_verb_prints_a_summary_and_exits_0)
    assert set(read_output(out).column("label").to_pylist()) == {labels[len(labels) - 1 - labels.index("stripes")]}
    record = json.load(open(os.path.join(out, "runs", "custom.json")))
    assert record["config"]["model"]["custom_objects"] == [str(code)]


def test_model_output_runs_the_named_output_of_a_savedmodel(ray_session, one_video, shapes_model, tmp_path, capsys):
    """`--model-output NAME` through a run: a SavedModel whose signature gives the sample
    classifier's scores and their reverse (was: exit 2, "has 2 outputs"): the run labels the
    frames by the output it named (the reverse's), and its record keeps the name."""
    import keras
    import tensorflow as tf

    classifier = keras.saving.load_model(shapes_model["path"], compile=False)
    h, w = classifier.input_shape[1:3]

    class Two(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = classifier

        @tf.function(input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32)])
        def serve(self, x):
            p = self.model(x)
            return {"probs": p, "reversed": tf.reverse(p, axis=[1])}

    module = Two()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    shutil.copy(shapes_model["labels"], tmp_path / "sm" / "labels.txt")
    labels = open(shapes_model["labels"]).read().split()
    out = str(tmp_path / "out")  # (its "probs" would say stripes, as the classifier does: test_run_verb_...)
    assert main(["run", str(one_video["dir"]), out, "--model", str(tmp_path / "sm"), "--model-output", "reversed",
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert set(read_output(out).column("label").to_pylist()) == {labels[len(labels) - 1 - labels.index("stripes")]}
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").iterdir()]
    assert record["config"]["model"]["output"] == "reversed"
    assert main(["run", str(one_video["dir"]), str(tmp_path / "none"), "--model", str(tmp_path / "sm"), "--no-progress"]) == 2
    assert "has 2 outputs (probs, reversed); rayvid uses one, [batch, classes]: name it with --model-output NAME" \
        in capsys.readouterr().err


def test_yaml_config_and_flag_overrides(ray_session, one_video, shapes_model, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"input": str(one_video["dir"]), "output": str(tmp_path / "ignored"),
                                   "model": {"name": shapes_model["path"], "topk": 2},
                                   "sampling": {"every": 2}, "progress": False}))
    out = str(tmp_path / "out")
    assert main(["run", "--config", str(cfg), str(one_video["dir"]), out]) == 0
    t = read_output(out)
    assert t.column("frame_index").to_pylist() == list(range(0, one_video["n"], 2))
    assert all(len(k) == 2 for k in t.column("topk").to_pylist())
    # the run record repeats the run
    record = next((tmp_path / "out" / "runs").iterdir())
    out2 = str(tmp_path / "out2")
    assert main(["run", "--config", str(record), str(one_video["dir"]), out2]) == 0
    assert read_output(out2).num_rows == t.num_rows


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "/definitely/not/here", "OUT"], "rayvid: error: input not found: /definitely/not/here"),
        (["run", "IN"], "rayvid: error: OUTPUT is required"),
        (["run", "IN", "OUT", "--every", "0"], "rayvid: error: --every must be >= 1"),
        # (it read as no --run-id: a new one, unsaid)
        (["run", "IN", "OUT", "--run-id", ""], "rayvid: error: --run-id needs a value (leave it out for a new run id)"),
        # (as no --config, no --address: the settings in it, the cluster, left out unsaid; a QA find)
        (["run", "IN", "OUT", "--config", ""], "rayvid: error: --config needs a value: a YAML file or a runs/<id>.json"),
        (["run", "IN", "OUT", "--address", " "], "rayvid: error: --address needs a value (leave it out for RAY_ADDRESS"),
        (["run", "IN", "OUT", "--skip-similar=nan"], "rayvid: error: --skip-similar T must be a finite number, got 'nan'"),
        (["segments", "OUT", "--gap", "-1"], "rayvid: error: --gap and --min-duration must be >= 0 seconds, got -1 and 0"),
        (["find", "OUT", "cat", "--min-duration", "-2"], "rayvid: error: --gap and --min-duration must be >= 0 seconds"),
        (["compact", "OUT", "--target-rows", "0"], "rayvid: error: --target-rows must be >= 1, got 0"),
        (["compact", "/definitely/not/here"], "rayvid: error: no rayvid output at /definitely/not/here (no videos/ folder)"),
    ],
)
def test_cannot_run_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_output_that_is_a_file_is_said_so(ray_session, one_video, shapes_model, tmp_path, capsys):
    (tmp_path / "out.txt").write_text("mine")
    assert main(["run", str(one_video["dir"]), str(tmp_path / "out.txt"), "--model", shapes_model["path"],
                 "--dry-run"]) == 2
    assert f"rayvid: error: cannot read OUTPUT {tmp_path / 'out.txt'}: it is a file, not a folder" in \
        capsys.readouterr().err
    assert (tmp_path / "out.txt").read_text() == "mine"
    assert main(["run", str(one_video["dir"]), str(tmp_path / "out.txt" / "out"), "--model", shapes_model["path"],
                 "--dry-run"]) == 2  # a file above OUTPUT: what the system says
    assert f"cannot read OUTPUT {tmp_path / 'out.txt' / 'out'}: [Errno 20] Not a directory" in capsys.readouterr().err


def test_a_negative_number_in_exponent_form_is_a_value(capsys):
    """`--fps -1e-3` reaches the range check (argparse took `-1e-3` for an option: "expected
    one argument"); a word that is not a number is still an option."""
    assert main(["run", "IN", "OUT", "--fps", "-1e-3"]) == 2
    assert "fps" in (err := capsys.readouterr().err) and "expected one argument" not in err
    with pytest.raises(SystemExit):
        main(["run", "IN", "OUT", "--fps", "-x"])
    assert "argument --fps: expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--fps", "--segment-seconds", "--decode-timeout", "--commit-interval",
                                  "--gpus-per-actor", "--iou-threshold"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-Infinity"])
@pytest.mark.parametrize("joined", [True, False])
def test_number_flags_take_finite_numbers_only(flag, value, joined, capsys):
    """float() takes nan and inf, which pass every range check (nan < 0 is false) and would
    fail deep in a stage with a traceback (--fps nan: "cannot convert float NaN to integer").
    As its own word, `-inf` is the flag's value too (argparse took it for an option)."""
    with pytest.raises(SystemExit) as exit_:
        main(["run", "IN", "OUT", f"{flag}={value}"] if joined else ["run", "IN", "OUT", flag, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"rayvid run: error: argument {flag}: expected a finite number, got '{value}' "
                                       f"(see `rayvid run --help`)\n")  # one line, no usage block


@pytest.mark.parametrize("flag, value", [(["--fps", "2"], {"fps": 2.0}), (["--every", "3"], {"every": 3}),
                                         (["--keyframes"], {"keyframes": True})])
@pytest.mark.parametrize("mode", [{"every": 5}, {"fps": 0.5}, {"keyframes": True}])
def test_a_sampling_mode_flag_replaces_the_configs(flag, value, mode, tmp_path):
    """Flags override the config file (and a run record): a sampling mode given as a flag
    is the run's mode, whatever mode the file has (the modes are exclusive)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sampling": {**mode, "skip_similar": 1.0}}))
    cfg = config_from_args(parse_args(["run", "in", "out", "--config", str(path), *flag]))
    assert cfg.sampling == SamplingConfig(skip_similar=1.0, **value)

    record = tmp_path / "runs" / "r1.json"  # as pipeline.run writes it
    record.parent.mkdir()
    old = RunConfig(input="in", output="out", run_id="r1", sampling=SamplingConfig(**mode))
    record.write_text(json.dumps({"run_id": "r1", "status": "finished", "config": old.to_dict()}))
    again = config_from_args(parse_args(["run", "--config", str(record), *flag]))
    assert again.sampling == SamplingConfig(**value) and (again.input, again.output) == (old.input, old.output)
    assert again.run_id != "r1"


def test_a_model_file_flag_over_a_config_with_weights_drops_them(tmp_path):
    """A config file (or a run record) of a keras.applications model with --weights, then
    `--model FILE`: those weights were the file's model's; a model file holds its own (and
    any --weights with one is refused): the run was exit 2, naming a flag never typed, and
    no flag could unset them."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "resnet50", "weights": "imagenet"}}))
    cfg = config_from_args(parse_args(["run", "in", "out", "--config", str(path), "--model", str(tmp_path / "m.keras")]))
    assert (cfg.model.name, cfg.model.weights) == (str(tmp_path / "m.keras"), None)
    assert config_from_args(parse_args(["run", "in", "out", "--config", str(path), "--model", "resnet101"])).model.weights \
        == "imagenet"  # another keras.applications name: the file's weights stay
    with pytest.raises(ConfigError, match=r"^--weights is for keras.applications models"):  # typed: refused
        config_from_args(parse_args(["run", "in", "out", "--config", str(path), "--model", str(tmp_path / "m.keras"),
                                     "--weights", "none"]))


def test_boolean_settings_of_a_config_or_record_can_be_turned_off(tmp_path):
    """A config file's (or a repeated run record's) `retry_failed`, `xla`, `keyframes`...
    could be turned on by a flag but not off: every boolean has its --no- flag."""
    record = tmp_path / "runs" / "r1.json"
    record.parent.mkdir()
    old = RunConfig.from_dict({"input": "in", "output": "out", "run_id": "r1", "retry_failed": True,
                               "model": {"xla": True, "mixed_precision": True, "embed": "auto", "embed_normalize": True},
                               "sampling": {"keyframes": True, "skip_similar": 1.0}})
    record.write_text(json.dumps({"run_id": "r1", "status": "finished", "config": old.to_dict()}))
    same = config_from_args(parse_args(["run", "--config", str(record)]))
    assert same.retry_failed and same.model.xla and same.sampling.keyframes
    off = config_from_args(parse_args(["run", "--config", str(record), "--no-retry-failed", "--no-xla",
                                       "--no-mixed-precision", "--no-embed-normalize", "--no-keyframes"]))
    assert not (off.retry_failed or off.model.xla or off.model.mixed_precision or off.model.embed_normalize)
    assert off.sampling == SamplingConfig(skip_similar=1.0)  # every frame; the rest kept
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sampling": {"every": 5}}))
    assert config_from_args(parse_args(["run", "in", "out", "--config", str(path), "--no-keyframes"])).sampling.every == 5
    assert config_from_args(parse_args(["run", "in", "out", "--xla"])).model.xla
    keyframes = tmp_path / "k.yaml"
    keyframes.write_text(yaml.safe_dump({"sampling": {"keyframes": True}, "progress": False}))
    cfg = config_from_args(parse_args(["run", "in", "out", "--config", str(keyframes), "--every", "5", "--no-keyframes",
                                       "--progress"]))
    assert (cfg.sampling.every, cfg.sampling.keyframes, cfg.progress) == (5, False, True)
    assert config_from_args(parse_args(["run", "in", "out", "--no-progress"])).progress is False
    # the two settings with an optional value: off with --no-embed, --no-skip-similar
    off = config_from_args(parse_args(["run", "--config", str(record), "--no-embed", "--no-skip-similar"]))
    assert (off.model.embed, off.sampling.skip_similar, off.sampling.keyframes) == (None, None, True)
    for both in (["--embed", "--no-embed"], ["--no-skip-similar", "--skip-similar=2"]):
        with pytest.raises(ConfigError, match=f"--{both[0].strip('-').replace('no-', '')} and "
                                              f"--no-{both[0].strip('-').replace('no-', '')} contradict"):
            config_from_args(parse_args(["run", "in", "out", *both]))


def test_the_readme_config_file_holds_every_key_at_its_default(tmp_path):
    """README's --config example names every setting (a renamed or new key fails here) at its
    default: the same config as the flags INPUT OUTPUT --model resnet50."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    (block,) = re.findall(r"```yaml\n(input: s3://archive/videos/\n.*?)```", readme, re.S)
    path = tmp_path / "c.yaml"
    path.write_text(block)
    # as it is (its `run_id: null` too: null is the default, a new run id)
    from_file = config_from_args(parse_args(["run", "--config", str(path)])).to_dict()
    from_flags = config_from_args(parse_args(["run", "s3://archive/videos/", "s3://archive/predictions/",
                                              "--model", "resnet50"])).to_dict()
    assert from_file.pop("run_id") != from_flags.pop("run_id")
    assert from_file == from_flags
    assert set(yaml.safe_load(block)) == set(from_flags) | {"run_id"}
    assert {k: set(v) for k, v in yaml.safe_load(block).items() if isinstance(v, dict)} == \
        {k: set(v) for k, v in from_flags.items() if isinstance(v, dict)}


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path):
    """`fps: 1e3` in a --config file is 1000.0, as on the command line (PyYAML follows YAML
    1.1, which reads it as the string '1e3': "expected a finite number, got '1e3'"); a
    negative one reaches the range check; quoted, it stays a string."""
    path = tmp_path / "c.yaml"
    path.write_text("sampling: {fps: 1e3}\ndecode: {segment_s: 1.5e1, timeout_s: .5e2}\n")
    cfg = config_from_args(parse_args(["run", "in", "out", "--config", str(path)]))
    assert (cfg.sampling.fps, cfg.decode.segment_s, cfg.decode.timeout_s) == (1000.0, 15.0, 50.0)
    path.write_text("sampling: {fps: -1e-3}\n")
    with pytest.raises(ConfigError, match=r"--fps must be > 0, got -0.001"):
        config_from_args(parse_args(["run", "in", "out", "--config", str(path)]))
    path.write_text("sampling: {fps: '1e3'}\n")
    with pytest.raises(ConfigError, match=r"config.sampling.fps: expected a finite number, got '1e3'"):
        config_from_args(parse_args(["run", "in", "out", "--config", str(path)]))


def test_yaml_integers_are_yaml_1_2s(tmp_path):
    """YAML 1.1's integer forms changed values silently: `every: 010` was 8 (octal),
    `fps: 1:30` 90 (base 60), `0b11` 3, `1_000` 1000 (a QA find). As in YAML 1.2, 010 is
    ten, 0o and 0x are octal and hex, and the others are text, refused as a setting's value."""
    path = tmp_path / "c.yaml"
    path.write_text("sampling: {every: 010}\ndecode: {threads: 0x2, batch_frames: 0o20}\n")
    cfg = config_from_args(parse_args(["run", "in", "out", "--config", str(path)]))
    assert (cfg.sampling.every, cfg.decode.threads, cfg.decode.batch_frames) == (10, 2, 16)
    for text, message in [("sampling: {fps: 1:30}", "config.sampling.fps: expected a finite number, got '1:30'"),
                          ("sampling: {every: 0b11}", "config.sampling.every: expected an integer, got '0b11'"),
                          ("sampling: {every: 1_000}", "config.sampling.every: expected an integer, got '1_000'"),
                          ("sampling: {fps: 1_0.5}", "config.sampling.fps: expected a finite number, got '1_0.5'")]:
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_args(parse_args(["run", "in", "out", "--config", str(path)]))


@pytest.mark.parametrize(
    "text, message",
    [
        ("- in\n- out\n", "config {path}: expected a mapping of settings, got list"),
        ("just words\n", "config {path}: expected a mapping of settings, got str"),
        ("model: [resnet50]\n", "config.model: expected a mapping, got list"),
        # (a section that YAML reads as false, 0, '' or [] ran with its defaults)
        ("model: false\n", "config.model: expected a mapping, got bool"),
        ("decode: 0\n", "config.decode: expected a mapping, got int"),
        ("infer: ''\n", "config.infer: expected a mapping, got str"),
        ("sampling: []\n", "config.sampling: expected a mapping, got list"),
        ("run_id: ''\n", "config {path}: run_id needs a value (null, or leave it out, for a new run id)"),
        ("address: ''\n", "config {path}: address needs a value (null, or leave it out, for RAY_ADDRESS, else an "
                           "embedded local Ray)"),
        ("model: {preprocess: bogus}\n", "--preprocess must be one of auto, raw, unit, tf, caffe, torch, got 'bogus'"),
        ("model: {input_size: 224}\n", "config.model.input_size: expected two integers [H, W], got 224"),
        ("model: {topk: '3'}\n", "config.model.topk: expected an integer, got '3'"),
        ("model: {embed: true}\n", "config.model.embed: expected a string, got True"),
        ("decode: {threads: 0}\n", "--decode-threads must be >= 1, got 0"),
        ("sampling: {fps: .nan}\n", "config.sampling.fps: expected a finite number, got nan"),
        ("decode: {segment_s: .inf}\n", "config.decode.segment_s: expected a finite number, got inf"),
        ('{"run_id": "r", "config": [1]}\n', "config {path}: expected a mapping of settings, got list"),
        # (these were tracebacks, or several lines naming "<unicode string>", or silent)
        ("1: 2\n", "config: keys are setting names; got 1; known: input, "),
        ("sampling: {yes: 1}\n", "config.sampling: keys are setting names; got True; known: every, "),
        ("input: a\n---\noutput: b\n", "config {path} is not valid YAML: expected a single document in the stream, "
                                         "but found another document (line 2, column 1)"),
        ("model:\n  topk: 3\n   xla: true\n", "config {path} is not valid YAML: mapping values are not allowed here "
                                             "(line 3, column 7)"),
        ("sampling: {every: 2}\nsampling: {fps: 1}\n", "config {path} is not valid YAML: key 'sampling' given twice "
                                                       "(line 2, column 1)"),
        (b"input: caf\xe9\n", "config {path} is not UTF-8 text (byte 10)"),
    ],
)
def test_a_bad_config_file_exits_2_with_one_line(text, message, tmp_path, capsys):
    """The YAML path has the checks the flags have: never a traceback."""
    path = tmp_path / "c.yaml"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    assert main(["run", "in", "out", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rayvid: error: {message.format(path=path)}") and err.count("\n") == 1, err


def test_a_record_of_a_run_given_an_empty_address_repeats_as_none(tmp_path):
    """A run before `--address ''` was refused recorded `"address": ""` (it meant none):
    its record still repeats (and `similar --image` still reads it: RunConfig takes it)."""
    from rayvid.config import RunConfig

    record = tmp_path / "r1.json"
    record.write_text(json.dumps({"run_id": "r1", "config": {"input": "/in", "output": "/out", "address": ""}}))
    assert config_from_args(parse_args(["run", "--config", str(record)])).address is None
    assert RunConfig.from_dict({"input": "/in", "output": "/out", "address": ""}).address == ""


@pytest.mark.parametrize(
    "argv, embed, skip_similar",
    [
        (["in", "out", "--embed"], "auto", None),
        (["--embed", "avg_pool", "in", "out"], "avg_pool", None),
        (["in", "out", "--embed", "avg_pool"], "avg_pool", None),
        (["in", "out", "--skip-similar"], None, SKIP_SIMILAR_DEFAULT),
        (["--skip-similar", "3", "in", "out"], None, 3.0),
        (["in", "out", "--skip-similar", "0"], None, 0.0),
        (["in", "out", "--embed", "--skip-similar"], "auto", SKIP_SIMILAR_DEFAULT),
        (["--embed", "--", "in", "out"], "auto", None),
        (["--config", "{config}", "--embed=avg_pool", "--skip-similar=3"], "avg_pool", 3.0),
        (["--config", "{config}", "--embed", "--skip-similar"], "auto", SKIP_SIMILAR_DEFAULT),
    ],
)
def test_optional_values_as_documented(argv, embed, skip_similar, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"input": "in", "output": "out"}))
    cfg = config_from_args(parse_args(["run", *(a.format(config=config) for a in argv)]))
    assert (cfg.input, cfg.output) == (os.path.abspath("in"), os.path.abspath("out"))
    assert (cfg.model.embed, cfg.sampling.skip_similar) == (embed, skip_similar)


@pytest.mark.parametrize("argv", [["in", "--model", "m.keras", "out"], ["--every", "2", "in", "--model", "m.keras", "out"],
                                  ["in", "out", "--model", "m.keras", "--every", "2"],
                                  ["in", "--model", "m.keras", "--", "out"], ["in", "--model", "m.keras", "--", "-o"]])
def test_input_and_output_may_have_flags_between_them(argv):
    """argparse filled both optional positionals from the first run of words: `run IN --model
    X OUT` was "unrecognized arguments: OUT"."""
    cfg = config_from_args(parse_args(["run", *argv]))
    output = "-o" if "-o" in argv else "out"  # after "--" a word is positional, whatever it looks like
    assert (cfg.input, cfg.output, cfg.model.name) == tuple(os.path.abspath(p) for p in ("in", output, "m.keras"))


def test_a_word_too_many_is_an_error_naming_it_and_the_verbs_help(capsys):
    for argv, word in ((["run", "in", "--model", "m", "out", "more"], "more"), (["summary", "out", "more"], "more"),
                       (["run", "in", "out", "--bogus"], "--bogus")):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err == (f"rayvid {argv[0]}: error: unrecognized arguments: {word} "
                                           f"(see `rayvid {argv[0]} --help`)\n")



def test_a_parser_error_shows_no_credentials(capsys):
    """argparse echoes the word it refused: a model URL given without `--model` (a word too
    many) or a URL given to a number flag showed its password or token (a QA find)."""
    for argv in (["run", "s3://b/in", "/tmp/o", "https://u:S3CRETPW@host/m.keras"],
                 ["run", "a", "b", "--every", "https://u:S3CRETPW@h/x"],
                 ["run", "a", "b", "--decoder", "https://h/x?token=S3CRETPW"],
                 ["summary", "s3://b/o", "https://h/x#access_token=S3CRETPW"]):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "error:" in err
        assert "S3CRETPW" not in err and ("***@" in err or "<redacted>" in err), err

@pytest.mark.parametrize(
    "argv, message",
    [
        (["--embed", "in", "out"], "--embed takes 'in' as its LAYER here, and then INPUT OUTPUT are not both given: "
                                   "write --embed=in if that is the LAYER, or put --embed after INPUT OUTPUT"),
        (["in", "--embed", "out"], "--embed takes 'out' as its LAYER here"),
        (["--skip-similar", "in", "out"], "--skip-similar takes 'in' as its T here, and then INPUT OUTPUT are not "
                                          "both given: write --skip-similar=in if that is the T"),
        (["--skip-sim", "2", "in"], "--skip-similar takes '2' as its T here"),
        # with --config and no INPUT OUTPUT on the line, they come from the file: avg_pool is the
        # LAYER, and the run goes on (to the file's INPUT, which is not there)
        (["--config", "{config}", "--embed", "avg_pool"], "input not found: "),
        (["--config", "{config}", "--embed", "in", "out"], "--embed takes 'in' as its LAYER here"),
        (["--embed", "s3://AKIAFAKEFAKEFAKE:pw@b/in/", "out"], "--embed takes 's3://b/in/' as its LAYER here"),
        (["in", "out", "--skip-similar", "lots"], "--skip-similar T must be a finite number, got 'lots'"),
    ],
)
def test_an_optional_value_never_takes_input_or_output(argv, message, tmp_path, capsys):
    """`--embed` and `--skip-similar` take the next word as their value only where INPUT and
    OUTPUT are given besides it; else that word may be INPUT: a clear error, not a guess."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"input": "in", "output": "out"}))
    assert main(["run", *(a.format(config=config) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayvid: error: ") and message in err and err.count("\n") == 1
    assert "AKIA" not in err and "pw@" not in err


def test_job_entrypoint_on_a_running_cluster_and_no_secret_leaks(ray_session, one_video, shapes_model, s3fs_client):
    """jobs/classify_videos.py as `ray job submit` runs it (a driver connecting through
    RAY_ADDRESS), over S3 with known fake credentials; then every byte it wrote and printed
    is searched for them."""
    s3fs_client.put_file(str(one_video["dir"] / "c.mkv"), "s3://rayvid-test/job-in/c.mkv")
    s3fs_client.pipe_file("s3://rayvid-test/job-in/broken.mp4", b"\x00" * 100)
    out = "s3://rayvid-test/job-out"
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "classify_videos.py"), "s3://rayvid-test/job-in/", out,
         "--model", shapes_model["path"], "--no-progress", "--run-id", "job-1"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 ok, 1 failed" in proc.stdout
    assert read_output(out).num_rows == one_video["n"]
    assert read_output(out, "errors").column("video_uri").to_pylist() == ["s3://rayvid-test/job-in/broken.mp4"]

    written = b"".join(s3fs_client.cat_file(p) for p in s3fs_client.find(out))
    for text in (proc.stdout.encode(), proc.stderr.encode(), written):
        assert FAKE_KEY_ID.encode() not in text and FAKE_SECRET.encode() not in text
    for p in s3fs_client.find(out):
        if p.endswith(".parquet"):
            with s3fs_client.open(p) as f:
                for col in pq.read_table(f).columns:
                    assert not any(FAKE_SECRET in str(v) or FAKE_KEY_ID in str(v) for v in col.to_pylist())


def test_no_credentials_is_a_clear_error(s3_endpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(AWS_ENDPOINT_URL=s3_endpoint, AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-m", "rayvid", "run", "s3://rayvid-test/in/", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "rayvid: error: cannot read s3://rayvid-test/in/: Unable to locate credentials (check credentials" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_kill_9_the_driver_then_rerun_loses_and_duplicates_nothing(ray_session, media, shapes_model, tmp_path, how,
                                                                   capsys):
    """The driver (a `ray job submit` entrypoint on the running cluster) is SIGKILLed (or
    interrupted: Ctrl-C) right after its first commit, mid-run; the same command again skips
    what was committed and completes the output with every frame of every video exactly
    once. Ctrl-C ends the run with exit 130 and one line saying what to do, no traceback.
    `rayvid runs` shows the killed run as interrupted (its record still says running)."""
    import re
    import shutil
    import time

    src = tmp_path / "in"
    copies = 8  # 24 videos
    for k in range(copies):
        shutil.copytree(media["videos"], src / f"copy{k}")
    n = copies * len(media["truth"])
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "classify_videos.py"), str(src), str(out),
           "--model", shapes_model["path"], "--no-progress", "--commit-interval", "0", "--decode-actors", "1", "1",
           "--batch-size", "1"]  # one frame a batch: results reach the driver in small steps, over seconds
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    # SIGINT as a terminal delivers it: a test run in the background (`make test &`) starts its
    # children with SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "videos").is_dir() and any(p.suffix == ".parquet" for p in (out / "videos").iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the first run ended before it could be killed"
    proc.send_signal(getattr(signal, how))
    said_out, err = proc.communicate(timeout=120)
    if how != "SIGKILL":  # SIGTERM: Ray's handler in the driver raises SystemExit(15)
        # (Ray's driver printed the decode actors' tasks failing as Ray Data killed them, on
        # stdout, in 2 of 3 tries by hand: "Task MapWorker(...).submit failed. There are
        # infinite retries remaining ... killed by ray.kill")
        assert "killed by `ray.kill`" not in said_out and "Traceback" not in said_out, said_out[-3000:]
        said, code, why = {"SIGINT": ("interrupted", 130, "KeyboardInterrupt"),
                           "SIGTERM": ("terminated (SIGTERM)", 143, "SystemExit: 15")}[how]
        assert proc.returncode == code, err[-3000:]
        assert err.rstrip().endswith(f"rayvid: {said}; the videos complete by now are committed: "
                                     "run the same command again to finish"), err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        record = json.loads(next((out / "runs").iterdir()).read_text())
        assert record["status"] == "failed" and why in json.dumps(record), record
    else:
        assert json.loads(next((out / "runs").iterdir()).read_text())["status"] == "running"
    first = "interrupted" if how == "SIGKILL" else "failed"
    assert [r["status"] for r in query.runs(str(out)).to_pylist()] == [first]
    # (a SIGKILLed run's record is its first, or a heartbeat's: either says what it listed)
    assert [(r["videos_listed"], r["videos_skipped"]) for r in query.runs(str(out)).to_pylist()] == [(n, 0)]

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    listed, skipped, ok, failed = map(int, re.search(
        r"(\d+) listed, (\d+) skipped \(already done\), (\d+) ok, (\d+) failed", done.stdout).groups())
    assert (listed, failed) == (n, 0)
    assert skipped > 0 and ok > 0 and skipped + ok == n  # killed mid-run; its commits were kept
    capsys.readouterr()
    assert main(["runs", str(out), "--format", "json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in runs] == [first, "finished"]
    assert (runs[1]["videos_listed"], runs[1]["videos_skipped"], runs[1]["videos_ok"]) == (n, skipped, ok)
    assert runs[0]["input"] == runs[1]["input"] == str(src)
    if how == "SIGKILL":
        assert runs[0]["finished_at"] is None and runs[0]["last_heartbeat"] and runs[0]["error"] is None
    else:  # a failed run's record says what it committed before it stopped: what the rerun skipped
        assert runs[0]["finished_at"] and runs[0]["error"] == {"SIGINT": "KeyboardInterrupt",
                                                               "SIGTERM": "SystemExit: 15"}[how]
        assert (runs[0]["videos_listed"], runs[0]["videos_skipped"], runs[0]["videos_ok"]) == (n, 0, skipped)
    preds = read_output(str(out))
    seen = {}
    for uri, idx in zip(preds.column("video_uri").to_pylist(), preds.column("frame_index").to_pylist()):
        seen.setdefault(uri, []).append(idx)
    expected = {str(src / f"copy{k}" / os.path.relpath(p, media["videos"])): len(v)
                for k in range(copies) for p, v in media["truth"].items()}
    assert {u: sorted(v) for u, v in seen.items()} == {u: list(range(n)) for u, n in expected.items()}
    videos = read_output(str(out), "videos").column("video_uri").to_pylist()
    assert sorted(videos) == sorted(expected)


@pytest.mark.parametrize("second_input", ["same", "manifest"])
def test_a_second_run_over_the_same_input_while_the_first_runs_stops(ray_session, media, shapes_model, tmp_path,
                                                                      second_input):
    """The same command again while the first still runs (it seemed stuck; a second
    submission), or a run over a manifest sharing videos with it (overlapping shards): both
    committed every video they shared, each frame twice. The second says which run it met
    and exits 2 before committing anything; the first finishes: each frame once. (A run
    over a manifest writes its listing beside its record while it runs, for this.)"""
    import shutil
    import time

    src = tmp_path / "in"
    for k in range(4):
        shutil.copytree(media["videos"], src / f"copy{k}")
    out = tmp_path / "out"
    first_input = tmp_path / "first.txt"  # copies 0-2 by manifest
    from rayvid.listing import is_video

    files = sorted(str(p) for p in src.rglob("*") if p.is_file() and is_video(str(p)))  # as the folder lists
    first_input.write_text("".join(f"{p}\n" for p in files if "/copy3/" not in p))
    second = src if second_input == "same" else tmp_path / "second.txt"  # copies 2-3 by manifest
    if second_input == "manifest":
        second.write_text("".join(f"{p}\n" for p in files if "/copy2/" in p or "/copy3/" in p))
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "classify_videos.py"), "{input}", str(out),
           "--model", shapes_model["path"], "--no-progress", "--commit-interval", "0", "--decode-actors", "1", "1",
           "--batch-size", "1"]
    first_cmd = [str(src if second_input == "same" else first_input) if a == "{input}" else a for a in cmd]
    cmd = [str(second) if a == "{input}" else a for a in cmd]
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    first = subprocess.Popen(first_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not (out / "runs").is_dir():
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before the second began"
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    what = "the same INPUT" if second_input == "same" else "videos this run lists too"
    assert re.search(rf"rayvid: error: run \S+ \(host .+, started .+\) is running over {what} into this "
                     r"OUTPUT", second.stderr), second.stderr[-3000:]
    runs = {r["status"]: r for r in query.runs(str(out)).to_pylist()}
    assert sorted(runs) == ["failed", "finished"] and runs["failed"]["videos_ok"] == 0
    copies = 4 if second_input == "same" else 3
    preds = read_output(str(out))
    keys = list(zip(preds.column("video_uri").to_pylist(), preds.column("frame_index").to_pylist()))
    assert len(keys) == len(set(keys)) == copies * sum(len(v) for v in media["truth"].values())
    assert read_output(str(out), "videos").num_rows == copies * len(media["truth"])
    assert sorted(os.listdir(out / "runs")) == sorted(f"{r}.json" for r in query.runs(str(out)).column("run_id").to_pylist())


def test_a_run_id_a_live_run_holds_stops_the_run_before_it_writes(ray_session, one_video, shapes_model, tmp_path,
                                                                    capsys):
    """A second run of one --run-id while the first runs (here, on another host, its
    heartbeat 10 s old) overwrote its record and listing and shared its files' names: exit
    2, nothing written; once that run's record says it ended, the id is free again."""
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{one_video['dir'] / 'c.mkv'}\n")
    theirs = {"run_id": "nightly", "status": "running", "started_at": "2026-12-06T01:00:00Z", "host": "gpu-7",
              "node": "gpu-7/boot/1", "pid": 12, "heartbeat_at": time.time() - 10, "listing": True}
    (out / "runs" / "nightly.json").write_text(json.dumps(theirs))
    (out / "runs" / "nightly.videos.parquet").write_bytes(b"theirs")
    argv = ["run", str(manifest), str(out), "--model", shapes_model["path"], "--run-id", "nightly", "--no-progress"]
    assert main(argv) == 2
    assert re.search(r"rayvid: error: run id nightly is in use: a run of that id \(host gpu-7, started "
                     r"2026-12-06T01:00:00Z\) is running into this OUTPUT: .*another --run-id; if it died on its host, "
                     r"it stops counting once its heartbeat \(last 1\d s ago\) is 300 s old", capsys.readouterr().err)
    assert json.loads((out / "runs" / "nightly.json").read_text()) == theirs
    assert (out / "runs" / "nightly.videos.parquet").read_bytes() == b"theirs"
    assert sorted(os.listdir(out)) == ["runs"]
    (out / "runs" / "nightly.json").write_text(json.dumps(dict(theirs, status="failed")))
    assert main(argv) == 0  # a resubmitted job
    assert read_output(str(out)).num_rows == one_video["n"]


def test_a_run_whose_id_another_run_takes_within_moments_stops_and_leaves_its_record(ray_session, one_video,
                                                                                      shapes_model, tmp_path, capsys):
    """Two runs of one id that began within moments each found no live record of it: here
    the other's record (another host's) lands just after this run wrote its own. This run
    stops at its first commit, exit 2, and leaves that record and its listing alone (no
    failed record over it, no listing removed): the other goes on."""
    import threading

    out = tmp_path / "out"
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{one_video['dir'] / 'c.mkv'}\n")
    theirs = {"run_id": "nightly", "status": "running", "started_at": "2026-12-06T01:00:00Z", "host": "gpu-7",
              "node": "gpu-7/boot/1", "pid": 12, "heartbeat_at": time.time(), "listing": True}
    record, listing = out / "runs" / "nightly.json", out / "runs" / "nightly.videos.parquet"
    done = threading.Event()

    def other_run():  # as another process would: its listing, then its record
        while not done.is_set() and not record.exists():
            time.sleep(0.01)
        listing.write_bytes(b"theirs")
        record.write_text(json.dumps(theirs))

    thread = threading.Thread(target=other_run)
    thread.start()
    try:
        assert main(["run", str(manifest), str(out), "--model", shapes_model["path"], "--run-id", "nightly",
                     "--no-progress", "--commit-interval", "0"]) == 2
    finally:
        done.set()
        thread.join()
    assert re.search(r"rayvid: error: run id nightly was taken by another run \(host gpu-7, started "
                     r"2026-12-06T01:00:00Z\) into this OUTPUT", capsys.readouterr().err)
    time.sleep(0.5)  # (a heartbeat or failed record would have landed)
    assert json.loads(record.read_text()) == theirs and listing.read_bytes() == b"theirs"
    assert not (out / "predictions").exists()


@pytest.mark.parametrize("stdout, to, code", [("pipe", "-", 0), ("/dev/full", "summary.csv", 120),
                                               ("closed", "summary.csv", 0)])
def test_the_command_exits_with_mains_code_after_threads_hooks_and_flush(tmp_path, stdout, to, code):
    """`rayvid` (cli.console) leaves the interpreter's teardown out (Arrow's thread pools
    aborted it after the work was done: CI) but does what an exit must: a Python thread
    still running is joined, a thread pool's idle worker let go (joined alone, it waited
    for work for ever), atexit hooks run (a Ctrl-C in one stops nothing), stdout is flushed;
    a flush that fails is exit 120, as Python's own exit."""
    out = str(tmp_path / "out")
    write_output(out, {"/v/a.mp4": [("circle", 0.9)] * 3}, fps=10.0)
    code_ = ("import atexit, concurrent.futures, os, signal, sys, threading, time\n"
             "from rayvid import cli\n"
             "def late():\n"
             "    time.sleep(0.5); open(sys.argv[1], 'w').write('joined')\n"
             "main = cli.main\n"
             "def main_then_a_thread(argv):  # a thread still running when main returns; a pool's idle worker\n"
             "    global pool\n"
             "    code = main(argv); threading.Thread(target=late).start()\n"
             "    pool = concurrent.futures.ThreadPoolExecutor(1); pool.submit(int).result()\n"
             "    return code\n"
             "cli.main = main_then_a_thread\n"
             "def hook():  # a Ctrl-C in an exit hook (Ray's disconnect) stops nothing: the work is done\n"
             "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.3); print('hook ran')\n"
             "atexit.register(hook)\n"
             "cli.console(['summary', sys.argv[2], '--format', 'csv', '--out', sys.argv[3]])\n")
    marker = tmp_path / "marker"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    if to != "-":
        to = str(tmp_path / to)

    def child():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if stdout == "closed":  # `rayvid ... >&-`: sys.stdout is None
            os.close(1)

    with open(stdout if stdout == "/dev/full" else os.devnull, "wb") as sink:
        proc = subprocess.run([sys.executable, "-c", code_, str(marker), out, to], text=True, timeout=60, env=env,
                              stdout=subprocess.PIPE if stdout == "pipe" else sink, stderr=subprocess.PIPE,
                              preexec_fn=child)
    assert proc.returncode == code, proc.stderr
    assert marker.read_text() == "joined"
    if stdout == "pipe":
        assert proc.stdout.splitlines()[-1] == "hook ran" and "/v/a.mp4" in proc.stdout


def test_a_closed_stdout_is_one_line(tmp_path):
    """`rayvid summary OUT >&-`: no stdout at all (sys.stdout None) was a traceback."""
    out = str(tmp_path / "out")
    write_output(out, {"/v/a.mp4": [("circle", 0.9)] * 3}, fps=10.0)
    proc = subprocess.run([sys.executable, "-m", "rayvid", "summary", out], capture_output=False, stderr=subprocess.PIPE,
                          text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert (proc.returncode, proc.stderr) == (2, "rayvid: error: cannot write to stdout: it is closed\n")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    """`python -c code args`, its output captured, with SIGINT as a terminal delivers it (a
    test run in the background starts its children with SIGINT ignored)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_an_object_half_built_when_ctrl_c_came_says_nothing_after_the_last_line(tmp_path):
    """SIGTERM (or Ctrl-C) inside a library's constructor (a Ray Dataset half made, in a QA
    run) left an object whose `__del__` failed once the interrupt was handled: "Exception
    ignored in: Dataset.__del__ ... AttributeError" after rayvid's last line. Now freed,
    unsaid, before it."""
    code = ("import os, signal, sys, time\n"
            "from rayvid import samples\n"
            "from rayvid.cli import console\n"
            "class HalfBuilt:\n"
            "    def __init__(self):\n"
            "        os.kill(os.getpid(), signal.SIGINT); time.sleep(30); self.ready = True\n"
            "    def __del__(self):\n"
            "        self.ready  # AttributeError: __init__ was interrupted\n"
            "samples.ensure_samples = lambda *a, **k: HalfBuilt()\n"
            "console(['samples', sys.argv[1]])\n")
    proc = _python(code, str(tmp_path / "s"))
    assert (proc.returncode, proc.stderr) == (130, "rayvid: interrupted\n")


def _signal_in_exit_hook(sig: str) -> str:
    """The start of a driver script whose exit hook (standing in for Ray's) meets `sig`,
    then says "exit hook done"; `console` imported."""
    return ("import atexit, os, signal, sys, threading, time\n"
            "def at_exit():\n"
            f"    os.kill(os.getpid(), signal.{sig}); time.sleep(0.3); print('exit hook done', flush=True)\n"
            "atexit.register(at_exit)\n"
            "from rayvid.cli import console\n")


def test_a_second_ctrl_c_while_exiting_prints_no_traceback(tmp_path):
    """Ctrl-C twice (a user who presses it again): the second landed in Ray's own shutdown at
    exit (its atexit hook, where Ray started before rayvid knew it had) and printed
    "Exception ignored in atexit callback" and a traceback after rayvid's one line. An
    exit hook that meets a second SIGINT stands in for Ray's here."""

    code = (_signal_in_exit_hook("SIGINT")
            + "threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()  # (once imported)\n"
            "sys.argv = ['rayvid', 'samples', sys.argv[1], '--videos', '500', '--seconds', '2']\n"
            "console()  # as the `rayvid` command does\n")
    proc = _python(code, str(tmp_path / "s"))
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "rayvid: interrupted", proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "exit hook done" in proc.stdout


@pytest.mark.parametrize("address, message", [
    ("http://127.0.0.1:8265", "is a dashboard's URL (what `ray job submit --address` takes): give the cluster's address"),
    ("127.0.0.1:1", "cannot reach the Ray cluster at 127.0.0.1:1: Connection refused"),
    # (the password was said twice: no Ray address has user-info, but one typed it)
    ("user:pw@127.0.0.1:1", "cannot reach the Ray cluster at ***@127.0.0.1:1: "),
    # Ray Client connected, then Ray Data's executor failed (a traceback, exit 1: a QA helper)
    ("ray://127.0.0.1:10001", "is a Ray Client address: Ray Data's streaming executor does not run through Ray "
                              "Client; submit the job to the cluster"),
])
def test_a_ray_address_rayvid_cannot_join_is_one_line(address, message, tmp_path, capsys, monkeypatch):
    """The dashboard's address (a traceback, exit 1) and one nothing answers at (Ray retried
    for minutes, saying only that it could not connect): exit 2, one line, at once."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "in").mkdir()
    assert main(["run", str(tmp_path / "in"), str(tmp_path / "out"), "--address", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayvid: error: ") and message in err and err.count("\n") == 1, err
    assert "pw" not in err


@pytest.mark.parametrize("typed, flag", [
    ({"input": "https://user:pw@cdn.example/videos/list.txt"}, "INPUT"),
    ({"input": "https://cdn.example:8080/a@b/list.txt"}, "INPUT"),  # reads as user-info: recorded as ***@
    ({"model": {"name": "https://cdn.example/m.keras?X-Amz-Signature=abc"}}, "--model"),
    ({"model": {"labels": "https://cdn.example/labels.txt?sig=abc"}}, "--labels"),
])
def test_a_record_with_a_redacted_url_is_refused_unless_given_again(tmp_path, typed, flag):
    """A run record keeps no credentials (pipeline._redacted): repeating it where a URL lost
    its user-info or signature is exit 2 naming the setting to give again, not a rerun
    against `https://***@...` or `...?<redacted>`; given on the command line, it runs."""
    from rayvid.pipeline import _redacted

    cfg = RunConfig.from_dict(merge({"input": "/in", "output": "/out", "run_id": "r1"}, typed))
    record = tmp_path / "runs" / "r1.json"
    record.parent.mkdir()
    record.write_text(json.dumps(_redacted({"run_id": "r1", "status": "finished", "config": cfg.to_dict()})))
    with pytest.raises(ConfigError) as e:
        config_from_args(parse_args(["run", "--config", str(record)]))
    assert f"give {flag} on the command line" in str(e.value) and "pw" not in str(e.value) and "abc" not in str(e.value)
    again = {"INPUT": ["/in2"], "--model": ["--model", "/m.keras"], "--labels": ["--labels", "/l.txt"]}[flag]
    cfg2 = config_from_args(parse_args(["run", "--config", str(record), *again]))
    assert cfg2.run_id != "r1" and "***" not in json.dumps(cfg2.to_dict()) and "<redacted>" not in json.dumps(cfg2.to_dict())


def test_a_record_says_which_settings_lost_credentials_and_only_those_are_refused(tmp_path, capsys):
    """A local INPUT whose name holds `***` (nothing redacted from it) was refused from its
    record as "credentials taken out" (the record was searched for the marks redaction
    leaves); the record now lists the settings redaction changed. A record from before it
    did is searched as before. The refusal's own hint is not garbled by the redaction of
    the message (an example URL in it read as user-info)."""
    from rayvid.pipeline import _redacted

    cfg = RunConfig.from_dict({"input": "/data/vid***s", "output": "/out", "run_id": "r1",
                               "model": {"labels": "https://u:pw@cdn.example/l.txt"}})
    record = _redacted({"run_id": "r1", "status": "finished", "config": cfg.to_dict()})
    assert record["redacted"] == ["model.labels"]
    path = tmp_path / "r1.json"
    path.write_text(json.dumps(record))
    assert main(["run", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "recorded model.labels with its credentials taken out" in err and "give --labels" in err and "pw" not in err
    assert err.endswith("(a URL with an '@' in its path after a port number is recorded the same way)\n"), err
    assert config_from_args(parse_args(["run", "--config", str(path), "--labels", "/l.txt"])).input == "/data/vid***s"
    del record["redacted"]  # (a record before the list: the marks, as before)
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="recorded input with its credentials taken out"):
        config_from_args(parse_args(["run", "--config", str(path), "--labels", "/l.txt"]))


def test_a_config_file_that_cannot_be_reached_is_not_said_missing(tmp_path, capsys):
    """fsspec's HTTP filesystem says FileNotFoundError for a server it cannot reach: the
    error said "config file not found" (a QA find); it says why now, and not found where
    nothing is there."""
    assert main(["run", "--config", "http://127.0.0.1:9/c.yaml", "a", "b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayvid: error: cannot read config http://127.0.0.1:9/c.yaml: Cannot connect to host"), err
    assert main(["run", "--config", str(tmp_path / "none.yaml"), "a", "b"]) == 2
    assert capsys.readouterr().err == f"rayvid: error: config file not found: {tmp_path / 'none.yaml'}\n"


def test_a_sigterm_once_the_command_is_done_stops_nothing(tmp_path):
    """A SIGTERM in the seconds a finished command takes to exit (its exit hooks: Ray's
    driver disconnect, here one that stands in for it) ended a finished run's job with 143
    and its summary unsaid (a QA find); as a Ctrl-C there, it is ignored: exit 0, the hook
    done."""
    code = _signal_in_exit_hook("SIGTERM") + "console(['samples', sys.argv[1], '--videos', '1', '--seconds', '0.5'])\n"
    proc = _python(code, str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exit hook done" in proc.stdout
