"""The reader inside the decode child (rayvid/video.py), on its own: which frames a sampling
mode keeps, what PyAV decodes to reach them, probes of partial copies, clips, threads.
Every frame is checked by the index coded into its pixels (tests/framecode.py); the
decode stage around the reader (actor, child process, retries) is tests/test_decode.py's."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest

import framecode
from helpers import split_rows
from rayvid import samples
from rayvid.video import FrameReader, sample_indices


def test_sample_indices_every():
    ts = np.arange(10) / 10
    assert sample_indices(ts, every=1).tolist() == list(range(10))
    assert sample_indices(ts, every=3).tolist() == [0, 3, 6, 9]
    assert sample_indices(np.array([]), every=2).tolist() == []


def test_sample_indices_fps_uses_pts_on_variable_frame_rate():
    # 1 s at 30 fps, then 2 s at 10 fps: average fps (~16.7) would put index/fps far off.
    ts = np.concatenate([np.arange(30) / 30, 1 + np.arange(20) / 10])
    got = sample_indices(ts, fps=2)  # targets 0, .5, 1, 1.5, 2, 2.5
    assert ts[got].tolist() == pytest.approx([0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert got.tolist() == [0, 15, 30, 35, 40, 45]
    # a rate above the source's keeps each frame once
    assert sample_indices(ts, fps=100).tolist() == list(range(50))
    # a huge rate neither builds duration x fps targets (1e10: 147 GB) nor overflows (1e308)
    for fps in (1e10, 1e308):
        assert sample_indices(ts, fps=fps).tolist() == list(range(50))


def test_the_fps_rule_by_cells_is_the_rule_target_by_target():
    """Where targets would outnumber frames many times, `sample_indices` asks each frame's
    cell for a target instead: the same frames as target by target, on irregular times."""
    from rayvid.video import _nearest_any_target

    rng = np.random.default_rng(3)
    for _ in range(200):
        # (irregular gaps, no target exactly between two frames: there float rounding decides either way)
        ts = np.cumsum(rng.choice([1 / 30, 1 / 60, 0.2, 0.5], size=int(rng.integers(1, 40))) * rng.uniform(0.9, 1.1, 1))
        ts = ts + rng.uniform(0, 1e-4, len(ts)).cumsum()
        ts -= ts[0] - rng.choice([0.0, 0.01])
        fps = float(rng.choice([0.7, 2.5, 7.3, 30, 61, 400]))
        targets = np.arange(0, np.floor(ts[-1] * fps + 1e-9) + 1) / fps
        want = sorted({int(np.argmin(np.abs(ts - t))) for t in targets})  # ties: the earlier frame
        assert _nearest_any_target(ts, fps).tolist() == want, (ts.tolist(), fps)


def test_hd_sources_decode_on_the_large_source_threads(media, tmp_path):
    """Decode actors that share cores with CPU inference decode HD and larger sources on more
    threads (decoding is their bottleneck there), smaller ones on the threads they hold."""
    import subprocess

    hd = str(tmp_path / "hd.mp4")
    subprocess.run([samples.ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=1280x720:rate=30:duration=0.5", "-c:v", "libx264", "-pix_fmt", "yuv420p", hd],
                   check=True)
    small = next(p for p in media["truth"] if p.endswith("a_clip.mp4"))
    for path, n, threads in ((hd, 15, 2), (small, len(media["truth"][small]), 1)):
        reader = FrameReader((64, 64), threads=1, large_source_threads=2)
        frames, [end] = split_rows(reader.read(path, path))
        assert (end["decoder"], len(frames), reader.decord_threads) == ("decord", n, threads), path


@pytest.mark.parametrize("name, every", [("h264.mp4", 15), ("hevc_opengop.mp4", 25)])
def test_sparse_sampling_seeks_over_intervals_without_kept_frames(matrix, name, every):
    """Frames 15 and 30 of a 10-frame-GOP H.264 file, 25 and 50 of a 20-frame open-GOP HEVC
    one: PyAV jumps to the key frame before each and skips the rest, and stays exact."""
    path, n = matrix[name]
    reader = FrameReader(framecode.SIZE, every=every)
    frames, [end] = split_rows(reader.read(path, path))
    assert end["error_type"] == "" and end["decoder"] == "pyav", end
    assert [f["frame_index"] for f in frames] == list(range(0, n, every))
    assert all(framecode.read_code(f["frame"]) == f["frame_index"] for f in frames)
    assert reader.decoded <= n // 2, f"decoded {reader.decoded} of {n} frames for {len(frames)}"

    dense = FrameReader(framecode.SIZE, decoder="pyav")
    assert len(split_rows(dense.read(path, path))[0]) == n and dense.decoded == n


def test_sampled_key_frames_cost_one_packet_each(matrix):
    """Kept frames that are key frames (every 10th frame of a file with a key frame every 10,
    as 1 fps is on fixed 1 s GOPs): the decoder gets each kept frame's packet and nothing
    after it (it is drained instead: a decoder holds a frame back until later packets
    come), and a seek to the next."""
    path, n = matrix["h264.mp4"]
    reader = FrameReader(framecode.SIZE, every=10)
    frames, [end] = split_rows(reader.read(path, path))
    assert [f["frame_index"] for f in frames] == list(range(0, n, 10)) and end["error_type"] == ""
    assert all(framecode.read_code(f["frame"]) == f["frame_index"] for f in frames)
    assert reader.fed == len(frames), f"{reader.fed} packets decoded for {len(frames)} key frames"


def test_keyframes_only_decodes_only_key_frames(matrix):
    path, n = matrix["h264.mp4"]  # a key frame every 10 frames
    reader = FrameReader(framecode.SIZE, keyframes=True)
    frames, _ = split_rows(reader.read(path, path))
    assert [f["frame_index"] for f in frames] == list(range(0, n, 10)) and reader.decoded == len(frames)


@pytest.mark.parametrize("n, stride, starts, ends", [
    (4, 4, [0, 4, 8], [3, 7, 9]),  # side by side; the last clip padded
    (4, 2, [0, 2, 4, 6], [3, 5, 7, 9]),  # overlapping: frames 8-9 are in the last full clip
    (4, 6, [0, 6], [3, 9]),  # gaps
])
def test_clips_tile_the_kept_frames(n, stride, starts, ends):
    from rayvid.video import Clips, clip_starts

    times = np.arange(10) / 10
    frames = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    keep = np.arange(10)
    clips = Clips(n, keep, clip_starts(10, n, stride), times)
    got = clips.add(np.arange(6), frames[:6]) + clips.add(np.arange(6, 10), frames[6:]) + clips.finish()
    assert [c[0] for c in got] == starts and [c[1] for c in got] == ends
    for first, last, start_s, end_s, clip in got:
        assert clip.shape == (n, 2, 2, 3)
        shown = [int(f[0, 0, 0]) for f in clip]
        assert shown == [min(first + k, last) for k in range(n)]  # consecutive, then padded
        assert start_s == times[first] and end_s == pytest.approx(times[last] + 0.1)


@pytest.mark.parametrize("n, stride, every", [(4, 4, 1), (4, 2, 1), (3, 5, 2)])
def test_a_videos_clips_are_the_same_however_it_is_cut_into_segments(matrix, n, stride, every):
    """A segment's clips ended at its end: the clip across a cut was padded (a moving scene's
    frames then a copy of one: a motion model saw still footage at every --segment-seconds
    cut) and the next segment's clips began a new grid. Clips start every S kept frames of the
    video; a segment makes those that start in it, reading on past its end for the last ones.
    A decode retried after a clip (`after`: its first frame) makes the clips after it."""
    path, frames_in_video = matrix["h264.mp4"]  # a key frame every 10 frames
    reader = FrameReader(framecode.SIZE, every=every, clip_len=n, clip_stride=stride)

    def clips(**segment):
        rows, [end] = split_rows(reader.read(path, path, **segment))
        assert not end["error_type"], end["message"]
        return [(int(r["frame_index"]), int(r["clip_end_frame"]), float(r["end_s"]),
                 [framecode.read_code(f) for f in r["frame"]]) for r in rows]

    whole = clips()
    kept = list(range(0, frames_in_video, every))
    assert [c[0] for c in whole] == kept[::stride][: len(whole)] and len(whole) > 3
    assert all(c[3] == kept[kept.index(c[0]): kept.index(c[0]) + n] for c in whole[:-1])  # whole, consecutive
    for cut in (0.37, 0.61):  # inside a clip (30 fps: after frames 11 and 18)
        parts = (clips(segment=0, n_segments=2, end_s=cut)
                 + clips(segment=1, n_segments=2, start_s=cut))
        assert parts == whole, (cut, [c[:2] for c in parts], [c[:2] for c in whole])
    resumed = clips(after=whole[1][0])
    assert resumed == whole[2:]


def test_a_clip_whose_first_frame_is_lost_keeps_its_own_start():
    """Frames lost to damaged data: a clip whose first frame was lost took the next frame's
    index, which overlapping clips (--clip-stride 1) already had: two rows of frame 3 (a
    reviewer found it), and a retry resuming after frame 3 skipped the clip that starts there."""
    from rayvid.video import Clips, clip_starts

    times = np.arange(10) / 10
    frames = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    clips = Clips(4, np.arange(10), clip_starts(10, 4, 1), times)
    arrived = np.array([0, 1, 3, 4, 5, 6, 7, 8, 9])  # frame 2 lost
    got = clips.add(arrived, frames[arrived]) + clips.finish()
    assert [c[0] for c in got] == list(range(7))  # one clip per start, each its own
    assert [(c[0], c[1], [int(f[0, 0, 0]) for f in c[4]]) for c in got[1:4]] == [
        (1, 4, [1, 3, 4, 4]), (2, 5, [3, 4, 5, 5]), (3, 6, [3, 4, 5, 6])]
    assert got[2][2] == times[2]


def test_a_variable_frame_rate_videos_last_clip_ends_at_its_duration():
    """A clip run's last clip ended one last step after its last frame (a frame at 1.0 s
    after 30 frames at 30 fps: to 1.967 s; the video lasts 1.033 s, the probe's duration, the
    last frame's time plus one frame at the average rate), past the video's end (a QA helper)."""
    from rayvid.video import Clips, clip_starts

    times = np.r_[np.arange(30) / 30, 1.0]
    fps = 31 / 1.0
    frames = np.zeros((31, 2, 2, 3), np.uint8)
    clips = Clips(4, np.arange(31), clip_starts(31, 4, 4), times, fps)
    got = clips.add(np.arange(31), frames) + clips.finish()
    assert got[-1][:2] == (28, 30) and got[-1][3] == times[-1] + 1.0 / fps  # the probe's duration_s
    assert [c[3] for c in got[:-1]] == [times[c[1] + 1] for c in got[:-1]]


def test_a_one_frame_videos_clip_lasts_a_frame():
    """A one-frame video's clip ended where it began (start_s = end_s = 0): it lasts one
    frame at the stream's rate (none known: 0, as before)."""
    from rayvid.video import Clips, clip_starts

    frame = np.zeros((1, 2, 2, 3), np.uint8)
    for fps, end in ((10.0, 0.1), (0.0, 0.0)):
        clips = Clips(4, np.arange(1), clip_starts(1, 4, 4), np.array([0.0]), fps)
        [(first, last, start_s, end_s, _)] = clips.add(np.arange(1), frame) + clips.finish()
        assert (first, last, start_s) == (0, 0, 0.0) and end_s == pytest.approx(end)


