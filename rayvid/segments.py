"""Planning stage: video rows in, segment rows out, so one long video is decoded by many
actors in parallel instead of holding one while the rest of the cluster idles.

Input columns:  `video_uri`, `source_uri` (optional: where to read it from, when that
  differs), `version` (optional: ETag or mtime as listed), `size_bytes` (optional: as
  listed, -1 unknown; and whatever else the listing carries).
Output columns: `video_uri: str`, `segment: int32`, `n_segments: int32`,
  `start_s: float64`, `end_s: float64`, `source_uri: str` (null: read video_uri),
  `version: str` (as listed; for a video listed without one and cut into segments, the
  one its header was read from; "" when unknown: every segment must read that version),
  `size_bytes: int64` (as listed; -1 unknown, or read from source_uri).
It runs before the decode pipeline: for up to `IN_DRIVER` videos in the driver's threads
(starting tasks would cost more than the reads), else as Ray tasks that read headers (16
at a time each, in threads: it is I/O), and the driver collects its small output: every segment then
becomes its own input block of the pipeline, so different decode actors take different
segments. (A streaming repartition inside the pipeline would need a CPU while the decode
and inference actors hold them all: it deadlocked a 2-CPU cluster.)
Segment k of a video holds the frames whose presentation time t satisfies
start_s <= t < end_s, with start_s = k * L and end_s = (k + 1) * L, except that the first
segment starts at -inf and the last ends at +inf. The intervals partition the time line, so
every frame belongs to exactly one segment whatever the codec or GOP structure (the decoder
maps frames to segments by pts, never by counting; a clip run's clips belong to the segment
of their first frame, whose decoder reads on for the clip's other frames). The duration comes from the container
header alone (a few ranged reads on object stores), except for a video listed smaller than
`MIN_BYTES_PER_S` per second of segment, which is one segment unread (and no header's duration counts for more
than its size at that rate: a header may claim 1e10 s); when it is unknown, or the file cannot
be opened here, the video is one segment and the decoder reports what is wrong with it. So
is a video on a store that cannot serve byte ranges (some HTTP servers): each segment would
copy it whole; and one in a container without an index (MPEG-TS/PS: `video.UNSEEKABLE_CONTAINERS`),
or whose frames are known by their order only (H.264/HEVC in AVI, ASF: `video.output_order`),
where each segment would read from the start.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayvid import storage
from rayvid.video import (KEY_HEAD_BYTES, UNSEEKABLE_CONTAINERS, open_container, output_order, packed_b_frames,
                          video_stream)
from rayvid.schema import SEGMENTS_SCHEMA, listed_size

IN_DRIVER = 256  # listings up to this long read their headers in the driver
# Reads of a header on an object store: FFmpeg reads the container's start (and an MP4's
# moov wherever it is) in small pieces; s3fs's default read-ahead would fetch 50 MB of
# each video for it (measured: 52 MB of an 80 MB MP4 to learn its duration).
HEADER_BLOCK_BYTES = 256 * 2**10
PLANNED_FROM = ("video_uri", "source_uri", "version", "size_bytes")  # the listing's columns planning reads
# A video listed at fewer bytes than this per second of --segment-seconds is one segment,
# its header not read. Every 25-30 fps video measured is above it, however still (H.264,
# ffmpeg -preset veryfast -crf 23: a flat grey 360p picture 820-1,025 B/s; 1080p 2,575);
# below it are short clips, and long videos of a few frames per second with nothing moving
# (flat 360p at 5 fps: 175 B/s; at 1 fps: 35), whose few frames decode fast in one actor.
# A wrong guess costs that video's parallelism, never a frame. Archives of short clips
# then start decoding at once: each clip's header was a read before any decoding began.
MIN_BYTES_PER_S = 100


def _unread(size: int, segment_s: float) -> bool:
    """Whether a video of this listed size (-1: unknown) is one segment without a read."""
    return 0 <= size < segment_s * MIN_BYTES_PER_S


def _planned_size(size, source) -> int:
    """The listed size planning goes by: -1 where unknown, or where the video is read from
    another URL (a presigned one: the listing's size is not that object's)."""
    return -1 if source else listed_size(size)


def header_duration(uri: str) -> float:
    """The container's duration in seconds from its header, or 0.0 if unknown."""
    return header(uri)[0]


