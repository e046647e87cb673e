from __future__ import annotations

import json
import os
import re

import pytest

from rayvid.config import InferConfig, ModelConfig, RunConfig, SamplingConfig, merge
from rayvid.errors import ConfigError


def test_round_trip_through_dict():
    cfg = RunConfig.from_dict({"input": "in/", "output": "out/", "model": {"name": "resnet50", "input_size": [240, 320]},
                               "sampling": {"fps": 2.0}})
    assert cfg.model.input_size == (240, 320) and cfg.sampling.fps == 2.0 and cfg.run_id
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_validation_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown key\\(s\\) modle"):
        RunConfig.from_dict({"input": "a", "output": "b", "modle": {}})
    with pytest.raises(ConfigError, match="exclusive"):
        SamplingConfig(every=2, fps=1.0)
    with pytest.raises(ConfigError, match="--every must be >= 1"):
        SamplingConfig(every=0)
    with pytest.raises(ConfigError, match="--skip-similar must be >= 0, got -1"):
        SamplingConfig(skip_similar=-1.0)
    assert SamplingConfig(skip_similar=0.0).skip_similar == 0.0
    with pytest.raises(ConfigError, match="OUTPUT is required"):
        RunConfig(input="a", output="")


def test_merge_drops_unset_values():
    assert merge({"a": 1, "m": {"x": 1, "y": 2}}, {"a": None, "m": {"x": None, "y": 3}, "n": {"z": None}}) == {
        "a": 1, "m": {"x": 1, "y": 3}, "n": {}}


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "..", "x\ny", ""])
def test_run_id_cannot_name_a_path_outside_output(run_id):
    if run_id == "":
        assert RunConfig(input="a", output="b", run_id=run_id).run_id  # generated
        return
    with pytest.raises(ConfigError, match="--run-id must match"):
        RunConfig(input="a", output="b", run_id=run_id)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"model": {"topk": "3"}}, "config.model.topk: expected an integer, got '3'"),
        ({"model": {"topk": True}}, "config.model.topk: expected an integer, got True"),
        ({"model": {"input_size": 224}}, r"config.model.input_size: expected two integers \[H, W\], got 224"),
        ({"model": {"input_size": [224, "x"]}}, r"config.model.input_size: expected two integers .*, got \(224, 'x'\)"),
        ({"model": {"input_size": [0, 224]}}, r"--input-size must be two sizes >= 1 \(H W\), got \[0, 224\]"),
        ({"model": {"mixed_precision": "false"}}, "config.model.mixed_precision: expected true or false, got 'false'"),
        ({"model": {"embed": True}}, "config.model.embed: expected a string, got True"),
        ({"model": {"embed": ""}}, "--embed needs a layer name"),
        ({"model": {"preprocess": "bogus"}}, "--preprocess must be one of auto, raw, .*, torch, got 'bogus'"),
        ({"model": {"name": ""}}, "--model must name a model"),
        ({"model": ["resnet50"]}, "config.model: expected a mapping, got list"),
        ({"sampling": {"every": 2.5}}, "config.sampling.every: expected an integer, got 2.5"),
        ({"decode": {"segment_s": "600"}}, "config.decode.segment_s: expected a finite number, got '600'"),
        ({"decode": {"decoder": "ffmpeg"}}, "--decoder must be auto, decord or pyav, got 'ffmpeg'"),
        ({"decode": {"threads": "two"}}, "config.decode.threads: expected an integer, got 'two'"),
        ({"input": 5}, "config.input: expected a string, got 5"),
        ({"limit": "10"}, "config.limit: expected an integer, got '10'"),
        ({"progress": "no"}, "config.progress: expected true or false, got 'no'"),
        # (cut short after the secret was redacted: its first 56 characters were shown)
        ({"input": ["https://github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01"
                    "23456789abcd@raw.example.com/videos/m.txt"]},
         r"config.input: expected a string, got \['https://\*\*\*@raw.example.com/videos/m.txt'\]$"),
    ],
)
def test_settings_of_the_wrong_type_or_choice_name_the_setting_and_value(settings, message):
    """A YAML file can hold anything; what argparse types and restricts on the command line
    is checked in the config itself, one ConfigError naming the setting and its value."""
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"input": "in", "output": "out", **settings})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"decode": {"min_actors": 3, "max_actors": 1}}, "--decode-actors MIN MAX must be 1 <= MIN <= MAX, got 3 1"),
        ({"decode": {"min_actors": 0}}, "--decode-actors MIN MAX must be 1 <= MIN <= MAX, got 0 None"),
        ({"infer": {"min_actors": 0, "max_actors": 0}}, "--infer-actors MIN MAX must be 1 <= MIN <= MAX, got 0 0"),
        ({"infer": {"gpus_per_actor": -1}}, "--gpus-per-actor must be >= 0, got -1"),
        ({"infer": {"batch_size": 0}}, "--batch-size must be >= 1, got 0"),
        ({"decode": {"threads": 0}}, "--decode-threads must be >= 1, got 0"),
        ({"decode": {"segment_s": -5}}, r"--segment-seconds must be 0 \(never split\) or >= 0.1, got -5"),
        ({"decode": {"segment_s": 1e-300}}, r"--segment-seconds must be 0 \(never split\) or >= 0.1, got 1e-300"),
        ({"limit": 0}, "--limit must be >= 1, got 0"),
        ({"commit_interval_s": -1}, "--commit-interval must be >= 0, got -1"),
        ({"model": {"max_boxes": 0}}, "--max-boxes must be >= 1, got 0"),
        ({"model": {"name": "resnet50", "weights": ""}}, "--weights needs a value: imagenet, none, or a weights file"),
        ({"model": {"labels": ""}}, "--labels needs a labels file's path or URL"),
        ({"model": {"iou_threshold": 0.0}}, r"--iou-threshold must be in \(0, 1\], got 0$"),
        ({"model": {"min_box_score": 1.0}}, r"--min-box-score must be in \[0, 1\), got 1$"),
    ],
)
def test_out_of_range_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"input": "in", "output": "out", **settings})


