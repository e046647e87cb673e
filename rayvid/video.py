"""One local video file in, uint8 RGB frames at the model's input size out: a demux-only
probe of the container (`probe`), the frames a sampling mode keeps (`sample_indices`), and
the decoder that reads them (`FrameReader`), inside the decode stage's child process
(decode.py), which hands it a local path: a file in place, a whole copy of a remote one,
or a partial copy of a remote MP4/MOV (mp4.py) whose missing bytes it asks the actor for
(`fetch_for`; which ones: `plan_ranges`).

Rows out (`FrameReader.read`, the decode stage's columns, listed in decode.py): batches of
frame rows, then one terminal row (`end_row`) that counts them, carries the video's
metadata and says why the segment stopped early, if it did.

Two decoders, chosen per video from a demux-only probe (PyAV) of the container:
- **decord** (default where it is right, see `DECORD_CODECS`; never on MPEG-TS:
  `DECORD_WRONG_CONTAINERS`) for dense sampling (every
  frame), reading a local path (remote objects are streamed to a temp file first:
  `VideoReader(file_object)` copies the whole file into memory and segfaults on
  truncation), always resizing on decode to the model size, with an explicit
  `num_threads` (decord's 0 means every core of the node). It reads strictly
  sequentially, in contiguous windows: decord's seeks return wrong frames after keyframes
  on open-GOP HEVC (measured: 4 of 9 sparse indices off on a 60-frame x265 file), its
  sequential reads are exact. Its demuxer thread queues the compressed packets of the
  whole file ahead of the decoder (measured: 1.9 GB of anonymous memory after the first
  64 frames of a 1.9 GB 10-minute 1080p file), so files larger than `DECORD_MAX_BYTES`
  go to PyAV, which holds one packet at a time (about 10% more CPU per 1080p frame,
  BENCHMARKS.md): memory stays flat in video length.
- **PyAV** for sparse sampling (`--every`, `--fps`, `--keyframes`: decord would decode and
  resize every frame in between; PyAV seeks over key-frame intervals that hold no kept
  frame, skips non-reference frames that are not kept, and converts kept frames only), for
  what decord cannot open or cannot be trusted with (AV1; VP9; output widths decord
  mis-strides, such as 48 px, where it returns 4-channel garbage), for every segment but a
  video's first (it seeks to the key frame before the segment and maps frames to indices
  by pts, which is exact after a seek on every codec), and as the fallback when decord
  fails before its first frame. It decodes packet by packet (a damaged packet costs its
  frames, not the video), applies the container's rotation (frames come out upright, as a
  player shows them) and resizes bilinearly, as decord does (within 1-2 grey levels on average:
  decord scales in its own filter graph).
Frame indices and timestamps come from the probe: index i is the i-th frame in
presentation (pts) order, its time is (pts - stream start) x time_base, exact in float64.
Packets no player shows (`Probe.lead_in`: an edit list's discarded ones, a capture's
frames before its first key frame) are no frames; where the container's times cannot
order the frames (`Probe.output_order`: AVI/ASF's decode times, transport streams whose
clock restarts) frame i is the i-th frame decoded from the start.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import threading
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import numpy as np

from rayvid import storage
from rayvid.mp4 import FETCH_GAP_BYTES, hint
from rayvid.schema import KIND_END, KIND_FRAME

# decord buffers a file's compressed packets whole: above this size, PyAV decodes it
DECORD_MAX_BYTES = 256 * 2**20

# Sources this large and up decode on `FrameReader`'s large_source_threads (where the
# decode actor shares its node's cores with CPU inference: decode.SHARED_NODE_THREADS).
LARGE_SOURCE_PIXELS = 1280 * 720

# Codecs decord 0.6 decodes exactly (sequential reads; tests/test_decode.py and
# bench/decord_matrix.py check each); anything else goes to PyAV. Measured: decord cannot
# open AV1; on VP9/WebM it once raised a decoder-thread error we could not reproduce, so VP9
# goes to PyAV too.
DECORD_CODECS = frozenset(
    "h264 hevc mpeg4 mjpeg prores mpeg1video mpeg2video h263 msmpeg4v2 msmpeg4v3 wmv1 wmv2 "
    "dvvideo".split()
)
# Containers whose frames decord returns shifted, with no error: on MPEG-TS (.ts, .m2ts,
# .mts) frame i showed frame i+10 (H.264) or i+12 (MPEG-2), HEVC came out blank
# (measured with the frame-code videos, decord 0.6.0). They go to PyAV, which is exact.
DECORD_WRONG_CONTAINERS = frozenset({"mpegts"})
# Containers without an index (MPEG transport and program streams: .ts .m2ts .mts, .mpg
# .vob): FFmpeg seeks in them by bytes and lands on frames flagged key that a decoder cannot
# start from (measured: sampled frames and later segments lost as damaged). Readers never
# seek in them (`Probe.seek_keys`), and the planner keeps them in one segment.
UNSEEKABLE_CONTAINERS = frozenset({"mpegts", "mpeg"})
# Containers that store decode times only (AVI, ASF/WMV): of H.264/HEVC with B-frames
# FFmpeg gives packets, and so frames, times in decode order, not the order they are shown
# in (measured: with `--every 5`, frame 10 showed frame 11, frame 20 frame 23). Decoders
# output frames in the order they are shown, so in these files (`Probe.output_order`) the
# k-th frame decoded from the start is frame k: read from the start, every frame decoded
# (no seek, no skipping), never cut into segments. MPEG-4 Part 2 too where its B-frames are
# "packed" (Xvid/DivX: a B-frame in the P-frame's chunk, a placeholder in the next; its
# user data says so, `PACKED_B_FRAMES`): they came out with FFmpeg's guessed times (sampled
# frames one off, PyAV's swapped in pairs). Unpacked MPEG-4 Part 2 is read by its times.
DECODE_TIME_CONTAINERS = frozenset({"avi", "asf"})
REORDERING_CODECS = frozenset({"h264", "hevc"})
PACKED_B_FRAMES = re.compile(rb"DivX\d+(?:Build|b)\d+p")  # (FFmpeg's mpeg4 decoder's own test: `divx_packed`)


def sample_indices(
    timestamps: np.ndarray,
    every: int = 1,
    fps: Optional[float] = None,
    keyframes: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Indices of the frames a sampling mode keeps, sorted and unique.

    every=N keeps 0, N, 2N, ...; fps=F keeps, for each target time t = k/F (k = 0, 1, ...
    up to the last frame's time), the frame whose presentation time is nearest t (ties go
    to the earlier frame); a frame nearest several targets is kept once; `keyframes` (a
    boolean mask) keeps exactly the key frames.
    """
    n = len(timestamps)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if keyframes is not None:
        return np.flatnonzero(keyframes).astype(np.int64)
    if fps is None:
        return np.arange(0, n, every, dtype=np.int64)
    ts = np.asarray(timestamps, dtype=np.float64)
    last = ts[-1]
    span = float(last) * fps  # (a Python float: inf, not a warning, past the largest)
    if not math.isfinite(span) or span > 8 * n + 1024:  # targets far denser than frames: not one by one
        return _nearest_any_target(ts, fps)
    targets = np.arange(0, math.floor(span + 1e-9) + 1, dtype=np.float64) / fps
    right = np.clip(np.searchsorted(ts, targets, side="left"), 0, n - 1)
    left = np.clip(right - 1, 0, n - 1)
    pick = np.where(np.abs(ts[left] - targets) <= np.abs(ts[right] - targets), left, right)
    return np.unique(pick).astype(np.int64)


def _nearest_any_target(ts: np.ndarray, fps: float) -> np.ndarray:
    """`sample_indices`' fps rule where its targets would outnumber the frames many times
    (a huge --fps: an array of duration x fps targets, 147 GB for 1e10 on 3 s): frame i is
    kept where a target k/F falls in its cell, the times nearer to it than to its
    neighbours (ties to the earlier frame: (m[i-1], m[i]]), up to the last frame's time."""
    n = len(ts)
    mids = (ts[:-1] + ts[1:]) / 2
    widths = np.diff(np.concatenate([mids, ts[-1:]]))  # of every cell but the first (which holds target 0)
    if len(widths) and fps * float(np.min(widths)) >= 1:
        return np.arange(n, dtype=np.int64)  # every cell is wider than the targets' spacing
    lo = np.concatenate([[0.0], mids])
    hi = np.concatenate([mids, [ts[-1]]])
    with np.errstate(over="ignore", invalid="ignore"):
        holds = np.floor(hi * fps) - np.floor(lo * fps) >= 1
    holds[0] = True  # target 0 is nearest the first frame
    return np.flatnonzero(holds).astype(np.int64)


