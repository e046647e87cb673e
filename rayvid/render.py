"""`rayvid render VIDEO_URI OUTPUT out.mp4`: the video with its predictions drawn on it.

Input: one video (any URL) and the OUTPUT a run wrote for it (its rows are looked up by
`video_uri`, as the run stored it: `storage.stored_uri`, so a presigned URL signed again
finds its video's rows and is read as given). Output: an H.264 MP4 (any URL) at the source's
size and frame rate, every frame showing, top left, the top-k labels of the prediction in
force (the frame's own row; with sparse sampling, the last sampled frame before it): a
swatch in the label's colour (`report.colours` over the video's labels), the label and
its score; with `--head detect` runs, each box outlined in its label's colour (on its own
frame only). Frames map to rows by index in presentation order, as the decoder numbers
them (`video.probe`), so the overlay sits on the frame the model saw.
"""

from __future__ import annotations

import contextlib
import fractions
import logging
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from rayvid import commit, query, report, storage, video
from rayvid.errors import InputError

log = logging.getLogger("rayvid")

ROW_H, SWATCH, PAD = 14, 10, 3  # overlay geometry, pixels


def overlay_rows(topk: Optional[list], k: int) -> list[tuple[str, float]]:
    return [(t["label"], float(t["score"])) for t in (topk or [])[:k]]


def draw(frame: np.ndarray, rows: list[tuple[str, float]], palette: dict, font,
         boxes: Optional[list] = None) -> np.ndarray:
    """The frame with rows of (label, score) drawn top left, on a dark box, and (detection
    runs) each box outlined in its label's colour."""
    from PIL import Image, ImageDraw

    pic = Image.fromarray(frame)
    d = ImageDraw.Draw(pic)
    for b in boxes or []:
        d.rectangle([b["x_min"], b["y_min"], b["x_max"] - 1, b["y_max"] - 1],
                    outline=palette.get(b["label"], (255, 255, 255)), width=2)
    if rows:
        width = PAD * 3 + SWATCH + max(int(d.textlength(f"{label} {score:.2f}", font=font)) for label, score in rows)
        d.rectangle([0, 0, min(width, frame.shape[1] - 1), PAD + ROW_H * len(rows)], fill=(0, 0, 0))
    for i, (label, score) in enumerate(rows):
        y = PAD + i * ROW_H
        d.rectangle([PAD, y, PAD + SWATCH - 1, y + SWATCH - 1], fill=palette.get(label, (255, 255, 255)))
        d.text((PAD * 2 + SWATCH, y - 1), f"{label} {score:.2f}", fill=(255, 255, 255), font=font)
    return np.asarray(pic)


def _frames(src, stream, video_uri: str):
    """The frames of `stream` that decode: a packet of damaged data (FFmpeg raises on it;
    the run kept the frames around it) is skipped, and said once on stderr."""
    import av

    damaged = 0
    for packet in src.demux(stream):
        try:
            yield from packet.decode()
        except av.FFmpegError:
            damaged += 1
    if damaged:
        log.warning("render: %d packet(s) of %s could not be decoded (damaged data): their frames are left out",
                    damaged, storage.public_uri(video_uri))


# the rendered frames keep their source times: in MPEG's 90 kHz where the encoder takes it
# (MPEG-4 Part 2, the fallback without libx264, takes denominators up to 65535: ms there)
TIME_BASES = {"libx264": fractions.Fraction(1, 90000)}
DEFAULT_TIME_BASE = fractions.Fraction(1, 1000)


def output_stream(dst, rate, width: int, height: int, codec: Optional[str] = None):
    """The rendered video's stream in `dst`: H.264 (libx264, CRF 18) where this FFmpeg has
    it, else (or as `codec` says) MPEG-4 Part 2; yuv420p at even `width` x `height`; frames
    timed in its `time_base`."""
    import av

    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    out = dst.add_stream(codec, rate=rate)
    out.codec_context.time_base = out.time_base = TIME_BASES.get(out.codec_context.name, DEFAULT_TIME_BASE)
    out.width, out.height = width - width % 2, height - height % 2
    out.pix_fmt = "yuv420p"
    out.options = {"crf": "18"} if out.codec_context.name == "libx264" else {}
    return out