def test_ints_stand_for_floats_and_lists_for_sizes():
    cfg = RunConfig.from_dict({"input": "in", "output": "out", "model": {"input_size": [240, 320], "iou_threshold": 1},
                               "sampling": {"fps": 2}, "decode": {"segment_s": 0}})
    assert cfg.model.input_size == (240, 320) and cfg.model.iou_threshold == 1.0
    assert type(cfg.sampling.fps) is float and type(cfg.decode.segment_s) is float


def test_merge_into_a_setting_that_is_not_a_mapping_is_a_config_error():
    with pytest.raises(ConfigError, match="config.model: expected a mapping, got list"):
        merge({"model": ["resnet50"]}, {"model": {"topk": 3}})


def test_the_resolved_config_names_local_files_by_absolute_path(tmp_path, monkeypatch):
    """The run record repeats the run from any working directory: local INPUT, OUTPUT and
    model, weights and labels files are absolute; URLs and keras.applications names are not paths."""
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.from_dict({"input": "samples/videos", "output": "out/", "model": {
        "name": "samples/model/shapes.keras", "labels": "~/labels.txt"}})
    assert (cfg.input, cfg.output) == (str(tmp_path / "samples/videos"), str(tmp_path / "out"))
    assert cfg.model.name == str(tmp_path / "samples/model/shapes.keras")
    assert cfg.model.labels == os.path.expanduser("~/labels.txt")
    assert ModelConfig(name="resnet50", weights="w.h5").weights == str(tmp_path / "w.h5")

    monkeypatch.chdir(tmp_path / "..")
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg  # the record, repeated elsewhere

    urls = RunConfig.from_dict({"input": "s3://b/in/", "output": "gs://b/out", "model": {
        "name": "resnet50", "weights": "https://h/w.h5?X-Amz-Signature=x", "labels": "s3://b/l.txt"}})
    assert (urls.input, urls.output, urls.model.name) == ("s3://b/in/", "gs://b/out", "resnet50")
    capitals = RunConfig.from_dict({"input": "S3://b/In/", "output": "Gs://b/Out"})  # a scheme's case is none
    assert (capitals.input, capitals.output) == ("s3://b/In/", "gs://b/Out")
    assert (urls.model.weights, urls.model.labels) == ("https://h/w.h5?X-Amz-Signature=x", "s3://b/l.txt")
    assert [ModelConfig(name="resnet50", weights=w).weights for w in ("imagenet", "none", "None", "IMAGENET")] == [
        "imagenet", "none", "none", "imagenet"]
    # an OUTPUT named after the model, there from the first run: the name stays a name
    os.makedirs("resnet50", exist_ok=True)
    assert ModelConfig(name="resnet50").name == "resnet50"
    os.makedirs("mymodel", exist_ok=True)
    open("mymodel/saved_model.pb", "wb").close()  # a SavedModel folder is a path
    assert ModelConfig(name="mymodel").name == os.path.abspath("mymodel")
    # fsspec's other spellings of a local file: the path it reads
    assert RunConfig.from_dict({"input": "file:/data/v", "output": "o"}).input == "/data/v"


