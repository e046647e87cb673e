"""Reading an OUTPUT back: the query verbs (`summary`, `runs`, `segments`, `find`,
`similar`, `export`).

Input: an OUTPUT URL (any storage.resolve URL), read through `commit.committed_parts`, so
a reader sees each committed video exactly once, whatever a run, a compaction or a retraction
was doing (`commit.retracting`: the videos a retraction names are left out).
Work goes part by part (a video's rows never straddle two parts), so memory is bounded by
the largest part, not the archive.

Outputs (Arrow tables):
  summary   one row per video: `video_uri, frames, duration_s, fps, width, height, codec,
            decoder, top_labels (str), error (bool), run_id`
  segments  one row per run of a top-1 label: `video_uri, label, start_s, end_s,
            duration_s, frames, mean_score, max_score`
  find      one row per video showing a label: `video_uri, label, segments, seconds,
            first_s, max_score, ranges (str, "start-end" seconds)`
  similar   the k nearest frames (runs with --embed): `video_uri, frame_index,
            timestamp_s, label, similarity` (cosine)
  runs      one row per run record (runs/): `run_id, status, started_at, finished_at,
            last_heartbeat, host, input, videos_listed, videos_skipped, videos_ok,
            videos_failed, frames, wall_s, error`
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import csv
import dataclasses
import errno
import io
import json
import math
import os
import shutil
import sys
import tempfile
from typing import BinaryIO, Collection, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayvid import commit, storage
from rayvid.errors import ConfigError, InputError, StorageError
from rayvid.schema import label_text

GAP_S = 0.5  # runs of one label closer than this merge into one segment
PARTS_AHEAD = 4  # parts read at once, ahead of the one a verb works on
PART_BLOCK_BYTES = 0  # pyarrow asks for whole column chunks and footers: fetch just those

SEGMENTS_SCHEMA = pa.schema([
    ("video_uri", pa.string()), ("label", pa.string()), ("start_s", pa.float64()),
    ("end_s", pa.float64()), ("duration_s", pa.float64()), ("frames", pa.int64()),
    ("mean_score", pa.float32()), ("max_score", pa.float32()),
])


RELISTS = 3  # listings of OUTPUT's parts a read verb takes while compactions replace them


def parts(output: str, what: str = commit.PREDICTIONS_DIR, columns: Optional[list] = None,
          video: Optional[str] = None, without: tuple = (),
          videos: Optional[Collection[str]] = None) -> Iterator[pa.Table]:
    """Each committed part's table of `what` (predictions, errors or videos), read in
    part: only `columns` (those the part has; all but `without` when None) and, with
    `video` (a canonical URI) or `videos` (several), only their rows, from the row groups
    whose video_uri range holds one of them (a part is sorted by video_uri: its rows of one
    video sit in one or two of its row groups of 128 Ki rows). Parts without a row of them
    yield nothing, read no further than their footer.

    A part a compaction replaced and deleted after the listing is read from the merged
    part, listed again at the end: only its videos not yielded already (each video's rows
    are in one part; yielded videos are kept as 64-bit hashes, 8 bytes each), so a read
    while `rayvid compact` runs sees every committed video once."""
    fs, root = storage.resolve(output)
    root = root.rstrip("/")
    commit.require_output(fs, root, output)
    chosen = sorted({video} if video is not None else set(videos)) if video is not None or videos is not None else None
    value_set = pa.array(chosen, pa.string()) if chosen is not None else None  # (once: a report's may be large)
    # (in this order: a part committed at the first listing has its file of `what`, if any,
    # by the second; one not there then has none, or was deleted since: a compaction's)
    names = commit.committed_parts(fs, root)
    listed = commit.part_sizes(fs, f"{root}/{what}")  # (a part of failed videos has no predictions/ file)
    # videos a retraction is taking out (a rerun redoing them, or one killed part-way): not
    # committed any more, whichever of their files it has rewritten
    gone_videos = commit.retracting(fs, root)
    retracting, added = pa.array(sorted(gone_videos), pa.string()), False
    if what == commit.PREDICTIONS_DIR:
        commit.refuse_lost_predictions(fs, root, output, [n for n in names if n not in listed], gone_videos, value_set)
    if gone_videos:
        if chosen is not None:
            chosen = [u for u in chosen if u not in gone_videos]
            value_set = pa.array(chosen, pa.string())
        elif columns is not None and "video_uri" not in columns:
            columns, added = [*columns, "video_uri"], True  # (to leave them out by; dropped below)
    seen: list = []  # the yielded tables' distinct videos, hashed (where they have video_uri)
    done: set = set()
    for attempt in range(RELISTS + 1):
        gone = []

        def read(name: str) -> Optional[pa.Table]:
            return _read_part(fs, f"{root}/{what}/{name}", listed[name], columns, chosen, value_set, without)

        todo = [n for n in names if n in listed and n not in done]
        done.update(todo)
        # each part a few requests: PARTS_AHEAD read ahead of the one the verb works on
        with concurrent.futures.ThreadPoolExecutor(PARTS_AHEAD) as pool:
            for name, table in zip(todo, commit.in_order(pool, read, todo, PARTS_AHEAD)):
                if table is _GONE:
                    gone.append(name)
                    continue
                if table is None:
                    continue
                if len(retracting) and chosen is None and "video_uri" in table.column_names:
                    table = table.filter(pc.invert(pc.is_in(table.column("video_uri"), retracting)))
                    if added:
                        table = table.drop_columns(["video_uri"])
                if "video_uri" in table.column_names:
                    keys, rows = _video_hashes(table)
                    if attempt:
                        table = table.filter(pa.array(~np.isin(keys, seen[0])[rows]))
                        if not len(table):
                            continue
                    seen.append(keys)
                yield table
        unlisted = [n for n in names if n not in listed and n not in done]
        if not gone and not unlisted:
            return
        now = commit.committed_parts(fs, root)
        committed = set(now)
        done.update(n for n in unlisted if n in committed)  # still committed: it has no file of `what`
        if not gone and all(n in committed for n in unlisted):
            return  # nothing went: no compaction replaced a part meanwhile
        listed = commit.part_sizes(fs, f"{root}/{what}")
        names = [n for n in now if n not in done]  # the merged parts (and any committed since)
        seen = [np.unique(np.concatenate(seen))] if seen else [np.array([], np.int64)]
    raise ValueError(f"{storage.public_uri(output)} kept changing while it was read (compactions replaced parts "
                     f"{RELISTS + 1} times): read it again")


_GONE = object()  # a part deleted since the listing


def _video_hashes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(a 64-bit hash of each distinct video_uri (Python's), each row's index into them)."""
    uris = table.column("video_uri").combine_chunks().dictionary_encode()
    keys = np.fromiter((hash(u) for u in uris.dictionary.to_pylist()), np.int64, len(uris.dictionary))
    return keys, uris.indices.to_numpy(zero_copy_only=False)


