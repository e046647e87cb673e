"""The committer publishes a video only when all of its rows are there, in typed Parquet."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import read_output

from rayvid import commit
from rayvid.commit import Committer, Listed
from rayvid.schema import (
    ERRORS_SCHEMA,
    INFERRED_SCHEMA,
    KIND_END,
    KIND_FRAME,
    PREDICTIONS_SCHEMA,
    VIDEO_COLUMNS,
    VIDEOS_SCHEMA,
)


def _listed(videos: dict) -> Listed:
    """A listing of video_uri -> (size_bytes, version), as the committer is given it."""
    return Listed(pa.table({"video_uri": list(videos), "size_bytes": [v[0] for v in videos.values()],
                            "version": [v[1] for v in videos.values()]}))


def _frames(uri, indices, segment=0, n_segments=1, reused_from=None):
    n = len(indices)
    topk = [[{"class_id": 1, "label": "b", "score": 0.9}, {"class_id": 0, "label": "a", "score": 0.1}]] * n
    return pa.table(
        {
            "video_uri": [uri] * n,
            "segment": [segment] * n,
            "n_segments": [n_segments] * n,
            "kind": [KIND_FRAME] * n,
            "frame_index": list(indices),
            "timestamp_s": [i / 10 for i in indices],
            "label": ["b"] * n,
            "score": np.full(n, 0.9, np.float32),
            "topk": topk,
            "n_frames": [0] * n,
            "error_stage": [""] * n,
            "error_type": [""] * n,
            "message": [""] * n,
            **{c: [None] * n for c in VIDEO_COLUMNS},
            "reused_from": reused_from or [-1] * n,
            "bytes_read": [0] * n,
        },
        schema=INFERRED_SCHEMA,
    )


def _end(uri, n, error=None, segment=0, n_segments=1, bytes_read=0):
    return pa.table(
        {
            "video_uri": [uri],
            "segment": [segment],
            "n_segments": [n_segments],
            "kind": [KIND_END],
            "frame_index": [-1],
            "timestamp_s": [float("nan")],
            "label": [None],
            "score": pa.array([None], pa.float32()),
            "topk": pa.array([None], INFERRED_SCHEMA.field("topk").type),
            "n_frames": [n],
            "error_stage": ["decode" if error else ""],
            "error_type": ["VideoError" if error else ""],
            "message": [error or ""],
            "decoder": ["decord"],
            "codec": ["h264"],
            "width": [160],
            "height": [120],
            "fps": [10.0],
            "duration_s": [n / 10],
            "reused_from": [-1],
            "bytes_read": [bytes_read],
        },
        schema=INFERRED_SCHEMA,
    )


def _files(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_out_of_order_rows_publish_complete_videos_only(tmp_path):
    c = Committer(str(tmp_path), "r1", "m", rows_per_file=5)
    c.add(_frames("v1", [3, 4]))
    c.add(_end("v1", 5))
    c.add(_frames("v2", [0]))
    assert _files(tmp_path / "predictions") == []  # v1 has 2 of 5 rows: nothing published
    c.add(pa.concat_tables([_frames("v1", [0, 1, 2]), _frames("v2", [1])]))
    # v1 complete (5 rows >= rows_per_file) -> one file, sorted, v2 still pending
    [name] = _files(tmp_path / "predictions")
    t = pq.read_table(tmp_path / "predictions" / name)
    assert t.schema.equals(PREDICTIONS_SCHEMA, check_metadata=False)
    assert t.schema.metadata[b"rayvid.schema_version"] == b"1"
    assert t.column("video_uri").to_pylist() == ["v1"] * 5
    assert t.column("frame_index").to_pylist() == [0, 1, 2, 3, 4]
    assert set(t.column("model").to_pylist()) == {"m"} and set(t.column("run_id").to_pylist()) == {"r1"}
    c.add(_end("v2", 2))
    c.close()
    assert len(_files(tmp_path / "predictions")) == 2
    assert (c.videos_ok, c.videos_failed, c.frames) == (2, 0, 7)
    assert not [f for f in os.listdir(tmp_path / "predictions") if not f.endswith(".parquet")]


def test_failed_video_keeps_its_frames_and_gets_one_error_row(tmp_path):
    c = Committer(str(tmp_path), "r1", "m")
    c.add(_frames("bad", [0, 1]))
    c.add(_end("bad", 2, error="cannot decode frame 2"))
    c.add(_end("worse", 0, error="empty file (0 bytes)"))
    c.close()
    errors = pq.read_table(tmp_path / "errors" / _files(tmp_path / "errors")[0])
    assert errors.schema.equals(ERRORS_SCHEMA, check_metadata=False)
    assert sorted(errors.column("video_uri").to_pylist()) == ["bad", "worse"]
    preds = pq.read_table(tmp_path / "predictions" / _files(tmp_path / "predictions")[0])
    assert preds.column("frame_index").to_pylist() == [0, 1]
    assert (c.videos_ok, c.videos_failed) == (0, 2)
    videos = pq.read_table(tmp_path / "videos" / _files(tmp_path / "videos")[0])
    assert videos.schema.equals(VIDEOS_SCHEMA, check_metadata=False)
    assert videos.to_pylist()[0] == {
        "video_uri": "bad", "size_bytes": -1, "version": "", "frames": 2, "duration_s": 0.2, "fps": 10.0, "width": 160, "height": 120,
        "codec": "h264", "decoder": "decord", "top_labels": [{"label": "b", "share": 1.0}], "error": True,
        "run_id": "r1"}


def test_missing_rows_fail_loudly(tmp_path):
    c = Committer(str(tmp_path), "r1", "m")
    c.add(_frames("v", [0]))
    c.add(_end("v", 2))
    with pytest.raises(RuntimeError, match="1 video\\(s\\) incomplete"):
        c.close()
    assert _files(tmp_path / "predictions") == []


def test_rows_of_a_retried_task_are_kept_once(tmp_path):
    """A task whose actor died is retried from its start: its rows arrive again, before or
    after the unit completed."""
    c = Committer(str(tmp_path), "r1", "m")
    c.add(_frames("v", [0, 1]))  # first attempt, killed after two frames
    c.add(_frames("v", [0, 1, 2]))  # the retry
    c.add(_end("v", 3))
    c.add(pa.concat_tables([_frames("v", [1, 2]), _end("v", 3)]))  # a late copy
    c.close()
    [name] = _files(tmp_path / "predictions")
    assert pq.read_table(tmp_path / "predictions" / name).column("frame_index").to_pylist() == [0, 1, 2]
    assert c.duplicates_dropped == 4 and c.videos_ok == 1 and c.frames == 3


def test_a_retried_tasks_end_row_before_its_frames_waits_for_every_frame(tmp_path):
    """Blocks are not kept in order: the retry's end row can come before the rest of its
    frames. Counting rows (duplicates of the first attempt among them), the unit looked
    complete at 3 rows for 3 frames, [0, 0, 1], was committed so, and frame 2 was dropped
    as a duplicate: each frame counts once."""
    c = Committer(str(tmp_path), "r1", "m")
    c.add(_frames("v", [0, 1]))  # first attempt, its actor died
    c.add(_frames("v", [0]))  # the retry's first block
    c.add(_end("v", 3))  # the retry's end row overtakes its next block
    assert c.videos_ok == 0
    c.add(_frames("v", [1, 2]))
    c.close()
    [name] = _files(tmp_path / "predictions")
    assert pq.read_table(tmp_path / "predictions" / name).column("frame_index").to_pylist() == [0, 1, 2]
    assert c.duplicates_dropped == 2 and c.videos_ok == 1 and c.frames == 3


def test_reused_frames_whose_source_another_attempt_reused_get_the_inferred_frames_prediction(tmp_path):
    """Two attempts of a retried task, each with its own --skip-similar choices, merged
    frame by frame: frame 2 reuses 1 (the first attempt's), and 1 reuses 0 (the retry's).
    Frame 2 gets frame 0's prediction, the one the model made (it was null)."""
    def attempt(labels, reused_from):
        t = _frames("v", [0, 1, 2], reused_from=reused_from)
        t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels))
        for name in ("score", "topk"):
            col = t.column(name).to_pylist()
            t = t.set_column(t.schema.get_field_index(name), name,
                             pa.array([None if lab is None else v for lab, v in zip(labels, col)], t.schema.field(name).type))
        return t

    first = attempt(["x", "y", None], [-1, -1, 1])
    retry = attempt(["x", None, "z"], [-1, 0, -1])
    c = Committer(str(tmp_path), "r1", "m")
    c.add(pa.concat_tables([retry.slice(0, 2), first.slice(2, 1)]))  # what came first of each frame
    c.add(pa.concat_tables([first.slice(0, 2), retry.slice(2, 1), _end("v", 3)]))
    c.close()
    [name] = _files(tmp_path / "predictions")
    rows = pq.read_table(tmp_path / "predictions" / name).to_pylist()
    assert [(r["frame_index"], r["label"], r["reused_from"]) for r in rows] == [(0, "x", None), (1, "x", 0), (2, "x", 1)]
    assert rows[2]["topk"] == rows[0]["topk"] and rows[2]["score"] == rows[0]["score"]


def test_segments_failing_alike_are_said_once(tmp_path):
    """A damaged video cut into 5 segments said its one message 5 times ("segment 1/5: the
    video stream has no frames; segment 2/5: ..."): a run of segments that say the same is
    said once, other messages in their segments' order."""
    c = Committer(str(tmp_path), "r1", "m")
    for k, error in enumerate(["no frames", "no frames", "no frames", "lost the end", "no frames"]):
        c.add(_end("v", 0, error, k, 5))
    c.close()
    [err] = pq.read_table(tmp_path / "errors" / _files(tmp_path / "errors")[0]).to_pylist()
    assert err["message"] == "segments 1-3/5: no frames; segment 4/5: lost the end; segment 5/5: no frames"


def test_more_distinct_frames_than_decoded_fail_loudly(tmp_path):
    c = Committer(str(tmp_path), "r1", "m")
    c.add(_frames("v", [0, 1]))
    with pytest.raises(RuntimeError, match="3 distinct frames for 2"):
        c.add(pa.concat_tables([_frames("v", [2]), _end("v", 2)]))


def test_a_segmented_video_is_published_when_all_segments_are(tmp_path):
    c = Committer(str(tmp_path), "r1", "m")
    c.add(pa.concat_tables([_frames("v", [3, 4], 1, 3), _end("v", 2, None, 1, 3)]))
    c.add(pa.concat_tables([_frames("v", [0, 1, 2], 0, 3), _end("v", 3, None, 0, 3)]))
    c.flush()
    assert _files(tmp_path / "predictions") == []  # segment 2 of 3 still missing
    c.add(pa.concat_tables([_frames("v", [5], 2, 3), _end("v", 1, "lost the end", 2, 3)]))
    c.close()
    preds = pq.read_table(tmp_path / "predictions" / _files(tmp_path / "predictions")[0])
    assert preds.column("frame_index").to_pylist() == [0, 1, 2, 3, 4, 5]
    [err] = pq.read_table(tmp_path / "errors" / _files(tmp_path / "errors")[0]).to_pylist()
    assert err["message"] == "segment 3/3: lost the end"
    [video] = pq.read_table(tmp_path / "videos" / _files(tmp_path / "videos")[0]).to_pylist()
    assert video["frames"] == 6 and video["error"]


