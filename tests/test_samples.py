"""The sample corpus `make run` uses: deterministic, labelled, and idempotent to build."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

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


def test_an_interrupted_samples_is_made_again_and_bad_counts_are_refused(tmp_path, shapes_model, capsys, monkeypatch):
    """A Ctrl-C while `samples --force` rewrote a video left it cut short beside the old
    truth.json, and the next `samples` kept both (exit 0); a model file cut short, or without
    its labels file, was kept too. --videos 0 deleted every sample and wrote an empty truth,
    --seconds 0 wrote videos of no frames (exit 0); DIR a file was a traceback."""
    from rayvid import cli

    shutil.copytree(shapes_model["dir"], tmp_path / "model")
    samples.ensure_samples(str(tmp_path), n_videos=2, seconds=0.5)
    real = samples.make_video
    calls = []

    def interrupted(path, seconds, seed, **kw):  # the second video's encoding is interrupted
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # what ffmpeg had written
            raise KeyboardInterrupt
        return real(path, seconds, seed, **kw)

    monkeypatch.setattr(samples, "make_video", interrupted)
    with pytest.raises(KeyboardInterrupt):
        samples.ensure_samples(str(tmp_path), n_videos=2, seconds=0.5, force=True)
    assert not (tmp_path / "truth.json").exists()
    monkeypatch.setattr(samples, "make_video", real)
    samples.ensure_samples(str(tmp_path), n_videos=2, seconds=0.5)  # made again, whole
    assert sorted(os.listdir(tmp_path / "videos")) == ["sample_00.mp4", "sample_01.mp4"]
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert [len(v) for v in truth.values()] == [8, 8]
    with open(tmp_path / "videos" / "sample_01.mp4", "rb") as f:
        assert b"moov" in f.read()  # a whole MP4
    # a model file cut short (or its labels file gone) is trained again
    (tmp_path / "model" / "shapes.keras").write_bytes(b"PK\x03\x04 cut short")
    assert not samples._model_saved(str(tmp_path / "model"), "shapes")
    shutil.copy(shapes_model["dir"] / "shapes.keras", tmp_path / "model" / "shapes.keras")
    assert samples._model_saved(str(tmp_path / "model"), "shapes")
    (tmp_path / "model" / "shapes.labels.txt").unlink()
    assert not samples._model_saved(str(tmp_path / "model"), "shapes")
    # counts that make no samples: exit 2 before anything is deleted
    for flags, said in ((["--videos", "0"], "--videos must be 1 to 1000, got 0"),
                        (["--seconds", "0"], "--seconds must be 0.0666667 (one frame) to 3600, got 0"),
                        (["--seconds", "1e9"], "--seconds must be 0.0666667 (one frame) to 3600, got 1e+09")):
        assert cli.main(["samples", str(tmp_path), *flags]) == 2
        assert capsys.readouterr().err == f"rayvid: error: {said}\n"
    assert sorted(os.listdir(tmp_path / "videos")) == ["sample_00.mp4", "sample_01.mp4"]
    (tmp_path / "file").write_text("x")
    assert cli.main(["samples", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.startswith(f"rayvid: error: cannot write samples into {tmp_path}/file: ")


def test_samples_on_a_full_disk_is_one_line(tmp_path, shapes_model, capsys):
    """ffmpeg failing to write a video (here: a full disk) was a traceback, exit 1."""
    import contextlib
    import subprocess

    from rayvid import cli

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs a small tmpfs (mount: root)")
    try:
        shutil.copytree(shapes_model["dir"], disk / "model")
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:  # the disk, full
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        assert cli.main(["samples", str(disk), "--videos", "1", "--seconds", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rayvid: error: cannot write samples into {disk}: ") and err.count("\n") == 1, err
        assert not (disk / "truth.json").exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
