"""Commit stage: inferred rows in, Parquet files that readers can trust out.

Input: Arrow tables in `schema.INFERRED_SCHEMA` (frame rows and one terminal `end` row per
video; plus a head's columns, `schema.HEAD_COLUMNS`), in any order, as the driver streams
them out of Ray Data.
Output, under OUTPUT:
  `predictions/part-<run_id>-<seq>.parquet`  `schema.PREDICTIONS_SCHEMA`, one row per frame
  `errors/part-<run_id>-<seq>.parquet`       `schema.ERRORS_SCHEMA`, one row per failed video
  `videos/part-<run_id>-<seq>.parquet`       `schema.VIDEOS_SCHEMA`, one row per video
  `runs/<run_id>.json`                       the resolved config and the run's stats

Commit protocol. The three files of one flush share a name and are written in the order
predictions, errors, videos; the videos file is the commit point. `recover` (at the start of
every run) deletes predictions/errors files whose videos file never appeared (a run killed
mid-flush) and finishes or undoes what a killed `rayvid compact` left (compact.py), and
reads which videos are committed; `pending` skips them, unless their
content changed (size or etag/mtime) or, with --retry-failed, they failed; `retract`
removes the rows of videos about to be redone from the committed files (predictions first,
videos last) before any new row is written. A reader therefore never sees a video twice,
nor part of one.

A video is published only when it is complete: for each of its segments, the terminal row
has arrived and the number of its frame rows equals the count that row carries. Complete videos are gathered and
written together (a file per `rows_per_file` rows or `flush_interval_s` seconds, so a long
run commits as it goes), sorted by (video_uri, frame_index), each file written atomically
(see `storage.write_atomic`). A reader globbing `predictions/**/*.parquet` therefore never
sees part of a video.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayvid import storage
from rayvid.schema import (BOX_TYPE, ERRORS_SCHEMA, HEAD_COLUMNS, KIND_END, KIND_FRAME, PREDICTIONS_SCHEMA, VIDEOS_SCHEMA,
                           with_head)

PREDICTIONS_DIR = "predictions"
ERRORS_DIR = "errors"
VIDEOS_DIR = "videos"
RUNS_DIR = "runs"
COMPACTIONS_DIR = "compactions"  # intent records of `rayvid compact` (compact.py)
CHANGED = storage.ObjectChanged.__name__  # the error of a video that changed while it was read


class Committer:
    def __init__(
        self,
        output: str,
        run_id: str,
        model: str,
        rows_per_file: int = 1_000_000,
        flush_interval_s: float = 60.0,
        sources: dict | None = None,
    ):
        self.output = output.rstrip("/")
        self.sources = sources or {}  # video_uri -> (size_bytes, version) as listed
        self.run_id = run_id
        self.model = model
        self.rows_per_file = rows_per_file
        self.flush_interval_s = flush_interval_s
        # per (video_uri, segment): frame rows waiting, how many, and the terminal row
        self._pending: dict[tuple, list[pa.Table]] = collections.defaultdict(list)
        self._counts: collections.Counter = collections.Counter()
        self._ends: dict[tuple, dict] = {}
        # per video_uri: the segments already complete (their rows and terminal rows)
        self._segments_done: dict[str, list] = collections.defaultdict(list)
        # units already complete: rows that arrive for them again are duplicates
        self._finished: set = set()
        self.duplicates_dropped = 0
        self._ready: list[pa.Table] = []
        self._ready_rows = 0
        self._ready_errors: list[dict] = []
        self._ready_videos: list[dict] = []
        self._seq = 0
        self._last_flush = time.monotonic()
        self.files: list[str] = []
        self.committed: set = set()  # video_uri of every video this run published
        self.videos_ok = 0
        self.videos_failed = 0
        self.frames = 0
        self.reused = 0  # frame rows that repeat an earlier frame's prediction (--skip-similar)
        self.bytes_read = 0  # by the decoders from remote stores, over published videos
        self.bytes_remote = 0  # the listed size of the published videos on remote stores
        self.label_counts: collections.Counter = collections.Counter()

    def add(self, table: pa.Table) -> None:
        kind = table.column("kind")
        frames = table.filter(pc.equal(kind, KIND_FRAME))
        ends = table.filter(pc.equal(kind, KIND_END))
        if len(frames):
            keys = pc.binary_join_element_wise(
                frames.column("video_uri"), pc.cast(frames.column("segment"), pa.string()), "\x00"
            )
            for key in pc.unique(keys).to_pylist():
                part = frames.filter(pc.equal(keys, key))
                unit = (part.column("video_uri")[0].as_py(), part.column("segment")[0].as_py())
                if unit in self._finished:
                    self.duplicates_dropped += len(part)
                    continue
                self._pending[unit].append(part)
                self._counts[unit] += len(part)
                self._complete_if_done(unit)
        for row in ends.to_pylist():
            unit = (row["video_uri"], row["segment"])
            if unit in self._finished or unit in self._ends:
                continue  # a retried task (its actor died) emitted the segment again
            self._ends[unit] = row
            self._complete_if_done(unit)
        if self._ready_rows >= self.rows_per_file or (
            self._ready_videos
            and time.monotonic() - self._last_flush >= self.flush_interval_s
        ):
            self.flush()

    def _complete_if_done(self, unit: tuple) -> None:
        end = self._ends.get(unit)
        have = self._counts.get(unit, 0)
        if end is None or have < end["n_frames"]:
            return
        if have > end["n_frames"]:
            # A task retried after its actor died sends frames again: keep each frame once.
            table = _first_per_frame(pa.concat_tables(self._pending[unit]))
            self.duplicates_dropped += have - len(table)
            self._pending[unit], self._counts[unit] = [table], len(table)
            if len(table) > end["n_frames"]:
                raise RuntimeError(f"{unit}: {len(table)} distinct frames for {end['n_frames']} decoded frames")
            if len(table) < end["n_frames"]:
                return
        uri = unit[0]
        self._finished.add(unit)
        self._segments_done[uri].append((self._pending.pop(unit, []), end))
        self._counts.pop(unit, None)
        del self._ends[unit]
        if len(self._segments_done[uri]) == end["n_segments"]:
            self._complete_video(uri, self._segments_done.pop(uri))

    def _complete_video(self, uri: str, segments: list) -> None:
        segments.sort(key=lambda s: s[1]["segment"])
        parts = [t for tables, _ in segments for t in tables]
        ends = [e for _, e in segments]
        top_labels = []
        meta = next((e for e in ends if e["codec"]), ends[0])
        if parts:
            video = _fill_reused(pa.concat_tables(parts))
            if "boxes" in video.column_names:
                video = _pixel_boxes(video, meta["width"] or 0, meta["height"] or 0)
            self.reused += int(pc.sum(pc.greater_equal(video.column("reused_from"), 0)).as_py() or 0)
            self._ready.append(video)
            self._ready_rows += len(video)
            self.frames += len(video)
            counts = pc.value_counts(video.column("label")).to_pylist()
            counts.sort(key=lambda c: (-c["counts"], c["values"] or ""))
            self.label_counts.update({c["values"]: c["counts"] for c in counts})
            top_labels = [{"label": c["values"], "share": c["counts"] / len(video)} for c in counts[:5]]
        # an object that changed while read comes first: it is why the rest may have failed,
        # and what makes the next run read the video again (`pending`)
        failed = sorted((e for e in ends if e["error_type"]), key=lambda e: e["error_type"] != CHANGED)
        self.bytes_read += sum(e.get("bytes_read") or 0 for e in ends)
        decoders = sorted({e["decoder"] for e in ends if e["decoder"]})
        size, version = self.sources.get(uri, (-1, ""))
        if "://" in uri:  # the listing writes local files as plain paths
            self.bytes_remote += max(size or 0, 0)
        self._ready_videos.append(
            {
                "video_uri": uri,
                "size_bytes": size,
                "version": version,
                "frames": sum(e["n_frames"] for e in ends),
                "duration_s": meta["duration_s"],
                "fps": meta["fps"],
                "width": meta["width"],
                "height": meta["height"],
                "codec": meta["codec"],
                "decoder": ", ".join(decoders),
                "top_labels": top_labels,
                "error": bool(failed),
                "run_id": self.run_id,
            }
        )
        if failed:
            self.videos_failed += 1
            where = (lambda e: f"segment {e['segment'] + 1}/{e['n_segments']}: ") if len(ends) > 1 else (lambda e: "")
            self._ready_errors.append(
                {
                    "video_uri": uri,
                    "stage": failed[0]["error_stage"],
                    "error_type": failed[0]["error_type"],
                    "message": "; ".join(where(e) + e["message"] for e in failed),
                    "run_id": self.run_id,
                }
            )
        else:
            self.videos_ok += 1

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._ready_videos:
            return
        name = f"part-{self.run_id}-{self._seq:05d}.parquet"
        self._seq += 1
        if self._ready:
            table = pa.concat_tables(self._ready).sort_by(
                [("video_uri", "ascending"), ("frame_index", "ascending")]
            )
            n = len(table)
            head = [table.schema.field(c) for c in HEAD_COLUMNS if c in table.column_names]
            schema = with_head(PREDICTIONS_SCHEMA, head)
            columns = {
                "reused_from": pc.if_else(pc.less(table.column("reused_from"), 0), None,
                                          table.column("reused_from")),
                "model": pa.array([self.model] * n, pa.string()),
                "run_id": pa.array([self.run_id] * n, pa.string()),
            }
            out = pa.Table.from_arrays(
                [columns[f.name] if f.name in columns else table.column(f.name) for f in schema], schema=schema)
            self._write(storage.join(self.output, PREDICTIONS_DIR, name), out)
        if self._ready_errors:
            errors = pa.Table.from_pylist(self._ready_errors, schema=ERRORS_SCHEMA)
            self._write(storage.join(self.output, ERRORS_DIR, name), errors)
        videos = pa.Table.from_pylist(self._ready_videos, schema=VIDEOS_SCHEMA)
        self._write(storage.join(self.output, VIDEOS_DIR, name), videos.sort_by("video_uri"))
        self.committed.update(v["video_uri"] for v in self._ready_videos)
        self._ready, self._ready_rows, self._ready_errors, self._ready_videos = [], 0, [], []

    def _write(self, url: str, table: pa.Table) -> None:
        write_parquet(url, table)
        self.files.append(url)

    def close(self) -> None:
        """Publish what is complete; anything still pending means rows were lost."""
        self.flush()
        incomplete = sorted(set(self._pending) | set(self._ends) | {(u, -1) for u in self._segments_done})
        if incomplete:
            detail = ", ".join(
                f"{u} segment {k} ({self._counts.get((u, k), 0)} frames, end row "
                f"{'seen' if (u, k) in self._ends else 'missing'})" if k >= 0
                else f"{u} ({len(self._segments_done[u])} segments complete, others missing)"
                for u, k in incomplete[:5]
            )
            raise RuntimeError(f"{len(incomplete)} video(s) incomplete at the end of the run: {detail}")


def _fill_reused(video: pa.Table) -> pa.Table:
    """Rows of one video whose `reused_from` names an earlier frame get that frame's
    label, score and top-k (the decoder found the two near-identical: --skip-similar)."""
    reused_from = video.column("reused_from").to_numpy()
    if not (reused_from >= 0).any():
        return video
    index = video.column("frame_index").to_numpy()
    order = np.argsort(index, kind="stable")
    where = np.searchsorted(index, reused_from, sorter=order)
    src = order[np.clip(where, 0, len(order) - 1)]
    reused = reused_from >= 0
    if (index[src][reused] != reused_from[reused]).any():
        raise RuntimeError(f"{video.column('video_uri')[0]}: a reused frame's source row is missing")
    take = pa.array(np.where(reused, src, np.arange(len(video))))
    for name in ("label", "score", "topk", *HEAD_COLUMNS):
        i = video.schema.get_field_index(name)
        if i < 0:
            continue
        video = video.set_column(i, name, video.column(name).take(take))
    return video


def _pixel_boxes(video: pa.Table, width: int, height: int) -> pa.Table:
    """Detections' coordinates, fractions of the (stretched) model input between stages,
    in pixels of the source frame as displayed (`width` x `height`, after the container's
    rotation, like the frames the model saw)."""
    col = video.column("boxes").combine_chunks()
    offsets = col.offsets.to_numpy()
    flat = col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    scale = {"x_min": width, "x_max": width, "y_min": height, "y_max": height}
    fields = [pc.multiply(flat.field(f.name), pa.scalar(float(scale[f.name]), pa.float32())).cast(pa.float32())
              if f.name in scale else flat.field(f.name) for f in BOX_TYPE]
    values = pa.StructArray.from_arrays(fields, fields=list(BOX_TYPE))
    boxes = pa.ListArray.from_arrays(pa.array(offsets - offsets[0], pa.int32()), values,
                                     type=pa.list_(BOX_TYPE), mask=col.is_null())
    return video.set_column(video.schema.get_field_index("boxes"), "boxes", boxes)


def _first_per_frame(table: pa.Table) -> pa.Table:
    table = table.sort_by("frame_index")
    index = table.column("frame_index").to_numpy()
    return table.filter(pa.array(np.concatenate([[True], index[1:] != index[:-1]])))


def write_parquet(url: str, table: pa.Table) -> None:
    """How every output file is written: atomically, zstd, dictionary-encoded strings."""
    dictionary = [c for c in ("video_uri", "label", "model", "run_id", "stage", "error_type", "codec", "decoder")
                  if c in table.column_names]
    storage.write_atomic(
        url,
        lambda f: pq.write_table(table, f, compression="zstd", use_dictionary=dictionary,
                                 row_group_size=128 * 1024),
    )


def write_run_record(output: str, run_id: str, record: dict) -> str:
    url = storage.join(output, RUNS_DIR, f"{run_id}.json")
    data = json.dumps(record, indent=2, sort_keys=True, default=str).encode()
    storage.write_atomic(url, lambda f: f.write(data))
    return url


def predictions_url(output: str) -> str:
    return storage.join(output, PREDICTIONS_DIR)


def errors_url(output: str) -> str:
    return storage.join(output, ERRORS_DIR)



def videos_url(output: str) -> str:
    return storage.join(output, VIDEOS_DIR)


@dataclass
class Committed:
    """What earlier runs committed to OUTPUT: video_uri -> its videos/ row and file name."""

    videos: dict = field(default_factory=dict)
    removed: list = field(default_factory=list)  # orphan files deleted by `recover`


def _parts(fs, directory: str) -> set:
    try:
        return {p.rsplit("/", 1)[-1] for p in fs.glob(directory.rstrip("/") + "/part-*.parquet")}
    except FileNotFoundError:
        return set()


def recover(output: str) -> Committed:
    """Delete what a killed run (or compaction) left half-committed; return what is
    committed."""
    fs, root = storage.resolve(output)
    root = root.rstrip("/")
    finish_compactions(fs, root)
    committed = _parts(fs, f"{root}/{VIDEOS_DIR}")
    state = Committed()
    for directory in (PREDICTIONS_DIR, ERRORS_DIR):
        for name in sorted(_parts(fs, f"{root}/{directory}") - committed):
            fs.rm(f"{root}/{directory}/{name}")
            state.removed.append(f"{directory}/{name}")
    for name in sorted(committed):
        table = pq.read_table(f"{root}/{VIDEOS_DIR}/{name}", filesystem=fs,
                              columns=["video_uri", "size_bytes", "version", "error"])
        for row in table.to_pylist():
            uri = row.pop("video_uri")
            state.videos[uri] = {**row, "file": name, "changed": False}
        if pc.any(table.column("error")).as_py() and fs.exists(f"{root}/{ERRORS_DIR}/{name}"):
            errors = pq.read_table(f"{root}/{ERRORS_DIR}/{name}", filesystem=fs, columns=["video_uri", "error_type"])
            for uri, kind in zip(errors.column("video_uri").to_pylist(), errors.column("error_type").to_pylist()):
                if kind == CHANGED and uri in state.videos:
                    state.videos[uri]["changed"] = True
    return state


def committed_parts(fs, root: str) -> list[str]:
    """The part names whose rows readers should see: those with a videos/ file (the
    commit point), minus those a finished compaction replaced but has not deleted yet."""
    names = _parts(fs, f"{root}/{VIDEOS_DIR}")
    for new, replaces in _compactions(fs, root):
        if new in names:
            names -= set(replaces)
    return sorted(names)


def _compactions(fs, root: str) -> list[tuple[str, list]]:
    try:
        records = sorted(fs.glob(f"{root}/{COMPACTIONS_DIR}/part-*.parquet.json"))
    except FileNotFoundError:
        return []
    out = []
    for path in records:
        with fs.open(path, "rb") as f:
            out.append((path.rsplit("/", 1)[-1][: -len(".json")], json.load(f)["replaces"]))
    return out


def finish_compactions(fs, root: str) -> None:
    """Complete or undo what a killed `rayvid compact` left: if the merged part's videos/
    file exists it is committed, so the parts it replaces go (their commit points first);
    if not, the merged part's other files go and the parts it would replace stay."""
    for new, replaces in _compactions(fs, root):
        if fs.exists(f"{root}/{VIDEOS_DIR}/{new}"):
            for directory in (VIDEOS_DIR, PREDICTIONS_DIR, ERRORS_DIR):
                for name in replaces:
                    if name != new and fs.exists(f"{root}/{directory}/{name}"):
                        fs.rm(f"{root}/{directory}/{name}")
        else:
            for directory in (PREDICTIONS_DIR, ERRORS_DIR):
                if fs.exists(f"{root}/{directory}/{new}"):
                    fs.rm(f"{root}/{directory}/{new}")
        fs.rm(f"{root}/{COMPACTIONS_DIR}/{new}.json")