def test_bytes_read_from_remote_stores_are_summed_once_per_segment(tmp_path):
    remote, local = "s3://bucket/v.mp4", "/videos/w.mp4"
    c = Committer(str(tmp_path), "r1", "m", listed=_listed({remote: (1000, "e1"), local: (500, "m1")}))
    c.add(pa.concat_tables([_frames(remote, [0], 0, 2), _end(remote, 1, None, 0, 2, bytes_read=600)]))
    c.add(pa.concat_tables([_frames(remote, [1], 1, 2), _end(remote, 1, None, 1, 2, bytes_read=550)]))
    c.add(_end(remote, 1, None, 1, 2, bytes_read=550))  # a retried task's copy: counted once
    c.add(pa.concat_tables([_frames(local, [0]), _end(local, 1)]))
    c.close()
    assert c.videos_ok == 2 and c.bytes_read == 1150 and c.bytes_remote == 1000


@pytest.mark.parametrize("key", [hash, lambda uri: 7], ids=["hash", "every-hash-equal"])
def test_listed_finds_each_videos_size_and_version_by_uri(key):
    """The committer's lookup of what the listing said: exact for every listed URI (also
    when hashes collide: told apart by the URI), nothing for one not listed."""
    uris = [f"s3://bucket/cam-{i % 7}/clip {i:04d}.mp4" for i in range(300)] + ["/local/v.mp4", "gs://b/é.mkv"]
    table = pa.table({"video_uri": uris, "size_bytes": list(range(len(uris))),
                      "version": [f"v{i}" for i in range(len(uris))]})
    listed = Listed(pa.concat_tables([table.slice(0, 100), table.slice(100)]), key=key)  # two chunks
    assert [listed.get(u) for u in reversed(uris)] == [(i, f"v{i}") for i in reversed(range(len(uris)))]
    assert listed.get("s3://bucket/cam-0/clip 9999.mp4") == (-1, "")


@pytest.mark.parametrize("key", [hash, lambda uri: len(uri) % 3], ids=["hash", "hashes-colliding"])
def test_uri_index_finds_each_rows_one_at_a_time_and_all_at_once(key):
    """`rows` (vectorized) agrees with `row` and with the column itself: the first row of
    each value, -1 for a value not there, whatever hashes collide and however chunked."""
    from rayvid.commit import UriIndex

    values = [f"gs://b/{i % 50}/v{i % 37}.mp4" for i in range(400)] + ["/é/ü.mp4", ""]
    column = pa.chunked_array([values[:150], values[150:]], pa.string())
    index = UriIndex(column, key)
    queries = values[::-1] + ["gs://b/0/v1.mp4", "nope", "gs://b/49/v36.mp4x"]
    first = {}
    for i, v in enumerate(values):
        first.setdefault(v, i)
    expected = [first.get(q, -1) for q in queries]
    assert [index.row(q) for q in queries] == expected
    assert index.rows(pa.array(queries)).tolist() == expected
    assert index.rows(pa.chunked_array([queries[:7], queries[7:]])).tolist() == expected


@pytest.mark.parametrize("key", [hash, lambda uri: 7], ids=["hash", "every-hash-equal"])
def test_committed_keeps_each_videos_last_row_and_forgets_dropped_ones(key):
    """A video in several parts (committed twice) is what its last part says, and every
    part holding it is one of its files (a retraction takes every copy); `drop` removes
    exactly the given videos."""
    from rayvid.commit import Committed

    uris = ["a", "b", "a", "c", "b", "a"]
    table = pa.table({"video_uri": uris, "size_bytes": list(range(6)), "version": [f"v{i}" for i in range(6)],
                      "error": [False, True, False, False, False, True], "changed": [False] * 5 + [True],
                      "file": pa.array([0, 0, 1, 1, 2, 2], pa.int32())})
    state = Committed(table, ["p0", "p1", "p2"], key=key)
    assert len(state) == 3 and state.uris() == ["a", "b", "c"]
    assert state.get("a") == {"size_bytes": 5, "version": "v5", "error": True, "changed": True, "file": "p2"}
    assert state.get("b") == {"size_bytes": 4, "version": "v4", "error": False, "changed": False, "file": "p2"}
    assert state.get("c")["file"] == "p1" and state.get("d") is None and "d" not in state
    assert state.files_of({"a", "c"}) == ["p0", "p1", "p2"] and state.files_of({"c"}) == ["p1"]
    assert state.doubled == {"a": {"p0", "p1"}, "b": {"p0"}}
    state.drop({"b", "d"})
    assert state.doubled == {"a": {"p0", "p1"}}
    # both copies in one part (a compaction merged the parts of each): a double all the same
    once = Committed(table.filter(pa.array([u != "a" for u in uris])).set_column(
        5, "file", pa.array([0, 0, 0], pa.int32())), ["merged"], key=key)
    assert once.doubled == {"b": set()} and once.files_of({"b"}) == ["merged"]
    # a double found by a first read stays to be read again once merged with a later read
    later = Committed(table.slice(5, 1).set_column(4, "changed", pa.array([False])).set_column(
        5, "file", pa.array([0], pa.int32())), ["p9"], key=key)
    assert state.merged(later).get("a")["changed"] and state.merged(later).files_of({"a"}) == ["p0", "p1", "p9"]
    assert state.uris() == ["a", "c"] and "b" not in state and state.get("c")["size_bytes"] == 3
    rows = state.index.rows(pa.array(["c", "a", "b"])).tolist()
    assert rows[2] == -1 and state.table.column("video_uri").take(rows[:2]).to_pylist() == ["c", "a"]


def test_pending_redoes_exactly_the_videos_that_differ_from_what_is_committed():
    """Every combination of what the listing and the committed row say, against the rule:
    a size or version known on both sides (-1, "" and none are unknown) and different, or
    an error saying it changed while read, and, with --retry-failed, any error."""
    import itertools

    from rayvid.commit import Committed, pending

    sizes, versions = [-1, None, 10, 11], ["", None, "e1", "e2"]
    combos = list(itertools.product([-1, 10], ["", "e1"], sizes, versions, [False, True, None], [False, True]))
    uris = [f"v{i}" for i in range(len(combos))]
    listing = pa.table({"video_uri": uris + ["new"], "size_bytes": [c[0] for c in combos] + [5],
                        "version": [c[1] for c in combos] + ["x"]})
    state = Committed(pa.table({"video_uri": uris, "size_bytes": pa.array([c[2] for c in combos], pa.int64()),
                                "version": pa.array([c[3] for c in combos], pa.string()),
                                "error": [c[4] for c in combos], "changed": [c[5] for c in combos],
                                "file": pa.array([0] * len(combos), pa.int32())}), ["p"])

    def differs(size, version, was, had, error, changed, retry):
        return bool((size != -1 and was not in (-1, None, size)) or (version and had and had != version)
                    or changed or (retry and error))

    for retry in (False, True):
        redo = {u for u, c in zip(uris, combos) if differs(*c, retry)}
        todo, skipped, redone = pending(listing, state, retry)
        assert redone == redo and skipped == len(uris) - len(redo)
        assert todo.column("video_uri").to_pylist() == [u for u in uris if u in redo] + ["new"]  # listing order


def test_a_missing_segment_fails_loudly(tmp_path):
    c = Committer(str(tmp_path), "r1", "m")
    c.add(pa.concat_tables([_frames("v", [0], 0, 2), _end("v", 1, None, 0, 2)]))
    with pytest.raises(RuntimeError, match="1 segments complete, others missing"):
        c.close()


def test_recover_deletes_half_committed_files(tmp_path):
    from rayvid.commit import recover

    c = Committer(str(tmp_path), "r1", "m", listed=_listed({"v": (10, "e1")}))
    c.add(pa.concat_tables([_frames("v", [0, 1]), _end("v", 2)]))
    c.close()
    # a run killed mid-flush: its predictions file exists, its videos file (commit point) not
    [name] = _files(tmp_path / "predictions")
    (tmp_path / "predictions" / "part-r2-00000.parquet").write_bytes((tmp_path / "predictions" / name).read_bytes())
    state = recover(str(tmp_path))
    assert state.removed == ["predictions/part-r2-00000.parquet"]
    assert _files(tmp_path / "predictions") == [name]
    assert state.uris() == ["v"]
    assert state.get("v") == {"size_bytes": 10, "version": "e1", "error": False, "changed": False, "file": name}


def test_a_videos_size_is_that_of_a_segment_that_decoded_frames(tmp_path):
    """A segment that kept no frame (a --keyframes segment between key frames) of a partial
    copy never decoded one: its end row's size may be the stored one (unrotated) or 0x0.
    The videos/ row takes a segment's that decoded frames (the first with a codec before:
    0x0 here, and every box of a detector's rows scaled by it)."""
    empty = _end("v", 0, segment=0, n_segments=2)
    for column, value in (("width", 0), ("height", 0)):
        empty = empty.set_column(empty.schema.get_field_index(column), column, pa.array([value]))
    c = Committer(str(tmp_path), "r1", "m")
    c.add(pa.concat_tables([empty, _frames("v", [30, 60], segment=1, n_segments=2), _end("v", 2, segment=1, n_segments=2)]))
    c.close()
    [video] = pq.read_table(tmp_path / "videos").to_pylist()
    assert (video["width"], video["height"], video["frames"]) == (160, 120, 2)


def test_a_video_that_changed_while_read_is_redone_without_retry_failed(tmp_path):
    """Its error (ObjectChanged, put first among its segments' errors) is what the next run
    reads it again for, even where the listing has no version to compare (a manifest);
    a video that failed otherwise waits for --retry-failed. None of its frames is committed
    (those decoded before the change was found may be of either version)."""
    from rayvid.commit import pending, recover

    changed = _end("m", 0, "the object changed while it was read (version 1, now 2) (3 decoded frames kept)",
                   segment=1, n_segments=2)
    changed = changed.set_column(changed.schema.get_field_index("error_type"), "error_type",
                                 pa.array(["ObjectChanged"]))
    c = Committer(str(tmp_path), "r1", "m")
    c.add(pa.concat_tables([_frames("m", [0]), _end("m", 1, "a damaged packet (1 decoded frames kept)", n_segments=2),
                            changed, _frames("b", [0]), _end("b", 1, "bad"), _frames("ok", [0]), _end("ok", 1)]))
    c.close()
    assert c.dropped_inferred == 1 and c.frames == 2  # (the run's wait for the inference reports counts it)
    [error] = [e for e in pq.read_table(tmp_path / "errors").to_pylist() if e["video_uri"] == "m"]
    assert error["error_type"] == "ObjectChanged" and error["message"].startswith("segment 2/2: the object changed")
    assert error["message"].endswith("now 2); segment 1/2: a damaged packet; no frame of it committed: "
                                     "the next run reads it again"), error["message"]
    assert "m" not in pq.read_table(tmp_path / "predictions").column("video_uri").to_pylist()
    assert {v["video_uri"]: v["frames"] for v in pq.read_table(tmp_path / "videos").to_pylist()} == {"m": 0, "b": 1, "ok": 1}
    state = recover(str(tmp_path))
    assert {u: state.get(u)["changed"] for u in state.uris()} == {"m": True, "b": False, "ok": False}
    listing = pa.table({"video_uri": ["b", "m", "ok"], "size_bytes": [-1] * 3, "version": [""] * 3})
    todo, skipped, redo = pending(listing, state, retry_failed=False)
    assert todo.column("video_uri").to_pylist() == ["m"] and skipped == 2 and redo == {"m"}
    todo, skipped, redo = pending(listing, state, retry_failed=True)
    assert todo.column("video_uri").to_pylist() == ["b", "m"] and redo == {"b", "m"}


