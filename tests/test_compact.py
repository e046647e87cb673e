"""`rayvid compact` merges small parts without a reader ever seeing a video twice or not at
all, even when it is killed between any two of its file operations."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from helpers import BUCKET, write_output

from rayvid import cli, commit, compact, query

VIDEOS = {f"/v/{i:02d}.mp4": [("circle" if j % 7 else "square", 0.5 + 0.01 * j) for j in range(20 + i)]
          for i in range(8)}


def _state(url):
    """What a reader sees: every committed frame row and video row, sorted."""
    preds = query.read(url).select(["video_uri", "frame_index", "label", "score"]).to_pylist()
    videos = query.read(url, "videos").select(["video_uri", "frames", "error"]).to_pylist()
    return preds, videos


def _files(root, directory):
    d = os.path.join(root, directory)
    return sorted(n for n in os.listdir(d) if n.endswith(".parquet")) if os.path.isdir(d) else []


@pytest.fixture
def small_parts(tmp_path):
    url = str(tmp_path / "out")
    write_output(url, VIDEOS, rows_per_file=1, failed=("/v/bad.mp4",))  # a part per video
    return url


def test_compact_merges_small_parts_into_sorted_files(small_parts):
    before = _state(small_parts)
    assert len(_files(small_parts, "videos")) == 9
    done = compact.compact(small_parts, target_rows=100)
    assert done["parts_before"] == 9 and done["merged"] == 9 and done["parts_after"] == done["into"] == 3
    assert _state(small_parts) == before
    for name in _files(small_parts, "predictions"):
        t = pq.read_table(os.path.join(small_parts, "predictions", name))
        assert len(t) <= 100
        keys = list(zip(t.column("video_uri").to_pylist(), t.column("frame_index").to_pylist()))
        assert keys == sorted(keys)
        assert t.schema.metadata[b"rayvid.schema_version"] == b"1"
    assert _files(small_parts, "predictions") == _files(small_parts, "videos")
    assert len(_files(small_parts, "errors")) == 1  # the failed video's row moved with its part
    assert not os.listdir(os.path.join(small_parts, "compactions"))
    # again: nothing small enough to merge in pairs under the same target
    assert compact.compact(small_parts, target_rows=100)["merged"] == 0


def test_a_rerun_resumes_from_compacted_parts(small_parts):
    compact.compact(small_parts)
    committed = commit.recover(small_parts)
    assert set(committed.uris()) == set(VIDEOS) | {"/v/bad.mp4"}
    assert len(committed.files_of(committed.uris())) == 1


class Crash(Exception):
    pass


def _count_mutations(monkeypatch, crash_at=None):
    """Counts (and at `crash_at`, fails) the file operations that change OUTPUT: renames
    into place (every local write) and deletions."""
    calls = {"n": 0}
    real_replace, real_rm = os.replace, LocalFileSystem.rm

    def step():
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise Crash(f"killed at file operation {crash_at}")

    def replace(src, dst, *a, **kw):
        step()
        return real_replace(src, dst, *a, **kw)

    def rm(self, path, *a, **kw):  # a list: deleted one by one, a kill possible between any two
        for one in path if isinstance(path, list) else [path]:
            step()
            real_rm(self, one, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(LocalFileSystem, "rm", rm)
    return calls


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _as_if_dead(out):
    """Intent records of compactions as a killed process on this host leaves them."""
    folder = os.path.join(out, "compactions")
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, name)) as f:
            record = json.load(f)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(dict(record, pid=_dead_pid()), f)


def test_killed_at_every_step_readers_see_each_video_once_and_recover_finishes(tmp_path, monkeypatch):
    url = str(tmp_path / "probe")
    write_output(url, VIDEOS, rows_per_file=1, failed=("/v/bad.mp4",))
    want = _state(url)
    calls = _count_mutations(monkeypatch)
    compact.compact(url, target_rows=10_000)
    steps = calls["n"]
    monkeypatch.undo()
    assert steps == 1 + 3 + (9 + 8 + 1) + 1  # record, 3 merged files, the 9 parts' 18 files, record
    for crash_at in range(1, steps + 1):
        out = str(tmp_path / f"crash{crash_at}")
        write_output(out, VIDEOS, rows_per_file=1, failed=("/v/bad.mp4",))
        _count_mutations(monkeypatch, crash_at)
        with pytest.raises(Crash):
            compact.compact(out, target_rows=10_000)
        monkeypatch.undo()
        _as_if_dead(out)  # the compaction's process, killed, is gone
        assert _state(out) == want, f"killed at step {crash_at}: a reader sees other rows"
        commit.recover(out)  # what the next run or compaction does first
        assert _state(out) == want, f"killed at step {crash_at}: recover lost or duplicated rows"
        assert set(_files(out, "predictions")) <= set(_files(out, "videos"))  # no orphans
        assert not os.listdir(os.path.join(out, "compactions"))
        compact.compact(out, target_rows=10_000)
        assert _state(out) == want and len(_files(out, "videos")) == 1


def test_parts_of_a_running_run_are_left_alone(small_parts):
    record = os.path.join(small_parts, "runs", "r2.json")
    os.makedirs(os.path.dirname(record), exist_ok=True)
    new = {"/v/new.mp4": [("circle", 0.9)] * 5, "/v/new2.mp4": [("circle", 0.9)] * 5}
    write_output(small_parts, new, run_id="r2", rows_per_file=1)
    with open(record, "w") as f:  # running, in this process
        json.dump({"run_id": "r2", "status": "running", **commit.writer()}, f)
    with commit.active("r2"):
        done = compact.compact(small_parts, target_rows=300)
    assert done["left_running"] == ["r2"] and done["merged"] == 9
    assert sum(n.startswith("part-r2-") for n in _files(small_parts, "videos")) == 2
    # again within the same second, the first merged part no longer small: a second merged
    # part beside it, not written over it
    with commit.active("r2"):
        assert compact.compact(small_parts, target_rows=300, include_running=True)["merged"] == 2
    assert len(_files(small_parts, "videos")) == 2
    assert sorted(query.read(small_parts, "videos").column("video_uri").to_pylist()) == \
        sorted([*VIDEOS, "/v/bad.mp4", *new])


def test_a_killed_run_still_marked_running_is_compacted(small_parts):
    """Its record says running, but its process (on this host) is gone."""
    write_output(small_parts, {"/v/new.mp4": [("circle", 0.9)] * 5}, run_id="r2", rows_per_file=1)
    os.makedirs(os.path.join(small_parts, "runs"), exist_ok=True)
    with open(os.path.join(small_parts, "runs", "r2.json"), "w") as f:
        json.dump({"run_id": "r2", "status": "running", **commit.writer(), "pid": _dead_pid()}, f)
    assert compact.compact(small_parts)["left_running"] == []


def test_files_in_runs_that_are_no_run_records_do_not_stop_a_compaction(small_parts):
    """runs/ files rayvid did not write (empty, a JSON list, a pid or heartbeat of another
    type): no run is running by them; the compaction goes on (it stopped with a traceback,
    or 'Expecting value' naming no file). A live run's record still keeps its parts."""
    write_output(small_parts, {"/v/new.mp4": [("circle", 0.9)] * 5}, run_id="r3", rows_per_file=1)
    runs = os.path.join(small_parts, "runs")
    os.makedirs(runs, exist_ok=True)
    for name, text in {"empty": "", "list": "[1, 2]", "pid": '{"status": "running", "node": "%s", "pid": "abc"}'
                       % commit.writer()["node"], "beat": '{"status": "running", "heartbeat_at": "soon"}'}.items():
        with open(os.path.join(runs, f"{name}.json"), "w") as f:
            f.write(text)
    import subprocess

    running = subprocess.Popen(["sleep", "60"])  # r3's process, alive, on this host
    try:
        with open(os.path.join(runs, "r3.json"), "w") as f:
            json.dump({"run_id": "r3", "status": "running", **commit.writer(), "pid": running.pid, "pid_started": ""}, f)
        done = compact.compact(small_parts)
    finally:
        running.kill()
        running.wait()
    assert done["left_running"] == ["r3"] and done["merged"] > 0