def _read_part(fs, path: str, size: Optional[int], columns: Optional[list], chosen: Optional[list],
               value_set: Optional[pa.Array], without: tuple) -> Optional[pa.Table]:
    """A part's table as `parts` says, or None where nothing of it is wanted. Read in
    byte ranges as pyarrow asks (of its listed size: no HEAD first), never through s3fs's
    or gcsfs's read-ahead, which fetched whole parts for a few column chunks."""
    try:
        with storage.open_read(fs, path, size, PART_BLOCK_BYTES) as f:
            part = pq.ParquetFile(f)
            names = part.schema_arrow.names  # parts of older runs may lack a column
            wanted = [c for c in (columns if columns is not None else names) if c in names and c not in without]
            groups = list(range(part.num_row_groups))
            if chosen is not None:
                groups = [g for g in groups if _may_hold(part.metadata.row_group(g), chosen)]
                if not groups:
                    return None
                if "video_uri" not in wanted:
                    wanted = ["video_uri", *wanted]
            table = part.read_row_groups(groups, columns=wanted)
    except FileNotFoundError:  # replaced since the listing (a compaction, a retraction emptied it)
        return _GONE
    except pa.ArrowInvalid as e:  # not Parquet (a damaged or foreign file): say which
        raise ValueError(f"cannot read {storage.public_uri(storage.to_url(fs, path))}: {e}") from None
    if chosen is not None:
        table = table.filter(pc.is_in(table.column("video_uri"), value_set=value_set))
        if not len(table):
            return None
        if columns is not None and "video_uri" not in columns:
            table = table.drop_columns(["video_uri"])
    return table


def _may_hold(group, chosen: list) -> bool:
    """Whether a row group's statistics leave room for a row of one of `chosen` (sorted; no
    statistics: yes). Parquet orders strings by their UTF-8 bytes, as Python orders them by
    code point."""
    for i in range(group.num_columns):
        column = group.column(i)
        if column.path_in_schema == "video_uri":
            stats = column.statistics
            if stats is None or not stats.has_min_max:
                return True
            first = bisect.bisect_left(chosen, stats.min)  # the first of them not below the group's range
            return first < len(chosen) and chosen[first] <= stats.max
    return True


def labels(output: str, videos: Optional[Collection[str]] = None) -> list[str]:
    """Every top-1 label in OUTPUT's predictions (or those of `videos`), sorted (reads one
    column)."""
    found: set = set()
    for table in parts(output, columns=["label"], videos=videos):
        found.update(pc.unique(table.column("label").drop_null()).to_pylist())
    return sorted(found)


CLOSE_NAMES_SCANNED = 100_000  # beyond this many videos, suggest only names ending as the asked one does


def missing_video(output: str, video: str) -> Optional[str]:
    """Why OUTPUT has no rows of `video`, in a sentence; None where it holds that video
    (its frames just did not match). A name unknown to OUTPUT is told with the nearest
    names it does hold (most often the same file under another prefix or spelling), a
    failed video with its error. Reads videos/'s `video_uri, error` (one row a video; of
    an archive beyond CLOSE_NAMES_SCANNED videos, only the names ending as `video` does)."""
    import difflib
    import posixpath

    want = storage.canonical(video)
    for table in parts(output, commit.VIDEOS_DIR, columns=["video_uri", "error"], video=want):
        if not len(table):
            continue
        if not table.column("error")[len(table) - 1].as_py():
            return None
        errors = read(output, commit.ERRORS_DIR, video=want)
        again = "the next run redoes it" if len(errors) and errors.column("error_type")[0].as_py() in \
            commit.READ_AGAIN.to_pylist() else "--retry-failed redoes it"
        if not len(errors):  # (its errors/ row gone: deleted by hand)
            return f"{storage.public_uri(want)} failed ({again})"
        return f"{storage.public_uri(want)} failed: {errors.column('message')[0].as_py()} (errors/ holds why; {again})"
    base = posixpath.basename(want)
    names: list = []
    same_base: list = []
    for table in parts(output, commit.VIDEOS_DIR, columns=["video_uri"]):
        uris = table.column("video_uri")
        ends = pc.ends_with(uris, "/" + base)
        same_base += uris.filter(pc.or_(ends, pc.equal(uris, base))).to_pylist()
        if names is not None:
            names += uris.to_pylist()
            names = names if len(names) <= CLOSE_NAMES_SCANNED else None
    close = sorted(set(same_base))[:3]
    if not close and names:
        close = difflib.get_close_matches(want, names, n=3, cutoff=0.8)
        score = {u: difflib.SequenceMatcher(None, want, u).ratio() for u in close}
        close = [u for u in close if score[u] >= max(score.values()) - 0.05]  # (names share long prefixes)
    shown = "; did you mean " + " or ".join(storage.public_uri(u) for u in close) + "?" if close else ""
    return (f"{storage.public_uri(output)} holds no video named {storage.public_uri(want)}{shown} (videos are "
            f"named as the run listed them: `rayvid summary OUTPUT` lists them)")