def test_recover_reads_an_s3_outputs_parts_several_at_once_a_request_each(moto, s3_endpoint):
    """A run's start-up over an OUTPUT of many parts is bound by request latency: recover
    asks for each videos/ (and errors/) part in one GET (its size from the listing: no
    HEAD first) and keeps several in flight. What it finds is what was committed."""
    from helpers import BUCKET, write_output

    from rayvid.commit import recover

    url = f"s3://{BUCKET}/many-parts"
    videos = {f"s3://b/v{i:02d}.mp4": [("a", 0.5)] * 3 for i in range(12)}
    write_output(url, videos, rows_per_file=1, failed=("s3://b/bad.mp4",))
    asked = []

    def part(environ):  # every request to the parts takes 0.2 s, as a far store's would
        path = environ["PATH_INFO"]
        if "/many-parts/" not in path or not path.endswith(".parquet"):
            return False
        asked.append((environ["REQUEST_METHOD"], path.split("/many-parts/")[1].split("/")[0]))
        return True

    with moto.slow(part, 0.2) as inflight:
        state = recover(url, only=[*videos, "s3://b/bad.mp4", "s3://b/new.mp4"])
    assert state.uris() == sorted([*videos, "s3://b/bad.mp4"]) and state.get("s3://b/bad.mp4")["error"]
    parts = len(state.files_of(state.uris()))
    assert sorted(set(asked)) == [("GET", "errors"), ("GET", "videos")]  # no HEAD
    assert asked.count(("GET", "videos")) == parts and asked.count(("GET", "errors")) == 1
    assert inflight["most"] >= 4


def test_a_lost_predictions_part_is_asked_of_the_store_not_of_a_cached_listing(moto, s3_endpoint):
    """s3fs answers `exists` from a listing it cached: a predictions/ file deleted since
    (by another client) was still there, and one a compaction deleted after its videos/
    file read as lost where the videos/ file was asked for first. Each is asked of S3."""
    import boto3
    from helpers import BUCKET, write_output

    from rayvid import storage

    url = f"s3://{BUCKET}/lost-cached"
    write_output(url, {"s3://b/a.mp4": [("a", 0.5)] * 3})
    fs, root = storage.resolve(url)
    name = sorted(commit.part_sizes(fs, f"{root}/{commit.PREDICTIONS_DIR}"))[0]
    assert not commit.predictions_lost(fs, root, name)
    for folder in (commit.PREDICTIONS_DIR, commit.VIDEOS_DIR):  # both listings cached, from before what follows
        fs.ls(f"{root}/{folder}")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.delete_object(Bucket=BUCKET, Key=f"lost-cached/{commit.PREDICTIONS_DIR}/{name}")
    assert fs.exists(f"{root}/{commit.PREDICTIONS_DIR}/{name}")  # (s3fs's cache, stale: why it is not asked)
    assert commit.predictions_lost(fs, root, name)
    fs.ls(f"{root}/{commit.VIDEOS_DIR}")  # (cached again)
    s3.delete_object(Bucket=BUCKET, Key=f"lost-cached/{commit.VIDEOS_DIR}/{name}")  # as a compaction would, first
    assert fs.exists(f"{root}/{commit.VIDEOS_DIR}/{name}")  # (stale)
    assert not commit.predictions_lost(fs, root, name)


def test_once_output_is_unreachable_the_committer_writes_nothing_more(moto, s3_endpoint, monkeypatch):
    """OUTPUT's store goes away at a flush (after the client's bounded retries): the run is
    ending, and its later flushes (the next one due, the clean-up that publishes what is
    complete) raise the same error at once instead of waiting out the retries again, even
    where the store is back; the next run commits everything."""
    from helpers import BUCKET

    from rayvid import storage

    monkeypatch.setenv("RAYVID_S3_MAX_ATTEMPTS", "1")  # (the bounded retries, in no time)
    url = f"s3://{BUCKET}/unreachable"
    c = Committer(url, "r1", "m", flush_interval_s=3600)
    c.add(pa.concat_tables([_frames("v1", [0, 1]), _end("v1", 2)]))
    with moto.down_at("PUT", f"/{BUCKET}/unreachable/predictions/part-r1-00000.parquet") as hit:
        with pytest.raises(storage.ACCESS_ERRORS) as first:
            c.flush()
    assert hit and storage.is_unavailable(first.value) and c.unreachable is first.value
    c.add(pa.concat_tables([_frames("v2", [0]), _end("v2", 1)]))  # the store is back now
    with pytest.raises(type(first.value)) as again:
        c.flush()
    assert again.value is first.value and c.files == [] and c.committed == set()
    fs, root = storage.resolve(url)
    assert fs.find(root) == []  # nothing was written, not even by the second flush

    c = Committer(url, "r2", "m")
    c.add(pa.concat_tables([_frames("v1", [0, 1]), _end("v1", 2), _frames("v2", [0]), _end("v2", 1)]))
    c.close()
    assert c.committed == {"v1", "v2"} and len(fs.find(root)) == 2  # predictions/ and videos/


def test_retract_rewrites_an_s3_outputs_parts_several_at_once_a_request_each(moto, s3_endpoint):
    """--retry-failed over many parts: each part holding a retracted video is read in one
    GET (no HEAD) and rewritten, several at a time; exactly those videos' rows go."""
    from helpers import BUCKET, read_output, write_output

    from rayvid.commit import recover, retract

    url = f"s3://{BUCKET}/many-retracted"
    videos = {f"s3://b/v{i:02d}.mp4": [("a", 0.5)] * 3 for i in range(12)}
    write_output(url, videos, rows_per_file=1)
    gone = {f"s3://b/v{i:02d}.mp4" for i in range(0, 12, 2)}
    state = recover(url)
    asked = []

    def part(environ):
        path = environ["PATH_INFO"]
        if "/many-retracted/" not in path or not path.endswith(".parquet"):
            return False
        asked.append(environ["REQUEST_METHOD"])
        return True

    with moto.slow(part, 0.2) as inflight:
        retract(url, gone, state, "r2")
    assert "HEAD" not in asked and asked.count("GET") == 2 * len(state.files_of(gone))  # predictions, videos
    assert inflight["most"] >= 4
    rows = read_output(url)
    assert sorted(set(rows.column("video_uri").to_pylist())) == sorted(set(videos) - gone)
    assert recover(url).uris() == sorted(set(videos) - gone)


def test_retract_rewrites_parts_in_batches_bounded_by_their_listed_bytes():
    from rayvid.commit import _batches

    files = [("a", 60), ("b", 60), ("c", 10), ("d", 200), ("e", None), ("f", 5), ("g", 5)]
    assert [[p for p, _ in b] for b in _batches(files, 128)] == [["a", "b"], ["c"], ["d"], ["e"], ["f", "g"]]
    assert list(_batches([], 128)) == []


def test_recover_of_a_shard_holds_only_its_videos(tmp_path):
    """A shard's run reads what OUTPUT has of its own listing, not every shard's rows; a
    retraction a dead run left unfinished is still completed, whichever shard it was of."""
    import json

    from rayvid.commit import pending, recover

    for run, videos in (("s1", ["a", "b"]), ("s2", ["c", "d"])):
        c = Committer(str(tmp_path), run, "m")
        for v in videos:
            c.add(pa.concat_tables([_frames(v, [0, 1]), _end(v, 2, "bad" if v == "c" else None)]))
        c.close()
    everything = recover(str(tmp_path))
    assert everything.uris() == ["a", "b", "c", "d"]
    shard = recover(str(tmp_path), only=["b", "c", "new"])
    assert shard.uris() == ["b", "c"] and all(shard.get(v) == everything.get(v) for v in ("b", "c"))
    listing = pa.table({"video_uri": ["b", "c", "new"], "size_bytes": [-1] * 3, "version": [""] * 3})
    assert pending(listing, shard, retry_failed=True)[0].column("video_uri").to_pylist() == ["c", "new"]
    # a run of another shard died retracting d: its intent record names d
    (tmp_path / "retractions").mkdir()
    (tmp_path / "retractions" / "gone.json").write_text(json.dumps(
        {"videos": ["d"], "run_id": "gone", "started_at": 0, "host": "elsewhere", "node": "elsewhere/b/1",
         "pid": 1, "pid_started": ""}))
    shard = recover(str(tmp_path), only=["a"])
    assert shard.uris() == ["a"] and not (tmp_path / "retractions" / "gone.json").exists()
    assert recover(str(tmp_path)).uris() == ["a", "b", "c"]
    assert "d" not in pq.read_table(tmp_path / "predictions").column("video_uri").to_pylist()


def test_retract_removes_only_the_given_videos(tmp_path):
    from rayvid.commit import recover, retract

    c = Committer(str(tmp_path), "r1", "m")
    c.add(pa.concat_tables([_frames("a", [0, 1]), _end("a", 2), _frames("b", [0]), _end("b", 1, "bad")]))
    c.close()
    retract(str(tmp_path), {"b"}, recover(str(tmp_path)))
    preds = pq.read_table(tmp_path / "predictions" / _files(tmp_path / "predictions")[0])
    assert preds.column("video_uri").to_pylist() == ["a", "a"]
    assert _files(tmp_path / "errors") == []  # its only row was b's
    videos = pq.read_table(tmp_path / "videos" / _files(tmp_path / "videos")[0])
    assert videos.column("video_uri").to_pylist() == ["a"]
    assert preds.schema.metadata[b"rayvid.schema_version"] == b"1"


def test_reused_frames_repeat_their_source_prediction(tmp_path):
    """--skip-similar: the model saw frames 0 and 3; 1, 2 reuse 0 and 4 reuses 3, arriving
    before their sources; each gets its source's label, score and top-k, and says so."""
    seen = _frames("v", [0, 3])
    seen = seen.set_column(seen.schema.get_field_index("label"), "label", pa.array(["x", "y"]))
    seen = seen.set_column(seen.schema.get_field_index("score"), "score", pa.array([0.5, 0.7], pa.float32()))
    reused = _frames("v", [1, 2, 4], reused_from=[0, 0, 3])
    for name in ("label", "score", "topk"):  # the inference stage leaves them null
        i = reused.schema.get_field_index(name)
        reused = reused.set_column(i, name, pa.nulls(3, reused.schema.field(name).type))
    c = Committer(str(tmp_path), "r1", "m")
    c.add(reused)
    c.add(seen)
    c.add(_end("v", 5))
    c.close()
    [name] = _files(tmp_path / "predictions")
    rows = pq.read_table(tmp_path / "predictions" / name).to_pylist()
    assert [(r["frame_index"], r["label"], r["reused_from"]) for r in rows] == [
        (0, "x", None), (1, "x", 0), (2, "x", 0), (3, "y", None), (4, "y", 3)]
    assert [round(r["score"], 3) for r in rows] == [0.5, 0.5, 0.5, 0.7, 0.7]
    assert rows[4]["topk"] == rows[3]["topk"] and c.reused == 3 and c.frames == 5


