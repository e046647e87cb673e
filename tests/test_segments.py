"""Long videos split into segments: the segments meet exactly, on every codec."""

from __future__ import annotations

import math
import os
import subprocess
import threading
import time

import numpy as np
import pyarrow.compute as pc
import pytest

import framecode
from helpers import HTTP_MODES, http_server, pts_of
from rayvid import pipeline, samples, segments, storage
from rayvid.config import DecodeConfig, ModelConfig, RunConfig
from rayvid.decode import Decoder
from rayvid.schema import KIND_END, KIND_FRAME

LONG = {  # name -> (frames, encoder args): 20 s at 15 fps, boundaries fall mid-GOP
    "long_h264.mp4": (300, framecode.X264 + ["-g", "45", "-bf", "3"]),
    "long_hevc_opengop.mkv": (300, ["-c:v", "libx265", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                                    "-x265-params", "log-level=error:keyint=40:open-gop=1:bframes=4"]),
    "long_vp9.webm": (300, ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "500k",
                            "-g", "50"]),
}


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    out = {}
    for name, (n, args) in LONG.items():
        path = str(root / name)
        framecode.write_code_video(path, n, (96, 128), args, fps=15)
        out[name] = (path, n)
    return out


def test_bounds_partition_the_time_line():
    assert segments.bounds(30.0, 0) == [(-math.inf, math.inf)]
    assert segments.bounds(9.0, 10.0) == [(-math.inf, math.inf)]
    assert segments.bounds(25.0, 10.0) == [(-math.inf, 10.0), (10.0, 20.0), (20.0, math.inf)]


def test_header_duration_local_and_s3(long_videos, s3fs_client):
    path, _ = long_videos["long_h264.mp4"]
    assert segments.header_duration(path) == pytest.approx(20.0, abs=0.1)
    s3fs_client.put_file(path, "s3://rayvid-test/long/long_h264.mp4")
    assert segments.header_duration("s3://rayvid-test/long/long_h264.mp4") == pytest.approx(20.0, abs=0.1)
    assert segments.header_duration("s3://rayvid-test/long/missing.mp4") == 0.0
    plan = segments.plan({"video_uri": np.array([path], dtype=object)}, segment_s=6.0)
    assert plan["segment"].tolist() == [0, 1, 2, 3] and plan["n_segments"].tolist() == [4] * 4
    # listed without a version (a manifest): every segment must read the one planned from
    url = "s3://rayvid-test/long/long_h264.mp4"
    etag = storage.version_of(s3fs_client.info(url))
    plan = segments.plan({"video_uri": np.array([url, url], dtype=object),
                          "version": np.array(["", "listed"], dtype=object)}, segment_s=6.0)
    assert plan["version"].tolist() == [etag] * 4 + ["listed"] * 4


@pytest.mark.parametrize("name", ["long_h264.mp4", "long_hevc_opengop.mkv"])
def test_a_start_offset_is_no_part_of_the_duration(long_videos, tmp_path, name):
    """A recording whose clock starts at 1 h (`-output_ts_offset`): frame times count from
    its start, so its segments do; Matroska's duration counts from 0 (it was planned as
    3620 s: in 20 s segments, 181, 180 of them empty, each reading the file)."""
    path, _ = long_videos[name]
    offset = str(tmp_path / ("offset" + os.path.splitext(name)[1]))
    subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-i", path, "-c", "copy",
                    "-output_ts_offset", "3600", offset], check=True)
    assert segments.header_duration(offset) == pytest.approx(segments.header_duration(path), abs=0.1)
    assert segments.header_duration(path) == pytest.approx(20.0, abs=0.1)


def test_planning_asks_the_store_nothing_the_listing_said(long_videos, s3fs_client, moto):
    """Planning a listed video reads its header and nothing else: its size and version come
    from the listing (on S3 a HEAD request per video fewer, millions on a large archive).
    A video listed without them (a manifest) is asked once."""
    import pyarrow as pa

    from rayvid import listing

    url = "s3://rayvid-test/plan/long_h264.mp4"
    s3fs_client.put_file(long_videos["long_h264.mp4"][0], url)
    listed = listing.list_videos("s3://rayvid-test/plan/")
    size = os.path.getsize(long_videos["long_h264.mp4"][0])
    for videos, heads, sizes in ((listed, 0, [size] * 4), (pa.table({"video_uri": [url]}), 1, [-1] * 4)):
        with moto.requests() as seen:
            plan = segments.plan_all(videos, 6.0)
        assert plan.column("n_segments").to_pylist() == [4] * 4
        assert plan.column("size_bytes").to_pylist() == sizes  # the decoders' copies ask no HEAD for it either
        methods = [method for method, _ in seen]
        assert "GET" in methods and methods.count("HEAD") == heads, seen
    threshold = int(6.0 * segments.MIN_BYTES_PER_S)  # as if listed at these sizes (-1: unknown)
    for listed_size, probed in ((threshold - 1, False), (0, False), (threshold, True), (-1, True)):
        as_if = listed.set_column(listed.schema.get_field_index("size_bytes"), "size_bytes", pa.array([listed_size]))
        with moto.requests() as seen:
            counts = segments.plan_all(as_if, 6.0).column("n_segments").to_pylist()
        assert bool(seen) == probed, (listed_size, seen)  # unread: no request
        assert counts == ([4] * 4 if listed_size == -1 else [1])  # (read as if that long: no duration in 600 bytes)
    assert segments.plan_all(listed, 0).column("size_bytes").to_pylist() == [size]  # not cut: as listed
    with_source = listed.set_column(listed.schema.get_field_index("source_uri"), "source_uri", pa.array(["https://x/y.mp4"]))
    assert segments.plan_all(with_source, 0).column("size_bytes").to_pylist() == [-1]  # read elsewhere: not its size


