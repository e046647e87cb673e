"""Decode stage: video URLs in, uint8 RGB frames at the model's input size out.

Input columns:  `video_uri` (any number of rows; each video is decoded whole).
Output columns: `video_uri: str`, `kind: str`, `frame_index: int64`, `timestamp_s: float64`,
  `frame: uint8[H, W, 3]`, `n_frames: int64`, `error_stage: str`, `error_type: str`,
  `message: str`.
A video yields batches of frame rows (`kind == "frame"`, bounded in frames and bytes), then
exactly one terminal row (`kind == "end"`, a zero `frame`) whose `n_frames` counts the frame
rows it produced and whose error fields say why it stopped early, if it did. A video that
cannot be read is one terminal row with the error: data, not an exception.

How decord is used, from measurements (see README, "Decoding"):
- it reads a local path: remote objects are streamed to a temp file first, because
  `VideoReader(file_object)` copies the whole file into memory (and segfaults on truncation);
- it always resizes on decode to the model size (the frames that travel are small, and at
  model size its decoder thread does not read ahead while we wait on downstream stages:
  memory stays flat across yields, tested in tests/test_decode.py; at native size it does
  not, which is why rayvid never decodes at native size);
- `num_threads` is explicit (decord's 0 means every core of the node);
- batches are read as contiguous index runs with `get_batch`, so the reader never seeks
  backwards and never re-decodes a GOP.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Iterator, Optional

import numpy as np

from rayvid import storage
from rayvid.schema import KIND_END, KIND_FRAME

# Ray resources of one decode actor, declared next to the stage.
def resources(threads: int) -> dict:
    return {"num_cpus": float(threads)}


def sample_indices(timestamps: np.ndarray, every: int = 1, fps: Optional[float] = None) -> np.ndarray:
    """Indices of the frames a sampling mode keeps, sorted and unique.

    every=N keeps 0, N, 2N, ...; fps=F keeps, for each target time t = k/F (k = 0, 1, ...
    up to the last frame's time), the frame whose presentation time is nearest t (ties go
    to the earlier frame); a frame nearest several targets is kept once.
    """
    n = len(timestamps)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if fps is None:
        return np.arange(0, n, every, dtype=np.int64)
    ts = np.asarray(timestamps, dtype=np.float64)
    last = ts[-1]
    targets = np.arange(0, math.floor(last * fps + 1e-9) + 1, dtype=np.float64) / fps
    right = np.clip(np.searchsorted(ts, targets, side="left"), 0, n - 1)
    left = np.clip(right - 1, 0, n - 1)
    pick = np.where(np.abs(ts[left] - targets) <= np.abs(ts[right] - targets), left, right)
    return np.unique(pick).astype(np.int64)


def presentation_times(path: str, n_frames: int) -> Optional[np.ndarray]:
    """Exact float64 presentation times, (pts - stream start) x time_base, of the video
    stream's frames in presentation order: decord's frame order (it sorts packets by pts)
    with the float64 precision decord's float32 timestamps lack. Demuxes only (no decoding).
    None when the container has packets without pts or the count disagrees with decord."""
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            pts = [p.pts for p in container.demux(stream) if p.size]
            tb = stream.time_base
            start = stream.start_time or 0
    except (av.FFmpegError, IndexError, OSError):
        return None
    if len(pts) != n_frames or any(p is None for p in pts) or tb is None:
        return None
    ticks = np.sort(np.asarray(pts, dtype=np.int64)) - start
    return ticks * tb.numerator / tb.denominator


def chunks(indices: np.ndarray, max_len: int) -> Iterator[np.ndarray]:
    """Split sorted indices into consecutive groups of at most max_len, in order."""
    for start in range(0, len(indices), max_len):
        yield indices[start : start + max_len]


class Decoder:
    """Callable class run by Ray Data as an actor: one decord reader at a time."""

    def __init__(
        self,
        size: tuple[int, int],
        every: int = 1,
        fps: Optional[float] = None,
        threads: int = 1,
        batch_frames: int = 64,
        batch_bytes: int = 32 * 2**20,
    ):
        import decord  # heavy import: only inside the stage

        self._decord = decord
        self.height, self.width = int(size[0]), int(size[1])
        self.every, self.fps = every, fps
        self.threads = max(1, int(threads))
        frame_bytes = self.height * self.width * 3
        self.chunk = max(1, min(int(batch_frames), int(batch_bytes) // frame_bytes))
        self._tmpdir = tempfile.mkdtemp(prefix="rayvid-decode-")

    def __del__(self):
        shutil.rmtree(getattr(self, "_tmpdir", ""), ignore_errors=True)

    def __call__(self, batch: dict) -> Iterator[dict]:
        for uri in batch["video_uri"]:
            yield from self.decode_video(str(uri))

    def decode_video(self, uri: str) -> Iterator[dict]:
        emitted = 0
        stage = "read"
        try:
            with storage.local_copy(uri, self._tmpdir) as path:
                stage = "decode"
                vr = self._open(path)
                try:
                    n = len(vr)
                    if n <= 0:
                        raise VideoError("the video stream has no frames")
                    timestamps = presentation_times(path, n)
                    if timestamps is None:  # container without usable pts: decord's float32
                        timestamps = vr.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64)
                    keep = sample_indices(timestamps, self.every, self.fps)
                    for idx in chunks(keep, self.chunk):
                        frames = self._fit(vr.get_batch(idx.tolist()).asnumpy())
                        yield self._frame_batch(uri, idx, timestamps[idx], frames)
                        emitted += len(idx)
                finally:
                    del vr
        except (VideoError, RuntimeError, EOFError, self._decord.DECORDError, *storage.ACCESS_ERRORS) as e:
            yield self._end_row(uri, emitted, stage, e)
            return
        yield self._end_row(uri, emitted, None, None)

    def _open(self, path: str):
        if os.path.getsize(path) == 0:
            raise VideoError("empty file (0 bytes)")
        try:
            return self._decord.VideoReader(
                path, ctx=self._decord.cpu(0), width=self.width, height=self.height,
                num_threads=self.threads,
            )
        except (RuntimeError, self._decord.DECORDError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "Error reading" in first:
                first = "no decodable video stream (not a video container, or a damaged one)"
            raise VideoError(f"cannot open video: {first}") from None

    def _fit(self, frames: np.ndarray) -> np.ndarray:
        """Guarantee exactly (n, H, W, 3): some odd source sizes come back a row/column short."""
        n, h, w = frames.shape[:3]
        if (h, w) == (self.height, self.width):
            return frames
        pad = ((0, 0), (0, max(0, self.height - h)), (0, max(0, self.width - w)), (0, 0))
        return np.pad(frames, pad, mode="edge")[:, : self.height, : self.width]

    def _frame_batch(self, uri, idx, ts, frames) -> dict:
        n = len(idx)
        return {
            "video_uri": np.array([uri] * n, dtype=object),
            "kind": np.array([KIND_FRAME] * n, dtype=object),
            "frame_index": idx.astype(np.int64),
            "timestamp_s": ts.astype(np.float64),
            "frame": frames,
            "n_frames": np.zeros(n, dtype=np.int64),
            "error_stage": np.array([""] * n, dtype=object),
            "error_type": np.array([""] * n, dtype=object),
            "message": np.array([""] * n, dtype=object),
        }

    def _end_row(self, uri, emitted, stage, error) -> dict:
        message = ""
        if error is not None:
            message = storage.describe(error).replace(self._tmpdir, "<tmp>")
            if emitted:
                message += f" (after {emitted} frames; the frames before it are kept)"
        return {
            "video_uri": np.array([uri], dtype=object),
            "kind": np.array([KIND_END], dtype=object),
            "frame_index": np.array([-1], dtype=np.int64),
            "timestamp_s": np.array([math.nan]),
            "frame": np.zeros((1, self.height, self.width, 3), dtype=np.uint8),
            "n_frames": np.array([emitted], dtype=np.int64),
            "error_stage": np.array([stage or ""], dtype=object),
            "error_type": np.array([_error_type(error)], dtype=object),
            "message": np.array([message], dtype=object),
        }


class VideoError(Exception):
    """A video that cannot be decoded; becomes an errors/ row, never a failed job."""


def _error_type(error: Optional[BaseException]) -> str:
    if error is None:
        return ""
    if isinstance(error, VideoError):
        return "VideoError"
    if isinstance(error, FileNotFoundError):
        return "NotFound"
    if isinstance(error, PermissionError):
        return "PermissionDenied"
    return type(error).__name__