def read(output: str, what: str = commit.PREDICTIONS_DIR, video: Optional[str] = None) -> pa.Table:
    """All committed rows of `what` (optionally of one video), sorted."""
    video = storage.canonical(video) if video is not None else None
    tables = [t for t in parts(output, what, video=video) if len(t)]
    if not tables:
        from rayvid.schema import ERRORS_SCHEMA, PREDICTIONS_SCHEMA, VIDEOS_SCHEMA

        schema = {commit.PREDICTIONS_DIR: PREDICTIONS_SCHEMA, commit.ERRORS_DIR: ERRORS_SCHEMA,
                  commit.VIDEOS_DIR: VIDEOS_SCHEMA}[what]
        return schema.empty_table()
    table = pa.concat_tables(tables, promote_options="default")
    keys = ["video_uri", "frame_index"] if "frame_index" in table.column_names else ["video_uri"]
    return table.sort_by([(k, "ascending") for k in keys])


def summary(output: str) -> pa.Table:
    """The per-video table, top labels as `label share%` text."""
    return summary_of(read(output, commit.VIDEOS_DIR))


RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("status", pa.string()), ("started_at", pa.string()), ("finished_at", pa.string()),
    ("last_heartbeat", pa.string()), ("host", pa.string()), ("input", pa.string()),
    *((name, pa.int64()) for name in ("videos_listed", "videos_skipped", "videos_ok", "videos_failed", "frames")),
    ("wall_s", pa.float64()), ("error", pa.string()),
])


def runs(output: str) -> pa.Table:
    """The runs recorded in OUTPUT/runs/, oldest first. `status` is the record's
    (finished, failed), or, of a record still saying running, `running` while the run may
    still be writing (its process lives, where this host can tell; else its heartbeat is
    under commit.LEASE_S old) and `interrupted` once it cannot be (killed, its machine
    gone: nothing rewrote its record). A file there that is no run record rayvid wrote
    (not JSON, not an object, fields of other types) is a row `unreadable`, its error
    saying why, so one damaged file hides no run."""
    fs, root = storage.resolve(output)
    root = root.rstrip("/")
    folder = f"{root}/{commit.RUNS_DIR}"
    if not fs.isdir(folder):
        raise commit.not_found(fs, root, output, f"no rayvid runs recorded at {storage.public_uri(output)} "
                                                 f"(no {commit.RUNS_DIR}/ folder)")
    names = sorted(name[: -len(".json")] for name in (p.rsplit("/", 1)[-1] for p in storage.files_in(fs, folder, "*.json"))
                   if not name.startswith("."))

    def read(name: str):
        try:
            with fs.open(f"{folder}/{name}.json", "rb") as f:
                return json.load(f)
        except FileNotFoundError:  # gone since the listing
            return None
        except ValueError as e:  # not JSON (UnicodeDecodeError is one too)
            return e

    with concurrent.futures.ThreadPoolExecutor(max(1, min(16, len(names)))) as pool:
        rows = [_run_row(name, record) for name, record in zip(names, pool.map(read, names)) if record is not None]
    rows.sort(key=lambda r: (r.get("started_at") or "", r["run_id"]))
    return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA)