def test_videos_too_small_to_cut_are_planned_in_the_driver_however_many(monkeypatch):
    """A listing of more than IN_DRIVER videos whose sizes say none can hold two segments
    starts no planning tasks (it was a Ray Data job of empty reads before any decoding);
    those that need their headers read still go to Ray when there are more than IN_DRIVER."""
    import pyarrow as pa
    import ray.data

    def no_tasks(*a, **k):
        raise AssertionError("planning tasks started")

    monkeypatch.setattr(ray.data, "from_blocks", no_tasks)
    n = segments.IN_DRIVER + 5
    videos = pa.table({"video_uri": [f"/nowhere/c{i:04d}.mp4" for i in range(n)], "size_bytes": [5000] * n,
                       "version": ["v"] * n})
    plan = segments.plan_all(videos, 600.0)
    assert plan.column("n_segments").to_pylist() == [1] * n and plan.column("size_bytes").to_pylist() == [5000] * n
    assert plan.column("video_uri").to_pylist() == sorted(videos.column("video_uri").to_pylist())
    with pytest.raises(AssertionError, match="planning tasks started"):  # unknown sizes: their headers, in tasks
        segments.plan_all(videos.set_column(1, "size_bytes", pa.array([-1] * n)), 600.0)


def test_a_header_is_read_in_small_pieces(long_videos, tmp_path):
    """Planning reads a video's header, not the first 5 MB (HTTP) or 50 MB (s3fs) of it."""
    from helpers import HTTP_SENT

    path, _ = long_videos["long_h264.mp4"]
    padded = tmp_path / "padded.mp4"  # the video, then 16 MB of a free box FFmpeg skips
    padded.write_bytes(open(path, "rb").read() + (16 * 2**20).to_bytes(4, "big") + b"free" + bytes(16 * 2**20 - 8))
    with http_server(str(tmp_path), "ranges") as base:
        assert segments.header_duration(f"{base}/padded.mp4") == pytest.approx(20.0, abs=0.1)
    assert HTTP_SENT["/padded.mp4"] <= os.path.getsize(path) + 2 * segments.HEADER_BLOCK_BYTES


@pytest.mark.parametrize("mode", HTTP_MODES)
@pytest.mark.parametrize("sampling", [{}, {"every": 4}])
def test_http_segments_meet_exactly_whatever_the_server_does_with_byte_ranges(long_videos, mode, sampling):
    """A video at an HTTP URL (a manifest of https:// links): where the server serves byte
    ranges, its segments read partial copies as on S3; where it does not (sends the whole
    file, or no length), the video is one segment, copied whole in one stream, and a
    segment asked for anyway copies it whole. The same frames as the local file every time."""
    path, _ = long_videos["long_h264.mp4"]
    size = os.path.getsize(path)
    with http_server(os.path.dirname(path), mode) as base:
        url = f"{base}/long_h264.mp4"
        assert segments.header_duration(url) == (pytest.approx(20.0, abs=0.1) if mode == "ranges" else 0.0)
        bounds = segments.bounds(20.0, 6.0)
        dec = Decoder(size=framecode.SIZE, batch_frames=16, fetch_gap_bytes=0, **sampling)
        parts = _decode(url, bounds, sampling, dec)
    assert parts == _decode(path, [(-math.inf, math.inf)], sampling)
    assert all(shown == i for i, shown in parts)
    if mode == "ranges":
        assert dec.bytes_fetched < len(bounds) * size
    else:
        assert dec.bytes_fetched == len(bounds) * size


def test_planning_in_the_driver_and_in_ray_tasks_agree(ray_session, long_videos):
    import pyarrow as pa

    uris = sorted(path for path, _ in long_videos.values())
    videos = pa.table({"video_uri": uris + ["/no/such/video.mp4"]})
    here = segments.plan_all(videos, 6.0)
    assert here.equals(segments.plan_all(videos, 6.0, in_driver=0))  # one way, or the other
    assert here.schema == segments.SEGMENTS_SCHEMA
    per_video = dict(zip(here.column("video_uri").to_pylist(), here.column("n_segments").to_pylist()))
    assert per_video == {**{u: 4 for u in uris}, "/no/such/video.mp4": 1}  # 20 s in 6 s segments; unreadable
    assert len(here) == 4 * len(uris) + 1


@pytest.mark.parametrize("name", sorted(LONG))
@pytest.mark.parametrize("sampling", [{}, {"every": 4}, {"fps": 2.0}])
def test_segments_meet_exactly(long_videos, name, sampling):
    path, n = long_videos[name]
    whole = _decode(path, [(-math.inf, math.inf)], sampling)
    parts = _decode(path, segments.bounds(20.0, 1.7), sampling)  # 12 segments, odd boundaries
    assert [i for i, _ in parts] == [i for i, _ in whole], f"{name}: frames missing or twice"
    wrong = [(i, shown) for i, shown in parts if shown != i]
    assert not wrong, f"{name}: (frame, shown) {wrong[:5]}"
    if not sampling:
        assert len(parts) == n


def _segments(dec, where, bounds):
    """(segment, batch) over the segments of `where` in order, and the batch's frames as
    (frame index, index its pixels show) (none for a terminal row)."""
    for k, (start, end) in enumerate(bounds):
        for batch in dec.decode_video(where, k, len(bounds), start, end):
            codes = [(int(i), framecode.read_code(f)) for i, f in zip(batch["frame_index"], batch["frame"])] \
                if batch["kind"][0] == KIND_FRAME else []
            yield k, batch, codes


def _segment_rows(dec, where, bounds, with_decoder=False) -> list:
    """Over the segments in order: (frame index, index its pixels show) per frame, and per
    terminal row (segment, error type, message with `where` as <uri>, frames[, decoder])."""
    out = []
    for k, batch, codes in _segments(dec, where, bounds):
        if batch["kind"][0] == KIND_FRAME:
            out += codes
        else:
            out.append((k, batch["error_type"][0], batch["message"][0].replace(where, "<uri>"),
                        int(batch["n_frames"][0]), *([batch["decoder"][0]] if with_decoder else [])))
    return out


def _decode(path, bounds, sampling, dec=None, ends=None):
    """Sorted (frame index, index its pixels show) over the segments; end rows into `ends`."""
    dec = dec or Decoder(size=framecode.SIZE, batch_frames=16, **sampling)
    rows = []
    for _, batch, codes in _segments(dec, path, bounds):
        if batch["kind"][0] == KIND_FRAME:
            rows += codes
        else:
            assert batch["error_type"][0] == "", batch["message"][0]
            if ends is not None:
                ends.append({c: v[0] for c, v in batch.items() if c != "frame"})
    return sorted(rows)


