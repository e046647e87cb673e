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
mid-flush), finishes or undoes what a killed `rayvid compact` left (compact.py), finishes
a killed run's `retract`, and reads which videos are committed; `pending` skips them,
unless their content changed (size or etag/mtime) or, with --retry-failed, they failed;
`retract` removes the rows of videos about to be redone from the committed files (an
intent record `retractions/<run_id>.json` first, which a later `recover` completes if the
run dies part-way) before any new row is written. A reader therefore never sees a video
twice, nor part of one.

Several runs may write into one OUTPUT at once (shards of an archive): `recover` touches
only what dead writers left. A run's record (`runs/<run_id>.json`) names its host and
process and is rewritten every HEARTBEAT_S while it runs (`Heartbeat`); a writer is dead
when its record no longer says running, when it ran on this host and its process is gone,
or when its record is older than LEASE_S. A run id used again (a resubmitted job) numbers
its files after the ones already there.

A video is published only when it is complete: for each of its segments, the terminal row
has arrived and the number of its frame rows equals the count that row carries. Complete videos are gathered and
written together (a file per `rows_per_file` rows, `videos_per_file` videos or
`flush_interval_s` seconds, so a long run commits as it goes), sorted by (video_uri, frame_index), each file written atomically
(see `storage.write_atomic`). A reader globbing `predictions/**/*.parquet` therefore never
sees part of a video.
"""

from __future__ import annotations

import calendar
import collections
import concurrent.futures
import contextlib
import functools
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayvid import storage
from rayvid.errors import ConfigError, StorageError
from rayvid.schema import (BOX_TYPE, ERRORS_SCHEMA, HEAD_COLUMNS, KIND_END, KIND_FRAME, PREDICTIONS_SCHEMA, VIDEOS_SCHEMA,
                           clip_fields, with_head)

PREDICTIONS_DIR = "predictions"
ERRORS_DIR = "errors"
VIDEOS_DIR = "videos"
RUNS_DIR = "runs"
COMPACTIONS_DIR = "compactions"  # intent records of `rayvid compact` (compact.py)
RETRACTIONS_DIR = "retractions"  # intent records of `retract`
CHANGED = storage.ObjectChanged.__name__  # the error of a video that changed while it was read
# errors a listed video is read again after (`Committed`'s `changed`), --retry-failed or not:
# it changed while read; or it was not there when read (deleted since listed; a local INPUT
# that a cluster's other node does not have: a video listed again is there now)
READ_AGAIN = pa.array([CHANGED, "NotFound"], pa.string())
_KEPT = re.compile(r" \(\d+ decoded (frames|clips) kept\)")  # what an error row says a segment delivered
HEARTBEAT_S = 30.0  # a running run rewrites its record this often
LEASE_S = 300.0  # a running run's record older than this (on another host): the run is dead
COMPACTION_LEASE_S = 3600.0  # a compaction (on another host) older than this is dead
# Complete videos waiting for the next flush are merged into one table every this many
# (where together they hold at most MERGE_BYTES): a small table per video held ~22 KB of the
# driver's memory for a 3-frame clip (Arrow's per-column objects), ~2.5 KB merged; and a
# file holds at most VIDEOS_PER_FILE videos, whatever the interval (archives of short clips)
MERGE_EVERY = 256
MERGE_BYTES = 64 * 2**20
VIDEOS_PER_FILE = 100_000
READ_WHOLE_BYTES = 8 * 2**20  # a listed file up to this size is read in one request
RECOVER_READS = 16  # videos/ (and errors/) parts `recover` reads at once, and `retract` rewrites
RETRACT_BYTES = 128 * 2**20  # of the parts `retract` rewrites at once (their sizes as listed)

log = logging.getLogger("rayvid")


class UriIndex:
    """The rows of a string column (video URIs), looked up by value through 16 bytes per
    row beside the column itself: each value's hash (Python's, or `key`: a test's colliding
    one checks that values tell equal hashes apart) and its row, sorted by hash. A dict
    from URI to row would hold a Python string and an int per row besides the column (about
    100 bytes). `keys`: the values' hashes where the caller has them already."""

    def __init__(self, uris: pa.Array | pa.ChunkedArray, key=hash, keys: np.ndarray | None = None):
        self.key, self.uris = key, _one_chunk(uris)
        keys = _hashes(self.uris, key) if keys is None else keys
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]

    def row(self, uri: str) -> int:
        """The first row holding `uri`, or -1."""
        k = self.key(uri)
        i = int(np.searchsorted(self.keys, k))
        while i < len(self.keys) and self.keys[i] == k:
            row = int(self.order[i])
            if self.uris[row].as_py() == uri:
                return row
            i += 1
        return -1

    def rows(self, uris: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """`row` of each of `uris` (int64, -1 where not here), vectorized: about 0.5 us a
        value against 3 us for `row` one at a time."""
        uris = _one_chunk(uris)
        keys = _hashes(uris, self.key)
        at = np.searchsorted(self.keys, keys)
        hit = np.flatnonzero(at < len(self.keys))
        hit = hit[self.keys[at[hit]] == keys[hit]]
        candidate = self.order[at[hit]]
        same = pc.equal(self.uris.take(pa.array(candidate)), uris.take(pa.array(hit))).to_numpy(zero_copy_only=False)
        rows = np.full(len(uris), -1, np.int64)
        rows[hit[same]] = candidate[same]
        for i in hit[~same]:  # another value with the same hash sorts first (rare): one at a time
            rows[i] = self.row(uris[int(i)].as_py())
        return rows


def _hashes(uris: pa.Array, key) -> np.ndarray:
    """`key` of each value, a slice of Python strings at a time (never the whole column)."""
    return np.fromiter((key(u) for i in range(0, len(uris), 2**16) for u in uris.slice(i, 2**16).to_pylist()),
                       dtype=np.int64, count=len(uris))


class Listed:
    """Each listed video's (size_bytes, version), looked up by video_uri in the listing's
    own Arrow columns (`UriIndex`; about 3 us a lookup): a dict from URI to (size, version)
    grew the driver by 317 MB per million videos, this by 23 MB (bench/listed_memory.py,
    BENCHMARKS.md)."""

    def __init__(self, videos: pa.Table, key=hash):
        self.index = UriIndex(videos.column("video_uri"), key)
        self.sizes, self.versions = (_one_chunk(videos.column(c)) for c in ("size_bytes", "version"))

    def get(self, uri: str) -> tuple[int, str]:
        """(size_bytes, version) as listed; (-1, "") for a video not listed."""
        row = self.index.row(uri)
        return (-1, "") if row < 0 else (self.sizes[row].as_py(), self.versions[row].as_py())


def _one_chunk(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The column as one array (O(1) to index), not copied where it is one already."""
    if isinstance(column, pa.Array):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


class Committer:
    def __init__(
        self,
        output: str,
        run_id: str,
        model: str,
        rows_per_file: int = 1_000_000,
        flush_interval_s: float = 60.0,
        videos_per_file: int = VIDEOS_PER_FILE,
        listed: Listed | None = None,
        guard=None,
    ):
        self.output = output.rstrip("/")
        self.listed = listed  # each video's size and version as listed, for its videos/ row
        self.guard = guard  # called before each flush writes anything: raises to stop it (`Rivals.check`)
        self.run_id = run_id
        self.model = model
        self.rows_per_file = rows_per_file
        self.videos_per_file = videos_per_file
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
        self._ready: list[pa.Table] = []  # complete videos' rows: merged tables, then up to MERGE_EVERY small ones
        self._unmerged = 0  # the small ones at its end
        self._ready_rows = 0
        self._ready_errors: list[dict] = []
        self._ready_videos: list[dict] = []
        self._seq = _next_seq(self.output, run_id)  # a run id used again: after its files
        self._attempt: tuple | None = None  # (name, counts of what it took) of a flush that raised
        self._head_checked = False  # this run's head columns against OUTPUT's (`_check_head`)
        self._last_flush = time.monotonic()
        self.files: list[str] = []
        self.committed: set = set()  # video_uri of every video this run published
        self.videos_ok = 0
        self.videos_failed = 0
        self.frames = 0
        self.reused = 0  # frame rows that repeat an earlier frame's prediction (--skip-similar)
        self.dropped_inferred = 0  # inferred frames of videos that changed while read: not committed
        self.bytes_read = 0  # by the decoders from remote stores, over published videos
        self.bytes_remote = 0  # the listed size of the published videos on remote stores
        self.label_counts: collections.Counter = collections.Counter()
        self._lock = threading.RLock()  # add/flush against `publishing_while_idle`'s thread
        self._idle_error: BaseException | None = None
        # OUTPUT's store went away (after the client's bounded retries): the run is ending,
        # and no later flush waits out those retries again (`_write`)
        self.unreachable: BaseException | None = None

    @contextlib.contextmanager
    def publishing_while_idle(self, every_s: float) -> Iterator["Committer"]:
        """While the body runs, a thread checks every `every_s` seconds whether the
        complete videos are due (`flush_if_due`), so that a quiet pipeline (a long remote
        copy, a slow model start, while the driver waits for the next block) holds none
        back past `flush_interval_s`. A failure of that thread's flush is raised by the
        next `add`, or when the body ends."""
        stop = threading.Event()

        def tick():
            while not stop.wait(every_s):
                try:
                    self.flush_if_due()
                except Exception as e:  # noqa: BLE001 - raised in the driver's thread
                    self._idle_error = e
                    return

        thread = threading.Thread(target=tick, name="rayvid-commit", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
        self._raise_idle_error()

    def _raise_idle_error(self) -> None:
        error, self._idle_error = self._idle_error, None
        if error is not None:
            raise error

    def add(self, table: pa.Table) -> None:
        self._raise_idle_error()
        with self._lock:
            self._add(table)

    def _add(self, table: pa.Table) -> None:
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
        if self._ready_rows >= self.rows_per_file or len(self._ready_videos) >= self.videos_per_file:
            self.flush()
        else:
            self.flush_if_due()

    def flush_if_due(self) -> None:
        """Publish the complete videos if `flush_interval_s` has passed since the last flush."""
        with self._lock:
            if self._ready_videos and time.monotonic() - self._last_flush >= self.flush_interval_s:
                self.flush()

    def _complete_if_done(self, unit: tuple) -> None:
        end = self._ends.get(unit)
        have = self._counts.get(unit, 0)
        if end is None or have < end["n_frames"]:
            return
        # A task retried after its actor died sends frames again, and its end row may come
        # before the rest of its frames (blocks are not kept in order): count each frame once.
        distinct = pc.count_distinct(pa.chunked_array([t.column("frame_index") for t in self._pending[unit]],
                                                      pa.int64())).as_py() if have else 0
        if distinct > end["n_frames"]:
            raise RuntimeError(f"{unit}: {distinct} distinct frames for {end['n_frames']} decoded frames")
        if have > distinct:
            table = _first_per_frame(pa.concat_tables(self._pending[unit]))
            self.duplicates_dropped += have - len(table)
            self._pending[unit], self._counts[unit] = [table], len(table)
        if distinct < end["n_frames"]:
            return
        uri = unit[0]
        self._finished.add(unit)
        self._segments_done[uri].append((self._pending.pop(unit, []), end))
        self._counts.pop(unit, None)
        del self._ends[unit]
        if len(self._segments_done[uri]) == end["n_segments"]:
            self._complete_video(uri, self._segments_done.pop(uri))

    def _complete_video(self, uri: str, segments: list) -> None:
        if len(self._ready_videos) >= self.videos_per_file:  # (a video with frames or not: failed ones count too)
            self.flush()
        segments.sort(key=lambda s: s[1]["segment"])
        parts = [t for tables, _ in segments for t in tables]
        ends = [e for _, e in segments]
        # an object that changed while it was read: the frames decoded before that was found
        # may be of either version (a store that neither honours If-Match nor names the ETag
        # in its answers, a local file, a manifest's video: found at the segment's end), so
        # none is committed; its error row makes the next run read the video again (`pending`)
        changed = any(e["error_type"] == CHANGED for e in ends)
        if changed:
            self.dropped_inferred += sum(int(pc.sum(pc.less(t.column("reused_from"), 0)).as_py() or 0) for t in parts)
            parts = []
        top_labels = []
        # (a segment that kept no frame of a partial copy decoded none: its size may be the
        # stored one, unrotated, or 0x0; one that kept frames read them off a frame)
        meta = next((e for e in ends if e["codec"] and e["n_frames"]), None) or \
            next((e for e in ends if e["codec"]), ends[0])
        if parts:
            video = _fill_reused(pa.concat_tables(parts))
            if "boxes" in video.column_names:
                video = _pixel_boxes(video, meta["width"] or 0, meta["height"] or 0)
            if self._ready_rows and self._ready_rows + len(video) > self.rows_per_file:
                self.flush()  # a file holds whole videos, and more than rows_per_file only for one
            self.reused += int(pc.sum(pc.greater_equal(video.column("reused_from"), 0)).as_py() or 0)
            self._ready.append(video)
            self._ready_rows += len(video)
            self._unmerged += 1
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
        size, version = self.listed.get(uri) if self.listed is not None else (-1, "")
        if "://" in uri:  # the listing writes local files as plain paths
            self.bytes_remote += max(size or 0, 0)
        self._ready_videos.append(
            {
                "video_uri": uri,
                "size_bytes": size,
                "version": version,
                "frames": 0 if changed else sum(e["n_frames"] for e in ends),
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
            self._ready_errors.append(
                {
                    "video_uri": uri,
                    "stage": failed[0]["error_stage"],
                    "error_type": failed[0]["error_type"],
                    "message": _segments_said(failed, len(ends) > 1, changed)
                    + ("; no frame of it committed: the next run reads it again" if changed else ""),
                    "run_id": self.run_id,
                }
            )
        else:
            self.videos_ok += 1
        if self._unmerged >= MERGE_EVERY:  # last: the video is whole in what waits, merged or not
            tail = self._ready[-self._unmerged:]
            if sum(t.nbytes for t in tail) <= MERGE_BYTES:  # (large videos' tables: no overhead worth a copy)
                self._ready[-self._unmerged:] = [pa.concat_tables(tail).combine_chunks()]
            self._unmerged = 0

    def done(self) -> dict:
        """What this run has committed so far (not what waits for the next flush)."""
        waiting = list(self._ready_videos)  # (the heartbeat's thread asks while the run adds)
        ok_waiting = sum(not v["error"] for v in waiting)
        return {"videos_ok": max(0, self.videos_ok - ok_waiting),
                "videos_failed": max(0, self.videos_failed - (len(waiting) - ok_waiting)),
                "frames": max(0, self.frames - self._ready_rows)}

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._ready_videos:
            return
        if self.guard is not None:
            self.guard()
        if self._attempt is not None:  # a flush that failed: its part may be committed all the same
            self._settle_attempt()
            if not self._ready_videos:
                return
        name = f"part-{self.run_id}-{self._seq:05d}.parquet"
        self._attempt = (name, self._ready_rows, len(self._ready_errors), len(self._ready_videos))
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
            if not self._head_checked:
                _check_head(self.output, head)
                self._head_checked = True
            self._write(storage.join(self.output, PREDICTIONS_DIR, name), out)
        if self._ready_errors:
            errors = pa.Table.from_pylist(self._ready_errors, schema=ERRORS_SCHEMA)
            self._write(storage.join(self.output, ERRORS_DIR, name), errors)
        videos = pa.Table.from_pylist(self._ready_videos, schema=VIDEOS_SCHEMA)
        self._write(storage.join(self.output, VIDEOS_DIR, name), videos.sort_by("video_uri"))
        self.committed.update(v["video_uri"] for v in self._ready_videos)
        self._ready, self._ready_rows, self._ready_errors, self._ready_videos = [], 0, [], []
        self._unmerged = 0
        self._seq, self._attempt = self._seq + 1, None

    def _settle_attempt(self) -> None:
        """After a flush that raised (a Ctrl-C or SIGTERM while S3 answered its last PUT,
        which had stored the object; a write the store refused): where its videos/ file is
        there, it committed, and its videos leave what waits (a flush again under the next
        name committed them twice); else its name is used again, whatever of its files was
        written being overwritten before the commit point."""
        if self.unreachable is not None:
            raise self.unreachable
        name, rows, errors, videos = self._attempt
        url = storage.join(self.output, VIDEOS_DIR, name)
        fs, path = storage.resolve(url)
        with contextlib.suppress(Exception):
            fs.invalidate_cache(path)
        if fs.exists(path):
            self.committed.update(v["video_uri"] for v in self._ready_videos[:videos])
            rest = pa.concat_tables(self._ready).slice(rows) if self._ready else None  # (the rows added since)
            self._ready = [rest] if rest is not None and len(rest) else []
            self._ready_rows, self._unmerged = self._ready_rows - rows, 0
            self._ready_errors, self._ready_videos = self._ready_errors[errors:], self._ready_videos[videos:]
            if url not in self.files:
                self.files.append(url)
            self._seq += 1
        self._attempt = None

    def _write(self, url: str, table: pa.Table) -> None:
        if self.unreachable is not None:
            raise self.unreachable
        try:
            write_parquet(url, table)
        except storage.ACCESS_ERRORS as e:
            if storage.is_unavailable(e):
                self.unreachable = e
            raise
        if url not in self.files[-3:]:  # (a flush again under the same name)
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


def _check_head(output: str, head: list, names_only: bool = False) -> None:
    """ConfigError unless the head columns (`--embed`, `--head detect`, `--clip-len`) of
    this run's predictions are those OUTPUT's committed predictions have: query engines
    read `predictions/*.parquet` as one table (Polars and pyarrow datasets refuse files that
    differ, DuckDB drops what the first file lacks), and a run skips the videos OUTPUT has,
    so a new head would cover only new videos. `head`: this run's fields, or with
    `names_only` their names (what planning knows before the model has loaded: not an
    embedding's size)."""
    fs, root = storage.resolve(output)
    root = root.rstrip("/")
    for name in committed_parts(fs, root):
        path = f"{root}/{PREDICTIONS_DIR}/{name}"
        if not fs.exists(path):
            continue  # a part of failed videos only
        with fs.open(path, "rb") as f:
            theirs = [fl for fl in pq.read_schema(f) if fl.name in HEAD_COLUMNS]
        differ = ([fl.name for fl in theirs] != head if names_only  # (types as Arrow compares them)
                  else [(fl.name, fl.type) for fl in theirs] != [(fl.name, fl.type) for fl in head])
        if differ:
            ours = head if names_only else [f"{fl.name} {fl.type}" for fl in head]
            raise ConfigError(
                f"OUTPUT {storage.public_uri(output)} holds predictions with head columns "
                f"[{', '.join(f'{fl.name} {fl.type}' for fl in theirs) or 'none'}] (part {name}); "
                f"this run's are [{', '.join(ours) or 'none'}]: write it into another OUTPUT")
        return


def check_head_planned(output: str, embed: bool, detect: bool, clips: bool) -> None:
    """`_check_head` by the names of the head columns a run will write (an embedding,
    boxes, clips' bounds), before it decodes anything: a run into an OUTPUT of another head
    stops at once (its dry run says so), not at its first commit."""
    names = ["boxes"] if detect else ["embedding"] if embed else []
    _check_head(output, names + ([fl.name for fl in clip_fields()] if clips else []), names_only=True)


def _segments_said(failed: list, several: bool, changed: bool) -> str:
    """The failed segments' messages, each said once for a run of segments that say the
    same (`segments 1-5/5: the video stream has no frames`), in segment order."""
    runs: list = []  # [first, last, n_segments, message]
    for e in failed:
        message = _KEPT.sub("", e["message"]) if changed else e["message"]
        if runs and runs[-1][3] == message and runs[-1][1] == e["segment"] - 1:
            runs[-1][1] = e["segment"]
        else:
            runs.append([e["segment"], e["segment"], e["n_segments"], message])
    if not several:
        return "; ".join(m for *_, m in runs)
    return "; ".join((f"segment {a + 1}/{n}: " if a == b else f"segments {a + 1}-{b + 1}/{n}: ") + m
                     for a, b, n, m in runs)


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
    # a source that is itself reused (attempts of a retried task merged, each with its own
    # --skip-similar choices): follow it to the frame inferred (sources are earlier frames)
    take = np.where(reused, src, np.arange(len(video)))
    while reused[take].any():
        take = np.where(reused[take], take[take], take)
    take = pa.array(take)
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


def read_parquet(fs, path: str, columns: list | None = None, data: bytes | None = None) -> pa.Table:
    """How every output file is read: from its bytes where `fetch_whole` has them; else
    through a handle closed here (pyarrow, given an fsspec filesystem, leaves its files to
    the garbage collector: gcsfs then logs an error for each file's read-ahead task still
    pending)."""
    if data is not None:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def fetch_whole(fs, path: str, size: int | None) -> bytes | None:
    """A file a listing gave the `size` of, where small, in one request (opening it on S3
    or GCS asks for its metadata first: two); else None. (start=0: s3fs asks for no size
    before a ranged GET.)"""
    if size is not None and size <= READ_WHOLE_BYTES:
        return fs.cat_file(path, start=0)
    return None


def in_order(pool: concurrent.futures.Executor, fn, items: list, ahead: int) -> Iterator:
    """fn(item) of each item, in order, run in `pool` at most `ahead` items ahead of the
    one taken."""
    queued: collections.deque = collections.deque()
    for item in items:
        queued.append(pool.submit(fn, item))
        if len(queued) >= ahead:
            yield queued.popleft().result()
    while queued:
        yield queued.popleft().result()


def record_time(t: float) -> str:
    """A time as run records write it (started_at, finished_at; `runs` shows heartbeats so)."""
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"{t!r} is no time")
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))