def _run_row(name: str, record) -> dict:
    """`runs`' row of one record (`name`: its file's, without .json)."""
    def text(value):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{value!r} is no text")
        return value

    def count(value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{value!r} is no count")
        return value

    try:
        if isinstance(record, ValueError):
            raise record
        if not isinstance(record, dict):
            raise TypeError(f"a JSON {type(record).__name__}, not an object")
        status = text(record.get("status")) or ""
        if status == "running" and not commit.alive(record):
            status = "interrupted"
        stats, config = record.get("stats") or {}, record.get("config") or {}
        if not isinstance(stats, dict) or not isinstance(config, dict):
            raise TypeError("its stats or config is not an object")
        beat = record.get("heartbeat_at")
        wall = stats.get("wall_s")
        if wall is not None and (isinstance(wall, bool) or not isinstance(wall, (int, float))):
            raise TypeError(f"{wall!r} is no number of seconds")
        return {"run_id": text(record.get("run_id")) or name, "status": status,
                "started_at": text(record.get("started_at")), "finished_at": text(record.get("finished_at")),
                "last_heartbeat": commit.record_time(beat) if beat is not None else None,
                "host": text(record.get("host")),
                "input": storage.public_uri(text(config.get("input")) or "") or None,
                **{k: count(stats.get(k)) for k in ("videos_listed", "videos_skipped", "videos_ok", "videos_failed",
                                                    "frames")},
                "wall_s": None if wall is None else float(wall),
                "error": storage.redact(text(record.get("error"))) if record.get("error") is not None else None}
    except (TypeError, ValueError, OverflowError, OSError) as e:
        why = " ".join(str(e).split())[:200]
        return {"run_id": name, "status": "unreadable", "error": f"{commit.RUNS_DIR}/{name}.json is no run record "
                f"rayvid wrote: {type(e).__name__}: {why}"}


def summary_of(videos: pa.Table) -> pa.Table:
    """`summary` of rows of OUTPUT/videos/ already read."""
    tops = [", ".join(f"{label_text(t['label'])} {100 * t['share']:.0f}%" for t in (row or []))
            for row in videos.column("top_labels").to_pylist()]
    keep = ["video_uri", "frames", "duration_s", "fps", "width", "height", "codec", "decoder"]
    table = videos.select(keep).replace_schema_metadata(None)  # (no videos/ part: not its schema's version)
    return (table.append_column("top_labels", pa.array(tops, pa.string()))
            .append_column("error", videos.column("error"))
            .append_column("run_id", videos.column("run_id")))


ROUNDING_S = 1e-3  # containers' durations and times: rounded to the millisecond (MP4's usual timescale) or finer


def frame_ends(t: np.ndarray, duration: Optional[float], fps: Optional[float]) -> np.ndarray:
    """When each of a video's sampled frames (at times `t`, ascending) stops being shown:
    at the next one; the last, after the median step between them (where only one was
    kept, at the video's end: it stands for the whole video, as a key frame of --keyframes
    does, or the only frame of --every N kept in a video under N frames), never past the
    video's `duration` (but at least one frame)."""
    frame = 1.0 / fps if fps else 0.0
    steps = np.diff(t)
    if len(steps):
        step = float(np.median(steps))
    else:  # (one frame at `fps` where the video's duration is not known)
        step = max(duration - t[-1], frame) if duration is not None and duration > t[-1] else frame
    last = t[-1] + step
    # past the end (a variable-frame-rate video's median step may run past it): the end, but
    # at least one frame; by less than a millisecond, a container's rounded times: as it is
    tolerance = min(ROUNDING_S, frame / 2) if frame else ROUNDING_S
    if duration is not None and duration > t[-1] and last - duration > tolerance:
        last = max(duration, t[-1] + frame)
    return np.r_[t[1:], last]


def row_ends(t: np.ndarray, duration: Optional[float], fps: Optional[float],
             clip_ends: Optional[np.ndarray] = None) -> np.ndarray:
    """When each of a video's rows (at times `t`, ascending) stops counting: `frame_ends`,
    each row until the next one starts (overlapping clips, --clip-stride < N, and clips of
    every k-th frame, --every k, too); a clip run's last row (`clip_ends`, the rows' end_s,
    NaN where a row has none) at its clip's end."""
    ends = frame_ends(t, duration, fps)
    if clip_ends is not None and len(t) and not np.isnan(clip_ends[-1]):
        ends[-1] = clip_ends[-1]
    return ends


def clip_ends_of(preds: pa.Table) -> Optional[np.ndarray]:
    """The rows' end_s as float64 (NaN where null), None where the table has no end_s (a
    run of frames): a clip run's rows say where each clip ends (the frame after its last)."""
    if "end_s" not in preds.column_names:
        return None
    return preds.column("end_s").fill_null(np.nan).to_numpy().astype(np.float64)


def label_segments(preds: pa.Table, label: Optional[str] = None, min_score: float = -math.inf,
                   min_duration: float = 0.0, gap: float = GAP_S, videos: Optional[dict] = None) -> pa.Table:
    """Contiguous runs of each video's top-1 label, from rows sorted by (video_uri,
    frame_index). A frame lasts until the next sampled frame (the last one: the median
    step between sampled frames, or the rest of the video where only one was kept, never
    past the video's end), where `videos` gives each video's (duration_s, fps) as its
    videos/ row says. Frames scoring below `min_score` belong to no segment. Runs of the
    same label less than `gap` seconds apart merge (a merged run spans the frames between,
    which may show other labels: a flicker does not split a scene); then runs shorter than
    `min_duration` go, and with `label` only that label's remain."""
    out = {name: [] for name in SEGMENTS_SCHEMA.names}
    if len(preds) == 0:
        return SEGMENTS_SCHEMA.empty_table()
    uris = preds.column("video_uri").to_numpy(zero_copy_only=False)
    times = preds.column("timestamp_s").to_numpy()
    labels = preds.column("label").to_numpy(zero_copy_only=False)
    scores = preds.column("score").fill_null(np.nan).to_numpy().astype(np.float64)
    clip_ends = clip_ends_of(preds)  # (a video of one clip was 0.1 s long by the rule for frames)
    starts = np.flatnonzero(np.r_[True, uris[1:] != uris[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(uris)]):
        t = times[lo:hi]
        ends = row_ends(t, *((videos or {}).get(uris[lo]) or (None, None)),
                        None if clip_ends is None else clip_ends[lo:hi])
        lab = labels[lo:hi].copy()
        sc = scores[lo:hi]
        ok = np.array([x is not None for x in lab]) & (sc >= min_score)
        lab[~ok] = None
        change = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        open_runs: dict = {}  # label -> the run being extended: [start, end, frames, sum, max]
        runs = []
        for a, b in zip(change, np.r_[change[1:], len(lab)]):
            name = lab[a]
            if name is None or (label is not None and name != label):
                continue
            run = open_runs.get(name)
            if run is not None and t[a] - run[1] < gap:
                run[1] = ends[b - 1]
                run[2] += b - a
                run[3] += float(sc[a:b].sum())
                run[4] = max(run[4], float(sc[a:b].max()))
                continue
            run = [t[a], ends[b - 1], b - a, float(sc[a:b].sum()), float(sc[a:b].max()), name]
            open_runs[name] = run
            runs.append(run)
        for start, end, n, total, best, name in sorted(runs, key=lambda r: (r[0], r[5])):
            if end - start < min_duration:
                continue
            out["video_uri"].append(uris[lo])
            out["label"].append(name)
            out["start_s"].append(float(start))
            out["end_s"].append(float(end))
            out["duration_s"].append(float(end - start))
            out["frames"].append(int(n))
            out["mean_score"].append(total / n)
            out["max_score"].append(best)
    return pa.table(out, schema=SEGMENTS_SCHEMA)


def _timing(output: str, video: Optional[str] = None) -> dict:
    """{video_uri: (duration_s, fps)} from OUTPUT's videos/ rows (of `video` alone where
    given), None where a row does not know (0)."""
    out = {}
    for table in parts(output, commit.VIDEOS_DIR, columns=["video_uri", "duration_s", "fps"], video=video):
        out.update((row["video_uri"], (row["duration_s"] or None, row["fps"] or None)) for row in table.to_pylist())
    return out


def segments(output: str, label: Optional[str] = None, min_score: float = -math.inf,
             min_duration: float = 0.0, gap: float = GAP_S, video: Optional[str] = None) -> pa.Table:
    """`label_segments` over every committed video (or one), part by part."""
    columns = ["video_uri", "frame_index", "timestamp_s", "label", "score", "end_s"]  # (end_s: clip runs' parts)
    video = storage.canonical(video) if video is not None else None
    videos = _timing(output, video)  # where each video's last frame ends
    found = []
    for table in parts(output, columns=columns, video=video):
        if label is not None:  # a part without the label holds none of its segments
            if not pc.any(pc.equal(table.column("label"), label)).as_py():
                continue
        found.append(label_segments(table.sort_by([("video_uri", "ascending"), ("frame_index", "ascending")]),
                                    label, min_score, min_duration, gap, videos))
    if not found:
        return SEGMENTS_SCHEMA.empty_table()
    return pa.concat_tables(found).sort_by([("video_uri", "ascending"), ("start_s", "ascending")])


def find(output: str, label: str, min_score: float = -math.inf, min_duration: float = 0.0,
         gap: float = GAP_S) -> pa.Table:
    """Videos showing `label`, longest total time first, with their time ranges."""
    segs = segments(output, label, min_score, min_duration, gap)
    rows: dict = {}
    for s in segs.to_pylist():
        r = rows.setdefault(s["video_uri"], {"video_uri": s["video_uri"], "label": label, "segments": 0,
                                             "seconds": 0.0, "first_s": s["start_s"], "max_score": -math.inf,
                                             "ranges": []})
        r["segments"] += 1
        r["seconds"] += s["duration_s"]
        r["max_score"] = max(r["max_score"], s["max_score"])
        r["ranges"].append(f"{s['start_s']:.2f}-{s['end_s']:.2f}")
    found = sorted(rows.values(), key=lambda r: (-r["seconds"], r["video_uri"]))
    for r in found:
        r["ranges"] = ", ".join(r["ranges"])
    schema = pa.schema([("video_uri", pa.string()), ("label", pa.string()), ("segments", pa.int64()),
                        ("seconds", pa.float64()), ("first_s", pa.float64()), ("max_score", pa.float32()),
                        ("ranges", pa.string())])
    return pa.Table.from_pylist(found, schema=schema)


def similar(output: str, k: int = 10, video: Optional[str] = None, time_s: Optional[float] = None,
            image: Optional[str] = None, vector: Optional[np.ndarray] = None, model: Optional[str] = None) -> pa.Table:
    """The k frames whose embeddings are nearest (cosine) to a query: the frame of `video`
    shown at `time_s` (itself excluded), an `image` embedded by the run's model, or a
    `vector`. Brute force over every embedding in memory (4 x D bytes per frame): for
    archives beyond memory, load the `embedding` column into a vector index."""
    uris, index, times, labels, matrix, run_ids = [], [], [], [], [], []
    writers: dict = {}  # run id -> its embeddings' rows
    for table in parts(output, columns=["video_uri", "frame_index", "timestamp_s", "label", "embedding", "run_id"]):
        if "embedding" not in table.column_names:
            continue
        table = table.filter(pc.is_valid(table.column("embedding")))
        for row in pc.value_counts(table.column("run_id")).to_pylist():
            writers[row["values"]] = writers.get(row["values"], 0) + row["counts"]
        run_ids += table.column("run_id").cast(pa.string()).chunks
        uris += table.column("video_uri").to_pylist()
        index.append(table.column("frame_index").to_numpy())
        times.append(table.column("timestamp_s").to_numpy())
        labels += table.column("label").to_pylist()
        emb = table.column("embedding").combine_chunks()
        matrix.append(emb.values.to_numpy().reshape(len(table), emb.type.list_size))
    if not matrix:
        # (a --video that failed: its error, as every verb taking --video says it)
        raise ValueError((video is not None and missing_video(output, storage.canonical(video)))
                         or f"no embeddings in {storage.public_uri(output)}: run with --embed")
    index, times, matrix = np.concatenate(index), np.concatenate(times), np.concatenate(matrix)
    run_ids = pa.chunked_array(run_ids, pa.string())
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix = matrix / np.where(norms > 0, norms, 1)
    # run id -> the model and layer that embedded its frames (None: not known); of several runs
    spaces = _embedding_spaces(output, writers) if len(writers) > 1 and vector is None else {}
    skip, space = -1, None
    if vector is None and image is not None:
        vector, used = embed_image(output, image, model, runs=tuple(sorted(writers, key=lambda r: -writers[r])))
        space = _space(dataclasses.asdict(used))
    elif vector is None:
        video = storage.canonical(video)
        mine = np.flatnonzero(np.array([u == video for u in uris]))
        if not len(mine):
            raise ValueError(missing_video(output, video)
                             or f"no embeddings of {storage.public_uri(video)} in {storage.public_uri(output)}")
        mine = mine[np.argsort(times[mine], kind="stable")]
        duration, fps = _timing(output, video).get(video, (None, None))
        # the video's end: its duration, else where its last embedded frame stops being shown
        # (unknown for one frame of a video whose videos/ row gives neither: no check)
        end = max(float(frame_ends(times[mine], duration, fps)[-1]), duration or 0.0)
        if end > times[mine[-1]] and time_s >= end - 1e-9:  # (it answered for the last frame, silently)
            raise ValueError(f"--time {time_s:g} is past the end of {storage.public_uri(video)} ({end:g} s)")
        shown = mine[times[mine] <= time_s + 1e-9]  # the frame on screen at time_s
        skip = int(shown[np.argmax(times[shown])]) if len(shown) else int(mine[np.argmin(times[mine])])
        vector = matrix[skip]
        space = spaces.get(run_ids[skip].as_py()) if spaces else None
    vector = np.asarray(vector, np.float32)
    if vector.shape != (matrix.shape[1],):
        raise ValueError(f"query vector has shape {vector.shape}, the embeddings ({matrix.shape[1]},)")
    sims = matrix @ (vector / (np.linalg.norm(vector) or 1.0))
    if skip >= 0:
        sims[skip] = -np.inf
    candidates = len(sims) - (skip >= 0)
    others = sorted(r for r, sp in spaces.items() if sp is not None and sp != space) if space is not None else []
    if others:
        # another model's (or layer's) vectors are in another space: their cosines mean nothing
        codes = pc.dictionary_encode(run_ids).combine_chunks()
        wanted = [i for i, r in enumerate(codes.dictionary.to_pylist()) if r in set(others)]
        other = np.isin(codes.indices.to_numpy(zero_copy_only=False), wanted)
        sims[other] = -np.inf
        candidates -= int(other.sum())  # (never the query's own row: its run's space is the query's)
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        print(f"rayvid: compared with the frames embedded as the query was ({_space_text(space)}), not the "
              f"{int(other.sum())} embedded by another model or layer (run {shown}): their cosines mean nothing",
              file=sys.stderr)
    k = max(0, min(k, candidates))
    m = min(len(sims), 4 * k + 16)  # the best m by partition, then an exact, tie-stable sort
    best = np.argpartition(-sims, m - 1)[:m] if m < len(sims) else np.arange(len(sims))
    order = sorted(best.tolist(), key=lambda i: (-sims[i], uris[i], index[i]))[:k]
    return pa.table({
        "video_uri": pa.array([uris[i] for i in order], pa.string()),
        "frame_index": pa.array(index[order], pa.int64()),
        "timestamp_s": pa.array(times[order], pa.float64()),
        "label": pa.array([labels[i] for i in order], pa.string()),
        "similarity": pa.array(sims[order], pa.float32()),
    })


def _space(model: dict) -> Optional[tuple]:
    """What decides a run's embedding space, from its record's config `model`: the model
    (as shown: a URL without its query; a local path with its links resolved where this
    machine has it), the weights of a keras.applications name (null is
    its ImageNet default), the --embed layer ("" for auto) and --model-output ("": none).
    None where it cannot be told:
    no name, or a model path recorded relative (records before 2026-11-30)."""
    from rayvid import models

    name = model.get("name") if isinstance(model, dict) else None
    if not isinstance(name, str) or not name:
        return None
    if name not in models.APPLICATIONS and "://" not in name and not os.path.isabs(name):
        return None
    if os.path.isabs(name):  # one file under two paths (a symlink) is one model, where this machine sees it
        name = os.path.realpath(name)
    weights = (model.get("weights") or "imagenet") if name in models.APPLICATIONS else None  # (a model file's own)
    embed = model.get("embed")
    layer = "" if embed in (None, True, "auto") else str(embed)
    output = model.get("output") if isinstance(model.get("output"), str) else ""  # (auto's layer feeds it)
    return (storage.public_uri(name), storage.public_uri(weights) if isinstance(weights, str) else None, layer, output)


def _space_text(space: tuple) -> str:
    name, weights, layer, output = space
    return (name + (f", weights {weights}" if weights and weights != "imagenet" else "") + (f", layer {layer}" if layer else "")
            + (f", output {output}" if output else ""))


def _embedding_spaces(output: str, runs) -> dict:
    """{run id: `_space` of its record} for the runs in `runs` (those that wrote
    embeddings), read side by side; None for a run whose record is missing, unreadable or
    does not tell (its frames are compared with any query)."""
    fs, root = storage.resolve(output)

    def space(run_id: str) -> Optional[tuple]:
        try:
            record = commit.read_run_record(fs, root.rstrip("/"), run_id)
        except storage.ACCESS_ERRORS:
            return None
        config = record.get("config") if isinstance(record, dict) else None
        return _space(config.get("model")) if isinstance(config, dict) else None

    runs = list(runs)
    with concurrent.futures.ThreadPoolExecutor(min(16, max(1, len(runs)))) as pool:
        return dict(zip(runs, pool.map(space, runs)))


def embed_image(output: str, image: str, model_url: Optional[str] = None, runs: tuple = ()) -> tuple:
    """An image's embedding, and the ModelConfig that made it: the model of the `--embed` run
    that wrote OUTPUT's embeddings: of `runs` (run ids, those that wrote most first), the
    first whose record says `--embed` (finished or not: its committed rows are there); with
    none, the latest finished `--embed` run. `model_url` instead of the model file it names (a signed URL's
    signature is not recorded). The image is turned upright as its EXIF orientation says
    (as a viewer shows it; frames are upright too), 16-bit greys taken to 8 bits, and
    resized to the model's input as the decoder resizes frames. A runs/ file that is not a
    run record is passed over."""
    from PIL import Image, ImageOps

    from rayvid import infer, models
    from rayvid.config import RunConfig, is_model_path

    where = storage.public_uri(image)
    try:  # (before the model loads: a typo is said at once)
        data = storage.read_bytes(image)
    except FileNotFoundError as e:
        if not storage.absent(e):  # fsspec's HTTP filesystem: a server it cannot reach, or a 403
            raise InputError(f"cannot read image {where}: {storage.describe(e)}") from None
        raise InputError(f"no image at {where}") from None
    except storage.ACCESS_ERRORS as e:
        raise InputError(f"cannot read image {where}: {storage.describe(e)}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16"):  # (Pillow's RGB of these is white: 0..65535 clipped at 255)
                img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8), "L")
            rgb = img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise InputError(f"cannot read image {where}: too large for Pillow's limit ({e})") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image {where}: not an image Pillow can decode "
                         f"({type(e).__name__})") from None
    fs, root = storage.resolve(output)
    records = []
    for path in storage.files_in(fs, f"{root.rstrip('/')}/{commit.RUNS_DIR}", "*.json"):
        record = commit.read_run_record(fs, root.rstrip("/"), os.path.basename(path)[: -len(".json")])
        config = record.get("config") if isinstance(record, dict) else None
        embed = isinstance(config, dict) and isinstance(config.get("model"), dict) and config["model"].get("embed")
        if embed:
            records.append(record)
    wrote = [r for run in runs for r in records if r.get("run_id") == run][:1]
    finished = [r for r in records if r.get("status") == "finished" and isinstance(r.get("finished_at", ""), str)]
    if not wrote and not finished:
        raise ValueError(f"no finished --embed run recorded in {storage.public_uri(output)}/runs/")
    record = wrote[0] if wrote else max(finished, key=lambda r: r.get("finished_at", ""))
    config = record["config"]
    if isinstance(config.get("model"), dict) and is_model_path(str(config["model"].get("name") or "")):
        # (a model file's own weights: a run before --weights was refused with one recorded it, unused)
        config = {**config, "model": {**config["model"], "weights": None}}
    try:
        model = RunConfig.from_dict(config).model
    except (ConfigError, TypeError, ValueError) as e:
        raise ValueError(f"the record of run {record.get('run_id')!r} in {storage.public_uri(output)}/runs/ "
                         f"has no config rayvid can read: {e}") from None
    if model_url is not None:
        # (a keras.applications name, or a path made absolute; a model file has weights of its own)
        model = dataclasses.replace(model, name=model_url, weights=None if is_model_path(model_url) else model.weights)
    # labels do not change an embedding: a URL of them the record cannot give back is left out
    if model.labels and "<redacted>" in model.labels:
        model = dataclasses.replace(model, labels=None)
    for flag, value in (("--model", model.name), ("--weights", model.weights),
                        *(("--custom-objects", spec) for spec in model.custom_objects)):
        if value and "<redacted>" in value:  # storage.redact took the URL's query out of the record
            hint = "give it again: similar --model URL" if flag == "--model" else "it cannot be loaded from the record"
            raise ValueError(f"run {record.get('run_id')!r} read its {flag} from a URL whose query "
                             f"its record does not keep ({storage.public_uri(value)}): {hint}")
    def refuse_clips(n: int) -> None:  # (it failed deep in TensorFlow: an image is no clip)
        if n:
            raise ValueError(f"OUTPUT's embeddings are of clips ({n if n > 0 else 'N'} frames: a video model); "
                             f"--image embeds one image: ask with --video URI --time T")

    shape = models.static_shape(model)  # (a .keras clip model of open N fails in the Predictor)
    refuse_clips(shape.clip_len if shape is not None else 0)
    predictor = infer.Predictor(model, batch_size=1)
    refuse_clips(predictor.info.clip_len)
    h, w = predictor.info.input_size
    pixels = np.asarray(rgb.resize((w, h), Image.BICUBIC), np.uint8)
    return predictor.outputs(pixels[None])[1][0], model