def test_remote_key_frames_of_an_mp4_without_a_sync_table_are_the_local_ones(long_videos, s3fs_client, tmp_path):
    """An H.264 MP4 without its sync-sample table (every sample a key frame, as the index
    says) with B-frames, on S3, --keyframes: a kept "key frame" no seek went to had its
    first bytes never fetched (its packet before the seek's landing in decode order), so
    it stayed a key frame, and each segment's end row said it lost to damaged data where
    the local file's said nothing (a QA find). The first bytes of every key frame kept are
    fetched and read: the same frames and end rows as the local file."""
    path = str(tmp_path / "nostss.mp4")
    data = bytearray(open(long_videos["long_h264.mp4"][0], "rb").read())
    at = data.find(b"stss")
    data[at:at + 4] = b"free"  # (the box is skipped: no table, every sample a sync sample)
    open(path, "wb").write(bytes(data))
    url = "s3://rayvid-test/long-remote/nostss.mp4"
    s3fs_client.put_file(path, url)
    sampling = {"keyframes": True}
    parts = _decode(url, segments.bounds(20.0, 1.7), sampling,
                    Decoder(size=framecode.SIZE, batch_frames=16, fetch_gap_bytes=0, **sampling))
    assert parts == _decode(path, [(-math.inf, math.inf)], sampling) and len(parts) >= 6
    assert all(shown == i for i, shown in parts)


@pytest.mark.parametrize("sampling", [{}, {"every": 4}, {"fps": 2.0}])
def test_remote_segments_of_an_mp4_meet_exactly(long_videos, s3fs_client, sampling):
    """On S3 each segment of an MP4 reads the index and its own bytes (a partial copy) and
    seeks in it: the same frames as the whole local file, with B-frames and odd boundaries."""
    path, _ = long_videos["long_h264.mp4"]
    url = "s3://rayvid-test/long-remote/long_h264.mp4"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(20.0, 1.7)
    dec = Decoder(size=framecode.SIZE, batch_frames=16, **sampling)
    parts = _decode(url, bounds, sampling, dec)
    assert parts == _decode(path, [(-math.inf, math.inf)], sampling)
    assert all(shown == i for i, shown in parts)
    assert dec.bytes_fetched < len(bounds) * os.path.getsize(path) / 2  # whole copies: 12 files (the index
    # of a file this small is a third of it: test_remote_segments_read_an_mp4_about_once has a real one)