def test_a_compaction_in_progress_is_not_undone_by_a_run_starting(small_parts):
    """A run (or compaction) starting while a merge is between its merged predictions file
    and its commit point leaves it alone; once that merge's process is gone, it is undone."""
    import subprocess

    fs = LocalFileSystem()
    names = _files(small_parts, "videos")[:2]
    new = "part-compact-20261130T000000Z-0123abcd-00000.parquet"
    os.makedirs(os.path.join(small_parts, "compactions"))
    intent = os.path.join(small_parts, "compactions", f"{new}.json")
    merging = subprocess.Popen(["sleep", "60"])  # the compaction's process, alive, on this host
    try:
        with open(intent, "w") as f:
            json.dump({"replaces": names, "started_at": 0, **commit.writer(), "pid": merging.pid, "pid_started": ""}, f)
        merged = os.path.join(small_parts, "predictions", new)
        fs.cp_file(os.path.join(small_parts, "predictions", names[0]), merged)
        commit.recover(small_parts)
        assert os.path.exists(merged) and os.path.exists(intent)
    finally:
        merging.kill()
        merging.wait()
    _as_if_dead(small_parts)
    commit.recover(small_parts)
    assert not os.path.exists(merged) and not os.path.exists(intent)
    assert set(names) <= set(_files(small_parts, "videos"))


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_compact_verb_and_recover_on_object_stores(scheme, request, capsys, caplog):
    """On S3 and GCS; every output file read is closed (gcsfs logs an error for each file
    left to the garbage collector: its read-ahead task is still pending)."""
    import gc

    request.getfixturevalue("s3_endpoint" if scheme == "s3" else "gcs")
    capsys.readouterr()  # what a server printed as it started
    gc.collect()  # what earlier tests left to the garbage collector is not this test's
    caplog.clear()
    url = f"{scheme}://{BUCKET}/compact-out"
    write_output(url, dict(list(VIDEOS.items())[:3]), rows_per_file=1, failed=("/v/bad.mp4",))
    want = _state(url)
    assert commit.recover(url).uris() == sorted([*list(VIDEOS)[:3], "/v/bad.mp4"])
    assert cli.main(["compact", url]) == 0
    assert json.loads(capsys.readouterr().out)["parts_after"] == 1
    assert _state(url) == want
    gc.collect()
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