def test_layout_for_query_engines(tmp_path):
    """zstd everywhere, low-cardinality strings dictionary-encoded, rows sorted by (video,
    frame), row groups of at most 128 Ki rows, the schema version in the metadata."""
    from helpers import write_output

    out = str(tmp_path / "o")
    videos = {f"/v/{i}.mp4": [("circle" if j % 3 else "square", 0.9) for j in range(40_000 + i)]
              for i in (3, 1, 2, 0)}
    write_output(out, videos)
    [name] = os.listdir(os.path.join(out, "predictions"))
    f = pq.ParquetFile(os.path.join(out, "predictions", name))
    meta = f.metadata
    assert meta.num_rows == sum(len(v) for v in videos.values()) and meta.num_row_groups == 2
    assert all(meta.row_group(g).num_rows <= 128 * 1024 for g in range(meta.num_row_groups))
    names = f.schema_arrow.names
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            assert col.compression == "ZSTD", col.path_in_schema
            if col.path_in_schema in ("video_uri", "label", "model", "run_id"):
                assert "RLE_DICTIONARY" in col.encodings or "PLAIN_DICTIONARY" in col.encodings, col.path_in_schema
    t = f.read(columns=["video_uri", "frame_index"])
    keys = list(zip(t.column("video_uri").to_pylist(), t.column("frame_index").to_pylist()))
    assert keys == sorted(keys) and "video_uri" in names
    assert f.schema_arrow.metadata[b"rayvid.schema_version"] == b"1"


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_another_runs_flush_in_progress_is_left_alone(tmp_path):
    """Shards run at once into one OUTPUT: a run starting while another is between its
    predictions file and its commit point must not delete that file. It goes once its run
    is over: finished, its process gone from this host, or silent on another for LEASE_S."""
    import json
    import socket
    import time

    from rayvid import commit

    c = Committer(str(tmp_path), "r1", "m")
    c.add(pa.concat_tables([_frames("v", [0, 1]), _end("v", 2)]))
    c.close()
    [name] = _files(tmp_path / "predictions")
    orphan = tmp_path / "predictions" / "part-a-00000.parquet"
    record = {"run_id": "a", "status": "running"}
    beat = commit.Heartbeat(str(tmp_path), "a", record, every_s=0.05)
    beat.start()
    try:
        orphan.write_bytes((tmp_path / "predictions" / name).read_bytes())
        def beat_at():
            return json.loads((tmp_path / "runs" / "a.json").read_text())["heartbeat_at"]

        first, deadline = beat_at(), time.time() + 30  # (every 0.05 s; a loaded machine may take longer)
        while beat_at() <= first and time.time() < deadline:
            time.sleep(0.05)
        assert beat_at() > first
        state = commit.recover(str(tmp_path))
        assert state.in_flight == ["predictions/part-a-00000.parquet"] and not state.removed and orphan.exists()
    finally:
        beat.stop()
    import subprocess

    now = time.time()
    here = {"host": socket.gethostname(), "node": commit.writer()["node"], "pid_started": ""}
    running = subprocess.Popen(["sleep", "60"])  # a live process on this host
    try:
        for written, gone in (
            ({"host": "elsewhere", "node": "elsewhere/boot/1", "pid": 1, "pid_started": "", "heartbeat_at": now - 10},
             False),
            ({**here, "pid": running.pid, "heartbeat_at": 0}, False),
            ({"host": "elsewhere", "node": "elsewhere/boot/1", "pid": 1, "pid_started": "",
              "heartbeat_at": now - commit.LEASE_S - 1}, True),
            ({**here, "pid": _dead_pid(), "heartbeat_at": now}, True),
            # this process, the run over (failed where its record could not say so): a
            # notebook running the job again
            ({**here, "pid": os.getpid(), "heartbeat_at": now}, True),
            # the same host name, another container (pid namespace): only the heartbeat tells
            ({**here, "node": here["node"] + "0", "pid": _dead_pid(), "heartbeat_at": now}, False),
            # its pid now another process's (reused)
            ({**here, "pid": running.pid, "pid_started": "1", "heartbeat_at": now}, True),
        ):
            (tmp_path / "runs" / "a.json").write_text(json.dumps({**record, **written}))
            assert commit.recover(str(tmp_path)).removed == ([] if not gone else ["predictions/part-a-00000.parquet"])
            assert orphan.exists() != gone
            orphan.write_bytes((tmp_path / "predictions" / name).read_bytes())
    finally:
        running.kill()
        running.wait()
    (tmp_path / "runs" / "a.json").write_text(json.dumps({**record, **commit.writer(), "status": "finished"}))
    assert commit.recover(str(tmp_path)).removed == ["predictions/part-a-00000.parquet"]


def test_a_run_id_used_again_numbers_its_files_after_the_ones_there(tmp_path):
    """A resubmitted job with the same --run-id adds files; it never writes over the first's."""
    for video in ("v1", "v2"):
        c = Committer(str(tmp_path), "nightly", "m")
        c.add(pa.concat_tables([_frames(video, [0, 1]), _end(video, 2)]))
        c.close()
    assert _files(tmp_path / "videos") == ["part-nightly-00000.parquet", "part-nightly-00001.parquet"]
    assert sorted(pq.read_table(tmp_path / "videos").column("video_uri").to_pylist()) == ["v1", "v2"]
    assert pq.read_table(tmp_path / "predictions").num_rows == 4


@pytest.mark.parametrize("merge_every", [256, 2])  # (2: complete videos merged as they wait, between files too)
def test_files_hold_whole_videos_and_at_most_rows_per_file_rows(tmp_path, monkeypatch, merge_every):
    monkeypatch.setattr(commit, "MERGE_EVERY", merge_every)
    c = Committer(str(tmp_path), "r1", "m", rows_per_file=5)
    for video, n in (("a", 3), ("b", 2), ("c", 3), ("d", 7), ("e", 1)):
        c.add(pa.concat_tables([_frames(video, list(range(n))), _end(video, n)]))
    c.close()
    files = [pq.read_table(tmp_path / "predictions" / n) for n in _files(tmp_path / "predictions")]
    assert [sorted(set(t.column("video_uri").to_pylist())) for t in files] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [t.num_rows for t in files] == [5, 3, 7, 1]  # 7: one video alone
    assert [t.column("frame_index").to_pylist() for t in files] == [[0, 1, 2, 0, 1], [0, 1, 2], list(range(7)), [0]]


def test_many_short_videos_are_flushed_by_count_and_held_merged(tmp_path, monkeypatch):
    """Archives of short clips: a file every `videos_per_file` complete videos, whatever the
    interval (they all waited for it: ~22 KB of the driver's memory each, measured with
    3-frame clips, so 60 s of a large cluster's clips held gigabytes); the videos waiting are
    merged every MERGE_EVERY into one table (2.5 KB each, measured: a QA helper's
    commit_bench.py, 8,000 and 32,000 clips), and their rows come out exactly."""
    monkeypatch.setattr(commit, "MERGE_EVERY", 3)
    c = Committer(str(tmp_path), "r1", "m", flush_interval_s=1e9, videos_per_file=4)
    names = [f"v{i:02d}" for i in range(10)]
    for i, video in enumerate(names):
        c.add(pa.concat_tables([_frames(video, list(range(i % 3 + 1))), _end(video, i % 3 + 1)]))
    assert len(_files(tmp_path / "videos")) == 2  # 8 videos published, 2 wait
    c.close()
    files = [pq.read_table(tmp_path / "predictions" / n) for n in _files(tmp_path / "predictions")]
    assert [sorted(set(t.column("video_uri").to_pylist())) for t in files] == [names[:4], names[4:8], names[8:]]
    rows = [(u, f) for t in files for u, f in zip(t.column("video_uri").to_pylist(), t.column("frame_index").to_pylist())]
    assert rows == [(v, f) for i, v in enumerate(names) for f in range(i % 3 + 1)]
    # one block completing all ten: still at most 4 videos a file
    c = Committer(str(tmp_path / "one"), "r1", "m", flush_interval_s=1e9, videos_per_file=4)
    c.add(pa.concat_tables([t for i, v in enumerate(names) for t in (_frames(v, list(range(i % 3 + 1))), _end(v, i % 3 + 1))]))
    c.close()
    files = [pq.read_table(tmp_path / "one" / "videos" / n) for n in _files(tmp_path / "one" / "videos")]
    assert [t.column("video_uri").to_pylist() for t in files] == [names[:4], names[4:8], names[8:]]
    # ... videos that failed with no frame count too (the check stood where frames were added)
    c = Committer(str(tmp_path / "failed"), "r1", "m", flush_interval_s=1e9, videos_per_file=4)
    c.add(pa.concat_tables([_end(v, 0, error="VideoError") for v in names]))
    c.close()
    files = [pq.read_table(tmp_path / "failed" / "videos" / n) for n in _files(tmp_path / "failed" / "videos")]
    assert [t.column("video_uri").to_pylist() for t in files] == [names[:4], names[4:8], names[8:]]


def test_an_interrupt_while_waiting_videos_are_merged_leaves_no_video_half_committed(tmp_path, monkeypatch):
    """A Ctrl-C (or SIGTERM) inside the merge of the videos waiting: the video just complete
    is whole in what waits (its rows and its videos/ row), so the run's last flush commits it
    whole (a reviewer found its rows written without its videos/ row: the next run redid it,
    every frame twice); the merge is tried again later."""
    monkeypatch.setattr(commit, "MERGE_EVERY", 3)
    concat, interrupted = pa.concat_tables, []

    def concat_once_interrupted(tables, *args, **kwargs):
        if len(tables) == 3 and not interrupted:  # (the merge of three videos' tables)
            interrupted.append(True)
            raise KeyboardInterrupt
        return concat(tables, *args, **kwargs)

    monkeypatch.setattr(pa, "concat_tables", concat_once_interrupted)
    c = Committer(str(tmp_path), "r1", "m", flush_interval_s=1e9)
    for video in ("a", "b", "c"):
        try:
            c.add(pa.concat_tables([_frames(video, [0, 1]), _end(video, 2)]))
        except KeyboardInterrupt:
            assert video == "c"
    c.add(pa.concat_tables([_frames("d", [0]), _end("d", 1)]))  # (merged now)
    c.flush()  # the failing run's last flush (pipeline._publish_complete)
    preds = pq.read_table(tmp_path / "predictions" / _files(tmp_path / "predictions")[0])
    videos = pq.read_table(tmp_path / "videos" / _files(tmp_path / "videos")[0])
    assert interrupted and videos.column("video_uri").to_pylist() == ["a", "b", "c", "d"]
    assert list(zip(preds.column("video_uri").to_pylist(), preds.column("frame_index").to_pylist())) == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1), ("d", 0)]


def test_a_video_committed_from_a_manifest_is_not_redone_when_listed_from_a_prefix(tmp_path):
    """A manifest lists neither size nor version (-1, ""): unknown is no difference."""
    from rayvid.commit import pending, recover

    c = Committer(str(tmp_path), "r1", "m", listed=_listed({"v": (-1, "")}))
    c.add(pa.concat_tables([_frames("v", [0]), _end("v", 1)]))
    c.close()
    listing = pa.table({"video_uri": ["v"], "size_bytes": [1234], "version": ["etag1"]})
    todo, skipped, redo = pending(listing, recover(str(tmp_path)), retry_failed=False)
    assert len(todo) == 0 and skipped == 1 and not redo


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4, 5, 6])
def test_a_retraction_killed_anywhere_is_completed_by_the_next_recover(tmp_path, crash_at, monkeypatch):
    """A run redoing a video (it changed while read) is killed between any two of the file
    operations of its retraction (intent record, predictions, errors, videos, intent gone):
    the next recover leaves that video either committed as before (then redone again) or
    not committed at all, never committed without the error that makes it be redone. (Its
    frames committed with its error, as rayvid before 2026-12-06 committed them: an OUTPUT
    it wrote holds such rows.)"""
    from rayvid.commit import pending, recover

    changed = _end("m", 1, "the object changed while it was read (version 1, now 2)")
    changed = changed.set_column(changed.schema.get_field_index("error_type"), "error_type",
                                 pa.array(["ObjectChanged"]))
    with monkeypatch.context() as old:
        old.setattr(commit, "CHANGED", "(frames of a changed video kept, as before)")
        c = Committer(str(tmp_path), "r1", "m")
        c.add(pa.concat_tables([_frames("m", [0]), changed, _frames("ok", [0]), _end("ok", 1)]))
        c.close()
    assert pq.read_table(tmp_path / "predictions").column("video_uri").to_pylist() == ["m", "ok"]
    from helpers import retract_killed_at

    returncode = retract_killed_at(str(tmp_path), {"m"}, crash_at)
    assert returncode == (0 if crash_at > 5 else 9)  # 6: not killed
    state = recover(str(tmp_path))
    assert not [n for n in os.listdir(tmp_path / "retractions") if n.endswith(".json")]  # (a killed write's temp file may stay)
    listing = pa.table({"video_uri": ["m", "ok"], "size_bytes": [-1] * 2, "version": [""] * 2})
    todo, skipped, redo = pending(listing, state, retry_failed=False)
    assert todo.column("video_uri").to_pylist() == ["m"] and skipped == 1
    rows = {d: pq.read_table(tmp_path / d).column("video_uri").to_pylist() if _files(tmp_path / d) else []
            for d in ("predictions", "errors", "videos")}
    if "m" in state:  # not retracted at all: as committed before
        assert crash_at == 1 and redo == {"m"}  # killed before its intent was written
        assert rows == {"predictions": ["m", "ok"], "errors": ["m"], "videos": ["m", "ok"]}
    else:
        assert redo == set() and rows == {"predictions": ["ok"], "errors": [], "videos": ["ok"]}


