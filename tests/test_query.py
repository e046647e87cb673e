"""The query verbs read committed outputs back: exact segments, find, summary, export, and
every output format, locally and on S3."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import BUCKET, listing_hook_store, read_output, write_output

from rayvid import cli, commit, query, storage

FPS = 10.0


def _run(*frames):
    """[(label, n frames, score)] -> per-frame (label, score)."""
    return [(label, score) for label, n, score in frames for _ in range(n)]


# v1: circle 0-2 s, a 0.3 s square, circle again 2.3-4.3 s, then 1 s of low-score blank
V1 = _run(("circle", 20, 0.9), ("square", 3, 0.8), ("circle", 20, 0.95), ("blank", 10, 0.3))
V2 = _run(("square", 15, 0.7), ("circle", 5, 0.6))


@pytest.fixture
def out(tmp_path):
    url = str(tmp_path / "out")
    write_output(url, {"/v/v1.mp4": V1, "/v/v2.mp4": V2}, fps=FPS, rows_per_file=1, failed=("/v/bad.mp4",))
    return url


def _segs(table):
    return [(r["video_uri"], r["label"], round(r["start_s"], 6), round(r["end_s"], 6), r["frames"])
            for r in table.to_pylist()]


def test_segments_merge_short_gaps_and_respect_filters(out):
    assert _segs(query.segments(out, video="/v/v1.mp4")) == [
        ("/v/v1.mp4", "circle", 0.0, 4.3, 40),  # merged over the 0.3 s square
        ("/v/v1.mp4", "square", 2.0, 2.3, 3),
        ("/v/v1.mp4", "blank", 4.3, 5.3, 10),  # the last frame lasts one frame step
    ]
    assert _segs(query.segments(out, video="/v/v1.mp4", gap=0.0))[:2] == [
        ("/v/v1.mp4", "circle", 0.0, 2.0, 20), ("/v/v1.mp4", "square", 2.0, 2.3, 3)]
    assert [s[1] for s in _segs(query.segments(out, video="/v/v1.mp4", min_score=0.5))] == ["circle", "square"]
    assert [s[1] for s in _segs(query.segments(out, video="/v/v1.mp4", min_duration=0.5))] == ["circle", "blank"]
    assert _segs(query.segments(out, label="square")) == [
        ("/v/v1.mp4", "square", 2.0, 2.3, 3), ("/v/v2.mp4", "square", 0.0, 1.5, 15)]
    seg = query.segments(out, label="circle", video="/v/v1.mp4").to_pylist()[0]
    assert seg["mean_score"] == pytest.approx((20 * 0.9 + 20 * 0.95) / 40)
    assert seg["max_score"] == pytest.approx(0.95)


def test_segments_of_sparse_sampling_span_the_sampling_step(tmp_path):
    url = str(tmp_path / "sparse")
    write_output(url, {"/v/s.mp4": _run(("circle", 30, 0.9), ("blank", 30, 0.9))}, fps=FPS, every=5)
    assert _segs(query.segments(url)) == [("/v/s.mp4", "circle", 0.0, 3.0, 6), ("/v/s.mp4", "blank", 3.0, 6.0, 6)]
    # the last sampled frame lasts the step, never past the video's end (5.8 s: 58 frames);
    # a video with one frame kept lasts one frame at its fps (not 0 s)
    url = str(tmp_path / "sparse-end")
    write_output(url, {"/v/s.mp4": _run(("circle", 30, 0.9), ("blank", 28, 0.9)), "/v/one.mp4": [("circle", 0.9)]},
                 fps=FPS, every=5)
    assert _segs(query.segments(url)) == [("/v/one.mp4", "circle", 0.0, 0.1, 1),
                                          ("/v/s.mp4", "circle", 0.0, 3.0, 6), ("/v/s.mp4", "blank", 3.0, 5.8, 6)]
    assert query.find(url, "blank").to_pylist()[0]["ranges"] == "3.00-5.80"
    # one frame kept of a longer video (one key frame, or --every N over fewer than N
    # frames): it stands for the whole video (it lasted one frame: a QA find)
    url = str(tmp_path / "one-kept")
    write_output(url, {"/v/k.mp4": _run(("circle", 30, 0.9))}, fps=FPS, every=100)
    assert _segs(query.segments(url)) == [("/v/k.mp4", "circle", 0.0, 3.0, 1)]


def test_a_label_no_frame_has_is_said_with_those_it_has(out, capsys):
    for argv in (["find", out, "CIRCLE"], ["segments", out, "--label", "circle "]):
        assert cli.main(argv) == 0
        printed = capsys.readouterr()
        assert "(no rows)" in printed.out, argv
        assert "OUTPUT has: blank, circle, square)" in printed.err, argv
    assert cli.main(["find", out, "circle", "--min-score", "0.99"]) == 0  # a label it has: nothing said
    assert capsys.readouterr().err == ""


def test_raw_scores_below_zero_are_frames_like_any_other(tmp_path, capsys):
    """A model's raw scores (a linear last layer: negative here): segments and find took
    every frame scoring below 0 as belonging to no label (`--min-score` was 0 by default:
    "(no rows)", nothing said), and find's max_score started at 0."""
    url = str(tmp_path / "raw")
    write_output(url, {"/v/r.mp4": _run(("circle", 20, -975.0), ("square", 10, -974.5))}, fps=FPS)
    assert _segs(query.segments(url)) == [("/v/r.mp4", "circle", 0.0, 2.0, 20), ("/v/r.mp4", "square", 2.0, 3.0, 10)]
    found = query.find(url, "circle").to_pylist()
    assert [(r["ranges"], r["max_score"]) for r in found] == [("0.00-2.00", -975.0)]
    assert cli.main(["find", url, "square"]) == 0 and "/v/r.mp4" in capsys.readouterr().out
    assert _segs(query.segments(url, min_score=-974.8)) == [("/v/r.mp4", "square", 2.0, 3.0, 10)]  # (a threshold)


def test_find_lists_videos_longest_first_with_ranges(out):
    rows = query.find(out, "circle", gap=0.0).to_pylist()
    assert [(r["video_uri"], r["segments"], round(r["seconds"], 6), r["ranges"]) for r in rows] == [
        ("/v/v1.mp4", 2, 4.0, "0.00-2.00, 2.30-4.30"), ("/v/v2.mp4", 1, 0.5, "1.50-2.00")]
    assert query.find(out, "circle", min_duration=1.0).column("video_uri").to_pylist() == ["/v/v1.mp4"]
    assert len(query.find(out, "no-such-label")) == 0


def test_summary_is_the_per_video_table(out):
    rows = {r["video_uri"]: r for r in query.summary(out).to_pylist()}
    assert set(rows) == {"/v/v1.mp4", "/v/v2.mp4", "/v/bad.mp4"}
    v1 = rows["/v/v1.mp4"]
    assert (v1["frames"], v1["duration_s"], v1["fps"], v1["width"], v1["height"], v1["codec"], v1["error"]) == (
        53, 5.3, 10.0, 160, 120, "h264", False)
    assert v1["top_labels"] == "circle 75%, blank 19%, square 6%"
    assert rows["/v/bad.mp4"]["error"] is True and rows["/v/bad.mp4"]["frames"] == 0