@pytest.mark.parametrize("name", sorted(framecode.TRIMMED))
@pytest.mark.parametrize("sampling", [{}, {"every": 3}, {"fps": 4.0}, {"keyframes": True}, {"decoder": "pyav"}])
def test_a_trimmed_video_is_the_frames_a_player_shows(trimmed, name, sampling):
    """A stream-copy trim (an MP4/MOV edit list starting inside a GOP) and a transport stream
    captured mid-GOP hold packets no player shows: frame 0 is the first frame shown, at
    its time from the stream's start, every index shows its own frame (frame 0 is a key
    frame for --keyframes), and nothing is called lost or truncated (decord numbered the
    hidden packets as frames, gave the shown
    ones their times, 0.5 s early, and repeated the last frame for each; PyAV's path
    called them lost)."""
    truth = framecode.shown(trimmed[name])
    times = np.array([t for t, _, _ in truth])
    keys = np.array([k for _, _, k in truth]) if sampling.get("keyframes") else None
    if keys is not None:  # frame 0 too, which decodes from the lead-in's key frame (a trim within a GOP had none)
        keys[0] = True
    keep = sample_indices(times, sampling.get("every", 1), sampling.get("fps"), keys)
    rows, end = [], None
    for batch in FrameReader(framecode.SIZE, **sampling).read(trimmed[name], trimmed[name]):
        if batch["kind"][0] == "end":
            end = batch
            continue
        rows += [(int(i), float(t), framecode.read_code(f))
                 for i, t, f in zip(batch["frame_index"], batch["timestamp_s"], batch["frame"])]
    assert len(keep) and rows == [(int(i), truth[i][0], truth[i][1]) for i in keep]
    assert end["message"][0] == "" and end["n_frames"][0] == len(keep)