@dataclass(frozen=True)
class Probe:
    """What the container says of its video stream, from a demux-only pass (no decoding)."""

    codec: str
    width: int  # as displayed: the coded size, turned by the container's rotation
    height: int
    fps: float  # average, for information only: never used to compute times
    duration_s: float
    pts: np.ndarray  # int64, sorted: frame i has pts[i]
    times: np.ndarray  # float64 seconds, (pts - start) * time_base
    keyframes: np.ndarray  # bool, frame i is a key frame
    listed: int = 0  # frames the container's index lists (0: it does not say)
    rotation: int = 0  # display rotation in degrees (FFmpeg's `frame.rotation`; 0, 90, -90, -180)
    container: str = ""  # FFmpeg's name of the container format (`mpegts`, `mov,mp4,...`)

    @property
    def output_order(self) -> bool:
        """Frames are known by the order they are decoded in, not by their times
        (`DECODE_TIME_CONTAINERS`; a clock that restarts: `_epochs`; frames that share a
        timestamp)."""
        return self.joined > 0 or self.in_order or self.repeated

    @property
    def shared_pts(self) -> bool:
        """Frames that share a timestamp on a clock of their own (not decode times, nor a
        restarted clock): read from the start (no seek: `output_order`), every frame up to
        the last one kept decoded (`walked`); a packet is known by its rank among those of
        its timestamp, a frame out by its rank among those shown at its timestamp."""
        return self.repeated and not (self.joined or self.in_order)

    def walked(self, keep: np.ndarray) -> np.ndarray:
        """The frames whose packets the decoder reads before it may stop (`_Walk`): with
        shared timestamps, every frame up to the last kept one and those sharing its
        timestamp (a pair's frame shown first may be demuxed last)."""
        if not (self.shared_pts and len(keep)):
            return keep
        return np.arange(int(np.searchsorted(self.pts, self.pts[int(keep[-1])], side="right")))

    @property
    def seek_keys(self) -> np.ndarray:
        """The frames a reader may seek to: the key frames, where the container has an index
        to seek by; else frame 0 alone (`UNSEEKABLE_CONTAINERS`, and files whose frames are
        known by their order only: read from the start)."""
        if UNSEEKABLE_CONTAINERS & set(self.container.split(",")) or self.output_order:
            return np.arange(len(self.keyframes)) == 0
        return self.keyframes
    # where frame i's packet lies: byte offset (-1: unknown), size, rank in decode order
    pos: Optional[np.ndarray] = None
    nbytes: Optional[np.ndarray] = None
    order: Optional[np.ndarray] = None
    # Packets that are no frame of the video but that decoding may read (`lead_in`):
    # their byte offset, size, and the decode rank of the first frame after them
    lead_pos: Optional[np.ndarray] = None
    lead_nbytes: Optional[np.ndarray] = None
    lead_before: Optional[np.ndarray] = None
    joined: int = 0  # times the clock restarted (`_epochs`): its frames are known by their order
    mirror: Optional[np.ndarray] = None  # the display matrix, where it mirrors (`display_matrix`): decord does not
    in_order: bool = False  # decode times only (`output_order`)
    repeated: bool = False  # frames that share a timestamp (`output_order`)
    nal_length: int = 0  # H.264's NAL unit length size (`nal_length_size`; 0: start codes or another codec)
    # where a Matroska header states more than the file holds (a file cut short): what it
    # states and where the file's last frame ends, both on the file's clock (0: no such gap)
    stated_s: float = 0.0
    held_s: float = 0.0
    shown_streams: int = 1  # video streams that are no cover picture (`video_stream` picks one)
    # where the demuxer skipped damaged bytes to read on (`_holes`): (the last frame's time
    # before, the first's after, about how many frames were lost between; -1: not known)
    skipped: tuple = ()


    @property
    def mirrored(self) -> bool:
        return self.mirror is not None

    @property
    def lead_in(self) -> int:
        """Packets the container holds that no player shows: decoded for the frames that
        reference them, never frames of their own. An MP4/MOV edit list that starts inside a
        group of pictures (a trim by stream copy, `ffmpeg -ss T -i IN -c copy OUT.mp4`, as
        phones and editors make) flags the packets before its start as discarded; a
        transport stream captured from the middle of a group of pictures opens with frames
        that reference pictures it does not hold."""
        return 0 if self.lead_pos is None else len(self.lead_pos)