def write_run_record(output: str, run_id: str, record: dict) -> str:
    url = storage.join(output, RUNS_DIR, f"{run_id}.json")
    data = json.dumps(record, indent=2, sort_keys=True, default=str).encode()
    storage.write_atomic(url, lambda f: f.write(data))
    return url


def run_of(name: str) -> str:
    """The run id in a part's name, `part-<run_id>-<seq>.parquet`."""
    return name[len("part-"):].rsplit("-", 1)[0]


def _next_seq(output: str, run_id: str) -> int:
    """1 + the highest <seq> of OUTPUT's files named `part-<run_id>-<seq>.parquet` (0: none)."""
    fs, root = storage.resolve(output)
    pattern = re.compile(rf"part-{re.escape(run_id)}-(\d+)\.parquet")
    seqs = [int(m[1]) for directory in (PREDICTIONS_DIR, ERRORS_DIR, VIDEOS_DIR)
            for name in part_sizes(fs, f"{root.rstrip('/')}/{directory}") if (m := pattern.fullmatch(name))]
    return max(seqs, default=-1) + 1


def writer() -> dict:
    """Who writes: the fields by which another process tells whether this one still runs:
    its host (for people), `node` (this boot of this machine and its process namespace:
    containers that share a host name do not share it) and its process (pid and start)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "node": _node(), "pid": pid, "pid_started": storage.process_started(pid) or ""}


@functools.lru_cache(maxsize=1)
def _node() -> str:
    """Where a process id means the same process: this boot, this pid namespace ("" where
    /proc cannot say: then only heartbeats tell)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{socket.gethostname()}/{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


_ACTIVE: set = set()  # runs, compactions and retractions this process is doing now
# (OUTPUT's root, run id) of runs here whose record another run wrote over (`RunIdTaken`):
# their heartbeats write it no more, even where a beat had read its own record just before
_TAKEN: set = set()


@contextlib.contextmanager
def active(key: str):
    """Marks work of this process (a run id, a merged part's name) as going on, for
    `recover` in the same process (a notebook running one job after a failed one)."""
    _ACTIVE.add(key)
    try:
        yield
    finally:
        _ACTIVE.discard(key)


def _gone(record: dict, key: str) -> bool | None:
    """True/False where the writer ran on this host (its process is gone, or not; in this
    process, whether `key` is still `active`); None where this host cannot tell."""
    if not record.get("node") or record.get("node") != _node() or not record.get("pid"):
        return None
    try:
        pid = int(record["pid"])
    except (TypeError, ValueError):
        return None
    if pid == os.getpid():
        return key not in _ACTIVE
    return not storage.process_running(pid, record.get("pid_started") or "")


def alive(record: dict | None, now: float | None = None) -> bool:
    """Whether the run of this record (runs/<run_id>.json) may still be writing."""
    if not isinstance(record, dict) or record.get("status") != "running":
        return False  # (a record rayvid did not write, which no live run would leave so: its heartbeat rewrites it)
    gone = _gone(record, str(record.get("run_id") or ""))
    if gone is not None:
        return not gone
    try:
        beat = float(record.get("heartbeat_at") or 0)
    except (TypeError, ValueError):
        return False
    return (now or time.time()) - beat < LEASE_S


def recorded(record: dict) -> float:
    """When a run first wrote its record (`recorded_at`, epoch seconds: the order of runs
    into one OUTPUT); for a record of an earlier rayvid, its `started_at`."""
    at = record.get("recorded_at")
    if isinstance(at, (int, float)) and not isinstance(at, bool):
        return float(at)
    try:
        return float(calendar.timegm(time.strptime(str(record.get("started_at")), "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return 0.0


def read_run_record(fs, root: str, run_id: str) -> dict | None:
    try:
        with fs.open(f"{root}/{RUNS_DIR}/{run_id}.json", "rb") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


class RunIdTaken(ConfigError):
    """Another run writes this run's record: one of them stops, and writes nothing more
    (no failed record over the other's, no listing removed)."""


def _writer_of(record) -> tuple:
    return tuple(record.get(k) for k in ("node", "pid", "pid_started")) if isinstance(record, dict) else ()


def refuse_live_run_id(output: str, run_id: str, warn: bool = True) -> None:
    """ConfigError where a live run of this run id writes into OUTPUT: its files and this
    run's would share names, each overwriting the other's record and listing, and neither
    would see the other as a rival. A run of that id that ended or died leaves it free
    (`warn`: said)."""
    fs, root = storage.resolve(output)
    other = read_run_record(fs, root.rstrip("/"), run_id)
    if alive(other):
        raise ConfigError(f"run id {run_id} is in use: a run of that id (host {other.get('host')}, started "
                          f"{other.get('started_at')}) is running into this OUTPUT: wait for it to end "
                          f"(`rayvid runs OUTPUT`), or give another --run-id{_lease_hint(other)}")
    if warn and isinstance(other, dict):  # (a resubmitted job: meant; a run id copied into a config file: maybe not)
        log.warning("run id %s was used before in this OUTPUT (status %s, started %s): this run's record replaces "
                    "that run's, and its rows keep that id; give another --run-id to keep both records", run_id,
                    other.get("status"), other.get("started_at"))


def _lease_hint(record: dict) -> str:
    """For a live run on another host: when it stops counting if it died there ("" on this
    host, whose processes are asked, or where its record has no heartbeat)."""
    beat = record.get("heartbeat_at")
    if record.get("node") == _node() or not isinstance(beat, (int, float)):
        return ""
    return (f"; if it died on its host, it stops counting once its heartbeat (last {time.time() - beat:.0f} s "
            f"ago) is {LEASE_S:.0f} s old")


RIVALS_EVERY_S = 30.0  # how often a committer looks again for an earlier live run over its INPUT


def _folder(uri) -> str:
    """An INPUT as `Rivals` compares them: as the listing writes its videos' URIs (a
    `file://` URL is its path), a folder with or without its last "/" one."""
    return _canonical_folder(str(uri or "")) or str(uri or "").rstrip("/")


LISTING_SUFFIX = ".videos.parquet"  # runs/<run_id>.videos.parquet: a manifest run's videos, while it runs


def write_run_listing(output: str, run_id: str, uris: pa.Array) -> None:
    """The video URIs a run over a manifest will commit, beside its record (written before
    it, which then says `listing: true`), for `Rivals`: a manifest's videos may be anywhere, so its INPUT says nothing of
    which videos another run also lists. Deleted when the run ends (`forget_run_listing`)."""
    uris = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris  # (pa.array would go one by one)
    table = pa.table({"video_uri": uris.cast(pa.string())})
    url = storage.join(output, RUNS_DIR, f"{run_id}{LISTING_SUFFIX}")
    storage.write_atomic(url, lambda f: pq.write_table(table, f, compression="zstd"))


def forget_run_listing(output: str, run_id: str) -> None:
    with contextlib.suppress(FileNotFoundError, *storage.ACCESS_ERRORS):
        fs, root = storage.resolve(output)
        fs.rm(f"{root.rstrip('/')}/{RUNS_DIR}/{run_id}{LISTING_SUFFIX}")


def _under(uris: pa.Array, folder: str):
    """Which of `uris` are `folder` itself or below it."""
    return pc.or_(pc.equal(uris, folder), pc.starts_with(uris, folder + "/"))


def _canonical_folder(uri: str) -> str | None:
    """A folder INPUT as the listing writes its videos' URIs (`storage.canonical`)."""
    try:
        return storage.canonical(uri).rstrip("/") if uri else None
    except (StorageError, ValueError):
        return None


class Rivals:
    """The other runs into OUTPUT over the same INPUT (or a folder holding it, or one inside
    it; where either INPUT is a manifest, over a video both list, or one in the other's
    folder) that are alive (`alive`) and wrote their record before this one (`record`: its
    own record as written; `recorded`; ties by run id). Two such runs would each commit the
    videos not committed when each read OUTPUT: the later one stops, at its start
    (`check_now`, just after its own record is written, so before it commits anything) or
    before a flush (`check`: the first one, then at most every RIVALS_EVERY_S: where both
    records were written within moments, the one written first may not be there yet at
    the other's check). The order is the records', not the runs' start: a run that began
    first and listed for an hour has read OUTPUT before the other run's commits, and would
    commit those videos again. Records of runs that ended, or that are not over this
    INPUT, are read once."""

    def __init__(self, output: str, record: dict, videos: pa.Array | None = None):
        """`videos`: of a run over a manifest, the URIs it will commit (as it wrote them:
        `write_run_listing`); None for a folder, a prefix or a video."""
        self.fs, root = storage.resolve(output)
        self.root = root.rstrip("/")
        self.me = (recorded(record), str(record.get("run_id") or ""))
        self.input = _folder((record.get("config") or {}).get("input"))
        if isinstance(videos, pa.ChunkedArray):
            videos = videos.combine_chunks()
        self.videos = None if videos is None else pa.array(videos).cast(pa.string())
        self.by_listing: set = set()  # run ids met through a manifest's listing
        self._listings: dict = {}  # run id -> its listing as read (None: it wrote none)
        self.settled: set = {f"{self.me[1]}.json"}
        self.writer = _writer_of(record)  # (its record as its heartbeat writes it: another writer took its id)
        self._next = 0.0  # the first flush looks whatever the start's check saw
        self.stopped: ConfigError | None = None

    def check_now(self) -> None:
        """At the start: raise ConfigError, naming it, if such a run exists; RunIdTaken
        where this run's record is another process's (two runs of one id began within
        moments: each checked before the other's record was there)."""
        self._check_own_record()
        self.refuse_earlier()

    def refuse_earlier(self) -> None:
        """Raise ConfigError, naming it, if a live run that began before this one is over the
        same INPUT (reads only: `run --dry-run` asks it too)."""
        first = self.earliest()
        if first is not None:
            what = "videos this run lists too" if first.get("run_id") in self.by_listing else "the same INPUT"
            self.stopped = ConfigError(
                f"run {first.get('run_id')} (host {first.get('host')}, started {first.get('started_at')}) is "
                f"running over {what} into this OUTPUT: two runs at once would each commit every video; "
                f"wait for it to end (`rayvid runs OUTPUT`), or stop it and run this again{_lease_hint(first)}")
            raise self.stopped

    def check(self, now: float | None = None) -> None:
        """Before a flush: `check_now`, at most every RIVALS_EVERY_S; once it stopped the
        run, every time (the failing run's last flush of what is complete too)."""
        if self.stopped is not None:
            raise self.stopped
        now = time.monotonic() if now is None else now
        if now < self._next:
            return
        self._next = now + RIVALS_EVERY_S
        self.check_now()

    def _check_own_record(self) -> None:
        if not self.writer:
            return
        try:
            own = read_run_record(self.fs, self.root, self.me[1])
        except storage.ACCESS_ERRORS:
            return  # (looked at again next time)
        if isinstance(own, dict) and _writer_of(own) != self.writer:
            _TAKEN.add((self.root, self.me[1]))
            self.stopped = RunIdTaken(
                f"run id {self.me[1]} was taken by another run (host {own.get('host')}, started {own.get('started_at')}) "
                f"into this OUTPUT, which began within moments of this one: two runs of one id would write files of "
                f"the same names; this one stops (what it committed stays), give another --run-id to go on")
            raise self.stopped

    def earliest(self) -> dict | None:
        try:  # (listed afresh: s3fs would answer from its cache, without a rival's new record)
            names = [n.rsplit("/", 1)[-1] for n in storage.files_in(self.fs, f"{self.root}/{RUNS_DIR}", "*.json")]
        except storage.ACCESS_ERRORS:  # (a check that cannot look does not stop the run)
            return None
        names = [n for n in names if not n.startswith(".") and n not in self.settled]
        found = []
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            records = list(pool.map(self._read, names))
        for name, record in zip(names, records):
            if record == {}:
                continue
            try:
                overlaps = alive(record) and self._overlaps(name[: -len(".json")], record)
            except storage.ACCESS_ERRORS:  # its listing unread: looked at again next time
                continue
            if not overlaps:
                self.settled.add(name)  # ended (or never ours to meet): it does not run again
            elif (recorded(record), str(record.get("run_id") or "")) < self.me:
                found.append(record)
        return min(found, key=lambda r: (recorded(r), str(r.get("run_id") or "")), default=None)

    def _overlaps(self, run_id: str, record: dict) -> bool:
        """Whether that run and this one may both commit a video: the same INPUT, or a
        folder and one inside it; or, where either INPUT is a manifest (its listing
        beside its record), a video both list, or one listing a video in the other's folder."""
        theirs_input = _folder((record.get("config") or {}).get("input"))
        # (only where its record says it wrote one: a file left by a killed run of the same id is not this run's)
        theirs = self._listing(run_id) if record.get("listing") is True else None
        if theirs is not None or self.videos is not None:
            self.by_listing.add(str(record.get("run_id")))
        if theirs is None and self.videos is None:
            return theirs_input == self.input or (theirs_input + "/").startswith(self.input + "/") or \
                (self.input + "/").startswith(theirs_input + "/")  # (a folder and one inside it)
        if theirs is None:
            return _canonical_folder(theirs_input) is not None and \
                pc.any(_under(self.videos, _canonical_folder(theirs_input))).as_py() is True
        if self.videos is None:
            return _canonical_folder(self.input) is not None and \
                pc.any(_under(theirs, _canonical_folder(self.input))).as_py() is True
        return pc.any(pc.is_in(self.videos, value_set=theirs)).as_py() is True

    def _listing(self, run_id: str) -> pa.Array | None:
        """A manifest run's listing (`write_run_listing`), or None (a folder's run); read
        once (a live rival's is asked at every check: a shard's may hold a million URIs)."""
        if run_id not in self._listings:
            try:
                with self.fs.open(f"{self.root}/{RUNS_DIR}/{run_id}{LISTING_SUFFIX}", "rb") as f:
                    self._listings[run_id] = pq.read_table(f, columns=["video_uri"]).column("video_uri").combine_chunks()
            except FileNotFoundError:
                self._listings[run_id] = None
        return self._listings[run_id]

    def _read(self, name: str) -> dict | None:
        try:
            record = read_run_record(self.fs, self.root, name[: -len(".json")])
        except storage.ACCESS_ERRORS:
            return {}  # (unread: looked at again next time)
        return record if isinstance(record, dict) else None


class Heartbeat:
    """Keeps a running run's record fresh: written at `start` (which raises if OUTPUT is
    not writable), rewritten every `every_s` seconds with `heartbeat_at` until `stop`,
    so that other runs into the same OUTPUT leave its flushes in progress alone. `clean`
    turns the record into what may be written (no credentials); `progress`, once set, gives
    each beat's record its `stats` so far (`rayvid runs` shows them, of a run killed too)."""

    def __init__(self, output: str, run_id: str, record: dict, clean=lambda r: r, every_s: float | None = None):
        self.output, self.run_id, self.record, self.clean = output, run_id, record, clean
        self.every_s = HEARTBEAT_S if every_s is None else every_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.progress = None
        self._said_progress = False  # (a bug counting progress: its traceback said once)

    def start(self) -> None:
        self.record.update(writer(), heartbeat_at=time.time())
        self.record.setdefault("recorded_at", self.record["heartbeat_at"])  # (`Rivals`: the order of runs)
        self._key = (storage.resolve(self.output)[1].rstrip("/"), self.run_id)
        _TAKEN.discard(self._key)
        _ACTIVE.add(self.run_id)
        try:
            write_run_record(self.output, self.run_id, self.clean(self.record))
        except BaseException:
            _ACTIVE.discard(self.run_id)
            raise
        self._thread = threading.Thread(target=self._beat, name="rayvid-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                if self._stop.is_set():
                    return
                self.record["heartbeat_at"] = time.time()
                try:
                    if self._key in _TAKEN or self._taken():
                        _TAKEN.add(self._key)
                        continue  # (the run stops at its next check: `Rivals`)
                except Exception as e:  # noqa: BLE001 - whatever the store raises, the next beat tries again
                    log.warning("cannot refresh the run record: %s", storage.describe(e))
                    continue
                # (no store below until the write: an error here is a bug, said with its traceback;
                # the beat goes on, or the live run would read as dead to other runs)
                try:
                    if self.progress is not None:
                        self.record["stats"] = self.progress()
                except Exception as e:  # noqa: BLE001 - a bug: said (its traceback once), the record keeps its last counts
                    if not self._said_progress:
                        log.exception("cannot count the run's progress for its record (a bug in rayvid)")
                    else:
                        log.warning("cannot count the run's progress for its record: %s: %s", type(e).__name__, e)
                    self._said_progress = True
                try:
                    record = self.clean(self.record)
                except Exception:  # noqa: BLE001 - a bug: said; nothing unredacted is written
                    log.exception("cannot redact the run record (a bug in rayvid): not refreshed")
                    continue
                try:
                    if self._key not in _TAKEN:  # (a check may have found it taken meanwhile)
                        write_run_record(self.output, self.run_id, record)
                except Exception as e:  # noqa: BLE001 - whatever the store raises, the next beat tries again
                    log.warning("cannot refresh the run record: %s", storage.describe(e))

    def _taken(self) -> bool:
        """Whether another process wrote this run's record since (two runs of one id)."""
        fs, root = storage.resolve(self.output)
        own = read_run_record(fs, root.rstrip("/"), self.run_id)
        return isinstance(own, dict) and _writer_of(own) != _writer_of(self.record)

    def stop(self, wait_s: float | None = None) -> bool:
        """No beat starts after this; True once none is in flight (then no record is written
        by the heartbeat after this returns). With `wait_s`, a beat still writing after that
        long (a store that does not answer: its client retries) is left to finish: False,
        and `join` waits for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait_s)
            if self._thread.is_alive():
                return False
        _ACTIVE.discard(self.run_id)
        return True

    def join(self) -> None:
        """Wait for a beat `stop` left writing."""
        if self._thread is not None:
            self._thread.join()
        _ACTIVE.discard(self.run_id)


class Committed:
    """What earlier runs committed to OUTPUT: one row per video (the last committed, if a
    video is in several files), in Arrow columns `video_uri, size_bytes, version, error`
    (as its videos/ row), `changed` (its error says it changed while read) and `file` (its
    part's name, an index into `files`), looked up by URI through a `UriIndex`: 141 MB per
    million committed videos, where a dict of dicts held 540 MB (bench/rerun_memory.py)."""

    COLUMNS = ("video_uri", "size_bytes", "version", "error", "changed", "file")

    def __init__(self, table: pa.Table | None = None, files: list | None = None, key=hash, doubles: bool = True):
        """`table`: those columns, a video in several rows where committed more than once
        (the last row wins); `files`: the part names `file` indexes. `doubles`: the rows
        are of one listing of OUTPUT, so a video in two parts is committed twice (`doubled`);
        else later rows are newer reads of the same video (`merged`)."""
        self.files = list(files or [])
        # video -> the other parts holding it (committed twice: two runs at once, a compaction
        # under a retraction): `files_of` names them too, so a retraction takes every copy
        self.doubled: dict = {}
        self.removed: list = []  # orphan files deleted by `recover`
        self.in_flight: list = []  # orphan files of runs still writing: left
        self.lost: list = []  # (part, videos, frames): committed parts whose predictions/ file is gone
        if table is None:
            table = pa.table({"video_uri": pa.array([], pa.string()), "size_bytes": pa.array([], pa.int64()),
                              "version": pa.array([], pa.string()), "error": pa.array([], pa.bool_()),
                              "changed": pa.array([], pa.bool_()), "file": pa.array([], pa.int32())})
        table = table.select(list(self.COLUMNS)).combine_chunks()
        uris = _one_chunk(table.column("video_uri"))
        keys = _hashes(uris, key)
        last = _last_of_each(uris, keys)
        if last is not None:
            if doubles:
                self.doubled = _doubled(table, last, self.files)
            table, keys = table.filter(pa.array(last)), keys[last]
        self.table = table
        self.index = UriIndex(table.column("video_uri"), key, keys)

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, uri: str) -> bool:
        return self.index.row(uri) >= 0

    def get(self, uri: str) -> dict | None:
        """Its row (`file` as the part's name), or None where not committed."""
        row = self.index.row(uri)
        if row < 0:
            return None
        out = {c: self.table.column(c)[row].as_py() for c in self.COLUMNS[1:]}
        out["file"] = self.files[out["file"]]
        return out

    def uris(self) -> list[str]:
        return sorted(self.table.column("video_uri").to_pylist())

    def files_of(self, uris) -> list[str]:
        """The part names holding these (committed) videos, sorted (every copy's)."""
        rows = self.index.rows(pa.array(sorted(uris), pa.string()))
        held = np.unique(self.table.column("file").to_numpy()[rows[rows >= 0]])
        more = set().union(*(self.doubled.get(u, ()) for u in uris)) if self.doubled else set()
        return sorted({self.files[int(i)] for i in held} | more)

    def mark_changed(self, uris) -> None:
        """Read these videos again, as ones that changed: retracted (every copy), redone."""
        rows = self.index.rows(pa.array(sorted(uris), pa.string()))
        changed = self.table.column("changed").to_numpy(zero_copy_only=False).copy()
        changed[rows[rows >= 0]] = True
        self.table = self.table.set_column(self.COLUMNS.index("changed"), "changed", pa.array(changed))

    def merged(self, later: "Committed") -> "Committed":
        """This, with `later`'s parts read after it (parts that appeared since: another
        run's, a compaction's): a video in both is as `later` has it."""
        files = later.table.column("file").to_numpy() + len(self.files)
        table = pa.concat_tables([self.table, later.table.set_column(
            self.COLUMNS.index("file"), "file", pa.array(files.astype(np.int32)))], promote_options="permissive")
        out = Committed(table, self.files + later.files, self.index.key, doubles=False)
        out.removed, out.in_flight = self.removed, self.in_flight
        out.doubled = {**self.doubled, **later.doubled}
        if out.doubled:  # (still to be read again, wherever its copies are now)
            out.mark_changed(out.doubled)
        return out

    def drop(self, uris) -> None:
        """No longer committed (retracted)."""
        for uri in uris:
            self.doubled.pop(uri, None)
        rows = self.index.rows(pa.array(sorted(uris), pa.string()))
        keep = np.ones(len(self.table), bool)
        keep[rows[rows >= 0]] = False
        self.table = self.table.filter(pa.array(keep))
        self.index = UriIndex(self.table.column("video_uri"), self.index.key, self.index.keys[np.argsort(self.index.order)][keep])


def _doubled(table: pa.Table, last: np.ndarray, files: list) -> dict:
    """{video: the parts of its rows that `last` (a mask: each video's last row) leaves out,
    other than the last row's part}: the videos committed more than once, in several parts
    or twice in one (a compaction merged both copies' parts: an empty set)."""
    column = table.column("video_uri")
    again = pc.unique(column.filter(pa.array(~last)))
    rows = np.flatnonzero(pc.is_in(column, value_set=again).to_numpy(zero_copy_only=False))  # (few)
    parts = table.column("file").to_numpy()[rows]
    uris = column.take(pa.array(rows)).to_pylist()
    kept = {uri: part for uri, part, is_last in zip(uris, parts.tolist(), last[rows].tolist()) if is_last}
    out: dict = {}
    for uri, part, is_last in zip(uris, parts.tolist(), last[rows].tolist()):
        if not is_last:
            out.setdefault(uri, set()).update([files[part]] if part != kept[uri] else [])
    return out


def _last_of_each(uris: pa.Array, keys: np.ndarray) -> np.ndarray | None:
    """Which rows are each value's last (a mask), or None where every value is once."""
    order = np.argsort(keys, kind="stable")
    ties = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    if not len(ties):
        return None
    rows = order[np.union1d(ties, ties + 1)]  # rows whose hash another row shares: few
    last: dict = {}
    for row, uri in zip(rows.tolist(), uris.take(pa.array(rows)).to_pylist()):
        last[uri] = max(row, last.get(uri, -1))
    keep = np.ones(len(uris), bool)
    keep[rows] = False
    keep[list(last.values())] = True
    return keep


def part_sizes(fs, directory: str) -> dict:
    """{part name: its size in bytes as listed, or None} of the parts in `directory`."""
    found = storage.files_in(fs, directory, "part-*.parquet")
    return {p.rsplit("/", 1)[-1]: info.get("size") for p, info in found.items()}


def recover(output: str, only=None, repair: bool = True, parts: set | None = None,
            finish: bool = True) -> Committed:
    """Delete what a killed run (or compaction) left half-committed; return what is
    committed: of every video, or, with `only` (video URIs, an Arrow array or any iterable:
    a run's listing), of those alone, so that a shard of a large OUTPUT holds its own
    videos' rows, not OUTPUT's (the videos/ files are read one at a time and matched).
    `repair=False` (a dry run) changes nothing: what a dead run, compaction or retraction
    left is only read (a dead retraction's videos counted as not committed, as finishing it
    would leave them). `parts`: of those videos/ parts alone (named as `Committed.files`).
    `finish=False`: where the videos are, a dead retraction's too (that retraction's own
    look, `_where_now`: they would be dropped as not committed)."""
    fs, root = storage.resolve(output)
    root = root.rstrip("/")
    retractions = _retraction_records(fs, root)
    wanted = retracting = None
    if only is not None:  # and what an unfinished retraction must find, wherever it is listed
        wanted = UriIndex(only if isinstance(only, (pa.Array, pa.ChunkedArray)) else pa.array(list(only), pa.string()))
        retracting = pa.array(sorted(set().union(*(r["videos"] for _, r in retractions))), pa.string())
    merging = finish_compactions(fs, root) if repair else set()
    if storage.is_local(fs) and repair:
        _sweep_unfinished_writes(root)
    committed = part_sizes(fs, f"{root}/{VIDEOS_DIR}")
    removed, in_flight, failed, predicted = [], [], {}, {}
    running: dict = {}  # run id -> whether it may still be writing
    for directory in (PREDICTIONS_DIR, ERRORS_DIR):
        found = part_sizes(fs, f"{root}/{directory}")
        if directory == ERRORS_DIR:
            failed = found
        else:
            predicted = found
        for name in sorted(set(found) - set(committed)):
            run = run_of(name)
            if run not in running:
                running[run] = alive(read_run_record(fs, root, run))
            if running[run] or name in merging:  # a flush in progress: its videos file comes next
                in_flight.append(f"{directory}/{name}")
                continue
            if not repair or fs.exists(f"{root}/{VIDEOS_DIR}/{name}"):  # committed since this listing (its run then ended)
                continue
            with contextlib.suppress(FileNotFoundError):  # another run's recover was first
                fs.rm(f"{root}/{directory}/{name}")
            removed.append(f"{directory}/{name}")
    names = sorted(committed) if wanted is None or len(wanted.uris) or len(retracting) else []
    if parts is not None:
        names = [name for name in names if name in parts]

    def fetch(name: str) -> tuple:
        """Its videos/ part's bytes and its errors/ part's (if listed), where small enough
        to be read in one request each (else None: opened later); FileNotFoundError for an
        errors/ part gone since the listing (a retraction took its last row)."""
        videos, errors = fetch_whole(fs, f"{root}/{VIDEOS_DIR}/{name}", committed[name]), None
        if name in failed:
            try:
                errors = fetch_whole(fs, f"{root}/{ERRORS_DIR}/{name}", failed[name])
            except FileNotFoundError as e:
                errors = e
        return name, videos, errors

    lost: list = []  # (part, videos, frames) of committed parts whose predictions/ file is gone
    in_retraction = pa.array(sorted({u for _, r in retractions for u in r["videos"]}), pa.string())  # (once)

    def rows_of(i: int, name: str, videos, errors) -> pa.Table:
        table = read_parquet(fs, f"{root}/{VIDEOS_DIR}/{name}",
                             ["video_uri", "size_bytes", "version", "error", "frames"], videos)
        if wanted is not None:
            uris = table.column("video_uri")
            table = table.filter(pc.or_(pa.array(wanted.rows(uris) >= 0), pc.is_in(uris, value_set=retracting)))
        changed = [pa.array([], pa.string())]
        rows = lost_rows(fs, root, name, table, in_retraction) if name not in predicted else table.slice(0, 0)
        if len(rows):  # its predictions/ file deleted (by hand, or lost): its videos are read
            # again, retracted as a changed video is (else skipped as done, their rows gone for good)
            lost.append((name, len(rows), int(pc.sum(rows.column("frames")).as_py())))
            changed.append(rows.column("video_uri").combine_chunks())
        table = table.drop_columns(["frames"])
        if name in failed and not isinstance(errors, FileNotFoundError) and pc.any(table.column("error")).as_py():
            with contextlib.suppress(FileNotFoundError):
                errors = read_parquet(fs, f"{root}/{ERRORS_DIR}/{name}", ["video_uri", "error_type"], errors)
                again = errors.filter(pc.is_in(errors.column("error_type"), value_set=READ_AGAIN))
                changed.append(again.column("video_uri").combine_chunks())
        changed = pa.concat_arrays(changed)
        return (table.append_column("changed", pc.is_in(table.column("video_uri"), value_set=changed))
                .append_column("file", pa.array(np.full(len(table), i, np.int32))))

    # Many small files, each a request: fetched several at a time (the wait is request
    # latency, not bandwidth), each turned into rows here as it comes, in order (allocated
    # by this thread: the fetching threads hold no memory once their bytes are dropped).
    with concurrent.futures.ThreadPoolExecutor(RECOVER_READS) as pool:
        tables = [rows_of(i, *fetched) for i, fetched in enumerate(in_order(pool, fetch, names, 2 * RECOVER_READS))]
    state = Committed(pa.concat_tables(tables) if tables else None, names)
    if state.doubled:  # (rare) a compaction's merged part beside the parts it replaces is no double
        live = set(committed_parts(fs, root))
        tables = [t for name, t in zip(names, tables) if name in live]
        state = Committed(pa.concat_tables(tables) if tables else None, names)
        state.mark_changed(state.doubled)  # read again: every copy retracted, then one committed
    state.removed, state.in_flight, state.lost = removed, in_flight, lost
    if finish:
        _finish_retractions(output, fs, root, state, retractions, repair)
    return state


# `storage.write_atomic`'s file being written on a local filesystem, renamed when whole
UNFINISHED_WRITE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


def _sweep_unfinished_writes(root: str, now: float | None = None) -> list[str]:
    """Delete the files a write killed before its rename left (local OUTPUT: `.<name>.tmp-<id>`,
    which no `*.parquet` glob reads, but which stayed, a flush's worth of rows each) once
    they are LEASE_S old: no live writer takes that long between its write and its rename."""
    now = time.time() if now is None else now
    swept = []
    for directory in (PREDICTIONS_DIR, ERRORS_DIR, VIDEOS_DIR, RUNS_DIR, RETRACTIONS_DIR, COMPACTIONS_DIR):
        try:
            entries = list(os.scandir(os.path.join(root, directory)))
        except FileNotFoundError:
            continue
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                if UNFINISHED_WRITE.match(entry.name) and now - entry.stat().st_mtime > LEASE_S:
                    os.remove(entry.path)
                    swept.append(f"{directory}/{entry.name}")
    return swept


def require_output(fs, root: str, output: str) -> None:
    """FileNotFoundError where `root` holds no rayvid OUTPUT (neither a videos/ folder nor
    a run's record: a typo): the read and compaction verbs say so, exit 2. An OUTPUT whose
    runs committed nothing yet (they listed no videos) is one, with no rows. A store that
    cannot be asked raises its own error (`fs.isdir` would say False: "no output")."""
    path = f"{root.rstrip('/')}/{VIDEOS_DIR}"
    try:
        folder = storage.is_folder(fs, path)
    except FileNotFoundError as e:
        if not storage.absent(e):  # fsspec's HTTP filesystem: a server it cannot reach, or a 403
            raise
        folder = False
    if not folder and not storage.files_in(fs, f"{root.rstrip('/')}/{RUNS_DIR}", "*.json"):
        raise not_found(fs, root, output, f"no rayvid output at {storage.public_uri(output)} (no videos/ folder)")


def not_found(fs, root: str, output: str, said: str) -> FileNotFoundError:
    """FileNotFoundError saying `said`, or, on an object store, that OUTPUT's bucket does not
    exist where that is why (a typo in the bucket's name read as "no runs/ folder")."""
    bucket = storage.missing_bucket(fs, root)
    if bucket:
        return FileNotFoundError(f"no such bucket: {bucket} (OUTPUT {storage.public_uri(output)})")
    return FileNotFoundError(said)


def wrote_frames(videos: pa.Table, retracting) -> pa.Table:
    """The rows of `videos` (a part's videos/ rows: video_uri, frames) that say they wrote
    frames to predictions/, but those of videos a retraction is taking out (`retracting`:
    it deletes a predictions/ file left empty before it rewrites the videos/ one)."""
    rows = videos.filter(pc.greater(videos.column("frames"), 0))
    if len(rows) and len(retracting):  # (an Arrow array of them, or any collection)
        taken = retracting if isinstance(retracting, pa.Array) else pa.array(sorted(retracting), pa.string())
        rows = rows.filter(pc.invert(pc.is_in(rows.column("video_uri"), taken)))
    return rows


def lost_rows(fs, root: str, name: str, videos: pa.Table, retracting) -> pa.Table:
    """`wrote_frames` of part `name`, where it has no predictions/ file now (deleted by
    hand, or lost); else none."""
    rows = wrote_frames(videos, retracting)
    return rows if len(rows) and predictions_lost(fs, root, name) else rows.slice(0, 0)


def lost_error(output: str, name: str, rows: pa.Table) -> ValueError:
    """What a part `name` whose predictions/ file is gone while its videos/ `rows` say they
    wrote frames is: a read gave those videos no frames, exit 0, and a compaction would merge
    the part, the loss then for good. `rayvid run` reads them again (`recover`)."""
    return ValueError(f"{storage.public_uri(output).rstrip('/')}/{PREDICTIONS_DIR}/{name} is missing, though its "
                      f"videos/ file says it holds {pc.sum(rows.column('frames')).as_py()} rows of {len(rows)} "
                      f"videos: a `rayvid run` into this OUTPUT reads those videos again")


LOST_CHECKS_AHEAD = 8  # videos/ files of parts without predictions/ read at once


def refuse_lost_predictions(fs, root: str, output: str, without: list, retracting,
                            videos: Optional[pa.Array] = None) -> None:
    """`lost_error` for the first committed part with no predictions/ file (of `without`:
    parts of failed videos only, in practice) whose videos/ rows say they wrote some; with
    `videos`, only rows of those videos count (a read of one video is not refused for a
    part that never held it). Their videos/ files are read several at once."""
    retracting = pa.array(sorted(retracting), pa.string())  # (once, not per part)

    def lost(name: str) -> pa.Table:
        try:
            rows = read_parquet(fs, f"{root}/{VIDEOS_DIR}/{name}", ["video_uri", "frames"])
        except FileNotFoundError:  # (a compaction replaced it since the listing)
            return pa.table({"video_uri": pa.array([], pa.string()), "frames": pa.array([], pa.int64())})
        if videos is not None:
            rows = rows.filter(pc.is_in(rows.column("video_uri"), videos))
        return lost_rows(fs, root, name, rows, retracting) if len(rows) else rows

    with concurrent.futures.ThreadPoolExecutor(LOST_CHECKS_AHEAD) as pool:
        for name, rows in zip(without, in_order(pool, lost, without, LOST_CHECKS_AHEAD)):
            if len(rows):
                raise lost_error(output, name, rows)


def predictions_lost(fs, root: str, name: str) -> bool:
    """Whether committed part `name`, whose videos/ rows say they wrote frames, has no
    predictions/ file now: deleted, not replaced (a compaction deletes a part's videos/
    file, its commit point, before its predictions/ one: so the predictions/ file is asked
    for first, and the videos/ file after it). Both asked of the store, not of a listing
    cached before."""
    predictions, videos = f"{root}/{PREDICTIONS_DIR}/{name}", f"{root}/{VIDEOS_DIR}/{name}"
    fs.invalidate_cache(predictions)
    if fs.exists(predictions):
        return False
    fs.invalidate_cache(videos)
    return fs.exists(videos)


def committed_parts(fs, root: str) -> list[str]:
    """The part names whose rows readers should see: those with a videos/ file (the
    commit point), minus those a finished compaction replaced but has not deleted yet."""
    names = set(part_sizes(fs, f"{root}/{VIDEOS_DIR}"))
    for new, record in _compactions(fs, root):
        if new in names:
            names -= set(record["replaces"]) - {new}
    return sorted(names)


def _compactions(fs, root: str) -> list[tuple[str, list]]:
    records = sorted(storage.files_in(fs, f"{root}/{COMPACTIONS_DIR}", "part-*.parquet.json"))
    out = []
    for path in records:
        with contextlib.suppress(FileNotFoundError):
            out.append((path.rsplit("/", 1)[-1][: -len(".json")], _intent(fs, path, "replaces", "a compaction")))
    return out


def _intent(fs, path: str, key: str, what: str) -> dict:
    """A compaction's or retraction's record (`what`) as rayvid wrote it: an object whose
    `key` lists names or URIs. ValueError naming the file where it is not (a damaged or
    hand-written file: every verb stopped with a traceback, or a JSON error naming no file)."""
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not (isinstance(record, dict) and isinstance(record.get(key), list)
            and all(isinstance(x, str) for x in record[key])
            and isinstance(record.get("started_at", 0), (int, float)) and not isinstance(record.get("started_at"), bool)):
        raise ValueError(f"{storage.public_uri(storage.to_url(fs, path))} is no record of {what} rayvid wrote "
                         f"(an object listing {key!r}, started_at a time): damaged or written by hand; OUTPUT cannot be read "
                         f"safely while it is there (move it away once no rayvid run or compact is running)")
    return record


def finish_compactions(fs, root: str) -> set:
    """Complete or undo what a killed `rayvid compact` left: if the merged part's videos/
    file exists it is committed, so the parts it replaces go (their commit points first);
    if not, and the compaction is dead (`_intent_alive`), the merged part's other files go
    and the parts it would replace stay; a live one is left to finish. Returns the names
    of the merged parts still being written."""
    merging = set()
    for new, record in _compactions(fs, root):
        if fs.exists(f"{root}/{VIDEOS_DIR}/{new}"):
            try:  # as it is now: a compaction names the parts it leaves out again before it commits
                replaces = _intent(fs, f"{root}/{COMPACTIONS_DIR}/{new}.json", "replaces", "a compaction")["replaces"]
            except FileNotFoundError:  # (finished meanwhile, by it or another process)
                continue
            for directory in (VIDEOS_DIR, PREDICTIONS_DIR, ERRORS_DIR):
                _rm_all(fs, f"{root}/{directory}", [name for name in replaces if name != new])
        elif _intent_alive(fs, root, record, COMPACTION_LEASE_S, new):
            merging.add(new)
            continue
        else:
            for directory in (PREDICTIONS_DIR, ERRORS_DIR):
                _rm(fs, f"{root}/{directory}/{new}")
        _rm(fs, f"{root}/{COMPACTIONS_DIR}/{new}.json")
    return merging


def _rm_all(fs, directory: str, names: list) -> None:
    """Delete these parts of `directory`, those its listing has, in one call: one request
    per 1,000 on S3 (DeleteObjects)."""
    listed = part_sizes(fs, directory) if names else {}
    paths = [f"{directory}/{name}" for name in names if name in listed]
    if not paths:
        return
    try:
        fs.rm(paths)
    except FileNotFoundError:  # one gone since the listing (another process finishing this too)
        for path in paths:
            _rm(fs, path)


def _rm(fs, path: str) -> None:
    """Delete if there (another process finishing the same work may be first)."""
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(path):
            fs.rm(path)


def _intent_alive(fs, root: str, record: dict, lease_s: float, key: str) -> bool:
    """Whether the writer of an intent record (compaction, retraction) may still be at it:
    by its process where it ran on this host (`key`: what it marks `active`), else by its
    run's record, else by its age."""
    gone = _gone(record, key)
    if gone is not None:
        return not gone
    if record.get("run_id"):
        return alive(read_run_record(fs, root, record["run_id"]))
    return time.time() - float(record.get("started_at") or 0) < lease_s


def pending(videos: pa.Table, committed: Committed, retry_failed: bool) -> tuple[pa.Table, int, set]:
    """(listing rows still to process, how many are skipped, committed videos to redo)."""
    rows = committed.index.rows(videos.column("video_uri"))
    hit = np.flatnonzero(rows >= 0)
    done = committed.table.take(pa.array(rows[hit]))
    listed = videos.take(pa.array(hit))
    # -1 and "" (or none): not known (a manifest lists neither), so never a difference
    size, was = (t.column("size_bytes").fill_null(-1).to_numpy() for t in (listed, done))
    version, had = (t.column("version") for t in (listed, done))
    known = pc.and_(pc.invert(pc.equal(version, "")), pc.invert(pc.equal(had, "")))
    redo = ((size != -1) & (was != -1) & (was != size)
            | pc.fill_null(pc.and_(known, pc.not_equal(version, had)), False).to_numpy(zero_copy_only=False)
            | done.column("changed").to_numpy())  # it changed while a run read it: read it again
    if retry_failed:
        redo |= done.column("error").fill_null(False).to_numpy()
    keep = np.ones(len(videos), bool)
    keep[hit[~redo]] = False
    return (videos.filter(pa.array(keep)), int((~redo).sum()),
            set(listed.column("video_uri").filter(pa.array(redo)).to_pylist()))


COMPACTED_PARTS_READ = 20  # compacted videos/ parts `skipped_by` reads for the runs in them


def skipped_by(videos: pa.Table, committed: Committed, redo: set,
               output: str | None = None) -> tuple[int, list[tuple[str, int]]]:
    """Of the listed `videos` that `pending` skips as committed: how many failed when they
    were (`--retry-failed` redoes them), and the runs that committed them with how many of
    them each, those holding most first: a part's run is in its name; of a compaction's
    parts (which name none), with `output`, the `run_id` of their videos/ rows (of the
    COMPACTED_PARTS_READ holding most of these videos: the rest are counted for no run)."""
    rows = committed.index.rows(videos.column("video_uri"))
    done = committed.table.take(pa.array(rows[rows >= 0]))
    if redo:
        done = done.filter(pc.invert(pc.is_in(done.column("video_uri"), value_set=pa.array(sorted(redo), pa.string()))))
    if not len(done):
        return 0, []
    failed = int(pc.sum(pc.cast(done.column("error").fill_null(False), pa.int64())).as_py() or 0)
    files, counts = np.unique(done.column("file").to_numpy(), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    runs: collections.Counter = collections.Counter()
    compacted = []
    for i, n in zip(files[order].tolist(), counts[order].tolist()):
        name = committed.files[i]
        if run_of(name).startswith("compact-"):
            compacted.append((name, i))
        else:
            runs[run_of(name)] += n
    if output is not None and compacted:
        fs, root = storage.resolve(output)
        file_of = done.column("file").to_numpy()
        for name, i in compacted[:COMPACTED_PARTS_READ]:
            try:
                table = read_parquet(fs, f"{root.rstrip('/')}/{VIDEOS_DIR}/{name}", ["video_uri", "run_id"])
            except (FileNotFoundError, *storage.ACCESS_ERRORS):  # (compacted again since: it only words a warning)
                continue
            mine = done.column("video_uri").filter(pa.array(file_of == i))
            table = table.filter(pc.is_in(table.column("video_uri"), value_set=mine))
            runs.update({r["values"]: r["counts"] for r in pc.value_counts(table.column("run_id").drop_null()).to_pylist()})
    return failed, sorted(runs.items(), key=lambda r: -r[1])


def retract(output: str, uris: set, committed: Committed, run_id: str = "") -> None:
    """Remove these videos' rows from the committed files: predictions, errors, then videos
    (the commit point last). An intent record (`retractions/<run_id>.json`: the videos and
    files) is written first and deleted last: a run killed in between leaves it, and the
    next `recover` completes the retraction (`finish_retractions`), so a video is either
    still committed as it was or no longer committed at all, never left half-retracted."""
    if not uris:
        return
    names = committed.files_of(uris)
    key = run_id or uuid.uuid4().hex
    url = storage.join(output, RETRACTIONS_DIR, f"{key}.json")
    intent = json.dumps({"videos": sorted(uris), "run_id": run_id,
                         "started_at": time.time(), **writer()}).encode()
    with active(key):
        storage.write_atomic(url, lambda f: f.write(intent))
        _retract(output, set(uris), _where_now(output, uris, names))
        fs, path = storage.resolve(url)
        fs.rm(path)


COMPACTION_POLL_S = 1.0  # a retraction's wait for a `rayvid compact` at work: looks after 1 s,
COMPACTION_POLL_MAX_S = 30.0  # then ever further apart, at most this (a listing and reads each)


def _where_now(output: str, uris: set, names: list) -> list:
    """The parts holding `uris` (`names`, as read before), once every compaction at work
    when this is called (just after the retraction's record is written) has ended: one that
    read the parts before that record would merge their old rows into a part of its own (a
    QA find: the video then committed twice); one begun after it leaves parts holding them
    alone (compact._merge), so it is not waited for. Where the named parts went meanwhile
    (merged), where the videos are now is read (their parts renamed)."""
    if not names:  # (nothing committed to take out: no compaction can carry old rows)
        return names
    fs, root = storage.resolve(output)
    root = root.rstrip("/")
    first = finish_compactions(fs, root)
    waited, pause = time.monotonic(), COMPACTION_POLL_S
    while first:
        if time.monotonic() - waited >= COMPACTION_SAID_S:
            log.warning("waiting for the `rayvid compact` at work in OUTPUT (%s) to finish, to retract %d videos "
                        "(one killed on another host counts as at work for %d s)", ", ".join(sorted(first)),
                        len(uris), COMPACTION_LEASE_S)
            waited = math.inf
        time.sleep(pause)
        pause = min(pause * 1.5, COMPACTION_POLL_MAX_S)  # (a dead remote one counts as at work for an hour)
        first &= finish_compactions(fs, root)
    listed = part_sizes(fs, f"{root}/{VIDEOS_DIR}")
    if all(name in listed for name in names):
        return names
    now = recover(output, only=sorted(uris), repair=False, finish=False)
    return sorted({name for name in names if name in listed} | set(now.files_of(uris)))


COMPACTION_SAID_S = 10.0  # a retraction waiting longer for a compaction says so


def _retraction_records(fs, root: str) -> list[tuple[str, dict]]:
    """(path, record) of every retraction intent record in OUTPUT."""
    paths = sorted(storage.files_in(fs, f"{root}/{RETRACTIONS_DIR}", "*.json"))
    out = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # else another recover completed it
            out.append((path, _intent(fs, path, "videos", "a retraction")))
    return out


def retracting(fs, root: str) -> frozenset:
    """The videos a retraction is taking out of OUTPUT, as its records say now: a live
    one's, or a dead one's that the next run or `rayvid compact` completes. Readers leave
    them out, so that a video is seen as it was committed or not at all (its predictions may
    already be rewritten while its videos/ row is not); a retraction that begins after a
    read has listed them is seen by the next read."""
    return frozenset(u for _, record in _retraction_records(fs, root) for u in record.get("videos", ()))


def _finish_retractions(output: str, fs, root: str, state: Committed, records: list, repair: bool = True) -> None:
    """Complete the retractions whose runs died part-way (their intent records remain), in
    the files that hold those videos now (a compaction may have merged the ones listed);
    without `repair`, only drop their videos from `state`."""
    for path, record in records:
        try:  # as it is now: another run's recover may have completed it meanwhile, and a
            with fs.open(path, "rb") as f:  # run with the same id written a new one
                if json.load(f) != record:
                    continue
        except FileNotFoundError:
            continue
        if _intent_alive(fs, root, record, LEASE_S, record.get("run_id") or path.rsplit("/", 1)[-1][: -len(".json")]):
            continue
        uris = {u for u in record["videos"] if u in state}
        if repair:  # (after a compaction at work ends: `_where_now`)
            _retract(output, uris, _where_now(output, uris, state.files_of(uris)))
        state.drop(uris)
        if repair:
            _rm(fs, path)


def _retract(output: str, uris: set, names: list) -> None:
    """Each of `names` in predictions/, then errors/, then videos/ (the commit point last)
    rewritten without `uris`' rows, or deleted where it held nothing else; several files
    at a time within a folder (one request each to read, from the folder's listing: no
    HEAD), RETRACT_BYTES of them, as listed, at most in memory at once."""
    if not uris:
        return
    fs, root = storage.resolve(output)
    root = root.rstrip("/")
    drop = pa.array(sorted(uris), pa.string())
    for directory in (PREDICTIONS_DIR, ERRORS_DIR, VIDEOS_DIR):
        listed = part_sizes(fs, f"{root}/{directory}")
        files = [(f"{root}/{directory}/{name}", listed[name]) for name in names if name in listed]
        for batch in _batches(files, RETRACT_BYTES):
            with concurrent.futures.ThreadPoolExecutor(min(RECOVER_READS, len(batch))) as pool:
                list(pool.map(lambda file: _without(fs, *file, drop), batch))


def _without(fs, path: str, size: int | None, drop: pa.Array) -> None:
    try:
        table = read_parquet(fs, path, data=fetch_whole(fs, path, size))
    except FileNotFoundError:  # gone since the listing: another run's recover completed this
        return
    kept = table.filter(pc.invert(pc.is_in(table.column("video_uri"), value_set=drop)))
    if len(kept) == len(table):
        return
    if len(kept) == 0:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
    else:
        write_parquet(storage.to_url(fs, path), kept)


def _batches(files: list, budget: int) -> Iterator[list]:
    """`files` ((path, size) pairs) in order, in runs whose sizes add up to at most
    `budget` (a file larger than that, or of no known size, alone)."""
    batch, held = [], 0
    for path, size in files:
        cost = size if size is not None else budget
        if batch and held + cost > budget:
            yield batch
            batch, held = [], 0
        batch.append((path, size))
        held += cost
    if batch:
        yield batch
