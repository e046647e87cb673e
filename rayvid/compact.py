"""`rayvid compact OUTPUT`: merge small committed parts into parts of about `target_rows`
frame rows, under the commit protocol (commit.py).

Input: OUTPUT's committed parts (`predictions/`, `errors/`, `videos/` files sharing a
name). Output: merged parts `part-compact-<stamp>-<random>-<seq>.parquet` with the same schemas,
rows sorted by (video_uri, frame_index), written like every output file
(`commit.write_parquet`); a video's rows never straddle two parts.

Each merge: (1) an intent record `compactions/<new>.json` names the parts it replaces;
(2) the merged predictions/ and errors/ files, then its videos/ file (its commit point);
(3) the replaced parts' videos/ files, then their other files, are deleted; (4) the record
goes. A merge killed anywhere is finished or undone by the next `recover` (every run and
every compaction starts with it): before (2) ends the replaced parts stay; after, the
merged one does. (A merge still running, by its process on this host or, elsewhere, for
commit.COMPACTION_LEASE_S, is never undone.) rayvid's own readers (`query`) read through `commit.committed_parts` and
never see a row twice; an engine globbing `predictions/` during step (2)-(3) may, for
the seconds between the merged file's upload and the old ones' deletion. Parts of a run
still running (`commit.alive`) are left alone unless asked (a run writing into OUTPUT
must not be compacted under).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayvid import commit, storage
from rayvid.errors import ConfigError
from rayvid.schema import ERRORS_SCHEMA, HEAD_COLUMNS, PREDICTIONS_SCHEMA, VIDEOS_SCHEMA, with_head

TARGET_ROWS = 1_000_000  # the committer's own rows_per_file
FOOTER_BYTES = 64 * 2**10  # read from a part's end for its row count (pyarrow's own first read)

_TABLES = (  # directory, schema, sort keys; videos/ last: it is the commit point
    (commit.PREDICTIONS_DIR, PREDICTIONS_SCHEMA, ["video_uri", "frame_index"]),
    (commit.ERRORS_DIR, ERRORS_SCHEMA, ["video_uri"]),
    (commit.VIDEOS_DIR, VIDEOS_SCHEMA, ["video_uri"]),
)


def compact(output: str, target_rows: int = TARGET_ROWS, include_running: bool = False) -> dict:
    """Merge OUTPUT's small parts; returns what it did (files before/after, merges).
    `include_running`: also merge parts of runs that may still be writing (`commit.alive`:
    a run killed on another host counts as running for commit.LEASE_S after its last
    heartbeat)."""
    if target_rows < 1:
        raise ValueError(f"--target-rows must be >= 1, got {target_rows}")
    fs, root = storage.resolve(output)
    root = root.rstrip("/")
    commit.require_output(fs, root, output)  # before any clean-up work on a typo's path
    commit.recover(output, only=())  # its clean-up: no video's rows are needed here
    _refuse_if_compacting(fs, root)  # (recover finished or undid the dead ones)
    names = commit.committed_parts(fs, root)
    running = set() if include_running else _running_runs(fs, root)
    listed = {d: commit.part_sizes(fs, f"{root}/{d}") for d, _, _ in _TABLES}
    rows = _rows(fs, f"{root}/{commit.PREDICTIONS_DIR}", names, listed[commit.PREDICTIONS_DIR])
    small = [n for n in names if rows[n] is not None and rows[n] < target_rows // 2 and commit.run_of(n) not in running]
    groups, group, total = [], [], 0
    for name in small:
        if group and total + rows[name] > target_rows:
            groups.append(group)
            group, total = [], 0
        group.append(name)
        total += rows[name]
    groups.append(group)
    groups = [g for g in groups if len(g) > 1]
    # two compactions in the same second must not pick one name: it would replace a part
    stamp = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    merged = 0
    for seq, group in enumerate(groups):
        merged += _merge(output, fs, root, group, f"part-compact-{stamp}-{seq:05d}.parquet", listed)
    groups = [g for g in groups if g]  # (a merge whose parts went meanwhile leaves its group empty)
    return {"parts_before": len(names), "parts_after": len(names) - merged + len(groups),
            "merged": merged, "into": len(groups),
            "left_running": sorted({commit.run_of(n) for n in names if commit.run_of(n) in running})}


def _refuse_if_compacting(fs, root: str, mine: str = "") -> None:
    """ConfigError where another compaction of OUTPUT is at work (its intent record alive):
    two would each merge the same parts, every row then committed twice."""
    others = commit.finish_compactions(fs, root) - {mine}  # (and finishes those committed meanwhile)
    if others:
        record: dict = {}
        with contextlib.suppress(*storage.ACCESS_ERRORS, ValueError):  # (only words the message)
            found = dict(commit._compactions(fs, root)).get(sorted(others)[0])
            record = found if isinstance(found, dict) else {}
        started = record.get("started_at")
        when = time.strftime(" started %Y-%m-%dT%H:%M:%SZ", time.gmtime(started)) if isinstance(started, (int, float)) else ""
        raise ConfigError(f"another `rayvid compact` is merging parts of this OUTPUT (host {record.get('host')},"
                          f"{when}): run this again once it has finished (two at once would commit the same "
                          f"rows twice)")


def _merge(output: str, fs, root: str, group: list[str], new: str, listed: dict) -> int:
    """The group's parts merged into `new`; each of its files read in one request (its size
    from `listed`, the folders' listings), several at once. Its intent record is written
    first, and then no other compaction may be at work (else ConfigError, the record
    withdrawn: of two that began at once, one or both stop); a part whose videos/ file went
    since the listing (merged by a compaction that ended meanwhile) is left out, whole.
    Returns how many parts it merged (0: fewer than two were left). A part whose
    predictions/ file is lost (`commit.lost_error`) stops it before it writes any. A part
    holding a video a retraction is taking out (its record there once this merge's is
    written) is left out: merged, its old rows would outlive the retraction (a retraction
    begun after this record waits for this merge to end: `commit.retract`)."""
    record = json.dumps({"replaces": group, "started_at": time.time(), **commit.writer()}).encode()
    intent = f"{root}/{commit.COMPACTIONS_DIR}/{new}.json"
    with commit.active(new):  # never undone by a recover in this process meanwhile
        url = storage.join(output, commit.COMPACTIONS_DIR, f"{new}.json")
        with storage.access(url, "write"):
            storage.write_atomic(url, lambda f: f.write(record))
        try:
            _refuse_if_compacting(fs, root, new)
        except ConfigError:
            fs.rm(intent)
            raise
        retracting = commit.retracting(fs, root)
        taken = pa.array(sorted(retracting), pa.string())
        tables = {}
        for directory, schema, keys in reversed(_TABLES):  # videos/ first: the parts still committed
            paths = [(n, f"{root}/{directory}/{n}", listed[directory][n]) for n in group if n in listed[directory]]
            with concurrent.futures.ThreadPoolExecutor(commit.RECOVER_READS) as pool:
                read = dict(zip([n for n, _, _ in paths], pool.map(lambda p: _read(fs, *p[1:]), paths)))
            if directory == commit.VIDEOS_DIR:
                kept = [n for n in group if read.get(n) is not None and not
                        (len(taken) and pc.any(pc.is_in(read[n].column("video_uri"), value_set=taken)).as_py())]
                if len(kept) >= 2 and any(read.get(n) is not None for n in group if n not in kept):
                    # (the record names what it replaces: deleted once the merged part is committed)
                    record = json.dumps({**json.loads(record), "replaces": kept}).encode()
                    with storage.access(url, "write"):
                        storage.write_atomic(url, lambda f: f.write(record))
                group[:] = kept
                for n in group:  # a part whose predictions/ file is lost: merged, the loss would be for good
                    rows = commit.wrote_frames(read[n], retracting) if n not in listed[commit.PREDICTIONS_DIR] else ()
                    if len(rows):  # (committed before the predictions/ listing: its file was there, if any)
                        fs.rm(intent)
                        raise commit.lost_error(output, n, rows)
            tables[directory] = [_conform(read[n], schema) for n in group if read.get(n) is not None]
            if len(group) < 2:  # (another compaction took them: nothing to merge, nothing written)
                fs.rm(intent)
                group.clear()
                return 0
            if directory != commit.VIDEOS_DIR:
                _write(output, directory, new, tables.pop(directory), schema, keys)
        _write(output, commit.VIDEOS_DIR, new, tables.pop(commit.VIDEOS_DIR), VIDEOS_SCHEMA, ["video_uri"])
    commit.finish_compactions(fs, root)  # deletes the replaced parts, then the record
    return len(group)


def _write(output: str, directory: str, new: str, tables: list, schema: pa.Schema, keys: list) -> None:
    if tables or directory == commit.VIDEOS_DIR:
        table = pa.concat_tables(tables, promote_options="default") if tables else schema.empty_table()
        url = storage.join(output, directory, new)
        with storage.access(url, "write"):  # (said as writing: the cli's fallback says "cannot read OUTPUT")
            commit.write_parquet(url, table.sort_by([(k, "ascending") for k in keys]))


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A part in today's schema (columns an older rayvid did not write: null), keeping the
    head columns it has (`--embed`...)."""
    schema = with_head(schema, [table.schema.field(c) for c in HEAD_COLUMNS if c in table.column_names])
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(len(table), f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _read(fs, path: str, size) -> pa.Table | None:
    try:
        return commit.read_parquet(fs, path, data=commit.fetch_whole(fs, path, size))
    except FileNotFoundError:  # a retraction took its last row since the listing
        return None
    except pa.ArrowInvalid as e:  # not Parquet (a damaged or foreign file): say which, as the read verbs do
        raise ValueError(f"cannot read {storage.public_uri(storage.to_url(fs, path))}: {e}") from None


def _rows(fs, directory: str, names: list, sizes: dict) -> dict:
    """{name: frame rows of its predictions/ file (0: none; None: gone since the listing,
    merged by a compaction that ran meanwhile)}, from each file's footer: a ranged read of
    its end (its size from `sizes`, the folder's listing: no HEAD), several at once."""
    def rows(name: str) -> int | None:
        path = f"{directory}/{name}"
        if name not in sizes:
            return 0
        try:
            with (storage.RangeReader(fs, path, sizes[name], FOOTER_BYTES) if sizes[name] is not None
                  else fs.open(path, "rb")) as f:
                return pq.ParquetFile(f).metadata.num_rows
        except FileNotFoundError:
            return None
        except pa.ArrowInvalid as e:  # (as `_read`)
            raise ValueError(f"cannot read {storage.public_uri(storage.to_url(fs, path))}: {e}") from None

    with concurrent.futures.ThreadPoolExecutor(commit.RECOVER_READS) as pool:
        return dict(zip(names, pool.map(rows, names)))


def _running_runs(fs, root: str) -> set:
    running = set()
    records = storage.files_in(fs, f"{root}/{commit.RUNS_DIR}", "*.json")
    for path in records:  # (one that is not a run record, or gone since the listing: no run)
        name = path.rsplit("/", 1)[-1][: -len(".json")]
        record = commit.read_run_record(fs, root, name)
        if commit.alive(record):
            running.add(str(record.get("run_id") or name))
    return running
