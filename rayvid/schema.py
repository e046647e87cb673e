"""The Arrow schemas of everything rayvid writes, and of the rows between its stages.

Output tables carry explicit Arrow types (never Ray's tensor extension type), so DuckDB,
Spark, Athena and pyarrow read them with no casts.
"""

from __future__ import annotations

import math

import pyarrow as pa

SCHEMA_VERSION = "1"
_META = {b"rayvid.schema_version": SCHEMA_VERSION.encode()}

# What the planning stage (segments.py) hands the decode stage: one row per segment.
SEGMENTS_SCHEMA = pa.schema(
    [
        ("video_uri", pa.string()),
        ("segment", pa.int32()),
        ("n_segments", pa.int32()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("source_uri", pa.string()),  # where to read video_uri from, when that differs (a presigned URL)
        ("version", pa.string()),  # as listed: the decoder reads that version or reports it changed
        ("size_bytes", pa.int64()),  # as listed, -1 unknown (or read from source_uri)
    ]
)

# Rows between stages: `kind` says whether a row is a decoded frame or the one terminal row
# that closes each segment of a video ("end"), which carries how many frame rows the
# segment produced and, if it failed, why. The committer publishes a video only when, for
# every one of its segments, both agree.
KIND_FRAME = "frame"
KIND_END = "end"
# A null top-1 label (a detector's frame with no box) as summaries write it
NO_LABEL_TEXT = "(no label)"


def listed_size(size) -> int:
    """A `size_bytes` value as an int: -1 where unknown (-1, None, or NaN: a batch's numpy
    column turns a null int64 into a float NaN)."""
    return int(size) if size is not None and math.isfinite(size) else -1


def label_text(label):
    """A top-1 label as summaries write it: NO_LABEL_TEXT for none."""
    return NO_LABEL_TEXT if label is None else label

TOPK_TYPE = pa.list_(
    pa.struct(
        [
            pa.field("class_id", pa.int32()),
            pa.field("label", pa.string()),
            pa.field("score", pa.float32()),
        ]
    )
)

# What the inference stage emits (and the committer consumes).
INFERRED_SCHEMA = pa.schema(
    [
        ("video_uri", pa.string()),
        ("segment", pa.int32()),
        ("n_segments", pa.int32()),
        ("kind", pa.string()),
        ("frame_index", pa.int64()),
        ("timestamp_s", pa.float64()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("topk", TOPK_TYPE),
        ("n_frames", pa.int64()),
        ("error_stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("decoder", pa.string()),
        ("codec", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("fps", pa.float64()),
        ("duration_s", pa.float64()),
        ("reused_from", pa.int64()),  # -1: inferred; else the frame whose prediction it reuses
        ("bytes_read", pa.int64()),  # end rows: what the segment read from a remote store
    ]
)

def embedding_field(dim: int) -> pa.Field:
    """`--embed`: one vector per frame (null on rows that are not frames)."""
    return pa.field("embedding", pa.list_(pa.float32(), dim))


BOX_TYPE = pa.struct([
    pa.field("label", pa.string()), pa.field("class_id", pa.int32()), pa.field("score", pa.float32()),
    pa.field("x_min", pa.float32()), pa.field("y_min", pa.float32()),
    pa.field("x_max", pa.float32()), pa.field("y_max", pa.float32()),
])


def boxes_field() -> pa.Field:
    """`--head detect`: a frame's detections, best first. Between stages the coordinates
    are fractions of the frame; the committer turns them into pixels of the source frame."""
    return pa.field("boxes", pa.list_(BOX_TYPE))


def clip_fields() -> list[pa.Field]:
    """`--clip-len`: a row is a clip of consecutive frames (its frame_index/timestamp_s are
    its first frame's); what it covers, frames and seconds (end_s: where the next frame
    starts)."""
    return [pa.field("clip_start_frame", pa.int64()), pa.field("clip_end_frame", pa.int64()),
            pa.field("start_s", pa.float64()), pa.field("end_s", pa.float64())]


# Columns a model head adds to the inferred rows and, after `reused_from`, to predictions/.
HEAD_COLUMNS = ("embedding", "boxes", "clip_start_frame", "clip_end_frame", "start_s", "end_s")


def with_head(schema: pa.Schema, head: list[pa.Field]) -> pa.Schema:
    """`schema` with a head's columns: after `reused_from` if it has one, else at the end."""
    if not head:
        return schema
    at = schema.get_field_index("reused_from") + 1 or len(schema)
    fields = list(schema)
    return pa.schema(fields[:at] + list(head) + fields[at:], metadata=schema.metadata)


# Per-video columns the decoder fills on the terminal row (empty on frame rows).
VIDEO_COLUMNS = ("decoder", "codec", "width", "height", "fps", "duration_s")

PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("timestamp_s", pa.float64(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("topk", TOPK_TYPE),
        # null: the model saw this frame; else (--skip-similar) the frame_index of the
        # earlier, near-identical frame whose prediction this row repeats
        pa.field("reused_from", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("run_id", pa.string()),
    ],
    metadata=_META,
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
        pa.field("run_id", pa.string()),
    ],
    metadata=_META,
)

VIDEOS_SCHEMA = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64()),  # as listed: with `version`, what resume compares
        pa.field("version", pa.string()),  # etag or mtime, as listed
        pa.field("frames", pa.int64()),  # frame rows written to predictions/
        pa.field("duration_s", pa.float64()),
        pa.field("fps", pa.float64()),  # the container's average rate
        pa.field("width", pa.int32()),  # as displayed (after the container's rotation)
        pa.field("height", pa.int32()),
        pa.field("codec", pa.string()),
        pa.field("decoder", pa.string()),  # decord or pyav (with why, if decord gave way)
        pa.field("top_labels", pa.list_(pa.struct([("label", pa.string()), ("share", pa.float32())]))),
        pa.field("error", pa.bool_()),
        pa.field("run_id", pa.string()),
    ],
    metadata=_META,
)
