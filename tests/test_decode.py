"""The decode stage on real generated videos, outside Ray (the stage is a plain callable)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

import framecode
from helpers import http_server, pts_of, split_rows
from rayvid import samples, storage
from rayvid.errors import StorageError
from rayvid.decode import Decoder
from rayvid.schema import KIND_END, KIND_FRAME


def test_decodes_every_frame_at_model_size_with_container_pts(media):
    path = next(p for p in media["truth"] if p.endswith("a_clip.mp4"))
    n = len(media["truth"][path])
    dec = Decoder(size=(48, 64), batch_frames=7)
    batches = list(dec.decode_video(path))
    frames, ends = split_rows(batches)
    assert all(len(b["kind"]) <= 7 for b in batches)
    assert [f["frame_index"] for f in frames] == list(range(n))
    np.testing.assert_array_equal([f["timestamp_s"] for f in frames], pts_of(path))
    assert all(f["frame"].shape == (48, 64, 3) and f["frame"].dtype == np.uint8 for f in frames)
    assert len(ends) == 1 and ends[0]["n_frames"] == n and ends[0]["error_type"] == ""
    # content: frame 0 is the rendered first frame (lossy, resized), not some other frame
    labels = media["truth"][path]
    first = next(iter(samples.scene_frames(labels, seed=1)))
    import tensorflow as tf

    ref = tf.image.resize(first[None], (48, 64), method="bicubic").numpy()[0]
    assert np.abs(frames[0]["frame"].astype(float) - ref).mean() < 12


def test_remote_video_is_fetched_while_another_decodes(media, s3fs_client):
    """What the decode pool's two calls per actor on remote input rely on: a second call
    copies its video to local disk while the first call's video is being decoded, then
    waits for the decoder; both come out whole."""
    import threading

    path = next(p for p in media["truth"] if p.endswith("a_clip.mp4"))
    n = len(media["truth"][path])
    first, second = "s3://rayvid-test/fetch/first.mp4", "s3://rayvid-test/fetch/second.mp4"
    for url in (first, second):
        s3fs_client.put_file(path, url)
    dec = Decoder(size=(32, 32), batch_frames=4)
    decoding = dec.decode_video(first)
    batches = [next(decoding)]  # the first video holds the decoder from here on
    out = {}
    other = threading.Thread(target=lambda: out.setdefault("rows", split_rows(list(dec.decode_video(second)))))
    other.start()
    deadline = time.monotonic() + 30
    while len(os.listdir(dec._tmpdir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir(dec._tmpdir)) == 2  # both copies on disk: the second fetched meanwhile
    assert other.is_alive() and "rows" not in out  # and waiting for the decoder
    batches += list(decoding)
    other.join(30)
    for frames, ends in (split_rows(batches), out["rows"]):
        assert [f["frame_index"] for f in frames] == list(range(n))
        assert len(ends) == 1 and ends[0]["error_type"] == ""
    assert os.listdir(dec._tmpdir) == []  # each copy deleted after its video


def test_batches_bounded_in_bytes(media):
    path = next(p for p in media["truth"] if p.endswith("a_clip.mp4"))
    dec = Decoder(size=(64, 64), batch_frames=1000, batch_bytes=64 * 64 * 3 * 5)
    batches = list(dec.decode_video(path))
    assert max(b["frame"].nbytes for b in batches) <= 64 * 64 * 3 * 5


@pytest.mark.parametrize(
    "name, content, stage, message",
    [
        ("empty.mp4", b"", "decode", "empty file (0 bytes)"),
        ("text.mp4", b"hello, I am text\n" * 50, "decode", "cannot open video"),
    ],
)
def test_bad_files_become_one_error_row(tmp_path, name, content, stage, message):
    path = tmp_path / name
    path.write_bytes(content)
    frames, ends = split_rows(Decoder(size=(32, 32)).decode_video(str(path)))
    assert frames == []
    assert len(ends) == 1 and ends[0]["kind"] == KIND_END
    assert ends[0]["error_stage"] == stage and message in ends[0]["message"]
    assert ends[0]["n_frames"] == 0


def test_missing_file_is_a_read_error(tmp_path):
    frames, ends = split_rows(Decoder(size=(32, 32)).decode_video(str(tmp_path / "gone.mp4")))
    assert frames == [] and ends[0]["error_stage"] == "read" and ends[0]["error_type"] == "NotFound"


def test_a_folder_or_a_pipe_named_as_a_video_is_an_error_row_saying_so(tmp_path):
    """A manifest may name a folder or a FIFO: an error row saying what it is (not NotFound,
    which every rerun reads again), and a FIFO is never opened (that would block)."""
    (tmp_path / "dir.mp4").mkdir()
    os.mkfifo(tmp_path / "pipe.mp4")
    for name, kind, said in (("dir.mp4", "IsADirectoryError", "a folder, not a video file"),
                             ("pipe.mp4", "OSError", "not a regular file (a pipe, socket or device)")):
        frames, ends = split_rows(Decoder(size=(32, 32)).decode_video(str(tmp_path / name)))
        assert frames == [] and (ends[0]["error_stage"], ends[0]["error_type"]) == ("read", kind)
        assert said in ends[0]["message"] and name in ends[0]["message"], ends[0]["message"]


def test_an_http_server_that_is_down_stops_the_run_a_missing_video_does_not(media, tmp_path):
    """A video missing from a live HTTP server is one read error row, as is one whose byte
    ranges the server answers with an error status; a server that refuses
    connections or answers 503 is StorageUnavailable (the run stops, and says so, rather
    than marking every video failed), its message free of the URL's signature."""
    from rayvid.errors import StorageUnavailable

    src = next(p for p in media["truth"] if p.endswith("a_clip.mp4"))
    signed = "?X-Amz-Signature=5ec7e75191a7"
    dec = Decoder(size=(32, 32))
    with http_server(os.path.dirname(src), "ranges") as base:
        frames, ends = split_rows(dec.decode_video(f"{base}/missing.mp4", source=f"{base}/missing.mp4{signed}"))
        assert frames == [] and (ends[0]["error_stage"], ends[0]["error_type"]) == ("read", "NotFound")
        assert "5ec7e75191a7" not in ends[0]["message"]
        assert ends[0]["message"] == f"not found: {base}/missing.mp4?<redacted>", ends[0]["message"]
        ends = split_rows(dec.decode_video(f"{base}/my missing video.mp4"))[1]
        assert ends[0]["message"] == f"not found: {base}/my missing video.mp4", ends[0]["message"]
        frames, ends = split_rows(dec.decode_video(f"{base}/a_clip.mp4", source=f"{base}/a_clip.mp4{signed}"))
        assert len(frames) == 30 and ends[0]["error_type"] == ""
    with http_server(os.path.dirname(src), "range-errors") as base:  # an error status on a read: that video's row
        frames, ends = split_rows(dec.decode_video(f"{base}/a_clip.mp4", source=f"{base}/a_clip.mp4{signed}"))
        assert frames == [] and (ends[0]["error_stage"], ends[0]["error_type"]) == ("read", "ClientResponseError")
        assert ends[0]["message"].startswith("HTTP 500 Internal Server Error")
        assert "5ec7e75191a7" not in ends[0]["message"]
    with http_server(os.path.dirname(src), "ranges") as base:
        # a server that refuses every request (an expired signed URL) or fails every one: what
        # it answered, not "not found" (fsspec says FileNotFoundError for any status its GET got,
        # and NotFound is read again by every run)
        for status, kind, said in ((403, "PermissionDenied", "HTTP 403 Forbidden"),
                                   (401, "PermissionDenied", "HTTP 401 Unauthorized"),
                                   (500, "ClientResponseError", "HTTP 500 Internal Server Error")):
            url = f"{base}/status-{status}-v.mp4"
            frames, ends = split_rows(dec.decode_video(url, source=url + signed))
            assert frames == [] and (ends[0]["error_stage"], ends[0]["error_type"]) == ("read", kind), ends[0]
            assert ends[0]["message"].startswith(said) and "5ec7e75191a7" not in ends[0]["message"], ends[0]["message"]
            assert ("signed URL may have expired" in ends[0]["message"]) == (status != 500), ends[0]["message"]
    for mode in ("down", "unavailable"):
        stopped = contextlib.nullcontext(base)  # nothing listens there now
        with (http_server(os.path.dirname(src), mode) if mode != "down" else stopped) as where:
            with pytest.raises(StorageUnavailable, match=f"storage unreachable reading {where}/a_clip.mp4: ") as e:
                list(dec.decode_video(f"{where}/a_clip.mp4", source=f"{where}/a_clip.mp4{signed}"))
            assert "5ec7e75191a7" not in str(e.value)