def test_compact_on_s3_reads_each_part_in_one_request_several_at_once_and_deletes_in_bulk(moto, s3_endpoint):
    """Compaction over many small parts is bound by request latency: a part's row count
    is one ranged GET of its footer, its files one GET each (no HEAD: sizes from the
    folders' listings), several in flight; the replaced files go in one DeleteObjects
    request per folder."""
    url = f"s3://{BUCKET}/compact-many"
    write_output(url, VIDEOS, rows_per_file=1, failed=("/v/bad.mp4",))
    want = _state(url)
    asked, deletes = [], []

    def part(environ):  # the parts' requests take 0.1 s each
        path, query_string = environ["PATH_INFO"], environ.get("QUERY_STRING", "")
        if environ["REQUEST_METHOD"] == "POST" and "delete" in query_string:  # (to the bucket: keys in the body)
            deletes.append(path)
        if "/compact-many/" not in path:
            return False
        asked.append((environ["REQUEST_METHOD"], path.split("/compact-many/")[1], query_string))
        return "/part-r1-" in path

    with moto.slow(part, 0.1) as inflight:
        done = compact.compact(url, target_rows=10_000)
    assert done["merged"] == 9 and done["into"] == 1 and _state(url) == want
    old = [(method, path) for method, path, _ in asked if "/part-r1-" in path]
    assert not [r for r in old if r[0] != "GET"]  # no HEAD, nothing deleted one by one
    per_file = {path: sum(1 for _, p in old if p == path) for _, path in old}
    footers = {p: n for p, n in per_file.items() if p.startswith("predictions/")}
    assert len(footers) == 8 and set(footers.values()) == {2}  # its footer, then the whole file
    assert set(n for p, n in per_file.items() if not p.startswith("predictions/")) == {1}
    assert len(deletes) == 3 + 1  # the 3 folders' replaced files, then the intent record
    assert inflight["most"] >= 4