def test_a_dry_runs_recover_reads_what_a_recover_would_leave_and_changes_nothing(tmp_path):
    """`recover(repair=False)` (`rayvid run --dry-run`): with a dead run's half-committed part
    and a retraction killed after its intent record, it returns the videos a repairing
    recover leaves committed, and no file under OUTPUT changes (the repairing one then
    deletes the part and completes the retraction)."""
    import subprocess
    import sys
    import textwrap

    from rayvid.commit import recover

    c = Committer(str(tmp_path), "r1", "m")
    c.add(pa.concat_tables([_frames("m", [0]), _end("m", 1), _frames("ok", [0]), _end("ok", 1)]))
    c.close()
    [name] = _files(tmp_path / "predictions")
    part = (tmp_path / "predictions" / name).read_bytes()
    child = textwrap.dedent(f"""
        import os
        from fsspec.implementations.local import LocalFileSystem
        from rayvid import commit
        real = os.replace

        def replace(*a, **k):  # the intent record written (the first rename), then killed
            real(*a, **k)
            os._exit(9)

        state = commit.recover({str(tmp_path)!r})
        os.replace = replace
        commit.retract({str(tmp_path)!r}, {{"m"}}, state, "r3")
    """)
    assert subprocess.run([sys.executable, "-c", child]).returncode == 9
    [intent] = [n for n in os.listdir(tmp_path / "retractions") if n.endswith(".json")]
    (tmp_path / "predictions" / "part-r2-00000.parquet").write_bytes(part)  # run r2, killed mid-flush

    def tree():
        return {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
                for d, _, files in os.walk(tmp_path) for f in files}

    before = tree()
    dry = recover(str(tmp_path), repair=False)
    assert tree() == before and dry.removed == []
    assert sorted(dry.uris()) == ["ok"]  # (the retraction, finished, leaves m to be redone)
    repaired = recover(str(tmp_path))
    assert sorted(repaired.uris()) == ["ok"] and repaired.removed == ["predictions/part-r2-00000.parquet"]
    assert tree() != before and not os.path.exists(tmp_path / "retractions" / intent)


def test_a_run_with_other_head_columns_than_output_has_is_refused(tmp_path):
    """Predictions/ must read as one table: a run adding `--embed` (or another width) to an
    OUTPUT without it fails before writing, with what differs."""
    from rayvid.errors import ConfigError
    from rayvid.schema import embedding_field, with_head

    def with_vectors(table, dim):
        schema = with_head(table.schema, [embedding_field(dim)])
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(len(table) * dim, np.float32)), dim)
        return pa.Table.from_arrays([vectors if f.name == "embedding" else table.column(f.name) for f in schema],
                                    schema=schema)

    c = Committer(str(tmp_path), "r1", "m")
    c.add(pa.concat_tables([_frames("a", [0]), _end("a", 1)]))
    c.close()
    c = Committer(str(tmp_path), "r2", "m")
    c.add(pa.concat_tables([with_vectors(_frames("b", [0]), 8), with_vectors(_end("b", 1), 8)]))
    with pytest.raises(ConfigError, match=r"head columns \[none\].*this run's are \[embedding fixed_size_list"):
        c.close()
    assert _files(tmp_path / "videos") == ["part-r1-00000.parquet"] and len(_files(tmp_path / "predictions")) == 1
    c = Committer(str(tmp_path), "r3", "m")  # the same head: fine
    c.add(pa.concat_tables([_frames("c", [0]), _end("c", 1)]))
    c.close()
    assert len(_files(tmp_path / "videos")) == 2


class HttpError(Exception):
    """What gcsfs raises on a 503: no OSError."""


def _memory_store(protocol: str):
    """A fresh in-memory object store (fsspec) under `protocol`, standing in for a remote
    one: an upload is published when it completes, and a reader gets its own copy (fsspec's
    memory store shows a file from the moment it is opened for writing, as one buffer
    shared with its readers); while `down` is set, uploads fail with HttpError (`refused`
    counts them); `after_videos_listed`, where set, runs once right after a listing of a
    videos/ folder (another run's writes, interleaved with recover's)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

    class Upload(MemoryFile):
        discarded = False

        def discard(self):
            self.discarded = True

        def close(self):
            if not self.discarded and self.path is not None:
                MemoryFile(self.fs, self.path, self.getvalue()).commit()
                self.path = None

    class Store(MemoryFileSystem):
        store, pseudo_dirs, down, refused, after_videos_listed = {}, [""], False, 0, None

        def _open(self, path, mode="rb", **kwargs):
            if "w" in mode and Store.down:
                Store.refused += 1
                raise HttpError("503 Service Unavailable")
            if "w" in mode and kwargs.get("data") is None:  # (`pipe` gives all the data at once)
                return Upload(self, self._strip_protocol(path))
            return MemoryFile(None, None, super()._open(path, mode, **kwargs).getvalue())

        def ls(self, path, detail=True, **kwargs):
            try:
                return super().ls(path, detail=detail, **kwargs)
            finally:  # (listed, or found to be no folder)
                hook = Store.after_videos_listed
                if hook and path.rstrip("/").endswith("/videos"):
                    Store.after_videos_listed = None
                    hook()

    Store.protocol = protocol
    fsspec.register_implementation(protocol, Store, clobber=True)
    return Store


def test_heartbeat_survives_any_store_error():
    """A store raising something that is no OSError (gcsfs' HttpError on a 503) while the
    record is refreshed must not end the heartbeat: after the outage, beats go on, so other
    runs do not take this live run for a dead one."""
    import json
    import time

    from rayvid import commit

    FlakyStore = _memory_store("flakystore")
    fs = FlakyStore()

    def beat_at():
        return json.loads(fs.cat("flakystore://out/runs/a.json"))["heartbeat_at"]

    beat = commit.Heartbeat("flakystore://out", "a", {"run_id": "a", "status": "running"}, every_s=0.05)
    beat.start()
    try:
        first = beat_at()
        FlakyStore.down = True
        time.sleep(0.3)  # several beats fail
        during = beat_at()
        FlakyStore.down = False
        deadline = time.time() + 20
        while beat_at() == during and time.time() < deadline:
            time.sleep(0.05)
        assert beat._thread.is_alive() and beat_at() > during >= first
    finally:
        FlakyStore.down = False
        beat.stop()
        fs.rm("flakystore://out", recursive=True)


def test_a_bug_counting_progress_is_said_with_its_traceback_and_the_heartbeat_goes_on(tmp_path, caplog):
    """`progress` is rayvid's own code, not the store's: a bug there was a one-line "cannot
    refresh the run record" warning every beat, and no record refreshed (after the lease the
    live run read as dead to others). Now it is said with its traceback, as a bug, and the
    record is refreshed with its last counts; a redaction that fails writes nothing."""
    import json
    import time

    from rayvid import commit

    def beat_at():
        return json.loads((tmp_path / "runs" / "a.json").read_text())

    beat = commit.Heartbeat(str(tmp_path), "a", {"run_id": "a", "status": "running", "stats": {"frames": 7}},
                            every_s=0.05)
    beat.start()
    try:
        beat.progress = lambda: {"frames": None + 1}
        first, deadline = beat_at()["heartbeat_at"], time.time() + 30
        with caplog.at_level("ERROR", logger="rayvid"):
            while beat_at()["heartbeat_at"] <= first and time.time() < deadline:
                time.sleep(0.05)
        assert beat_at()["heartbeat_at"] > first and beat_at()["stats"] == {"frames": 7}
        while time.time() < deadline and len([r for r in caplog.records if "run's progress" in r.getMessage()]) < 2:
            time.sleep(0.05)  # (a second beat: its traceback is said once, then one line a beat)
        said = [r for r in caplog.records if "cannot count the run's progress" in r.getMessage()]
        assert len(said) >= 2 and said[0].exc_info and said[0].exc_info[0] is TypeError
        assert not any(r.exc_info for r in said[1:]) and "TypeError: unsupported operand" in said[1].getMessage()
        assert not [r for r in caplog.records if "cannot refresh the run record" in r.getMessage()]
        beat.progress = None
        beat.clean = lambda record: {**record, "oops": 1 / 0}
        caplog.clear()
        with caplog.at_level("ERROR", logger="rayvid"):
            deadline = time.time() + 30
            while not any("cannot redact" in r.getMessage() for r in caplog.records) and time.time() < deadline:
                time.sleep(0.05)
        assert "oops" not in beat_at()
    finally:
        beat.stop()


def test_recover_keeps_a_part_committed_while_it_looks():
    """Another run commits a part and finishes between recover's listing of the commit
    points and its look at that run's record: the record then says finished, the part is
    missing from the listing, and only the second look at its commit point keeps recover
    from deleting committed predictions. The store interleaves the other run's two writes
    right after recover lists videos/."""
    import json
    import time

    from rayvid import commit

    InterleavingStore = _memory_store("interleaving")
    fs, out = InterleavingStore(), "interleaving://out"
    try:
        c = Committer(out, "other", "m")
        c.add(pa.concat_tables([_frames("v", [0, 1]), _end("v", 2)]))
        c.close()
        part = "part-other-00000.parquet"
        # the other run between its predictions file and its commit point, alive
        fs.mv(f"{out}/videos/{part}", f"{out}/held/{part}")
        running = {"run_id": "other", "status": "running", "host": "elsewhere", "node": "elsewhere/b/1",
                   "pid": 1, "pid_started": "", "heartbeat_at": time.time()}
        fs.pipe(f"{out}/runs/other.json", json.dumps(running).encode())
        assert commit.recover(out).in_flight == [f"predictions/{part}"]

        def other_run_commits_and_finishes():
            fs.mv(f"{out}/held/{part}", f"{out}/videos/{part}")
            fs.pipe(f"{out}/runs/other.json", json.dumps({**running, "status": "finished"}).encode())

        InterleavingStore.after_videos_listed = other_run_commits_and_finishes
        state = commit.recover(out)
        assert InterleavingStore.after_videos_listed is None  # the interleaving happened
        assert state.removed == [] and fs.exists(f"{out}/predictions/{part}")
        assert commit.recover(out).uris() == ["v"]  # the next recover sees it committed
    finally:
        InterleavingStore.after_videos_listed = None
        fs.rm(out, recursive=True)


def test_complete_videos_are_published_on_time_while_no_block_comes():
    """While the pipeline is quiet (a long remote copy, a slow model start) the committer
    still publishes what is complete once the commit interval has passed, from its own
    thread; a failure of that publication reaches the driver at its next `add`."""
    import time

    FlakyStore = _memory_store("flakycommit")

    def until_refused():  # the committer's thread has tried to publish, and failed
        refused, deadline = FlakyStore.refused, time.monotonic() + 20
        while FlakyStore.refused == refused and time.monotonic() < deadline:
            time.sleep(0.05)
        assert FlakyStore.refused > refused

    fs, out = FlakyStore(), "flakycommit://out"

    def committed():
        uris = []
        for path in fs.glob(f"{out}/videos/*.parquet"):
            with fs.open(path, "rb") as f:
                uris += pq.read_table(f).column("video_uri").to_pylist()
        return sorted(uris)

    try:
        c = Committer(out, "r1", "m", flush_interval_s=1.0)  # (b's add itself comes well before it is due)
        with c.publishing_while_idle(every_s=0.05):
            c.add(pa.concat_tables([_frames("a", [0, 1]), _end("a", 2)]))
            deadline = time.monotonic() + 10
            while not committed() and time.monotonic() < deadline:
                time.sleep(0.05)  # no more blocks: the pipeline is quiet
            assert committed() == ["a"]
            FlakyStore.down = True
            c.add(pa.concat_tables([_frames("b", [0]), _end("b", 1)]))
            until_refused()  # the next publication fails in the committer's thread
            FlakyStore.down = False
            with pytest.raises(HttpError):
                c.add(pa.concat_tables([_frames("c", [0]), _end("c", 1)]))
        assert committed() == ["a"]
        c = Committer(out, "r3", "m", flush_interval_s=0.3)
        with pytest.raises(HttpError):  # or when the body ends, if no block came after
            with c.publishing_while_idle(every_s=0.05):
                FlakyStore.down = True
                c.add(pa.concat_tables([_frames("e", [0]), _end("e", 1)]))
                until_refused()
        FlakyStore.down = False
        assert committed() == ["a"]

        c = Committer(out, "r2", "m", flush_interval_s=3600)
        with c.publishing_while_idle(every_s=0.05):  # not due: nothing is published early
            c.add(pa.concat_tables([_frames("d", [0]), _end("d", 1)]))
            time.sleep(0.3)
            assert committed() == ["a"]
        c.close()
        assert committed() == ["a", "d"]
    finally:
        FlakyStore.down = False
        fs.rm(out, recursive=True)


def test_recover_leaves_a_retraction_record_written_again_meanwhile():
    """A dead run's retraction record, read at the start of recover, is replaced before
    recover acts on it by a new run of the same id (a resubmitted job) retracting other
    videos: recover must neither complete the old list nor delete the live run's record."""
    import json
    import time

    from rayvid import commit

    InterleavingStore = _memory_store("interleaving2")
    fs, out = InterleavingStore(), "interleaving2://out"
    try:
        c = Committer(out, "old", "m")
        c.add(pa.concat_tables([_frames("a", [0]), _end("a", 1), _frames("b", [0]), _end("b", 1)]))
        c.close()
        here = {k: commit.writer()[k] for k in ("host", "node")}
        # the first job ran on this host and its process is gone: dead by its pid
        fs.pipe(f"{out}/retractions/job.json", json.dumps(
            {"videos": ["a"], "run_id": "job", "started_at": 0, **here, "pid": _dead_pid(),
             "pid_started": ""}).encode())
        live = {"videos": ["b"], "run_id": "job", "started_at": time.time(), **commit.writer()}

        def resubmitted_job_starts_retracting():  # this very process
            fs.pipe(f"{out}/retractions/job.json", json.dumps(live).encode())

        InterleavingStore.after_videos_listed = resubmitted_job_starts_retracting
        with commit.active("job"):  # the resubmitted job, retracting
            state = commit.recover(out)
        assert InterleavingStore.after_videos_listed is None  # the interleaving happened
        assert json.loads(fs.cat(f"{out}/retractions/job.json")) == live  # left to its live run
        assert state.uris() == ["a", "b"]  # the old list was not completed either
    finally:
        InterleavingStore.after_videos_listed = None
        fs.rm(out, recursive=True)