def test_segments_of_a_remote_mkv_decoded_at_once_share_one_copy(long_videos, s3fs_client):
    """An MKV has no index of where its frames lie, so a segment of it copies it whole; a
    decode actor's two calls (one decoding while the next fetches) share that copy: 2
    segments, 1 copy, the same frames as the local file. One after the other, each copies."""
    import json
    import threading

    from rayvid import storage

    path, _ = long_videos["long_hevc_opengop.mkv"]
    url = "s3://rayvid-test/shared-segments/long_hevc_opengop.mkv"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(20.0, 10.0)
    dec = Decoder(size=framecode.SIZE, batch_frames=16)
    first = dec.decode_video(url, 0, 2, *bounds[0])
    batches = [next(first)]  # segment 0 holds the copy (and the decoder) from here on
    out = {}
    other = threading.Thread(target=lambda: out.setdefault("rows", list(dec.decode_video(url, 1, 2, *bounds[1]))))
    other.start()
    copies = [os.path.join(root, d) for root in [storage.user_dir("rayvid-shared")] for d in os.listdir(root) if d != ".lock"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(  # segment 1 holds the copy too, and waits for the decoder
            len(json.load(open(os.path.join(c, "state.json")))["users"]) == 2 for c in copies):
        time.sleep(0.02)
    batches += list(first)
    other.join(60)
    rows = sorted((int(i), framecode.read_code(f)) for b in batches + out["rows"]
                  if b["kind"][0] == KIND_FRAME for i, f in zip(b["frame_index"], b["frame"]))
    assert rows == _decode(path, [(-math.inf, math.inf)], {})
    ends = [b for b in batches + out["rows"] if b["kind"][0] == KIND_END]
    assert [e["error_type"][0] for e in ends] == ["", ""]
    size = os.path.getsize(path)
    # (and each segment's look for an MP4 index: the first 16 bytes)
    assert size <= dec.bytes_fetched <= size + 2 * 16
    assert sum(e["bytes_read"][0] for e in ends) == dec.bytes_fetched  # the terminal rows account for every byte
    fetched = dec.bytes_fetched
    assert _decode(url, bounds, {}, dec) == rows  # one after the other: two copies
    assert 2 * size <= dec.bytes_fetched - fetched <= 2 * (size + 16)


def test_a_segment_whose_object_is_replaced_while_it_is_read_is_an_error_row(long_videos, s3fs_client):
    """The ranges of a partial copy are separate reads: an object replaced between them
    would give frames of two videos. Each segment reads the listed version (its ETag) or
    says it could not: replaced during the segment, its terminal row is ObjectChanged with
    the count of frames it sent; a later segment, or a whole copy, of the replaced object
    decodes nothing. Without a listed version it reads the object as it is."""
    from rayvid import storage

    path, _ = long_videos["long_h264.mp4"]
    other, _ = long_videos["long_hevc_opengop.mkv"]
    url = "s3://rayvid-test/replaced/long_h264.mp4"
    s3fs_client.put_file(path, url)
    listed = storage.version_of(s3fs_client.info(url))
    bounds = segments.bounds(20.0, 6.0)
    dec = Decoder(size=framecode.SIZE, batch_frames=16)
    rows = dec.decode_video(url, 1, len(bounds), *bounds[1], version=listed)
    first = next(rows)
    assert first["kind"][0] == KIND_FRAME
    s3fs_client.put_file(other, url)
    *batches, end = [first, *rows]
    sent = sum(len(b["frame_index"]) for b in batches)
    assert end["kind"][0] == KIND_END and end["n_frames"][0] == sent > 0
    assert end["error_type"][0] == "ObjectChanged" and end["error_stage"][0] == "read"
    assert f"changed while it was read (version {listed}, now " in end["message"][0]
    for k in (2, 0):  # later segments, read since: partial copies of the new object
        [end] = list(dec.decode_video(url, k, len(bounds), *bounds[k], version=listed))
        assert end["error_type"][0] == "ObjectChanged" and end["n_frames"][0] == 0
        assert "changed after it was listed" in end["message"][0]
    [end] = list(dec.decode_video(url, version=listed))  # one segment, dense: a whole copy
    assert end["error_type"][0] == "ObjectChanged" and "changed after it was listed" in end["message"][0]
    assert os.listdir(dec._tmpdir) == []
    *batches, end = list(dec.decode_video(url, 2, len(bounds), *bounds[2]))  # nothing listed
    assert end["error_type"][0] == "" and sum(len(b["frame_index"]) for b in batches) == end["n_frames"][0] > 0


@pytest.mark.parametrize("name", ["long_h264.mp4", "long_hevc_opengop.mkv"])
@pytest.mark.parametrize("sampling", [{"every": 4}, {"every": 37}, {"fps": 0.7}, {"keyframes": True}])
@pytest.mark.parametrize("n_segments", [1, 7])
def test_remote_sparse_sampling_reads_what_its_frames_need(long_videos, s3fs_client, name, sampling, n_segments):
    """Sparse sampling of a remote MP4 reads a partial copy even in one segment: with
    every range fetched on its own (fetch_gap_bytes=0, so a byte missed would show), the
    same frames as the local file, exact, and no damage read; the MKV is copied whole."""
    path, _ = long_videos[name]
    url = f"s3://rayvid-test/sparse-remote/{name}"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(20.0, 20.0 / n_segments + 0.01) if n_segments > 1 else [(-math.inf, math.inf)]
    dec, ends = Decoder(size=framecode.SIZE, batch_frames=16, fetch_gap_bytes=0, **sampling), []
    parts = _decode(url, bounds, sampling, dec, ends)
    assert parts == _decode(path, [(-math.inf, math.inf)], sampling)
    assert all(shown == i for i, shown in parts) and len(bounds) == n_segments
    assert not any("damaged" in e["decoder"] for e in ends)
    assert sum(e["bytes_read"] for e in ends) == dec.bytes_fetched  # what the summary reports: every byte
    size = os.path.getsize(path)
    if name.endswith(".mp4"):
        assert dec.bytes_fetched < n_segments * size
    else:
        assert n_segments * size <= dec.bytes_fetched <= n_segments * (size + 16)


@pytest.mark.parametrize("name", sorted(framecode.MATRIX))
def test_remote_segments_meet_exactly_on_every_codec(matrix, s3fs_client, name):
    """Every matrix file on S3 cut into ~0.3 s segments: MP4/MOV segments read partial
    copies, other containers are copied whole; the frames, and the size as displayed
    (rotated files included), are the same either way."""
    path, n = matrix[name]
    url = f"s3://rayvid-test/matrix-segments/{name}"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(float(pts_of(path)[-1]) + 0.05, 0.3)
    dec, ends = Decoder(size=framecode.SIZE, batch_frames=16), []
    parts = _decode(url, bounds, {}, dec, ends)
    assert [i for i, _ in parts] == list(range(n)), f"{name}: frames missing or twice ({len(bounds)} segments)"
    wrong = [(i, shown) for i, shown in parts if shown != i]
    assert not wrong, f"{name}: (frame, shown) {wrong[:5]}"
    shown = {(e["height"], e["width"]) for e in ends if e["n_frames"]}
    assert shown == {framecode.MATRIX[name][1]}
    whole = len(bounds) * os.path.getsize(path)
    if len(bounds) > 1 and name.endswith((".mp4", ".mov")):
        assert dec.bytes_fetched < whole
    else:
        assert whole <= dec.bytes_fetched <= whole + 16 * len(bounds)  # and a look at the first box


@pytest.mark.parametrize("name", sorted(framecode.FRAGMENTED))
@pytest.mark.parametrize("sampling", [{}, {"keyframes": True}])
def test_remote_segments_of_a_fragmented_mp4_meet_exactly(fragmented, s3fs_client, name, sampling):
    """On S3 the segments of a fragmented MP4 read partial copies (every moof, then their
    own packets), as those of an MP4 with one index do: with every range fetched on its
    own (fetch_gap_bytes=0, so a byte missed would show), the same frames as the local
    file, no damage read, and far fewer bytes than a whole copy per segment."""
    path = fragmented[name]
    url = f"s3://rayvid-test/fragmented/{name}"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(20.0, 3.0)
    dec, ends = Decoder(size=framecode.SIZE, batch_frames=16, fetch_gap_bytes=0, **sampling), []
    parts = _decode(url, bounds, sampling, dec, ends)
    assert parts == _decode(path, [(-math.inf, math.inf)], sampling)
    assert all(shown == i for i, shown in parts) and (len(parts) >= 7 if sampling else len(parts) == 300)
    assert not any("damaged" in e["decoder"] for e in ends)
    assert sum(e["bytes_read"] for e in ends) == dec.bytes_fetched
    # whole copies: 7x; measured 1.6-1.7x (each segment also reads its lead-in from the key
    # frame before it, up to a 3 s interval: as long as a segment) and 0.10-0.20x
    assert dec.bytes_fetched < (0.5 if sampling else 2.5) * os.path.getsize(path)


def test_a_fragmented_mp4_whose_table_is_wrong_is_read_whole_and_exactly(fragmented, s3fs_client, tmp_path):
    """A fragmented MP4 whose mfra table points into media data (a damaged or lying file):
    the walk finds no box there and the segments copy the file whole; every frame exact."""
    import struct

    path = str(tmp_path / "bad_table.mp4")
    data = bytearray(open(fragmented["frag_table.mp4"], "rb").read())
    kinds = [kind for kind, _ in framecode.top_boxes(fragmented["frag_table.mp4"])]
    assert kinds[-1] == b"mfra"
    mfra_at = len(data) - int.from_bytes(data[-4:], "big")
    tfra_at = mfra_at + 8
    count = struct.unpack(">I", data[tfra_at + 20 : tfra_at + 24])[0]
    wide = 8 if data[tfra_at + 8] == 1 else 4
    step = 2 * wide + 3  # 1-byte traf, trun and sample numbers, as FFmpeg writes them
    for k in range(count):
        at = tfra_at + 24 + k * step + wide
        offset = int.from_bytes(data[at : at + wide], "big")
        data[at : at + wide] = (offset + 1001).to_bytes(wide, "big")  # into the media data
    open(path, "wb").write(bytes(data))
    url = "s3://rayvid-test/fragmented-bad/bad_table.mp4"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(20.0, 3.0)
    dec, ends = Decoder(size=framecode.SIZE, batch_frames=16, fetch_gap_bytes=0), []
    parts = _decode(url, bounds, {}, dec, ends)
    assert [i for i, _ in parts] == list(range(300)) and all(shown == i for i, shown in parts)
    assert dec.bytes_fetched >= os.path.getsize(path)  # whole copies


def test_remote_segments_read_an_mp4_about_once(tmp_path, store):
    """Six segments of a 12 s textured MP4 with audio read 1.3x its bytes at most (whole
    copies: 6x), and give the very pixels PyAV gives on the local file; on S3 and on GCS."""
    s3fs_client, bucket = store
    from rayvid import samples

    path = str(tmp_path / "textured.mp4")
    subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error",
                    "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=15:duration=12,noise=alls=14:allf=t+u:all_seed=5",
                    "-f", "lavfi", "-i", "sine=frequency=440:duration=12",
                    "-c:v", "libx264", "-preset", "veryfast", "-g", "15", "-pix_fmt", "yuv420p", "-c:a", "aac",
                    path], check=True)
    url = f"{bucket}/textured/textured.mp4"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(12.0, 2.0)
    remote, local = Decoder(size=(64, 64), decoder="pyav"), Decoder(size=(64, 64), decoder="pyav")

    def frames(dec, where):
        out = {}
        for k, (start, end) in enumerate(bounds):
            for batch in dec.decode_video(where, k, len(bounds), start, end):
                if batch["kind"][0] == KIND_FRAME:
                    out.update(zip(batch["frame_index"].tolist(), batch["frame"]))
                else:
                    assert batch["error_type"][0] == "", batch["message"][0]
        return out

    got, want = frames(remote, url), frames(local, path)
    assert sorted(got) == sorted(want) == list(range(180))
    assert all(np.array_equal(got[i], want[i]) for i in want)
    assert remote.bytes_fetched <= 1.3 * os.path.getsize(path)
    assert local.bytes_fetched == 0

    # a key-frame scan of the whole video (about one per second) reads the key frames' packets
    bounds = [(-math.inf, math.inf)]
    scan = Decoder(size=(64, 64), keyframes=True, fetch_gap_bytes=0)
    keys = frames(scan, url)
    assert sorted(keys) == sorted(frames(Decoder(size=(64, 64), keyframes=True), path)) and len(keys) >= 12
    assert all(np.array_equal(keys[i], want[i]) for i in keys)
    assert scan.bytes_fetched <= 0.5 * os.path.getsize(path)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_long_video_through_the_job_in_segments(ray_session, long_videos, code_reader, tmp_path,
                                                s3fs_client, where):
    from helpers import read_output

    if where == "local":
        src = str(tmp_path / "in")
        os.mkdir(src)
        for name, (path, _) in long_videos.items():
            os.symlink(path, os.path.join(src, name))
    else:  # the MP4's segments read partial copies, the others whole ones
        src = "s3://rayvid-test/long-job"
        for name, (path, _) in long_videos.items():
            s3fs_client.put_file(path, f"{src}/{name}")
    out = str(tmp_path / "out")
    cfg = RunConfig(input=src, output=out, model=ModelConfig(name=code_reader),
                    decode=DecodeConfig(segment_s=3.0), progress=False)
    result = pipeline.run(cfg)
    assert result.videos_ok == 3 and result.videos_failed == 0
    preds = read_output(out)
    for name, (path, n) in long_videos.items():
        rows = preds.filter(pc.equal(preds["video_uri"], f"{src}/{name}")).sort_by("frame_index")
        assert rows["frame_index"].to_pylist() == list(range(n)), name
        assert rows["label"].to_pylist() == [str(i) for i in range(n)], name
        np.testing.assert_allclose(rows["timestamp_s"].to_numpy(), pts_of(path), atol=1e-3, rtol=0)
    videos = {r["video_uri"]: r for r in read_output(out, "videos").to_pylist()}
    assert all(v["frames"] == 300 for v in videos.values())
    assert "pyav" in videos[f"{src}/long_h264.mp4"]["decoder"]  # later segments seek with PyAV
    sizes = {name: os.path.getsize(path) for name, (path, _) in long_videos.items()}
    if where == "local":
        assert result.bytes_read == result.bytes_remote == 0
    else:  # 7 segments each (20 s in 3 s); the MP4's read partial copies, the others whole
        # copies that the segments decoding at the same time share (the actor's two calls
        # overlap): far less than a copy per segment (measured: 98 KB against 325 KB)
        assert result.bytes_remote == sum(sizes.values())
        mkv_webm = sizes["long_hevc_opengop.mkv"] + sizes["long_vp9.webm"]
        assert mkv_webm < result.bytes_read < 7 * mkv_webm


