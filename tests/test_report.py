from rayvid.pipeline import RunResult
from rayvid.report import summary


def test_summary_says_what_happened_and_where():
    r = RunResult("rid", "s3://b/out/", "shapes.keras", videos_listed=3, videos_ok=2, videos_failed=1,
                  frames=200, wall_s=4.0, files=["x"], top_labels=[("circle", 150), ("blank", 50)],
                  plan={"decode_min": 1, "decode_max": 3, "infer_min": 1, "infer_max": 1, "infer_gpus": 0.0})
    text = summary(r)
    assert "3 listed, 0 skipped (already done), 2 ok, 1 failed" in text
    assert "200 (50.0 frames/s end to end)" in text
    assert "s3://b/out/predictions/ (per frame), videos/ (per video); 1 file written" in text
    # by folder: where every video failed, no predictions file (the count said nothing of it)
    r.files = ["s3://b/out/errors/0001.parquet", "s3://b/out/videos/0001.parquet"]
    assert "videos/ (per video); 2 files written (1 in errors/, 1 in videos/)" in summary(r)
    r.files = [f"s3://b/out/{d}/000{k}.parquet" for k in (1, 2) for d in ("predictions", "videos")]
    assert "; 4 files written (2 in predictions/, 2 in videos/)" in summary(r)
    r.files = []
    assert "videos/ (per video); no file written" in summary(r)
    r.files = ["x"]
    assert "s3://b/out/errors/" in text
    assert "circle 75%" in text and "inference 1..1 on CPU" in text
    r.top_labels = [(None, 120), ("circle", 80)]  # a detector's frames with no box have no label
    assert "  labels:  (no label) 60%, circle 40% of frames" in summary(r)
    r.top_labels = [("circle", 150), ("blank", 50)]
    # every video failed: the actors saw end rows only, no frame: no "model busy 0%" line
    r.inference = {"frames": 0, "batches": 1, "actors": 1, "model_busy": 0.0, "waiting": 1.0}
    assert "infer:" not in summary(r)
    r.inference = dict(r.inference, frames=32, model_busy=0.5, waiting=0.25)
    assert "  infer:   model busy 50% of the inference actors' time, waiting for frames 25% (32 frames in 1 batch)" \
        in summary(r)
    r.inference = dict(r.inference, batches=3)
    assert "(32 frames in 3 batches)" in summary(r)
    # sizes as a person reads them: nothing to do is no "0.0 MB" beside others' kB
    assert [report._mb(n) for n in (0, 20_000, 100_000, 2_500_000)] == ["0 bytes", "20.0 kB", "0.1 MB", "2.5 MB"]
    r.plan = dict(r.plan, infer_gpus=1.0)  # Ray gave each inference actor a GPU that TensorFlow did not find
    r.inference["devices"] = ["CPU"]
    assert "inference 1..1, 1 GPU each (but TensorFlow found no GPU: the model ran on the CPU)" in summary(r)
    r.inference["devices"] = ["CPU", "GPU"]
    assert summary(r).rstrip().endswith(
        "1 GPU each (but TensorFlow found no GPU on some actors: the model ran on the CPU there)")
    r.inference["devices"] = ["GPU"]
    assert summary(r).rstrip().endswith("inference 1..1, 1 GPU each")
    r.inference, r.plan = None, dict(r.plan, infer_gpus=0.0)
    assert "storage:" not in text  # nothing read from a remote store
    r.bytes_read, r.bytes_remote = 20_540_000, 19_720_000
    assert "  storage: read 20.5 MB from remote stores (1.04x the 19.7 MB of the remote videos)" in summary(r)
    r.bytes_read, r.bytes_remote = 19_792, 19_000
    assert "  storage: read 19.8 kB from remote stores (1.04x the 19.0 kB of the remote videos)" in summary(r)
    r.output = "ftp://alice:hunter2pw@host/out"  # fsspec takes credentials from the URL
    text = summary(r)
    assert "hunter2pw" not in text and "alice" not in text
    assert "output:  ftp://host/out/predictions/" in text and "record:  ftp://host/out/runs/rid.json" in text


# --- rayvid report OUTPUT DIR -----------------------------------------------------------

import html  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import write_output  # noqa: E402
from PIL import Image  # noqa: E402

from rayvid import cli, query, report  # noqa: E402


def _x(t, duration):
    return report.LEFT + round(t / duration * report.PLOT_W)