def test_require_output_tells_an_output_from_none_and_from_a_store_it_cannot_reach(tmp_path):
    """Over HTTP (a server's folder listing) an OUTPUT is found by its videos/ listing:
    fsspec's HTTP `info` says "file" of every URL; a server nobody answers at raises its
    own error (a read verb says it cannot connect), never "no rayvid output"."""
    from helpers import listing_http_server

    from rayvid import commit, storage

    (tmp_path / "out" / "videos").mkdir(parents=True)
    (tmp_path / "out" / "videos" / "part-a-00000.parquet").write_bytes(b"x")
    (tmp_path / "nothing").mkdir()
    with listing_http_server(str(tmp_path)) as base:
        for root in (str(tmp_path / "out"), f"{base}/out/"):
            commit.require_output(*storage.resolve(root), root)
        for root in (str(tmp_path / "nothing"), f"{base}/nothing/"):
            with pytest.raises(FileNotFoundError, match="no rayvid output at .* \\(no videos/ folder\\)"):
                commit.require_output(*storage.resolve(root), root)
    dead = "http://127.0.0.1:9/out/"  # nothing listens there
    with pytest.raises(FileNotFoundError) as e:
        commit.require_output(*storage.resolve(dead), dead)
    assert storage.is_unavailable(e.value) and "Cannot connect to host" in storage.describe(e.value)


def test_the_later_of_two_live_runs_over_the_same_input_stops_before_it_commits(tmp_path):
    """Two runs at once over one INPUT into one OUTPUT (a user who thought the first had
    crashed; two submissions) each committed every video: 1440 rows for 720 frames, every
    video twice in `videos/`, and nothing undid it. With both records alive (their
    heartbeats, this process), the run whose record came later stops, naming the other, at
    its start, before it commits anything, even where it began first (its listing took
    long: it read OUTPUT before the other run's commits, and stopped only after committing
    those videos again: a QA find); where the record written first was slow to land
    (written within moments), at the later one's first flush, and again at the failing
    run's last flush of what is complete; so does a run over a folder inside the other's
    INPUT. The first, a run over another INPUT (a shard) and runs that ended go on."""
    import json

    from rayvid import commit
    from rayvid.errors import ConfigError

    def start(run_id, started_at, input_uri, **more):
        record = {"run_id": run_id, "status": "running", "started_at": started_at, "config": {"input": input_uri},
                  **more}
        beat = commit.Heartbeat(str(tmp_path), run_id, record, every_s=60)
        beat.start()
        return beat, dict(record)

    first, first_record = start("first", "2026-12-05T10:00:03Z", "s3://in/")
    rivals = commit.Rivals(str(tmp_path), first_record)
    rivals.check_now()  # alone
    # began 3 s earlier, its record written after: it stops before it commits
    listed_long, listed_long_record = start("listed-long", "2026-12-05T10:00:00Z", "s3://in")
    inner, inner_record = start("inner", "2026-12-05T10:00:05Z", "s3://in/2024/")
    shard, shard_record = start("shard", "2026-12-05T09:00:00Z", "s3://in2/")
    try:
        with pytest.raises(ConfigError, match=r"run first \(host .*, started 2026-12-05T10:00:03Z\) is running over "
                                              r"the same INPUT into this OUTPUT"):
            commit.Rivals(str(tmp_path), listed_long_record).check_now()
        commit.Rivals(str(tmp_path), shard_record).check_now()  # a shard goes on: another INPUT
        with pytest.raises(ConfigError, match=r"run first .* is running over the same INPUT"):
            commit.Rivals(str(tmp_path), inner_record).check_now()  # a folder inside the first one's INPUT
        c = Committer(str(tmp_path), "first", "m", guard=rivals.check)
        c.add(pa.concat_tables([_frames("v", [0, 1]), _end("v", 2)]))
        c.flush()  # the first goes on
        assert set(read_output(str(tmp_path), "videos").column("video_uri").to_pylist()) == {"v"}
    finally:
        for beat in (listed_long, inner):
            beat.stop()
    # a record written within moments of this one, before it, landed after this one's check
    late, late_record = start("late", "2026-12-05T10:00:09Z", "s3://in/", recorded_at=time.time() + 60)
    late_rivals = commit.Rivals(str(tmp_path), late_record)
    first.stop()
    late_rivals.check_now()  # (the first one is gone for now)
    early, _ = start("early", "2026-12-05T10:00:08Z", "s3://in", recorded_at=time.time() + 30)
    try:
        c = Committer(str(tmp_path), "late", "m", guard=late_rivals.check)
        c.add(pa.concat_tables([_frames("w", [0, 1]), _end("w", 2)]))
        with pytest.raises(ConfigError, match=r"run early \(host .*, started 2026-12-05T10:00:08Z\) is running"):
            c.flush()  # the first flush looks, whatever the start's check saw
        with pytest.raises(ConfigError, match="run early"):
            c.flush()  # and, once stopped, every flush (a failing run flushes what is complete)
        assert set(read_output(str(tmp_path), "videos").column("video_uri").to_pylist()) == {"v"}  # none of w
    finally:
        early.stop()
    early_record = json.loads((tmp_path / "runs" / "early.json").read_text())
    commit.write_run_record(str(tmp_path), "early", dict(early_record, status="finished"))
    commit.Rivals(str(tmp_path), late_record).check_now()  # the earlier one ended: the later one goes on
    for beat in (late, shard):
        beat.stop()
    # a local folder given as a file:// URL is that folder (its videos listed under the same
    # URIs): the second run committed every video again, both exit 0 (a QA find)
    beats = [start("plain", "2026-12-05T11:00:00Z", "/data/in")[0]]
    try:
        for spelling in ("file:///data/in", "file://localhost/data/in/", "FILE:///data/in/2024"):
            beat, record = start(f"url-{len(beats)}", "2026-12-05T11:00:01Z", spelling, recorded_at=time.time() + 5)
            beats.append(beat)
            with pytest.raises(ConfigError, match=r"run plain .* is running over the same INPUT"):
                commit.Rivals(str(tmp_path), record).check_now()
    finally:
        for beat in beats:
            beat.stop()