@pytest.mark.parametrize("name", sorted(framecode.MATRIX))
def test_segments_meet_exactly_on_every_codec(matrix, name):
    """Every matrix file cut into ~0.3 s segments (later ones seek with PyAV)."""
    path, n = matrix[name]
    duration = float(pts_of(path)[-1]) + 0.05
    bounds = segments.bounds(duration, 0.3)
    parts = _decode(path, bounds, {})
    assert [i for i, _ in parts] == list(range(n)), f"{name}: frames missing or twice ({len(bounds)} segments)"
    wrong = [(i, shown) for i, shown in parts if shown != i]
    assert not wrong, f"{name}: (frame, shown) {wrong[:5]}"


@pytest.mark.parametrize("name", sorted(framecode.TRIMMED))
@pytest.mark.parametrize("where", ["local", "s3"])
def test_segments_of_a_trimmed_video_meet_exactly(trimmed, s3fs_client, name, where):
    """A trimmed video (packets before its first shown frame) cut into ~0.3 s segments,
    local and on S3 (MP4/MOV: partial copies, which must fetch those packets too, or the
    first segment's frames do not decode): each frame once, showing what a player shows."""
    path = trimmed[name]
    truth = framecode.shown(path)
    url = path
    if where == "s3":
        url = f"s3://rayvid-test/trimmed-segments/{name}"
        s3fs_client.put_file(path, url)
    bounds = segments.bounds(truth[-1][0] + 0.05, 0.3)
    assert len(bounds) > 3
    assert _decode(url, bounds, {}) == [(i, code) for i, (_, code, _) in enumerate(truth)]