def test_summary_says_no_label_for_frames_without_one():
    """A detector's frame with no box has a null label: `(no label) 40%`, not `None 40%`."""
    from rayvid import schema

    row = {"video_uri": "/v/d.mp4", "frames": 10, "duration_s": 1.0, "fps": 10.0, "width": 64, "height": 64,
           "codec": "h264", "decoder": "decord", "error": False, "run_id": "r",
           "top_labels": [{"label": "car", "share": 0.6}, {"label": None, "share": 0.4}]}
    videos = pa.Table.from_pylist([row], schema=pa.schema([schema.VIDEOS_SCHEMA.field(n) for n in row]))
    assert query.summary_of(videos).column("top_labels").to_pylist() == ["car 60%, (no label) 40%"]


def test_formats(out, tmp_path, capsys):
    assert cli.main(["segments", out, "--label", "square", "--format", "csv"]) == 0
    got = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["video_uri"], r["start_s"], r["end_s"]) for r in got] == [
        ("/v/v1.mp4", "2.0", "2.3"), ("/v/v2.mp4", "0.0", "1.5")]
    # float32 scores as export writes them: 0.9, not 0.8999999761581421 (a QA find)
    assert {r["max_score"] for r in got} <= {"0.9", "0.8", "0.7", "0.6", "1.0"}, got
    assert cli.main(["find", out, "circle", "--format", "json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [r["video_uri"] for r in found] == ["/v/v1.mp4", "/v/v2.mp4"]
    assert all(len(repr(r["max_score"])) <= 6 for r in found), found
    dest = str(tmp_path / "s.parquet")
    assert cli.main(["summary", out, "--format", "parquet", "--out", dest]) == 0
    assert not (pq.read_schema(dest).metadata or {}).get(b"rayvid.schema_version")  # (no videos/ part)
    assert sorted(pq.read_table(dest).column("video_uri").to_pylist()) == ["/v/bad.mp4", "/v/v1.mp4", "/v/v2.mp4"]
    assert cli.main(["segments", out, "--video", "/v/v2.mp4"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert re.split(r"\s+", text[0].strip())[:4] == ["video_uri", "label", "start_s", "end_s"]
    assert re.split(r"\s+", text[2].strip())[:4] == ["/v/v2.mp4", "square", "0", "1.5"]


def test_export_csv_has_a_row_per_frame_and_topk_columns(out, tmp_path):
    dest = str(tmp_path / "frames.csv")
    assert query.export_csv(out, dest) == len(V1) + len(V2)
    with open(dest) as f:
        rows = list(csv.DictReader(f))
    preds = read_output(out).sort_by([("video_uri", "ascending"), ("frame_index", "ascending")]).to_pylist()
    assert [(r["video_uri"], int(r["frame_index"]), r["label"], r["label_1"], r["label_2"]) for r in rows] == [
        (p["video_uri"], p["frame_index"], p["label"], p["topk"][0]["label"], p["topk"][1]["label"]) for p in preds]
    assert float(rows[0]["score_1"]) == pytest.approx(0.9)
    one = str(tmp_path / "one.csv")
    assert cli.main(["export", out, one, "--video", "/v/v2.mp4"]) == 0
    with open(one) as f:
        assert {r["video_uri"] for r in csv.DictReader(f)} == {"/v/v2.mp4"}


def test_export_has_the_most_top_k_any_part_has(tmp_path):
    """A later run with a larger --topk (or detections, whose number varies by frame) adds
    parts with more top-k entries than the first: the CSV has a column for each, empty in
    rows that have fewer (they were cut to the first part's k). An empty export has the
    columns a non-empty one has, top-k aside."""
    url = str(tmp_path / "out")
    write_output(url, {"/v/a.mp4": V2[:3]}, fps=FPS, run_id="a1", k=2)
    write_output(url, {"/v/b.mp4": V2[:2]}, fps=FPS, run_id="b1", k=4)  # its part sorts after a1's
    dest = str(tmp_path / "frames.csv")
    assert query.export_csv(url, dest) == 5
    with open(dest) as f:
        rows = list(csv.DictReader(f))
    assert [(r["video_uri"], r["label_2"], r["label_3"], r["label_4"]) for r in rows] == [
        ("/v/a.mp4", "zz_other", "", "")] * 3 + [("/v/b.mp4", "zz_other", "extra_2", "extra_3")] * 2
    header = list(rows[0])
    empty = tmp_path / "empty"
    write_output(str(empty), {}, fps=FPS, failed=("/v/bad.mp4",))
    assert query.export_csv(str(empty), str(tmp_path / "none.csv")) == 0
    with open(tmp_path / "none.csv") as f:
        assert next(csv.reader(f)) == [h for h in header if not h.startswith(("label_", "score_"))]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_output_named_with_glob_characters_is_read_as_named(where, tmp_path, request):
    """`[1]`, `*` or `?` in OUTPUT's own name are characters, not a pattern: resumes find what
    is committed and the verbs read it (a rerun committed every video again and the verbs
    saw no rows; `*` read another OUTPUT's parts)."""
    if where == "s3":
        request.getfixturevalue("s3_endpoint")
    base = str(tmp_path) if where == "local" else f"s3://{BUCKET}/glob-{tmp_path.name}"
    write_output(f"{base}/o1", {"/v/other.mp4": V2}, fps=FPS)  # what `o[1]` and `o*` match as patterns
    for name in ("o[1]", "o*", "o?"):
        url = f"{base}/{name}"
        write_output(url, {"/v/v1.mp4": V1}, fps=FPS, rows_per_file=1)
        assert commit.recover(url).uris() == ["/v/v1.mp4"], name
        assert query.summary(url).column("video_uri").to_pylist() == ["/v/v1.mp4"], name
        assert query.read(url).num_rows == len(V1), name
        assert query.export_csv(url, str(tmp_path / "x.csv")) == len(V1), name


def test_an_output_whose_runs_listed_no_videos_has_no_rows(tmp_path, capsys):
    """A finished run over an empty INPUT writes runs/ alone: the verbs show no rows (they
    said "no rayvid output"), as they do for an OUTPUT whose videos all failed."""
    url = str(tmp_path / "out")
    commit.write_run_record(url, "r1", {"run_id": "r1", "status": "finished", "started_at": "2026-12-05T10:00:00Z",
                                        "stats": {"videos_listed": 0}})
    for verb in (["summary", url], ["segments", url], ["find", url, "circle"], ["export", url, "-"]):
        assert cli.main(verb) == 0, verb
        assert "no rayvid output" not in capsys.readouterr().err
    assert query.read(url).num_rows == 0
    assert cli.main(["summary", str(tmp_path / "typo")]) == 2


def test_an_unbuffered_stdout_whose_reader_goes_mid_export_is_not_a_success(tmp_path):
    """With `python -u` or PYTHONUNBUFFERED (set in many container images) stdout is a raw
    file: a write into a full pipe writes part and says so; the rest must still be written,
    so a reader that goes away mid-export is exit 141, not exit 0 and "rows -> -" after a
    truncated CSV."""
    url = str(tmp_path / "big")
    write_output(url, {"/v/long.mp4": _run(("circle", 3000, 0.9))}, fps=FPS)
    code = f"import sys\nfrom rayvid import cli\ncli.console(['export', {url!r}, '-'])\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.read(100)  # the CSV (well over the pipe's 64 KB) has begun
    time.sleep(1.0)  # (the writer blocks on the full pipe)
    proc.stdout.close()
    assert proc.wait(120) == 141 and proc.stderr.read() == b""
    full = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert full.returncode == 0 and full.stdout.count(b"\n") == 3001 and len(full.stdout) > 2**17


@pytest.mark.parametrize("verb", [["export", "{out}", "-"], ["summary", "{out}", "--format", "csv"], ["compact", "{out}"]])
def test_a_stdout_whose_reader_is_gone_ends_quietly(out, verb):
    """`rayvid export OUT - | head`: the reader closing its end is the end of the output, exit
    141 with nothing said (as `yes | head`), not "cannot read OUT: [Errno 32] Broken pipe"."""
    code = ("import os, sys\n"
            "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"  # stdout: a pipe nobody reads
            "from rayvid import cli\n"
            f"cli.console({[a.format(out=out) for a in verb]!r})\n")  # as the `rayvid` command
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize("verb", [["export", "{out}", "-"], ["summary", "{out}", "--format", "csv"],
                                  ["compact", "{out}"], ["report", "{out}", "{out}/report"]])
def test_a_stdout_that_cannot_be_written_says_so(out, verb):
    """`rayvid export OUT - > /dev/full` (a full disk behind a redirect) said "cannot read
    OUT: [Errno 28] No space left on device", the wrong verb and place: it is stdout that
    cannot be written (for compact and report, their closing line, after their work). Exit
    2, one line."""
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "rayvid", *[a.format(out=out) for a in verb]],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "rayvid: error: cannot write to stdout: [Errno 28] No space left on device\n"


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_verbs_read_object_stores(scheme, request, capsys):
    request.getfixturevalue("s3_endpoint" if scheme == "s3" else "gcs")
    url = f"{scheme}://{BUCKET}/query-out"
    write_output(url, {"s3://b/v1.mp4": V1}, fps=FPS)
    assert _segs(query.segments(url, label="square")) == [("s3://b/v1.mp4", "square", 2.0, 2.3, 3)]
    commit.write_run_record(url, "r1", {"run_id": "r1", "status": "finished", "started_at": "2026-12-05T10:00:00Z",
                                        "stats": {"videos_ok": 1, "frames": 5}})
    assert [(r["run_id"], r["status"], r["frames"]) for r in query.runs(url).to_pylist()] == [("r1", "finished", 5)]
    assert cli.main(["find", url, "circle", "--format", "csv"]) == 0
    assert "s3://b/v1.mp4" in capsys.readouterr().out
    # the command line shows rayvid's output, not other libraries' INFO lines (fsspec logs
    # one for each file gcsfs opens with read-ahead)
    proc = subprocess.run([sys.executable, "-m", "rayvid", "find", url, "circle", "--format", "csv"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "s3://b/v1.mp4" in proc.stdout, proc.stderr
    assert "AdaptiveReadaheadCache" not in proc.stderr and " INFO " not in proc.stderr, proc.stderr


def test_verbs_fetch_only_the_columns_and_parts_they_need_from_s3(moto, s3_endpoint):
    """On S3 `segments` fetches its five columns, not a part's top-k and --embed vectors
    (nor a whole part through s3fs's read-ahead); with --video, only the part whose
    row-group statistics can hold that video is read past its footer (one GET for each
    other part: the footer). Results equal those of the rows read whole."""
    import collections

    url = f"s3://{BUCKET}/wide-out"
    videos = {f"s3://b/cam{i}.mp4": _run(("circle", 300, 0.9), ("square", 300, 0.8)) for i in range(4)}
    write_output(url, videos, fps=FPS, rows_per_file=1, embed_dim=512)  # a part per video, 1.1 MB each
    everything = read_output(url).sort_by([("video_uri", "ascending"), ("frame_index", "ascending")])
    fs, root = storage.resolve(url)
    sizes = {p.rsplit("/", 1)[-1]: fs.size(p) for p in fs.glob(f"{root}/predictions/*.parquet")}
    fetched = collections.defaultdict(list)  # part -> bytes of each GET

    def record(environ):
        if environ["REQUEST_METHOD"] == "GET" and "/wide-out/predictions/" in environ["PATH_INFO"]:
            first, last = environ.get("HTTP_RANGE", "bytes=0-").split("=")[1].split("-")
            end = int(last) + 1 if last else sizes[environ["PATH_INFO"].rsplit("/", 1)[-1]]
            fetched[environ["PATH_INFO"].rsplit("/", 1)[-1]].append(end - int(first))

    with moto.hook(record):
        assert _segs(query.segments(url)) == _segs(query.label_segments(everything))
    assert sorted(fetched) == sorted(sizes)
    assert sum(map(sum, fetched.values())) < 0.1 * sum(sizes.values())
    fetched.clear()
    one = "s3://b/cam2.mp4"
    with moto.hook(record):
        assert _segs(query.segments(url, video=one)) == _segs(query.label_segments(
            everything.filter(pc.equal(everything.column("video_uri"), one))))
        rows = query.read(url, video=one)
    assert rows.column("frame_index").to_pylist() == list(range(600))
    assert rows.column("embedding").to_pylist() == everything.filter(
        pc.equal(everything.column("video_uri"), one)).column("embedding").to_pylist()
    [holder] = [p for p in sizes if pq.read_table(fs.open(f"{root}/predictions/{p}"), columns=["video_uri"])
                .column("video_uri")[0].as_py() == one]
    assert {p: len(gets) for p, gets in fetched.items() if p != holder} == {p: 2 for p in sizes if p != holder}
    assert len(fetched[holder]) > 2  # (each of the two reads: its footer, then what it needs)


def test_verbs_read_parts_ahead_without_asking_their_sizes(moto, s3_endpoint):
    """A verb over many parts is bound by request latency: the parts' sizes come from the
    folder's listing (no HEAD) and the next parts are read while one is worked on."""
    url = f"s3://{BUCKET}/many-query"
    videos = {f"s3://b/v{i}.mp4": V2 for i in range(8)}
    write_output(url, videos, fps=FPS, rows_per_file=1)
    asked = []

    def part(environ):
        if "/many-query/predictions/" not in environ["PATH_INFO"]:
            return False
        asked.append(environ["REQUEST_METHOD"])
        return True

    with moto.slow(part, 0.1) as inflight:
        found = query.segments(url, label="square")
    assert _segs(found) == [(u, "square", 0.0, 1.5, 15) for u in sorted(videos)]
    assert set(asked) == {"GET"} and inflight["most"] >= 3


def test_a_part_without_statistics_is_read_whole_for_a_video(out, tmp_path):
    """Parquet written by another tool may carry no min/max: such a part cannot be skipped."""
    import os

    part = sorted(os.listdir(f"{out}/predictions"))[0]
    table = pq.read_table(f"{out}/predictions/{part}")
    pq.write_table(table, f"{out}/predictions/{part}", write_statistics=False)
    uri = table.column("video_uri")[0].as_py()
    assert query.read(out, video=uri).column("frame_index").to_pylist() == table.column("frame_index").to_pylist()


def test_an_output_in_a_bucket_that_does_not_exist_says_so(s3_endpoint, capsys):
    """`rayvid runs s3://missing-bucket/x` said "no runs/ folder": the bucket's name is the
    likelier typo."""
    for verb in ("runs", "summary"):
        assert cli.main([verb, "s3://no-such-bucket-here/out"]) == 2
        assert capsys.readouterr().err.strip() == ("rayvid: error: no such bucket: s3://no-such-bucket-here (OUTPUT "
                                                   "s3://no-such-bucket-here/out)"), verb
    assert cli.main(["runs", "s3://rayvid-test/no/output/here"]) == 2  # a bucket there: as before
    assert "no rayvid runs recorded at s3://rayvid-test/no/output/here" in capsys.readouterr().err


def test_not_an_output_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["summary", str(tmp_path / "nothing")]) == 2
    assert "no rayvid output at" in capsys.readouterr().err
    (tmp_path / "file-out").mkdir()
    (tmp_path / "file-out" / "videos").write_text("not a folder")
    assert cli.main(["summary", str(tmp_path / "file-out")]) == 2
    assert "no rayvid output at" in capsys.readouterr().err
    (tmp_path / "file-out" / "videos").unlink()
    (tmp_path / "file-out" / "videos").mkdir()
    (tmp_path / "file-out" / "videos" / "part-r1-00000.parquet").write_text("damaged")
    assert cli.main(["summary", str(tmp_path / "file-out")]) == 2  # the part it could not read, named
    assert f"cannot read {tmp_path}/file-out/videos/part-r1-00000.parquet: " in capsys.readouterr().err


def test_runs_says_which_runs_finished_failed_or_were_interrupted(tmp_path, capsys):
    """`rayvid runs` from OUTPUT/runs/ records, oldest first: a record still saying running
    is `interrupted` once its process is gone (on this host: the pid; elsewhere: a heartbeat
    older than the lease), `running` while it may still write; a file that is no run record
    (not JSON, not an object, fields of other types) is a row `unreadable` saying why, a
    hidden one or one not .json none; the input is shown without user-info or signature;
    no runs/ is exit 2."""
    import time

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = time.time()
    here = {"host": "this", "node": commit._node(), "pid": gone.pid, "pid_started": ""}
    elsewhere = {"host": "gpu-node-7", "node": "gpu-node-7/other-boot/4026531836", "pid": 4242, "pid_started": "1"}
    records = {
        "r1": {"status": "finished", "started_at": "2026-12-01T10:00:00Z", "finished_at": "2026-12-01T10:05:00Z",
               "config": {"input": "https://user:pw@videos.example.com/m.txt?X-Amz-Signature=abc"},
               "stats": {"videos_listed": 3, "videos_skipped": 0, "videos_ok": 2, "videos_failed": 1, "frames": 90,
                         "wall_s": 300.5}},
        "r2": {"status": "failed", "started_at": "2026-12-01T11:00:00Z", "finished_at": "2026-12-01T11:00:09Z",
               "error": "StorageUnavailable: s3 down", "config": {"input": "/data/in"}},
        "r3": {"status": "running", "started_at": "2026-12-01T12:00:00Z", "heartbeat_at": now - 5, **here},
        "r4": {"status": "running", "started_at": "2026-12-01T13:00:00Z", "heartbeat_at": now - 5, **elsewhere},
        "r5": {"status": "running", "started_at": "2026-12-01T14:00:00Z",
               "heartbeat_at": now - commit.LEASE_S - 1, **elsewhere},
    }
    runs_dir = tmp_path / "out" / "runs"
    runs_dir.mkdir(parents=True)
    for run_id, record in records.items():
        (runs_dir / f"{run_id}.json").write_text(json.dumps({"run_id": run_id, **record}))
    damaged = {"torn": "{", "list": "[1, 2]", "number": '{"started_at": 12345}', "far": '{"heartbeat_at": 1e400}',
               "stats": '{"status": "finished", "stats": {"frames": "many"}}'}
    for name, text in damaged.items():
        (runs_dir / f"{name}.json").write_text(text)
    (runs_dir / ".hidden.json").write_text("{}")
    (runs_dir / "notes.txt").write_text("not a record")
    table = query.runs(str(tmp_path / "out"))
    assert [(r["run_id"], r["status"]) for r in table.to_pylist()] == [
        *((name, "unreadable") for name in sorted(damaged)),  # (no started_at: first)
        ("r1", "finished"), ("r2", "failed"), ("r3", "interrupted"), ("r4", "running"), ("r5", "interrupted")]
    why = {r["run_id"]: r["error"] for r in table.to_pylist()}
    assert why["torn"].startswith("runs/torn.json is no run record rayvid wrote: JSONDecodeError: ")
    assert why["list"] == "runs/list.json is no run record rayvid wrote: TypeError: a JSON list, not an object"
    assert "'many' is no count" in why["stats"] and "OverflowError" in why["far"]
    first = table.to_pylist()[5]
    assert first["input"] == "https://videos.example.com/m.txt" and (first["videos_ok"], first["frames"]) == (2, 90)
    assert table.column("last_heartbeat").to_pylist()[5:7] == [None, None]
    assert table.column("last_heartbeat")[9].as_py() == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime(now - commit.LEASE_S - 1))
    assert cli.main(["runs", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "interrupted" in text and "StorageUnavailable: s3 down" in text and "pw" not in text
    assert cli.main(["runs", str(tmp_path / "nothing")]) == 2
    assert "no rayvid runs recorded at" in capsys.readouterr().err


def test_what_a_verb_writes_never_replaces_what_it_reads(out, tmp_path, capsys):
    """Destinations in OUTPUT's own folders (however spelt), OUTPUT itself, an empty one or
    a folder where a file is wanted: exit 2 before any work, nothing changed; elsewhere in
    OUTPUT is fine, and "-" is stdout."""
    import hashlib
    import os

    def state():
        return {os.path.join(d, f): hashlib.md5(open(os.path.join(d, f), "rb").read()).hexdigest()
                for d, _, files in os.walk(out) for f in files}

    before = state()
    part = sorted(os.listdir(f"{out}/videos"))[0]
    for argv in (["export", out, f"{out}/videos/{part}"], ["export", out, f"{out}/predictions/../videos/{part}"],
                 ["summary", out, "--out", f"{out}/predictions/x.parquet"], ["export", out, out],
                 ["report", out, f"{out}/runs"], ["segments", out, "--out", f"{out}/errors/"]):
        assert cli.main(argv) == 2, argv
        assert "is OUTPUT or in its own folders (predictions/, errors/, videos/" in capsys.readouterr().err, argv
    assert state() == before
    assert cli.main(["report", out, ""]) == 2 and "empty URL" in capsys.readouterr().err
    assert cli.main(["export", out, str(tmp_path / "newdir") + "/"]) == 2
    assert "names a folder: give a file name" in capsys.readouterr().err
    assert cli.main(["similar", out, "-k", "0", "--image", "x.png"]) == 2
    assert "-k must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["similar", out, "--video", "/v/v1.mp4", "--time=-1"]) == 2
    assert "--time must be >= 0, got -1" in capsys.readouterr().err
    assert cli.main(["summary", out, "--format", "csv", "--out", f"{out}/summary.csv"]) == 0  # beside its folders
    assert cli.main(["export", out, "-"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith('"video_uri","frame_index"') and len(printed.out.splitlines()) == 1 + len(V1) + len(V2)
    assert not os.path.exists("-")


# --- the README's example queries run as written -----------------------------------------

README = __import__("pathlib").Path(__file__).resolve().parent.parent / "README.md"


def readme_example(name: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- example: {name} -->\s*```\w+\n(.*?)```", text, re.S)
    assert m, f"README has no `<!-- example: {name} -->` block"
    return m.group(1)


def _run_example(name, output):
    code = readme_example(name)
    assert 'OUTPUT = "out"' in code
    scope: dict = {}
    exec(compile(code.replace('OUTPUT = "out"', f"OUTPUT = {output!r}"), f"README:{name}", "exec"), scope)
    return scope


@pytest.fixture
def readme_out(tmp_path):
    url = str(tmp_path / "readme-out")
    write_output(url, {"/v/v1.mp4": V1, "/v/v2.mp4": V2}, fps=FPS, rows_per_file=1)
    return url


def _expected(output):
    preds = read_output(output).sort_by([("video_uri", "ascending"), ("frame_index", "ascending")]).to_pylist()
    circles = {}
    for p in preds:
        if p["label"] == "circle" and p["score"] > 0.9:
            c = circles.setdefault(p["video_uri"], [0, p["timestamp_s"], p["timestamp_s"]])
            c[0] += 1
            c[2] = p["timestamp_s"]
    anywhere = [(p["video_uri"], p["frame_index"]) for p in preds
                for k in p["topk"] if k["label"] == "square" and k["score"] > 0.9]
    return sorted((u, *c) for u, c in circles.items()), anywhere


def test_readme_duckdb_examples(readme_out):
    scope = _run_example("duckdb", readme_out)
    circles, anywhere = _expected(readme_out)
    assert circles == [("/v/v1.mp4", 20, 2.3, 4.2)]  # the 0.95 run; the 0.9 run is not > 0.9
    assert [tuple(r) for r in scope["circles"]] == circles
    assert [(u, i) for u, i, _ in scope["anywhere"]] == anywhere
    assert scope["contents"][0][:2] == ("/v/v1.mp4", "circle")


def test_readme_polars_examples(readme_out):
    scope = _run_example("polars", readme_out)
    circles, anywhere = _expected(readme_out)
    assert [tuple(r) for r in scope["circles"].iter_rows()] == circles
    assert [(r["video_uri"], r["frame_index"]) for r in scope["anywhere"].iter_rows(named=True)] == anywhere


def test_readme_arrow_example(readme_out):
    scope = _run_example("arrow", readme_out)
    assert dict(scope["by_label"]) == {"blank": 10, "circle": 45, "square": 18}
    assert scope["frame"].height == len(V1) + len(V2)


def _hive(t) -> str:
    import pyarrow as pa

    if pa.types.is_list(t):
        return f"array<{_hive(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ",".join(f"{f.name}:{_hive(f.type)}" for f in t) + ">"
    return {pa.string(): "string", pa.int64(): "bigint", pa.int32(): "int", pa.float64(): "double",
            pa.float32(): "float", pa.bool_(): "boolean"}[t]


def test_readme_athena_tables_match_the_schema():
    from rayvid.schema import PREDICTIONS_SCHEMA, VIDEOS_SCHEMA

    ddl = readme_example("athena")
    tables = dict(re.findall(r"CREATE EXTERNAL TABLE (\w+) \((.*?)\n\)", ddl, re.S))
    for name, schema in (("rayvid_predictions", PREDICTIONS_SCHEMA), ("rayvid_videos", VIDEOS_SCHEMA)):
        columns = [line.strip().rstrip(",").split(" ", 1) for line in tables[name].strip().splitlines()]
        assert columns == [[f.name, _hive(f.type)] for f in schema], name


def test_a_video_the_output_lacks_is_said_with_the_names_it_holds(tmp_path, capsys):
    """`--video` with a name OUTPUT does not hold (another prefix, a typo) said nothing: no
    rows, exit 0. Now each verb says so, with the nearest names; a failed video says why."""
    out = str(tmp_path / "out")
    write_output(out, {"s3://b/cams/lobby.mp4": [("circle", 0.9)] * 3, "s3://b/cams/yard.mp4": [("square", 0.8)] * 3},
                 failed=("s3://b/cams/broken.mp4",))
    assert cli.main(["segments", out, "--video", "s3://b/lobby.mp4"]) == 0
    err = capsys.readouterr().err
    assert "holds no video named s3://b/lobby.mp4; did you mean s3://b/cams/lobby.mp4?" in err
    assert cli.main(["export", out, str(tmp_path / "x.csv"), "--video", "s3://b/cams/lobbby.mp4"]) == 0
    assert "did you mean s3://b/cams/lobby.mp4?" in capsys.readouterr().err
    assert cli.main(["segments", out, "--video", "s3://b/cams/broken.mp4"]) == 0
    assert "s3://b/cams/broken.mp4 failed: " in capsys.readouterr().err
    assert cli.main(["segments", out, "--video", "s3://b/cams/yard.mp4", "--label", "circle"]) == 0
    assert "holds no video" not in capsys.readouterr().err  # it holds it: its frames just are not circles
    assert query.missing_video(out, "/nowhere/zebra.qt").endswith("(videos are named as the run listed them: "
                                                                   "`rayvid summary OUTPUT` lists them)")
    assert "did you mean" not in query.missing_video(out, "/nowhere/zebra.qt")
    for part in os.listdir(os.path.join(out, "errors")):  # its errors/ row gone (deleted by hand): no "failed (;"
        os.remove(os.path.join(out, "errors", part))
    assert query.missing_video(out, "s3://b/cams/broken.mp4") == "s3://b/cams/broken.mp4 failed (--retry-failed redoes it)"


def test_similar_of_a_video_the_output_lacks_names_the_nearest(tmp_path, capsys):
    out = str(tmp_path / "out")
    write_output(out, {"/v/a.mp4": [("circle", 0.9)] * 3}, embed_dim=4)
    assert cli.main(["similar", out, "--video", "/w/a.mp4", "--time", "0"]) == 2
    assert "holds no video named /w/a.mp4; did you mean /v/a.mp4?" in capsys.readouterr().err


def test_a_clip_runs_segments_end_where_their_clips_end():
    """A clip run's rows carry each clip's end_s: a video of one clip of 3 frames (0.3 s) was
    a segment of 0-0.1 s by the rule for frames (a frame lasts until the next row)."""
    preds = pa.table({"video_uri": ["/v/three.mp4", "/v/long.mp4", "/v/long.mp4"], "frame_index": [0, 0, 4],
                      "timestamp_s": [0.0, 0.0, 0.4], "label": ["moving"] * 3, "score": [0.9] * 3,
                      "end_s": [0.3, 0.4, 0.7]})
    got = query.label_segments(preds.sort_by([("video_uri", "ascending"), ("frame_index", "ascending")]))
    assert [(r["video_uri"], r["start_s"], r["end_s"]) for r in got.to_pylist()] == [
        ("/v/long.mp4", 0.0, 0.7), ("/v/three.mp4", 0.0, 0.3)]
    # overlapping clips (--clip-len 4 --clip-stride 2, 10 fps): a clip lasts until the next
    # begins, so segments tile the video (a review found "still 0-0.6, moving 0.4-1.0")
    overlap = pa.table({"video_uri": ["/v/o.mp4"] * 4, "frame_index": [0, 2, 4, 6], "timestamp_s": [0.0, 0.2, 0.4, 0.6],
                        "label": ["still", "still", "moving", "moving"], "score": [0.9] * 4,
                        "end_s": [0.4, 0.6, 0.8, 1.0]})
    assert [(r["label"], r["start_s"], r["end_s"]) for r in query.label_segments(overlap, gap=0).to_pylist()] == [
        ("still", 0.0, 0.4), ("moving", 0.4, 1.0)]
    # clips of every other frame (--clip-len 4 --every 2, 30 fps): clips of frames 0-6, 8-14,
    # 16-22 end a frame after their last (7/30 s), the frame up to the next clip in none; a
    # clip's label holds until the next clip starts (README), as it did between clips of one
    # label: "still 0-0.467" left a hole before "moving" from 0.533 (a QA helper found it)
    sparse = pa.table({"video_uri": ["/v/e.mp4"] * 3, "frame_index": [0, 8, 16], "timestamp_s": [0.0, 8 / 30, 16 / 30],
                       "label": ["still", "still", "moving"], "score": [0.9] * 3,
                       "end_s": [7 / 30, 15 / 30, 23 / 30]})
    assert [(r["label"], r["start_s"], r["end_s"]) for r in query.label_segments(sparse, gap=0).to_pylist()] == [
        ("still", 0.0, 16 / 30), ("moving", 16 / 30, 23 / 30)]


def test_a_variable_frame_rate_videos_last_segment_ends_at_its_duration():
    """A variable-frame-rate video (10 frames at 30 fps, then a frame each 0.2 s up to 8.0 s):
    its duration is the last frame's time plus one frame at the average rate (8.178 s); its
    last frame was held for the median step (0.2 s) to 8.2, past the video's end (by less than
    half a frame at the average rate, let stand as rounding; a QA helper found it)."""
    t = np.r_[np.arange(10) / 30, 1 + np.arange(36) * 0.2]
    duration = 8.0 / (1 - 1 / 46)  # = 8.0 + duration / 46
    fps = 46 / duration
    preds = pa.table({"video_uri": ["/v/vfr.mp4"] * 46, "frame_index": list(range(46)), "timestamp_s": t,
                      "label": ["square"] * 46, "score": [0.9] * 46})
    [seg] = query.label_segments(preds, videos={"/v/vfr.mp4": (duration, fps)}).to_pylist()
    assert (seg["start_s"], seg["end_s"]) == (0.0, pytest.approx(duration))
    # a container's duration rounded below its last frame's end (a 1 s video's 0.999667): the
    # step stands; further below, the last frame still lasts one frame
    cfr = np.arange(60) / 30
    assert query.frame_ends(cfr, 1.999667, 30.0)[-1] == 2.0
    assert query.frame_ends(cfr, 1.99, 30.0)[-1] == pytest.approx(2.0)
    assert query.frame_ends(cfr, 2.0005, 30.0)[-1] == pytest.approx(2.0)


def test_similar_image_on_a_clip_models_embeddings_says_to_ask_by_time(tmp_path, capsys, clip_model):
    """`similar --image` where the embeddings are a video model's (one per clip) failed with
    TensorFlow's traceback (exit 1): an image is no clip. Exit 2 saying what to ask instead."""
    from PIL import Image

    from rayvid.config import ModelConfig, RunConfig

    out = str(tmp_path / "out")
    write_output(out, {"/v/a.mp4": [("still", 0.9)] * 3}, embed_dim=4)  # (run r1's rows)
    cfg = RunConfig(input="/v", output=out, model=ModelConfig(name=clip_model["model"], embed="auto"))
    commit.write_run_record(out, "r1", {"run_id": "r1", "status": "finished", "config": cfg.to_dict()})
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "q.png")
    assert cli.main(["similar", out, "--image", str(tmp_path / "q.png")]) == 2
    assert capsys.readouterr().err.endswith("OUTPUT's embeddings are of clips (4 frames: a video model); --image "
                                            "embeds one image: ask with --video URI --time T\n")
    # a record of a run before --weights with a model file was refused: it recorded them,
    # unused; read without them (it was "has no config rayvid can read")
    config = cfg.to_dict()
    config["model"]["weights"] = "/tmp/unused.h5"
    commit.write_run_record(out, "r1", {"run_id": "r1", "status": "finished", "config": config})
    assert cli.main(["similar", out, "--image", str(tmp_path / "q.png")]) == 2
    assert capsys.readouterr().err.endswith("OUTPUT's embeddings are of clips (4 frames: a video model); --image "
                                            "embeds one image: ask with --video URI --time T\n")


def test_similar_at_a_time_the_video_does_not_show_says_so(tmp_path, capsys):
    """`--time` past the video's end answered for its last frame, silently: a typo'd time
    looked like an answer. The end is the video's duration (its videos/ row), else where its
    last embedded frame stops being shown; anywhere before it, the frame on screen answers,
    however sparse the sampling (one frame of a 10 s video: 0 to 10 s)."""
    out = str(tmp_path / "out")
    write_output(out, {"/v/a.mp4": [("circle", 0.9)] * 3, "/v/b.mp4": [("circle", 0.9)] * 3}, embed_dim=4)
    assert query.similar(out, k=1, video="/v/a.mp4", time_s=0.29).to_pylist()[0]["video_uri"] == "/v/b.mp4"
    for t in ("0.3", "75"):  # 3 frames at 10 fps: 0.3 s
        assert cli.main(["similar", out, "--video", "/v/a.mp4", "--time", t]) == 2
        assert capsys.readouterr().err == f"rayvid: error: --time {float(t):g} is past the end of /v/a.mp4 (0.3 s)\n"
    sparse = str(tmp_path / "sparse")  # 100 frames at 10 fps, only frame 0 kept
    write_output(sparse, {"/v/a.mp4": [("circle", 0.9)] * 100, "/v/b.mp4": [("circle", 0.9)] * 100},
                 every=200, embed_dim=4)
    for t in (0, 0.2, 9.9):
        assert query.similar(sparse, k=1, video="/v/a.mp4", time_s=t).to_pylist()[0]["video_uri"] == "/v/b.mp4"
    with pytest.raises(ValueError, match=r"--time 10 is past the end of /v/a.mp4 \(10 s\)"):
        query.similar(sparse, k=1, video="/v/a.mp4", time_s=10)


def test_a_read_while_a_compaction_replaces_its_parts_sees_every_video_once(tmp_path):
    """A verb listed OUTPUT's parts, then `rayvid compact` merged and deleted them: every
    part not read yet was passed over as "gone" and its videos were missing (export: 19,519
    of 23,991 rows, exit 0). They are read from the merged part, each video once."""
    from rayvid import compact

    out = str(tmp_path / "out")
    videos = {f"/v/{i:02d}.mp4": [("circle", 0.9)] * (3 + i) for i in range(20)}
    write_output(out, videos, rows_per_file=1)  # a part per video
    before = query.read(out)
    reading = query.parts(out)
    first = next(reading)  # (and PARTS_AHEAD more in flight)
    assert compact.compact(out)["merged"] == 20
    got = pa.concat_tables([first, *reading])
    keys = list(zip(got.column("video_uri").to_pylist(), got.column("frame_index").to_pylist()))
    assert len(keys) == len(set(keys)) == before.num_rows
    assert sorted(keys) == sorted(zip(before.column("video_uri").to_pylist(), before.column("frame_index").to_pylist()))


def test_a_read_across_two_compactions_and_a_live_run_sees_every_video_once():
    """A compaction merged the parts a verb had listed; as the verb listed OUTPUT again, a
    run committed a part and a second compaction merged that and the first merged part
    between its two listings (of videos/, then predictions/): the verb ended, 4 of 13
    videos read, no error. Then, while a live run commits a part for each table read, a
    read over a part of failed videos only (no predictions/ file) re-listed at every pass
    and failed ("kept changing") after four."""
    from rayvid import compact

    Store = listing_hook_store("hookstore")
    out = "hookstore://out"
    try:
        write_output(out, {f"/v/{i:02d}.mp4": [("circle", 0.9)] * 3 for i in range(12)}, rows_per_file=1)
        reading = query.parts(out)
        first = next(reading)
        assert compact.compact(out)["merged"] == 12

        def run_and_compact_again():
            write_output(out, {"/v/late.mp4": [("circle", 0.9)] * 3}, rows_per_file=1, run_id="r2")
            assert compact.compact(out)["merged"] == 2

        Store.after_listing = ("/videos", run_and_compact_again)
        got = pa.concat_tables([first, *reading])
        keys = list(zip(got.column("video_uri").to_pylist(), got.column("frame_index").to_pylist()))
        assert len(keys) == len(set(keys)) == 13 * 3 and Store.after_listing is None

        Store().rm("hookstore://out", recursive=True)
        write_output(out, {"/v/a.mp4": [("circle", 0.9)] * 3}, rows_per_file=1, failed=("/v/bad.mp4",), run_id="r0")
        n = 0
        for table in query.parts(out):
            n += 1
            write_output(out, {f"/v/live{n}.mp4": [("circle", 0.9)] * 3}, rows_per_file=1, run_id=f"live{n}")
        assert n >= 1
    finally:
        Store.after_listing = None
        Store.store.clear()


def test_a_nan_in_a_run_record_is_null_in_json(tmp_path, capsys):
    """One record with `wall_s: NaN` (JSON has no NaN) failed `runs --format json` for every
    run (exit 2): it is null there, as empty in CSV."""
    out = str(tmp_path / "out")
    write_output(out, {"/v/a.mp4": [("circle", 0.9)] * 3})
    (tmp_path / "out" / "runs").mkdir(exist_ok=True)
    (tmp_path / "out" / "runs" / "odd.json").write_text(
        '{"run_id": "odd", "status": "finished", "stats": {"wall_s": NaN, "frames": 3}}')
    assert cli.main(["runs", out, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["wall_s"] for r in rows if r["run_id"] == "odd"] == [None]


def test_the_table_format_keeps_rows_on_one_line_names_apart_and_columns_aligned():
    """Long names were cut at their end (two cameras under one long prefix: one name twice),
    a line break in a name broke its row, and CJK threw the columns out of line. A long
    name keeps its start and its whole file name."""
    long = "s3://bucket/some/very/long/prefix/that/goes/on/and/on/floor-3/cam-0{}.mp4"
    table = pa.table({"video_uri": [long.format(1), long.format(2), "a\nb\tc", "名前.mp4"], "frames": [1, 22, 333, 4]})
    lines = query.to_text(table).splitlines()
    assert len(lines) == 6
    assert lines[2].split()[0] == "s3://bucket/some/very/long/prefix/that/goes/on/a…/cam-01.mp4"
    assert lines[3].split()[0].endswith("…/cam-02.mp4")
    assert lines[4].startswith("a\\nb\\tc ")
    assert {query._columns(line) for line in lines[2:]} == {query._columns(lines[0])}  # right edges in line
    # a file name wider than half the cell is kept whole (its start was cut: a QA find),
    # where it leaves the start 12 columns; else each gets half
    name = "2024-05-01_camera-entrance_recording_0001.mp4"
    assert query._cut(f"/data/archive/site-a/{name}", 60) == f"/data/archive…/{name}"
    assert query._cut("/d/" + "x" * 70 + ".mp4", 60) == "/d/" + "x" * 27 + "…" + "x" * 25 + ".mp4"


def test_an_image_that_cannot_be_had_says_why(tmp_path, capsys):
    """`similar --image` of an HTTP server nobody answers at said "no image at" (as if it were
    a missing file), and an image past Pillow's decompression-bomb limit "not an image"."""
    import struct
    import zlib

    from PIL import Image

    out = str(tmp_path / "out")
    write_output(out, {"/v/a.mp4": [("circle", 0.9)] * 3}, embed_dim=4)
    assert cli.main(["similar", out, "--image", "http://127.0.0.1:9/query.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayvid: error: cannot read image http://127.0.0.1:9/query.png: ") and "no image" not in err
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    data = bytearray((tmp_path / "one.png").read_bytes())  # its header says 20000 x 20000 (400 megapixels)
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", 20000, 20000)
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr: ihdr + 17])))
    (tmp_path / "huge.png").write_bytes(bytes(data))
    assert cli.main(["similar", out, "--image", str(tmp_path / "huge.png")]) == 2
    assert "too large for Pillow's limit" in capsys.readouterr().err


def test_similar_compares_only_embeddings_of_the_querys_model(tmp_path, capsys):
    """Two --embed runs of different models into one OUTPUT (the second run's warning says
    other settings): `similar` ranked both models' vectors together, cosines across two spaces
    that mean nothing (a QA helper found frames of the other model at 0.55). It compares with
    the frames the query's model embedded, and says how many of the others it left out."""
    import keras
    from PIL import Image

    from rayvid.config import ModelConfig, RunConfig

    def model(path, units):  # 8x8 frames -> an embedding of `units` -> 2 classes
        x = keras.Input((8, 8, 3))
        e = keras.layers.Dense(units, name="emb")(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(x)))
        keras.Model(x, keras.layers.Dense(2, activation="softmax")(e)).save(path)
        return str(path)

    out = str(tmp_path / "out")
    first, second = model(tmp_path / "a.keras", 4), model(tmp_path / "b.keras", 4)
    write_output(out, {"/v/a.mp4": [("circle", 0.9)] * 5, "/v/b.mp4": [("circle", 0.9)] * 5}, embed_dim=4)
    write_output(out, {"/v/c.mp4": [("circle", 0.9)] * 50}, embed_dim=4, run_id="r2")
    for run_id, name in (("r1", first), ("r2", second)):
        cfg = RunConfig(input="/v", output=out, model=ModelConfig(name=name, embed="auto"))
        commit.write_run_record(out, run_id, {"run_id": run_id, "status": "finished", "config": cfg.to_dict()})
    got = query.similar(out, k=100, video="/v/a.mp4", time_s=0)
    assert sorted(set(got.column("video_uri").to_pylist())) == ["/v/a.mp4", "/v/b.mp4"] and len(got) == 9
    assert f"compared with the frames embedded as the query was ({first}), not the 50 embedded by another model " \
           f"or layer (run r2): their cosines mean nothing" in capsys.readouterr().err
    # an image: embedded by the model of the run that wrote most (r2), compared with r2's frames alone
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "q.png")
    got = query.similar(out, k=100, image=str(tmp_path / "q.png"))
    assert set(got.column("video_uri").to_pylist()) == {"/v/c.mp4"} and len(got) == 50
    assert f"({second}), not the 10 embedded by another model or layer (run r1)" in capsys.readouterr().err
    # --model URL: the image is embedded by that model, compared with its frames (not the run's that wrote most)
    got = query.similar(out, k=100, image=str(tmp_path / "q.png"), model=first)
    assert set(got.column("video_uri").to_pylist()) == {"/v/a.mp4", "/v/b.mp4"} and len(got) == 10
    capsys.readouterr()
    # one model in both runs (a resumed run; the same layer named, or the same model at a
    # signed URL whose record keeps no query): every frame, nothing said
    for name, embed in ((first, "auto"), (first, None)):
        cfg = RunConfig(input="/v", output=out, model=ModelConfig(name=name, embed=embed or "auto"))
        record = cfg.to_dict()
        record["model"]["embed"] = embed
        commit.write_run_record(out, "r2", {"run_id": "r2", "status": "finished", "config": record})
        assert len(query.similar(out, k=100, video="/v/a.mp4", time_s=0)) == 59
        assert capsys.readouterr().err == ""
    assert query._space({"name": "resnet50", "weights": None}) == query._space({"name": "resnet50", "weights": "imagenet"})
    os.symlink(first, tmp_path / "link.keras")  # one file under two paths: one space (they were two)
    assert query._space({"name": str(tmp_path / "link.keras")}) == query._space({"name": first})
    assert query._space({"name": str(tmp_path / "link.keras")}) != query._space({"name": second})
    # --model-output decides which layer auto embeds (the one feeding that output): two spaces
    assert query._space({"name": first, "output": "a"}) != query._space({"name": first, "output": "b"})
    assert query._space({"name": first}) == query._space({"name": first, "output": None})  # (older records: no key)
    assert query._space({"name": "https://h/m.keras?<redacted>"}) == query._space({"name": "https://h/m.keras?X-Sig=1"})
    # a record that cannot tell (gone, or a relative model path of an older record): compared with any query
    for record in (None, {"run_id": "r2", "config": {"model": {"name": "models/b.keras", "embed": "auto"}}}):
        os.remove(os.path.join(out, "runs", "r2.json"))
        if record:
            commit.write_run_record(out, "r2", record)
        else:
            open(os.path.join(out, "runs", "r2.json"), "w").close()  # (unreadable: empty)
        assert len(query.similar(out, k=100, video="/v/a.mp4", time_s=0)) == 59
        assert capsys.readouterr().err == ""


def test_similar_of_a_failed_video_says_its_error(tmp_path, capsys):
    """Every video failed in an --embed run: `similar --video` said "no embeddings in OUT: run
    with --embed" (it had) where other verbs name the video's failure."""
    out = str(tmp_path / "out")
    write_output(out, {}, failed=("/v/bad.mp4",))
    assert cli.main(["similar", out, "--video", "/v/bad.mp4", "--time", "0"]) == 2
    err = capsys.readouterr().err
    assert "/v/bad.mp4" in err and "run with --embed" not in err, err


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4, 5])
def test_the_verbs_read_a_video_a_killed_retraction_left_as_committed_before_or_not_at_all(tmp_path, crash_at):
    """A rerun redoing a video retracts its rows (predictions, errors, then videos: the
    commit point last), killed here between any two file operations (a real process,
    ended where it would write). Until the next run or `rayvid compact` completes it, the
    verbs saw the video's videos/ row (30 frames, done) without its predictions: they
    leave out every video a retraction names, so each verb sees it as committed before or
    not at all, and all agree. Reading repairs nothing."""
    from helpers import retract_killed_at

    out = str(tmp_path / "out")
    write_output(out, {"m": [("a", 0.9)] * 3, "ok": [("b", 0.8)] * 2}, failed=("bad",))
    assert retract_killed_at(out, {"m", "bad"}, crash_at) == 9
    before = {p: os.path.getmtime(os.path.join(d, p)) for d, _, files in os.walk(out) for p in files}
    preds, videos, errors = (query.read(out, what) for what in (commit.PREDICTIONS_DIR, commit.VIDEOS_DIR,
                                                                  commit.ERRORS_DIR))
    shown = set(videos.column("video_uri").to_pylist())
    if crash_at == 1:  # killed before its intent record was written: nothing retracted
        assert shown == {"m", "ok", "bad"}
    else:
        assert shown == {"ok"}
    assert set(preds.column("video_uri").to_pylist()) == shown - {"bad"}
    assert set(errors.column("video_uri").to_pylist()) == shown & {"bad"}
    assert query.summary(out).column("video_uri").to_pylist() == sorted(shown)
    assert [t.num_rows for t in query.parts(out, columns=["label"])] == [len(preds)]  # (a part's columns only)
    assert {u for t in query.parts(out, video="m") for u in t.column("video_uri").to_pylist()} == shown & {"m"}
    assert {p: os.path.getmtime(os.path.join(d, p)) for d, _, files in os.walk(out) for p in files} == before


def test_read_verbs_read_an_output_served_by_http_without_byte_ranges(tmp_path, capsys):
    """An OUTPUT on an HTTP server that ignores byte ranges (Python's http.server sends the
    whole file): every read verb failed with fsspec's "doesn't appear to support range
    requests", naming no part. Its parts are read whole there: the same rows as read
    locally."""
    from helpers import listing_http_server

    out = tmp_path / "www" / "out"
    write_output(str(out), {"/v/a.mp4": [("circle", 0.9)] * 3, "/v/b.mp4": [("square", 0.8)] * 2})
    with listing_http_server(str(tmp_path / "www")) as base:
        for verb in (["summary"], ["segments"], ["find", "circle"], ["export", "-"]):
            assert cli.main([verb[0], str(out), *verb[1:]]) == 0
            local = capsys.readouterr().out
            assert cli.main([verb[0], f"{base}/out/", *verb[1:]]) == 0, capsys.readouterr().err
            assert capsys.readouterr().out == local and local.strip()