def test_runs_over_manifests_meet_where_they_share_a_video(tmp_path):
    """A manifest's videos may be anywhere: runs where either INPUT is a manifest (its
    listing beside its record) meet where both list a video, or one lists a video in the
    other's folder (overlapping shards at once committed the shared videos twice)."""
    from rayvid import commit
    from rayvid.errors import ConfigError

    out = str(tmp_path / "out")
    beats = []

    def start(run_id, started_at, input_uri, videos=None):
        record = {"run_id": run_id, "status": "running", "started_at": started_at, "config": {"input": input_uri}}
        if videos is not None:
            commit.write_run_listing(out, run_id, pa.chunked_array([videos]))
            record["listing"] = True
        beats.append(commit.Heartbeat(out, run_id, record, every_s=60))
        beats[-1].start()
        return dict(record)

    try:
        start("a-early", "2026-12-05T10:00:00Z", "s3://m/shard-0.txt", ["s3://in/1.mp4", "s3://in/2.mp4"])
        start("b-early", "2026-12-05T10:00:01Z", "s3://in/2025", None)  # a folder run
        def late(name, input_uri, videos):  # a later run's check at its start; then it ends
            record = start(name, "2026-12-05T10:00:09Z", input_uri, videos)
            try:
                commit.Rivals(out, record, videos=pa.array(videos) if videos else None).check_now()
            finally:
                beats.pop().stop()

        with pytest.raises(ConfigError, match="run a-early .* is running over videos this run lists too"):
            late("c", "s3://m/shard-1.txt", ["s3://in/2.mp4", "s3://in/3.mp4"])
        late("d", "s3://m/shard-2.txt", ["s3://in/3.mp4", "s3://in/4.mp4"])  # none shared: goes on
        with pytest.raises(ConfigError, match="run b-early .* is running over videos this run lists too"):
            late("e", "s3://m/shard-3.txt", ["s3://in/2025/x.mp4"])  # one in b-early's folder
        late("f", "s3://m/shard-4.txt", ["s3://in/2025x/x.mp4"])  # a folder named alike is another
        with pytest.raises(ConfigError, match="run a-early .* is running over videos this run lists too"):
            late("g", "s3://in/", None)  # a folder holding a-early's videos
        late("h", "s3://in/2026/", None)  # a folder holding none of them
        commit.forget_run_listing(out, "a-early")
        assert not (tmp_path / "out" / "runs" / "a-early.videos.parquet").exists()
        for beat in beats:
            beat.stop()
        beats.clear()
        # a listing left by a killed manifest run is not that of a later (folder) run of its id
        commit.write_run_listing(out, "x", pa.array(["s3://elsewhere/1.mp4"]))
        start("x", "2026-12-05T10:00:02Z", "s3://in")
        with pytest.raises(ConfigError, match="run x .* is running over the same INPUT"):
            late("y", "s3://in", None)
        for beat in beats:
            beat.stop()
        beats.clear()
        # a listing that cannot be read stops nothing: it is looked at again next time
        (tmp_path / "out" / "runs" / "z.videos.parquet").mkdir()
        record = {"run_id": "z", "status": "running", "started_at": "2026-12-05T12:00:00Z",
                  "config": {"input": "s3://m/z.txt"}, "listing": True}
        beats.append(commit.Heartbeat(out, "z", record, every_s=60))
        beats[-1].start()
        rivals = commit.Rivals(out, {"run_id": "zz", "started_at": "2026-12-05T12:00:09Z", "recorded_at": time.time(),
                                     "config": {"input": "s3://m/zz.txt"}}, videos=pa.array(["s3://in/9.mp4"]))
        rivals.check_now()
        (tmp_path / "out" / "runs" / "z.videos.parquet").rmdir()
        commit.write_run_listing(out, "z", pa.array(["s3://in/9.mp4"]))
        with pytest.raises(ConfigError, match="run z .* is running over videos this run lists too"):
            rivals.check_now()
    finally:
        for beat in beats:
            beat.stop()