def header(uri: str, want_version: bool = False, size: int = -1) -> tuple[float, str]:
    """(duration in seconds from the container's header, or 0.0 if unknown; with
    `want_version`, the object's version now: "" if unknown or unreadable). `size` is the
    object's as listed (-1: unknown, then asked of the store): the header is read in
    ranges alone (`storage.RangeReader`), no metadata request."""
    import av

    fs, path = storage.resolve(uri)
    version = ""
    try:
        if want_version:
            info = fs.info(path)
            version, size = storage.version_of(info), info.get("size", -1) if size < 0 else size
        if size is None or size < 0:
            size = fs.size(path)
        if size is None or not storage.serves_ranges(fs, path, size):  # then every segment would copy it whole
            return 0.0, version
        with storage.RangeReader(fs, path, size, HEADER_BLOCK_BYTES) as f, open_container(f) as container:
            stream = video_stream(container)
            codec = stream.codec_context.codec.canonical_name if stream is not None and stream.codec_context else ""
            packed = False
            if codec == "mpeg4" and output_order(container.format.name or "", codec, packed=True):
                first = next((p for p in container.demux(stream) if p.size), None)  # (its user data, as probe reads)
                packed = packed_b_frames(stream, bytes(memoryview(first)[:KEY_HEAD_BYTES]) if first is not None else b"")
            if (UNSEEKABLE_CONTAINERS & set((container.format.name or "").split(","))
                    or output_order(container.format.name or "", codec, packed)):
                return 0.0, version  # no index to seek by, or frames known by their order: read from the start
            # no longer than its size allows at MIN_BYTES_PER_S: a header may say anything
            # (a 1 MB Matroska file saying 1e10 s planned 16.7 million empty segments)
            most = size / MIN_BYTES_PER_S
            if container.duration:
                duration = container.duration / 1_000_000  # AV_TIME_BASE
                if "matroska" in (container.format.name or "") and (container.start_time or 0) > 0:
                    duration -= container.start_time / 1_000_000  # Matroska's counts from 0, not from its start
                return min(duration, most), version
            if stream is not None and stream.duration and stream.time_base:
                return min(float(stream.duration * stream.time_base), most), version
    except (av.FFmpegError, IndexError, *storage.ACCESS_ERRORS):
        pass
    return 0.0, version


def bounds(duration_s: float, segment_s: float) -> list[tuple[float, float]]:
    """[(start_s, end_s)] for a video of this duration cut into segments of segment_s."""
    if segment_s <= 0 or duration_s <= segment_s:
        return [(-math.inf, math.inf)]
    n = math.ceil(duration_s / segment_s)
    starts = [-math.inf] + [k * segment_s for k in range(1, n)]
    ends = [k * segment_s for k in range(1, n)] + [math.inf]
    return list(zip(starts, ends))


