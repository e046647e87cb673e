"""The sample corpus `make run` uses: deterministic, labelled, and idempotent to build."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from rayvid import samples


def test_scenes_are_deterministic_and_cover_the_frames():
    a = samples.scene_labels(90, seed=7)
    assert a == samples.scene_labels(90, seed=7) and len(a) == 90
    assert set(a) <= set(samples.CLASSES)
    f1 = list(samples.scene_frames(a[:20], seed=7))
    f2 = list(samples.scene_frames(a[:20], seed=7))
    assert all(np.array_equal(x, y) for x, y in zip(f1, f2))
    assert not np.array_equal(f1[0], f1[1]) or a[0] == "blank"  # content moves within a scene


def test_classes_render_differently():
    rng = np.random.default_rng(0)
    for cls in samples.CLASSES:
        img = samples.render(cls, rng)
        assert img.shape == (*samples.VIDEO_SIZE, 3) and img.dtype == np.uint8
        assert (len(np.unique(img.reshape(-1, 3), axis=0)) == 1) == (cls == "blank")


def test_ensure_samples_builds_once(tmp_path, shapes_model):
    # a trained model already in place is kept: only the videos and truth are made
    shutil.copytree(shapes_model["dir"], tmp_path / "model")
    info = samples.ensure_samples(str(tmp_path), n_videos=2, seconds=0.5)
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert len(truth) == 2 and all(len(v) == 8 for v in truth.values())
    assert "validation_accuracy" not in info  # not retrained
    mtime = (tmp_path / "truth.json").stat().st_mtime
    samples.ensure_samples(str(tmp_path), n_videos=2, seconds=0.5)
    assert (tmp_path / "truth.json").stat().st_mtime == mtime
    # other counts or lengths are made, not ignored; a sample video no longer asked for goes
    (tmp_path / "videos" / "mine.mp4").write_bytes(b"a user's file stays")
    samples.ensure_samples(str(tmp_path), n_videos=1, seconds=1.0)
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert [(p, len(v)) for p, v in truth.items()] == [(str(tmp_path / "videos" / "sample_00.mp4"), 15)]  # as video_uri
    assert sorted(os.listdir(tmp_path / "videos")) == ["mine.mp4", "sample_00.mp4"]
    made = (tmp_path / "videos" / "sample_00.mp4").stat().st_mtime_ns
    for spelled in (f"{tmp_path}/.", os.path.relpath(tmp_path), f"{tmp_path}/../{tmp_path.name}"):  # the same folder
        samples.ensure_samples(spelled, n_videos=1, seconds=1.0)
        assert (tmp_path / "videos" / "sample_00.mp4").stat().st_mtime_ns == made, spelled
    (tmp_path / "videos" / "sample_00.mp4").unlink()  # a video gone: made again
    samples.ensure_samples(str(tmp_path), n_videos=1, seconds=1.0)
    assert (tmp_path / "videos" / "sample_00.mp4").exists()
