"""`make bench` runs end to end on a tiny corpus and reports every field BENCHMARKS.md uses.
(Performance itself is measured by `make bench`, never asserted in a timed test.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_writes_every_field(tmp_path, shapes_model):
    out = tmp_path / "results.json"
    skip_model = tmp_path / "work" / "skip" / "model"  # the skip experiment's, as it would train it
    skip_model.mkdir(parents=True)
    for name in ("shapes.keras", "shapes.labels.txt"):
        shutil.copy(shapes_model["dir"] / name, skip_model / name)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--quick", "--json", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["command"].endswith("--workdir " + str(tmp_path / "work"))
    assert res["machine"]["cores"] >= 1 and res["machine"]["ray"]

    quick = res["regimes"]["quick"]
    stages = quick["stages"]
    for stage in ("decode_raw", "decode_rayvid", "infer_ops", "infer_streams", "infer"):
        s = stages[stage]
        assert s["frames"] > 0 and s["frames_per_s"] > 0 and s["cpu_s_per_frame"] > 0, stage
        assert s["peak_rss_mb"], stage  # per process role
    # the limit is set by the cheaper of the two ways to run the model
    cheaper = min(stages["infer_ops"]["cpu_s_per_frame"], stages["infer_streams"]["cpu_s_per_frame"])
    assert stages["infer"]["cpu_s_per_frame"] == cheaper
    assert stages["infer"] == dict(stages["infer_" + stages["infer"]["layout"]], layout=stages["infer"]["layout"])
    limit = res["machine"]["cores"] / (stages["decode_raw"]["cpu_s_per_frame"] + cheaper)
    assert abs(quick["cpu_bound_limit_fps"] - limit) <= 0.1 and quick["decode_stage_vs_raw_decord"] > 0
    assert quick["limit_by"] == "cpu"  # (no --gpus)
    pair = quick["decode_pair"]  # the decode target, side by side in one process: the median round
    assert len(pair["rounds"]) == len(pair["ratios"]) == 2 and quick["decode_stage_vs_raw_decord"] == pair["ratio_median"]
    for r, ratio in zip(pair["rounds"], pair["ratios"]):
        assert abs(r["rayvid"]["frames_per_s"] / r["raw"]["frames_per_s"] - ratio) < 0.01
        assert r["raw"]["cpu_ms_per_frame"] > 0 and r["rayvid"]["cpu_ms_per_frame"] > 0
    assert pair["cpu_ratio_median"] > 0 and quick["decode_stage_vs_raw_decord_separate"] > 0
    # the most any method could do end to end: the model's start-up, then the limit
    assert quick["model_startup_s"] > 0
    for method, r in quick["methods"].items():
        assert 0 < r["best_fps"]["a"] < limit and r["vs_best"]["end_to_end"] > 0, method
    frames = {m: r["archive_a"]["frames"] for m, r in quick["methods"].items()}
    assert sorted(frames) == sorted(["rayvid", "serial", "tf_data", "ray_recipe"])
    assert set(frames.values()) == {60}  # 2 videos x 1 s x 30 fps, every method, every frame
    for method, r in quick["methods"].items():
        a = r["archive_a"]
        assert a["frames_per_s"] > 0 and a["wall_s"] > 0 and a["peak_rss_mb"], method
        assert r["vs_limit"]["end_to_end"] > 0 and "steady" in r["vs_limit"], method
        # --quick runs no archive B: no B rate (it was A's, shown in the B column as if measured)
        assert r["archive_b"] is None and r["end_to_end_fps_b"] is None and r["steady_fps"] is None, method
    for method in ("rayvid", "ray_recipe"):  # Ray's own store stats
        a = quick["methods"][method]["archive_a"]
        assert a["spilled_bytes"] == 0 and a["object_store_peak_mb"] > 0, method
    t = quick["methods"]["rayvid"]["archive_a"]["inference"]
    assert t["frames"] == 60 and 0 < t["model_busy"] <= 1 and t["wait_s"] >= 0
    assert set(quick["rayvid_vs"]) == {"serial", "tf_data", "ray_recipe"}

    mem = res["memory"]
    assert mem["long"]["frames"] == 10 * mem["short"]["frames"] > 0
    assert mem["long"]["total_mb"] > 0 and mem["long_vs_short"] > 0
    sparse = res["sparse"]["gop_30_fixed"]
    assert sparse["all_frames"]["frames"] == 60 and sparse["fps_1"]["frames"] == 2
    assert sparse["keyframes"]["frames"] == 2 and sparse["decord_get_batch_fps_1"]["frames"] == 2
    skip = res["skip"]
    assert skip["frames"] == 60 and 0 < skip["inferred_skip_similar"] < 60
    assert skip["fewer_inferences"] > 1 and 0 < skip["top1_agreement"] <= 1
    threads = res["threads"]["quick"]  # one run each way on the tiny corpus (not HD: 1 thread both)
    for n in ("1", "2"):
        [run] = threads[n]
        assert run["a"]["frames"] == 60 and run["a"]["frames_per_s"] > 0 and run["a"]["decode_threads"] == int(n)
    remote = res["remote"]  # S3 behind a slow link, one run each way on the tiny corpus
    assert remote["mb_per_s_per_connection"] > 0 and remote["videos"] == 2
    for n in ("1", "2"):
        [run] = remote["calls"][n]
        assert run["frames"] == 60 and run["frames_per_s"] > 0 and run["decode_calls"] == int(n)
    remote = res["segments"]  # videos on S3 read through partial copies against whole ones
    seg = remote["segments"]  # one long video in segments, every frame
    assert seg["segments"] == 6 and seg["video_mb"] > 0
    assert remote["calls_per_actor"] == 2  # decode.REMOTE_CALLS_PER_ACTOR: one fetches while one decodes
    for way in ("partial", "whole"):
        [run] = seg["runs"][way]
        assert run["frames"] == 180 and run["wall_s"] > 0, way  # 6 s x 30 fps, each way
    assert seg["read_vs_size"]["whole"] >= 6  # a whole copy per segment
    assert seg["read_vs_size"]["partial"] < 2 and seg["whole_vs_partial_wall"] > 0
    mkv = remote["segments_mkv"]  # the same in Matroska: whole copies, shared or one per segment
    assert mkv["segments"] == 6 and sorted(mkv["runs"]) == ["shared", "whole"]
    assert mkv["runs"]["shared"][0]["frames"] == mkv["runs"]["whole"][0]["frames"] == 180
    assert 1 <= mkv["read_vs_size"]["shared"] <= mkv["read_vs_size"]["whole"] and mkv["read_vs_size"]["whole"] >= 6
    for case in ("segments_fmp4", "segments_fmp4_apart"):  # a fragmented MP4: partial copies, shared whole ones
        fmp4 = remote[case]
        assert sorted(fmp4["runs"]) == ["partial", "shared"] and fmp4["segments"] == 8, case  # 4 s in 0.5 s
        assert fmp4["runs"]["partial"][0]["frames"] == fmp4["runs"]["shared"][0]["frames"] == 120, case
        assert fmp4["read_vs_size"]["partial"] > 0 and fmp4["read_vs_size"]["shared"] >= 1, case
    assert remote["segments_fmp4_apart"]["threads"] == 1 and remote["segments_fmp4"]["threads"] == 2
    assert remote["segments_fmp4_apart"]["read_vs_size"]["shared"] >= 8  # one after another: nothing shared
    for case in ("sparse_keyframes", "sparse_fps_1"):  # one video in one segment, sampled sparsely
        c = remote[case]
        [partial], [whole] = c["runs"]["partial"], c["runs"]["whole"]
        assert c["segments"] == 1 and partial["frames"] == whole["frames"] > 0, case
        assert c["read_vs_size"]["whole"] == 1 and 0 < c["read_vs_size"]["partial"] <= 1, case
    assert remote["sparse_fps_1"]["runs"]["whole"][0]["frames"] == 4  # 4 s at 1 fps
    contention = res["contention"]
    assert sorted(contention) == sorted(f"{m}, {b}" for m in ("ops", "streams")
                                        for b in ("alone", "decoder at nice 0", "decoder at nice 10"))
    for key, row in contention.items():
        assert row["infer_fps"] > 0 and (key.endswith("alone") or row["decoder_fps"] > 0), key
    markdown = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--markdown", str(out)],
        capture_output=True, text=True, check=True).stdout
    assert "slow object store" in markdown and "partial copies against whole ones" in markdown
    assert "side by side in one process, the median of 2 rounds" in markdown
    recorded = subprocess.run(  # results from before the side-by-side measure say how theirs was taken
        [sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--markdown", os.path.join(ROOT, "bench", "results.json")],
        capture_output=True, text=True, check=True).stdout
    assert "of raw decord (the two stages' runs above, in separate processes)." in recorded
    rows = [line for line in markdown.splitlines() if line.startswith("| rayvid |")]
    assert rows and all(row.split(" | ")[2:4] == ["n/a", "n/a"] for row in rows), rows  # B, steady
    assert "None" not in markdown and "(no archive B: a --quick run)" in markdown
    assert "rayvid / baseline: serial: " in markdown and "x end to end (A)" in markdown


def test_with_gpus_the_limit_is_theirs_where_they_infer_less_than_the_cores_feed():
    """The limit with --gpus: the cores' (decode and feeding the GPU, CPU-s per frame), or
    what the GPUs infer where that is less; the most any method can do end to end is held
    to it too (the GPUs infer every frame after the model's start-up)."""
    sys.path.insert(0, ROOT)
    from bench.bench import best_end_to_end_fps, limit_fps

    # 16 cores, 4 ms decode + 1 ms feeding per frame: 3200 frames/s; one GPU inferring 2000
    assert limit_fps(0.004, 0.001, 16, 0, 2000.0) == (3200.0, "cpu")
    assert limit_fps(0.004, 0.001, 16, 1, 2000.0) == (2000.0, "gpu")
    assert limit_fps(0.004, 0.001, 16, 2, 2000.0) == (3200.0, "cpu")  # two GPUs outrun the cores
    # 100000 frames, 10 s start-up: 15 cores decode 150 s of work meanwhile (37500 frames' worth)
    cpu_only = best_end_to_end_fps(100_000, 10.0, 0.004, 0.001, 16)
    assert cpu_only == pytest.approx(100_000 / (10 + (500 - 150) / 16))
    assert best_end_to_end_fps(100_000, 10.0, 0.004, 0.001, 16, gpu_fps=10000.0) == cpu_only  # the cores are slower
    # (the frames decoded during the start-up still wait for the GPU: at 4000 frames/s, over
    # the cores' 3200, it takes 25 s after the start-up to the cores' 21.9)
    assert best_end_to_end_fps(100_000, 10.0, 0.004, 0.001, 16, gpu_fps=4000.0) == pytest.approx(100_000 / 35)
    assert best_end_to_end_fps(100_000, 10.0, 0.004, 0.001, 16, gpu_fps=2000.0) == pytest.approx(100_000 / 60)


def test_gpu_ceilings_measures_model_and_decode(tmp_path):
    """bench/gpu_ceilings.py on a CPU (TensorFlow's Keras here), one tiny configuration:
    every row it prints is in its JSON, and the decode CPUs per GPU are the product of the
    two measured numbers (rayvid's decode stage, its child process's CPU counted)."""
    sys.path.insert(0, ROOT)
    from bench.bench import encode

    video = encode(str(tmp_path / "v.mp4"), 1, 120, 160, 30, seed=0)
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_ceilings.py"), "--videos", video,
         "--models", "mobilenet_v3_small", "--precisions", "float32", "--batches", "4",
         "--seconds", "0.2", "--procs", "1", "2", "--decoders", "raw", "rayvid", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["machine"]["backend"] == "tensorflow" and res["machine"]["devices"]
    assert [(d["decoder"], d["procs"], d["height"], d["width"], d["video_frames"]) for d in res["decode"]] == \
        [(decoder, n, 120, 160, 30) for decoder in ("raw", "rayvid") for n in (1, 2)]
    for d in res["decode"]:  # whole passes over the 30-frame video, in every process
        assert d["frames"] % 30 == 0 and d["frames"] >= 30 * d["procs"] and d["cpu_ms_per_frame"] > 0
    assert [(m["batch"], m["streams"]) for m in res["model"]] == [(4, 1), (4, 2)]
    assert all(m["frames"] % 4 == 0 and m["frames_per_s"] > 0 for m in res["model"])
    [row] = res["decode_cpus_per_gpu"]
    best = max(m["frames_per_s"] for m in res["model"])
    loaded = res["decode"][3]  # rayvid's, in two processes at once
    assert row["decoder"] == "rayvid" and row["decode_cpu_ms_per_frame"] == loaded["cpu_ms_per_frame"]
    assert row["model_frames_per_s"] == best
    assert row["decode_cpus"] == round(best * row["decode_cpu_ms_per_frame"] / 1000, 2)
    assert f"{row['decode_cpus']} decode CPUs" in proc.stdout


def test_decode_split_prints_every_way(tmp_path):
    """bench/decode_split.py: each way, each round, frames counted in whole passes."""
    sys.path.insert(0, ROOT)
    from bench.bench import encode

    video = encode(str(tmp_path / "v.mp4"), 1, 120, 160, 30, seed=0)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "decode_split.py"), video, "0.1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split("  ")[0].split(" ", 1)[1].strip() for line in lines] == \
        ["raw decord", "reader in this process", "Decoder: here | child", "probe alone"] * 2
    for line in lines:
        frames = int(line.split("frames")[1].split()[0])
        assert frames > 0 and frames % 30 == 0, line
    child = [line for line in lines if "Decoder" in line]
    assert all(float(line.split("children")[1].split()[0]) > 0 for line in child)  # decoded in the child