def test_null_in_a_config_is_the_default():
    """README: "a key left out (or null) is the flag's default": `run_id: null`, `topk: null`
    were type errors ("expected a string, got None")."""
    cfg = RunConfig.from_dict({"input": "in", "output": "out", "run_id": None, "progress": None, "retry_failed": None,
                               "model": {"name": None, "topk": None, "head": None}, "sampling": {"every": None},
                               "decode": None, "infer": {"cpus_per_actor": None}})
    default = RunConfig.from_dict({"input": "in", "output": "out", "run_id": cfg.run_id})
    assert cfg == default and cfg.run_id
    with pytest.raises(ConfigError, match="^INPUT is required"):
        RunConfig.from_dict({"input": None, "output": "out"})


def test_a_relative_output_in_a_ray_job_with_a_working_dir_is_refused(tmp_path, monkeypatch):
    """`ray job submit --working-dir . -- python jobs/classify_videos.py IN out`: the job's
    driver runs in Ray's temporary copy of the working dir, and `out` was written there (a
    folder on the head node, another one once the code changed: no resume). Ray tells its
    job drivers their runtime env in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_6f61ffb08042fd85.zip"}, "metadata": {}}))
    with pytest.raises(ConfigError, match=r"OUTPUT 'out' is a relative path: in a `ray job submit --working-dir` "
                                          r"job it would be inside Ray's temporary copy of the working dir \(.*\), not "
                                          r"your folder; give a URL \(s3://...\) or an absolute path every node sees"):
        RunConfig(input="in", output="out")
    # fsspec's prefixes for a path under the current folder too (they went into Ray's copy: a QA helper)
    for relative in ("file:out", "local://out", "LOCAL://sub/out"):
        with pytest.raises(ConfigError, match=f"OUTPUT '{relative}' is a relative path"):
            RunConfig(input="in", output=relative)
    assert RunConfig(input="in", output=str(tmp_path / "out")).output == str(tmp_path / "out")
    assert RunConfig(input="in", output="file:" + str(tmp_path / "out")).output == str(tmp_path / "out")
    assert RunConfig(input="in", output="s3://b/out").output == "s3://b/out"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {}}))
    assert RunConfig(input="in", output="out").output == str(tmp_path / "out")  # no working dir: here is here
    # and recorded absolute: a `--config runs/<id>.json` from another folder writes there too
    assert RunConfig(input="local://in", output="local://out").output == str(tmp_path / "out")


def test_a_fraction_of_more_than_one_gpu_is_refused():
    """--gpus-per-actor 1.5 reached Ray, which refused it as the actors started (a traceback
    inside Ray Data's, exit 1): fractions share one GPU; above one, whole numbers."""
    with pytest.raises(ConfigError, match=r"--gpus-per-actor above 1 must be a whole number .*got 1.5"):
        InferConfig(gpus_per_actor=1.5)
    with pytest.raises(ConfigError, match=r"infer cpus_per_actor above 1 must be a whole number .*got 2.5"):
        InferConfig(cpus_per_actor=2.5)
    assert (InferConfig(gpus_per_actor=0.5).gpus_per_actor, InferConfig(gpus_per_actor=2).gpus_per_actor) == (0.5, 2)


def test_weights_with_a_model_file_are_refused(tmp_path):
    """--weights is a keras.applications model's: with a model file (which holds its own) it
    was ignored, a missing file too, and the record said weights the run never used (a rerun
    without them was warned of "other settings")."""
    for name in (str(tmp_path / "m.keras"), "s3://bucket/m.keras", str(tmp_path / "legacy.h5"), "gs://b/saved_model/"):
        for weights in ("/tmp/nosuch.h5", "imagenet", "none"):
            with pytest.raises(ConfigError, match=r"^--weights is for keras.applications models .*: a model file or "
                                                  r"SavedModel holds its own weights; drop --weights "):
                ModelConfig(name=name, weights=weights)
    assert ModelConfig(name="resnet50", weights="/tmp/w.h5").weights == "/tmp/w.h5"
    assert ModelConfig(name=str(tmp_path / "m.keras")).weights is None


def test_custom_objects_are_module_names_or_files():
    """A YAML file's one entry may be a string; local files become absolute (the record
    repeats the run from anywhere); anything else is refused naming it."""
    import os

    cfg = ModelConfig(name="m.keras", custom_objects="pkg.layers")
    assert cfg.custom_objects == ("pkg.layers",)
    cfg = ModelConfig(name="m.keras", custom_objects=["layers.py", "s3://b/code/l.py", "a.b_c"])
    assert cfg.custom_objects == (os.path.abspath("layers.py"), "s3://b/code/l.py", "a.b_c")
    for bad, said in ((["pkg layers"], "--custom-objects takes a Python module name (pkg.layers) or a .py file"),
                      ([3], "config.model.custom_objects: expected a list of strings")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            ModelConfig(name="m.keras", custom_objects=bad)
