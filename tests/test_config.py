from __future__ import annotations

import pytest

from rayvid.config import RunConfig, SamplingConfig, merge
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