def test_merged_parts_keep_a_heads_columns(tmp_path):
    """Parts with an `embedding` (or `boxes`) column keep it through a merge; parts of
    older runs without it get nulls."""
    import pyarrow as pa

    from rayvid.schema import PREDICTIONS_SCHEMA, embedding_field, with_head

    url = str(tmp_path / "o")
    write_output(url, dict(list(VIDEOS.items())[:2]), rows_per_file=1)
    first = sorted(os.listdir(os.path.join(url, "predictions")))[0]
    path = os.path.join(url, "predictions", first)
    t = pq.read_table(path)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array([float(i) for i in range(len(t) * 3)], pa.float32()), 3)
    schema = with_head(PREDICTIONS_SCHEMA, [embedding_field(3)])
    t = pa.Table.from_arrays([vectors if f.name == "embedding" else t.column(f.name) for f in schema], schema=schema)
    commit.write_parquet(path, t)
    compact.compact(url)
    merged = query.read(url)
    assert merged.schema.field("embedding").type == pa.list_(pa.float32(), 3)
    by_video = {}
    for r in merged.to_pylist():
        by_video.setdefault(r["video_uri"], []).append(r["embedding"])
    [with_vectors] = [u for u, e in by_video.items() if e[0] is not None]
    assert all(e is not None for e in by_video[with_vectors])
    assert all(e is None for u, es in by_video.items() if u != with_vectors for e in es)


def test_a_compaction_while_another_merges_stops_before_it_writes(small_parts, capsys):
    """Two `rayvid compact` of one OUTPUT at once each merged every part: all rows twice,
    for good. While another's merge is at work (its intent record alive), a compaction
    stops, exit 2, writing nothing; once that one is gone, it goes on."""
    import subprocess

    names = _files(small_parts, "videos")[:2]
    new = "part-compact-20261206T000000Z-0123abcd-00000.parquet"
    os.makedirs(os.path.join(small_parts, "compactions"))
    intent = os.path.join(small_parts, "compactions", f"{new}.json")
    merging = subprocess.Popen(["sleep", "60"])  # the other compaction's process, alive, on this host
    before = _state(small_parts)
    try:
        with open(intent, "w") as f:
            json.dump({"replaces": names, "started_at": 1796515200, **commit.writer(), "pid": merging.pid,
                       "pid_started": ""}, f)
        assert cli.main(["compact", small_parts]) == 2
        err = capsys.readouterr().err
        assert "another `rayvid compact` is merging parts of this OUTPUT (host " in err
        assert "started 2026-12-06T00:00:00Z): run this again once it has finished" in err
        assert sorted(os.listdir(os.path.join(small_parts, "compactions"))) == [f"{new}.json"]
        assert len(_files(small_parts, "videos")) == 9
    finally:
        merging.kill()
        merging.wait()
    _as_if_dead(small_parts)
    assert cli.main(["compact", small_parts]) == 0
    assert _state(small_parts) == before


def test_two_compactions_begun_at_once_commit_each_row_once(tmp_path):
    """Both began before either's intent record was there (here: two processes started
    together, over 150 one-video parts): at most one merges, and each row stays once."""
    import subprocess
    import sys

    url = str(tmp_path / "out")
    videos = {f"/v/{i:03d}.mp4": [("circle", 0.9)] * 3 for i in range(150)}
    write_output(url, videos, rows_per_file=1)
    before = _state(url)
    cmd = [sys.executable, "-m", "rayvid", "compact", url]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) in ([0, 0], [0, 2], [2, 2]), results
    for code, err in results:
        assert code == 0 or "another `rayvid compact` is merging parts" in err, err
    assert _state(url) == before
    assert cli.main(["compact", url]) == 0  # (where both stopped, or one stopped half-way: the rest)
    assert _state(url) == before and len(_files(url, "videos")) == 1


def test_runs_that_committed_compacted_videos_are_still_found(tmp_path):
    """A rerun with other settings names the runs that committed the videos it skips (and
    warns): after a compaction their parts named no run, and it said nothing. The merged
    parts' videos/ rows still say which run committed each video."""
    import pyarrow as pa

    url = str(tmp_path / "out")
    write_output(url, {f"/v/a{i}.mp4": [("circle", 0.9)] * 3 for i in range(3)}, rows_per_file=1, run_id="first")
    write_output(url, {f"/v/b{i}.mp4": [("circle", 0.9)] * 3 for i in range(2)}, rows_per_file=1, run_id="second")
    listing = pa.table({"video_uri": [f"/v/a{i}.mp4" for i in range(3)] + ["/v/b0.mp4", "/v/new.mp4"]})
    assert commit.skipped_by(listing, commit.recover(url), set(), url) == (0, [("first", 3), ("second", 1)])
    assert compact.compact(url)["merged"] == 5
    committed = commit.recover(url)
    assert all(name.startswith("part-compact-") for name in committed.files)
    assert commit.skipped_by(listing, committed, set(), url) == (0, [("first", 3), ("second", 1)])
    assert commit.skipped_by(listing, committed, {"/v/a0.mp4", "/v/a1.mp4"}, url) == (0, [("first", 1), ("second", 1)])
    assert commit.skipped_by(listing, committed, {"/v/b0.mp4"}, url) == (0, [("first", 3)])