def flat_predictions(table: pa.Table, k: Optional[int] = None) -> pa.Table:
    """Per-frame rows for a spreadsheet: top-k as columns `label_1, score_1, ...`; a clip
    run's clip columns; detections as JSON text (`boxes`); no embeddings."""
    topk = table.column("topk").to_pylist()
    k = k if k is not None else max((len(t or []) for t in topk), default=0)
    out = table.select(["video_uri", "frame_index", "timestamp_s", "label", "score"])
    for i in range(k):
        out = out.append_column(f"label_{i + 1}", pa.array(
            [t[i]["label"] if t and len(t) > i else None for t in topk], pa.string()))
        out = out.append_column(f"score_{i + 1}", pa.array(
            [t[i]["score"] if t and len(t) > i else None for t in topk], pa.float32()))
    for name in ("clip_start_frame", "clip_end_frame", "start_s", "end_s", "reused_from", "model", "run_id"):
        if name in table.column_names:
            out = out.append_column(name, table.column(name))
    if "boxes" in table.column_names:  # detections as JSON text; embeddings stay in Parquet
        out = out.append_column("boxes", pa.array(
            [None if b is None else json.dumps(b) for b in table.column("boxes").to_pylist()], pa.string()))
    return out


def _csv_schema(schemas: list) -> pa.Schema:
    """The export's columns: every part's (older parts may lack some), `label_i, score_i`
    up to the most top-k entries any part has, after `score`."""
    k = max(sum(1 for n in schema.names if n.startswith("score_")) for schema in schemas)
    fields = [f for f in pa.unify_schemas(schemas) if not f.name.startswith(("label_", "score_"))]
    at = [f.name for f in fields].index("score") + 1
    tops = [f for i in range(1, k + 1) for f in (pa.field(f"label_{i}", pa.string()), pa.field(f"score_{i}", pa.float32()))]
    return pa.schema(fields[:at] + tops + fields[at:])