def render(video_uri: str, output: str, dest: str, topk: int = 3) -> int:
    """Writes the overlaid video to `dest` ("-": stdout); returns the number of frames
    written. The video must be the version the run read (its videos/ row's): its rows
    would be drawn on another video's frames."""
    try:
        return _render(video_uri, output, dest, topk)
    except _Changed as e:
        raise InputError(f"{storage.public_uri(video_uri)} changed since the run that labelled it ({e}): its rows "
                         f"are of the earlier version; run again into OUTPUT (a changed video is done again) "
                         f"to render this one") from None
    except video.VideoError as e:  # (a video damaged or replaced by another file since the run)
        raise InputError(f"cannot render {storage.public_uri(video_uri)}: {storage.redact(str(e))}") from None


class _Changed(Exception):
    """storage.ObjectChanged, carried past storage.access (which tells a failed read)."""


@contextlib.contextmanager
def _unchanged():
    try:
        yield
    except storage.ObjectChanged as e:
        raise _Changed(str(e)) from None


def _render(video_uri: str, output: str, dest: str, topk: int) -> int:
    import av
    from PIL import Image, ImageFont

    preds = query.read(output, video=video_uri)
    if len(preds) == 0:
        raise InputError(query.missing_video(output, video_uri)
                         or f"no predictions for {storage.public_uri(video_uri)} in {storage.public_uri(output)}")
    listed = query.read(output, commit.VIDEOS_DIR, video=video_uri)
    version = (listed.column("version")[len(listed) - 1].as_py() or "") if len(listed) else ""
    index = preds.column("frame_index").to_numpy()
    tops = preds.column("topk").to_pylist()
    boxes = preds.column("boxes").to_pylist() if "boxes" in preds.column_names else [None] * len(preds)
    palette = report.colours({t["label"] for row in tops for t in (row or [])})
    font = ImageFont.load_default(size=11)
    tmp = tempfile.mkdtemp(prefix="rayvid-render-")
    written = 0
    try:
        with storage.access(video_uri, "read video", InputError), _unchanged(), \
                storage.local_copy(video_uri, tmp, version) as path:
            still = storage.pin(path, version) if storage.is_local(storage.resolve(video_uri)[0]) else lambda: None
            info = video.probe(path)
            index_of = {int(p): i for i, p in enumerate(info.pts)}
            local_out = os.path.join(tmp, "out.mp4")
            with video.open_container(path) as src, av.open(local_out, "w") as dst:
                stream = video.video_stream(src)
                rate = stream.average_rate or stream.guessed_rate or 25
                out = output_stream(dst, rate, info.width, info.height)
                tb, first, last = out.time_base, None, -1
                in_order = iter(range(len(info.pts))) if info.output_order else None  # (known by their order)
                for frame in _frames(src, stream, video_uri):
                    if in_order is not None:
                        i = next(in_order, None)
                    else:
                        i = index_of.get(int(frame.pts)) if frame.pts is not None else None
                    at = np.searchsorted(index, i, side="right") - 1 if i is not None else -1
                    rows = overlay_rows(tops[at], topk) if at >= 0 else []
                    img = video.upright(frame.to_ndarray(format="rgb24"), frame.rotation, info.mirror)
                    if img.shape[:2] != (info.height, info.width):  # a stream whose size changes: scaled, as decoded
                        img = np.asarray(Image.fromarray(img).resize((info.width, info.height), Image.BILINEAR))
                    img = img[: out.height, : out.width]
                    shown = boxes[at] if at >= 0 and index[at] == i else None  # boxes: their own frame only
                    img = draw(img, rows, palette, font, shown)
                    new = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                    # at its source time (a variable frame rate stays so), after the one before
                    t = float(frame.time) if frame.time is not None else None
                    first = t if first is None and t is not None else first
                    at_t = round((t - first) / tb) if t is not None else last + max(1, round(1 / (rate * tb)))
                    new.pts = last = max(last + 1, at_t)
                    new.time_base = tb
                    for packet in out.encode(new):
                        dst.mux(packet)
                    written += 1
                for packet in out.encode():
                    dst.mux(packet)
            still()  # (a local video replaced while it was read)
        query.publish(local_out, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