def test_timeline_png_puts_each_band_at_its_times(tmp_path):
    """v: circle 0-2 s (score 0.9), square 2-3 s (score 0.5), circle 3-5 s (score 1.0)."""
    out = str(tmp_path / "out")
    frames = [("circle", 0.9)] * 20 + [("square", 0.5)] * 10 + [("circle", 1.0)] * 20
    write_output(out, {"/v/a.mp4": frames, "/v/b.mp4": [("blank", 1.0)] * 10}, fps=10.0)
    assert cli.main(["report", out, str(tmp_path / "rep")]) == 0
    pngs = sorted(os.listdir(tmp_path / "rep" / "timelines"))
    assert len(pngs) == 2
    img = np.asarray(Image.open(tmp_path / "rep" / "timelines" / next(p for p in pngs if p.startswith("a.mp4"))))
    lanes = 2  # circle (40 frames), square (10)
    assert img.shape == (report.TOP + lanes * (report.LANE_H + report.LANE_GAP) + report.BOTTOM,
                         report.LEFT + report.PLOT_W + 10, 3)
    palette = report.colours(["blank", "circle", "square"])  # every label of the output
    lane_y = {"circle": report.TOP + report.LANE_H // 2,
              "square": report.TOP + report.LANE_H + report.LANE_GAP + report.LANE_H // 2}

    def shade(label, score):
        return np.round(255 - (255 - np.array(palette[label], float)) * score)

    for t, label, score in [(0.5, "circle", 0.9), (1.9, "circle", 0.9), (2.1, "square", 0.5),
                            (2.9, "square", 0.5), (3.1, "circle", 1.0), (4.9, "circle", 1.0)]:
        x = _x(t, 5.0)
        np.testing.assert_array_equal(img[lane_y[label], x], shade(label, score), err_msg=f"{label} at {t} s")
        other = "square" if label == "circle" else "circle"
        np.testing.assert_array_equal(img[lane_y[other], x], [240, 240, 240], err_msg=f"{other} at {t} s")
    page = (tmp_path / "rep" / "index.html").read_text()
    assert f'src="timelines/{html.escape(pngs[0])}"' in page and "/v/b.mp4" in page
    assert "circle 80%, square 20%" in page


def test_report_reads_and_writes_s3(tmp_path, s3_endpoint):
    from helpers import BUCKET

    url = f"s3://{BUCKET}/report-out"
    write_output(url, {"s3://b/x.mp4": [("circle", 0.8)] * 5})
    pngs = report.write_report(url, f"s3://{BUCKET}/report")
    from rayvid import storage

    data = storage.read_bytes(f"s3://{BUCKET}/report/{pngs['s3://b/x.mp4']}")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"s3://b/x.mp4" in storage.read_bytes(f"s3://{BUCKET}/report/index.html")


def test_the_last_frames_bar_ends_where_segments_ends_it(tmp_path):
    """The last sampled frame's bar ran one step past the video's end (`--every 7` on a 3 s
    video: the axis went to 3.27 s, every bar squeezed) and a video of one frame drew 1 px;
    both now end where `rayvid segments` ends them: at the video's end, or one frame on."""
    out = str(tmp_path / "out")
    write_output(out, {"/v/long.mp4": [("circle", 1.0)] * 30}, fps=10.0, every=7)  # 3.0 s: frames 0, 7, ..., 28
    write_output(out, {"/v/one.mp4": [("circle", 1.0)]}, fps=10.0, run_id="r2")
    assert cli.main(["report", out, str(tmp_path / "rep")]) == 0
    y = report.TOP + report.LANE_H // 2
    for name, end in [("long", 3.0), ("one", 0.1)]:
        segments = query.segments(out, video=f"/v/{name}.mp4")
        assert segments.column("end_s").to_pylist() == [pytest.approx(end)]
        png = next(p for p in os.listdir(tmp_path / "rep" / "timelines") if p.startswith(name))
        img = np.asarray(Image.open(tmp_path / "rep" / "timelines" / png))
        lane = img[y, report.LEFT : report.LEFT + report.PLOT_W + 10]
        filled = np.flatnonzero((lane != 240).any(axis=1) & (lane != 255).any(axis=1))
        assert (filled[0], filled[-1] + 1) == (0, report.PLOT_W), name  # the whole axis: 0 to the end


def test_the_report_names_http_videos_with_their_query(tmp_path):
    """Two HTTP videos told apart only by a query parameter were two rows of one name."""
    out = str(tmp_path / "out")
    write_output(out, {"http://h/v.mp4?cam=1": [("circle", 0.9)] * 3, "http://h/v.mp4?cam=2": [("square", 0.9)] * 3})
    assert cli.main(["report", out, str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "http://h/v.mp4?cam=1" in page and "http://h/v.mp4?cam=2" in page


def test_a_clip_runs_bars_last_as_long_as_their_clips():
    """A clip run's timelines drew each clip as a frame (a video of one 3-frame clip: a bar of
    0.1 s on a 0.3 s axis; overlapping clips drawn until the next clip's start by the frame
    rule, the last one frame long): each bar now lasts as `rayvid segments` says (end_s)."""
    import pyarrow as pa

    y = report.TOP + report.LANE_H // 2
    one = pa.table({"video_uri": ["/v/three.mp4"], "frame_index": [0], "timestamp_s": [0.0],
                    "label": ["moving"], "score": [1.0], "end_s": [0.3]})
    lane = np.asarray(report.timeline_png(one, 0.3, "t", report.colours(["moving"]), 10.0))[y]
    filled = np.flatnonzero((lane[report.LEFT:] != 240).any(axis=1) & (lane[report.LEFT:] != 255).any(axis=1))
    assert (filled[0], filled[-1] + 1) == (0, report.PLOT_W)
    # --clip-len 4 --clip-stride 2 at 10 fps over 1.0 s: still 0-0.4, moving 0.4-1.0
    overlap = pa.table({"video_uri": ["/v/o.mp4"] * 4, "frame_index": [0, 2, 4, 6], "timestamp_s": [0.0, 0.2, 0.4, 0.6],
                        "label": ["still", "still", "moving", "moving"], "score": [1.0] * 4,
                        "end_s": [0.4, 0.6, 0.8, 1.0]})
    assert [(r["label"], r["start_s"], r["end_s"]) for r in query.label_segments(overlap, gap=0).to_pylist()] == [
        ("still", 0.0, 0.4), ("moving", 0.4, 1.0)]
    img = np.asarray(report.timeline_png(overlap, 1.0, "t", report.colours(["moving", "still"]), 10.0))
    for lane_no, label, (start, end) in [(0, "moving", (0.4, 1.0)), (1, "still", (0.0, 0.4))]:
        row = img[y + lane_no * (report.LANE_H + report.LANE_GAP), report.LEFT:]
        filled = np.flatnonzero((row != 240).any(axis=1) & (row != 255).any(axis=1))
        assert (filled[0], filled[-1] + 1) == (_x(start, 1.0) - report.LEFT, _x(end, 1.0) - report.LEFT), label


def test_a_report_shows_the_first_videos_or_those_matching(tmp_path, capsys):
    """An OUTPUT of many videos (a QA pass: 8,000 short clips, 56 s, 34 MB and a file each;
    a million would be a 300 MB page): the report holds the first --limit videos by
    video_uri (1000 unless told), or those --match picks, and says how many there are."""
    from rayvid.cli import main

    out = str(tmp_path / "out")
    write_output(out, {f"/v/{name}.mp4": [("circle", 0.8)] * 3 for name in ("cam1_a", "cam1_b", "cam2_a", "cam2_b")})
    assert len(report.write_report(out, str(tmp_path / "r0"), limit=10**20)) == 4  # (pyarrow's slice overflowed)
    pngs = report.write_report(out, str(tmp_path / "r1"), limit=3)
    assert sorted(pngs) == ["/v/cam1_a.mp4", "/v/cam1_b.mp4", "/v/cam2_a.mp4"]
    page = (tmp_path / "r1" / "index.html").read_text()
    assert ("3 videos of the 4 in OUTPUT's 4 (the first by video_uri; rayvid report --limit N, or 0 for all), 9 frames"
            in page) and "cam2_b" not in page
    assert sorted(os.listdir(tmp_path / "r1" / "timelines")) == sorted(p.split("/")[1] for p in pngs.values())
    assert main(["report", out, str(tmp_path / "r2"), "--match", "*/cam2_*"]) == 0
    assert "2 timelines" in capsys.readouterr().out
    page = (tmp_path / "r2" / "index.html").read_text()
    assert "2 videos of the 2 matching */cam2_* in OUTPUT's 4, 6 frames" in page and "cam1" not in page
    assert main(["report", out, str(tmp_path / "r3"), "--limit", "0"]) == 0
    assert "4 timelines" in capsys.readouterr().out and "<p>4 videos, 12 frames" in (tmp_path / "r3" / "index.html").read_text()
    assert main(["report", out, str(tmp_path / "r4"), "--limit", "-1"]) == 2
    assert "--limit must be >= 0, got -1" in capsys.readouterr().err


def test_a_report_of_some_videos_reads_only_the_parts_that_hold_them(tmp_path, moto, s3_endpoint):
    """A report of the first --limit videos (or those --match picks) of a large OUTPUT on S3
    reads the other parts' footers only (two GETs each), not their timeline columns: the
    row-group statistics of video_uri say which parts can hold a chosen video."""
    import collections

    from helpers import BUCKET

    url = f"s3://{BUCKET}/report-many"
    names = [f"s3://b/cam{i}.mp4" for i in range(5)]
    write_output(url, {name: [("circle", 0.8)] * 400 + [("square", 0.7)] * 200 for name in names}, rows_per_file=1,
                 embed_dim=512)  # (1.1 MB parts: a footer read does not hold the columns)
    fs, root = query.storage.resolve(url)
    parts = {p.rsplit("/", 1)[-1]: pq_first_video(fs, p) for p in fs.glob(f"{root}/predictions/*.parquet")}
    assert sorted(parts.values()) == names  # a part per video
    gets = collections.defaultdict(int)

    def record(environ):
        if environ["REQUEST_METHOD"] == "GET" and "/report-many/predictions/" in environ["PATH_INFO"]:
            gets[parts[environ["PATH_INFO"].rsplit("/", 1)[-1]]] += 1

    drawn = {}
    for chosen, kwargs in ((names[:2], {"limit": 2}), ([names[3]], {"match": "*/cam3.*"}), (names, {"limit": 0})):
        gets.clear()
        directory = tmp_path / f"r{len(chosen)}"
        with moto.hook(record):
            pngs = report.write_report(url, str(directory), **kwargs)
        assert sorted(pngs) == chosen
        assert {v: n for v, n in gets.items() if v not in chosen} == {v: 2 for v in names if v not in chosen}
        assert all(gets[v] > 2 for v in chosen), gets  # (its footer, then its columns)
        drawn[len(chosen)] = {v: np.asarray(Image.open(directory / rel)) for v, rel in pngs.items()}
    # a timeline drawn from parts read in part is the one drawn from every part (the videos
    # share their labels: one palette)
    for name in names[:2]:
        assert np.array_equal(drawn[2][name], drawn[5][name])
    assert np.array_equal(drawn[1][names[3]], drawn[5][names[3]])


def pq_first_video(fs, path):
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=["video_uri"]).column("video_uri")[0].as_py()


def test_raw_scores_draw_their_bars_in_full_colour():
    """A model whose scores are no probabilities (raw scores, negative here): its bars were
    drawn at intensity 0, white on the lane, nothing to see; now in the label's colour."""
    import pyarrow as pa

    y = report.TOP + report.LANE_H // 2
    preds = pa.table({"video_uri": ["/v/l.mp4"] * 2, "frame_index": [0, 1], "timestamp_s": [0.0, 0.1],
                      "label": ["moving"] * 2, "score": [-974.8, 3.5]})
    palette = report.colours(["moving"])
    row = np.asarray(report.timeline_png(preds, 0.2, "t", palette, 10.0))[y, report.LEFT:report.LEFT + report.PLOT_W]
    assert (row == np.array(palette["moving"], np.uint8)).all()
    half = pa.table({"video_uri": ["/v/p.mp4"], "frame_index": [0], "timestamp_s": [0.0], "label": ["moving"],
                     "score": [0.5]})  # (probabilities: as strong as their score)
    row = np.asarray(report.timeline_png(half, 0.1, "t", palette, 10.0))[y, report.LEFT:report.LEFT + report.PLOT_W]
    assert (row == np.round(255 - (255 - np.array(palette["moving"], np.float64)) * 0.5).astype(np.uint8)).all()


def test_one_rule_for_scores_across_a_reports_timelines(tmp_path):
    """A raw-score model's video whose scores all happen to fall in [0, 1] was drawn
    shaded, its other videos in full colour, one report two readings of one scale: where
    any score shown is no probability, every timeline is in full colour; where all are,
    every one is shaded."""
    out, raw = str(tmp_path / "out"), str(tmp_path / "raw")
    write_output(raw, {"/v/a.mp4": [("moving", 7.5)] * 10, "/v/b.mp4": [("moving", 0.5)] * 10}, fps=10.0)
    write_output(out, {"/v/a.mp4": [("moving", 0.25)] * 10, "/v/b.mp4": [("moving", 0.5)] * 10}, fps=10.0)
    colour = np.array(report.colours(["moving"])["moving"], float)
    for output, expect in [(raw, {"a": colour, "b": colour}),
                           (out, {"a": np.round(255 - (255 - colour) * 0.25), "b": np.round(255 - (255 - colour) * 0.5)})]:
        pngs = report.write_report(output, str(tmp_path / "rep" / os.path.basename(output)))
        for name, want in expect.items():
            img = np.asarray(Image.open(tmp_path / "rep" / os.path.basename(output) / pngs[f"/v/{name}.mp4"]))
            np.testing.assert_array_equal(img[report.TOP + report.LANE_H // 2, _x(0.5, 1.0)], want,
                                          err_msg=f"{output} {name}")