def _to_schema(flat: pa.Table, schema: pa.Schema) -> pa.Table:
    """`flat` with the export's columns: those it lacks (a part with fewer top-k) are empty."""
    return pa.table([flat.column(f.name).cast(f.type) if f.name in flat.column_names
                     else pa.nulls(len(flat), f.type) for f in schema], schema=schema)


def export_csv(output: str, dest: str, video: Optional[str] = None) -> int:
    """Per-frame predictions as one CSV file at `dest` (any URL; "-": stdout), built part by
    part in a local temporary file and published whole (a failed export leaves no partial
    file); returns the number of rows. Rows are grouped by video, each video's in frame
    order, videos in the order of OUTPUT's parts (a part is one flush's videos)."""
    import pyarrow.csv as pacsv

    from rayvid.schema import PREDICTIONS_SCHEMA

    video = storage.canonical(video) if video is not None else None
    with tempfile.TemporaryDirectory(prefix="rayvid-export-") as tmp:
        # each part flattened with its own top-k to a local file first: k is the most any
        # part has (a later run's --topk, or detections per frame), known once all are read
        flat_files, schemas = [], []
        for table in parts(output, video=video, without=("embedding",)):  # (not exported)
            if len(table):
                flat = flat_predictions(table.sort_by([("video_uri", "ascending"), ("frame_index", "ascending")]))
                flat_files.append(os.path.join(tmp, f"{len(flat_files):08d}.parquet"))
                pq.write_table(flat, flat_files[-1], compression="none")
                schemas.append(flat.schema)
        schema = _csv_schema(schemas or [flat_predictions(PREDICTIONS_SCHEMA.empty_table()).schema])
        local, rows = os.path.join(tmp, "export.csv"), 0
        with open(local, "wb") as f, pacsv.CSVWriter(f, schema) as writer:
            for path in flat_files:
                flat = pq.read_table(path)
                writer.write_table(_to_schema(flat, schema))
                rows += len(flat)
        publish(local, dest)
    return rows