def test_an_http_video_whose_server_stalls_is_its_error_row_and_the_others_go_on(media, tmp_path, monkeypatch):
    """A server that answers a video's GET with half its body, or nothing at all, and then
    waits: that video's read gave up after aiohttp's 300 s and stopped the run ("storage
    unreachable ... FSTimeoutError"; every rerun met it again: a QA find). Now it gives up
    once the server sends nothing for RAYVID_HTTP_READ_TIMEOUT_S, and that is the video's
    error row, saying so; the other videos of the same server decode, exact."""
    import shutil

    src = next(p for p in media["truth"] if p.endswith("a_clip.mp4"))
    from rayvid.errors import InputError
    from rayvid.listing import list_videos

    for name in ("stall-a.mp4", "stall-head-a.mp4", "stall-all-a.mp4", "a.mp4"):
        shutil.copy(src, tmp_path / name)
    monkeypatch.setenv("RAYVID_HTTP_READ_TIMEOUT_S", "1.5")
    dec = Decoder(size=(32, 32))
    for mode in ("ranges", "whole"):
        with http_server(str(tmp_path), mode) as base:
            for name in ("stall-a.mp4", "stall-head-a.mp4", "stall-all-a.mp4"):
                began = time.monotonic()
                frames, ends = split_rows(dec.decode_video(f"{base}/{name}"))
                assert time.monotonic() - began < 30
                assert frames == [] and (ends[0]["error_stage"], ends[0]["error_type"]) == ("read", "TimeoutError"), ends[0]
                assert ends[0]["message"].startswith("the server sent nothing for 1.5 s (a stalled transfer; "
                                                     "RAYVID_HTTP_READ_TIMEOUT_S sets how long to wait)"), ends[0]
            frames, ends = split_rows(dec.decode_video(f"{base}/a.mp4"))
            assert len(frames) == 30 and ends[0]["error_type"] == ""
            # a stalled HEAD too (fsspec's "not found", from aiohttp's timeout): not "input not found"
            with pytest.raises(InputError, match=r"the server sent nothing for 1.5 s") as e:
                list_videos(f"{base}/stall-all-a.mp4")
            assert "not found" not in str(e.value)
            # (and a redirect loop says so: it said "HTTP 0")
            ends = split_rows(dec.decode_video(f"{base}/redirect-loop-a.mp4"))[1]
            assert ends[0]["message"] == "too many redirects (10 followed: a redirect loop?)", ends[0]
    monkeypatch.setenv("RAYVID_HTTP_READ_TIMEOUT_S", "0")
    with pytest.raises(StorageError, match="RAYVID_HTTP_READ_TIMEOUT_S must be a number of seconds > 0, got '0'"):
        storage.resolve("https://example.com/a.mp4")


def test_truncated_file_never_crashes(media, tmp_path):
    src = next(p for p in media["truth"] if p.endswith("a_clip.mp4"))
    data = open(src, "rb").read()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    frames, ends = split_rows(Decoder(size=(32, 32)).decode_video(str(path)))
    assert len(ends) == 1
    assert ends[0]["n_frames"] == len(frames)
    if ends[0]["error_type"] == "":  # decoded what was there; indices still exact
        assert [f["frame_index"] for f in frames] == list(range(len(frames)))


def test_odd_source_size_gives_exact_model_size(tmp_path):
    path = str(tmp_path / "odd.mp4")
    frames = [np.full((121, 163, 3), 40 * i % 255, np.uint8) for i in range(5)]
    samples.write_video(path, frames, 10, (121, 163), ["-c:v", "libx264", "-pix_fmt", "yuv444p"])
    got, ends = split_rows(Decoder(size=(75, 99)).decode_video(path))
    assert len(got) == 5 and all(f["frame"].shape == (75, 99, 3) for f in got)


