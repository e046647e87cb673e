"""Decode stage: video URLs in, uint8 RGB frames at the model's input size out.

Input columns:  `video_uri`, and from the planning stage (segments.py) `segment`,
  `n_segments`, `start_s`, `end_s` (without them a row is the whole video) and
  `source_uri` (where to read the video from when that is not video_uri: a presigned URL).
Output columns: `video_uri: str`, `segment, n_segments: int32`, `kind: str`,
  `frame_index: int64`, `timestamp_s: float64`, `frame: uint8[H, W, 3]`, `n_frames: int64`,
  `error_stage: str`, `error_type: str`, `message: str`, the video's `decoder, codec:
  str`, `width, height: int64`, `fps, duration_s: float64`, and `reused_from: int64`
  (-1, or with --skip-similar the earlier frame whose prediction this one reuses; see
  `Similarity`), `bytes_read: int64` (0 on frame rows; on the terminal row, what the
  segment read from a remote store: its whole copy, or its partial one). With
  `--clip-len N` a row is a clip (`Clips`): `frame` is uint8[N, H, W, 3],
  `frame_index`/`timestamp_s` are its first frame's, and `clip_start_frame,
  clip_end_frame: int64`, `start_s, end_s: float64` say what it covers.
A segment yields batches of frame rows (`kind == "frame"`, bounded in frames and bytes),
then exactly one terminal row (`kind == "end"`, a zero `frame`) whose `n_frames` counts the
frame rows it produced, which carries the video's metadata, and whose error fields say why
it stopped early, if it did. A video that cannot be read is one terminal row per segment
with the error: data, not an exception.

The actor (`Decoder`) fetches each video and hands it to its own child process
(`serve`/`FrameReader`), which demuxes and decodes. A segment of a remote MP4/MOV gets a
partial copy instead of the whole file: the index first (`index_only`: the moov, and a
fragmented MP4's moofs), then the byte ranges the segment's packets occupy, which a
second child process (the planner: `plan_ranges`) works out while the decode child
decodes another video, and which the decode child checks before decoding (`fetch_for`).
A native crash or a hang costs one attempt at a segment (bounded by a timeout and retried
with PyAV from where it stopped), never the actor or the job. Frames come back through a
memory-mapped slot the two processes share (`_FrameSlot`), the other columns through a
socket.

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
  player shows them) and resizes with the same bicubic stretch as decord.
Frame indices and timestamps come from the probe: index i is the i-th frame in
presentation (pts) order, its time is (pts - stream start) x time_base, exact in float64.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import numpy as np

from rayvid import storage
from rayvid.errors import StorageUnavailable
from rayvid.schema import KIND_END, KIND_FRAME

log = logging.getLogger(__name__)

# Nodes labelled `rayvid.io/role=infer` (the GPU node types in cluster/) keep their CPUs for
# the inference actors: decode actors never land there, so they cannot starve the fixed
# GPU pool of the CPU each of its actors needs. Unlabelled nodes (a laptop) take anything.
INFER_NODE_LABEL = ("rayvid.io/role", "infer")


def resources(threads: int) -> dict:
    """Ray resources and placement of one decode actor, declared next to the stage."""
    key, value = INFER_NODE_LABEL
    return {"num_cpus": float(threads), "label_selector": {key: f"!{value}"}}


# Calls in hand per decode actor when the videos are remote: while one call's video is
# decoded, the next call copies its video to local disk (Decoder fetches outside the lock
# that keeps its one child to one video at a time), so no decoder waits on the network.
# Local videos need no fetch: one call at a time.
REMOTE_CALLS_PER_ACTOR = 2


# Where the model runs on the CPU, decoders and inference share the node's cores, and no
# fixed split of Ray's CPU count is right for every source and model. Decoding costs grow
# with the source's pixels, the model's do not: from HD sources up (LARGE_SOURCE_PIXELS) a
# decode actor there still holds one CPU but decodes with SHARED_NODE_THREADS threads, so
# it can take a core the model leaves idle; when the model needs the cores, Ray Data's
# backpressure stops it running ahead. decord with 2 threads, measured at model size: the
# same CPU per frame at 1080p (7.65 against 7.76 ms), 1.6x the frames per second; 1080p
# archive B end to end 96-100 frames/s against 85-89. Smaller sources keep one thread:
# at 360p, 2 threads cost 5% more CPU per frame and took cores from the model's start-up
# and steady state (MobileNetV3, archive B: 222-244 frames/s against 239-251; BENCHMARKS.md).
SHARED_NODE_THREADS = 2
LARGE_SOURCE_PIXELS = 1280 * 720


def threads_on(threads: int, shares_cores_with_inference: bool) -> int:
    """Decoder threads, for large sources, of a decode actor that holds `threads` CPUs."""
    return max(threads, SHARED_NODE_THREADS) if shares_cores_with_inference else threads


# Codecs decord 0.6 decodes exactly (sequential reads; tests/test_decode.py and
# bench/decord_matrix.py check each); anything else goes to PyAV. Measured: decord cannot
# open AV1; on VP9/WebM it once raised a decoder-thread error we could not reproduce, so VP9
# goes to PyAV too.
# decord buffers a file's compressed packets whole: above this size, PyAV decodes it
DECORD_MAX_BYTES = 256 * 2**20

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
    targets = np.arange(0, math.floor(last * fps + 1e-9) + 1, dtype=np.float64) / fps
    right = np.clip(np.searchsorted(ts, targets, side="left"), 0, n - 1)
    left = np.clip(right - 1, 0, n - 1)
    pick = np.where(np.abs(ts[left] - targets) <= np.abs(ts[right] - targets), left, right)
    return np.unique(pick).astype(np.int64)


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
    def seek_keys(self) -> np.ndarray:
        """The frames a reader may seek to: the key frames, where the container has an index
        to seek by; else frame 0 alone (`UNSEEKABLE_CONTAINERS`: read from the start)."""
        if UNSEEKABLE_CONTAINERS & set(self.container.split(",")):
            return np.arange(len(self.keyframes)) == 0
        return self.keyframes
    # where frame i's packet lies: byte offset (-1: unknown), size, rank in decode order
    pos: Optional[np.ndarray] = None
    nbytes: Optional[np.ndarray] = None
    order: Optional[np.ndarray] = None


def probe(path: str, partial: bool = False) -> Probe:
    """With `partial` (a copy holding only the container's index, `index_only`) nothing is
    decoded (the rotation, which the first decoded frame says, is 0 until `fetch_for`),
    and key frames are the index's (FFmpeg's parser judges them from the packets' bytes,
    which are not there)."""
    import av

    try:
        with (_Sparse(path) if partial else contextlib.nullcontext(path)) as source, _open(source) as container:
            if not container.streams.video:
                raise VideoError("no video stream (audio-only or not a video)")
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise VideoError("unsupported codec: FFmpeg has no decoder for this video stream")
            packets, rotation = [], 0 if partial else None
            for p in _demux(container, stream):
                if p.size:
                    packets.append((p.pts if p.pts is not None else p.dts, p.is_keyframe,
                                    -1 if p.pos is None else p.pos, p.size))
                if rotation is None:  # the first frame says it (decoded once, by the way)
                    try:
                        rotation = next((int(f.rotation or 0) for f in p.decode()), None)
                    except av.FFmpegError:
                        pass
            if partial:  # the index as the demux left it: a fragmented MP4's grows fragment by fragment
                indexed = {e.pos: e.is_keyframe for e in stream.index_entries}
                packets = [(t, indexed.get(pos, key), pos, n) for t, key, pos, n in packets]
            codec = stream.codec_context.name
            width, height = stream.codec_context.width, stream.codec_context.height
            rotation = rotation or 0
            if (rotation // 90) % 2:
                width, height = height, width
            rate = stream.average_rate
            tb = stream.time_base
            start = stream.start_time or 0
            listed = int(stream.frames or 0)
            container_format = container.format.name or ""
    except av.FFmpegError as e:
        raise VideoError(f"cannot open video: {_reason(e)}{_mp4_hint(path)}") from None
    if not packets:
        raise VideoError("the video stream has no frames")
    if any(p[0] is None for p in packets) or tb is None:
        raise VideoError("the video stream has packets without timestamps"
                         + (" (an elementary stream, with no container to time its frames: remux it, "
                            "`ffmpeg -i IN -c copy OUT.mp4`)" if all(p[0] is None for p in packets) else ""))
    order = np.argsort([p[0] for p in packets], kind="stable")
    pts = np.array([packets[i][0] for i in order], dtype=np.int64)
    if len(np.unique(pts)) != len(pts):
        raise VideoError("the video stream has frames with duplicate timestamps")
    keys = np.array([packets[i][1] for i in order], dtype=bool)
    times = (pts - start) * tb.numerator / tb.denominator
    fps = float(rate) if rate else 0.0
    duration = float(times[-1] + (1.0 / fps if fps else 0.0))
    return Probe(codec, int(width), int(height), fps, duration, pts, times, keys, listed, rotation, container_format,
                 pos=np.array([packets[i][2] for i in order], dtype=np.int64),
                 nbytes=np.array([packets[i][3] for i in order], dtype=np.int64),
                 order=order.astype(np.int64))


def _open(source):
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


FETCH_GAP_BYTES = 2 * 2**20  # ranges closer than this are fetched as one: a request costs about as much
_SMALL_BOX = 2**20  # boxes walked past are fetched up to this much (ftyp, sidx, uuid, udta, meta)
_MAX_MOOF_WINDOW = 64 * 2**10  # a moof is read in one request up to this size
_MAX_TABLE = 16 * 2**20  # a fragmented MP4's random-access table (mfra) read whole up to this size


def index_only(copy: storage.RangeCopy, gap_bytes: int = FETCH_GAP_BYTES, max_rounds: int = 64,
               max_index_bytes: int = 512 * 2**20) -> bool:
    """Fetches every top-level box of an MP4/MOV but its media data (mdat) into `copy`:
    the index (moov, and in a fragmented MP4 every fragment's moof) says where each
    frame's bytes lie, so a segment's own bytes can be fetched next (`plan_ranges`).

    The boxes are walked in rounds: each round reads the header of every box whose place
    is known, then the bodies, several in flight (`RangeCopy.fetch_ranges`). A fragmented
    MP4 (its moov holds an mvex) may say where its fragments are, in a random-access table
    (mfra, which the file's last 16 bytes locate) or in segment indexes (sidx): then its
    moofs are read many at a time; else fragment after fragment.

    False, as soon as it is known (what was fetched by then stays counted), for anything
    else, which is copied whole: another container, no moov, an index over
    `max_index_bytes`, more than `max_rounds` rounds (a long fragmented MP4 without a
    table), or fragments smaller on average than `gap_bytes` (FETCH_GAP_BYTES: a request
    costs about as much as that many bytes, so fetching each moof on its own would cost
    more than the whole file)."""
    size = copy.size
    todo, walked, kinds, listed = {0}, set(), [], set()  # listed: moof offsets the file's tables give
    fragmented, moofs, moof_size = False, 0, 0
    for rounds in range(max_rounds + 1):
        todo = {at for at in todo if at < size and at not in walked}
        if max(moofs, len(listed)) * gap_bytes > size:  # fragments too small to fetch on their own
            return False
        if not todo:
            return b"moov" in kinds and b"mdat" in kinds
        if rounds == max_rounds:
            return False
        # once a moof was seen, each box is read with twice its size (a file's fragments
        # hold about as many frames each): a moof and its mdat's header in one request
        window = min(2 * moof_size + 16, _MAX_MOOF_WINDOW) if moof_size else 16
        copy.fetch_ranges([(at, window) for at in todo])
        heads = {at: _box_head(copy.read(at, min(16, size - at)), size - at) for at in sorted(todo)}
        bodies, after = [], set()
        for at, head in heads.items():
            if head is None or (at == 0 and head[0] != b"ftyp"):
                return False
            kind, n = head
            walked.add(at)
            kinds.append(kind)
            if kind == b"moov":
                if n > max_index_bytes:
                    return False
                bodies.append((at, n))
            elif kind == b"moof":
                moofs, moof_size = moofs + 1, max(moof_size, n)
                bodies.append((at, n + 16))  # and the header of the box after it (its mdat)
            elif kind not in (b"mdat", b"free", b"skip", b"wide"):
                bodies.append((at, min(n, _SMALL_BOX)))
            after.add(at + n)
        if max(moofs, len(listed)) * gap_bytes > size:
            return False
        copy.fetch_ranges(bodies)
        for at, (kind, n) in heads.items():
            if kind == b"moov" and not fragmented and b"mvex" in _children(copy, at, n):
                fragmented = True  # its fragments' moofs follow: where does its table say they are?
                listed |= _tfra_offsets(copy)
            elif kind == b"moof" and at + n < size:  # its mdat, whose header came with it
                mdat = _box_head(copy.read(at + n, min(16, size - at - n)), size - at - n)
                if mdat is not None and mdat[0] == b"mdat":
                    walked.add(at + n)
                    kinds.append(b"mdat")
                    after.add(at + n + mdat[1])
            elif kind == b"sidx":
                listed |= _sidx_offsets(copy.read(at, min(n, _SMALL_BOX)), at + n)
        todo = after | listed if moof_size else after  # the listed ones once a moof's size is known
    return False


def _box_head(head: bytes, left: int) -> Optional[tuple[bytes, int]]:
    """(kind, size) of the box whose first bytes are `head`, `left` bytes before the end
    of the file; None if they are not a box header that fits."""
    if len(head) < 8:
        return None
    n, kind = int.from_bytes(head[:4], "big"), head[4:8]
    if n == 1:
        n = int.from_bytes(head[8:16], "big") if len(head) >= 16 else 0
    elif n == 0:  # to the end of the file
        n = left
    if n < 8 or n > left or not kind.isalnum():
        return None
    return kind, n


def _children(copy: storage.RangeCopy, start: int, n: int) -> list[bytes]:
    """The kinds of the boxes directly inside the container box (moov) at `start`, `n` bytes long."""
    out, at, end = [], start + 8, start + n
    while at + 8 <= end:
        head = _box_head(copy.read(at, min(16, end - at)), end - at)
        if head is None:
            break
        out.append(head[0])
        at += head[1]
    return out


def _tfra_offsets(copy: storage.RangeCopy) -> set[int]:
    """The moof offsets that a fragmented MP4's random-access table lists: the tfra boxes
    (ISO/IEC 14496-12, 8.8.10) of the mfra box whose size the mfro box, the file's last 16
    bytes, gives. Empty if there is none."""
    tail = copy.read(copy.size - 16, 16) if copy.size >= 32 else b""
    if len(tail) < 16 or int.from_bytes(tail[:4], "big") != 16 or tail[4:8] != b"mfro":
        return set()
    n = int.from_bytes(tail[12:16], "big")
    if not 32 <= n <= min(copy.size, _MAX_TABLE):
        return set()
    mfra = copy.read(copy.size - n, n)
    if _box_head(mfra, n) != (b"mfra", n):
        return set()
    out, at = set(), 8
    while at + 8 <= len(mfra):
        head = _box_head(mfra[at : at + 16], len(mfra) - at)
        if head is None:
            break
        kind, size = head
        box = mfra[at : at + size]
        if kind == b"tfra" and len(box) >= 24:
            wide = 8 if box[8] == 1 else 4  # version 1: 64-bit time and offset
            sizes = int.from_bytes(box[16:20], "big")  # traf, trun and sample numbers: 1-4 bytes each
            step = 2 * wide + ((sizes >> 4) & 3) + ((sizes >> 2) & 3) + (sizes & 3) + 3
            for k in range(min(int.from_bytes(box[20:24], "big"), (len(box) - 24) // step)):
                entry = 24 + k * step + wide
                out.add(int.from_bytes(box[entry : entry + wide], "big"))
        at += size
    return out


def _sidx_offsets(sidx: bytes, end: int) -> set[int]:
    """The offsets of the media subsegments (a moof and its mdat each) that a sidx box
    lists (ISO/IEC 14496-12, 8.16.3), counted from `end`, where the box ends."""
    wide = 8 if len(sidx) > 8 and sidx[8] == 1 else 4  # version 1: 64-bit time and offset
    at = 20 + wide  # past size, type, version and flags, reference_ID, timescale, earliest time
    if len(sidx) < at + wide + 4:
        return set()
    offset = end + int.from_bytes(sidx[at : at + wide], "big")
    count = int.from_bytes(sidx[at + wide + 2 : at + wide + 4], "big")
    out, at = set(), at + wide + 4
    for _ in range(count):
        if at + 12 > len(sidx):
            break
        ref = int.from_bytes(sidx[at : at + 4], "big")
        if not ref >> 31:  # media (1: another sidx, walked when it is reached)
            out.add(offset)
        offset += ref & 0x7FFFFFFF
        at += 12
    return out


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


def fetch_for(path: str, info: Probe, keep: np.ndarray, fetch, gap_bytes: int = FETCH_GAP_BYTES) -> Probe:
    """On a partial copy (`index_only`): fetches the bytes of every packet that decoding
    the frames `keep` reads (`plan_ranges`), then reads the rotation off the first decoded
    frame. Returns the probe with the rotation (and the displayed size) filled in."""
    import av

    fetch(plan_ranges(path, info, keep, gap_bytes))
    rotation, width, height = 0, info.width, info.height
    with _open(path) as container:
        stream = container.streams.video[0]
        key = int(_Walk(keep, info.seek_keys).key_of[keep[0]])
        if key > 0:
            _seek(container, stream, info, key)
        for packet in _demux(container, stream):
            try:
                frames = [*packet.decode(), *stream.codec_context.decode(None)]
            except av.FFmpegError:
                break
            if frames:  # as stored; the probe's size may be 0 when FFmpeg had no frame to look at
                rotation, width, height = int(frames[0].rotation or 0), frames[0].width, frames[0].height
                break
    if (rotation // 90) % 2:
        width, height = height, width
    return replace(info, rotation=rotation, width=int(width), height=int(height))


def plan_ranges(path: str, info: Probe, keep: np.ndarray, gap_bytes: int = FETCH_GAP_BYTES) -> list:
    """The byte ranges [(offset, length)] of every packet that decoding the frames `keep`
    of the partial copy `path` (`index_only`, probed as `info`) reads
    (`FrameReader._pyav_frames`), from its index alone.

    The decoder reads packets in decode order from where each of its seeks lands (to the
    key frame before the next kept frame; tried here on the copy: the index alone decides
    where) until its drain rule stops it; the same `_Walk` is followed here over the
    probe's decode order, without decoding. Each run of packets it reads becomes a byte range;
    ranges less than `gap_bytes` apart are fetched as one. Dense sampling is one range from the
    segment's lead-in to its last frame; key frames only are the key frames' packets
    (with `gap_bytes` 0, which the tests use to check that nothing else is read)."""
    n = len(info.pts)
    walk = _Walk(keep, info.seek_keys)
    index_of = {int(p): i for i, p in enumerate(info.pts)}
    by_rank = np.argsort(info.order)  # the frame whose packet has each decode rank
    landing: dict[int, int] = {}  # key frame -> decode rank where a seek to it lands
    with _open(path) as container:
        stream = container.streams.video[0]
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


def upright(img: np.ndarray, rotation) -> np.ndarray:
    """A decoded image turned as the container's display matrix says (`frame.rotation`)."""
    turns = (int(rotation) // 90) % 4 if rotation else 0
    return np.ascontiguousarray(np.rot90(img, k=turns)) if turns else img


def _mp4_hint(path: str) -> str:
    """Why an MP4/MOV will not open, when its top-level boxes say: the index (moov) is
    written last unless the file was made with faststart, so a cut file loses it."""
    boxes, offset = [], 0
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while offset + 8 <= size and len(boxes) < 64:
            f.seek(offset)
            head = f.read(16)
            n, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if n == 1 and len(head) == 16:
                n = int.from_bytes(head[8:16], "big")
            elif n == 0:
                n = size - offset
            if n < 8 or not kind.isalnum() and kind not in (b"free", b"skip"):
                break
            boxes.append((kind, offset + n > size))
            offset += n
    kinds = [k for k, _ in boxes]
    if b"ftyp" not in kinds or b"moov" in kinds:
        return ""
    if any(cut for _, cut in boxes):
        return " (truncated MP4: the file ends inside its media data and its index (moov), written last, is missing)"
    return " (MP4 without an index (moov))"


class _Untrusted(Exception):
    """decord cannot give exact frames for this file: use PyAV instead."""


class FrameReader:
    """Decodes local files; runs inside the decode child process (see `Decoder`)."""

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
        only the container's index (`index_only`): `on_fetch([(offset, length)])` must
        fetch the byte ranges this segment reads before it returns. Whatever PyAV raises on
        a damaged file ends the segment with an error row, as does any error it raises
        after frames were sent (the row counts them)."""
        import av

        state = {"emitted": 0, "stage": "decode", "decoder": "", "info": None, "note": note,
                 "segment": segment, "n_segments": n_segments, "force_pyav": force_pyav or partial}
        done = lambda error: end_row(  # noqa: E731
            uri, segment, n_segments, (self.height, self.width), emitted + state["emitted"],
            error, state["stage"], _decoder_label(state), state["info"])
        try:
            if os.path.getsize(path) == 0:
                raise VideoError("empty file (0 bytes)")
            info = state["info"] = probe(path, partial=partial)
            keep = self._keep(info, start_s, end_s, after)
            if partial and len(keep):
                info = state["info"] = fetch_for(path, info, keep, on_fetch, self.fetch_gap_bytes)
            if on_probe is not None:
                on_probe(info)
            got = state["got"] = np.zeros(len(info.pts), dtype=bool)
            similar = Similarity(self.skip_similar) if self.skip_similar is not None else None
            clips = Clips(self.clip_len, self.clip_stride, info.times) if self.clip_len else None
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
            if info.listed > len(info.pts) and end_s == math.inf:
                problems.append(f"truncated: the container lists {info.listed} frames, "
                                f"the file holds {len(info.pts)}")
            if problems:
                raise VideoError("; ".join(problems))
        except (VideoError, RuntimeError, EOFError, self._decord.DECORDError, OSError) as e:
            yield done(e)
            return
        except av.FFmpegError as e:  # InvalidDataError and the like: ValueErrors, not OSErrors
            yield done(VideoError(f"cannot read video: {_reason(e)}"))
            return
        yield done(None)

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

    def _keep(self, info: Probe, start_s: float, end_s: float, after: int) -> np.ndarray:
        """Indices of the frames to deliver: sampled, start_s <= pts time < end_s, > after."""
        keep = sample_indices(info.times, self.every, self.fps, info.keyframes if self.keyframes else None)
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
        suits = (self.decoder == "auto" and info.codec in DECORD_CODECS and dense
                 and not DECORD_WRONG_CONTAINERS & set(info.container.split(",")))
        small = os.path.getsize(path) <= self.decord_max_bytes
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
        wanted = np.zeros(len(info.pts), dtype=bool)
        wanted[keep] = True
        done = np.zeros(len(info.pts), dtype=bool)
        walk = _Walk(keep, info.seek_keys)
        found, idx_buf, frame_buf, damaged = 0, [], [], 0
        # After damage the decoder conceals: frames it outputs may show other frames' content
        # (measured on H.264 with garbage bytes), so every frame is dropped until a key frame
        # resyncs it; frames before that key frame in presentation order stay dropped.
        suspect, floor, dropped = False, 0, 0
        decoded, fed = 0, 0
        with _open(path) as container:
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if self.keyframes:
                ctx.skip_frame = "NONKEY"  # decode key frames only
            # Per-packet skipping is exact only when the packet being decoded is the frame
            # the setting was made for: FFmpeg's own H.264/HEVC decoders without frame
            # threads (so they decode on one thread when skipping). Not libdav1d (AV1),
            # which decodes behind its input (measured: a kept frame lost).
            skip_nonref = (not self.keyframes and len(keep) < len(info.pts)
                           and info.codec in ("h264", "hevc"))
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
                if skip_nonref and i is not None:
                    ctx.skip_frame = "DEFAULT" if wanted[i] else "NONREF"
                if suspect and packet.is_keyframe and i is not None:
                    suspect, floor = False, i
                drain = walk.read(i)
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
                for frame in frames:
                    decoded += 1
                    i = index_of.get(frame.pts)
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
        """RGB at model size, rotated as the container's display matrix says."""
        turns = (int(frame.rotation) // 90) % 4 if frame.rotation else 0
        if turns % 2:  # 90/270: resize to the transposed size, then rotate
            img = frame.to_ndarray(width=self.height, height=self.width, format="rgb24", interpolation="BICUBIC")
        else:
            img = frame.to_ndarray(width=self.width, height=self.height, format="rgb24", interpolation="BICUBIC")
        return upright(img, frame.rotation)

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


class Clips:
    """`--clip-len N [--clip-stride S]`: consecutive kept frames of one segment -> clips.

    A clip is N consecutive kept frames; clips start every S kept frames (S = N: side by
    side). Frames after the last full clip form one more clip, padded by repeating its last
    frame, so every kept frame is in a clip. A clip's row: (clip_start_frame,
    clip_end_frame (its last real frame), start_s (the first frame's time), end_s (the time
    of the video frame after its last one, so clips tile the time line), frames [N, H, W, 3]).
    """

    def __init__(self, n: int, stride: int, times: np.ndarray):
        self.n, self.stride, self.times = n, stride, times
        self.buf_idx: list = []
        self.buf: list = []
        self.skip = 0  # kept frames to pass over when the stride exceeds the clip
        self.covered = -1  # the last frame index inside an emitted clip

    def add(self, idx: np.ndarray, frames: np.ndarray) -> list:
        out = []
        for i, frame in zip(idx.tolist(), frames):
            if self.skip:
                self.skip -= 1
                continue
            self.buf_idx.append(i)
            self.buf.append(frame)
            if len(self.buf) == self.n:
                out.append(self._clip(self.buf_idx, self.buf))
                drop = min(self.stride, self.n)
                self.skip = self.stride - drop
                del self.buf_idx[:drop], self.buf[:drop]
        return out

    def finish(self) -> list:
        if not self.buf_idx or self.buf_idx[-1] <= self.covered:
            return []
        pad = [self.buf[-1]] * (self.n - len(self.buf))
        return [self._clip(self.buf_idx, self.buf + pad)]

    def _clip(self, idx: list, frames: list) -> tuple:
        first, last = idx[0], idx[-1]
        self.covered = last
        t = self.times
        end = t[last + 1] if last + 1 < len(t) else t[last] + (t[last] - t[last - 1] if last else 0.0)
        return first, last, float(t[first]), float(end), np.stack(frames)


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


def _decoder_dir() -> str:
    """A new folder for one `Decoder`'s copies of remote videos. An actor that is
    SIGKILLed or OOM-killed never runs `Decoder.__del__`, which deletes it: so it lies in
    this user's `$TMPDIR/rayvid-decode-UID` (`storage.user_dir`),
    named after the process that owns it (pid and start time), and the folders of
    processes that are gone are deleted first. Where that directory cannot be ours, a
    temp dir of its own, not swept."""
    root = storage.user_dir("rayvid-decode")
    if root is None:
        return tempfile.mkdtemp(prefix="rayvid-decode-")
    for name in os.listdir(root):
        owner = re.match(r"(\d+)\.(\d*)-", name)
        if owner and not storage.process_running(int(owner[1]), owner[2]):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    me = os.getpid()
    return tempfile.mkdtemp(prefix=f"{me}.{storage.process_started(me) or ''}-", dir=root)


class Decoder:
    """Callable class run by Ray Data as an actor: fetches each video, has its child process
    decode it, and turns a crash or a timeout of that process into a retry, then data.

    The child (`serve`, one per actor, started once and restarted after a failure) does
    all demuxing and decoding: a native crash (decord, FFmpeg) or a hang on a poison file
    kills only that child. Each attempt at a segment gets `timeout_s` seconds of the
    child's time (time the actor waits for it; time the actor waits on downstream stages
    does not count). After a crash or a timeout the segment is retried with PyAV from the
    frame after the last one delivered, at most `retries` times; then the segment ends with
    an error row (`DecoderCrash` / `DecodeTimeout`) and the frames before are kept.
    """

    def __init__(self, size: tuple[int, int], timeout_s: float = 600.0, retries: int = 1,
                 ranged: bool = True, **reader_args):
        """`reader_args` are FrameReader's (sampling, decoder, threads, batch bounds).
        `ranged=False` copies every remote video whole, even a segment or a sparse sample
        of it (the bench's baseline)."""
        if reader_args.get("decoder", "auto") not in ("auto", "decord", "pyav"):
            raise ValueError(f"unknown decoder {reader_args['decoder']!r}")
        self.size = (int(size[0]), int(size[1]))
        self.timeout_s, self.retries, self.ranged = float(timeout_s), int(retries), bool(ranged)
        self._reader_args = dict(reader_args, size=self.size)
        self._tmpdir = _decoder_dir()  # its copies; those of actors that were killed are deleted
        self._lock = threading.Lock()
        self.bytes_fetched = 0  # read from remote stores so far, whole copies and partial ones
        self._count = threading.Lock()
        self._child = _Child(self._reader_args)  # started now: a broken install fails here
        self._planner: Optional[_Child] = None  # started with the first partial copy
        self._plan_lock = threading.Lock()

    def __del__(self):
        for child in (getattr(self, "_child", None), getattr(self, "_planner", None)):
            if child is not None:
                child.stop()
        shutil.rmtree(getattr(self, "_tmpdir", ""), ignore_errors=True)

    def __call__(self, batch: dict) -> Iterator[dict]:
        n = len(batch["video_uri"])
        get = lambda name, default: batch[name] if name in batch else [default] * n  # noqa: E731
        for uri, seg, n_seg, start, end, source, version in zip(
            batch["video_uri"], get("segment", 0), get("n_segments", 1),
            get("start_s", -math.inf), get("end_s", math.inf), get("source_uri", None), get("version", ""),
        ):
            yield from self.decode_video(str(uri), int(seg), int(n_seg), float(start), float(end),
                                         str(source) if source else None, str(version or ""))

    def decode_video(
        self, uri: str, segment: int = 0, n_segments: int = 1,
        start_s: float = -math.inf, end_s: float = math.inf, source: Optional[str] = None,
        version: str = "",
    ) -> Iterator[dict]:
        """Frames of one video, or of its frames with start_s <= pts time < end_s. The rows
        name it `uri`; it is read from `source` where that is given (a presigned URL, whose
        signature never reaches a row). Every byte comes from one version of the object:
        `version` as listed (ETag or mtime; "": the one there when the read begins). If the
        object is another, or is replaced before the segment is read (its ranges are
        separate reads), the terminal row says so (`storage.ObjectChanged`, stage "read";
        the frames before are kept, as after any error), and the next run decodes the
        video again (commit.pending)."""
        clip_len = int(self._reader_args.get("clip_len") or 0)
        for batch in self._video(uri, segment, n_segments, start_s, end_s, source or uri, version):
            if clip_len and "clip_start_frame" not in batch:  # a terminal row, shaped like clip rows
                n = len(batch["frame_index"])
                batch["frame"] = np.zeros((n, clip_len, *self.size, 3), np.uint8)
                batch.update(clip_columns(np.full(n, -1, np.int64), np.full(n, -1, np.int64),
                                          np.full(n, math.nan), np.full(n, math.nan)))
            yield batch

    def _video(self, uri, segment, n_segments, start_s, end_s, source, version) -> Iterator[dict]:
        # an error may come after frames were sent (a retry's fetch, say): the end row counts
        # them, as the committer needs, and comes once
        sent, ended, read = 0, False, None
        try:
            with self._local(source, n_segments, start_s, end_s, version) as (path, read), self._lock:
                for batch in self._attempts(path, uri, segment, n_segments, start_s, end_s, read.part):
                    if batch["kind"][0] == KIND_END:
                        batch["bytes_read"][0] = read.bytes()
                        changed = read.changed()
                        if changed is not None:
                            _failed(batch, changed, "read", self._tmpdir)
                        ended = True
                    else:
                        sent += len(batch["frame_index"])
                    yield batch
        except storage.ACCESS_ERRORS as e:
            if ended:  # the segment is complete: only removing its copy failed
                log.warning("could not clean up after %s: %s", storage.public_uri(uri), storage.describe(e))
                return
            if storage.is_unavailable(e):  # the store is down, not this video: stop the run
                raise StorageUnavailable(
                    f"storage unreachable reading {storage.public_uri(uri)}: {storage.describe(e)}") from None
            row = end_row(uri, segment, n_segments, self.size, sent, e, "read", "", None, self._tmpdir)
            row["bytes_read"][0] = read.bytes() if read is not None else 0
            yield row

    @contextlib.contextmanager
    def _local(self, uri: str, n_segments: int, start_s: float, end_s: float, version: str = ""):
        """(local path, `_Read`) of a video, fetched before the decode child is taken. A
        segment of a remote MP4/MOV cut into several, or sampled sparsely (--every, --fps,
        --keyframes), gets a partial copy: its index, then the bytes its frames need, so the
        segments of a long video together read it about once instead of once each, and a
        key-frame scan reads little more than the key frames. Which bytes those are is
        worked out from the index by a second child process, the planner (`_fetch_ahead`),
        while the decode child decodes another call's video. Anything else is copied whole,
        as is a video on a store that cannot serve byte ranges of it (local files are used
        in place); a segment's whole copy is shared with the other segments of its video
        that this node decodes meanwhile (`storage.shared_copy`)."""
        a = self._reader_args
        sparse = (a.get("every") or 1) > 1 or a.get("fps") or a.get("keyframes")
        probed = 0  # read looking for an MP4 index before copying whole: the segment read it too
        remote = storage.is_remote(uri)
        if self.ranged and (n_segments > 1 or sparse) and a.get("decoder", "auto") != "decord" and remote:
            with storage.range_copy(uri, self._tmpdir, version) as part:
                if part is not None:  # else the store cannot serve ranges of it: a whole copy
                    counted = 0

                    def count() -> None:  # bytes_fetched as it grows: the index and the plan, then the rest
                        nonlocal counted
                        with self._count:
                            self.bytes_fetched += part.fetched - counted
                        counted = part.fetched

                    try:
                        if index_only(part, a.get("fetch_gap_bytes", FETCH_GAP_BYTES)):
                            count()
                            self._fetch_ahead(part, start_s, end_s)
                            count()
                            yield part.path, _Read(part, check=part.verify)
                            return
                    finally:
                        count()
                    probed = part.fetched
        if self.ranged and n_segments > 1 and remote:
            # copied whole for one segment: the segments decoding on this node at the same
            # time share one copy (only the one that copied it counts its bytes)
            with storage.shared_copy(uri, self._tmpdir, version) as (path, copied):
                with self._count:
                    self.bytes_fetched += copied
                yield path, _Read(None, probed + copied)
            return
        # a local file is read in place: its version is checked before and after; a copy is
        # checked by local_copy (before and after copying), and is then what is decoded
        with storage.local_copy(uri, self._tmpdir, version) as path:
            copied = os.path.getsize(path) if path.startswith(self._tmpdir) else 0
            check = None if copied else storage.pin(uri, version)
            with self._count:
                self.bytes_fetched += copied
            yield path, _Read(None, probed + copied, check)

    def _fetch_ahead(self, part: storage.RangeCopy, start_s: float, end_s: float) -> None:
        """Fetches the ranges the planner says decoding this segment of the partial copy
        `part` will read. The decode child works them out again when it decodes (and has the
        actor fetch whatever is missing, nothing when the plans agree): planning is only
        ahead of time, so a planner that fails, crashes or hangs costs this nothing but the
        wait (at most `timeout_s`)."""
        with self._plan_lock:
            if self._planner is None:
                self._planner = _Child(self._reader_args)
            ranges = self._planner.plan(dict(path=part.path, start_s=start_s, end_s=end_s), self.timeout_s)
        part.fetch_ranges(ranges or [])

    def _attempts(self, path, uri, segment, n_segments, start_s, end_s, part=None) -> Iterator[dict]:
        emitted, after, note, info = 0, -1, "", None
        for attempt in range(self.retries + 1):
            request = dict(path=path, uri=uri, segment=segment, n_segments=n_segments,
                           start_s=start_s, end_s=end_s, after=after, emitted=emitted,
                           force_pyav=attempt > 0, note=note, partial=part is not None)
            try:
                for kind, payload in self._child.request(request, self.timeout_s,
                                                         part.fetch_ranges if part is not None else None):
                    if kind == "probe":
                        info = payload
                        continue
                    if payload["kind"][0] == KIND_END:
                        payload["message"][0] = payload["message"][0].replace(self._tmpdir, "<tmp>")
                        yield payload
                        return
                    emitted += len(payload["frame_index"])
                    # resume after the last frame delivered (for clips: the last clip's end)
                    after = int(payload.get("clip_end_frame", payload["frame_index"])[-1])
                    yield payload
            except _ChildFailed as failure:
                # the next request starts a fresh child; where it cannot (no process, memory or
                # file descriptor for it), that attempt fails too, and the frames sent stay counted
                self._child.stop()
                error = failure.error
                note = _join(note, f"{type(error).__name__} on attempt {attempt + 1}: "
                                   f"{error}; resumed after frame {after}")
        final = type(error)(f"{error} ({self.retries + 1} attempts)")
        yield end_row(uri, segment, n_segments, self.size, emitted, final, "decode",
                      note, info, self._tmpdir)


@dataclass
class _Read:
    """What one segment read from its store: a partial copy (`part`, still growing while the
    child asks for ranges) or a whole one of `copied` bytes (0: a local file, read in place)."""

    part: Optional[storage.RangeCopy] = None
    copied: int = 0
    check: Optional[Callable[[], None]] = None  # raises storage.ObjectChanged if it changed

    def bytes(self) -> int:
        return self.part.fetched if self.part is not None else self.copied

    def changed(self) -> Optional[BaseException]:
        """Why the segment's bytes may not all be the version it began with (the object
        changed or went, or cannot be asked), or None. A store outage raises."""
        if self.check is None:
            return None
        try:
            self.check()
        except storage.ACCESS_ERRORS as e:
            if storage.is_unavailable(e):
                raise
            return e
        return None


class DecoderCrash(Exception):
    """The decode child process died (a native crash in a decoder, or killed)."""


class DecodeTimeout(Exception):
    """The decode child process took longer than the per-attempt timeout on one segment."""


class _ChildFailed(Exception):
    def __init__(self, error: Exception):
        self.error = error


class _Child:
    """The decode child process and its socket: pickled requests in, (kind, payload) out."""

    def __init__(self, reader_args: dict):
        self.reader_args = reader_args
        self.proc = self.conn = self.slot = None
        self.busy = False  # a request whose answer was not read to its end row
        self.start()

    def start(self) -> None:
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        shared = _shared_file()
        env = dict(os.environ)
        # the child imports rayvid from wherever this process did (Ray's working_dir too)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c",
                 "import sys; from rayvid.decode import serve; serve(int(sys.argv[1]), int(sys.argv[2]))",
                 str(theirs.fileno()), str(shared)],
                pass_fds=(theirs.fileno(), shared), env=env, stdin=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(shared)
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.busy = False
        self.conn.send(("init", self.reader_args))
        # wait until its decoders are imported: a broken install fails here, and no
        # video's time budget pays for the start-up
        try:
            message = self.conn.recv() if self.conn.poll(120) else ("bug", "no answer within 120 s")
        except (EOFError, OSError):
            message = ("bug", self._death())
        if message[0] != "ready":
            os.close(shared)
            raise RuntimeError(f"the decode child process did not start: {message[1]}")
        self.slot = _FrameSlot(shared, message[1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        if self.conn is not None:
            self.conn.close()
        if self.slot is not None:
            self.slot.close()
        self.proc = self.conn = self.slot = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _ensure(self) -> None:
        """A child ready for a request: restarted if abandoned mid-answer, dead or stopped."""
        if self.busy or self.proc is None or self.proc.poll() is not None:
            self.restart()

    def request(self, request: dict, timeout_s: float, fetch=None) -> Iterator[tuple]:
        """The child's answers to `request`; its ("fetch", ranges) asks are served here by
        `fetch([(offset, length)])` (the time that takes is not the child's: no budget)."""
        try:
            self._ensure()
        except OSError as e:
            raise _ChildFailed(DecoderCrash(f"the decoder process could not be started: {storage.describe(e)}")) from None
        self.busy = True
        try:
            self.conn.send(("read", request))
        except OSError:
            raise _ChildFailed(DecoderCrash(self._death())) from None
        budget = timeout_s
        while True:
            t0 = time.monotonic()
            try:
                ready = self.conn.poll(max(budget, 0.0))
                message = self.conn.recv() if ready else None
            except (EOFError, OSError):
                raise _ChildFailed(DecoderCrash(self._death())) from None
            budget -= time.monotonic() - t0
            if message is None:
                self.proc.kill()
                raise _ChildFailed(DecodeTimeout(f"no result within {timeout_s:g} s"))
            kind, payload = message
            if kind == "fetch":
                fetch(payload)
                try:
                    self.conn.send(("fetched", None))
                except OSError:
                    raise _ChildFailed(DecoderCrash(self._death())) from None
                continue
            if kind == "bug":  # a programming error in the child: fail loudly, as in-process
                raise RuntimeError(f"decode child process raised:\n{payload}")
            if kind == "rows" and isinstance(payload["frame"], tuple):  # in the shared slot
                payload["frame"] = self.slot.take(*payload["frame"])
                try:
                    self.conn.send(("free", None))  # the child may fill the slot again
                except OSError:
                    raise _ChildFailed(DecoderCrash(self._death())) from None
            if kind == "rows" and payload["kind"][0] == KIND_END:
                self.busy = False
            yield kind, payload
            if not self.busy:
                return

    def plan(self, request: dict, timeout_s: float) -> Optional[list]:
        """The child's `FrameReader.plan(**request)`; None, with the child stopped (the next
        request restarts it), when it crashes, takes longer than `timeout_s` or cannot be
        started."""
        try:
            self._ensure()
            self.conn.send(("plan", request))
            message = self.conn.recv() if self.conn.poll(timeout_s) else None
        except (EOFError, OSError):
            message = None
        if message is None:
            self.stop()
            return None
        if message[0] == "bug":
            raise RuntimeError(f"decode child process raised:\n{message[1]}")
        return message[1]

    def _death(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return "decoder process stopped answering"
        if code < 0:
            return f"decoder process killed by {signal.Signals(-code).name}"
        return f"decoder process exited with status {code}"


def serve(fd: int, shared: int) -> None:
    """The decode child process: answers requests on socket `fd` until it closes. Frames go
    through `shared`, a file both processes map (`_FrameSlot`); the socket carries the
    other columns. Pickling frames through the socket cost 0.8 ms of CPU per 224x224 frame
    (measured), as much as a third of decoding one."""
    import traceback
    from multiprocessing.connection import Connection

    parent = os.getppid()

    def orphaned() -> None:  # exit with the actor, even when it is SIGKILLed
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    conn = Connection(fd)
    reader = slot = None
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "free":  # the actor copied out the last batch of a request
            slot.busy = False
            continue
        try:
            if kind == "init":
                reader = FrameReader(**payload)
                size = reader.batch_frame_bytes  # one batch of frames
                os.ftruncate(shared, size)
                slot = _FrameSlot(shared, size)
                conn.send(("ready", size))
                continue
            if kind == "plan":
                conn.send(("planned", reader.plan(**payload)))
                continue
            # the probe without where each packet lies: the actor needs the metadata only
            on_probe = lambda info: conn.send(("probe", replace(info, pos=None, nbytes=None, order=None)))  # noqa: E731

            def on_fetch(ranges):  # the actor fetches them into the partial copy
                conn.send(("fetch", ranges))
                while True:
                    answer, _ = conn.recv()
                    if answer == "fetched":
                        return
                    if answer != "free":
                        raise RuntimeError(f"decode child expected 'fetched', got {answer!r}")
                    slot.busy = False

            for rows in reader.read(**payload, on_probe=on_probe, on_fetch=on_fetch):
                frames = rows["frame"]
                if frames.nbytes <= slot.size:  # else (a batch of long clips) pickled
                    slot.put(frames, conn.recv)
                    rows = dict(rows, frame=(frames.shape, frames.dtype.str))
                conn.send(("rows", rows))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            return
        except Exception:
            conn.send(("bug", traceback.format_exc()))


class _FrameSlot:
    """One batch of frames in a file mapped by the decode actor and its child: the child
    copies a batch in and waits, before the next, until the actor has copied it out (the
    child decodes the next batch meanwhile)."""

    def __init__(self, fd: int, size: int):
        import mmap

        self.fd, self.size = fd, int(size)
        self.map = mmap.mmap(fd, self.size)
        self.busy = False

    def put(self, frames: np.ndarray, wait_free) -> None:
        if self.busy:
            kind, _ = wait_free()
            if kind != "free":
                raise RuntimeError(f"decode child expected 'free', got {kind!r}")
        np.frombuffer(self.map, np.uint8, frames.nbytes)[:] = frames.reshape(-1).view(np.uint8)
        self.busy = True

    def take(self, shape: tuple, dtype: str) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(self.map, np.uint8, n).view(dtype).reshape(shape).copy()

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def _shared_file() -> int:
    """A file descriptor of an anonymous file in memory (`memfd_create`, Linux), else of an
    unlinked temporary file."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("rayvid-frames")
    with tempfile.NamedTemporaryFile(prefix="rayvid-frames-", delete=False) as f:
        fd = os.dup(f.fileno())
    os.unlink(f.name)
    return fd


def end_row(uri: str, segment: int, n_segments: int, size: tuple, emitted: int,
            error: Optional[BaseException], stage: str, decoder: str,
            info: Optional[Probe], tmpdir: str = "") -> dict:
    """A segment's terminal row: how many frame rows it produced, the video's metadata, and
    why it stopped early, if it did."""
    message = _message(error, emitted, tmpdir) if error is not None else ""
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


def _failed(end: dict, error: BaseException, stage: str, tmpdir: str) -> None:
    """Mark a terminal row (`end_row`) as failed with `error`, keeping its frame count; an
    error it already had stays in its message."""
    had = str(end["message"][0])  # says already how many frames were kept, if it is an error's
    message = _message(error, 0 if had else int(end["n_frames"][0]), tmpdir)
    end["error_stage"][0], end["error_type"][0] = stage, _error_type(error)
    end["message"][0] = f"{message}; before that: {had}" if had else message


def _message(error: BaseException, emitted: int, tmpdir: str) -> str:
    """An error row's message: the error, without credentials or the actor's temp dir,
    and how many frames the segment delivered before it."""
    message = storage.describe(error)
    if tmpdir:
        message = message.replace(tmpdir, "<tmp>")
    if emitted:
        message += f" ({emitted} decoded frames kept)"
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
    if isinstance(error, (VideoError, DecoderCrash, DecodeTimeout)):
        return type(error).__name__
    if isinstance(error, FileNotFoundError):
        return "NotFound"
    if isinstance(error, PermissionError):
        return "PermissionDenied"
    return type(error).__name__