@contextlib.contextmanager
def stdout() -> Iterator[BinaryIO]:
    """stdout's bytes, flushed at the end. A write that fails (a full disk behind a
    redirect, `> /dev/full`) is a StorageError that says so (it read as "cannot read
    OUTPUT"); a reader that closed the pipe stays BrokenPipeError (the cli ends quietly)."""
    if sys.stdout is None:  # started with it closed (`>&-`)
        raise StorageError("cannot write to stdout: it is closed")
    try:
        sys.stdout.flush()  # (text printed before goes first)
        yield _WriteAll(sys.stdout.buffer)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise StorageError(f"cannot write to stdout: {storage.describe(e)}") from None


class _WriteAll:
    """A writer that writes all it is given. Python's stdout with `-u` or PYTHONUNBUFFERED
    is a raw FileIO, whose write() writes what one system call takes (a pipe: 64 KB) and
    says how much: `shutil.copyfileobj` and `write(data)` would drop the rest, and never see
    the reader gone (exit 0 after a truncated export); the next write raises."""

    def __init__(self, out: BinaryIO):
        self._out = out

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        while view:
            n = self._out.write(view)
            if not n:  # (None: a non-blocking stdout that would block)
                raise BlockingIOError(errno.EAGAIN, "stdout takes no more now")
            view = view[n:]
        return len(data)