def _rows(path: str, **sampling) -> tuple[list, dict]:
    rows, end = [], None
    for batch in FrameReader(framecode.SIZE, **sampling).read(path, path):
        if batch["kind"][0] == "end":
            end = batch
            continue
        rows += [(int(i), float(t), framecode.read_code(f))
                 for i, t, f in zip(batch["frame_index"], batch["timestamp_s"], batch["frame"])]
    return rows, end


def test_a_joined_transport_stream_is_its_parts_in_the_order_played(trimmed):
    """Two captures joined end to end, the second's clock restarting (concatenated HLS
    segments, DVR files): frames in the order a player shows them, times going on from
    the first part's (they were sorted by the restarted clock: the second part first,
    then the first; --fps read only the first part). Sampling picks by those times."""
    import av

    path = trimmed[framecode.JOINED]
    with av.open(path) as c:
        played = [framecode.read_code(f.to_ndarray(format="rgb24")) for f in c.decode(c.streams.video[0])]
    rows, end = _rows(path)
    assert [r[2] for r in rows] == played and [r[0] for r in rows] == list(range(len(played)))
    steps = np.diff([r[1] for r in rows])
    assert rows[0][1] == 0 and steps.min() > 0 and steps.max() < 0.11  # one timeline, no jump back or ahead
    assert end["message"][0] == "" and end["n_frames"][0] == len(played)
    times = np.array([r[1] for r in rows])
    for sampling in ({"every": 3}, {"fps": 2.0}, {"decoder": "pyav"}):
        assert _rows(path, **sampling)[0] == [rows[i] for i in sample_indices(times, sampling.get("every", 1),
                                                                              sampling.get("fps"))], sampling


MIRRORS = {  # name -> the display flags ffmpeg sets on a stream copy of a code video
    "hflip.mp4": ["-display_hflip"],
    "vflip.mp4": ["-display_vflip"],
    "rot90_hflip.mp4": ["-display_rotation", "90", "-display_hflip"],
    "rot270_hflip.mp4": ["-display_rotation", "270", "-display_hflip"],
    "rot180_vflip.mp4": ["-display_rotation", "180", "-display_vflip"],
    # an angle that is no quarter turn: the picture as stored, on every path (PyAV's turned
    # -45 a quarter turn clockwise, 135 one counterclockwise, decord's none)
    "rot-45.mp4": ["-display_rotation", "-45"],
    "rot135.mp4": ["-display_rotation", "135"],
}


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    import subprocess

    root = tmp_path_factory.mktemp("mirrored")
    stored = str(root / "stored.mp4")
    framecode.write_code_video(stored, 12, (96, 128), framecode.X264 + ["-g", "4"])
    out = {}
    for name, flags in MIRRORS.items():
        out[name] = str(root / name)
        subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error", *flags, "-i", stored, "-c", "copy",
                        out[name]], check=True)
    return out