def _rss_mb(pid="self") -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_flat_while_consumer_pauses(tmp_path):
    """decord reads ahead without bound at native size while its caller pauses (measured:
    GBs). At model size, as rayvid decodes, RSS must stay flat across slow yields."""
    path = str(tmp_path / "hd.mp4")
    import subprocess

    subprocess.run(
        [samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
         "testsrc2=size=1280x720:rate=30", "-t", "8", "-c:v", "libx264", "-preset", "ultrafast", path],
        check=True,
    )
    dec = Decoder(size=(224, 224), batch_frames=16)
    child = dec._child.proc.pid  # the process that decodes
    gen = dec.decode_video(path)
    next(gen)
    base = _rss_mb(child)
    peak = base
    for i, _ in enumerate(gen):
        if i < 6:
            time.sleep(0.5)  # a slow downstream stage
        peak = max(peak, _rss_mb(child))
    assert peak - base < 150, f"RSS grew {peak - base:.0f} MB while paused"


def _peak_growth_mb(path: str, **reader_args) -> tuple[float, str]:
    dec = Decoder(size=(64, 64), batch_frames=16, **reader_args)
    child = dec._child.proc.pid
    base = peak = _rss_mb(child)  # decord queues every packet at its first batch
    for batch in dec.decode_video(path):
        peak = max(peak, _rss_mb(child))
    return peak - base, str(batch["decoder"][-1])


def test_large_files_decode_with_pyav_in_flat_memory(tmp_path):
    """decord queues a file's compressed packets whole (its RSS grows with the file);
    files above decord_max_bytes go to PyAV, which holds a packet at a time: the same
    growth for a 1 s and an 8 s file (PyAV's growth varies by 1 to 4 MB run to run, whatever the
    length: 7 s more of file makes the 10% bound about 9 MB, where 3 s more made it 3.8 MB and
    one full run failed it by noise)."""
    import subprocess

    paths = {}
    for seconds in (1, 8):  # lossless noise: a high bit rate, quick to encode
        paths[seconds] = str(tmp_path / f"noise{seconds}.mp4")
        subprocess.run(
            [samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
             "testsrc2=size=640x360:rate=30", "-t", str(seconds), "-vf", "noise=alls=60:allf=t",
             "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", paths[seconds]],
            check=True,
        )
    extra_mb = (os.path.getsize(paths[8]) - os.path.getsize(paths[1])) / 2**20
    assert extra_mb > 20, extra_mb
    decord = {s: _peak_growth_mb(p) for s, p in paths.items()}
    assert {d for _, d in decord.values()} == {"decord"}
    assert decord[8][0] - decord[1][0] > 0.5 * extra_mb, (decord, extra_mb)  # what the limit is for
    pyav = {s: _peak_growth_mb(p, decord_max_bytes=2**20) for s, p in paths.items()}
    assert {d for _, d in pyav.values()} == {"pyav (large file)"}
    assert pyav[8][0] - pyav[1][0] < 0.1 * extra_mb, (pyav, extra_mb)


def test_large_file_path_is_frame_exact(matrix):
    path, n = matrix["h264.mp4"]
    frames, [end] = _decode_all(path, decord_max_bytes=1)
    assert end["decoder"] == "pyav (large file)" and end["error_type"] == ""
    assert [framecode.read_code(f["frame"]) for f in frames] == list(range(n))


# --- frame-exact on the codec/container matrix (tests/framecode.py) --------------------


def _decode_all(path, **kw):
    batches = list(Decoder(size=framecode.SIZE, **kw).decode_video(path))
    return split_rows(batches)


@pytest.mark.parametrize("threads", [1, 2])  # 2: decode actors that share cores with CPU inference
@pytest.mark.parametrize("name", sorted(framecode.MATRIX))
def test_frame_exact_on_every_codec_and_container(matrix, name, threads):
    path, n = matrix[name]
    frames, [end] = _decode_all(path, batch_frames=16, threads=threads)
    assert end["error_type"] == "", end["message"]
    assert end["decoder"].split(" ")[0] == framecode.EXPECTED_DECODER.get(name, "decord")
    assert end["codec"] == framecode.CODEC.get(name, "h264")
    assert (end["height"], end["width"]) == framecode.MATRIX[name][1]  # the size as displayed (rotated)
    got = [f["frame_index"] for f in frames]
    assert got == list(range(n)), f"{name}: indices {got[:8]}..."
    wrong = [(f["frame_index"], framecode.read_code(f["frame"])) for f in frames
             if framecode.read_code(f["frame"]) != f["frame_index"]]
    assert not wrong, f"{name}: frames showing another index (index, shown): {wrong[:5]}"
    np.testing.assert_allclose([f["timestamp_s"] for f in frames], pts_of(path), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", sorted(framecode.MATRIX))
def test_pyav_decoder_is_frame_exact_too(matrix, name):
    """PyAV is the fallback and decodes every later segment: exact on the whole matrix."""
    path, n = matrix[name]
    frames, [end] = _decode_all(path, decoder="pyav")
    assert end["decoder"] == "pyav" and len(frames) == n
    assert all(framecode.read_code(f["frame"]) == f["frame_index"] for f in frames)


def test_decord_and_pyav_resize_alike(tmp_path):
    """One video's segments and sampling modes go to either decoder (decord for the first
    segment of a dense run, PyAV for later segments, --every, --fps), so a frame should reach
    the model alike from both. PyAV resized bicubically, decord bilinearly (in its filter
    graph): on FFmpeg's detailed test pattern 1.9-2.7 grey levels apart on average (up to 89;
    5 on a sample video), a frame's scores depending on the decoder. Both bilinear now:
    1.2-1.5 (not bit-exact: decord scales in its own filter graph)."""
    import subprocess

    path = str(tmp_path / "pattern.mp4")
    subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=s=320x240:r=10:d=1", "-c:v", "libx264", "-pix_fmt", "yuv420p", path], check=True)
    for size in [(64, 64), (48, 64), (224, 224)]:
        frames = {d: np.stack([f["frame"] for f in split_rows(Decoder(size=size, decoder=d).decode_video(path))[0]])
                  for d in ("decord", "pyav")}
        assert frames["decord"].shape == frames["pyav"].shape == (10, *size, 3)
        diff = np.abs(frames["decord"].astype(int) - frames["pyav"].astype(int))
        assert diff.mean() < 1.8, (size, diff.mean(), diff.max())


def test_sparse_sampling_exact_on_open_gop_hevc(matrix):
    """decord's seeks return frame i+k after keyframes on open-GOP HEVC; rayvid never seeks."""
    path, n = matrix["hevc_opengop.mp4"]
    frames, _ = _decode_all(path, every=7)
    assert [f["frame_index"] for f in frames] == list(range(0, n, 7))
    assert all(framecode.read_code(f["frame"]) == f["frame_index"] for f in frames)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["h264.mp4", "hevc_opengop.mp4", "av1.mkv", "h264_bframes.avi"])