def publish(local: str, dest: str) -> None:
    """A finished local file to `dest` (any URL, written whole: `storage.write_atomic`), or
    to stdout where `dest` is "-"."""
    with open(local, "rb") as f:
        if dest == "-":
            with stdout() as out:
                shutil.copyfileobj(f, out, 1 << 20)
            return
        with storage.access(dest, "write"):
            storage.write_atomic(dest, lambda w: shutil.copyfileobj(f, w, 1 << 20))


OWN_FOLDERS = (commit.PREDICTIONS_DIR, commit.ERRORS_DIR, commit.VIDEOS_DIR, commit.RUNS_DIR,
               commit.COMPACTIONS_DIR, commit.RETRACTIONS_DIR)


def check_destination(dest: str, output: str, what: str, source: Optional[str] = None,
                      folder: bool = False) -> None:
    """ValueError where a verb's destination (`what`: a file, or with `folder` a folder)
    would write over what it reads: OUTPUT itself or anything in OUTPUT's own folders (the
    committed parts readers and resumes trust; elsewhere in OUTPUT is fine), or `source`
    (render's video); or where a file's name ends in "/". StorageError for an empty URL."""
    if dest and storage.read_only(dest):  # (before the work: export read every part, render encoded, first)
        raise ValueError(f"{what} {storage.public_uri(dest)} is an http(s):// URL, which is read-only: give a "
                         f"local path or an object store's (s3://, gs://)")

    def where(url: str) -> str:
        fs, path = storage.resolve(url)
        return os.path.realpath(path) if storage.is_local(fs) else storage.to_url(fs, path).rstrip("/")

    at, root = where(dest), where(output)
    if at == root or any(at == f"{root}/{name}" or at.startswith(f"{root}/{name}/") for name in OWN_FOLDERS):
        raise ValueError(f"{what} {storage.public_uri(dest)} is OUTPUT or in its own folders "
                         f"({', '.join(n + '/' for n in OWN_FOLDERS)}), which readers and resumes trust: "
                         f"choose another place")
    if source is not None and at == where(source):
        raise ValueError(f"{what} {storage.public_uri(dest)} is the video it draws on: choose another file")
    if not folder and dest.endswith("/"):
        raise ValueError(f"{what} {storage.public_uri(dest)} names a folder: give a file name")


# --- showing a result ------------------------------------------------------------------

FORMATS = ("table", "csv", "json", "parquet")


def write(table: pa.Table, fmt: str = "table", out: Optional[str] = None) -> None:
    """Print (or write to `out`, any URL) a result as a readable table, CSV, JSON records
    or Parquet."""
    if fmt in ("csv", "json"):  # float32 scores as export writes them (0.9, not 0.8999999761581421)
        table = pa.table({f.name: pc.cast(pc.cast(c, pa.string()), pa.float64()) if f.type == pa.float32() else c
                          for f, c in zip(table.schema, table.columns)})
    if fmt == "table":
        data = (to_text(table) + "\n").encode()
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(table.column_names)
        for row in table.to_pylist():
            w.writerow(["" if v is None else _cell(v, raw=True) for v in row.values()])
        data = buf.getvalue().encode()
    elif fmt == "json":
        # (a NaN or infinity, which JSON has no word for, is null: a record that holds one
        # hid every run from `runs --format json`)
        rows = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
                for row in table.to_pylist()]
        data = (json.dumps(rows, indent=1, default=str, allow_nan=False) + "\n").encode()
    elif fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        if out in (None, "-") and sys.stdout.isatty():
            raise ValueError("--format parquet writes binary: give --out FILE (or redirect stdout)")
    else:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if out is None or out == "-":
        with stdout() as sink:
            sink.write(data)
    else:
        with storage.access(out, "write"):
            storage.write_atomic(out, lambda f: f.write(data))


def to_text(table: pa.Table, max_width: int = 60) -> str:
    """An aligned text table: numbers right-aligned; a line break or tab in a cell shown as
    `\\n`, `\\t` (one row a line); a long cell cut in its middle with '…' (two videos
    under one long prefix stay two names); widths in screen columns (CJK: two each)."""
    if table.num_rows == 0:
        return "(no rows)"
    names = table.column_names
    rows = [[_shown(_cell(v)) for v in r.values()] for r in table.to_pylist()]
    rows = [[c if _columns(c) <= max_width else _cut(c, max_width) for c in r] for r in rows]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in table.schema]
    widths = [max(_columns(n), *(_columns(r[i]) for r in rows)) for i, n in enumerate(names)]

    def pad(c: str, w: int, right: bool) -> str:
        fill = " " * (w - _columns(c))
        return fill + c if right else c + fill

    fmt = lambda cells: "  ".join(  # noqa: E731
        pad(c, w, num) for c, w, num in zip(cells, widths, numeric)).rstrip()
    return "\n".join([fmt(names), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def _shown(text: str) -> str:
    """A cell on one line: control characters as escapes (`\\n`, `\\t`, `\\x1b`...)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _columns(text: str) -> int:
    """Screen columns `text` takes: East Asian wide and full-width characters two."""
    import unicodedata

    if text.isascii():
        return len(text)
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1 for c in text)


def _cut(text: str, width: int) -> str:
    """`text` in at most `width` columns: its start and its end, '…' between; the end is a
    path's whole file name (with its "/") where it leaves CUT_HEAD columns for the start,
    else the columns are shared half and half."""
    def fit(chars, room):
        taken = 0
        for n, c in enumerate(chars):
            taken += _columns(c)
            if taken > room:
                return n
        return len(chars)

    name = "/" + text.rsplit("/", 1)[1] if "/" in text else ""
    if name and _columns(name) + 1 + CUT_HEAD <= width:
        return text[:fit(text, width - 1 - _columns(name))] + "…" + name
    head = fit(text, width // 2)
    tail = fit(text[head:][::-1], width - 1 - width // 2)
    return text[:head] + "…" + (text[len(text) - tail:] if tail else "")


CUT_HEAD = 12  # columns a cut cell keeps of its start, at least, before a file name kept whole


def _cell(v, raw: bool = False) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return repr(v) if raw else f"{v:.3f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return str(v)
