"""`rayvid render`: decode the rendered video and find, on every frame, the overlay of the
prediction in force there (its colour swatch), at the source's size and frame count."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
from helpers import http_server, write_output

from rayvid import cli, render, report, samples


def _swatch(img: np.ndarray, row: int) -> np.ndarray:
    y = render.PAD + row * render.ROW_H
    return img[y + 2 : y + render.SWATCH - 2, render.PAD + 2 : render.PAD + render.SWATCH - 2].reshape(-1, 3).mean(0)


@pytest.mark.parametrize("every", [1, 4])
def test_render_overlays_the_prediction_of_each_frame(tmp_path, every):
    video = str(tmp_path / "v.mp4")
    truth = samples.make_video(video, 3.0, seed=4)
    assert len(set(truth)) >= 2
    out = str(tmp_path / "out")
    write_output(out, {video: [(label, 0.9) for label in truth]}, fps=samples.FPS, every=every)
    dest = str(tmp_path / "rendered.mp4")
    assert cli.main(["render", video, out, dest, "--topk", "2"]) == 0

    labels = set(truth) | {"zz_other"}  # write_output's second label (see helpers)
    palette = report.colours(labels)
    with av.open(dest) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == len(truth)
    assert frames[0].shape == (*samples.VIDEO_SIZE, 3)
    for i, img in enumerate(frames):
        shown = truth[i - i % every]  # sparse rows: the last sampled frame's prediction holds
        got = _swatch(img, 0)
        nearest = min(labels, key=lambda lab: np.abs(np.array(palette[lab]) - got).sum())
        assert nearest == shown, f"frame {i}: swatch {got} looks like {nearest}, expected {shown}"
        assert np.abs(np.array(palette[shown]) - got).max() < 40, (i, got, palette[shown])
        assert np.abs(np.array(palette["zz_other"]) - _swatch(img, 1)).max() < 40  # the second row


def test_render_reads_a_presigned_url_and_finds_its_videos_rows(tmp_path, capsys):
    """The run stored the video without its signature; rendering it again through a
    freshly signed URL finds those rows and reads the video through the URL as given."""
    video = str(tmp_path / "v.mp4")
    truth = samples.make_video(video, 1.0, seed=4)
    out, dest = str(tmp_path / "out"), str(tmp_path / "rendered.mp4")
    with http_server(str(tmp_path), "ranges") as base:
        write_output(out, {f"{base}/v.mp4?id=3": [(label, 0.9) for label in truth]}, fps=samples.FPS)
        signed = f"{base}/v.mp4?id=3&X-Amz-Credential=AKIAFAKE%2F20261130&X-Amz-Signature=5ec7e75191a7"
        assert cli.main(["render", signed, out, dest]) == 0
        assert cli.main(["render", signed.replace("id=3", "id=4"), out, dest]) == 2  # another object
    assert "5ec7e75191a7" not in capsys.readouterr().err
    with av.open(dest) as c:
        assert sum(1 for _ in c.decode(video=0)) == len(truth)


def test_render_of_a_video_without_predictions_is_a_clear_error(tmp_path, capsys):
    out = str(tmp_path / "out")
    write_output(out, {"/v/other.mp4": [("circle", 0.9)]})
    assert cli.main(["render", str(tmp_path / "nope.mp4"), out, str(tmp_path / "r.mp4")]) == 2
    assert f"holds no video named {tmp_path / 'nope.mp4'}" in capsys.readouterr().err


def test_render_errors_name_the_url_that_failed(tmp_path, capsys):
    video = str(tmp_path / "gone.mp4")
    out = str(tmp_path / "out")
    write_output(out, {video: [("circle", 0.9)] * 3})  # predicted, then the video went away
    assert cli.main(["render", video, out, str(tmp_path / "r.mp4")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read video {video}" in err and "cannot read " + out not in err

    samples.make_video(video, 0.2, seed=1)
    (tmp_path / "blocker").write_text("a file where a folder should be")
    dest = str(tmp_path / "blocker" / "r.mp4")
    assert cli.main(["render", video, out, dest]) == 2
    assert f"cannot write {dest}" in capsys.readouterr().err
    assert cli.main(["export", out, dest]) == 2  # the same for the other verbs that write
    assert f"cannot write {dest}" in capsys.readouterr().err
    assert cli.main(["summary", out, "--out", dest]) == 2
    assert f"cannot write {dest}" in capsys.readouterr().err
    assert cli.main(["report", out, str(tmp_path / "blocker" / "rep")]) == 2
    assert f"cannot write to {tmp_path / 'blocker' / 'rep'}" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["rotated_90.mp4", "rotated_180.mp4"])
def test_render_draws_on_upright_frames(matrix, tmp_path, name):
    """Frames as displayed (and as the model saw them), not as the container codes them."""
    import framecode

    path, n = matrix[name]
    out = str(tmp_path / "out")
    write_output(out, {path: [("circle", 0.9)] * n})
    dest = str(tmp_path / "r.mp4")
    assert cli.main(["render", path, out, dest, "--topk", "1"]) == 0
    with av.open(dest) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    h, w = framecode.MATRIX[name][1]
    assert len(frames) == n and frames[0].shape == (h, w, 3)
    for i, img in enumerate(frames):  # below the overlay, the upright frame i
        want = framecode.code_frame(i, h, w)[h // 2 :].astype(int)
        assert np.abs(img[h // 2 :].astype(int) - want).mean() < 12, (name, i)


def test_render_never_writes_over_its_video_or_output_and_takes_no_negative_topk(tmp_path, capsys):
    video = str(tmp_path / "v.mp4")
    truth = samples.make_video(video, 1.0, seed=4)
    out = str(tmp_path / "out")
    write_output(out, {video: [(label, 0.9) for label in truth]}, fps=samples.FPS)
    before = open(video, "rb").read()
    assert cli.main(["render", video, out, str(tmp_path / "." / "v.mp4")]) == 2  # the video itself, spelt otherwise
    assert "is the video it draws on" in capsys.readouterr().err and open(video, "rb").read() == before
    assert cli.main(["render", video, out, f"{out}/videos/r.mp4"]) == 2
    assert "is OUTPUT or in its own folders" in capsys.readouterr().err
    assert cli.main(["render", video, out, str(tmp_path / "r.mp4"), "--topk", "-1"]) == 2
    assert "--topk must be >= 0, got -1" in capsys.readouterr().err


def test_render_of_a_damaged_video_leaves_out_the_frames_that_do_not_decode(damaged, tmp_path, capsys, caplog):
    """Garbage in the middle of a video (the run kept the frames around it): the rendered
    video has every frame that decodes, and stderr says how many packets did not."""
    video = damaged["garbage_in_middle.mp4"]
    out = str(tmp_path / "out")
    with av.open(video) as c:
        n = c.streams.video[0].frames
    write_output(out, {video: [("circle", 0.9)] * n}, fps=30.0)
    dest = str(tmp_path / "r.mp4")
    assert cli.main(["render", video, out, dest]) == 0
    err = capsys.readouterr().err
    [said] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("render: ")]
    skipped = int(said.split("render: ")[1].split(" packet(s)")[0])
    with av.open(dest) as c:
        rendered = sum(1 for _ in c.decode(video=0))
    assert 0 < skipped and 0 < rendered < n and f"{rendered} frames -> {dest}" in err


@pytest.mark.parametrize("name", ["h264_bframes.avi", "h264_bframes.wmv"])
def test_render_puts_each_frames_prediction_on_it_where_frames_are_known_by_their_order(matrix, tmp_path, name):
    """AVI/ASF's H.264 with B-frames: frames found by FFmpeg's guessed times drew the
    prediction of a neighbouring frame on them (frames are known by their order there)."""
    path, n = matrix[name]
    labels = ["circle" if (i // 2) % 2 else "square" for i in range(n)]  # changes every two frames
    out = str(tmp_path / "out")
    write_output(out, {path: [(label, 0.9) for label in labels]})
    dest = str(tmp_path / "r.mp4")
    assert cli.main(["render", path, out, dest, "--topk", "1"]) == 0
    palette = report.colours(set(labels) | {"zz_other"})
    with av.open(dest) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == n
    got = [min(palette, key=lambda lab: np.abs(np.array(palette[lab]) - _swatch(img, 0)).sum()) for img in frames]
    assert got == labels


def _ffmpeg(*args):
    import subprocess

    subprocess.run([samples.ffmpeg_exe(), "-v", "error", "-y", *args], check=True)


def test_render_of_a_damaged_or_replaced_video_is_one_line(tmp_path, capsys):
    """A source damaged since the run was a traceback (VideoError, exit 1); one replaced by
    another video was rendered with the old video's labels drawn on the new frames: exit 2
    saying so, nothing written."""
    video = str(tmp_path / "v.mp4")
    truth = samples.make_video(video, 1.0, seed=4)
    out, dest = str(tmp_path / "out"), str(tmp_path / "r.mp4")
    write_output(out, {video: [(label, 0.9) for label in truth]}, fps=samples.FPS, listed=True)
    assert cli.main(["render", video, out, dest]) == 0
    os.remove(dest)
    capsys.readouterr()
    samples.make_video(str(tmp_path / "other.mp4"), 2.0, seed=5)
    os.replace(tmp_path / "other.mp4", video)
    assert cli.main(["render", video, out, dest]) == 2
    err = capsys.readouterr().err
    assert f"rayvid: error: {video} changed since the run that labelled it (the object changed after it was listed" in err
    assert len(err.splitlines()) == 1 and not os.path.exists(dest)
    with open(video, "r+b") as f:
        f.truncate(3000)
    write_output(str(tmp_path / "out2"), {video: [(label, 0.9) for label in truth]}, fps=samples.FPS)
    assert cli.main(["render", video, str(tmp_path / "out2"), dest]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rayvid: error: cannot render {video}: ") and len(err.splitlines()) == 1
    assert "Traceback" not in err and not os.path.exists(dest)


def test_render_keeps_each_frames_time_and_scales_a_size_change(tmp_path):
    """A variable-frame-rate video was rendered at its average rate (1.2 s off by its end);
    a stream whose size changes mid-way (joined captures) was cropped to the first size."""
    base = str(tmp_path / "base.mp4")
    truth = samples.make_video(base, 2.0, seed=4)
    vfr = str(tmp_path / "vfr.mp4")
    _ffmpeg("-i", base, "-vf", "setpts='if(lt(N,20),PTS,PTS*2)'", "-fps_mode", "vfr", "-c:v", "libx264", vfr)
    out = str(tmp_path / "out")
    write_output(out, {vfr: [(label, 0.9) for label in truth]}, fps=samples.FPS)
    dest = str(tmp_path / "r.mp4")
    assert cli.main(["render", vfr, out, dest]) == 0

    def times(path):
        with av.open(path) as c:
            return [round(float(f.time), 3) for f in c.decode(video=0)]

    assert times(dest) == times(vfr) and times(vfr)[-1] > 2.5

    small, big, joined = (str(tmp_path / n) for n in ("a.ts", "b.ts", "joined.ts"))
    _ffmpeg("-f", "lavfi", "-i", "color=c=red:s=64x48:r=10:d=1", "-c:v", "libx264", "-pix_fmt", "yuv420p", small)
    _ffmpeg("-f", "lavfi", "-i", "color=c=red:s=128x96:r=10:d=1", "-vf", "drawbox=x=64:y=0:w=64:h=96:color=blue:t=fill",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-output_ts_offset", "1", big)  # its right half blue
    with open(joined, "wb") as f:
        f.write(open(small, "rb").read() + open(big, "rb").read())
    with av.open(joined) as c:
        n = sum(1 for _ in c.decode(video=0))
    write_output(out, {joined: [("circle", 0.9)] * n}, fps=10.0, run_id="r2")
    assert cli.main(["render", joined, out, dest, "--topk", "0"]) == 0
    with av.open(dest) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == n and frames[-1].shape == (48, 64, 3)
    left, right = frames[-1][:, :28], frames[-1][:, 36:]  # the whole picture, scaled: red, then blue
    assert (left[..., 0] > 200).all() and (left[..., 2] < 60).all(), left.mean((0, 1))
    assert (right[..., 2] > 200).all() and (right[..., 0] < 60).all(), right.mean((0, 1))


def test_render_to_stdout(tmp_path, capfdbinary):
    video = str(tmp_path / "v.mp4")
    truth = samples.make_video(video, 0.5, seed=4)
    out = str(tmp_path / "out")
    write_output(out, {video: [(label, 0.9) for label in truth]}, fps=samples.FPS)
    assert cli.main(["render", video, out, "-"]) == 0
    data = capfdbinary.readouterr().out
    assert data[4:8] == b"ftyp" and not os.path.exists("-")


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_both_encoders_keep_variable_frame_times(tmp_path, codec):
    """MPEG-4 Part 2, the encoder where FFmpeg has no libx264, refused the 90 kHz time base
    (its denominators stop at 65535): every render failed there. Each encoder keeps the
    frames' times, to its time base."""
    from fractions import Fraction

    path = str(tmp_path / f"{codec}.mp4")
    times = [0.0, 0.1, 0.2, 0.5, 0.9, 1.0]
    with av.open(path, "w") as dst:
        out = render.output_stream(dst, Fraction(10), 65, 49, codec)
        for t in times:
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t / out.time_base), out.time_base
            for packet in out.encode(frame):
                dst.mux(packet)
        for packet in out.encode():
            dst.mux(packet)
    with av.open(path) as c:
        assert c.streams.video[0].codec_context.name == ("h264" if codec == "libx264" else "mpeg4")
        assert [round(float(f.time), 3) for f in c.decode(video=0)] == times


def test_render_of_a_video_whose_tags_are_not_utf8(tmp_path):
    """A Latin-1 tag (older cameras and tools write them) made PyAV raise UnicodeDecodeError
    when render opened the video, a traceback: its tags are not read, every frame renders."""
    import framecode

    clean, video = str(tmp_path / "clean.mp4"), str(tmp_path / "v.mp4")
    framecode.write_code_video(clean, 30, framecode.SIZE, framecode.X264)
    framecode.latin1_metadata(clean, video)
    out = str(tmp_path / "out")
    write_output(out, {video: [("a", 0.9)] * 30}, fps=30)
    dest = str(tmp_path / "rendered.mp4")
    assert cli.main(["render", video, out, dest]) == 0
    with av.open(dest) as c:
        assert sum(1 for _ in c.decode(video=0)) == 30