def test_parts_another_compaction_merged_after_this_one_listed_them_are_left_out():
    """Another host's compaction merged and deleted the parts between this one's listing
    of OUTPUT and its reading of their row counts: `[Errno 2] No such file` (exit 2). They
    are left out; what is there stays as it was."""
    from helpers import listing_hook_store

    Store = listing_hook_store("hookstore2")
    out = "hookstore2://out"
    try:
        write_output(out, {f"/v/{i:02d}.mp4": [("circle", 0.9)] * 3 for i in range(6)}, rows_per_file=1)
        before = _state(out)
        merged = {}
        # the other one, once this one's recovery and its listing of predictions/ are done
        Store.after_listing = ("/predictions", lambda: merged.update(compact.compact(out)), 1)
        done = compact.compact(out)
        assert merged["merged"] == 6 and done["merged"] == 0
        assert _state(out) == before
    finally:
        Store.after_listing = None
        Store.store.clear()


def test_a_full_disk_is_said_as_writing_and_a_later_compaction_finishes(tmp_path, capsys):
    """A compaction on a full disk said "cannot read OUTPUT: No space left on device" (the
    cli's fallback for a read verb): it names the file it could not write. Readers still
    see each video once; with room again, a compaction merges."""
    import contextlib
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs a small tmpfs (mount: root)")
    try:
        url = str(disk / "out")
        write_output(url, VIDEOS, rows_per_file=1, failed=("/v/bad.mp4",))
        before = _state(url)
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:  # the disk, full
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        assert cli.main(["compact", url]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rayvid: error: cannot write {url}/") and err.endswith(
            tuple(f".{ext}: [Errno 28] No space left on device\n" for ext in ("parquet", "json"))), err
        assert _state(url) == before
        os.remove(disk / "filler")
        assert cli.main(["compact", url]) == 0
        assert _state(url) == before and len(_files(url, "videos")) == 1
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_damaged_part_is_named_by_compact(small_parts, capsys):
    """A truncated predictions/ part: `compact` said only pyarrow's "Parquet magic bytes not
    found", naming no file; it names it, as every read verb does, and changes nothing."""
    out = small_parts
    part = os.path.join(out, "predictions", _files(out, "predictions")[0])
    with open(part, "r+b") as f:
        f.truncate(100)
    assert cli.main(["compact", out]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith(f"rayvid: error: cannot read {part}: "), said
    assert os.path.getsize(part) == 100


def test_a_compaction_and_a_retraction_at_once_leave_the_retracted_video_once(small_parts, caplog):
    """A rerun redoing a changed video read OUTPUT, then `compact` merged the parts before
    its retraction: the retraction named the parts as read, found none, removed nothing,
    and the old rows stayed beside the new ones (a QA find). It now finds where the video
    is. A compaction that sees a retraction at work leaves the parts holding its videos
    out; a retraction that sees a compaction at work waits for it to end."""
    import threading
    import time

    state = commit.recover(small_parts)
    compact.compact(small_parts)
    assert len(_files(small_parts, "videos")) == 1
    commit.retract(small_parts, {"/v/03.mp4"}, state, "late")
    preds, videos = _state(small_parts)
    assert "/v/03.mp4" not in {r["video_uri"] for r in preds} | {r["video_uri"] for r in videos}

    # a retraction at work (its record there, its process this one): its parts stay out
    out = small_parts + "-2"
    write_output(out, VIDEOS, rows_per_file=1)
    holding = commit.recover(out).files_of({"/v/05.mp4"})
    os.makedirs(os.path.join(out, "retractions"))
    with commit.active("busy"):
        with open(os.path.join(out, "retractions", "busy.json"), "w") as f:
            json.dump({"videos": ["/v/05.mp4"], "run_id": "busy", "started_at": time.time(), **commit.writer()}, f)
        done = compact.compact(out)
    assert done["merged"] == len(VIDEOS) - 1 and set(holding) <= set(_files(out, "videos"))

    # a compaction at work (its record, no merged part yet): the retraction waits for it
    os.remove(os.path.join(out, "retractions", "busy.json"))
    merging = "part-compact-20261207T000000Z-00000000-00000.parquet"
    os.makedirs(os.path.join(out, "compactions"), exist_ok=True)
    record = os.path.join(out, "compactions", merging + ".json")
    with open(record, "w") as f:
        json.dump({"replaces": holding, "started_at": time.time(), **commit.writer()}, f)
    with commit.active(merging):
        state = commit.recover(out)
        gone = threading.Timer(1.5, os.remove, [record])
        gone.start()
        started = time.monotonic()
        with caplog.at_level("INFO", logger="rayvid"):
            commit.retract(out, {"/v/05.mp4"}, state, "r9")
        waited = time.monotonic() - started
    assert waited >= 1.0
    assert "/v/05.mp4" not in {r["video_uri"] for r in _state(out)[0]}

    # a dead run's retraction, finished by the next run's recover, waits likewise; one with
    # nothing committed to take out does not wait
    holding = commit.recover(out).files_of({"/v/06.mp4"})
    with open(record, "w") as f:
        json.dump({"replaces": holding, "started_at": time.time(), **commit.writer()}, f)
    with open(os.path.join(out, "retractions", "dead.json"), "w") as f:
        json.dump({"videos": ["/v/06.mp4"], "run_id": "dead", "started_at": 0, "host": "gone", "node": "gone/1"}, f)

    def commit_merge():  # the compaction commits meanwhile: the retraction's parts are renamed
        for folder in ("predictions", "videos"):  # (the commit point last)
            tables = [pq.read_table(os.path.join(out, folder, p)) for p in holding]
            pq.write_table(pa.concat_tables(tables), os.path.join(out, folder, merging))

    with commit.active(merging):
        started = time.monotonic()
        commit.retract(out, {"/v/nothing.mp4"}, commit.Committed(), "r10")
        assert time.monotonic() - started < 1.0
        gone = threading.Timer(1.5, commit_merge)
        gone.start()
        state = commit.recover(out)
        assert time.monotonic() - started >= 1.0 and "/v/06.mp4" not in state
    assert "/v/06.mp4" not in {r["video_uri"] for r in _state(out)[0]}
    assert not os.listdir(os.path.join(out, "retractions")) and merging in _files(out, "videos")


def test_a_retraction_waiting_for_a_compaction_looks_ever_further_apart(small_parts, monkeypatch):
    """A retraction waiting for a compaction at work looked every second, a listing and a
    read per record each time, for as long as an hour where the compaction died on another
    host (its lease): it looks after 1 s, then 1.5 times further apart each time, at most
    COMPACTION_POLL_MAX_S apart. (The sleeps are counted here, not slept.)"""
    import time

    holding = commit.recover(small_parts).files_of({"/v/03.mp4"})
    merging = "part-compact-20261207T000000Z-00000000-00000.parquet"
    os.makedirs(os.path.join(small_parts, "compactions"))
    record = os.path.join(small_parts, "compactions", merging + ".json")
    with open(record, "w") as f:
        json.dump({"replaces": holding, "started_at": time.time(), **commit.writer()}, f)
    pauses = []

    def sleep(seconds):  # the compaction ends after the 8th look
        pauses.append(seconds)
        if len(pauses) == 8:
            os.remove(record)

    monkeypatch.setattr(commit, "COMPACTION_POLL_MAX_S", 4.0)
    with commit.active(merging):
        state = commit.recover(small_parts)
        monkeypatch.setattr(time, "sleep", sleep)
        commit.retract(small_parts, {"/v/03.mp4"}, state, "r1")
        monkeypatch.undo()
    assert pauses == [1.0, 1.5, 2.25, 3.375, 4.0, 4.0, 4.0, 4.0]
    assert "/v/03.mp4" not in {r["video_uri"] for r in _state(small_parts)[0]}
