"""Decode stage: video URLs in, uint8 RGB frames at the model's input size out.

Input columns:  `video_uri`, and from the planning stage (segments.py) `segment`,
  `n_segments`, `start_s`, `end_s` (without them a row is the whole video) and
  `source_uri` (where to read the video from when that is not video_uri: a presigned URL),
  `version` and `size_bytes` (as listed: "" and -1 unknown; with both, a copy from S3 or GCS
  asks the store nothing but its bytes: `storage._conditional`).
Output columns: `video_uri: str`, `segment, n_segments: int32`, `kind: str`,
  `frame_index: int64`, `timestamp_s: float64`, `frame: uint8[H, W, 3]`, `n_frames: int64`,
  `error_stage: str`, `error_type: str`, `message: str`, the video's `decoder, codec:
  str`, `width, height: int64`, `fps, duration_s: float64`, and `reused_from: int64`
  (-1, or with --skip-similar the earlier frame whose prediction this one reuses; see
  `video.Similarity`), `bytes_read: int64` (0 on frame rows; on the terminal row, what the
  segment read from a remote store: its whole copy, or its partial one). With
  `--clip-len N` a row is a clip (`video.Clips`): `frame` is uint8[N, H, W, 3],
  `frame_index`/`timestamp_s` are its first frame's, and `clip_start_frame,
  clip_end_frame: int64`, `start_s, end_s: float64` say what it covers.
A segment yields batches of frame rows (`kind == "frame"`, bounded in frames and bytes),
then exactly one terminal row (`kind == "end"`, a zero `frame`) whose `n_frames` counts the
frame rows it produced, which carries the video's metadata, and whose error fields say why
it stopped early, if it did. A video that cannot be read is one terminal row per segment
with the error: data, not an exception.

The actor (`Decoder`) fetches each video and hands it to its own child process
(`serve`), which demuxes and decodes it (`video.FrameReader`: the probe, the sampling and
the two decoders, decord and PyAV, are video.py's). A segment of a remote MP4/MOV gets a
partial copy instead of the whole file: the index first (`mp4.index_only`: the moov, and a
fragmented MP4's moofs), then the byte ranges the segment's packets occupy, which a
second child process (the planner: `video.plan_ranges`) works out while the decode child
decodes another video, and which the decode child checks before decoding (`video.fetch_for`).
A native crash or a hang costs one attempt at a segment (bounded by a timeout and retried
with PyAV from where it stopped), never the actor or the job. Frames come back through a
memory-mapped slot the two processes share (`_FrameSlot`), the other columns through a
socket.
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
from rayvid.mp4 import FETCH_GAP_BYTES, index_only
from rayvid.schema import KIND_END, listed_size
from rayvid.video import FrameReader, clip_columns, end_row, mark_failed

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
# with the source's pixels, the model's do not: from HD sources up (`video.LARGE_SOURCE_PIXELS`) a
# decode actor there still holds one CPU but decodes with SHARED_NODE_THREADS threads, so
# it can take a core the model leaves idle; when the model needs the cores, Ray Data's
# backpressure stops it running ahead. decord with 2 threads, measured at model size: the
# same CPU per frame at 1080p (7.65 against 7.76 ms), 1.6x the frames per second; 1080p
# archive B end to end 96-100 frames/s against 85-89. Smaller sources keep one thread:
# at 360p, 2 threads cost 5% more CPU per frame and took cores from the model's start-up
# and steady state (MobileNetV3, archive B: 222-244 frames/s against 239-251; BENCHMARKS.md).
SHARED_NODE_THREADS = 2


def threads_on(threads: int, shares_cores_with_inference: bool) -> int:
    """Decoder threads, for large sources, of a decode actor that holds `threads` CPUs."""
    return max(threads, SHARED_NODE_THREADS) if shares_cores_with_inference else threads


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
        self._unit = "clips" if reader_args.get("clip_len") else "frames"  # what a row is, in messages
        self._tmpdir = _decoder_dir()  # its copies; those of actors that were killed are deleted
        self._lock = threading.Lock()
        self.bytes_fetched = 0  # read from remote stores so far, whole copies and partial ones
        self._count = threading.Lock()
        self._child = _Child(self._reader_args, start=False)
        try:  # started now: a broken install fails here (RuntimeError)
            self._child.start()
        except _StartFailed as e:  # the node's trouble (the child killed): the first segment starts one again
            if not e.killed:  # (it exited: a broken install fails the actor, loudly)
                raise RuntimeError(str(e)) from None
            log.warning("%s; the first segment starts another", e)
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
        for uri, seg, n_seg, start, end, source, version, size in zip(
            batch["video_uri"], get("segment", 0), get("n_segments", 1),
            get("start_s", -math.inf), get("end_s", math.inf), get("source_uri", None), get("version", ""),
            get("size_bytes", -1),
        ):
            yield from self.decode_video(str(uri), int(seg), int(n_seg), float(start), float(end),
                                         str(source) if source else None, str(version or ""),
                                         listed_size(size))

    def decode_video(
        self, uri: str, segment: int = 0, n_segments: int = 1,
        start_s: float = -math.inf, end_s: float = math.inf, source: Optional[str] = None,
        version: str = "", size: int = -1,
    ) -> Iterator[dict]:
        """Frames of one video, or of its frames with start_s <= pts time < end_s. The rows
        name it `uri`; it is read from `source` where that is given (a presigned URL, whose
        signature never reaches a row). Every byte comes from one version of the object:
        `version` as listed (ETag or mtime; "": the one there when the read begins). If the
        object is another, or is replaced before the segment is read (its ranges are
        separate reads), the terminal row says so (`storage.ObjectChanged`, stage "read";
        the frames before are sent, as after any error, and the committer drops a changed
        video's frames: they may be of either version), and the next run decodes the
        video again (commit.pending). `size` is the source's as listed (-1: unknown)."""
        clip_len = int(self._reader_args.get("clip_len") or 0)
        for batch in self._video(uri, segment, n_segments, start_s, end_s, source or uri, version, size):
            if clip_len and "clip_start_frame" not in batch:  # a terminal row, shaped like clip rows
                n = len(batch["frame_index"])
                batch["frame"] = np.zeros((n, clip_len, *self.size, 3), np.uint8)
                batch.update(clip_columns(np.full(n, -1, np.int64), np.full(n, -1, np.int64),
                                          np.full(n, math.nan), np.full(n, math.nan)))
            yield batch

    def _video(self, uri, segment, n_segments, start_s, end_s, source, version, size=-1) -> Iterator[dict]:
        # an error may come after frames were sent (a retry's fetch, say): the end row counts
        # them, as the committer needs, and comes once
        sent, ended, read = 0, False, None
        try:
            with self._local(source, n_segments, start_s, end_s, version, size) as (path, read), self._lock:
                for batch in self._attempts(path, uri, segment, n_segments, start_s, end_s, read.part):
                    if batch["kind"][0] == KIND_END:
                        batch["bytes_read"][0] = read.bytes()
                        changed = read.changed()
                        if changed is not None:
                            mark_failed(batch, changed, "read", self._tmpdir, self._unit)
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
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # this node's disk, not the video
                raise StorageUnavailable(
                    f"no space left on host {socket.gethostname()} for the local copy of {storage.public_uri(uri)} "
                    f"(in {self._tmpdir}): free space there, or point TMPDIR at a larger disk") from None
            row = end_row(uri, segment, n_segments, self.size, sent, e, "read", "", None, self._tmpdir, self._unit)
            row["bytes_read"][0] = read.bytes() if read is not None else 0
            yield row

    @contextlib.contextmanager
    def _local(self, uri: str, n_segments: int, start_s: float, end_s: float, version: str = "", size: int = -1):
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
            with storage.range_copy(uri, self._tmpdir, version, size) as part:
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
            with storage.shared_copy(uri, self._tmpdir, version, size) as (path, copied):
                with self._count:
                    self.bytes_fetched += copied
                yield path, _Read(None, probed + copied)
            return
        # a local file is read in place: its version is checked before and after; a copy is
        # checked by local_copy (before and after copying), and is then what is decoded
        with storage.local_copy(uri, self._tmpdir, version, size) as path:
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
                try:
                    self._planner = _Child(self._reader_args)
                except (OSError, _StartFailed):  # (no process for it now: the next segment tries again)
                    ranges = None
            if self._planner is not None:
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
                    # resume after the last frame delivered (for clips: after the last clip's
                    # first frame, with the clips that start after it: clips may overlap)
                    after = int(payload["frame_index"][-1])
                    yield payload
            except _ChildFailed as failure:
                # the next request starts a fresh child; where it cannot (no process, memory or
                # file descriptor for it), that attempt fails too, and the frames sent stay counted
                self._child.stop()
                error = failure.error
                note = (f"{note}; " if note else "") + (f"{type(error).__name__} on attempt {attempt + 1}: "
                                                         f"{error}; resumed after frame {after}")
        final = type(error)(f"{error} ({self.retries + 1} attempts)")
        yield end_row(uri, segment, n_segments, self.size, emitted, final, "decode",
                      note, info, self._tmpdir, self._unit)


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


class _StartFailed(Exception):
    """A fresh decode child died or did not answer while it started: `killed` where by
    SIGKILL (the OOM killer) or no answer (a node too loaded), the node's trouble, not the
    video's nor the install's; not where it exited with a status or crashed (a broken
    install: a decoder's native library that crashes as it is imported)."""

    def __init__(self, message: str, killed: bool):
        super().__init__(message)
        self.killed = killed


POLL_MAX_S = 86400.0  # one wait on the child at most: multiprocessing refuses 2**31 ms and more


def _poll(conn, timeout_s: float) -> bool:
    """`conn.poll(timeout_s)` for any budget (a `--decode-timeout` of 1e9 meaning "none"
    raised OverflowError in the actor: a traceback, the run failed), in waits of at most
    POLL_MAX_S."""
    end = time.monotonic() + timeout_s
    while True:
        left = max(end - time.monotonic(), 0.0)
        if conn.poll(min(left, POLL_MAX_S)):
            return True
        if left <= POLL_MAX_S:
            return False


class _Child:
    """The decode child process and its socket: pickled requests in, (kind, payload) out."""

    def __init__(self, reader_args: dict, start: bool = True):
        self.reader_args = reader_args
        self.proc = self.conn = self.slot = None
        self.busy = False  # a request whose answer was not read to its end row
        if start:
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
            message = self.conn.recv() if self.conn.poll(120) else ("gone", "no answer within 120 s")
        except (EOFError, OSError):
            message = ("gone", self._death())
        if message[0] != "ready":
            os.close(shared)
            status = self.proc.poll()
            self.stop()  # the child (were it still running) and its socket
            if message[0] == "gone":
                raise _StartFailed(f"the decode child process did not start: {message[1]}",
                                   killed=status is None or status == -signal.SIGKILL)
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
        except _StartFailed as e:
            raise _ChildFailed(DecoderCrash(str(e))) from None
        self.busy = True
        try:
            self.conn.send(("read", request))
        except OSError:
            raise _ChildFailed(DecoderCrash(self._death())) from None
        budget = timeout_s
        while True:
            t0 = time.monotonic()
            try:
                ready = _poll(self.conn, budget)
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
            message = self.conn.recv() if _poll(self.conn, timeout_s) else None
        except (EOFError, OSError, _StartFailed):
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
                    if answer != "free":  # (not a RuntimeError: the reader takes those for the video's)
                        raise _ProtocolError(f"decode child expected 'fetched', got {answer!r}")
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


class _ProtocolError(Exception):
    """The decode actor and its child out of step: a bug, never a video's error row."""


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