def probe(path: str, partial: bool = False) -> Probe:
    """With `partial` (a copy holding only the container's index, `mp4.index_only`) nothing is
    decoded (the rotation, which the first decoded frame says, is 0 until `fetch_for`),
    and key frames are the index's (FFmpeg's parser judges them from the packets' bytes,
    which are not there)."""
    import av

    try:
        with (_Sparse(path) if partial else contextlib.nullcontext(path)) as source, open_container(source) as container:
            stream = video_stream(container)
            if stream is None:
                raise VideoError("no video stream (audio-only or not a video)")
            if stream.codec_context is None:
                raise VideoError("unsupported codec: FFmpeg has no decoder for this video stream")
            packets, rotation, mirror = [], 0 if partial else None, None
            # frames known by their order: decode times are the container's (its pts FFmpeg's guess)
            codec = stream.codec_context.codec.canonical_name  # (the codec, not its decoder: av1, not libdav1d)
            by_order = output_order(container.format.name or "", codec, packed_b_frames(stream))
            # H.264 key packets that no decoder can start from are no key frames (`starts_pictures`)
            is_h264 = codec == "h264"
            length_size = nal_length_size(stream.codec_context.extradata) if is_h264 else 0
            h264 = is_h264 and not partial  # (a partial copy's packets are not there: `starting_keys`)
            last_end = None  # where the last packet's own duration ends (stream time base)
            resumed = []  # packets read before each place the demuxer said it skipped damaged bytes
            with _demuxer_errors(container) as errors:
                for p in _demux(container, stream):
                    if p.size and errors():  # (said while it read on to this packet)
                        resumed.append(len(packets))
                    if p.size:
                        if not packets and codec == "mpeg4" and not by_order:  # (its user data in the first frame)
                            by_order = output_order(container.format.name or "", codec,
                                                    packed_b_frames(stream, bytes(memoryview(p)[:KEY_HEAD_BYTES])))
                        at = p.pts if p.pts is not None else p.dts
                        if at is not None and p.duration:
                            last_end = at + p.duration if last_end is None else max(last_end, at + p.duration)
                        key = p.is_keyframe and not (
                            h264 and packets and starts_pictures(bytes(memoryview(p)[:KEY_HEAD_BYTES]), length_size) is False)
                        packets.append((p.dts if by_order and p.dts is not None else p.pts if p.pts is not None else p.dts,
                                        key,
                                        -1 if p.pos is None else p.pos, p.size, p.is_discard, p.dts))
                    if rotation is None:  # the first frame says it (decoded once, by the way)
                        try:
                            first = next(iter(p.decode()), None)
                        except av.FFmpegError:
                            first = None
                        if first is not None:
                            rotation, mirror = right_angle(first.rotation), display_matrix(first)
            if partial:  # the index as the demux left it: a fragmented MP4's grows fragment by fragment
                indexed = {e.pos: e.is_keyframe for e in stream.index_entries}
                packets = [(t, indexed.get(pos, key), pos, n, *rest) for t, key, pos, n, *rest in packets]
            width, height = stream.codec_context.width, stream.codec_context.height
            rotation = rotation or 0
            if (rotation // 90) % 2:
                width, height = height, width
            rate = stream.average_rate or stream.guessed_rate  # (IVF: no average, its header's rate)
            tb = stream.time_base
            start = stream.start_time or 0
            listed = int(stream.frames or 0)
            container_format = container.format.name or ""
            stated = _stated_s(container, stream)
            shown_streams = len(_shown(container))
    except av.FFmpegError as e:
        raise VideoError(f"cannot open video: {_reason(e)}{hint(path)}") from None
    if not packets:
        raise VideoError("the video stream has no frames" + ("" if partial else hint(path)))
    if any(p[0] is None for p in packets) or tb is None:
        raise VideoError("the video stream has packets without timestamps"
                         + (" (an elementary stream, with no container to time its frames: remux it, "
                            "`ffmpeg -i IN -c copy OUT.mp4`)" if all(p[0] is None for p in packets) else ""))
    epoch = _epochs(packets, container_format)
    holes = _holes(packets, resumed, epoch)
    lead = _lead_in(packets, container_format, epoch)
    if lead.any():  # (in decode order, as `packets`)
        before = np.cumsum(~lead)[lead]  # frames ahead of each in decode order: the next one's rank
        lead_pos = np.array([p[2] for p, x in zip(packets, lead) if x], dtype=np.int64)
        lead_nbytes = np.array([p[3] for p, x in zip(packets, lead) if x], dtype=np.int64)
        packets = [p for p, x in zip(packets, lead) if not x]
        epoch = epoch[~lead]
        listed = max(0, listed - len(lead_pos))  # (the container's count holds them)
        if not packets:
            raise VideoError("the video stream has no frames to show (every packet is before the start "
                             "its container gives)")
    else:
        before = lead_pos = lead_nbytes = None
    raw = np.array([p[0] for p in packets], dtype=np.int64)
    joined = int(epoch.max()) if len(epoch) else 0
    if joined:  # each part's times after the last one's: a frame's duration after its last frame
        step = round(1 / float(rate) / float(tb)) if rate else 1
        for e in range(1, joined + 1):
            prev, part = raw[epoch == e - 1], epoch == e
            gaps = np.diff(np.sort(prev))
            raw[part] += int(prev.max() + (int(np.median(gaps)) if len(gaps) else step) - raw[part].min())
    order = np.argsort(raw, kind="stable")
    pts = raw[order]
    # frames sharing a timestamp (a muxer's rounding of a jittery clock): FFmpeg shows each,
    # so they are known by their order, as decode times are (`Probe.output_order`)
    repeated = bool(len(pts) > 1 and (np.diff(pts) == 0).any())
    keys = np.array([packets[i][1] for i in order], dtype=bool)
    if lead_pos is not None:  # frame 0 decodes from the lead-in's key frame: a key frame to seek to, and to keep
        keys[0] = True
    if by_order:  # decode times, FFmpeg's pts a guess: from the first frame
        start = int(pts[0])
    times = (pts - start) * tb.numerator / tb.denominator
    fps = float(rate) if rate else 0.0
    duration = float(times[-1] + (1.0 / fps if fps else 0.0))
    if listed > len(pts) and fps and "avi" in container_format.split(","):
        # an AVI's count holds a recorder's dropped frames (empty chunks, which FFmpeg skips):
        # where its last frame is as late as that count says, the file is whole, not cut
        if round(float(times[-1]) * fps) + 1 >= listed:
            listed = len(pts)
    skipped = tuple((float((a - start) * tb), float((b - start) * tb), max(0, round((b - a) * tb * fps) - 1) if fps else -1)
                    for a, b in holes)
    skipped = tuple(h for h in skipped if h[2] != 0)  # (frames one frame apart: nothing lost)
    return Probe(codec, int(width), int(height), fps, duration, pts, times, keys, listed, rotation, container_format,
                 pos=np.array([packets[i][2] for i in order], dtype=np.int64),
                 nbytes=np.array([packets[i][3] for i in order], dtype=np.int64),
                 order=order.astype(np.int64), lead_pos=lead_pos, lead_nbytes=lead_nbytes,
                 lead_before=None if before is None else before.astype(np.int64), joined=joined, mirror=mirror,
                 in_order=by_order, repeated=repeated, nal_length=length_size, shown_streams=shown_streams,
                 skipped=skipped, **_stated_gap(stated, raw, tb, fps, last_end))


@contextlib.contextmanager
def _demuxer_errors(container):
    """Yields a function saying whether `container`'s demuxer has said an error (FFmpeg's
    log, in this thread) since it was last asked: where it meets bytes it cannot parse, a
    Matroska/WebM demuxer reads on from the next cluster it can, and its packets then say
    nothing of the frames it skipped (a QA find: a zeroed range in a
    Matroska file lost 45 frames unsaid, every frame_index after them 45 short)."""
    import av.logging

    name = container.format.name or ""
    if "matroska" not in name.split(","):  # (the one demuxer measured; FFmpeg's log level left alone elsewhere)
        yield lambda: False
        return
    with _LogLevel.lock:
        _LogLevel.users += 1
        if _LogLevel.users == 1:
            _LogLevel.before = av.logging.get_level(), av.logging.get_skip_repeated()
            if _LogLevel.before[0] is None or _LogLevel.before[0] < av.logging.ERROR:
                av.logging.set_level(av.logging.ERROR)
            av.logging.set_skip_repeated(False)  # (a file's message again, read again, was not said)
    try:
        with av.logging.Capture() as logs:
            seen = [0]

            def said() -> bool:
                new = [log for log in logs[seen[0]:] if log[1] == name and log[0] <= av.logging.ERROR]
                seen[0] = len(logs)
                return bool(new)

            yield said
    finally:
        with _LogLevel.lock:
            _LogLevel.users -= 1
            if _LogLevel.users == 0:
                if av.logging.get_level() != _LogLevel.before[0]:
                    av.logging.set_level(_LogLevel.before[0])
                av.logging.set_skip_repeated(_LogLevel.before[1])


class _LogLevel:
    """FFmpeg's log level, raised to errors while any thread's `_demuxer_errors` is open (its
    Capture takes only what that level lets through), and PyAV's skipping of a message said
    twice in a row off, then both put back as they were."""

    lock = threading.Lock()
    users = 0
    before = None


def _holes(packets: list, resumed: list, epoch: np.ndarray) -> list:
    """(the latest time before, the earliest after) of each place the demuxer skipped
    damaged bytes, on the packets' clock: the widest step between the frames' times (in
    the order shown) among those of the packets around each of `resumed` (packets read
    before each place it said so; said a packet or two early or late, and frames sent out
    of order). None where the clock restarted there (`_epochs`: parts joined end to end)."""
    if not resumed:
        return []
    t = np.array([p[0] if p[0] is not None else 0 for p in packets], dtype=np.int64)
    known = np.array([p[0] is not None for p in packets], dtype=bool)
    out, of_epoch = [], {}  # (each clock's frame times, sorted: once)
    for k in resumed:
        lo, hi = max(0, k - 3), min(len(packets), k + 4)
        if not 0 < k < len(packets) or (epoch[lo:hi] != epoch[k]).any() or not known[lo:hi].any():
            continue
        near = t[lo:hi][known[lo:hi]]
        if int(epoch[k]) not in of_epoch:
            of_epoch[int(epoch[k])] = np.unique(t[(epoch == epoch[k]) & known])
        shown = of_epoch[int(epoch[k])]
        shown = shown[np.searchsorted(shown, near.min()):np.searchsorted(shown, near.max(), side="right")]
        if len(shown) > 1:
            j = int(np.argmax(np.diff(shown)))
            hole = (int(shown[j]), int(shown[j + 1]))
            if hole not in out:
                out.append(hole)
    return out


def _skipped_text(skipped: tuple) -> str:
    """The problem `Probe.skipped` says: where, and about how many frames were lost."""
    lost = sum(n for _, _, n in skipped if n > 0)
    where = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b, _ in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
    count = f"about {lost} frame{'' if lost == 1 else 's'}" if all(n > 0 for _, _, n in skipped) else "frames"
    return (f"{count} lost to damaged data the demuxer skipped ({where}): frame_index after "
            f"it counts the frames read (timestamp_s is each frame's own)")


def _epochs(packets: list, container_format: str) -> np.ndarray:
    """For each packet (decode order), how many times the decode times went back before it:
    in a transport or program stream, parts joined end to end (captures, HLS segments
    concatenated) whose clock restarted; elsewhere 0."""
    if not UNSEEKABLE_CONTAINERS & set(container_format.split(",")):
        return np.zeros(len(packets), dtype=np.int64)
    dts = [p[5] for p in packets]
    back = [k > 0 and dts[k] is not None and dts[k - 1] is not None and dts[k] < dts[k - 1] for k in range(len(dts))]
    return np.cumsum(back, dtype=np.int64)


def output_order(container_format: str, codec: str, packed: bool = False) -> bool:
    """Whether frames of this codec in this container are known by their order only
    (`DECODE_TIME_CONTAINERS`; MPEG-4 Part 2 where `packed`: `packed_b_frames`). Also
    without B-frames: FFmpeg's pts there are its decode times plus a frame, and its seeks by
    them landed a frame late (measured: `--every 7` lost frame 14 of an AVI with frequent
    key frames)."""
    return bool(DECODE_TIME_CONTAINERS & set(container_format.split(","))) and (
        codec in REORDERING_CODECS or codec == "mpeg4" and packed)


def packed_b_frames(stream, first: bytes = b"") -> bool:
    """Whether an MPEG-4 Part 2 stream packs its B-frames (Xvid/DivX: `DivX503b1393p`, the
    final p, in its user data), as its extradata or its first packet (`first`) says."""
    extradata = stream.codec_context.extradata if stream.codec_context is not None else None
    return any(PACKED_B_FRAMES.search(data) for data in (extradata or b"", first or b""))


def _lead_in(packets: list, container_format: str, epoch: np.ndarray) -> np.ndarray:
    """Which packets (pts, key, pos, size, discard; in decode order) are no frame a player
    shows (`Probe.lead_in`): those the container flags discarded (an edit list's), and, in
    a transport or program stream (a capture cut mid-way), the frames shown before its
    first key frame: they reference pictures before the capture, and decoders drop them.
    (Only there: elsewhere a first packet not flagged key may still decode, and its frames
    are kept.)"""
    lead = np.array([p[4] for p in packets], dtype=bool)
    if UNSEEKABLE_CONTAINERS & set(container_format.split(",")):
        first = next((p[0] for p, gone, e in zip(packets, lead, epoch) if p[1] and not gone and not e), None)
        if first is not None:  # (of the first part, where parts are joined: `_epochs`)
            lead |= np.array([p[0] < first for p in packets], dtype=bool) & (epoch == 0)
    return lead


def _stated_gap(stated: float, raw: np.ndarray, tb, fps: float, last_end) -> dict:
    """`stated_s` and `held_s` where the header's duration (`_stated_s`) outlasts the file's
    last frame by more than STATED_SLACK_S (or two frames), on the file's clock (a start
    offset counted: a trim, an audio track first); the last frame lasts its packet's own
    duration where the container gives one (a variable-rate file's held last frame), else
    a frame at the average rate. {} otherwise."""
    if not stated:
        return {}
    end = float(raw.max() * tb) + (1 / fps if fps else 0.0)
    if last_end is not None:
        end = max(end, float(last_end * tb))
    if stated > end + max(STATED_SLACK_S, 2 / fps if fps else 0.0):
        return {"stated_s": stated, "held_s": end}
    return {}


STATED_SLACK_S = 1.0  # (a header's duration past the last frame: a muxer's rounding, a held frame)


def _stated_s(container, stream) -> float:
    """The duration a Matroska/WebM header states for the video (FFmpeg's `DURATION` tag of
    its track, else the file's duration where the video is its only stream), seconds; 0
    where it says none or another container. (An MP4's count of frames says the same:
    `Probe.listed`.) A file cut short keeps its header: it states more than it holds."""
    if "matroska" not in (container.format.name or "").split(","):
        return 0.0
    m = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", str(stream.metadata.get("DURATION", "")).strip())
    if m:
        return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    if len(container.streams) == 1 and container.duration:
        return container.duration / 1e6
    return 0.0


def video_stream(container):
    """The video stream rayvid reads, None where there is none: never a cover picture
    (`attached_pic`: an MP4 that lists its cover first, as a tagger's `udta` before the
    tracks); a moving picture before a still one (`STILL_PICTURE_CODECS`: a Matroska
    file whose first video track is a PNG), then a track marked default, then the first.
    decord picks its own (FFmpeg's "best" stream): a file with several is read by PyAV
    (`_decord_wrong_for`)."""
    import av

    def rank(s) -> tuple:  # a moving picture first, then one marked default, then the first
        still = s.codec_context is not None and s.codec_context.name in STILL_PICTURE_CODECS
        return still, not s.disposition & av.stream.Disposition.default

    return min(_shown(container), key=rank, default=None)


STILL_PICTURE_CODECS = frozenset({"png", "bmp", "gif", "tiff", "webp", "jpegls", "qoi"})  # (a cover's, in a track)


def _shown(container) -> list:
    """The video streams that are no cover picture (`attached_pic`)."""
    import av

    return [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]


def open_container(source):
    """`av.open` for reading. The container's and streams' tags (which rayvid never uses)
    are decoded leniently: PyAV decodes them as UTF-8 when it opens a file, and a tag in
    another encoding (Latin-1, as older cameras and tools write) raised UnicodeDecodeError,
    a ValueError that is no FFmpeg error, on a video that decodes fine."""
    import av

    return av.open(source, metadata_errors="replace")


def _demux(container, stream) -> Iterator:
    """`container.demux(stream)`, ended quietly where PyAV fails at the end of it: a
    container that adds a stream while it is read (an MPEG-TS packet on a PID no program
    lists, as a damaged or spliced capture has) made PyAV raise IndexError when it flushed
    that stream, which it never listed, after every packet of ours."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except (StopIteration, IndexError):
            return
        yield packet


# The bytes of a key packet that say whether a decoder can start there (its first NAL
# units: a recovery point's SEI, then the first slice's header)
KEY_HEAD_BYTES = 4096
WALK_BACK_KEYS = 64  # key frames read back from one found no place to start, first round


def nal_length_size(extradata: Optional[bytes]) -> int:
    """H.264 in MP4/Matroska (avcC extradata): the bytes of each NAL unit's length; 0 where
    NAL units are delimited by start codes (Annex B: MPEG-TS, raw streams)."""
    return (extradata[4] & 3) + 1 if extradata and len(extradata) > 4 and extradata[0] == 1 else 0


def starts_pictures(data: bytes, length_size: int) -> Optional[bool]:
    """Whether an H.264 packet flagged key is a picture a decoder can start from: an IDR,
    or an I picture (an open GOP's), not a P picture with a recovery-point SEI (x264's
    `intra-refresh`, low-latency cameras: FFmpeg shows nothing after a seek there until the
    refresh has swept the picture, so frames counted on were never shown), nor one whose
    slices are I and P (a refresh by slices). None where the bytes do not say (no slice
    header in them)."""
    units, i = [], 0
    if length_size:
        while i + length_size < len(data):
            n = int.from_bytes(data[i:i + length_size], "big")
            units.append(data[i + length_size:i + length_size + max(n, 0)])
            i += length_size + max(n, 1)
    else:
        units = [u.lstrip(b"\0") for u in data.split(b"\0\0\1")]
    intra = None
    for unit in units:
        if not unit:
            continue
        kind = unit[0] & 0x1F
        if kind == 5:
            return True
        if kind in (1, 2):  # a slice (or its partition A): its header says its type
            bits = "".join(f"{b:08b}" for b in unit[1:9].replace(b"\0\0\3", b"\0\0"))
            values, at = [], 0
            for _ in range(2):  # first_mb_in_slice, slice_type: Exp-Golomb
                zeros = len(bits) - len(bits[at:].lstrip("0")) - at
                if at + 2 * zeros + 1 > len(bits):
                    return intra
                values.append(int(bits[at + zeros:at + 2 * zeros + 1], 2) - 1)
                at += 2 * zeros + 1
            if values[1] % 5 not in (2, 4):  # not I, SI
                return False
            intra = True
    return intra


def _reason(e: BaseException) -> str:
    """What FFmpeg says went wrong, without the file name PyAV appends."""
    return getattr(e, "strerror", None) or _first_line(e)


class _Sparse:
    """A file read the way a sparse file should be for demuxing: the holes (the media data
    of a partial copy that was never fetched) come back as zeros found with
    lseek(SEEK_DATA/SEEK_HOLE), never read from the file system, which zero-fills every
    page of them (measured: 5.0 s to demux a 1.9 GB partial copy read plainly). Where the
    file system cannot say, every byte is read: the same bytes, slower."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)
        self.size, self.pos = os.fstat(self.fd).st_size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        parts = []
        while n > 0:
            part = self._read(n)
            parts.append(part)
            n -= len(part)
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def _read(self, n: int) -> bytes:
        """Up to n bytes from self.pos: zeros to the end of a hole, or data to its end."""
        data = hole = self.pos  # no SEEK_DATA: read
        if hasattr(os, "SEEK_DATA"):
            try:
                data = os.lseek(self.fd, self.pos, os.SEEK_DATA)
                hole = os.lseek(self.fd, self.pos, os.SEEK_HOLE) if data == self.pos else data
            except OSError as e:  # ENXIO: a hole to the end; anything else: read
                data = self.size if e.errno == errno.ENXIO else self.pos
        if data > self.pos:
            out = bytes(min(n, data - self.pos))  # calloc'd: no page is touched
        else:
            out = os.pread(self.fd, min(n, hole - self.pos) if hole > self.pos else n, self.pos)
            if not out:
                raise EOFError(f"the file ended at byte {self.pos} of {self.size}")
        self.pos += len(out)
        return out

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence] + int(offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def __enter__(self) -> "_Sparse":
        return self

    def __exit__(self, *_) -> None:
        os.close(self.fd)


class _ByRank:
    """Frames that share a timestamp (`Probe.shared_pts`), told apart by their rank: the
    k-th packet (or frame out) with pts p is the k-th frame of the sorted `pts` at p; None
    for a pts the probe does not have, or one seen more often than it has."""

    def __init__(self, pts: np.ndarray):
        self.pts, self.seen = pts, {}

    def next(self, p) -> Optional[int]:
        if p is None:
            return None
        rank = self.seen[p] = self.seen.get(p, -1) + 1
        i = int(np.searchsorted(self.pts, p)) + rank
        return i if i < len(self.pts) and self.pts[i] == p else None


class _Walk:
    """How the PyAV decoder reaches the kept frames (`keep`, ascending): which key frame to
    seek to before reading the next packet, and when to stop feeding packets and drain.
    `FrameReader._pyav_frames` follows it while decoding; `plan_ranges` follows it over
    the index alone to know which packets that decoding will read."""

    STOP = -1  # nothing more is wanted

    def __init__(self, keep: np.ndarray, keyframes: np.ndarray):
        self.keep = keep
        self.key_of = np.maximum.accumulate(np.where(keyframes, np.arange(len(keyframes)), 0))
        self.unfed = np.zeros(len(keyframes), dtype=bool)  # kept frames whose packet was not read
        self.unfed[keep] = True
        self.first_unfed = 0  # keep[first_unfed]: the earliest of them
        self.seen, self.last_seek, self.drained = -1, -1, False

    def seek(self) -> Optional[int]:
        """Before reading a packet: the key frame to seek to, STOP, or None (read on)."""
        if self.first_unfed < len(self.keep):
            # the next kept frame lies past a key frame not reached yet: jump there
            key = int(self.key_of[self.keep[self.first_unfed]])
            if self.drained or (key > self.seen + 1 and key > self.last_seek):
                self.last_seek, self.seen, self.drained = key, key - 1, False
                return key
            return None
        # every kept frame was fed (and, drained, has come out or never will)
        return self.STOP if self.drained else None

    def read(self, i: Optional[int]) -> bool:
        """After reading the packet of frame i (None: not a frame of the probe): whether
        nothing more is wanted before a seek, so the decoder drains the frames still
        inside it instead of being fed the rest of this group of pictures."""
        if i is not None:
            self.seen = max(self.seen, i)
            self.unfed[i] = False
            while self.first_unfed < len(self.keep) and not self.unfed[self.keep[self.first_unfed]]:
                self.first_unfed += 1
        if self.first_unfed == len(self.keep) or self.key_of[self.keep[self.first_unfed]] > self.seen + 1:
            self.drained = True
        return self.drained


def starting_keys(path: str, info: Probe, keep_of, fetch, gap_bytes: int = FETCH_GAP_BYTES,
                  whole: bool = False) -> tuple[Probe, bool]:
    """On a partial copy of an H.264 video: (the probe with the key frames a decoder cannot
    start from (`starts_pictures`) no longer key frames, whether the bytes the frames
    `keep_of(probe)` need are fetched). A partial copy holds the index, not the packets:
    the ranges decoding reads are fetched (`plan_ranges`, as `fetch_for` would), and the
    first KEY_HEAD_BYTES of each key frame a seek goes to (fetched where those ranges do
    not hold them) are read. An ordinary stream costs nothing more. Where one is no place
    to start, the key frames before it are read back to one that is (in rounds of
    WALK_BACK_KEYS, then four times as many each), and the seeks planned and fetched again
    from the key frames that are. With `whole` (clips over --keyframes: numbered over the
    video's key frames, as the local probe finds them), every key frame before it is read,
    at once. (Other codecs: unchanged, nothing fetched.)"""
    if info.codec != "h264" or info.pos is None:
        return info, False
    checked: set = set()

    def bad_of(keys: list, fetched: list = ()) -> list:
        # (their first bytes fetched where the ranges `fetched` do not hold them: a key frame
        # kept that no seek goes to, whose packet comes before the seek's landing in decode
        # order, read as zeros, "cannot tell", and stayed a key frame)
        heads = [(int(info.pos[k]), int(min(info.nbytes[k], KEY_HEAD_BYTES))) for k in keys]
        heads = [(at, n) for at, n in heads if not any(o <= at and at + n <= o + m for o, m in fetched)]
        if heads:
            fetch(heads)
        with open(path, "rb") as f:
            return [k for k in keys if starts_pictures(
                os.pread(f.fileno(), int(min(info.nbytes[k], KEY_HEAD_BYTES)), int(info.pos[k])), info.nal_length) is False]

    while True:
        keep = keep_of(info)
        if not len(keep):
            return info, False
        ranges = plan_ranges(path, info, keep, gap_bytes)
        fetch(ranges)
        walked = info.walked(keep)
        sought = [k for k in sorted(set(_Walk(walked, info.seek_keys).key_of[walked].tolist()) - {0} - checked)
                  if info.pos[k] >= 0]
        bad = bad_of(sought, ranges)
        checked.update(sought)
        if not bad:
            return info, True
        # back from each, to the nearest key frame that is a place to start: an intra-refresh
        # stream's recovery points back to their IDR, an MP4 without a sync table (every
        # frame a "key frame") back to its I picture; the nearest WALK_BACK_KEYS unchecked
        # ones at once, four times as many each round (a late segment of a long video read
        # the head of every earlier frame)
        found, bad = (max(bad),) if whole else bad, set(bad)
        step = len(info.keyframes) if whole else WALK_BACK_KEYS
        while True:
            keys = np.flatnonzero(info.keyframes)
            keys = keys[~np.isin(keys, list(bad))]
            earlier: set = set()
            for b in found:
                j = int(np.searchsorted(keys, b)) - 1
                for k in keys[max(j - step + 1, 0) : j + 1][::-1].tolist():
                    if k == 0 or k in checked or info.pos[k] < 0:
                        if whole:
                            continue
                        break  # a place to start (or as good as one: read, or nowhere to read)
                    earlier.add(k)
            if not earlier:
                break
            bad.update(bad_of(sorted(earlier)))
            checked.update(earlier)
            step *= 4
        keys = info.keyframes.copy()
        keys[list(bad)] = False
        info = replace(info, keyframes=keys)


def fetch_for(path: str, info: Probe, keep: np.ndarray, fetch, gap_bytes: int = FETCH_GAP_BYTES,
              fetched: bool = False) -> Probe:
    """On a partial copy (`mp4.index_only`): fetches the bytes of every packet that decoding
    the frames `keep` reads (`plan_ranges`; not where `starting_keys` has `fetched` them),
    then reads the rotation off the first decoded frame. Returns the probe with the rotation
    (and the displayed size) filled in."""
    import av

    if not fetched:
        fetch(plan_ranges(path, info, keep, gap_bytes))
    rotation, width, height, mirror = 0, info.width, info.height, None
    with open_container(path) as container:
        stream = video_stream(container)
        key = int(_Walk(keep, info.seek_keys).key_of[keep[0]])
        if key > 0:
            _seek(container, stream, info, key)
        for packet in _demux(container, stream):
            try:
                frames = [*packet.decode(), *stream.codec_context.decode(None)]
            except av.FFmpegError:
                break
            if frames:  # as stored; the probe's size may be 0 when FFmpeg had no frame to look at
                rotation, width, height = right_angle(frames[0].rotation), frames[0].width, frames[0].height
                mirror = display_matrix(frames[0])
                break
    if (rotation // 90) % 2:
        width, height = height, width
    return replace(info, rotation=rotation, width=int(width), height=int(height), mirror=mirror)


def plan_ranges(path: str, info: Probe, keep: np.ndarray, gap_bytes: int = FETCH_GAP_BYTES) -> list:
    """The byte ranges [(offset, length)] of every packet that decoding the frames `keep`
    of the partial copy `path` (`mp4.index_only`, probed as `info`) reads
    (`FrameReader._pyav_frames`), from its index alone.

    The decoder reads packets in decode order from where each of its seeks lands (to the
    key frame before the next kept frame; tried here on the copy: the index alone decides
    where) until its drain rule stops it; the same `_Walk` is followed here over the
    probe's decode order, without decoding. Each run of packets it reads becomes a byte range;
    ranges less than `gap_bytes` apart are fetched as one. Dense sampling is one range from the
    segment's lead-in to its last frame; key frames only are the key frames' packets
    (with `gap_bytes` 0, which the tests use to check that nothing else is read)."""
    n = len(info.pts)
    walk = _Walk(info.walked(keep), info.seek_keys)
    index_of = {int(p): i for i, p in enumerate(info.pts)}
    by_rank = np.argsort(info.order)  # the frame whose packet has each decode rank
    landing: dict[int, int] = {}  # key frame -> decode rank where a seek to it lands
    with open_container(path) as container:
        stream = video_stream(container)
        for key in np.unique(walk.key_of[keep]).tolist():
            if key == 0:  # as _pyav_frames: no seek, from the first packet
                landing[key] = 0
                continue
            _seek(container, stream, info, key)
            first = next((p for p in _demux(container, stream) if p.size), None)
            land = index_of.get(first.pts if first is not None else None, key)
            landing[key] = min(int(info.order[land]), int(info.order[key]))
    # the decoder's walk over decode ranks: the runs of packets it reads between seeks
    runs, rank = [[0, -1]], 0
    while (key := walk.seek()) != walk.STOP:
        if key is not None:
            rank = landing[key]
            runs.append([rank, rank - 1])
        if rank >= n:
            break
        runs[-1][1] = rank
        walk.read(int(by_rank[rank]))
        rank += 1
    runs = sorted(r for r in runs if r[1] >= r[0])
    ranges = []
    for lo, hi in runs:
        frames = by_rank[lo : hi + 1]
        pos, nbytes = info.pos[frames], info.nbytes[frames]
        if info.lead_in:  # lead-in packets among those read (from the file's start: those before too)
            read = (info.lead_before > lo) & (info.lead_before <= hi) | (info.lead_before == 0) & (lo == 0)
            pos, nbytes = np.concatenate([pos, info.lead_pos[read]]), np.concatenate([nbytes, info.lead_nbytes[read]])
        if (pos < 0).any():  # the container did not say where: everything
            ranges = [[0, 2**62]]
            break
        start, stop = int(pos.min()), int((pos + nbytes).max())
        if ranges and start - ranges[-1][1] < gap_bytes:
            ranges[-1] = [min(ranges[-1][0], start), max(ranges[-1][1], stop)]
        else:
            ranges.append([start, stop])
    return [(start, stop - start) for start, stop in ranges]


def _seek(container, stream, info: Probe, key: int) -> None:
    """Seeks to key frame `key` (or the nearest one before it, by the container's index)."""
    import av

    try:
        container.seek(int(info.pts[key]), stream=stream, backward=True, any_frame=False)
    except av.FFmpegError as e:  # FFmpeg's errno (EPERM, EIO) says nothing of access or disks here
        raise VideoError(f"cannot seek to frame {key}: the container's index is damaged (FFmpeg: {_reason(e)})") from None


def right_angle(rotation) -> int:
    """The display rotation rayvid applies, in degrees: a multiple of 90 (within a degree),
    as FFmpeg's command line turns it, else 0: frames as stored (FFmpeg's command line turns
    them by that angle, their corners cut; `// 90` turned -45 degrees a quarter turn, 135
    another)."""
    if not rotation:
        return 0
    quarters = round(float(rotation) / 90)
    return int(quarters * 90) if abs(float(rotation) - quarters * 90) <= 1 else 0


def upright(img: np.ndarray, rotation, matrix: Optional[np.ndarray] = None) -> np.ndarray:
    """A decoded image turned as the container's display matrix says (`frame.rotation`;
    `matrix`, FFmpeg's 3x3 display matrix, where it also mirrors: `display_matrix`), as
    FFmpeg's command line shows it (its autorotate: a quarter turn with a mirror is a
    transpose, a half turn's mirrors are flips, a mirror with no turn a vertical flip)."""
    turns = (right_angle(rotation) // 90) % 4
    if matrix is not None:
        a, c, d = int(matrix[0]), int(matrix[3]), int(matrix[4])
        if turns == 0:
            img = img[::-1] if d < 0 else img
        elif turns == 3:  # a quarter turn clockwise
            img = img.transpose(1, 0, 2) if c > 0 else np.rot90(img, k=-1)
        elif turns == 1:  # counterclockwise
            img = np.rot90(img, k=-1)[::-1] if c < 0 else np.rot90(img, k=1)
        else:
            img = img[:, ::-1] if a < 0 else img
            img = img[::-1] if d < 0 else img
        return np.ascontiguousarray(img)
    return np.ascontiguousarray(np.rot90(img, k=turns)) if turns else img


def display_matrix(frame) -> Optional[np.ndarray]:
    """The display matrix that comes with a decoded frame where it mirrors the picture (a
    negative determinant: `-display_hflip`, a front camera's), else None (its rotation
    alone is `frame.rotation`)."""
    for data in frame.side_data:
        if str(getattr(data.type, "name", data.type)).endswith("DISPLAYMATRIX"):
            m = np.frombuffer(bytes(data), dtype=np.int32)
            if len(m) >= 9 and int(m[0]) * int(m[4]) - int(m[1]) * int(m[3]) < 0:
                return m[:9].copy()
    return None


def _decord_wrong_for(info: "Probe") -> str:
    """Why decord would give this video's frames wrong ("" where it reads them exactly)."""
    if DECORD_WRONG_CONTAINERS & set(info.container.split(",")):
        return f"{info.container}: its frames come a key-frame interval late"
    if info.lead_in:
        return "packets before its first shown frame (a trim or a capture): it counts them as frames"
    if info.joined:
        return "parts joined with their clocks restarting"
    if info.repeated:
        return "frames that share a timestamp"
    if info.mirrored:
        return "a mirroring display matrix"
    if info.shown_streams > 1:  # (FFmpeg's "best" stream, by how many frames it saw: maybe not `video_stream`'s)
        return f"{info.shown_streams} video streams: it may decode another one"
    if info.rotation and "mov" not in info.container.split(","):
        # (it turns MP4/MOV frames by their display matrix, not Matroska's: sideways frames)
        return f"a display rotation in {info.container}"
    return ""


class _Untrusted(Exception):
    """decord cannot give exact frames for this file: use PyAV instead."""


class FrameReader:
    """Decodes local files; runs inside the decode child process (see `decode.Decoder`)."""

    def __init__(
        self,
        size: tuple[int, int],
        every: int = 1,
        fps: Optional[float] = None,
        keyframes: bool = False,
        decoder: str = "auto",
        threads: int = 1,
        large_source_threads: int = 0,
        large_source_pixels: int = LARGE_SOURCE_PIXELS,
        batch_frames: int = 64,
        batch_bytes: int = 32 * 2**20,
        skip_similar: Optional[float] = None,
        decord_max_bytes: int = DECORD_MAX_BYTES,
        clip_len: int = 0,
        clip_stride: int = 0,
        fetch_gap_bytes: int = FETCH_GAP_BYTES,
    ):
        import av  # noqa: F401 - heavy imports: only inside the stage, once per process
        import decord

        if decoder not in ("auto", "decord", "pyav"):
            raise ValueError(f"unknown decoder {decoder!r}")
        self._decord = decord
        self.height, self.width = int(size[0]), int(size[1])
        self.every, self.fps, self.keyframes = every, fps, keyframes
        self.fetch_gap_bytes = int(fetch_gap_bytes)
        self.decoder = decoder
        self.threads = max(1, int(threads))
        # decord's threads for sources of LARGE_SOURCE_PIXELS and more (0: `threads`)
        self.large_source_threads = max(self.threads, int(large_source_threads))
        self.large_source_pixels = int(large_source_pixels)
        self.decord_threads = 0  # those of the last decord reader, for tests
        frame_bytes = self.height * self.width * 3
        self.skip_similar = skip_similar
        self.decord_max_bytes = decord_max_bytes
        self.decoded = 0  # frames PyAV decoded (kept or not), for tests and benchmarks
        self._mirror = None  # the mirroring display matrix of the video PyAV decodes (its probe's)
        self.fed = 0  # packets PyAV's decoder was given (skipped non-reference ones too)
        self.chunk = max(1, min(int(batch_frames), int(batch_bytes) // frame_bytes))
        self.batch_frame_bytes = self.chunk * frame_bytes  # the most a batch of frames holds
        self.clip_len = int(clip_len)
        self.clip_stride = int(clip_stride) or self.clip_len

    def read(self, path: str, uri: str, segment: int = 0, n_segments: int = 1,
             start_s: float = -math.inf, end_s: float = math.inf, after: int = -1,
             emitted: int = 0, force_pyav: bool = False, note: str = "",
             on_probe=None, partial: bool = False, on_fetch=None) -> Iterator[dict]:
        """Frame batches of the frames with start_s <= pts time < end_s and index > after,
        then the segment's terminal row (whose n_frames adds `emitted`, the frames an
        earlier attempt already delivered). With `partial`, `path` is a sparse copy holding
        only the container's index (`mp4.index_only`): `on_fetch([(offset, length)])` must
        fetch the byte ranges this segment reads before it returns. Whatever PyAV raises on
        a damaged file ends the segment with an error row, as does any error it raises
        after frames were sent (the row counts them)."""
        import av

        state = {"emitted": 0, "stage": "decode", "decoder": "", "info": None, "note": note,
                 "segment": segment, "n_segments": n_segments, "force_pyav": force_pyav or partial}
        done = lambda error: end_row(  # noqa: E731
            uri, segment, n_segments, (self.height, self.width), emitted + state["emitted"],
            error, state["stage"], _decoder_label(state), state["info"], unit="clips" if self.clip_len else "frames")
        try:
            if os.path.getsize(path) == 0:
                raise VideoError("empty file (0 bytes)")
            info = state["info"] = probe(path, partial=partial)
            fetched = False
            if partial:  # (a local file's probe read its key packets)
                info, fetched = starting_keys(path, info, lambda i: self._segment_plan(i, start_s, end_s, after)[2],
                                              on_fetch, self.fetch_gap_bytes, whole=bool(self.keyframes) and self.clip_len > 0)
                state["info"] = info
            kept, starts, keep = self._segment_plan(info, start_s, end_s, after)
            if partial and len(keep):
                info = state["info"] = fetch_for(path, info, keep, on_fetch, self.fetch_gap_bytes, fetched)
            if on_probe is not None:
                on_probe(info)
            got = state["got"] = np.zeros(len(info.pts), dtype=bool)
            similar = Similarity(self.skip_similar) if self.skip_similar is not None else None
            clips = Clips(self.clip_len, kept, starts, info.times, info.fps) if self.clip_len else None
            for idx, frames in self._frames(path, info, keep, state):
                got[idx] = True
                if clips is not None:
                    for batch in self._clip_batches(uri, state, clips.add(idx, frames)):
                        yield batch
                        state["emitted"] += len(batch["frame_index"])
                    continue
                batch = self._frame_batch(uri, state, idx, info.times[idx], frames)
                if similar is not None:
                    similar.mark(batch)
                yield batch
                state["emitted"] += len(idx)
            if clips is not None:
                for batch in self._clip_batches(uri, state, clips.finish()):
                    yield batch
                    state["emitted"] += len(batch["frame_index"])
            problems = []
            lost = keep[~got[keep]]
            if len(lost):
                problems.append(f"{len(lost)} of {len(keep)} frames lost to damaged data "
                                f"(frame {_ranges(lost)})")
            if info.skipped and end_s == math.inf:  # (the file's, said once: by its last segment)
                problems.append(_skipped_text(info.skipped))
            if info.listed > len(info.pts) and end_s == math.inf:
                problems.append(f"truncated: the container lists {info.listed} frames, "
                                f"the file holds {len(info.pts)}")
            elif info.stated_s and end_s == math.inf:
                problems.append(f"truncated: the container says {info.stated_s:.2f} s, the file holds "
                                f"{info.held_s:.2f} s")
            if problems:
                raise VideoError("; ".join(problems))
        except (VideoError, RuntimeError, EOFError, self._decord.DECORDError, OSError) as e:
            yield done(e)
            return
        except av.FFmpegError as e:  # InvalidDataError and the like: ValueErrors, not OSErrors
            yield done(VideoError(f"cannot read video: {_reason(e)}"))
            return
        yield done(None)

    def _segment_plan(self, info: Probe, start_s: float, end_s: float, after: int) -> tuple:
        """(clips' first frames, their starts, frames kept) of a segment; clips None without --clip-len."""
        if self.clip_len:  # (the clips this segment makes, and the frames they hold)
            kept, starts = self._clip_plan(info, start_s, end_s, after)
            return kept, starts, Clips.frames_of(kept, starts, self.clip_len)
        return None, None, self._keep(info, start_s, end_s, after)

    def plan(self, path: str, start_s: float = -math.inf, end_s: float = math.inf) -> Optional[list]:
        """The byte ranges [(offset, length)] that `read` of the partial copy `path` (holding
        only its index) will fetch for the frames with start_s <= pts time < end_s, worked out
        ahead (`plan_ranges`); None where the index cannot say (`read` finds out, and reports,
        why)."""
        import av

        try:
            info = probe(path, partial=True)
            keep = self._keep(info, start_s, end_s, -1)
            return plan_ranges(path, info, keep, self.fetch_gap_bytes) if len(keep) else []
        except (VideoError, RuntimeError, EOFError, OSError, av.FFmpegError):
            return None

    def _sampled(self, info: Probe) -> np.ndarray:
        """Indices of the video's frames its sampling keeps."""
        return sample_indices(info.times, self.every, self.fps, info.keyframes if self.keyframes else None)

    def _clip_plan(self, info: Probe, start_s: float, end_s: float, after: int) -> tuple:
        """(the video's kept frames, the positions in them of the clips this segment makes:
        those whose first frame has start_s <= pts time < end_s and index > after)."""
        keep = self._sampled(info)
        starts = clip_starts(len(keep), self.clip_len, self.clip_stride)
        first = keep[starts]
        return keep, starts[(info.times[first] >= start_s) & (info.times[first] < end_s) & (first > after)]

    def _keep(self, info: Probe, start_s: float, end_s: float, after: int) -> np.ndarray:
        """Indices of the frames to deliver: sampled, start_s <= pts time < end_s, > after;
        for clips, the frames of the clips that start there (`after`: a clip's first frame),
        a segment's last clips reading on past end_s."""
        if self.clip_len:
            return Clips.frames_of(*self._clip_plan(info, start_s, end_s, after), self.clip_len)
        keep = self._sampled(info)
        return keep[(info.times[keep] >= start_s) & (info.times[keep] < end_s) & (keep > after)]

    def _frames(self, path: str, info: Probe, keep: np.ndarray, state: dict):
        """(indices, frames) batches from the decoder that suits this file."""
        if len(keep) == 0:
            return
        # decord only from frame 0 (its seeks are not exact); later segments seek with PyAV
        first = int(keep[0]) == 0 or (state["segment"] == 0 and not state["force_pyav"])
        # decord decodes and resizes every frame up to the last one kept: only for dense
        # sampling; sparse sampling (--every, --fps, --keyframes) goes to PyAV, which skips
        dense = len(keep) == int(keep[-1]) - int(keep[0]) + 1
        # (decord counts lead-in packets as frames: it gives the shown frames the wrong
        # indices and repeats the last one for each, measured on a trimmed MP4)
        suits = self.decoder == "auto" and info.codec in DECORD_CODECS and dense and not _decord_wrong_for(info)
        small = os.path.getsize(path) <= self.decord_max_bytes
        if self.decoder == "decord" and first and not state["force_pyav"]:
            wrong = _decord_wrong_for(info)
            if wrong:  # (it gave another frame's pictures, or failed the run: an error row instead)
                raise VideoError(f"--decoder decord cannot read this video exactly ({wrong}): "
                                 f"use --decoder auto or pyav")
        use_decord = first and not state["force_pyav"] and (self.decoder == "decord" or (suits and small))
        if first and not state["force_pyav"] and suits and not small:
            state["note"] = _join(state["note"], "large file")
        if use_decord:
            state["decoder"] = "decord"
            try:
                for out in self._decord_frames(path, info, keep):
                    yield out
                return
            except (_Untrusted, RuntimeError, self._decord.DECORDError) as e:
                if self.decoder == "decord":
                    if isinstance(e, _Untrusted):  # (an exception of its own: it ended the run)
                        raise VideoError(f"--decoder decord: {e}: use --decoder auto or pyav") from None
                    raise
                done = np.flatnonzero(state["got"])
                if len(done):  # go on with PyAV after the last frame decord delivered
                    keep = keep[keep > done[-1]]
                    state["note"] = _join(state["note"], f"decord failed after frame {done[-1]}: {_first_line(e)}")
                else:
                    state["note"] = _join(state["note"], f"decord: {_first_line(e)}")
                state["decoder"] = "decord+pyav" if len(done) else "pyav"
                if len(keep):
                    yield from self._pyav_frames(path, info, keep, state)
                return
        state["decoder"] = "pyav"
        yield from self._pyav_frames(path, info, keep, state)

    def _decord_frames(self, path: str, info: Probe, keep: np.ndarray):
        large = info.width * info.height >= self.large_source_pixels
        self.decord_threads = self.large_source_threads if large else self.threads
        try:
            vr = self._decord.VideoReader(
                path, ctx=self._decord.cpu(0), width=self.width, height=self.height,
                num_threads=self.decord_threads,
            )
        except (RuntimeError, self._decord.DECORDError) as e:
            raise _Untrusted(f"cannot open: {_first_line(e)}") from None
        try:
            if len(vr) != len(info.pts):
                raise _Untrusted(f"decord counts {len(vr)} frames, the container {len(info.pts)}")
            if len(keep) == 0:
                return
            wanted = np.zeros(int(keep[-1]) + 1, dtype=bool)
            wanted[keep] = True
            idx_buf, frame_buf = np.zeros(0, np.int64), None
            # contiguous windows from frame 0: never a seek, so exact on every codec
            for start in range(0, len(wanted), self.chunk):
                stop = min(start + self.chunk, len(wanted))
                frames = vr.get_batch(list(range(start, stop))).asnumpy()
                if frames.shape[1:] != (self.height, self.width, 3):
                    raise _Untrusted(f"decord returned frames of shape {frames.shape[1:]}")
                sel = np.flatnonzero(wanted[start:stop])
                if len(sel) < len(frames):  # else every frame of the window: no copy
                    frames = frames[sel]
                if len(idx_buf):
                    idx_buf, frame_buf = np.concatenate([idx_buf, sel + start]), np.concatenate([frame_buf, frames])
                else:
                    idx_buf, frame_buf = sel + start, frames
                while len(idx_buf) >= self.chunk or (stop == len(wanted) and len(idx_buf)):
                    yield idx_buf[: self.chunk], frame_buf[: self.chunk]
                    idx_buf, frame_buf = idx_buf[self.chunk :], frame_buf[self.chunk :]
        finally:
            del vr

    def _pyav_frames(self, path: str, info: Probe, keep: np.ndarray, state: dict):
        """Decodes only what the kept frames need: it seeks over every group of pictures
        that holds no kept frame (to the key frame before the next kept one), has FFmpeg
        skip non-reference frames that are not kept (nothing depends on them), stops
        feeding a group of pictures once its last kept frame's packet is in (a frame's
        references precede it in decode order, so draining the decoder then gives it out
        without decoding the frames after it), and converts and resizes kept frames only.
        Dense sampling decodes everything; one frame per key-frame interval decodes about
        one frame per interval."""
        import av

        index_of = {int(p): i for i, p in enumerate(info.pts)}
        self._mirror = info.mirror
        wanted = np.zeros(len(info.pts), dtype=bool)
        wanted[keep] = True
        done = np.zeros(len(info.pts), dtype=bool)
        walk = _Walk(info.walked(keep), info.seek_keys)
        found, idx_buf, frame_buf, damaged = 0, [], [], 0
        # After damage the decoder conceals: frames it outputs may show other frames' content
        # (measured on H.264 with garbage bytes), so every frame is dropped until a key frame
        # resyncs it; frames before that key frame in presentation order stay dropped.
        suspect, floor, dropped = False, 0, 0
        decoded, fed = 0, 0
        with open_container(path) as container:
            stream = video_stream(container)
            ctx = stream.codec_context
            # decode key frames only (after a lead-in, whose non-key frames frame 0 needs, from frame 1 on)
            nonkey_from = 1 if self.keyframes and info.lead_in else 0
            if self.keyframes and not nonkey_from:
                ctx.skip_frame = "NONKEY"
            # Per-packet skipping is exact only when the packet being decoded is the frame
            # the setting was made for: FFmpeg's own H.264/HEVC decoders without frame
            # threads (so they decode on one thread when skipping). Not libdav1d (AV1),
            # which decodes behind its input (measured: a kept frame lost).
            skip_nonref = (not self.keyframes and len(keep) < len(info.pts)
                           and info.codec in ("h264", "hevc") and not info.output_order)
            if info.output_order:  # every frame decoded, in order: the k-th is frame k
                ctx.skip_frame = "DEFAULT"
                index_of, decoded_in_order = {}, iter(range(len(info.pts)))
            # frames that share a timestamp (`Probe.shared_pts`): a packet is the next frame of
            # its pts in decode order, so the decoder drains once the packets of every frame up
            # to the last kept one (and its pts' others) are in (a partial copy holds no more);
            # a frame out is the next one shown at its pts (a damaged one dropped costs no other)
            shared = info.shared_pts
            if shared:
                packet_at, frame_at = _ByRank(info.pts), _ByRank(info.pts)
            ctx.thread_count = 1 if skip_nonref else self.threads
            packets = _demux(container, stream)
            while found < len(keep):
                key = walk.seek()
                if key == walk.STOP:
                    break
                if key is not None:
                    try:
                        _seek(container, stream, info, key)
                    except VideoError:  # the frames before it are good: deliver them
                        if idx_buf:
                            yield np.array(idx_buf, dtype=np.int64), np.stack(frame_buf)
                        raise
                    packets = _demux(container, stream)
                    if suspect:  # the decoder starts afresh at a key frame
                        suspect, floor = False, key
                try:
                    packet = next(packets, None)
                except av.FFmpegError as e:  # the frames before are good: deliver them
                    if idx_buf:
                        yield np.array(idx_buf, dtype=np.int64), np.stack(frame_buf)
                    where = f" past frame {walk.seen}" if walk.seen >= 0 else ""
                    raise VideoError(f"cannot read the video{where}: the demuxer failed "
                                     f"(FFmpeg: {_reason(e)})") from None
                if packet is None:
                    break
                i = index_of.get(packet.pts)
                if shared:
                    i = packet_at.next(packet.pts)
                if skip_nonref and i is not None:
                    ctx.skip_frame = "DEFAULT" if wanted[i] else "NONREF"
                if suspect and packet.is_keyframe and i is not None:
                    suspect, floor = False, i
                # (by their order: to the end, or every kept frame)
                drain = walk.read(i) and (shared or not info.output_order)
                fed += 1
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    damaged += 1
                    suspect = True
                    frames = []
                if drain:
                    try:
                        frames = [*frames, *ctx.decode(None)]
                    except av.FFmpegError:
                        damaged += 1
                        suspect = True
                if nonkey_from and found >= nonkey_from:
                    ctx.skip_frame, nonkey_from = "NONKEY", 0
                for frame in frames:
                    decoded += 1
                    if shared:  # by its timestamp, and its rank among the frames shown at it
                        i = frame_at.next(frame.pts)
                    else:
                        i = next(decoded_in_order, None) if info.output_order else index_of.get(frame.pts)
                    if frame.is_corrupt:
                        damaged += 1
                        suspect = True
                    if i is None or not wanted[i] or done[i]:
                        continue
                    if damaged and (suspect or i < floor):
                        dropped += 1
                        continue
                    done[i] = True
                    found += 1
                    idx_buf.append(i)
                    frame_buf.append(self._upright(frame))
                    if len(idx_buf) == self.chunk:
                        yield np.array(idx_buf, dtype=np.int64), np.stack(frame_buf)
                        idx_buf, frame_buf = [], []
        self.decoded += decoded
        self.fed += fed
        if idx_buf:
            yield np.array(idx_buf, dtype=np.int64), np.stack(frame_buf)
        if damaged or dropped:
            state["note"] = _join(state["note"], f"{damaged} damaged packets, {dropped} concealed frames dropped")

    def _upright(self, frame) -> np.ndarray:
        """RGB at model size, turned (and mirrored) as the container's display matrix says."""
        angle = right_angle(frame.rotation)
        turns = (angle // 90) % 4
        if turns % 2:  # 90/270: resize to the transposed size, then rotate
            img = frame.to_ndarray(width=self.height, height=self.width, format="rgb24", interpolation="BILINEAR")
        else:
            img = frame.to_ndarray(width=self.width, height=self.height, format="rgb24", interpolation="BILINEAR")
        # (the probe's matrix, one per stream: a frame's side data, once read, keeps the frame
        # alive till the garbage collector's next pass; read on every frame, 76 MB in 3 s)
        return upright(img, angle, self._mirror)

    def _clip_batches(self, uri, state, clips: list) -> Iterator[dict]:
        """Rows of clips (frame: [N, H, W, 3]), a bounded number per batch."""
        per = max(1, self.chunk // self.clip_len)
        for i in range(0, len(clips), per):
            part = clips[i : i + per]
            start = np.array([c[0] for c in part], np.int64)
            batch = self._frame_batch(uri, state, start, np.array([c[2] for c in part]),
                                      np.stack([c[4] for c in part]))
            batch.update(clip_columns(start, np.array([c[1] for c in part], np.int64),
                                      np.array([c[2] for c in part]), np.array([c[3] for c in part])))
            yield batch

    def _frame_batch(self, uri, state, idx, ts, frames) -> dict:
        n = len(idx)
        empty = np.array([""] * n, dtype=object)
        return {
            "video_uri": np.array([uri] * n, dtype=object),
            "segment": np.full(n, state["segment"], dtype=np.int32),
            "n_segments": np.full(n, state["n_segments"], dtype=np.int32),
            "kind": np.array([KIND_FRAME] * n, dtype=object),
            "frame_index": idx.astype(np.int64),
            "timestamp_s": ts.astype(np.float64),
            "frame": frames,
            "n_frames": np.zeros(n, dtype=np.int64),
            "error_stage": empty,
            "error_type": empty,
            "message": empty,
            "decoder": empty,
            "codec": empty,
            "width": np.zeros(n, dtype=np.int64),
            "height": np.zeros(n, dtype=np.int64),
            "fps": np.zeros(n),
            "duration_s": np.zeros(n),
            "reused_from": np.full(n, -1, dtype=np.int64),
            "bytes_read": np.zeros(n, dtype=np.int64),
        }


def clip_columns(start, end, start_s, end_s) -> dict:
    """The clip columns of `--clip-len` rows (schema.clip_fields)."""
    return {"clip_start_frame": start, "clip_end_frame": end, "start_s": start_s, "end_s": end_s}


def clip_starts(count: int, n: int, stride: int) -> np.ndarray:
    """Where a video's clips start, as positions in its kept frames (0..count-1): every
    `stride` kept frames while a clip of `n` fits; then one more, padded at the video's end,
    where kept frames after the last full clip's end would be in none (stride > n leaves the
    frames between clips out, as everywhere). Of the whole video, so a video's clips are the
    same however it is cut into segments."""
    if count <= 0:
        return np.zeros(0, np.int64)
    starts = np.arange(0, count - n + 1, stride, dtype=np.int64)
    if not len(starts):
        return np.zeros(1, np.int64)
    after = starts[-1] + stride
    if after < count and count - 1 > starts[-1] + n - 1:
        starts = np.r_[starts, after]
    return starts


class Clips:
    """`--clip-len N [--clip-stride S]`: the kept frames of one segment -> its clips.

    A clip is N consecutive kept frames; clips start every S kept frames of the video
    (`clip_starts`: S = N side by side), and a segment makes the clips that start in it,
    reading on into the next segment's frames for its last ones (a clip cut at a segment's
    end was padded, and a motion model saw the cut as still footage). The video's last clip
    is padded by repeating its last frame, so every kept frame is in a clip. A clip's row:
    (clip_start_frame, clip_end_frame (its last real frame), start_s (the first frame's
    time), end_s (the time of the video frame after its last one, so clips tile the time
    line), frames [N, H, W, 3]). A frame lost to damaged data leaves its clip shorter (padded).
    """

    def __init__(self, n: int, keep: np.ndarray, starts: np.ndarray, times: np.ndarray, fps: float = 0.0):
        """`keep`: the video's kept frame indices; `starts`: the positions in it of the clips
        this segment makes."""
        self.n, self.times = n, times
        self.first = keep[starts]
        self.last = keep[np.minimum(starts + n, len(keep)) - 1]
        self.frame = 1.0 / fps if fps > 0 else 0.0  # a one-frame video's one frame lasts this long
        self.next = 0  # the next clip to make
        self.held: dict = {}  # frame index -> frame, of clips not made yet

    @staticmethod
    def frames_of(keep: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
        """The kept frames the clips starting at `starts` (positions in `keep`) hold, sorted."""
        if not len(starts):
            return keep[:0]
        positions = (starts[:, None] + np.arange(n)).ravel()
        return keep[np.unique(positions[positions < len(keep)])]

    def add(self, idx: np.ndarray, frames: np.ndarray) -> list:
        out = []
        for i, frame in zip(idx.tolist(), frames):
            if self.next >= len(self.first) or i < self.first[self.next]:
                continue
            self.held[i] = frame
            while self.next < len(self.first) and self.last[self.next] <= i:
                out += self._make()
        return out

    def finish(self) -> list:
        out = []
        while self.next < len(self.first):  # (their last frames lost to damaged data)
            out += self._make()
        return out

    def _make(self) -> list:
        """The next clip's row: named by where it starts (its first frame, lost or not: a
        clip's frame_index is its own, and a retry resumes after it), ending at its last frame
        decoded; none where every frame of it was lost."""
        j = self.next
        self.next += 1
        mine = sorted(k for k in self.held if self.first[j] <= k <= self.last[j])
        frames = [self.held[k] for k in mine]
        if self.next < len(self.first):  # what no later clip holds goes
            for k in [k for k in self.held if k < self.first[self.next]]:
                del self.held[k]
        else:
            self.held.clear()
        if not mine:
            return []
        start, last = int(self.first[j]), mine[-1]
        t = self.times
        if last + 1 < len(t):
            end = t[last + 1]
        else:  # the video's last frame: to its duration (the probe's: one frame at the average rate)
            end = t[last] + (self.frame if self.frame else (t[last] - t[last - 1] if last else 0.0))
        return [(start, last, float(t[start]), float(end), np.stack(frames + [frames[-1]] * (self.n - len(frames))))]


class Similarity:
    """Content-adaptive frame skipping (`--skip-similar T`), within one segment.

    Each frame is reduced to a 16x16 grey thumbnail (block means of the model-size frame:
    sensor noise averages out, a moving object does not). A frame whose thumbnail differs
    from that of the last frame sent to the model by less than T (mean absolute difference,
    in 0..255 grey levels) is not inferred: its `reused_from` names that frame, whose
    prediction the committer copies, and its pixels are zeroed (they are not needed). The
    comparison is always with the last inferred frame, never the previous one, so slow
    drift adds up and triggers inference.
    """

    GRID = 16

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.ref: Optional[np.ndarray] = None
        self.ref_index = -1

    def thumbnail(self, frame: np.ndarray) -> np.ndarray:
        g = self.GRID
        h, w = (frame.shape[0] // g) * g, (frame.shape[1] // g) * g
        if h == 0 or w == 0:  # smaller than the grid: compare every pixel
            return frame.astype(np.float32).mean(axis=2)
        return frame[:h, :w].reshape(g, h // g, g, w // g, 3).mean(axis=(1, 3, 4), dtype=np.float32)

    def mark(self, batch: dict) -> None:
        for row, index in enumerate(batch["frame_index"]):
            thumb = self.thumbnail(batch["frame"][row])
            if self.ref is not None and float(np.abs(thumb - self.ref).mean()) < self.threshold:
                batch["reused_from"][row] = self.ref_index
                batch["frame"][row] = 0
            else:
                self.ref, self.ref_index = thumb, int(index)


def end_row(uri: str, segment: int, n_segments: int, size: tuple, emitted: int,
            error: Optional[BaseException], stage: str, decoder: str,
            info: Optional[Probe], tmpdir: str = "", unit: str = "frames") -> dict:
    """A segment's terminal row: how many frame rows it produced, the video's metadata, and
    why it stopped early, if it did (`unit`: what a row is, in its message: "clips" in a
    clip run)."""
    message = _message(error, emitted, tmpdir, unit) if error is not None else ""
    return {
        "video_uri": np.array([uri], dtype=object),
        "segment": np.array([segment], dtype=np.int32),
        "n_segments": np.array([n_segments], dtype=np.int32),
        "kind": np.array([KIND_END], dtype=object),
        "frame_index": np.array([-1], dtype=np.int64),
        "timestamp_s": np.array([math.nan]),
        "frame": np.zeros((1, size[0], size[1], 3), dtype=np.uint8),
        "n_frames": np.array([emitted], dtype=np.int64),
        "error_stage": np.array([stage if error is not None else ""], dtype=object),
        "error_type": np.array([_error_type(error)], dtype=object),
        "message": np.array([message], dtype=object),
        "decoder": np.array([decoder], dtype=object),
        "codec": np.array([info.codec if info else ""], dtype=object),
        "width": np.array([info.width if info else 0], dtype=np.int64),
        "height": np.array([info.height if info else 0], dtype=np.int64),
        "fps": np.array([info.fps if info else 0.0]),
        "duration_s": np.array([info.duration_s if info else 0.0]),
        "reused_from": np.array([-1], dtype=np.int64),
        "bytes_read": np.zeros(1, dtype=np.int64),
    }


def mark_failed(end: dict, error: BaseException, stage: str, tmpdir: str, unit: str = "frames") -> None:
    """Mark a terminal row (`end_row`) as failed with `error`, keeping its frame count; an
    error it already had stays in its message."""
    had = str(end["message"][0])  # says already how many frames were kept, if it is an error's
    message = _message(error, 0 if had else int(end["n_frames"][0]), tmpdir, unit)
    end["error_stage"][0], end["error_type"][0] = stage, _error_type(error)
    end["message"][0] = f"{message}; before that: {had}" if had else message


def _message(error: BaseException, emitted: int, tmpdir: str, unit: str = "frames") -> str:
    """An error row's message: the error, without credentials or the actor's temp dir,
    and how many frames (or clips) the segment delivered before it."""
    message = storage.describe(error)
    if tmpdir:
        message = message.replace(tmpdir, "<tmp>")
    if emitted:
        message += f" ({emitted} decoded {unit} kept)"
    return message


def _decoder_label(state: dict) -> str:
    return state["decoder"] + (f" ({state['note']})" if state["note"] else "")


def _ranges(indices: np.ndarray) -> str:
    """'3-7, 9' for [3, 4, 5, 6, 7, 9] (at most 5 ranges)."""
    runs, start = [], int(indices[0])
    for prev, cur in zip(indices[:-1], indices[1:]):
        if cur != prev + 1:
            runs.append((start, int(prev)))
            start = int(cur)
    runs.append((start, int(indices[-1])))
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:5])
    return text + (f" and {len(runs) - 5} more ranges" if len(runs) > 5 else "")


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


class VideoError(Exception):
    """A video that cannot be decoded; becomes an errors/ row, never a failed job."""


def _first_line(e: BaseException) -> str:
    # decord prefixes "[16:31:04] /github/workspace/src/...cc:486: " to its messages
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _error_type(error: Optional[BaseException]) -> str:
    if error is None:
        return ""
    error = storage.underlying(error)  # (an HTTP server's 403 or 500 is not NotFound: read again every run)
    if storage.stalled(error):  # (fsspec's FSTimeoutError, or its "not found", from aiohttp's timeout)
        return "TimeoutError"
    if isinstance(error, FileNotFoundError):
        return "NotFound"
    if isinstance(error, PermissionError) or storage.http_refused(error):
        return "PermissionDenied"
    return type(error).__name__