def test_a_run_id_a_live_run_holds_is_refused(tmp_path, caplog):
    """Two runs of one --run-id at once (a job spec with a fixed id, submitted twice) each
    took the other's record for their own: neither saw the other, both committed every
    video into files of the same names. The second one is refused before it writes;
    a run of that id that ended, or died, leaves the id free (a resubmitted job)."""
    import json
    import subprocess
    import sys
    import time

    from rayvid import commit
    from rayvid.errors import ConfigError

    out = str(tmp_path / "out")
    first = commit.Heartbeat(out, "nightly", {"run_id": "nightly", "status": "running",
                                              "started_at": "2026-12-06T01:00:00Z"}, every_s=60)
    first.start()
    try:
        with pytest.raises(ConfigError, match=r"run id nightly is in use: a run of that id \(host .*, started "
                                              r"2026-12-06T01:00:00Z\) is running into this OUTPUT.*another --run-id$"):
            commit.refuse_live_run_id(out, "nightly")
        assert json.loads((tmp_path / "out" / "runs" / "nightly.json").read_text())["started_at"] == "2026-12-06T01:00:00Z"
    finally:
        first.stop()
    path = tmp_path / "out" / "runs" / "nightly.json"
    # another host's, whose heartbeat is fresh: refused, saying when it stops counting
    path.write_text(json.dumps({"run_id": "nightly", "status": "running", "host": "gpu-7", "node": "gpu-7/boot/1",
                                "pid": 12, "heartbeat_at": time.time() - 20}))
    with pytest.raises(ConfigError, match=r"heartbeat \(last 2\d s ago\) is 300 s old"):
        commit.refuse_live_run_id(out, "nightly")
    # ... whose heartbeat is stale, or this host's whose process is gone: free
    path.write_text(json.dumps({"run_id": "nightly", "status": "running", "node": "gpu-7/boot/1",
                                "heartbeat_at": time.time() - 400}))
    commit.refuse_live_run_id(out, "nightly")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"run_id": "nightly", "status": "running", **commit.writer(),
                                "pid": int(gone.stdout), "pid_started": "1", "heartbeat_at": time.time()}))
    commit.refuse_live_run_id(out, "nightly")
    # free, but said: a run id copied into a config file replaced a finished run's record silently
    path.write_text(json.dumps({"run_id": "nightly", "status": "finished", "started_at": "2026-12-06T01:00:00Z"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rayvid"):
        commit.refuse_live_run_id(out, "nightly")
        commit.refuse_live_run_id(out, "fresh")
    said = [r.getMessage() for r in caplog.records]
    assert said == ["run id nightly was used before in this OUTPUT (status finished, started 2026-12-06T01:00:00Z): "
                    "this run's record replaces that run's, and its rows keep that id; give another --run-id to "
                    "keep both records"], said


def test_a_run_whose_record_another_process_writes_stops_at_its_next_check(tmp_path):
    """Two runs of one id that began within moments: the one whose record the other wrote
    over stops at its next check (RunIdTaken), and its heartbeat no longer writes over the
    other's record."""
    import json
    import time

    from rayvid import commit

    out = str(tmp_path / "out")
    record = {"run_id": "n", "status": "running", "started_at": "2026-12-06T01:00:00Z", "config": {"input": "/in"}}
    beat = commit.Heartbeat(out, "n", record, every_s=0.05)
    beat.start()
    try:
        rivals = commit.Rivals(out, dict(record))
        rivals.check_now()  # its own record: no rival
        time.sleep(0.2)
        rivals.check_now()  # its own, as its heartbeat rewrote it
        theirs = {"run_id": "n", "status": "running", "started_at": "2026-12-06T01:00:01Z", "host": "gpu-7",
                  "node": "gpu-7/boot/1", "pid": 12, "heartbeat_at": time.time()}
        # (no beat between the other's write and the check: under a loaded CI machine a beat
        # that had read its own record wrote it back in between, and the check saw its own)
        with beat._lock:
            (tmp_path / "out" / "runs" / "n.json").write_text(json.dumps(theirs))
            with pytest.raises(commit.RunIdTaken, match=r"run id n was taken by another run \(host gpu-7, started "
                                                         r"2026-12-06T01:00:01Z\) into this OUTPUT"):
                rivals.check(now=1e12)
        # (a beat that read its own record just before the other's write may have written
        # over it since, or still be writing: a window no store without conditional writes
        # closes. The other run's next beat writes its record again; no beat of this run begun
        # after the check writes over it: 6 beats' time)
        with beat._lock:  # (the beat in flight, if one is: a full suite's load saw it land late)
            pass
        (tmp_path / "out" / "runs" / "n.json").write_text(json.dumps(theirs))
        time.sleep(0.3)
        assert json.loads((tmp_path / "out" / "runs" / "n.json").read_text()) == theirs
    finally:
        beat.stop()


def test_a_rival_on_s3_written_by_another_process_is_seen_at_the_next_check(s3_endpoint, tmp_path):
    """On S3 each check lists runs/ afresh: s3fs answered the later checks from the listing it
    cached at the first, so an earlier run's record written by another process after that
    (here by another client) was never seen and both runs committed every video."""
    import json

    import boto3

    from rayvid import commit
    from rayvid.errors import ConfigError

    url = f"s3://rayvid-test/rivals-{tmp_path.name}"
    late_record = {"run_id": "late", "status": "running", "started_at": "2026-12-05T10:00:03Z",
                   "config": {"input": "s3://in/"}}
    late = commit.Heartbeat(url, "late", late_record, every_s=60)
    late.start()
    try:
        rivals = commit.Rivals(url, dict(late_record))
        rivals.check_now()  # alone
        early = commit.Heartbeat(str(tmp_path), "early", {"run_id": "early", "status": "running",
                                                          "started_at": "2026-12-05T10:00:00Z",
                                                          # (written before the later one's, landed after its check)
                                                          "recorded_at": late_record["recorded_at"] - 1,
                                                          "config": {"input": "s3://in"}}, every_s=60)
        early.start()  # its record as a live run writes it (this process: alive), put by another client
        record = json.loads((tmp_path / "runs" / "early.json").read_text())
        assert record["status"] == "running"
        boto3.client("s3", endpoint_url=s3_endpoint).put_object(
            Bucket="rayvid-test", Key=f"rivals-{tmp_path.name}/runs/early.json", Body=json.dumps(record).encode())
        with pytest.raises(ConfigError, match="run early"):
            rivals.check_now()
        early.stop()
    finally:
        late.stop()


def test_recovery_sweeps_writes_a_kill_left_unfinished(tmp_path):
    """A run SIGKILLed inside a local write leaves `.<name>.tmp-<id>` (read by no glob, but
    never deleted: a flush's rows each, `retractions/` no longer empty at rest): the next
    recovery deletes those older than commit.LEASE_S, and leaves younger ones (a live
    writer's) and everything committed alone."""
    from rayvid import commit

    c = Committer(str(tmp_path), "r1", "m")
    c.add(pa.concat_tables([_frames("v", [0, 1]), _end("v", 2)]))
    c.close()
    old = [tmp_path / "predictions" / (".part-dead-00000.parquet.tmp-" + "a" * 32),
           tmp_path / "retractions" / (".dead.json.tmp-" + "b" * 32)]
    young = tmp_path / "videos" / (".part-live-00000.parquet.tmp-" + "c" * 32)
    (tmp_path / "retractions").mkdir()
    for p in [*old, young]:
        p.write_bytes(b"half a file")
    long_ago = time.time() - commit.LEASE_S - 60
    for p in old:
        os.utime(p, (long_ago, long_ago))
    state = commit.recover(str(tmp_path))
    assert not any(p.exists() for p in old) and young.exists()
    assert "v" in state and len(list((tmp_path / "predictions").iterdir())) == 1


def test_a_video_not_found_when_read_is_read_again_by_the_next_run(tmp_path):
    """A listed video whose read found no file (deleted since listed; or a local INPUT that
    a cluster node without it was given) was a failure every later run skipped: listed again,
    it is there now, so it is read again, --retry-failed or not (a broken one is not)."""
    import pyarrow as pa
    from helpers import _end_row

    from rayvid import commit

    out = str(tmp_path / "out")
    committer = commit.Committer(out, "r1", "test-model")
    committer.add(_end_row("/v/gone.mp4", 0, 0.0, 10.0, error="NotFound"))
    committer.add(_end_row("/v/broken.mp4", 0, 0.0, 10.0, error="VideoError"))
    committer.close()
    listing = pa.table({"video_uri": ["/v/gone.mp4", "/v/broken.mp4"], "size_bytes": [-1, -1], "version": ["", ""]})
    todo, skipped, redo = commit.pending(listing, commit.recover(out), retry_failed=False)
    assert todo.column("video_uri").to_pylist() == ["/v/gone.mp4"] and skipped == 1 and redo == {"/v/gone.mp4"}
    todo, skipped, redo = commit.pending(listing, commit.recover(out), retry_failed=True)
    assert skipped == 0 and redo == {"/v/gone.mp4", "/v/broken.mp4"}


@pytest.mark.parametrize("published", [True, False])
def test_a_flush_interrupted_as_the_store_answered_is_not_committed_twice(published, monkeypatch):
    """A Ctrl-C (or SIGTERM) while S3 answered a flush's last PUT (the object stored) left
    its videos waiting; the failing run's last flush committed them again under the next
    part name: every frame twice (6 of 6 interrupted runs through a slow S3). A flush after
    one that raised looks for its videos/ file: there, it committed; not there, the same
    name is written again."""
    from helpers import _end_row, write_output

    from rayvid import commit, query

    monkeypatch.setattr(commit, "MERGE_EVERY", 2)  # (the videos waiting, merged across the interrupted flush)
    Store = _memory_store(f"interrupted{int(published)}")
    url = f"interrupted{int(published)}://out"
    write_output(url, {"/v/old.mp4": [("circle", 0.9)] * 2}, run_id="r0")
    committer = commit.Committer(url, "r1", "test-model")
    opened = Store._open

    def interrupted(self, path, mode="rb", **kwargs):
        f = opened(self, path, mode, **kwargs)
        if "w" in mode and "/videos/part-r1-" in path:
            close = f.close

            def close_then_interrupt():
                if published:
                    close()  # stored; the answer never came
                Store._open = opened
                raise KeyboardInterrupt

            f.close = close_then_interrupt
        return f

    Store._open = interrupted
    committer.add(_frame_rows("/v/a.mp4", 3))
    committer.add(_end_row("/v/a.mp4", 3, 0.3, 10.0))
    with pytest.raises(KeyboardInterrupt):
        committer.flush()
    for video in ("/v/b.mp4", "/v/c.mp4"):
        committer.add(_frame_rows(video, 2))
        committer.add(_end_row(video, 2, 0.2, 10.0))
    committer.flush()  # the failing run's last flush (pipeline._publish_complete)
    preds = query.read(url)
    keys = list(zip(preds.column("video_uri").to_pylist(), preds.column("frame_index").to_pylist()))
    assert sorted(keys) == [("/v/a.mp4", 0), ("/v/a.mp4", 1), ("/v/a.mp4", 2), ("/v/b.mp4", 0), ("/v/b.mp4", 1),
                            ("/v/c.mp4", 0), ("/v/c.mp4", 1), ("/v/old.mp4", 0), ("/v/old.mp4", 1)]
    assert sorted(query.read(url, "videos").column("video_uri").to_pylist()) == ["/v/a.mp4", "/v/b.mp4", "/v/c.mp4",
                                                                                 "/v/old.mp4"]
    assert committer.committed == {"/v/a.mp4", "/v/b.mp4", "/v/c.mp4"}
    Store.store.clear()


def _frame_rows(uri: str, n: int):
    """`n` frame rows of `uri` as inference hands them to the committer."""
    from rayvid.schema import INFERRED_SCHEMA, KIND_FRAME

    return pa.table({
        "video_uri": [uri] * n, "segment": [0] * n, "n_segments": [1] * n, "kind": [KIND_FRAME] * n,
        "frame_index": list(range(n)), "timestamp_s": [i / 10 for i in range(n)], "label": ["circle"] * n,
        "score": np.full(n, 0.9, np.float32),
        "topk": [[{"class_id": 0, "label": "circle", "score": 0.9}]] * n, "n_frames": [0] * n,
        "error_stage": [""] * n, "error_type": [""] * n, "message": [""] * n, "decoder": [""] * n, "codec": [""] * n,
        "width": [0] * n, "height": [0] * n, "fps": [0.0] * n, "duration_s": [0.0] * n, "reused_from": [-1] * n,
        "bytes_read": [0] * n}, schema=INFERRED_SCHEMA)


@pytest.mark.parametrize("folder, name, text, what", [
    ("compactions", "part-x.parquet.json", "garbage", "a compaction"),
    ("compactions", "part-x.parquet.json", "{}", "a compaction"),
    ("retractions", "r1.json", '{"videos": 5}', "a retraction"),
    ("retractions", "r1.json", '["a.mp4"]', "a retraction"),
    ("retractions", "r1.json", '{"videos": ["/v/a.mp4"], "started_at": "yesterday"}', "a retraction"),
])
def test_a_damaged_compaction_or_retraction_record_is_said_naming_it(tmp_path, capsys, folder, name, text, what):
    """A file in compactions/ or retractions/ that is no record rayvid wrote: every verb
    stopped with a traceback (KeyError 'replaces', TypeError) or a JSON error naming no
    file; now exit 2 naming it, and nothing in OUTPUT is changed."""
    from helpers import write_output

    from rayvid import cli

    out = str(tmp_path / "out")
    write_output(out, {"/v/a.mp4": [("circle", 0.9)] * 5}, fps=10.0)
    os.makedirs(os.path.join(out, folder), exist_ok=True)
    with open(os.path.join(out, folder, name), "w") as f:
        f.write(text)
    before = sorted(os.path.relpath(os.path.join(d, n), out) for d, _, files in os.walk(out) for n in files)
    for argv in (["summary", out], ["segments", out], ["compact", out]):
        assert cli.main(argv) == 2, argv
        said = capsys.readouterr().err.strip().splitlines()[-1]
        assert said == (f"rayvid: error: {out}/{folder}/{name} is no record of {what} rayvid wrote (an object "
                        f"listing {'replaces' if folder == 'compactions' else 'videos'!r}, started_at a time): damaged or written by "
                        f"hand; OUTPUT cannot be read safely while it is there (move it away once no rayvid run "
                        f"or compact is running)"), said
    assert sorted(os.path.relpath(os.path.join(d, n), out) for d, _, files in os.walk(out) for n in files) == before
    os.remove(os.path.join(out, folder, name))
    assert cli.main(["segments", out]) == 0


def test_a_retraction_half_done_is_no_lost_part_and_compact_keeps_a_lost_one(tmp_path, capsys):
    """A retraction deletes a predictions/ file its videos leave empty before it rewrites
    their videos/ file: killed between the two, readers leave those videos out, as before
    (they said the part was missing), and the next run does not take them for lost. A part
    whose predictions/ file is truly gone is not merged by `compact` (its loss would be for
    good, nothing left to tell): exit 2 naming it, nothing changed."""
    import glob
    import json

    from helpers import write_output

    from rayvid import cli, compact, query

    out = str(tmp_path / "out")
    write_output(out, {"/v/a.mp4": [("circle", 0.9)] * 5, "/v/b.mp4": [("square", 0.8)] * 5}, rows_per_file=1)
    parts = sorted(glob.glob(os.path.join(out, "predictions", "part-*.parquet")))
    assert pq.read_table(parts[0]).column("video_uri").unique().to_pylist() == ["/v/a.mp4"]
    os.makedirs(os.path.join(out, "retractions"))
    with open(os.path.join(out, "retractions", "dead.json"), "w") as f:  # (its writer long gone)
        json.dump({"videos": ["/v/a.mp4"], "run_id": "", "started_at": 0}, f)
    os.remove(parts[0])
    assert sorted(set(query.segments(out).column("video_uri").to_pylist())) == ["/v/b.mp4"]
    assert commit.recover(out, only=["/v/a.mp4", "/v/b.mp4"], repair=False).lost == []
    os.remove(os.path.join(out, "retractions", "dead.json"))  # now /v/a.mp4's rows are lost, no retraction
    with pytest.raises(ValueError, match="is missing, though its videos/ file says it holds 5 rows of 1 videos"):
        query.segments(out, video="/v/a.mp4")
    # a read of another video is not refused for a part that never held it
    assert query.segments(out, video="/v/b.mp4").column("video_uri").unique().to_pylist() == ["/v/b.mp4"]
    files = sorted(glob.glob(os.path.join(out, "*", "*")))
    assert cli.main(["compact", out]) == 2
    assert "predictions/" + os.path.basename(parts[0]) + " is missing" in capsys.readouterr().err
    assert sorted(glob.glob(os.path.join(out, "*", "*"))) == files
    with pytest.raises(ValueError, match="is missing, though its videos/ file says it holds 5 rows of 1 videos"):
        compact.compact(out)
    lost = commit.recover(out, only=["/v/a.mp4", "/v/b.mp4"], repair=False)
    assert lost.lost == [(os.path.basename(parts[0]), 1, 5)]


def test_a_video_committed_in_two_parts_is_read_again_and_every_copy_retracted(tmp_path):
    """A video committed twice (two runs at once over one INPUT; a compaction under a
    retraction) was known by its last row alone: a rerun that redid it retracted one copy
    and kept the other, and later reruns skipped it, its rows twice for good (a QA find).
    Now it is to do again, as a changed video, and its retraction takes every copy; a
    compaction's merged part beside the parts it replaces (not yet deleted) is no double."""
    import json
    import shutil

    from helpers import read_output, write_output

    out = str(tmp_path / "out")
    write_output(out, {"/v/a.mp4": [("circle", 0.9)] * 3, "/v/b.mp4": [("square", 0.8)] * 2})
    write_output(out, {"/v/a.mp4": [("circle", 0.7)] * 3}, run_id="r2")  # a second run's copy
    assert len(read_output(out, "predictions")) == 8
    state = commit.recover(out, only=["/v/a.mp4", "/v/b.mp4"])
    assert set(state.doubled) == {"/v/a.mp4"}
    assert len(state.files_of({"/v/a.mp4"})) == 2 and len(state.files_of({"/v/b.mp4"})) == 1
    listed = pa.table({"video_uri": ["/v/a.mp4", "/v/b.mp4"], "size_bytes": [-1, -1], "version": ["", ""]})
    left, skipped, redo = commit.pending(listed, state, retry_failed=False)
    assert (left.column("video_uri").to_pylist(), skipped, redo) == (["/v/a.mp4"], 1, {"/v/a.mp4"})
    commit.retract(out, redo, state, "r3")
    assert read_output(out, "predictions").column("video_uri").to_pylist() == ["/v/b.mp4"] * 2
    assert read_output(out, "videos").column("video_uri").to_pylist() == ["/v/b.mp4"]
    assert commit.recover(out, only=["/v/a.mp4", "/v/b.mp4"]).doubled == {}

    # a compaction that has written its merged part (its commit point) but not yet deleted
    # the parts it replaces: the same rows twice in the folders, once for readers
    write_output(out, {"/v/c.mp4": [("circle", 0.9)] * 2}, run_id="r4")
    parts = sorted(os.listdir(os.path.join(out, "videos")))
    merged = "part-compact-20261207T000000Z-00000000-00000.parquet"
    for folder in ("predictions", "videos"):
        tables = [pq.read_table(os.path.join(out, folder, p)) for p in parts]
        pq.write_table(pa.concat_tables(tables), os.path.join(out, folder, merged))
    os.makedirs(os.path.join(out, "compactions"))
    with open(os.path.join(out, "compactions", merged + ".json"), "w") as f:
        json.dump({"replaces": parts, "started_at": time.time(), **commit.writer()}, f)
    with commit.active(merged):  # (still at work: not finished by this recover)
        state = commit.recover(out, only=["/v/b.mp4", "/v/c.mp4"], repair=False)
    assert state.doubled == {} and not any(state.table.column("changed").to_pylist())
    shutil.rmtree(os.path.join(out, "compactions"))