def pending(videos: pa.Table, committed: Committed, retry_failed: bool) -> tuple[pa.Table, int, set]:
    """(listing rows still to process, how many are skipped, committed videos to redo)."""
    keep, redo, skipped = [], set(), 0
    for i, (uri, size, version) in enumerate(zip(
        videos.column("video_uri").to_pylist(), videos.column("size_bytes").to_pylist(),
        videos.column("version").to_pylist(),
    )):
        done = committed.videos.get(uri)
        if done is None:
            keep.append(i)
            continue
        changed = ((size != -1 and done["size_bytes"] != size) or (version and done["version"] != version)
                   or done.get("changed"))  # it changed while a run read it: read it again
        if changed or (retry_failed and done["error"]):
            keep.append(i)
            redo.add(uri)
        else:
            skipped += 1
    return videos.take(pa.array(keep, pa.int64())), skipped, redo


def retract(output: str, uris: set, committed: Committed) -> None:
    """Remove these videos' rows from the committed files: predictions, errors, then videos
    (the commit point last, so a crash in between leaves them committed-and-changed, which
    the next run retracts again)."""
    if not uris:
        return
    fs, root = storage.resolve(output)
    root = root.rstrip("/")
    names = sorted({committed.videos[u]["file"] for u in uris})
    drop = pa.array(sorted(uris), pa.string())
    for directory in (PREDICTIONS_DIR, ERRORS_DIR, VIDEOS_DIR):
        for name in names:
            path = f"{root}/{directory}/{name}"
            if not fs.exists(path):
                continue
            table = pq.read_table(path, filesystem=fs)
            kept = table.filter(pc.invert(pc.is_in(table.column("video_uri"), value_set=drop)))
            if len(kept) == len(table):
                continue
            if len(kept) == 0:
                fs.rm(path)
            else:
                write_parquet(storage.to_url(fs, path), kept)