@pytest.mark.parametrize("name", sorted(MIRRORS))
@pytest.mark.parametrize("sampling", [{}, {"every": 2}, {"decoder": "pyav"}])
def test_a_mirrored_display_matrix_turns_frames_as_ffmpeg_shows_them(mirrored, name, sampling):
    """A display matrix that mirrors (a flip, alone or with a quarter or half turn): each
    frame as FFmpeg's command line shows it (its autorotate; the reference here), on
    decord's path and PyAV's (decord ignored the mirror: the frames came out mirrored). One
    that turns by another angle than a quarter turn: as stored, on both."""
    import subprocess

    h, w = framecode.SIZE
    raw = subprocess.run([samples.ffmpeg_exe(), "-loglevel", "error", "-i", mirrored[name], "-vf", f"scale={w}:{h}",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    shown = [framecode.read_code(f) for f in np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)]
    if name.startswith(("rot-45", "rot135")):  # (FFmpeg's command line turns it by that angle, its corners cut)
        from rayvid.video import probe

        info = probe(mirrored[name])
        assert (info.rotation, info.width, info.height) == (0, 128, 96), name
        shown = list(range(len(shown)))
    rows, end = _rows(mirrored[name], **sampling)
    keep = range(0, len(shown), sampling.get("every", 1))
    assert [(i, code) for i, _, code in rows] == [(i, shown[i]) for i in keep], name
    assert end["message"][0] == ""


def _udta_first(path: str, out: str) -> None:
    """`path` (an MP4) with its `moov` box's `udta` moved before its tracks, as taggers and
    some cameras write it: FFmpeg then lists an `attached_pic` cover stream first."""
    import struct

    data = open(path, "rb").read()

    def boxes(start, end):
        while start < end:
            size, kind = struct.unpack(">I4s", data[start:start + 8])
            yield kind, data[start:start + size]
            start += size

    out_boxes = []
    for kind, box in boxes(0, len(data)):
        if kind == b"moov":
            kids = list(boxes(data.index(box) + 8, data.index(box) + len(box)))
            ranked = sorted(kids, key=lambda k: {b"mvhd": 0, b"udta": 1}.get(k[0], 2))  # (stable: tracks in order)
            assert [k for k, _ in ranked].index(b"udta") < [k for k, _ in ranked].index(b"trak")
            box = box[:8] + b"".join(b for _, b in ranked)  # (same size: no offset moves)
        out_boxes.append(box)
    open(out, "wb").write(b"".join(out_boxes))


def test_a_cover_picture_listed_first_is_not_the_video(tmp_path):
    """An MP4 whose cover (`attached_pic`) FFmpeg lists before the video track (its `udta`
    ahead of the tracks), and a Matroska file whose first video track is a one-frame PNG
    and whose second, marked default, is the video: the video's frames, on every path
    (the probe took the picture: "packets without timestamps", no frame kept)."""
    import subprocess

    import av

    src, cover = str(tmp_path / "src.mp4"), str(tmp_path / "cover.png")
    framecode.write_code_video(src, 20, (96, 128), framecode.X264 + ["-g", "5"])
    ff = [samples.ffmpeg_exe(), "-y", "-loglevel", "error"]
    subprocess.run(ff + ["-f", "lavfi", "-i", "color=red:s=64x64", "-frames:v", "1", cover], check=True)
    tagged = str(tmp_path / "tagged.mp4")
    subprocess.run(ff + ["-i", src, "-i", cover, "-map", "0", "-map", "1", "-c", "copy", "-disposition:v:1",
                         "attached_pic", tagged], check=True)
    first = str(tmp_path / "cover_first.mp4")
    _udta_first(tagged, first)
    mkv = str(tmp_path / "cover_first.mkv")
    subprocess.run(ff + ["-i", cover, "-i", src, "-map", "0", "-map", "1", "-c", "copy", mkv], check=True)
    both = str(tmp_path / "both_default.mkv")  # (Matroska's FlagDefault is 1 unless cleared)
    subprocess.run(ff + ["-i", cover, "-i", src, "-map", "0", "-map", "1", "-c", "copy", "-disposition:v:0", "default",
                         "-disposition:v:1", "default", both], check=True)
    for path in (first, mkv, both):
        with av.open(path) as c:  # (what makes each case: the picture is FFmpeg's first video stream)
            assert [s.codec_context.name for s in c.streams.video] == ["png", "h264"], path
        for sampling in ({}, {"every": 3}, {"decoder": "pyav"}, {"keyframes": True}):
            rows, end = _rows(path, **sampling)
            own = [(i, code) for i, _, code in _rows(src, **sampling)[0]]  # (Matroska's times: ms)
            assert [(i, code) for i, _, code in rows] == own and rows, (path, sampling)
            assert all(i == code for i, _, code in rows), (path, sampling)
            if "every" in sampling:
                assert [i for i, _, _ in rows] == list(range(0, 20, 3))
            assert end["message"][0] == "" and end["error_type"][0] == "", (path, sampling, end["message"])


def test_an_avi_with_dropped_frames_is_whole_and_a_cut_one_is_not(tmp_path):
    """A capture's AVI whose recorder dropped frames (empty chunks: its header counts them,
    FFmpeg skips them): every frame there is, at its own time, and no "truncated" (it was a
    failed video: 40 listed, 30 held); the same file cut short still says so."""
    path = str(tmp_path / "dropped.avi")
    framecode.write_code_video(path, 40, (96, 128), ["-fps_mode", "passthrough", "-c:v", "mpeg4", "-q:v", "3"],
                               vf="select='not(between(n,10,19))'")
    rows, end = _rows(path)
    codes = [*range(10), *range(20, 40)]
    assert [(i, code) for i, _, code in rows] == list(enumerate(codes))
    assert [t for _, t, _ in rows] == pytest.approx([c / 30 for c in codes])
    assert end["message"][0] == "" and end["error_type"][0] == "", end["message"]
    cut = str(tmp_path / "cut.avi")
    with open(path, "rb") as f, open(cut, "wb") as out:
        out.write(f.read(os.path.getsize(path) * 7 // 10))
    rows, end = _rows(cut)
    assert rows and end["message"][0].startswith("truncated: the container lists 40 frames"), end["message"]


@pytest.mark.parametrize("name, args", [("cut.mkv", framecode.X264 + ["-g", "15", "-bf", "2"]),
                                        ("cut.webm", ["-c:v", "libvpx-vp9", "-b:v", "200k", "-g", "15"])])
def test_a_matroska_file_cut_short_says_so(tmp_path, name, args):
    """Matroska/WebM has no count of frames, but its header states the video's duration:
    a file cut short (a partial download) keeps its header and states more than it holds.
    Its frames are kept, and the row says it is truncated (it was a whole, shorter video)."""
    whole = str(tmp_path / ("whole" + os.path.splitext(name)[1]))
    framecode.write_code_video(whole, 120, (96, 128), args)
    rows, end = _rows(whole)
    assert [(i, code) for i, _, code in rows] == [(i, i) for i in range(120)] and end["message"][0] == ""
    cut = str(tmp_path / name)
    with open(whole, "rb") as f, open(cut, "wb") as out:
        out.write(f.read(os.path.getsize(whole) // 2))
    rows, end = _rows(cut)
    assert 10 < len(rows) < 100 and all(i == code for i, _, code in rows), len(rows)
    said = end["message"][0]
    assert re.fullmatch(r"truncated: the container says 4\.00 s, the file holds \d\.\d\d s"
                        r"( \(.*\))?", said), said


def test_xvid_packed_b_frames_in_avi_are_known_by_their_order(tmp_path):
    """Xvid/DivX AVI with "packed B-frames" (a B-frame stored in the P-frame's chunk, a
    placeholder in the next): FFmpeg's guessed times put sampled frames one off (`--every 3`
    gave frame 4 as frame 3 and lost two as damaged) and PyAV's frames swapped in pairs;
    known by their order, every path gives each frame its own."""
    from rayvid.video import probe

    path = str(tmp_path / "xvid.avi")
    framecode.write_code_video(path, 40, (96, 128), ["-c:v", "libxvid", "-q:v", "3", "-bf", "2", "-g", "12"])
    assert probe(path).output_order
    every = _rows(path)[0]
    assert len(every) > 30 and all(i == code for i, _, code in every)
    for sampling in ({"every": 3}, {"decoder": "pyav"}, {"keyframes": True}):
        rows, end = _rows(path, **sampling)
        assert rows and all(i == code for i, _, code in rows), (sampling, rows)
        assert end["message"][0] == "", (sampling, end["message"])
    assert [i for i, _, _ in _rows(path, every=3)[0]] == list(range(0, len(every), 3))
    # MPEG-4 Part 2 whose B-frames are not packed (FFmpeg's encoder) is read by its times:
    # seeked to, cut into segments, exact
    plain = str(tmp_path / "mpeg4.avi")
    framecode.write_code_video(plain, 40, (96, 128), ["-c:v", "mpeg4", "-q:v", "3", "-bf", "2", "-g", "12"])
    assert not probe(plain).output_order
    for sampling in ({}, {"every": 3}, {"decoder": "pyav"}):
        rows, end = _rows(plain, **sampling)
        assert [i for i, _, _ in rows] == list(range(0, 40, sampling.get("every", 1))), sampling
        assert all(i == code for i, _, code in rows) and end["message"][0] == "", sampling


@pytest.mark.parametrize("start_ms, last_ms", [(0, 33), (0, 1000), (2000, 33), (2000, 80)])
def test_a_whole_matroska_file_is_not_taken_for_a_cut_one(tmp_path, start_ms, last_ms):
    """A whole file whose header states a little more than its frames at the average rate:
    a held last frame (its packet lasting 1 s: a screen recording's), a start offset (a
    trim, an audio track first): no "truncated" (it compared the stated duration with the
    frames' span from the stream's start)."""
    import fractions

    import av

    from rayvid.video import probe

    path = str(tmp_path / "v.mkv")
    with av.open(path, "w", format="matroska") as out:
        s = out.add_stream("mpeg4", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = fractions.Fraction(1, 1000)
        packets = []
        for i in range(60):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 4 % 255, np.uint8), format="rgb24")
            f.pts, f.time_base = start_ms + i * 33, fractions.Fraction(1, 1000)
            packets += list(s.encode(f))
        packets += list(s.encode())
        for i, p in enumerate(packets):
            p.duration = last_ms if i == len(packets) - 1 else 33
            out.mux(p)
    info = probe(path)
    assert info.stated_s == 0.0, (info.stated_s, info.held_s)
    rows, end = _rows(path)
    assert len(rows) == 60 and end["message"][0] == "", end["message"]


def test_h264_in_avi_without_b_frames_is_known_by_its_order_too(tmp_path):
    """H.264 in AVI without B-frames (CCTV recorders'): FFmpeg's pts are its decode times
    plus a frame, and its seeks by them landed a frame late (`--every 7` lost frame 14 of
    this file, whose key frames come often): read from the start, frame 0 at time 0."""
    from rayvid.video import probe

    plain = str(tmp_path / "plain.avi")
    framecode.write_code_video(plain, 40, (96, 128), framecode.X264 + ["-bf", "0", "-g", "10"])
    info = probe(plain)
    assert info.output_order and info.times[0] == 0 and info.times[1] == pytest.approx(1 / 30)
    for sampling in ({"every": 7}, {"keyframes": True}, {}):
        rows, end = _rows(plain, **sampling)
        assert all(i == code for i, _, code in rows) and end["message"][0] == "", sampling
    assert [i for i, _, _ in _rows(plain, every=7)[0]] == list(range(0, 40, 7))


def test_partial_copy_probe_reads_the_index_not_the_holes(matrix, tmp_path):
    """A partial copy (the index only, media data a hole) probes like the whole file: the
    same frames, times, key frames and packet places, read without the holes' bytes."""
    from rayvid import storage
    from rayvid.mp4 import index_only
    from rayvid.video import _Sparse, probe

    path, n = matrix["with_audio.mp4"]
    copy = str(tmp_path / "partial.mp4")
    fs, _ = storage.resolve(path)
    part = storage.RangeCopy(fs, path, os.path.getsize(path), copy)
    open(copy, "wb").close()
    os.truncate(copy, part.size)
    assert index_only(part) and 0 < part.fetched < part.size / 2
    part.fetch(1000, 3000)  # some media data too: read as it is, around the holes
    whole, partial = probe(path), probe(copy, partial=True)
    assert len(partial.pts) == n
    for field in ("pts", "times", "keyframes", "pos", "nbytes", "order"):
        np.testing.assert_array_equal(getattr(partial, field), getattr(whole, field), err_msg=field)
    with _Sparse(copy) as f, open(copy, "rb") as plain:
        content = plain.read()
        f.seek(500)
        assert f.read(4000) == content[500:4500]
        f.seek(-100, os.SEEK_END)
        assert f.read() == content[-100:] and f.tell() == part.size
        f.seek(0)
        assert b"".join(iter(lambda: f.read(65536), b"")) == content


def test_a_video_overwritten_after_its_probe_is_an_error_row(matrix, tmp_path):
    """Garbage where the probe read a video: PyAV's open raises InvalidDataError (an
    FFmpegError and a ValueError, neither OSError nor EOFError): one error row, not a bug."""
    import shutil

    path = tmp_path / "v.mp4"
    shutil.copy(matrix["h264.mp4"][0], path)
    garbage = bytes((i * 7919) % 251 for i in range(os.path.getsize(path)))
    for decoder in ("pyav", "auto"):
        shutil.copy(matrix["h264.mp4"][0], path)
        reader = FrameReader(framecode.SIZE, decoder=decoder)
        frames, [end] = split_rows(reader.read(str(path), "v.mp4", on_probe=lambda info: path.write_bytes(garbage)))
        assert frames == [] and (end["error_stage"], end["error_type"]) == ("decode", "VideoError"), end
        assert end["message"] == "cannot read video: Invalid data found when processing input", end
        assert end["codec"] == "h264" and end["n_frames"] == 0


def test_an_ivf_video_has_its_headers_frame_rate(tmp_path):
    """IVF (VP8/VP9 as libvpx writes them) gives no average frame rate: fps is the rate its
    header says (FFmpeg's guess), and the duration the last frame's time plus one frame, as
    of the same frames in Matroska (fps was 0 and the duration a frame short)."""
    from rayvid.video import probe

    for ext in ("ivf", "mkv"):
        path = str(tmp_path / f"five.{ext}")
        framecode.write_code_video(path, 5, (48, 64), ["-c:v", "libvpx-vp9", "-deadline", "realtime"], fps=12)
        info = probe(path)
        assert (info.fps, info.duration_s, len(info.pts)) == (12.0, pytest.approx(5 / 12, abs=1e-3), 5), ext  # (Matroska: ms)


def test_decord_forced_on_a_video_it_cannot_read_exactly_is_an_error_row(trimmed, matrix):
    """`--decoder decord` on a transport stream with B-frames gave each row the picture a
    key-frame interval later, and on a trim or a capture mid-GOP failed the whole run (an
    exception of decord's own escaped the decode child): an error row saying why and what
    to use; where decord is exact it still decodes."""
    for path in (matrix["h264_bframes.ts"][0], trimmed["trim_mid_gop.mp4"], trimmed["capture_mid_gop.ts"]):
        rows, end = _rows(path, decoder="decord")
        assert rows == [] and end["error_type"][0] == "VideoError", path
        assert "--decoder decord cannot read this video exactly" in end["message"][0], end["message"][0]
        assert "use --decoder auto or pyav" in end["message"][0]
    path, n = matrix["h264.mp4"]
    rows, end = _rows(path, decoder="decord", every=7)
    assert [(i, code) for i, _, code in rows] == [(i, i) for i in range(0, n, 7)] and end["decoder"][0] == "decord"


@pytest.mark.parametrize("sampling", [{}, {"every": 3}, {"fps": 7.5}, {"keyframes": True}])
def test_frames_that_share_a_timestamp_are_each_decoded_once_in_order(matrix, sampling):
    """A jittery clock the muxer rounds gives frames the same pts (FFmpeg shows each): the
    video was refused ("duplicate timestamps", no frame kept). Now its frames are known by
    their order: every kept frame once, showing its own code, at its pts (a shared one
    twice)."""
    from helpers import pts_of
    from rayvid import video

    path, n = matrix["same_pts.mp4"]
    info = video.probe(path)
    assert info.repeated and info.shared_pts and len(np.unique(info.pts)) < n  # (the file is what it means to be)
    rows, end = _rows(path, **sampling)
    got = [i for i, _, _ in rows]
    assert got == FrameReader(framecode.SIZE, **sampling)._sampled(info).tolist() and len(got) > ("keyframes" not in sampling)
    assert [code for _, _, code in rows] == got
    np.testing.assert_allclose([t for _, t, _ in rows], np.asarray(pts_of(path))[got], atol=1e-3, rtol=0)
    assert end["error_type"][0] == "" and end["decoder"][0].startswith("pyav")


def test_only_pictures_a_decoder_can_start_from_are_key_frames(matrix, tmp_path):
    """x264's intra refresh (low-latency cameras, drones) flags P pictures with a recovery
    point as key frames: a seek there showed nothing until the refresh had swept the
    picture, and the frames counted on were lost as "damaged data" (--every, --fps,
    --keyframes, segments). Only the IDR is a key frame there; an open GOP's I pictures,
    and every key frame of an ordinary stream, stay key frames (seeks go on using them)."""
    from rayvid import video

    path, n = matrix["intra_refresh.mp4"]
    import av

    with av.open(path) as c:
        flagged = [p.pts for p in c.demux(video=0) if p.size and p.is_keyframe]
    assert len(flagged) == 3  # (the file is what it means to be)
    assert video.probe(path).keyframes.nonzero()[0].tolist() == [0]
    assert video.probe(matrix["h264.mp4"][0]).keyframes.nonzero()[0].tolist() == [0, 10, 20, 30]
    open_gop = str(tmp_path / "open_gop.mp4")
    framecode.write_code_video(open_gop, 60, framecode.SIZE, ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt",
                                                              "yuv420p", "-bf", "2", "-x264-params", "open-gop=1:keyint=20"])
    with av.open(open_gop) as c:
        flagged = sum(1 for p in c.demux(video=0) if p.size and p.is_keyframe)
    assert flagged > 1 and video.probe(open_gop).keyframes.sum() == flagged
    rows, end = _rows(open_gop, every=7)
    assert [i for i, _, _ in rows] == list(range(0, 60, 7)) and all(i == code for i, _, code in rows)
    assert end["error_type"][0] == ""


@pytest.mark.parametrize("n, every, end_s", [(40, 2, 0.12), (40, 3, 0.45), (40, 2, 0.78), (40, 3, 0.95),
                                             (14, 2, math.inf), (14, 3, math.inf), (14, 4, math.inf)])
def test_a_frame_sharing_its_timestamp_is_its_own_picture_where_decoding_stops(matrix, tmp_path, n, every, end_s):
    """Two frames sharing a timestamp are often demuxed the other way round (a P picture
    before the B shown first). Where the last kept frame was the first shown of such a
    pair (a segment's end, or the video's), the decoder stopped before the B picture's
    packet, and the P picture came out under the B's index (counted by order): each is
    known by its timestamp and its rank among the frames shown at it, and the decoder
    stops only once the pair's packets are both in."""
    from helpers import pts_of

    path = matrix["same_pts.mp4"][0]
    if n != 40:
        path = str(tmp_path / "short.mp4")
        args, extra = framecode.MATRIX["same_pts.mp4"][2:]
        framecode.write_code_video(path, n, framecode.SIZE, args, **extra)
    got = []
    for batch in FrameReader(framecode.SIZE, every=every).read(path, path, end_s=end_s):
        if batch["kind"][0] == "end":
            assert batch["error_type"][0] == "", batch["message"][0]
            continue
        got += [(int(i), framecode.read_code(f)) for i, f in zip(batch["frame_index"], batch["frame"])]
    assert got and all(i == code for i, code in got), got
    times = pts_of(path)
    assert [i for i, _ in got] == [i for i in range(0, n, every) if times[i] < end_s]


def test_frames_sharing_timestamps_after_damage_are_their_own_pictures(tmp_path):
    """Garbage over six packets of a video whose frames share timestamps: the frames after
    it came out under other indices (counted by order, the count fell behind where the
    decoder dropped pictures: 54 of 97 rows wrong, and frames delivered said lost). Known by
    their timestamps, each row shows its own frame, and what is said lost was not delivered."""
    import av

    src, bad = str(tmp_path / "v.mp4"), str(tmp_path / "damaged.mp4")
    args, extra = framecode.MATRIX["same_pts.mp4"][2:]
    framecode.write_code_video(src, 120, framecode.SIZE, args + ["-g", "30"], **extra)
    with av.open(src) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    data = bytearray(open(src, "rb").read())
    start, end = packets[45][0] + 8, packets[50][0] + packets[50][1]
    data[start:end] = bytes((i * 7919) % 251 for i in range(end - start))
    open(bad, "wb").write(bytes(data))
    rows, end_row = _rows(bad)
    assert len(rows) > 60 and all(i == code for i, _, code in rows), [(i, c) for i, _, c in rows if i != c][:10]
    delivered = {i for i, _, _ in rows}
    lost = end_row["message"][0]
    assert "lost to damaged data" in lost and len(delivered) + int(lost.split(" of ")[0]) == 120


@pytest.mark.parametrize("ext, audio", [("mkv", False), ("mkv", True)])
def test_a_hole_the_demuxer_skips_is_said_with_how_many_frames_it_lost(tmp_path, ext, audio):
    """A zeroed range (a sparse or partial download, a bad block) in a Matroska file: its
    demuxer reads on from the next cluster it can parse and its packets say nothing of
    the frames between; 45 frames were lost unsaid, the video counted whole, every
    frame_index after them short (a QA find). It is the video's error row now, saying
    about how many and where; the frames read keep their pictures and times, those after
    the hole counted as read. FFmpeg's log level is as it was after."""
    import av
    import av.logging

    src, bad = str(tmp_path / f"v.{ext}"), str(tmp_path / f"hole.{ext}")
    # (a Matroska cluster at each key frame, every 15th, where the demuxer may read on: with
    # audio, FFmpeg's muxer starts one at a key frame past 4 KiB; without, DASH's rule)
    framecode.write_code_video(src, 120, framecode.SIZE, ["-c:v", "libx264", "-x264-params",
                                                          "keyint=15:min-keyint=15:scenecut=0", "-bf", "0",
                                                          *([] if audio or ext != "mkv" else ["-dash", "1"])],
                               audio=audio)
    with av.open(src) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    data = bytearray(open(src, "rb").read())
    data[packets[45][0]:packets[75][0]] = bytes(packets[75][0] - packets[45][0])
    open(bad, "wb").write(bytes(data))
    level = av.logging.get_level()
    for _ in range(2):  # (FFmpeg's message said again, read again: PyAV skips a message repeated)
        rows, end = _rows(bad)
        codes = [code for _, _, code in rows]
        resumed = codes[45]  # the first frame read after the hole (a key frame the demuxer found)
        assert codes == [*range(45), *range(resumed, 120)] and resumed >= 75 and resumed % 15 == 0, codes
        assert [i for i, _, _ in rows] == list(range(len(rows)))  # (counted as read)
        assert all(abs(t - code / 30) < 1e-3 for _, t, code in rows)
        assert end["message"][0].startswith(f"about {resumed - 45} frames lost to damaged data the demuxer skipped "
                                            f"(1.47-{resumed / 30:.2f} s): frame_index after it counts the frames "
                                            f"read (timestamp_s is each frame's own)"), end["message"][0]
        rows, end = _rows(bad, every=2)
        assert [code for _, _, code in rows] == [*range(0, 45, 2), *range(resumed + 1, 120, 2)]
        assert end["message"][0].startswith(f"about {resumed - 45} frames lost"), end["message"][0]
    assert av.logging.get_level() == level
    rows, end = _rows(src)
    assert [code for _, _, code in rows] == list(range(120)) and end["message"][0] == ""


def test_a_picture_is_a_start_only_where_every_slice_seen_is_intra():
    """`starts_pictures` on H.264 packets as muxers store them (4-byte lengths, avcC) and
    as start codes delimit them (Annex B): an IDR, an I or SI picture is a start; a P or SP
    slice anywhere in what it reads is not (a refresh by slices: I at the top, P below);
    bytes that hold no whole slice header do not say."""
    from rayvid.video import starts_pictures

    def ue(v):
        b = bin(v + 1)[2:]
        return "0" * (len(b) - 1) + b

    def nal(kind, first_mb, slice_type):
        bits = ue(first_mb) + ue(slice_type) + ue(0) + "1" * 20
        bits += "0" * (-len(bits) % 8)
        return bytes([0x60 | kind]) + int(bits, 2).to_bytes(len(bits) // 8, "big")

    def avcc(*units):
        return b"".join(len(u).to_bytes(4, "big") + u for u in units)

    sei, i_, p_, si, sp = bytes([6, 6, 1, 0x84, 0x80]), 7, 5, 9, 8
    assert starts_pictures(avcc(nal(5, 0, i_)), 4) is True  # an IDR
    assert starts_pictures(avcc(sei, nal(1, 0, i_), nal(1, 40, i_)), 4) is True  # an open GOP's I
    assert starts_pictures(avcc(sei, nal(1, 0, p_)), 4) is False  # x264's intra refresh
    assert starts_pictures(avcc(sei, nal(1, 0, i_), nal(1, 40, p_)), 4) is False  # refresh by slices
    assert starts_pictures(avcc(nal(1, 0, si)), 4) is True and starts_pictures(avcc(nal(1, 0, sp)), 4) is False
    assert starts_pictures(b"\0\0\0\1" + bytes([9, 0xF0]) + b"\0\0\1" + nal(1, 0, i_), 0) is True  # Annex B
    assert starts_pictures(b"\0\0\0\1" + sei + b"\0\0\0\1" + nal(1, 0, p_), 0) is False
    assert starts_pictures(avcc(sei, nal(1, 0, p_))[:10], 4) is None and starts_pictures(b"", 4) is None