def test_keyframes_only(matrix, name, threads):
    import av

    path, _ = matrix[name]
    with av.open(path) as c:
        s = c.streams.video[0]
        packets = sorted((p.pts, p.is_keyframe) for p in c.demux(s) if p.size)
    want = [i for i, (_, key) in enumerate(packets) if key]
    frames, [end] = _decode_all(path, keyframes=True, threads=threads)
    assert [f["frame_index"] for f in frames] == want and len(want) >= 2
    assert all(framecode.read_code(f["frame"]) == f["frame_index"] for f in frames)
    assert end["decoder"] == "pyav"


def test_decord_mis_strided_sizes_fall_back_to_pyav(matrix):
    """decord returns 4-channel garbage for some output widths (48 px: measured); rayvid
    notices before emitting anything and decodes the video with PyAV instead."""
    path, n = matrix["h264.mp4"]
    batches = list(Decoder(size=(48, 48)).decode_video(path))
    frames, [end] = split_rows(batches)
    assert end["decoder"].startswith("pyav (decord:") and len(frames) == n
    assert all(f["frame"].shape == (48, 48, 3) for f in frames)


@pytest.mark.parametrize("sampling", [{"every": 3}, {"fps": 7.5}, {"every": 3, "threads": 2}])
@pytest.mark.parametrize("name", sorted(framecode.MATRIX))
def test_sampling_modes_exact_on_every_codec(matrix, name, sampling):
    path, n = matrix[name]
    pts = pts_of(path)
    if "every" in sampling:
        want = list(range(0, n, sampling["every"]))
    else:  # independent of rayvid: the nearest frame by pts to each k/F, earlier on ties
        targets = np.arange(0, int(pts[-1] * sampling["fps"] + 1e-9) + 1) / sampling["fps"]
        want = sorted({min(range(n), key=lambda i: (abs(pts[i] - t), i)) for t in targets})
    frames, [end] = _decode_all(path, **sampling)
    got = [f["frame_index"] for f in frames]
    assert got == want, f"{name} {sampling}: rows {got[:8]}, expected {want[:8]}"
    wrong = [(f["frame_index"], framecode.read_code(f["frame"])) for f in frames
             if framecode.read_code(f["frame"]) != f["frame_index"]]
    assert not wrong, f"{name} {sampling}: (frame, shown) {wrong[:5]}"


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_odd_size_keeps_the_last_row_and_column(tmp_path, decoder):
    """A 161x121 4:4:4 source whose last column is red and last row green, decoded at its
    own size: both edges must be there, not lost or replicated from their neighbours."""
    h, w = 121, 163
    img = np.full((h, w, 3), 40, np.uint8)
    img[:, -1] = (255, 0, 0)
    img[-1, :] = (0, 255, 0)
    path = str(tmp_path / "edges.mkv")
    samples.write_video(path, [img] * 3, 10, (h, w), ["-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p"])
    frames, [end] = split_rows(Decoder(size=(h, w), decoder=decoder).decode_video(path))
    assert end["decoder"].startswith(decoder) and len(frames) == 3
    f = frames[0]["frame"].astype(int)
    assert f[:-1, -1, 0].mean() > 200 and f[:-1, -2, 0].mean() < 100, "last column lost"
    assert f[-1, :-1, 1].mean() > 200 and f[-2, :-1, 1].mean() < 100, "last row lost"


def test_audio_only_file_is_one_clear_error_row(tmp_path):
    import subprocess

    path = str(tmp_path / "song.mp4")
    subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1", "-c:a", "aac", path], check=True)
    frames, ends = split_rows(Decoder(size=(32, 32)).decode_video(path))
    assert frames == [] and len(ends) == 1
    assert ends[0]["message"] == "no video stream (audio-only or not a video)"


# --- a crashing or hanging decoder costs one attempt, not the job ----------------------


def _codes_exact(frames):
    return all(framecode.read_code(f["frame"]) == f["frame_index"] for f in frames)


@pytest.fixture(scope="module")
def code_video_240(tmp_path_factory):
    """240 frames: more than the socket to the child holds, so a kill lands mid-video."""
    path = str(tmp_path_factory.mktemp("long240") / "long.mp4")
    framecode.write_code_video(path, 240, framecode.SIZE, ["-c:v", "libx264", "-pix_fmt", "yuv420p"])
    return path, 240


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_decoder_process_crash_mid_video_resumes_where_it_stopped(code_video_240, sig):
    path, n = code_video_240
    dec = Decoder(size=framecode.SIZE, batch_frames=4)
    gen = dec.decode_video(path)
    first = next(gen)
    os.kill(dec._child.proc.pid, sig)  # a native crash in the middle of the video
    frames, [end] = split_rows([first, *gen])
    assert [f["frame_index"] for f in frames] == list(range(n))  # each frame once
    assert _codes_exact(frames)
    assert end["error_type"] == "" and end["n_frames"] == n
    assert f"decoder process killed by {sig.name}" in end["decoder"]
    assert end["decoder"].startswith("pyav")