@pytest.mark.parametrize("name", ["truncated_moov_at_end.mp4", "truncated_faststart.mp4",
                                  "garbage_in_middle.mp4", "unsupported_codec.avi"])
@pytest.mark.parametrize("sampling", [{}, {"every": 7}])
def test_damaged_files_in_remote_segments_end_as_local_ones_do(damaged, s3fs_client, name, sampling):
    """A partial copy is as long as the object and holds what the segment reads, so damage
    reads as it does on the whole file: the same frames kept, the same end rows."""
    url = f"s3://rayvid-test/damaged-segments/{name}"
    s3fs_client.put_file(damaged[name], url)
    bounds = segments.bounds(4.0, 1.5)  # 120 frames at 30 fps, 3 segments

    def run(where):
        dec = Decoder(size=framecode.SIZE, decoder="pyav", fetch_gap_bytes=0, **sampling)
        return _segment_rows(dec, where, bounds, with_decoder=True)

    local = run(damaged[name])
    assert any(row[1] for row in local if len(row) == 5)  # damage is said, somewhere
    assert run(url) == local


def _codes(rows: list) -> list:
    return [(int(i), framecode.read_code(f)) for b in rows if b["kind"][0] == KIND_FRAME
            for i, f in zip(b["frame_index"], b["frame"])]


def test_a_segment_is_fetched_while_another_holds_the_decoder(long_videos, s3fs_client):
    """With two calls in hand (as a decode actor has over remote videos), the second
    segment's bytes all arrive while the first segment holds the decode child: the planner
    child works them out from the index and the call fetches them outside the decoder's
    lock. The decode child then asks for nothing more, and both segments are exact."""
    path, _ = long_videos["long_h264.mp4"]
    url = "s3://rayvid-test/ahead-segments/long_h264.mp4"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(20.0, 6.0)  # frames 0-89, 90-179, ...
    alone = list(Decoder(size=framecode.SIZE, batch_frames=4).decode_video(url, 1, len(bounds), *bounds[1]))
    needs = int(alone[-1]["bytes_read"][0])  # the second segment's index and frames

    dec = Decoder(size=framecode.SIZE, batch_frames=4)
    first = dec.decode_video(url, 0, len(bounds), *bounds[0])
    rows_first = [next(first)]  # the first segment holds the decode child, paused after a batch
    before, box = dec.bytes_fetched, {}
    second = threading.Thread(
        target=lambda: box.update(rows=list(dec.decode_video(url, 1, len(bounds), *bounds[1]))))
    second.start()
    try:
        deadline = time.monotonic() + 60
        while dec.bytes_fetched < before + needs and time.monotonic() < deadline:
            time.sleep(0.05)
        fetched, waiting = dec.bytes_fetched - before, second.is_alive() and "rows" not in box
        rows_first += list(first)
    finally:
        first.close()  # lets the second segment have the decoder, whatever happened
        second.join(60)
    assert fetched == needs and waiting  # all fetched while the first held the decoder
    assert _codes(rows_first) == [(i, i) for i in range(90)]
    assert _codes(box["rows"]) == [(i, i) for i in range(90, 180)]
    assert int(box["rows"][-1]["bytes_read"][0]) == needs


def test_a_planner_crash_costs_a_segment_nothing(long_videos, s3fs_client):
    """The planner child is only ahead of time: killed between segments, the next segment
    is planned by a fresh one, and every frame comes out exact."""
    import signal

    path, _ = long_videos["long_h264.mp4"]
    url = "s3://rayvid-test/planner-crash/long_h264.mp4"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(20.0, 6.0)
    dec = Decoder(size=framecode.SIZE, batch_frames=8)
    rows = list(dec.decode_video(url, 0, len(bounds), *bounds[0]))
    os.kill(dec._planner.proc.pid, signal.SIGKILL)
    rows += list(dec.decode_video(url, 1, len(bounds), *bounds[1]))
    assert _codes(rows) == [(i, i) for i in range(180)]
    assert all(r["error_type"][0] == "" for r in rows if r["kind"][0] != KIND_FRAME)


def test_a_planner_that_cannot_start_costs_a_segment_nothing(long_videos, s3fs_client, monkeypatch):
    """A planner child that dies while it starts (first start or restart after a crash)
    raised out of the decode stage (the task failed); where starting it raised OSError, the
    video became a permanent "read" error row. Now planning is skipped and every frame
    comes out exact."""
    import signal

    from test_decode import _DiesWhileStarting

    path, _ = long_videos["long_h264.mp4"]
    url = "s3://rayvid-test/planner-start/long_h264.mp4"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(20.0, 6.0)
    dec = Decoder(size=framecode.SIZE, batch_frames=8)  # its decode child starts now
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", _DiesWhileStarting)
        rows = list(dec.decode_video(url, 0, len(bounds), *bounds[0]))  # the planner's first start
    rows += list(dec.decode_video(url, 1, len(bounds), *bounds[1]))  # started now
    os.kill(dec._planner.proc.pid, signal.SIGKILL)
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", _DiesWhileStarting)
        rows += list(dec.decode_video(url, 2, len(bounds), *bounds[2]))  # its restart
    assert _codes(rows) == [(i, i) for i in range(270)]
    assert all(r["error_type"][0] == "" for r in rows if r["kind"][0] != KIND_FRAME)