def plan(batch: dict, segment_s: float) -> dict:
    """Ray Data `map_batches` function (tasks, I/O bound): one row per segment."""
    uris, segs, counts, starts, ends, sources, versions, listed_sizes = [], [], [], [], [], [], [], []
    videos = [str(u) for u in batch["video_uri"]]
    read_from = [s or None for s in batch["source_uri"]] if "source_uri" in batch else [None] * len(videos)
    listed = [v or "" for v in batch["version"]] if "version" in batch else [""] * len(videos)
    sizes = ([_planned_size(n, s) for n, s in zip(batch["size_bytes"], read_from)]
             if "size_bytes" in batch else [-1] * len(videos))
    with ThreadPoolExecutor(max_workers=16) as pool:
        # a video listed without a version (a manifest) gets the one its header was read
        # from: every segment must read that one, or frames of two videos would pass as one
        probed = [i for i, n in enumerate(sizes) if segment_s > 0 and not _unread(n, segment_s)]
        heads = [(0.0, "")] * len(videos)
        for i, head in zip(probed, pool.map(header, [read_from[i] or videos[i] for i in probed],
                                            [not listed[i] for i in probed], [sizes[i] for i in probed])):
            heads[i] = head
    for uri, source, version, size, (duration, now) in zip(videos, read_from, listed, sizes, heads):
        parts = bounds(duration, segment_s)
        if len(parts) > 1:
            version = version or now
        for k, (start, end) in enumerate(parts):
            uris.append(uri)
            sources.append(source)
            versions.append(version)
            listed_sizes.append(size)
            segs.append(k)
            counts.append(len(parts))
            starts.append(start)
            ends.append(end)
    return {
        "video_uri": np.array(uris, dtype=object),
        "segment": np.array(segs, dtype=np.int32),
        "n_segments": np.array(counts, dtype=np.int32),
        "start_s": np.array(starts, dtype=np.float64),
        "end_s": np.array(ends, dtype=np.float64),
        "source_uri": np.array(sources, dtype=object),
        "version": np.array(versions, dtype=object),
        "size_bytes": np.array(listed_sizes, dtype=np.int64),
    }


def _one_segment_each(videos: pa.Table, sizes) -> pa.Table:
    n = len(videos)
    return pa.table(
        {"video_uri": videos.column("video_uri"), "segment": np.zeros(n, np.int32),
         "n_segments": np.ones(n, np.int32), "start_s": np.full(n, -math.inf),
         "end_s": np.full(n, math.inf), "source_uri": videos.column("source_uri"),
         "version": videos.column("version"), "size_bytes": sizes},
        schema=SEGMENTS_SCHEMA,
    )


def plan_all(videos: pa.Table, segment_s: float, in_driver: int = IN_DRIVER) -> pa.Table:
    """Segment rows for every listed video (header probes in the driver's threads for up to
    `in_driver` videos, else in parallel Ray tasks)."""
    if "source_uri" not in videos.column_names:
        videos = videos.append_column("source_uri", pa.nulls(len(videos), pa.string()))
    if "version" not in videos.column_names:
        videos = videos.append_column("version", pa.array([""] * len(videos), pa.string()))
    if "size_bytes" not in videos.column_names:
        videos = videos.append_column("size_bytes", pa.array([-1] * len(videos), pa.int64()))
    # the listed size planning goes by (`_planned_size`: -1 for a video read from another URL)
    sizes = pc.if_else(pc.fill_null(pc.equal(videos.column("source_uri"), ""), True),
                       pc.fill_null(videos.column("size_bytes"), -1), -1)
    if segment_s <= 0 or len(videos) == 0:
        return _one_segment_each(videos, sizes)
    # the videos too small to read (`_unread`) are one segment each, here, whatever their number
    unread = pc.and_(pc.greater_equal(sizes, 0), pc.less(sizes, segment_s * MIN_BYTES_PER_S))
    probed = videos.filter(pc.invert(unread))
    parts = [_one_segment_each(videos.filter(unread), sizes.filter(unread))]
    if len(probed) <= in_driver:
        parts.append(pa.table(plan({c: probed.column(c).to_numpy(zero_copy_only=False) for c in PLANNED_FROM},
                                   segment_s)).cast(SEGMENTS_SCHEMA))
    else:
        import ray

        per_task = max(32, math.ceil(len(probed) / 1000))
        blocks = [probed.slice(i, per_task).select(list(PLANNED_FROM)) for i in range(0, len(probed), per_task)]
        ds = ray.data.from_blocks(blocks).map_batches(
            plan, fn_kwargs=dict(segment_s=segment_s), batch_size=None, batch_format="numpy",
        )
        parts += [(pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b).cast(SEGMENTS_SCHEMA)
                  for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    table = pa.concat_tables(parts)
    return table.sort_by([("video_uri", "ascending"), ("segment", "ascending")])