def test_bench_refuses_bad_arguments_before_any_work_and_reencodes_stale_videos(tmp_path):
    """Unknown names, a --json that cannot be written, --cores 0, a non-results --markdown file:
    each was a traceback (exit 1), the --json path only after the whole run (its results lost);
    unknown --experiments were passed over (exit 0, nothing measured). Now exit 2 at once. A
    kept --workdir's video is reused only where the same command made it, whole (a --quick
    video of the same name was measured by a full run; one cut short failed every rerun)."""
    bench = os.path.join(ROOT, "bench", "bench.py")
    (tmp_path / "notes.txt").write_text("not json")
    for args, said in ((["--regimes", "bogus"], "--regimes: unknown bogus (known: mobilenet, resnet50, 1080p)"),
                       (["--experiments", "memory,memry"], "--experiments: unknown memry"),
                       (["--quick", "--regimes", "1080p"], "--quick runs its own tiny regime: leave out --regimes"),
                       (["--cores", "0"], "--cores must be >= 1"),
                       (["--json", str(tmp_path / "no" / "r.json")], "not a file that can be written"),
                       (["--markdown", str(tmp_path / "notes.txt")], "not a results file of this bench")):
        done = subprocess.run([sys.executable, bench, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and said in done.stderr.splitlines()[-1], (args, done.stderr[-2000:])
    sys.path.insert(0, ROOT)
    from bench.bench import encode

    path = str(tmp_path / "v.mp4")
    encode(path, 1, 48, 64, 10, seed=0)
    first = os.stat(path).st_mtime_ns
    assert encode(path, 1, 48, 64, 10, seed=0) == path and os.stat(path).st_mtime_ns == first  # reused
    encode(path, 2, 48, 64, 10, seed=0)  # the same name, another video: made again
    import av

    with av.open(path) as c:
        assert c.streams.video[0].frames == 20
    with open(path, "r+b") as f:  # cut short, its command file gone with it (a Ctrl-C mid-encode)
        f.truncate(100)
    os.remove(path + ".cmd")
    encode(path, 2, 48, 64, 10, seed=0)
    with av.open(path) as c:
        assert c.streams.video[0].frames == 20