class _DiesWhileStarting(subprocess.Popen):
    """A process killed 0.1 s after it starts, before a decode child is ready (as the OOM
    killer or a node's trouble would): the real process, really killed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        threading.Timer(0.1, self.kill).start()


def test_a_child_that_dies_while_it_restarts_ends_the_segment_with_the_frames_it_sent(code_video_240, monkeypatch):
    """After the decode child dies mid-segment the retry starts a fresh one; one that dies
    while it starts raised RuntimeError out of the decode stage (the task failed, and the
    job with it): now that attempt fails as a crash does, the end row counts the frames
    sent, and the next video gets a fresh child."""
    path, n = code_video_240
    dec = Decoder(size=framecode.SIZE, batch_frames=4, retries=1)
    gen = dec.decode_video(path)
    first = next(gen)
    os.kill(dec._child.proc.pid, signal.SIGKILL)
    dec._child.proc.wait()
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", _DiesWhileStarting)
        frames, [end] = split_rows([first, *gen])
    sent = len(frames)
    assert sent >= 4 and [f["frame_index"] for f in frames] == list(range(sent)) and _codes_exact(frames)
    assert (end["error_stage"], end["error_type"], end["n_frames"]) == ("decode", "DecoderCrash", sent)
    assert "the decode child process did not start: decoder process killed by SIGKILL (2 attempts)" in end["message"]
    frames, [end] = split_rows(dec.decode_video(path))
    assert len(frames) == end["n_frames"] == n and end["error_type"] == ""


def test_a_child_killed_while_the_actor_starts_does_not_fail_the_actor(matrix, monkeypatch, caplog):
    """The decode child started with the actor (`Decoder.__init__`) and killed then (the OOM
    killer, a node's trouble) failed the actor's construction: Ray Data's ActorDiedError
    failed the run (a QA find). Now said, and the first segment starts another: exact."""
    path, n = matrix["h264.mp4"]
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", _DiesWhileStarting)
        dec = Decoder(size=framecode.SIZE)
    assert dec._child.proc is None
    assert "the decode child process did not start: decoder process killed by SIGKILL" in caplog.text
    frames, [end] = split_rows(dec.decode_video(path))
    assert [f["frame_index"] for f in frames] == list(range(n)) and _codes_exact(frames)
    assert end["error_type"] == ""


def test_a_child_that_cannot_import_fails_the_actor_loudly(tmp_path, monkeypatch):
    """A broken install (here the child's numpy cannot be imported: it exits with status 1
    before it can say why) still fails the actor as it starts, not every video's segment
    as an error row of a run that exits 0 (a reviewer's find in the mend above)."""
    (tmp_path / "numpy.py").write_text("raise ImportError('a broken install')\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the child's PYTHONPATH starts with it
    with pytest.raises(RuntimeError, match="the decode child process did not start: decoder process exited with status 1"):
        Decoder(size=framecode.SIZE)


def test_hung_decoder_times_out_and_is_retried(matrix):
    path, n = matrix["h264.mp4"]
    dec = Decoder(size=framecode.SIZE, timeout_s=1.5)
    os.kill(dec._child.proc.pid, signal.SIGSTOP)  # hangs: no progress, no exit
    t0 = time.monotonic()
    frames, [end] = split_rows(dec.decode_video(path))
    assert time.monotonic() - t0 < 30
    assert [f["frame_index"] for f in frames] == list(range(n)) and _codes_exact(frames)
    assert end["error_type"] == "" and "DecodeTimeout on attempt 1: no result within 1.5 s" in end["decoder"]


def test_retries_are_bounded_then_the_segment_is_an_error_row(matrix):
    path, n = matrix["h264.mp4"]
    dec = Decoder(size=framecode.SIZE, timeout_s=1, retries=0)
    os.kill(dec._child.proc.pid, signal.SIGSTOP)
    frames, [end] = split_rows(dec.decode_video(path))
    assert frames == [] and end["n_frames"] == 0
    assert (end["error_stage"], end["error_type"]) == ("decode", "DecodeTimeout")
    assert end["message"] == "no result within 1 s (1 attempts)"
    # the actor goes on: the next video decodes in a fresh child process
    frames, [end] = split_rows(dec.decode_video(path))
    assert len(frames) == n and end["error_type"] == ""


def test_a_video_rewritten_while_it_is_decoded_is_an_error_row_not_a_quiet_mix(code_video_240, tmp_path):
    """A local file is read in place: its version (mtime, as listed) is checked before the
    first frame and after the last. Rewritten meanwhile, the segment's terminal row says so
    and still counts the frames it sent (the committer needs that count); listed at another
    version, nothing is decoded."""
    import shutil

    from rayvid import storage

    path = str(tmp_path / "rewritten.mp4")
    shutil.copy(code_video_240[0], path)
    listed = storage.version_of(storage.resolve(path)[0].info(path))  # as the listing has it
    dec = Decoder(size=framecode.SIZE, batch_frames=4)
    frames, [end] = split_rows(dec.decode_video(path, version=listed))
    assert len(frames) == 240 and end["error_type"] == ""  # unchanged: no false alarm
    gen = dec.decode_video(path, version=listed)
    first = next(gen)
    os.utime(path, (1_000_000_000, 1_000_000_000))  # written again while it is decoded
    frames, [end] = split_rows([first, *gen])
    assert end["error_type"] == "ObjectChanged" and end["error_stage"] == "read"
    assert end["n_frames"] == len(frames) > 0
    assert "changed while it was read" in end["message"] and "decoded frames kept" in end["message"]
    frames, [end] = split_rows(dec.decode_video(path, version=listed))  # the listing is now stale
    assert frames == [] and end["error_type"] == "ObjectChanged" and end["n_frames"] == 0
    assert "changed after it was listed" in end["message"]


def test_frames_reach_the_actor_through_the_shared_slot_each_batch_its_own_copy(code_video_240):
    """The child hands frames over in one shared slot (the socket carries the rest): every
    batch the actor yields must stay intact after the child refills the slot."""
    path, n = code_video_240
    dec = Decoder(size=framecode.SIZE, batch_frames=8)
    assert dec._child.slot.size == 8 * framecode.SIZE[0] * framecode.SIZE[1] * 3
    batches = list(dec.decode_video(path))  # held until the end: nothing may overwrite them
    frames, [end] = split_rows(batches)
    assert len(batches) == n // 8 + 1 and end["n_frames"] == n
    assert [f["frame_index"] for f in frames] == list(range(n)) and _codes_exact(frames)
    assert not any(np.shares_memory(a["frame"], b["frame"]) for a, b in zip(batches, batches[1:]))


def test_shared_slot_without_memfd_uses_an_unlinked_file(matrix, monkeypatch):
    """Where the OS has no memfd_create (macOS), the slot is an unlinked temporary file."""
    path, n = matrix["h264.mp4"]
    monkeypatch.delattr(os, "memfd_create", raising=False)
    dec = Decoder(size=framecode.SIZE, batch_frames=4)
    target = os.readlink(f"/proc/self/fd/{dec._child.slot.fd}")
    assert target.endswith(" (deleted)") and "rayvid-frames-" in target and not target.startswith("/memfd:")
    frames, [end] = split_rows(dec.decode_video(path))
    assert [f["frame_index"] for f in frames] == list(range(n)) and _codes_exact(frames)
    assert end["n_frames"] == n


def test_abandoned_request_does_not_leak_into_the_next(matrix):
    path, n = matrix["h264.mp4"]
    dec = Decoder(size=framecode.SIZE, batch_frames=2)
    gen = dec.decode_video(path)
    next(gen)
    gen.close()  # the consumer stopped mid-video
    frames, [end] = split_rows(dec.decode_video(path))
    assert [f["frame_index"] for f in frames] == list(range(n)) and end["n_frames"] == n


# --- damaged files: what decodes is kept and exact, the rest is said ------------------


def test_truncated_mp4_with_its_index_at_the_end_is_one_clear_error(damaged):
    frames, [end] = split_rows(Decoder(size=framecode.SIZE).decode_video(damaged["truncated_moov_at_end.mp4"]))
    assert frames == [] and (end["error_stage"], end["error_type"]) == ("decode", "VideoError")
    assert "truncated MP4" in end["message"] and "index (moov)" in end["message"]


@pytest.mark.parametrize("faststart", [False, True])
def test_an_mp4_cut_inside_its_index_says_so(tmp_path, faststart):
    """Cut inside its index (moov), at the end (ffmpeg's default) or at the start
    (faststart): the error said "the video stream has no frames" or "End of file", nothing
    of why; now it says the file ends inside its index."""
    import subprocess

    from rayvid import samples

    path = str(tmp_path / "v.mp4")
    framecode.write_code_video(path, 30, framecode.SIZE, framecode.X264)
    if faststart:
        subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-i", path, "-c", "copy",
                        "-movflags", "+faststart", str(tmp_path / "f.mp4")], check=True)
        path = str(tmp_path / "f.mp4")
    data = open(path, "rb").read()
    moov = data.find(b"moov") - 4
    assert (moov < data.find(b"mdat")) == faststart
    cut = str(tmp_path / "cut.mp4")
    open(cut, "wb").write(data[: moov + int.from_bytes(data[moov:moov + 4], "big") // 2])
    frames, [end] = split_rows(Decoder(size=framecode.SIZE).decode_video(cut))
    assert frames == [] and end["error_type"] == "VideoError"
    assert "(truncated MP4: the file ends inside its index (moov))" in end["message"], end["message"]


@pytest.mark.parametrize("decoder", ["auto", "pyav"])
def test_truncated_faststart_mp4_keeps_the_frames_it_holds(damaged, decoder):
    frames, [end] = split_rows(Decoder(size=framecode.SIZE, decoder=decoder).decode_video(damaged["truncated_faststart.mp4"]))
    got = [f["frame_index"] for f in frames]
    assert 10 < len(got) < framecode.DAMAGED_FRAMES and got == list(range(len(got)))
    assert _codes_exact(frames)
    assert end["n_frames"] == len(got) and end["error_type"] == "VideoError"
    assert f"truncated: the container lists {framecode.DAMAGED_FRAMES} frames" in end["message"]
    assert f"({len(got)} decoded frames kept)" in end["message"]


@pytest.mark.parametrize("decoder", ["auto", "pyav"])
def test_garbage_in_the_middle_drops_the_damaged_gop_and_keeps_the_rest_exact(damaged, decoder):
    """FFmpeg conceals damage: frames after it can show other frames' content (measured).
    rayvid drops frames from the damage to the next key frame and says which."""
    frames, [end] = split_rows(Decoder(size=framecode.SIZE, decoder=decoder).decode_video(damaged["garbage_in_middle.mp4"]))
    got = [f["frame_index"] for f in frames]
    assert _codes_exact(frames), "a concealed (wrong) frame was kept"
    assert got[0] == 0 and got[-1] == framecode.DAMAGED_FRAMES - 1  # before and after the damage
    lost = sorted(set(range(framecode.DAMAGED_FRAMES)) - set(got))
    assert 0 < len(lost) <= 30 and end["error_type"] == "VideoError"
    assert f"{len(lost)} of {framecode.DAMAGED_FRAMES} frames lost to damaged data (frame {lost[0]}-{lost[-1]})" in end["message"]
    assert end["n_frames"] == len(got)
    # a clip run's rows are clips: its message counts them so (it said "decoded frames")
    clips, [end] = split_rows(Decoder(size=framecode.SIZE, decoder=decoder, clip_len=4).decode_video(
        damaged["garbage_in_middle.mp4"]))
    assert end["message"].endswith(f" ({len(clips)} decoded clips kept)") and end["n_frames"] == len(clips)


@pytest.mark.parametrize("sampling, kept, at", [({}, list(range(framecode.DAMAGED_FRAMES)), None),
                                                ({"every": 7}, list(range(0, 57, 7)), 60),
                                                ({"keyframes": True}, [0], 30)])
def test_a_damaged_key_frame_index_keeps_the_frames_before_the_seek_it_fails(damaged, sampling, kept, at):
    """An MP4 whose key-frame table (stss) is reversed demuxes, but FFmpeg cannot seek in
    it (EPERM). Read through, every frame is exact (decord fails on it; PyAV takes over);
    sampled sparsely, the frames before the failed seek are kept and exact, and the error
    says what broke, not the errno's usual story (no credentials hint)."""
    frames, [end] = split_rows(Decoder(size=framecode.SIZE, **sampling).decode_video(damaged["key_frame_index_reversed.mp4"]))
    assert [f["frame_index"] for f in frames] == kept and _codes_exact(frames)
    assert end["n_frames"] == len(kept)
    if at is None:
        assert end["error_type"] == "" and end["decoder"].startswith("pyav")
    else:
        assert (end["error_stage"], end["error_type"]) == ("decode", "VideoError")
        assert end["message"] == (f"cannot seek to frame {at}: the container's index is damaged "
                                  f"(FFmpeg: Operation not permitted) ({len(kept)} decoded frames kept)")


def test_unsupported_codec_is_one_clear_error(damaged):
    frames, [end] = split_rows(Decoder(size=framecode.SIZE).decode_video(damaged["unsupported_codec.avi"]))
    assert frames == [] and end["message"] == "unsupported codec: FFmpeg has no decoder for this video stream"


def test_skip_similar_reuses_the_last_inferred_frame(tmp_path):
    """A still, noisy scene, then a square that moves, then still again: still frames point
    at the last frame sent to the model, moving ones are all sent, pixels of reused ones
    are dropped."""
    rng = np.random.default_rng(0)
    h, w = 64, 64
    base = rng.integers(40, 200, (h, w, 3)).astype(np.int16)
    frames = []
    for i in range(30):
        img = base + rng.normal(0, 3, (h, w, 3)).round().astype(np.int16)  # sensor noise
        if 10 <= i < 20:  # a bright square moving 4 px a frame
            x = 4 * (i - 10)
            img[20:36, x:x + 16] = 255
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    path = str(tmp_path / "still.mkv")
    samples.write_video(path, frames, 10, (h, w), ["-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p"])

    rows, [end] = split_rows(Decoder(size=(h, w), skip_similar=2.0).decode_video(path))
    assert end["n_frames"] == 30 and len(rows) == 30
    reused = {r["frame_index"]: r["reused_from"] for r in rows}
    inferred = [i for i, src in reused.items() if src < 0]
    assert inferred[0] == 0 and set(range(10, 21)) <= set(inferred)  # the square moves: all sent
    assert all(reused[i] == 0 for i in range(1, 10))  # still: all reuse frame 0
    assert len(inferred) <= 14, inferred  # the second still part reuses too
    for r in rows:
        if r["reused_from"] >= 0:
            assert r["reused_from"] in inferred and r["reused_from"] < r["frame_index"]
            assert not r["frame"].any()  # no pixels shipped for a frame the model skips
    # off by default: every frame is inferred
    plain, _ = split_rows(Decoder(size=(h, w)).decode_video(path))
    assert all(r["reused_from"] == -1 for r in plain)


# --- clips (--clip-len) --------------------------------------------------------------


@pytest.mark.parametrize("batch_frames", [64, 2])  # 2: a clip outgrows the child's frame slot
def test_clip_rows_hold_consecutive_frames(matrix, batch_frames):
    path, n = matrix["h264.mp4"]
    dec = Decoder(size=framecode.SIZE, clip_len=3, batch_frames=batch_frames)
    frames, [end] = split_rows(dec.decode_video(path))
    assert end["error_type"] == "" and end["n_frames"] == len(frames) == -(-n // 3)
    assert end["frame"].shape == (3, *framecode.SIZE, 3) and end["clip_start_frame"] == -1
    for row in frames:
        assert row["frame"].shape == (3, *framecode.SIZE, 3)
        assert row["clip_start_frame"] == row["frame_index"]
        codes = [framecode.read_code(f) for f in row["frame"]]
        assert codes == [min(row["frame_index"] + k, row["clip_end_frame"]) for k in range(3)]


# --- containers PyAV trips on: error rows or frames, never a failed task -----------------


def stray_stream(src: str, dst: str) -> None:
    """`src` (an MPEG-TS) with one packet of its video (PID 0x100) in mid-file moved to a
    PID no program lists, as a damaged or spliced capture has: the demuxer adds a stream
    while it reads."""
    data = bytearray(open(src, "rb").read())
    starts = [k for k in range(len(data) // 188)
              if data[188 * k + 1] & 0x40 and ((data[188 * k + 1] & 0x1F) << 8 | data[188 * k + 2]) == 0x100]
    data[188 * starts[len(starts) // 2] + 2] = 0x01
    with open(dst, "wb") as f:
        f.write(bytes(data))


@pytest.fixture(scope="module")
def odd_containers(tmp_path_factory, matrix):
    root = tmp_path_factory.mktemp("odd")
    out = {"latin1_metadata.mp4": str(root / "latin1_metadata.mp4"), "stray_stream.ts": str(root / "stray_stream.ts")}
    framecode.latin1_metadata(matrix["h264.mp4"][0], out["latin1_metadata.mp4"])
    framecode.write_code_video(str(root / "clean.ts"), 90, framecode.SIZE, framecode.X264 + ["-g", "30"])
    stray_stream(str(root / "clean.ts"), out["stray_stream.ts"])
    return out


@pytest.mark.parametrize("sampling", [{}, {"decoder": "pyav"}, {"every": 7}])
def test_metadata_that_is_not_utf8_does_not_stop_a_video(odd_containers, matrix, sampling):
    """PyAV decodes a container's tags as UTF-8 when it opens it and raised
    UnicodeDecodeError (a ValueError, not an FFmpeg error) on a Latin-1 tag: the child
    reported a bug and the task failed. The tags are not read: every frame, exact."""
    n = matrix["h264.mp4"][1]
    frames, [end] = split_rows(Decoder(size=framecode.SIZE, **sampling).decode_video(odd_containers["latin1_metadata.mp4"]))
    assert end["error_type"] == "" and end["n_frames"] == len(frames)
    assert [f["frame_index"] for f in frames] == list(range(0, n, sampling.get("every", 1))) and _codes_exact(frames)


@pytest.mark.parametrize("sampling", [{"decoder": "pyav"}, {"every": 7}])
def test_a_stream_that_appears_mid_file_does_not_stop_a_video(odd_containers, sampling):
    """An MPEG-TS whose demuxer adds a stream part way through: PyAV's demux raised
    IndexError at its end (it flushes a stream it never listed), the child reported a bug
    and the task failed. Now the video is read: the frames before the moved packet are
    exact (after it the file holds one frame fewer, and the damage FFmpeg does not see
    is not said), and the end row counts what was sent."""
    frames, [end] = split_rows(Decoder(size=framecode.SIZE, **sampling).decode_video(odd_containers["stray_stream.ts"]))
    assert end["n_frames"] == len(frames) > 0 and end["error_type"] in ("", "VideoError"), end["message"]
    if "every" not in sampling:  # (sparse sampling of an MPEG-TS seeks to the parser's key frames: frames lost)
        before = [f for f in frames if f["frame_index"] < 40]
        assert [f["frame_index"] for f in before] == list(range(40)) and _codes_exact(before)


_RESTART_FAILS = r"""
import json, os, resource, signal, sys
from rayvid.decode import Decoder

dec = Decoder(size=(32, 32), batch_frames=4)
gen = dec.decode_video(sys.argv[1])
rows = [next(gen)]
os.kill(dec._child.proc.pid, signal.SIGKILL)
dec._child.proc.wait()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))  # no file descriptor to restart the child with
try:
    rows += list(gen)
finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
again = list(dec.decode_video(sys.argv[1]))
out = lambda rows: [{k: (len(r["frame_index"]) if k == "frames" else r[k][0].item() if hasattr(r[k][0], "item") else r[k][0])
                     for k in ("kind", "frames", "n_frames", "error_stage", "error_type", "message", "decoder")}
                    for r in rows]
print(json.dumps([out(rows), out(again)]))
"""


def test_a_child_that_cannot_be_restarted_ends_the_segment_with_the_frames_it_sent(code_video_240):
    """After the decode child dies mid-segment the retry starts a fresh one; where that
    fails (here: no file descriptor left, a real EMFILE) the attempt fails, and the
    segment's end row must still count the frames already sent (it said 0: the committer
    then finds more frames than the segment says and stops the run). The next video gets
    a fresh child. (In a process of its own: the descriptor limit is process-wide.)"""
    import json
    import subprocess
    import sys

    import rayvid

    path, n = code_video_240
    proc = subprocess.run([sys.executable, "-c", _RESTART_FAILS, path], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(rayvid.__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, again = json.loads(proc.stdout.strip().splitlines()[-1])
    *batches, end = rows
    sent = sum(b["frames"] for b in batches)
    assert all(b["kind"] == KIND_FRAME for b in batches) and end["kind"] == KIND_END
    assert end["n_frames"] == sent >= 4
    assert (end["error_stage"], end["error_type"]) == ("decode", "DecoderCrash"), end
    assert end["message"] == ("the decoder process could not be started: [Errno 24] Too many open files "
                              f"(2 attempts) ({sent} decoded frames kept)")
    assert "DecoderCrash on attempt 1: decoder process killed by SIGKILL" in end["decoder"]
    assert sum(b["frames"] for b in again[:-1]) == again[-1]["n_frames"] == n and again[-1]["error_type"] == ""


# --- a decode actor's copies do not outlive it -------------------------------------------------

_HOLDS_A_COPY = r"""
import sys, time
from rayvid.decode import Decoder

dec = Decoder(size=(32, 32), batch_frames=2)
gen = dec.decode_video(sys.argv[1])
next(gen)  # the whole copy is on disk while the video decodes
print(dec._tmpdir, flush=True)
time.sleep(600)
"""


def test_the_copies_of_a_killed_decode_actor_are_deleted_by_the_next_one(code_video_240, s3fs_client, tmp_path,
                                                                          monkeypatch):
    """A decode actor SIGKILLed or OOM-killed never runs its cleanup: its folder, and the
    whole copy of the video it was decoding, stay on the node's disk. Each actor's folder
    is under this user's directory and named after its process; a new actor deletes the
    folders of processes that are gone, and leaves those of live ones alone."""
    import subprocess
    import sys
    import tempfile

    import rayvid

    path, _ = code_video_240
    url = "s3://rayvid-test/killed-actor/long.mp4"
    s3fs_client.put_file(path, url)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    holders = [subprocess.Popen([sys.executable, "-c", _HOLDS_A_COPY, url], stdout=subprocess.PIPE, text=True, env=env,
                                cwd=os.path.dirname(os.path.dirname(rayvid.__file__))) for _ in range(2)]
    try:
        folders = [h.stdout.readline().strip() for h in holders]
        root = str(tmp / f"rayvid-decode-{os.getuid()}")
        for holder, folder in zip(holders, folders):
            assert os.path.dirname(folder) == root and os.path.basename(folder).startswith(f"{holder.pid}.")
            [copy] = os.listdir(folder)
            assert os.path.getsize(os.path.join(folder, copy)) == os.path.getsize(path)
        holders[0].kill()
        holders[0].wait()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        dec = Decoder(size=(32, 32))
        assert os.path.dirname(dec._tmpdir) == root
        assert not os.path.exists(folders[0])  # the killed actor's folder and copy: gone
        assert len(os.listdir(folders[1])) == 1  # the live one's: untouched
        assert sorted(os.listdir(root)) == sorted(os.path.basename(f) for f in (folders[1], dec._tmpdir))
        del dec
    finally:
        for h in holders:
            h.kill()
            h.wait()


def test_an_elementary_stream_without_timestamps_says_to_remux_it(tmp_path):
    """A raw .h264 (Annex B) has no container to time its frames: one error row that says
    so and how to fix it, not frames with made-up times."""
    path = str(tmp_path / "raw.h264")
    framecode.write_code_video(path, 10, (96, 128), framecode.X264)
    [end] = list(Decoder(size=framecode.SIZE).decode_video(path))
    assert end["kind"][0] == KIND_END and end["n_frames"][0] == 0 and end["error_type"][0] == "VideoError"
    assert "elementary stream" in end["message"][0] and "ffmpeg -i IN -c copy OUT.mp4" in end["message"][0]


def test_a_full_local_disk_stops_the_run_not_the_video(media, s3fs_client, tmp_path, monkeypatch):
    """The local copy of a remote video failed with ENOSPC (a decode node's full TMPDIR):
    each video it got became an error row, skipped by every later run, and the run said
    exit 0. It is the node's disk, not the video: StorageUnavailable, which stops the run
    (as an outage does), saying where there is no space."""
    import subprocess
    import tempfile

    from rayvid.errors import StorageUnavailable

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("needs a small tmpfs (mount: root)")
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(small))  # TMPDIR, as the decode node has it
        path = next(p for p in media["truth"] if p.endswith("a_clip.mp4"))
        s3fs_client.put_file(path, "s3://rayvid-test/full/a.mp4")
        dec = Decoder(size=(32, 32))
        with contextlib.suppress(OSError), open(small / "filler", "wb") as f:  # the disk, full
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        with pytest.raises(StorageUnavailable, match=r"no space left on host \S+ for the local copy of "
                                                     r"s3://rayvid-test/full/a.mp4 \(in .*\): free space there"):
            list(dec.decode_video("s3://rayvid-test/full/a.mp4"))
        del dec
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_a_decode_timeout_of_any_length_waits_on_the_child():
    """multiprocessing's poll refuses a wait of 2**31 ms or more (OverflowError, even with
    data ready): `--decode-timeout 3000000` failed the run with a traceback (a QA find)."""
    import multiprocessing

    from rayvid import decode

    ours, theirs = multiprocessing.Pipe()
    assert not decode._poll(ours, 0.05)
    theirs.send("x")
    assert decode._poll(ours, 3e6) and decode._poll(ours, 1e300) and ours.recv() == "x"