def test_crash_in_a_remote_segment_resumes_on_the_same_partial_copy(long_videos, s3fs_client):
    """The retry after a decoder crash reads the partial copy the first attempt fetched:
    every frame once and exact, and no byte fetched twice."""
    import signal

    path, _ = long_videos["long_h264.mp4"]
    url = "s3://rayvid-test/crash-segments/long_h264.mp4"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(20.0, 6.0)  # the second segment: 6 s to 12 s, frames 90-179

    clean = Decoder(size=framecode.SIZE, batch_frames=4)
    list(clean.decode_video(url, 1, len(bounds), *bounds[1]))
    dec = Decoder(size=framecode.SIZE, batch_frames=4)
    gen = dec.decode_video(url, 1, len(bounds), *bounds[1])
    first = next(gen)
    os.kill(dec._child.proc.pid, signal.SIGKILL)
    rows = [first, *gen]
    got = [(int(i), framecode.read_code(f)) for b in rows if b["kind"][0] == KIND_FRAME
           for i, f in zip(b["frame_index"], b["frame"])]
    assert got == [(i, i) for i in range(90, 180)]
    end = rows[-1]
    assert end["error_type"][0] == "" and "killed by SIGKILL" in end["decoder"][0]
    assert dec.bytes_fetched == clean.bytes_fetched > 0


@pytest.fixture(scope="module")
def odd_mp4s(tmp_path_factory, long_videos):
    """MP4s with a damaged or unusual index (moov): name -> path."""
    root = tmp_path_factory.mktemp("odd-mp4")
    path, _ = long_videos["long_h264.mp4"]
    out = {name: str(root / name) for name in ("latin1_metadata.mp4", "avcc_damaged.mp4", "garbage.mp4")}
    framecode.latin1_metadata(path, out["latin1_metadata.mp4"])
    data = open(path, "rb").read()
    with open(out["avcc_damaged.mp4"], "wb") as f:  # the decoder's configuration box, renamed: FFmpeg cannot open it
        f.write(data.replace(b"avcC", b"avcX", 1))
    with open(out["garbage.mp4"], "wb") as f:  # an ftyp box, then garbage
        f.write(data[:32] + bytes((i * 7919) % 251 for i in range(len(data) - 32)))
    return out


@pytest.mark.parametrize("name", ["latin1_metadata.mp4", "avcc_damaged.mp4", "garbage.mp4"])
@pytest.mark.parametrize("sampling", [{}, {"every": 7}])
def test_odd_mp4s_in_remote_segments_end_as_local_ones_do(odd_mp4s, s3fs_client, name, sampling):
    """A partial copy's index is opened three times (probe, planner, `fetch_for`): an
    index PyAV cannot read, whatever it raises, ends each segment with an error row as on
    the local file, and one it can read (tags that are not UTF-8: PyAV raised
    UnicodeDecodeError, which failed the task) gives every frame, exact."""
    url = f"s3://rayvid-test/odd-segments/{name}"
    s3fs_client.put_file(odd_mp4s[name], url)
    bounds = segments.bounds(20.0, 6.0)

    def run(where):
        return _segment_rows(Decoder(size=framecode.SIZE, batch_frames=16, **sampling), where, bounds)

    local, remote = run(odd_mp4s[name]), run(url)
    assert remote == local
    frames, ends = [r for r in local if len(r) == 2], [r for r in local if len(r) == 4]
    assert len(ends) == len(bounds) and all(shown == i for i, shown in frames)
    if name == "latin1_metadata.mp4":
        assert [i for i, _ in frames] == list(range(0, 300, sampling.get("every", 1)))
        assert all(e[1] == "" for e in ends)
    else:
        assert frames == [] and all(e[1] == "VideoError" and e[3] == 0 for e in ends)


def test_planning_reads_the_header_of_an_mp4_whose_tags_are_not_utf8(odd_mp4s, s3fs_client):
    """Planning opens each large video's header (`segments.header`): a Latin-1 tag made PyAV
    raise UnicodeDecodeError there, which no `except` took, and the run died in planning
    with a traceback. Its tags are not read: it is cut as the clean file is; an index PyAV
    cannot read is planned whole (one segment), as before."""
    url = "s3://rayvid-test/odd-plan/latin1_metadata.mp4"
    s3fs_client.put_file(odd_mp4s["latin1_metadata.mp4"], url)
    for where in (odd_mp4s["latin1_metadata.mp4"], url):
        assert segments.header_duration(where) == pytest.approx(20.0, abs=0.1)
        plan = segments.plan({"video_uri": np.array([where], dtype=object)}, segment_s=6.0)
        assert plan["segment"].tolist() == [0, 1, 2, 3]
    plan = segments.plan({"video_uri": np.array([odd_mp4s["avcc_damaged.mp4"], odd_mp4s["garbage.mp4"]],
                                                dtype=object)}, segment_s=6.0)
    assert plan["segment"].tolist() == [0, 0] and plan["n_segments"].tolist() == [1, 1]


def test_a_header_claiming_an_absurd_duration_plans_no_more_segments_than_its_size_allows(tmp_path):
    """A Matroska file's header may say anything: a 1 s video saying 1e10 s planned one
    segment per 6 s of it (16.7 million for a 1 MB file: minutes of planning, gigabytes in
    the driver, then hours of empty segments). Its duration counts for no more than its
    size at MIN_BYTES_PER_S; every frame still comes out once (the last segment runs to
    the end)."""
    import struct

    clean, lying = str(tmp_path / "clean.mkv"), str(tmp_path / "lying.mkv")
    framecode.write_code_video(clean, 30, framecode.SIZE, framecode.X264)
    data = bytearray(open(clean, "rb").read())
    at = data.find(b"\x44\x89\x88")  # Segment Info's Duration, an 8-byte float (in ms at the default scale)
    assert at > 0
    data[at + 3:at + 11] = struct.pack(">d", 1e13)
    open(lying, "wb").write(bytes(data))
    size = os.path.getsize(lying)
    assert segments.header_duration(clean) == pytest.approx(1.0, abs=0.1)
    assert segments.header_duration(lying) == pytest.approx(size / segments.MIN_BYTES_PER_S)
    plan = segments.plan({"video_uri": np.array([lying], dtype=object)}, segment_s=6.0)
    assert plan["n_segments"][0] == math.ceil(size / segments.MIN_BYTES_PER_S / 6.0) < 100
    bounds = list(zip(plan["start_s"], plan["end_s"]))
    rows = _segment_rows(Decoder(size=framecode.SIZE, batch_frames=16), lying, bounds)
    assert [r for r in rows if len(r) == 2] == [(i, i) for i in range(30)]
    assert all(r[1] == "" for r in rows if len(r) == 4)


def _read_partially(src: str, copy: str, start_s: float, end_s: float = math.inf, reader=None) -> tuple[list, list]:
    """(the batches, each fetch's ranges) of a FrameReader (`reader`, else one at
    framecode.SIZE) reading `src` from `start_s` to `end_s` through a partial copy (its
    index first)."""
    from rayvid.mp4 import index_only
    from rayvid.video import FrameReader

    fs, _ = storage.resolve(src)
    part = storage.RangeCopy(fs, src, os.path.getsize(src), copy)
    open(copy, "wb").close()
    os.truncate(copy, part.size)
    assert index_only(part)
    fetches = []

    def on_fetch(ranges):
        fetches.append(list(ranges))
        part.fetch_ranges(ranges)

    reader = reader or FrameReader(framecode.SIZE)
    return list(reader.read(copy, src, start_s=start_s, end_s=end_s, partial=True, on_fetch=on_fetch)), fetches


def _without_sync_table(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    at = data.find(b"stss")
    data[at:at + 4] = b"free"  # (the box is skipped: no table, every sample a sync sample)
    open(path, "wb").write(bytes(data))


def test_a_late_segment_of_an_mp4_without_a_sync_table_reads_back_to_its_i_picture_only(tmp_path):
    """A partial copy of an H.264 MP4 without its sync table (every frame a "key frame" as
    the index says): a late segment's seek lands on a P picture, and the heads read back
    from it stop at the I picture before it (the head of every earlier frame was fetched:
    870 ranges here, growing with the square of the length over a video's segments).
    Every frame exact."""
    src = str(tmp_path / "nostss.mp4")
    framecode.write_code_video(src, 900, framecode.SIZE, ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt",
                                                          "yuv420p", "-g", "60", "-bf", "2"])
    _without_sync_table(src)
    rows, fetches = _read_partially(src, str(tmp_path / "part.mp4"), start_s=29.0)
    assert rows[-1]["error_type"][0] == "" and _codes(rows) == [(i, i) for i in range(870, 900)]
    assert 0 < sum(map(len, fetches)) <= 64 + 8, fetches


def test_clips_over_key_frames_of_a_partial_copy_are_the_local_files(tmp_path):
    """--keyframes --clip-len numbers clips over the video's key frames: a partial copy's
    segments read back only to the nearest place to start left earlier P pictures of an
    MP4 without a sync table counted as key frames, and clips came out shifted and
    overlapping (the diff reviewer's find). With clips over key frames every earlier key
    frame's head is read: each segment's clips are the local file's."""
    from rayvid.video import FrameReader

    src = str(tmp_path / "nostss.mp4")
    framecode.write_code_video(src, 900, framecode.SIZE, ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt",
                                                          "yuv420p", "-g", "60", "-bf", "2"])
    _without_sync_table(src)

    def clips(rows):
        return [(int(a), int(b)) for x in rows[:-1] for a, b in zip(x["clip_start_frame"], x["clip_end_frame"])]

    for start_s, end_s in ((0, 10), (10, 20), (20, math.inf)):
        reader = FrameReader(framecode.SIZE, keyframes=True, clip_len=3)
        local = clips(list(reader.read(src, src, start_s=start_s, end_s=end_s)))
        rows, _ = _read_partially(src, str(tmp_path / "part.mp4"), start_s, end_s, reader)
        assert clips(rows) == local and local, (start_s, clips(rows), local)


@pytest.mark.parametrize("sampling", [{"every": 7}, {"fps": 2.0}, {"keyframes": True}])
def test_remote_segments_of_an_intra_refresh_video_seek_only_where_a_decoder_can_start(matrix, s3fs_client, sampling):
    """A partial copy holds the index, not the key packets: before its seeks, the first KB
    of each key frame sought is fetched and read (`video.starting_keys`), and a recovery
    point that is no place to start (x264's intra refresh) is passed over for an earlier
    key frame. Every frame kept comes out, exact, as from the local file (a key-frame scan
    keeps the IDR alone)."""
    path, n = matrix["intra_refresh.mp4"]
    url = "s3://rayvid-test/intra-refresh/intra_refresh.mp4"
    s3fs_client.put_file(path, url)
    bounds = segments.bounds(float(pts_of(path)[-1]) + 0.05, 0.5)
    local, remote = _decode(path, bounds, sampling), _decode(url, bounds, sampling)
    assert remote == local and all(i == shown for i, shown in local)
    want = [0] if "keyframes" in sampling else None
    if "every" in sampling:
        want = list(range(0, n, 7))
    if want is not None:
        assert [i for i, _ in local] == want


def test_an_intra_refresh_videos_last_segment_walks_back_to_its_idr_in_few_fetches(tmp_path):
    """The last segment of a partial copy of an intra-refresh video (one IDR, a recovery
    point a second): each recovery point found no place to start moved the seek to the one
    before, a fetch and a plan each (59 fetches for a minute's video, 1199 and 74 s for 20
    minutes). Found one, the heads of the key frames before it are fetched and read in
    rounds of 64, then 4x as many: three fetches here (28 recovery points back), a few more
    growing with the log of the distance, and every frame exact."""
    src = str(tmp_path / "ir.mp4")
    framecode.write_code_video(src, 900, framecode.SIZE, ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt",
                                                          "yuv420p", "-x264-params", "intra-refresh=1:keyint=30"])
    rows, fetches = _read_partially(src, str(tmp_path / "part.mp4"), start_s=28.0)
    assert rows[-1]["error_type"][0] == "" and _codes(rows) == [(i, i) for i in range(840, 900)]
    assert len(fetches) <= 3, [len(f) for f in fetches]
