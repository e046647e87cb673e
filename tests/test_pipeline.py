"""Round trips of the whole job on a real local Ray: generated videos whose content is known
go in (from a local folder, from moto's S3 and from a GCS emulator), Parquet comes out and is compared exactly."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from helpers import (FAKE_KEY_ID, frames_per_video, ftp_server, http_server, parent, processes, pts_of, read_output,
                     upload_tree, write_output)
from rayvid import commit, pipeline, query, schema
from rayvid.config import DecodeConfig, InferConfig, ModelConfig, RunConfig, SamplingConfig
from rayvid.errors import InputError, ModelError, StorageError, StorageUnavailable


def _cfg(inp, out, model_path, **kw) -> RunConfig:
    return RunConfig(input=inp, output=out, model=ModelConfig(name=model_path), progress=False, **kw)


@pytest.fixture(scope="module")
def corpus(media, tmp_path_factory):
    """The session's videos plus a zero-byte file and a text file named .mp4."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(media["videos"], root, dirs_exist_ok=True)
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    truth = {str(root / os.path.relpath(p, media["videos"])): v for p, v in media["truth"].items()}
    return {"dir": root, "truth": truth}


def _check_round_trip(predictions: pa.Table, truth: dict, uri_of) -> None:
    assert predictions.schema.equals(schema.PREDICTIONS_SCHEMA, check_metadata=False), predictions.schema
    by_video = {}
    for row in predictions.select(["video_uri", "frame_index", "timestamp_s", "label"]).to_pylist():
        by_video.setdefault(row["video_uri"], []).append(row)
    assert sorted(by_video) == sorted(uri_of(p) for p in truth)
    for local_path, labels in truth.items():
        rows = sorted(by_video[uri_of(local_path)], key=lambda r: r["frame_index"])
        idx = [r["frame_index"] for r in rows]
        assert idx == list(range(len(labels))), f"{local_path}: frame_index {idx[:5]}... for {len(labels)} frames"
        ts = np.array([r["timestamp_s"] for r in rows])
        assert np.all(np.diff(ts) > 0), f"{local_path}: timestamps not strictly increasing"
        np.testing.assert_allclose(ts, pts_of(local_path), rtol=0, atol=1e-9, err_msg=local_path)
        got = [r["label"] for r in rows]
        agree = np.mean([g == t for g, t in zip(got, labels)])
        assert agree >= 0.97, f"{local_path}: only {agree:.1%} of frames labelled as generated"


def test_local_round_trip(ray_session, corpus, shapes_model, tmp_path):
    out = str(tmp_path / "out")
    result = pipeline.run(_cfg(str(corpus["dir"]), out, shapes_model["path"], run_id="local-1"))

    assert (result.videos_listed, result.videos_ok, result.videos_failed) == (5, 3, 2)
    assert result.plan["infer_gpus"] == 1.0  # the session's logical GPU: the GPU path ran
    assert result.plan["decode_calls"] == 1  # local videos: nothing to fetch ahead
    preds = read_output(out)
    _check_round_trip(preds, corpus["truth"], uri_of=lambda p: p)
    assert set(preds.column("model").to_pylist()) == {shapes_model["path"]}
    assert set(preds.column("run_id").to_pylist()) == {"local-1"}
    assert result.frames == len(preds)

    # top-k: sorted scores, labels from the sibling labels file, top-1 == label/score
    row = preds.slice(0, 1).to_pylist()[0]
    scores = [t["score"] for t in row["topk"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5
    assert row["topk"][0]["label"] == row["label"] and row["topk"][0]["score"] == row["score"]

    errors = read_output(out, "errors")
    assert errors.schema.equals(schema.ERRORS_SCHEMA, check_metadata=False)
    by_uri = {r["video_uri"]: r for r in errors.to_pylist()}
    assert sorted(by_uri) == sorted([str(corpus["dir"] / "empty.mp4"), str(corpus["dir"] / "text.mp4")])
    assert "empty file (0 bytes)" in by_uri[str(corpus["dir"] / "empty.mp4")]["message"]
    assert "cannot open video" in by_uri[str(corpus["dir"] / "text.mp4")]["message"]
    assert {r["stage"] for r in by_uri.values()} == {"decode"}

    videos = read_output(out, "videos")
    assert videos.schema.equals(schema.VIDEOS_SCHEMA, check_metadata=False)
    v = {r["video_uri"]: r for r in videos.to_pylist()}
    assert len(v) == 5 and sum(r["error"] for r in v.values()) == 2
    clip = v[next(p for p in corpus["truth"] if p.endswith("a_clip.mp4"))]
    assert (clip["codec"], clip["decoder"], clip["width"], clip["height"]) == ("h264", "decord", 160, 120)
    assert clip["frames"] == 30 and abs(clip["duration_s"] - 2.0) < 1e-6 and clip["fps"] == 15.0
    assert abs(sum(t["share"] for t in clip["top_labels"]) - 1) < 1e-5

    record = json.loads((tmp_path / "out" / "runs" / "local-1.json").read_text())
    assert record["status"] == "finished"
    assert record["config"]["input"] == str(corpus["dir"])
    assert record["stats"]["frames"] == len(preds) and record["stats"]["videos_failed"] == 2

    # DuckDB reads the contract's types with no casts
    types = dict(
        duckdb.sql(
            f"select column_name, column_type from (describe select * from read_parquet('{out}/predictions/**/*.parquet'))"
        ).fetchall()
    )
    assert types == {
        "video_uri": "VARCHAR",
        "frame_index": "BIGINT",
        "timestamp_s": "DOUBLE",
        "label": "VARCHAR",
        "score": "FLOAT",
        "topk": 'STRUCT(class_id INTEGER, "label" VARCHAR, score FLOAT)[]',
        "reused_from": "BIGINT",
        "model": "VARCHAR",
        "run_id": "VARCHAR",
    }
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/predictions/**/*.parquet')").fetchall()[0][0]
    assert n == sum(len(v) for v in corpus["truth"].values())


def test_object_store_round_trip(ray_session, corpus, shapes_model, store, request):
    """Same job, input, model and output all on S3 (moto on 127.0.0.1, through s3fs) or on
    GCS (gcp-storage-emulator on 127.0.0.1, through gcsfs); a rerun finds every video
    committed (the failed ones too: they are tried again only with --retry-failed) and
    decodes nothing. On GCS a listed video's copy asks no metadata: its GETs carry
    `ifGenerationMatch` (S3's If-Match: test_hostile_object_keys_never_steer_where_rayvid_writes)."""
    client, bucket = store
    scheme = bucket.split("://")[0]
    prefix = f"{bucket}/in-rt/"
    upload_tree(client, corpus["dir"], prefix)
    model_url = f"{bucket}/models/shapes.keras"
    client.put_file(shapes_model["path"], model_url)
    client.put_file(shapes_model["labels"], f"{bucket}/models/shapes.labels.txt")
    out = f"{bucket}/out-rt"

    cpu_only = InferConfig(gpus_per_actor=0.0)
    cfg = _cfg(prefix, out, model_url, run_id=f"{scheme}-1", infer=cpu_only)
    with request.getfixturevalue("gcs").requests() if scheme == "gs" else contextlib.nullcontext() as seen:
        result = pipeline.run(cfg)
    if scheme == "gs":
        videos = {os.path.relpath(p, corpus["dir"]).replace(os.sep, "/") for p in glob.glob(str(corpus["dir"] / "**"), recursive=True)
                  if p.lower().endswith((".mp4", ".mkv")) and os.path.getsize(p) > 0}  # (an empty object is asked: no range to read)
        read = {(kind, name.removeprefix("in-rt/")) for kind, name in seen if name.startswith("in-rt/")}
        assert {name for kind, name in read if kind == "media if"} == videos, seen  # each GET on its generation
        assert not {name for kind, name in read if kind != "media if"} & videos, seen  # and nothing else

    assert (result.videos_ok, result.videos_failed) == (3, 2)
    assert result.plan["infer_gpus"] == 0.0  # inference actors on CPU
    assert result.plan["decode_threads"] == 2  # so decoders share the cores on two threads
    assert result.plan["decode_calls"] == 2  # remote videos: each decoder fetches the next meanwhile

    def uri_of(local_path):
        return prefix + os.path.relpath(local_path, corpus["dir"]).replace(os.sep, "/")

    preds = read_output(out)
    _check_round_trip(preds, corpus["truth"], uri_of)
    assert set(preds.column("model").to_pylist()) == {model_url}
    errors = read_output(out, "errors")
    assert sorted(errors.column("video_uri").to_pylist()) == [uri_of(str(corpus["dir"] / n)) for n in ("empty.mp4", "text.mp4")]
    client.invalidate_cache()
    assert client.exists(f"{out}/runs/{scheme}-1.json")

    again = pipeline.run(dataclasses.replace(cfg, run_id=f"{scheme}-2"))
    assert (again.videos_ok, again.videos_failed, again.videos_skipped) == (0, 0, 5)
    assert read_output(out).num_rows == preds.num_rows


def test_presigned_urls_are_read_but_their_signatures_never_written(ray_session, corpus, shapes_model, tmp_path):
    """A manifest of presigned HTTPS-style URLs (served here by a real HTTP server on
    127.0.0.1 that serves byte ranges): every video is read through its signed URL, the
    output names it without the signature, nothing written holds the signature or the key
    id, and the same manifest signed again is the same videos (the rerun skips them all)."""
    import urllib.parse

    import pyarrow.parquet as pq

    names = sorted(os.path.relpath(p, corpus["dir"]) for p in [*corpus["truth"], corpus["dir"] / "empty.mp4",
                                                                corpus["dir"] / "text.mp4"])
    out = str(tmp_path / "out")
    with http_server(str(corpus["dir"]), "ranges") as base:
        def manifest(signature: str) -> str:
            path = tmp_path / f"signed-{signature[:1]}.txt"
            path.write_text("".join(
                f"{base}/{urllib.parse.quote(n)}?id={k}&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential="
                f"{FAKE_KEY_ID}%2F20261130%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261130T000000Z"
                f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={signature}\n"
                for k, n in enumerate(names)))
            return str(path)

        first = pipeline.run(_cfg(manifest("5ec7e75191a7" * 4), out, shapes_model["path"], run_id="signed-1"))
        assert (first.videos_ok, first.videos_failed) == (3, 2)
        stored = {n: f"{base}/{urllib.parse.quote(n)}?id={k}" for k, n in enumerate(names)}
        _check_round_trip(read_output(out), corpus["truth"], lambda p: stored[os.path.relpath(p, corpus["dir"])])
        assert sorted(read_output(out, "errors").column("video_uri").to_pylist()) == [stored["empty.mp4"],
                                                                                     stored["text.mp4"]]
        again = pipeline.run(_cfg(manifest("a9a1b7c3d2e0" * 4), out, shapes_model["path"], run_id="signed-2"))
        assert (again.videos_listed, again.videos_skipped, again.frames) == (5, 5, 0)
    for dirpath, _, files in os.walk(out):
        for name in files:
            data = open(os.path.join(dirpath, name), "rb").read()
            assert not any(s in data for s in (b"5ec7e75191a7", b"a9a1b7c3d2e0", FAKE_KEY_ID.encode(), b"X-Amz")), name
            if name.endswith(".parquet"):
                for col in pq.read_table(os.path.join(dirpath, name)).columns:
                    assert not any("X-Amz" in str(v) or FAKE_KEY_ID in str(v) for v in col.to_pylist()), name


def test_an_ftp_folder_with_a_login_end_to_end(ray_session, corpus, shapes_model, tmp_path):
    """An FTP server's folder, the login in INPUT's URL: every video read from the server
    (fsspec names them `ftp:///path`: rayvid names them by their server again), the output
    names them without the login, nothing written holds the password."""
    out = str(tmp_path / "out")
    with ftp_server(str(corpus["dir"]), "alice", "pw5ec7e751") as port:
        result = pipeline.run(_cfg(f"ftp://alice:pw5ec7e751@127.0.0.1:{port}/", out, shapes_model["path"],
                                   run_id="ftp-1"))
    assert (result.videos_ok, result.videos_failed) == (3, 2)
    _check_round_trip(read_output(out), corpus["truth"],
                      lambda p: f"ftp://127.0.0.1:{port}/" + os.path.relpath(p, corpus["dir"]).replace(os.sep, "/"))
    for dirpath, _, files in os.walk(out):
        for name in files:
            assert b"pw5ec7e751" not in open(os.path.join(dirpath, name), "rb").read(), name


def test_sampling_every_and_fps(ray_session, media, shapes_model, tmp_path):
    path = next(p for p in media["truth"] if p.endswith("a_clip.mp4"))
    n = len(media["truth"][path])
    pts = pts_of(path)

    every = read_output_after(pipeline.run(_cfg(path, str(tmp_path / "e"), shapes_model["path"],
                                                 sampling=SamplingConfig(every=4))))
    assert every.column("frame_index").to_pylist() == list(range(0, n, 4))

    fps = 4.0
    got = read_output_after(pipeline.run(_cfg(path, str(tmp_path / "f"), shapes_model["path"],
                                               sampling=SamplingConfig(fps=fps))))
    targets = np.arange(0, int(pts[-1] * fps) + 1) / fps
    want = sorted({int(np.argmin(np.abs(pts - t))) for t in targets})
    assert got.column("frame_index").to_pylist() == want
    np.testing.assert_allclose(got.column("timestamp_s").to_numpy(), pts[want], atol=1e-9)


def read_output_after(result):
    return read_output(result.output).sort_by("frame_index")


def test_bad_model_url_fails_before_decoding(ray_session, media, tmp_path):
    with pytest.raises(ModelError, match="model not found: /nonexistent/model.keras"):
        pipeline.run(_cfg(str(media["videos"]), str(tmp_path / "o"), "/nonexistent/model.keras"))
    with pytest.raises(ModelError, match="model not found: s3://rayvid-test/missing.keras"):
        pipeline.run(_cfg(str(media["videos"]), str(tmp_path / "o"), "s3://rayvid-test/missing.keras"))
    assert not (tmp_path / "o").exists()


def test_a_worker_that_cannot_start_to_load_the_model_is_one_line(ray_session, media, tmp_path):
    """The model loads first in a Ray task where only loading tells its input shape (a
    SavedModel). Where the job's runtime env cannot be set up for it (as `ray job submit
    --runtime-env` with a working_dir that cannot be fetched) that was Ray's traceback, exit
    1: exit 2, one line, with the reason (a traceback's last line)."""
    (tmp_path / "saved_model").mkdir()
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
               RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps({"runtime_env": {"working_dir": "http://127.0.0.1:9/code.zip"}}))
    done = subprocess.run([sys.executable, "-m", "rayvid", "run", str(media["videos"]), str(tmp_path / "o"),
                           "--model", str(tmp_path / "saved_model"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    said = [line for line in done.stderr.splitlines() if line.startswith("rayvid: ")]
    # (the raylet's own log of the agent's failure may reach the driver first, each line "(raylet)": Ray's)
    ours = [line for line in done.stderr.splitlines() if "(raylet)" not in line]
    assert done.returncode == 2 and not any("Traceback" in line for line in ours), done.stderr[-3000:]
    assert len(said) == 1 and said[0].startswith(
        f"rayvid: error: cannot load model {tmp_path / 'saved_model'}: the Ray worker loading it failed: "
        "RuntimeEnvSetupError: Failed to set up runtime environment. requests.exceptions.ConnectionError: "), said
    assert "/code.zip" in said[0] and said[0].endswith("Connection refused\"))"), said
    assert not (tmp_path / "o" / "predictions").exists()


def test_a_rerun_with_another_model_output_is_told_its_settings_differ():
    """What a rerun compares with the runs that committed the videos it skips: --model-output
    decides the labels as the model and weights do (a rerun naming another said nothing);
    a record from before the flag (no key) is a run without it."""
    old = {"model": {"name": "/m/two.keras", "weights": None}, "sampling": {"every": 1}}
    picked = {"model": {"name": "/m/two.keras", "weights": None, "output": "probs"}, "sampling": {"every": 1}}
    assert pipeline._settings(picked) != pipeline._settings(dict(picked, model=dict(picked["model"], output="logits")))
    assert pipeline._settings(old) == pipeline._settings(dict(old, model=dict(old["model"], output=None)))
    assert pipeline._settings(old) != pipeline._settings(picked)


def test_unwritable_output_is_a_clear_error(ray_session, media, shapes_model):
    with pytest.raises(StorageError, match="OUTPUT s3://no-such-bucket/out"):
        pipeline.run(_cfg(str(media["videos"]), "s3://no-such-bucket/out", shapes_model["path"]))


def test_missing_input_is_a_clear_error(ray_session, tmp_path, shapes_model):
    with pytest.raises(InputError, match="input not found"):
        pipeline.run(_cfg(str(tmp_path / "nope"), str(tmp_path / "o"), shapes_model["path"]))
    with pytest.raises(InputError, match="input not found: s3://rayvid-test/no/such/prefix"):
        pipeline.run(_cfg("s3://rayvid-test/no/such/prefix", str(tmp_path / "o"), shapes_model["path"]))


def test_results_hands_over_each_block_as_soon_as_it_exists(ray_session, tmp_path):
    """The driver takes a finished video's rows while later ones are still running (so it
    commits them): here every block but the first waits until the driver holds the first.
    Reading ahead would wait for those blocks first: a deadlock, broken by their timeout."""
    gate = tmp_path / "the driver holds a block"

    def work(batch):
        if batch["id"][0] != 0:
            deadline = time.monotonic() + 20
            while not gate.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the driver did not take the first block while later ones ran")
                time.sleep(0.05)
        return batch

    ds = ray_session.data.range(6, override_num_blocks=6).map_batches(work, batch_size=None)
    seen = []
    for block in pipeline.results(ds):
        seen += block.column("id").to_pylist()
        gate.touch()
    assert sorted(seen) == list(range(6))


def test_frame_exact_harness_through_the_job(ray_session, matrix, code_reader, tmp_path):
    """Every matrix video through the whole job with the code-reading model: the label of
    every row is the index its frame shows, and it equals frame_index."""
    import framecode

    src = tmp_path / "in"
    src.mkdir()
    for name, (path, _) in matrix.items():
        os.symlink(path, src / name)
    out = str(tmp_path / "out")
    result = pipeline.run(_cfg(str(src), out, code_reader, run_id="exact"))
    assert result.videos_failed == 0, read_output(out, "errors").to_pylist()
    preds = read_output(out)
    mismatches = [(r["video_uri"], r["frame_index"], r["label"]) for r in
                  preds.select(["video_uri", "frame_index", "label"]).to_pylist()
                  if r["label"] != str(r["frame_index"])]
    assert not mismatches, f"(file, frame, read): {mismatches[:10]}"
    assert preds.num_rows == sum(n for _, n in matrix.values())
    for name, (path, n) in matrix.items():
        ts = preds.filter(pa.compute.equal(preds["video_uri"], str(src / name))).sort_by("frame_index")
        np.testing.assert_allclose(ts["timestamp_s"].to_numpy(), pts_of(path), atol=1e-3, rtol=0, err_msg=name)
    videos = {r["video_uri"]: r for r in read_output(out, "videos").to_pylist()}
    for name, (path, n) in matrix.items():
        v = videos[str(src / name)]
        assert v["frames"] == n and not v["error"]
        assert v["decoder"].split(" ")[0] == framecode.EXPECTED_DECODER.get(name, "decord"), (name, v["decoder"])


def test_keyframes_mode_through_the_job(ray_session, matrix, code_reader, tmp_path):
    path, _ = matrix["hevc_opengop.mp4"]
    got = read_output_after(pipeline.run(_cfg(path, str(tmp_path / "k"), code_reader,
                                               sampling=SamplingConfig(keyframes=True))))
    idx = got.column("frame_index").to_pylist()
    assert idx == [0, 20, 40] and got.column("label").to_pylist() == [str(i) for i in idx]


def test_parity_with_model_predict_on_a_keras_application(ray_session, media, tmp_path):
    """float32: the job's top-1 equals model.predict on the same decoded RGB frames, with a
    real keras.applications architecture (MobileNetV3Small; seeded weights, no download)."""
    import keras

    from rayvid import models
    from rayvid.decode import Decoder

    keras.utils.set_random_seed(0)
    size = (96, 96)
    net = keras.applications.MobileNetV3Small(weights=None, input_shape=(*size, 3), classifier_activation=None)
    weights = str(tmp_path / "mnv3.weights.h5")
    net.save_weights(weights)
    model_cfg = ModelConfig(name="mobilenet_v3_small", weights=weights, input_size=size)
    out = str(tmp_path / "out")
    pipeline.run(RunConfig(input=str(media["videos"]), output=out, model=model_cfg, progress=False))
    job = {(r["video_uri"], r["frame_index"]): r["topk"][0]["class_id"] for r in read_output(out).to_pylist()}

    reference, _ = models.load(model_cfg)
    same = total = 0
    for path in media["truth"]:
        frames = [b for b in Decoder(size=size).decode_video(path) if b["kind"][0] == "frame"]
        x = np.concatenate([b["frame"] for b in frames]).astype("float32")
        idx = np.concatenate([b["frame_index"] for b in frames])
        top1 = reference.predict(x, verbose=0).argmax(1)
        same += sum(job[(path, int(i))] == int(t) for i, t in zip(idx, top1))
        total += len(idx)
    assert total == len(job) and same / total >= 0.999, f"{same}/{total} top-1 agree"


def test_a_binary_sigmoid_classifier_labels_each_frame_by_its_probability(ray_session, media, tmp_path):
    """A one-unit sigmoid model (p = sigmoid of the frame's mean red minus mean green) with a
    labels file naming its positive class: each frame's row is that class where p > 0.5,
    else "not" it, its score the larger of p and 1 - p, as the model computes it on the same
    decoded frames; top-k holds both."""
    import keras

    from rayvid.decode import Decoder

    inp = keras.Input((16, 16, 3))
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inp, dense(keras.layers.GlobalAveragePooling2D()(inp)))
    dense.set_weights([np.array([[0.05], [-0.05], [0.0]], "float32"), np.zeros(1, "float32")])
    name = str(tmp_path / "reddish.keras")
    model.save(name)
    (tmp_path / "reddish.labels.txt").write_text("reddish\n")
    out = str(tmp_path / "out")
    pipeline.run(RunConfig(input=str(media["videos"]), output=out, model=ModelConfig(name=name), progress=False))
    rows = {(r["video_uri"], r["frame_index"]): r for r in read_output(out).to_pylist()}
    seen = set()
    for path in media["truth"]:
        frames = [b for b in Decoder(size=(16, 16)).decode_video(path) if b["kind"][0] == "frame"]
        p = model.predict(np.concatenate([b["frame"] for b in frames]).astype("float32"), verbose=0)[:, 0]
        for i, q in zip(np.concatenate([b["frame_index"] for b in frames]), p):
            row = rows.pop((path, int(i)))
            assert row["label"] == ("reddish" if q > 0.5 else "not reddish"), (path, i, q)  # (a tie: not)
            assert abs(row["score"] - max(q, 1 - q)) < 1e-5 and len(row["topk"]) == 2
            seen.add(row["label"])
    assert not rows and seen == {"reddish", "not reddish"}  # (the sample scenes: both)


def test_a_dry_run_says_what_a_run_would_do_and_writes_nothing(ray_session, media, shapes_model, tmp_path, capsys):
    """`rayvid run --dry-run`: INPUT listed, OUTPUT read, the model's shape and the pools
    planned, and what the run would do printed (videos to do, their bytes, segments),
    nothing written: no OUTPUT where there was none; after a run, with a video added, the
    one new video to do and OUTPUT byte for byte as it was; with another live run over the
    same INPUT begun first, exit 2 as a run would stop."""
    from rayvid import models, report
    from rayvid.cli import main

    videos = tmp_path / "in"
    shutil.copytree(media["videos"], videos)
    out = tmp_path / "out"
    args = ["run", str(videos), str(out), "--model", shapes_model["path"], "--no-progress"]
    h, w = models.static_shape(ModelConfig(name=shapes_model["path"])).input_size
    listed = sorted(str(videos / os.path.relpath(p, media["videos"])) for p in media["truth"])
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists(), os.listdir(out)
    size = sum(os.path.getsize(p) for p in listed)
    assert text.splitlines()[:5] == [
        "rayvid run --dry-run: 3 videos to do, nothing written",
        "  videos:  3 listed, 0 skipped (already done), 3 to do",
        f"  input:   {report._mb(size)} in the videos to do; 3 segments to decode",
        f"  model:   {shapes_model['path']}, frames at {h}x{w}",
        f"  output:  {out}/ (nothing written; a run would resume into it)"], text
    assert text.splitlines()[5].startswith("  actors:  decode 1..")
    assert main(args) == 0
    capsys.readouterr()
    shutil.copy(listed[0], videos / "new.mp4")

    def tree():
        return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, files in os.walk(out) for f in files}

    before = tree()
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert tree() == before
    assert text.splitlines()[:3] == [
        "rayvid run --dry-run: 1 video to do, nothing written",
        "  videos:  4 listed, 3 skipped (already done), 1 to do",
        f"  input:   {report._mb(os.path.getsize(listed[0]))} in the videos to do; 1 segment to decode"], text
    # a head OUTPUT's predictions lack (--embed), or lack what they have: the dry run says
    # what the run would stop with, and the run stops so before decoding anything
    for extra in (["--embed"], ["--embed", "--dry-run"]):
        assert main([*args, *extra]) == 2, extra
        said = capsys.readouterr().err
        assert "holds predictions with head columns [none] (part part-" in said, said
        assert "this run's are [embedding]: write it into another OUTPUT" in said, said
        assert tree() == before
    # another live run over the same INPUT, begun first: the dry run says what a run would
    beat = commit.Heartbeat(str(out), "rival", {"run_id": "rival", "status": "running",
                                                "started_at": "2026-01-01T00:00:00Z", "config": {"input": str(videos)}},
                            every_s=60)
    beat.start()
    try:
        assert main([*args, "--dry-run"]) == 2
    finally:
        beat.stop()
    assert "run rival (host" in capsys.readouterr().err


@pytest.mark.parametrize("meanwhile", ["another run", "another run, --retry-failed", "a compaction"])
def test_what_was_committed_while_a_run_planned_is_not_committed_again(ray_session, media, shapes_model, tmp_path,
                                                                       monkeypatch, meanwhile):
    """Run A reads OUTPUT, then plans (headers, the model: minutes over a large INPUT); run B,
    over the same INPUT, commits every video and ends meanwhile; A's record and check then
    find no live rival, and A committed every video again (a reviewer's find). Now the
    videos/ parts that appeared since A's read are read: their videos leave A's work, and
    one A still does (failed, with --retry-failed) has B's row retracted, as a compaction's
    part holding a changed video A does again (its first read knew the parts merged): every
    frame and every video once."""
    from rayvid import cli

    src = tmp_path / "in"
    shutil.copytree(media["videos"], src)
    out = str(tmp_path / "out")
    frames = {str(src / os.path.relpath(p, media["videos"])): len(t) for p, t in media["truth"].items()}
    broken = [] if meanwhile == "a compaction" else [str(src / "broken.mp4")]
    for uri in broken:
        open(uri, "wb").write(b"\x00" * 64)
    n = len(frames) + len(broken)
    if meanwhile == "a compaction":  # every video committed before, a part each; then one changes
        write_output(out, {uri: [("circle", 0.9)] * k for uri, k in frames.items()}, run_id="first",
                     rows_per_file=1, listed=True)
        changed, other = sorted(frames)[:2]
        shutil.copy(other, changed)  # A does it again
        frames[changed] = frames[other]
    plan_work = pipeline._plan_work
    done: list = []

    def then_the_other(*args, **kwargs):
        work = plan_work(*args, **kwargs)
        if not done:  # (B's own planning: as it is)
            done.append(None)
            done[0] = cli.main(["compact", out]) if meanwhile == "a compaction" else \
                pipeline.run(_cfg(str(src), out, shapes_model["path"], run_id="b"))
        return work

    monkeypatch.setattr(pipeline, "_plan_work", then_the_other)
    a = pipeline.run(_cfg(str(src), out, shapes_model["path"], run_id="a", retry_failed=meanwhile.endswith("failed")))
    if meanwhile == "a compaction":
        assert done[0] == 0 and (a.videos_ok, a.videos_skipped) == (1, n - 1)
        assert [p.startswith("part-compact-") for p in sorted(os.listdir(f"{out}/videos"))] == [False, True]
    else:
        assert (done[0].videos_ok, done[0].videos_failed, done[0].videos_skipped) == (n - 1, 1, 0)
        assert (a.videos_ok, a.frames) == (0, 0)
        assert (a.videos_failed, a.videos_skipped, a.videos_skipped_failed) == (
            (1, n - 1, 0) if meanwhile.endswith("failed") else (0, n, 1))
    assert frames_per_video(read_output(out)) == {uri: list(range(k)) for uri, k in frames.items()}
    rows = read_output(out, "videos").column("video_uri").to_pylist()
    assert sorted(rows) == sorted([*frames, *broken])  # every video once
    errors = read_output(out, "errors")
    assert (errors.column("video_uri").to_pylist() if errors is not None else []) == broken


def test_rerun_resumes_and_picks_up_new_changed_and_failed_videos(ray_session, media, shapes_model, tmp_path):
    """Same command again: nothing is decoded twice; a new video and a changed video are
    processed, a failed one only with --retry-failed, and no row is ever duplicated."""
    from rayvid import samples

    src = tmp_path / "in"
    shutil.copytree(media["videos"], src)
    (src / "broken.mp4").write_bytes(b"\x00" * 64)
    out = str(tmp_path / "out")

    def run(**kw):
        return pipeline.run(_cfg(str(src), out, shapes_model["path"], **kw))

    def rows_per_video():
        t = read_output(out)
        counts = {}
        for uri, idx in zip(t.column("video_uri").to_pylist(), t.column("frame_index").to_pylist()):
            counts.setdefault(uri, []).append(idx)
        assert all(sorted(v) == list(range(len(v))) for v in counts.values()), "duplicated or missing rows"
        return {u: len(v) for u, v in counts.items()}

    first = run()
    assert (first.videos_ok, first.videos_failed, first.videos_skipped) == (3, 1, 0)
    before = rows_per_video()

    again = run()
    assert (again.videos_ok, again.videos_failed, again.videos_skipped, again.frames) == (0, 0, 4, 0)
    assert rows_per_video() == before

    new = str(src / "new.mp4")
    samples.make_video(new, 1.0, seed=9)
    changed = next(p for p in media["truth"] if p.endswith("c.mkv")).replace(str(media["videos"]), str(src))
    samples.make_video(changed, 2.0, seed=10)  # same name, new content: 30 frames instead of 15
    third = run()
    assert (third.videos_ok, third.videos_failed, third.videos_skipped) == (2, 0, 3)  # broken: skipped
    counts = rows_per_video()
    assert counts[new] == 15 and counts[changed] == 30

    errors_before = read_output(out, "errors")
    (tmp_path / "one.txt").write_text("only\n")
    with pytest.raises(ModelError, match="has 1 entries but the model outputs"):  # its model cannot start:
        pipeline.run(RunConfig(input=str(src), output=out, progress=False, retry_failed=True,
                               model=ModelConfig(name=shapes_model["path"], labels=str(tmp_path / "one.txt"))))
    assert read_output(out, "errors").equals(errors_before) and rows_per_video() == counts  # no change

    fourth = run(retry_failed=True)  # the failed video is tried again (and fails again)
    assert (fourth.videos_ok, fourth.videos_failed, fourth.videos_skipped) == (0, 1, 4)
    assert rows_per_video() == counts
    errors = read_output(out, "errors")
    assert errors.column("video_uri").to_pylist() == [str(src / "broken.mp4")]  # old row retracted
    videos = read_output(out, "videos")
    listed = sorted(set(counts) | {str(src / "broken.mp4")})
    assert sorted(videos.column("video_uri").to_pylist()) == listed  # one row per video, failed or not


def test_a_deleted_predictions_part_is_said_by_readers_and_read_again_by_the_next_run(
        ray_session, media, shapes_model, tmp_path, caplog, capsys):
    """A committed part whose predictions/ file is gone (deleted by hand, or lost) while its
    videos/ rows say they wrote frames: read verbs said "no frames" (exit 0) and a rerun
    skipped those videos as done, their rows gone for good. Readers now say which file is
    missing (exit 2); the next run reads its videos again (retracted, as changed ones),
    with a warning, and every row is back, once."""
    from rayvid import cli

    out = str(tmp_path / "out")
    first = pipeline.run(_cfg(str(media["videos"]), out, shapes_model["path"]))
    before = read_output(out).sort_by([("video_uri", "ascending"), ("frame_index", "ascending")])
    part = sorted(glob.glob(os.path.join(out, "predictions", "part-*.parquet")))[0]
    lost = pq.read_table(part).column("video_uri").unique().to_pylist()
    os.remove(part)
    capsys.readouterr()
    for verb in ("segments", "export", "find"):  # (`summary`, the videos/ table, is as committed)
        argv = [verb, out] + {"export": ["-"], "find": ["circle"]}.get(verb, [])
        assert cli.main(argv) == 2, verb
        said = capsys.readouterr().err
        assert f"{out}/predictions/{os.path.basename(part)} is missing, though its videos/ file says it holds" in said
    with caplog.at_level(logging.WARNING, logger="rayvid"):
        again = pipeline.run(_cfg(str(media["videos"]), out, shapes_model["path"]))
    assert (again.videos_ok, again.videos_skipped) == (len(lost), first.videos_ok - len(lost))
    assert any(f"predictions/{os.path.basename(part)} is missing" in r.getMessage() and "read again" in r.getMessage()
               for r in caplog.records)
    after = read_output(out).sort_by([("video_uri", "ascending"), ("frame_index", "ascending")])
    cols = ["video_uri", "frame_index", "timestamp_s", "label"]
    assert after.select(cols).equals(before.select(cols))
    videos = read_output(out, "videos").column("video_uri").to_pylist()
    assert sorted(videos) == sorted(set(videos)) and len(videos) == first.videos_ok + first.videos_failed
    assert cli.main(["summary", out]) == 0
    # a part committed twice (as two runs at once over one INPUT did): its videos are read
    # again, every copy retracted, their rows once
    part = sorted(glob.glob(os.path.join(out, "videos", "part-*.parquet")))[0]
    twice = pq.read_table(part).column("video_uri").to_pylist()
    for folder in ("predictions", "videos"):
        shutil.copy(os.path.join(out, folder, os.path.basename(part)), os.path.join(out, folder, "part-twice-00000.parquet"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rayvid"):
        third = pipeline.run(_cfg(str(media["videos"]), out, shapes_model["path"]))
    assert (third.videos_ok, third.videos_skipped) == (len(twice), first.videos_ok - len(twice))
    assert any(f"{len(twice)} of the listed videos are committed twice in OUTPUT" in r.getMessage() for r in caplog.records)
    after = read_output(out).sort_by([("video_uri", "ascending"), ("frame_index", "ascending")])
    assert after.select(cols).equals(before.select(cols))


@pytest.mark.parametrize("listed", ["folder", "manifest"])
def test_a_video_rewritten_during_the_run_is_an_error_row_and_the_next_run_redoes_it(
        ray_session, media, shapes_model, tmp_path, listed):
    """One video is written again and again while the job runs (a new modification time
    every 2 ms, as an upload in progress would): its row is an ObjectChanged error, not
    frames of whatever it held at each read; the others are untouched. Once it stops
    changing, the same command redoes it (no --retry-failed): from a folder its listed
    version differs from the one recorded, and from a manifest (which lists no versions,
    so the decoder pins the one it finds first and finds another at the end) the error
    itself says it changed."""
    import threading

    src = tmp_path / "in"
    shutil.copytree(media["videos"], src)
    original = next(p for p in media["truth"] if p.endswith("c.mkv"))
    busy = original.replace(str(media["videos"]), str(src))
    inp = str(src)
    if listed == "manifest":
        inp = str(tmp_path / "videos.txt")
        with open(inp, "w") as f:
            f.write("".join(p.replace(str(media["videos"]), str(src)) + "\n" for p in media["truth"]))
    out = str(tmp_path / "out")
    stop = threading.Event()

    def rewrite():
        t = 1_600_000_000
        while not stop.wait(0.002):
            t += 1
            os.utime(busy, (t, t))

    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    try:
        first = pipeline.run(_cfg(inp, out, shapes_model["path"]))
    finally:
        stop.set()
        writer.join()
    assert (first.videos_ok, first.videos_failed) == (2, 1)
    errors = read_output(out, "errors").to_pylist()
    assert [(e["video_uri"], e["stage"], e["error_type"]) for e in errors] == [(busy, "read", "ObjectChanged")]
    if listed == "folder":
        assert "changed after it was listed" in errors[0]["message"]
    else:  # frames decoded before the end found the change: of either version, none committed
        assert "changed while it was read" in errors[0]["message"] and "kept" not in errors[0]["message"]
    assert errors[0]["message"].endswith("; no frame of it committed: the next run reads it again")
    assert busy not in set(read_output(out).column("video_uri").to_pylist())
    # what the read verbs say of it (render, similar, timeline): the next run redoes it, not --retry-failed
    assert query.missing_video(out, busy).endswith("(errors/ holds why; the next run redoes it)")

    again = pipeline.run(_cfg(inp, out, shapes_model["path"]))
    assert (again.videos_ok, again.videos_failed, again.videos_skipped) == (1, 0, 2)
    assert read_output(out, "errors") is None or read_output(out, "errors").num_rows == 0
    frames = read_output(out).filter(pc.equal(pc.field("video_uri"), busy))
    assert sorted(frames.column("frame_index").to_pylist()) == list(range(len(media["truth"][original])))


@pytest.fixture(scope="module")
def many_videos(media, tmp_path_factory):
    """24 videos (8 copies of the session's three), and the frame indices each must yield."""
    root = tmp_path_factory.mktemp("many")
    for k in range(8):
        shutil.copytree(media["videos"], root / f"copy{k}")
    expected = {str(root / f"copy{k}" / os.path.relpath(p, media["videos"])): list(range(len(v)))
                for k in range(8) for p, v in media["truth"].items()}
    return root, expected


@pytest.mark.parametrize("stage", ["Decoder", "Predictor"])
def test_sigkill_an_actor_mid_run_loses_and_duplicates_nothing(ray_session, many_videos, shapes_model, tmp_path, stage,
                                                               monkeypatch):
    """SIGKILL a decode (or an inference) actor while it works: Ray restarts it and retries
    its task, and the committer keeps each frame once. Meanwhile the run's record, as its
    heartbeat rewrites it, says how far it is (`rayvid runs` of a live run)."""
    src, expected = many_videos
    out = str(tmp_path / "out")
    result = {}
    monkeypatch.setattr(commit, "HEARTBEAT_S", 0.2)
    seen, watching = [], threading.Event()

    def watch():  # the records `rayvid runs` would read while the run runs
        while not watching.wait(0.1):
            with contextlib.suppress(OSError, ValueError):
                rows = query.runs(out).to_pylist()
                seen.extend(r for r in rows if r["status"] == "running")

    watcher = threading.Thread(target=watch)
    watcher.start()
    # the sample model infers a batch in a few milliseconds: one-frame batches keep the
    # inference actor busy long enough (seconds) to be killed in the middle of its work
    infer = InferConfig(batch_size=1 if stage == "Predictor" else None)
    cfg = _cfg(str(src), out, shapes_model["path"], decode=DecodeConfig(max_actors=1), infer=infer)
    job = threading.Thread(target=lambda: result.update(r=pipeline.run(cfg)))
    job.start()
    title = f"ray::MapWorker(MapBatches({stage})).submit"  # the title while it runs a task
    deadline, first_busy, busy = time.time() + 120, None, []
    while time.time() < deadline:
        busy = processes(title, ours=True)  # (not another pytest worker's Ray's)
        first_busy = first_busy or (busy and time.time())
        # well into its work, and busy now. CI once saw two such processes at one look, cause
        # not found (a process that has just forked shows its parent's title until it
        # execs): look again; two that stay are still a failure, below
        if len(busy) == 1 and time.time() - first_busy > 0.5:
            break
        time.sleep(0.02)
    [(pid, _)] = busy
    assert job.is_alive(), "the run finished before the actor could be killed"
    children = [p for p, _ in processes(sys.executable) if parent(p) == pid]
    assert len(children) == (stage == "Decoder")  # a decode actor decodes in its child process
    os.kill(pid, signal.SIGKILL)
    job.join(timeout=300)
    assert not job.is_alive() and "r" in result, "the run did not finish"
    r = result["r"]
    assert (r.videos_ok, r.videos_failed) == (24, 0)
    assert frames_per_video(read_output(out)) == expected
    assert sorted(read_output(out, "videos").column("video_uri").to_pylist()) == sorted(expected)
    alive = [p for p, _ in processes("")]
    assert pid not in alive and not set(children) & set(alive), "the killed actor's child outlived it"
    watching.set()
    watcher.join()
    counted = [(r["videos_listed"], r["videos_ok"]) for r in seen if r["videos_listed"] is not None]
    assert counted and {n for n, _ in counted} == {24}, seen[-3:]
    assert [ok for _, ok in counted] == sorted(ok for _, ok in counted) and counted[-1][1] <= 24


def test_remove_a_worker_node_mid_run_loses_and_duplicates_nothing(ray_cluster, many_videos, shapes_model, tmp_path):
    """A spot node is reclaimed while decode actors live on it (three, over its 2 CPUs and
    the head's 2: at least one on it, as checked before it goes)."""
    src, expected = many_videos
    node = ray_cluster.add_node(num_cpus=2, object_store_memory=512 * 2**20)
    ray_cluster.wait_for_nodes()
    try:
        out = str(tmp_path / "out")
        result = {}
        # 3 decode actors over the head's 2 CPUs and the new node's 2
        cfg = _cfg(str(src), out, shapes_model["path"], decode=DecodeConfig(min_actors=3, max_actors=3))
        job = threading.Thread(target=lambda: result.update(r=pipeline.run(cfg)))
        job.start()
        deadline = time.time() + 120
        # (all three started; two decoding at once, as waited for before, may never be seen
        # where inference is the slower stage on a loaded machine: a CI flake)
        while time.time() < deadline and len(processes("ray::MapWorker(MapBatches(Decoder))", ours=True)) < 3:
            time.sleep(0.05)
        assert len(processes("ray::MapWorker(MapBatches(Decoder))", ours=True)) == 3
        from ray._private import state

        on_node = []  # (the GCS's actor table may lag the processes by a moment)
        while not on_node and time.time() < deadline:
            on_node = [a for a in state.actors().values()
                       if a["ActorClassName"].startswith("MapWorker(MapBatches(Decoder)")
                       and a["Address"]["NodeID"] == node.node_id and a["State"] != "DEAD"]
            time.sleep(0.05)
        assert on_node, ("no decode actor on the node to remove", node.node_id, [
            (a["State"], a["Address"]["NodeID"]) for a in state.actors().values()
            if a["ActorClassName"].startswith("MapWorker(MapBatches(Decoder)")])
        assert job.is_alive(), "the run finished before the node could be removed"
        ray_cluster.remove_node(node, allow_graceful=False)
        node = None
        job.join(timeout=400)
        assert not job.is_alive() and "r" in result, "the run did not finish"
        r = result["r"]
        assert (r.videos_ok, r.videos_failed) == (24, 0)
        assert frames_per_video(read_output(out)) == expected
        assert sorted(read_output(out, "videos").column("video_uri").to_pylist()) == sorted(expected)
    finally:
        if node is not None:
            ray_cluster.remove_node(node)


def test_hostile_object_keys_never_steer_where_rayvid_writes(ray_session, moto, media, shapes_model, tmp_path):
    """Keys with `..`, empty and absolute-looking segments and control characters are data:
    each is read as the object it names, and every file rayvid writes lands under OUTPUT
    with a name of its own making. Each video is one request: its copy's GET, conditional on
    the listed ETag (`storage._conditional`), no HEAD before or after it; and no header read
    by planning (a clip of a few KB cannot hold two segments: `segments.MIN_BYTES_PER_S`)."""
    import boto3

    src = next(p for p in media["truth"] if p.endswith("a_clip.mp4"))
    n = len(media["truth"][src])
    keys = ["hostile/../../escape.mp4", "hostile//abs/x.mp4", "hostile/ctl\x1b[31m\tname\x07.mp4",
            "hostile/dots/..mp4", "hostile/odd ext.m\tp4"]
    s3 = boto3.client("s3")
    for key in keys:
        s3.upload_file(src, "rayvid-test", key)
    work = tmp_path / "work"
    out = work / "out"
    before = {p for p in work.parent.rglob("*")}
    of_videos = []

    def record(environ):
        if environ["PATH_INFO"].startswith("/rayvid-test/hostile/") and environ["PATH_INFO"] != "/rayvid-test/hostile/":
            of_videos.append((environ["REQUEST_METHOD"], environ.get("HTTP_IF_MATCH", "")))

    with moto.hook(record):
        result = pipeline.run(_cfg("s3://rayvid-test/hostile/", str(out), shapes_model["path"], run_id="hostile-1"))
    # "..mp4" is a hidden name (skipped like any dot-file); "m\tp4" is no video extension
    listed = {k for k in keys if k.rsplit(".", 1)[-1] == "mp4" and not k.rsplit("/", 1)[-1].startswith(".")}
    assert len(listed) == 3
    assert result.videos_listed == len(listed) and result.videos_failed == 0
    assert len(of_videos) == len(listed), of_videos
    assert all(method == "GET" and len(tag) == 34 for method, tag in of_videos), of_videos  # If-Match: '"<md5>"'
    assert frames_per_video(read_output(str(out))) == {f"s3://rayvid-test/{k}": list(range(n)) for k in listed}
    written = {p for p in work.parent.rglob("*")} - before
    assert written and all(p == work or out in p.parents or p == out for p in written), written
    names = {p.name for p in out.rglob("*") if p.is_file()}
    assert names == {"part-hostile-1-00000.parquet", "hostile-1.json"}
    # (os.walk: other processes' folders come and go under /tmp meanwhile; a glob raised on one)
    assert not [os.path.join(d, f) for d, _, files in os.walk("/tmp") for f in files
                if f.endswith("escape.mp4") and "rayvid" in d]


def test_s3_outage_mid_run_fails_clearly_then_a_rerun_finishes(ray_session, moto, many_videos, shapes_model, s3fs_client,
                                                              monkeypatch):
    """The endpoint goes away after the first commit (at the second one's videos/ file):
    bounded retries, then a clear failure naming what is not done; once it is back, the
    same command finishes the rest."""
    monkeypatch.setenv("RAYVID_S3_MAX_ATTEMPTS", "2")  # the driver's writes: 2 s of retries, not 20
    src, local_expected = many_videos
    prefix = "s3://rayvid-test/outage/in"
    upload_tree(s3fs_client, src, prefix)
    expected = {prefix + "/" + os.path.relpath(p, src): v for p, v in local_expected.items()}
    out = "s3://rayvid-test/outage/out"

    def cfg(run_id):
        return _cfg(prefix + "/", out, shapes_model["path"], run_id=run_id, commit_interval_s=0,
                    decode=DecodeConfig(max_actors=1))

    with moto.down_at("PUT", "/rayvid-test/outage/out/videos/part-outage-1-00001.parquet") as hit:
        started = time.time()
        with pytest.raises(StorageUnavailable) as caught:
            pipeline.run(cfg("outage-1"))
    assert hit and time.time() - started < 300  # bounded retries: no hang
    message = str(caught.value)
    assert message.startswith("storage unreachable ")
    assert "Could not connect to the endpoint URL" in message
    n_missing = int(re.search(r"; (\d+) of 24 videos not committed \(first: s3://rayvid-test/outage/in/", message).group(1))
    assert 0 < n_missing < 24 and message.endswith("run the same command again to finish them")
    again = pipeline.run(cfg("outage-2"))
    assert again.videos_skipped == 24 - n_missing and again.videos_ok == n_missing and again.videos_failed == 0
    assert frames_per_video(read_output(out)) == expected
    assert sorted(read_output(out, "videos").column("video_uri").to_pylist()) == sorted(expected)


def test_an_input_outage_in_a_decode_actor_stops_the_run_clearly_then_a_rerun_finishes(ray_session, moto, media,
                                                                                      shapes_model, s3fs_client,
                                                                                      tmp_path):
    """INPUT's store goes away while a decode actor reads a video (S3 INPUT, local OUTPUT):
    the actor's StorageUnavailable reaches the driver through Ray Data (a video's read
    error would be its error row; this is not one), the run stops naming the video and
    what is not committed, with no traceback of Ray Data's before it (Ray Data called it
    a possible bug of its own); once the store is back, the same command finishes the rest."""
    prefix = "s3://rayvid-test/in-outage/in"
    upload_tree(s3fs_client, str(media["videos"]), prefix)
    expected = {prefix + "/" + os.path.relpath(p, media["videos"]) for p in media["truth"]}
    out = str(tmp_path / "out")

    def cfg(run_id):  # (no segments: no header is read in the driver, the actor reads first)
        return _cfg(prefix + "/", out, shapes_model["path"], run_id=run_id, commit_interval_s=0,
                    decode=DecodeConfig(max_actors=1, segment_s=0))

    ray_data_said = []  # what Ray Data logs of the failure (its console prints records not marked `hide`)
    catch = logging.Handler()
    catch.emit = ray_data_said.append
    for name in pipeline.RAY_DATA_ERROR_LOGGERS:
        logging.getLogger(name).addHandler(catch)
    try:
        with moto.down_at("GET", "/rayvid-test/in-outage/in/c.mkv") as hit:
            with pytest.raises(StorageUnavailable) as caught:
                pipeline.run(cfg("in-outage-1"))
    finally:
        for name in pipeline.RAY_DATA_ERROR_LOGGERS:
            logging.getLogger(name).removeHandler(catch)
    assert hit
    errors = [r for r in ray_data_said if r.levelno >= logging.ERROR]
    assert errors and all(getattr(r, "hide", False) for r in errors), [r.getMessage()[:80] for r in errors]
    message = str(caught.value)
    named = re.match(r"storage unreachable reading (.+?): Could not connect to the endpoint URL", message)
    assert named and named[1] in expected  # (c.mkv, or another the actor was reading as the store went)
    n_missing = int(re.search(r"; (\d+) of 3 videos not committed \(first: ", message).group(1))
    assert 1 <= n_missing <= 3 and message.endswith("run the same command again to finish them")
    assert read_output(out, "errors") is None  # no video's error row: nothing for --retry-failed
    again = pipeline.run(cfg("in-outage-2"))
    assert again.videos_skipped == 3 - n_missing and again.videos_ok == n_missing and again.videos_failed == 0
    _check_round_trip(read_output(out), media["truth"], lambda p: prefix + "/" + os.path.relpath(p, media["videos"]))


def test_a_rerun_with_other_settings_says_what_it_skips(ray_session, media, shapes_model, tmp_path, caplog):
    """Committed videos are skipped whatever a run's settings: a rerun with another sampling
    says so, naming the run that committed them and what differs, and classifies only the
    new video its way; its summary says how many skipped videos had failed (--retry-failed
    redoes them)."""
    from rayvid import report

    src, out = tmp_path / "in", str(tmp_path / "out")
    src.mkdir()
    a, b, c = sorted(media["truth"])
    shutil.copy(a, src / "a.mp4")
    shutil.copy(b, src / "b.mp4")
    (src / "bad.mp4").write_bytes(b"not a video at all")
    first = pipeline.run(_cfg(str(src), out, shapes_model["path"], run_id="first-run"))
    assert (first.videos_ok, first.videos_failed) == (2, 1)
    new = src / ("c" + os.path.splitext(c)[1])
    shutil.copy(c, new)
    caplog.clear()
    with caplog.at_level("WARNING", logger="rayvid"):
        again = pipeline.run(_cfg(str(src), out, shapes_model["path"], run_id="second-run",
                                  sampling=SamplingConfig(every=5)))
    assert (again.videos_skipped, again.videos_skipped_failed, again.videos_ok) == (3, 1, 1)
    said = [r.getMessage() for r in caplog.records if "already holds" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("OUTPUT already holds 3 of the listed videos, committed by first-run "
                                                 "with other settings (sampling: {"), said
    assert "'every': 1" in said[0] and "now {" in said[0] and "'every': 5" in said[0] and "model" not in said[0]
    assert "3 skipped (already done; 1 of them failed then: --retry-failed redoes them)" in report.summary(again)
    frames = frames_per_video(read_output(out))
    assert frames[str(src / "a.mp4")] == list(range(len(media["truth"][a])))  # as the first run kept them
    assert frames[str(new)] == list(range(0, len(media["truth"][c]), 5))
    # the first run's settings again: of the four skipped, only the second run's one differs
    (src / "bad.mp4").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="rayvid"):
        third = pipeline.run(_cfg(str(src), out, shapes_model["path"], run_id="third-run"))
    assert (third.videos_skipped, third.videos_ok) == (3, 0)
    said = [r.getMessage() for r in caplog.records if "already holds" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("OUTPUT already holds 1 of the listed videos, committed by second-run "
                                                 "with other settings (sampling: {"), said


def test_every_model_setting_that_shapes_the_rows_is_compared_and_speed_settings_are_not():
    """--topk, --preprocess, --embed, --input-size and the detection head's settings decide
    a committed video's rows as the model does (a rerun with `--topk 1` said nothing);
    --xla and --mixed-precision decide how fast they come. A record from before a setting
    existed (no key) is a run with its default, in model and sampling alike."""
    now = {"model": {"name": "/m/a.keras", "topk": 5, "preprocess": "auto", "input_size": [96, 96],
                     "xla": False}, "sampling": {"every": 1, "fps": None, "skip_similar": None}}

    def changed(**m):
        return pipeline._settings(dict(now, model=dict(now["model"], **m)))

    for setting, value in [("topk", 1), ("preprocess", "unit"), ("input_size", [64, 64]), ("embed", "auto"),
                           ("head", "detect"), ("labels", "/m/other.txt")]:
        assert changed(**{setting: value}) != pipeline._settings(now), setting
    assert changed(xla=True, mixed_precision=True) == pipeline._settings(now)
    # settings of a head or output the runs did not use: no difference
    assert changed(max_boxes=3, embed_normalize=True) == pipeline._settings(now)
    assert changed(head="detect", max_boxes=3) != changed(head="detect")
    old = {"model": {"name": "/m/a.keras", "input_size": [96, 96]}, "sampling": {"every": 1}}
    assert pipeline._settings(old) == pipeline._settings(now)


def test_the_settings_a_rerun_compares_read_no_weights_as_imagenet():
    """A keras.applications model without --weights is built with ImageNet's: the same
    settings as `--weights imagenet` (a rerun with one or the other warned of "other
    settings"); a model file's weights (recorded, unused, before they were refused) are none.
    Likewise `--preprocess auto` and no `--input-size` are what they resolve to."""
    def model(**m):
        return pipeline._settings({"model": m, "sampling": {"every": 1}})

    assert model(name="resnet50", weights=None) == model(name="resnet50", weights="imagenet")
    assert model(name="resnet50", weights=None) != model(name="resnet50", weights="/w.h5")
    assert model(name="resnet50", weights="none") != model(name="resnet50", weights="imagenet")
    assert model(name="/m/a.keras", weights="/tmp/nosuch.h5") == model(name="/m/a.keras", weights=None)
    # --preprocess and --input-size as the model resolves them (`--preprocess caffe` beside
    # `auto` for ResNet-50 warned of "other settings"); a model file's size only it knows
    assert model(name="resnet50", preprocess="caffe", input_size=[224, 224]) == model(name="resnet50")
    assert model(name="resnet50", preprocess="tf") != model(name="resnet50")
    assert model(name="resnet50", input_size=[160, 160]) != model(name="resnet50")
    assert model(name="/m/a.keras", preprocess="raw") == model(name="/m/a.keras", preprocess="auto")
    assert model(name="/m/a.keras", input_size=[96, 96]) != model(name="/m/a.keras")


def test_an_http_server_that_cannot_be_reached_is_one_line_saying_why(ray_session, shapes_model, tmp_path):
    """A video on an HTTP server nobody answers at (a presigned URL with user-info too): the
    run stops with one line naming the video without its secrets and saying why ("Cannot
    connect to host", not the URL again, nor Ray Data's retry advice appended to it), and so
    does its record."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"http://alice:pw@127.0.0.1:{port}/v.mp4?X-Amz-Signature=SECRET\n")
    out = str(tmp_path / "out")
    with pytest.raises(StorageUnavailable) as caught:
        pipeline.run(_cfg(str(manifest), out, shapes_model["path"], run_id="http-down",
                          decode=DecodeConfig(max_actors=1, segment_s=0)))
    message = str(caught.value)
    assert message.startswith(f"storage unreachable reading http://127.0.0.1:{port}/v.mp4: Cannot connect to host "
                              f"127.0.0.1:{port}") and "\n" not in message, message
    assert message.endswith("; 1 of 1 videos not committed (first: http://127.0.0.1:"
                            f"{port}/v.mp4); run the same command again to finish them")
    record = json.loads((tmp_path / "out" / "runs" / "http-down.json").read_text())
    assert record["error"] == f"StorageUnavailable: {message}"
    assert "pw" not in json.dumps(record) and "SECRET" not in json.dumps(record)


def test_s3_outage_at_the_runs_last_write_says_nothing_is_left_to_do(ray_session, moto, media, shapes_model, monkeypatch):
    """The endpoint goes away as the run records that it finished, every video committed:
    the same clear kind of failure, saying so, and the next run finds nothing to do; as
    when the store refuses that write."""
    monkeypatch.setenv("RAYVID_S3_MAX_ATTEMPTS", "2")  # the driver's writes: 2 s of retries, not 20
    out = "s3://rayvid-test/outage-last/out"

    def cfg(run_id):
        return _cfg(str(media["videos"]), out, shapes_model["path"], run_id=run_id)

    with moto.down_at("PUT", "/rayvid-test/outage-last/out/runs/last-1.json", b'"status": "finished"') as hit:
        with pytest.raises(StorageUnavailable) as caught:
            pipeline.run(cfg("last-1"))
    assert hit
    message = str(caught.value)
    assert message.startswith("storage unreachable writing OUTPUT s3://rayvid-test/outage-last/out: ")
    assert message.endswith("; every video is committed, only this run's record (runs/last-1.json) "
                            "does not say it finished: nothing to run again")
    again = pipeline.run(cfg("last-2"))
    assert again.videos_skipped == again.videos_listed == len(media["truth"]) and again.videos_ok == 0
    # refused there (a 403), the same: a clear error that says nothing is left to do
    with moto.refuse("PUT", "/rayvid-test/outage-last/out/runs/last-3.json", b'"status": "finished"') as refused:
        with pytest.raises(StorageError) as caught:
            pipeline.run(cfg("last-3"))
    assert refused and type(caught.value) is StorageError
    message = str(caught.value)
    assert message.startswith("cannot write to OUTPUT s3://rayvid-test/outage-last/out: Access Denied")
    assert message.endswith("; every video is committed, only this run's record (runs/last-3.json) "
                            "does not say it finished: nothing to run again")


def test_output_refused_mid_run_is_a_clear_error_and_a_rerun_finishes(ray_session, moto, media, shapes_model,
                                                                     s3fs_client):
    """The store refuses the run's writes into OUTPUT/predictions/ (credentials that may
    not write there, a bucket policy): the run stops with a clear error saying what is not
    done, not a traceback; once writes are allowed, the same command finishes."""
    out = "s3://rayvid-test/refused/out"

    def cfg(run_id):
        return _cfg(str(media["videos"]), out, shapes_model["path"], run_id=run_id, commit_interval_s=0)

    with moto.refuse("PUT", "/rayvid-test/refused/out/predictions/") as refused:
        with pytest.raises(StorageError) as caught:
            pipeline.run(cfg("refused-1"))
    assert refused and type(caught.value) is StorageError
    message = str(caught.value)
    assert message.startswith("cannot write to OUTPUT s3://rayvid-test/refused/out: ")
    assert "Access Denied" in message and "check credentials" in message
    assert message.endswith(f"{len(media['truth'])} of {len(media['truth'])} videos not committed (first: "
                            f"{sorted(media['truth'])[0]}, {sorted(media['truth'])[1]}, {sorted(media['truth'])[2]}); "
                            "run the same command again to finish them")
    record = json.loads(s3fs_client.cat_file(f"{out}/runs/refused-1.json"))
    assert record["status"] == "failed" and record["error"].startswith("StorageError: cannot write to OUTPUT")
    again = pipeline.run(cfg("refused-2"))
    assert again.videos_ok == len(media["truth"]) and again.videos_skipped == 0
    assert frames_per_video(read_output(out)) == {p: list(range(len(labels))) for p, labels in media["truth"].items()}


def test_every_kind_of_bad_input_is_one_error_row_and_the_job_goes_on(ray_session, damaged, matrix, code_reader, tmp_path):
    """One folder holding each kind of bad input beside a good video: each bad file is
    exactly one errors/ row with a clear message, what decodes of it is kept (and exact),
    and the good video is complete."""
    import subprocess

    import framecode
    from rayvid import samples

    src = tmp_path / "in"
    src.mkdir()
    for name, path in damaged.items():
        shutil.copy(path, src / name)
    (src / "zero.mp4").write_bytes(b"")
    (src / "text.mp4").write_text("not a video\n" * 30)
    subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1", "-c:a", "aac", str(src / "audio_only.mp4")], check=True)
    good, n_good = matrix["h264.mp4"]
    shutil.copy(good, src / "good.mp4")
    out = str(tmp_path / "out")
    result = pipeline.run(_cfg(str(src), out, code_reader, run_id="bad"))
    # the damaged key-frame index decodes whole read through (decord fails, PyAV takes over)
    assert (result.videos_listed, result.videos_ok, result.videos_failed) == (9, 2, 7)

    errors = {r["video_uri"].rsplit("/", 1)[-1]: r for r in read_output(out, "errors").to_pylist()}
    expect = {
        "zero.mp4": "empty file (0 bytes)",
        "text.mp4": "cannot open video: Invalid data found when processing input",
        "audio_only.mp4": "no video stream (audio-only or not a video)",
        "truncated_moov_at_end.mp4": "truncated MP4: the file ends inside its media data",
        "truncated_faststart.mp4": f"truncated: the container lists {framecode.DAMAGED_FRAMES} frames",
        "garbage_in_middle.mp4": "frames lost to damaged data (frame ",
        "unsupported_codec.avi": "unsupported codec",
    }
    assert sorted(errors) == sorted(expect)  # exactly one row each
    for name, fragment in expect.items():
        assert fragment in errors[name]["message"], (name, errors[name]["message"])
        assert errors[name]["stage"] == "decode"

    preds = read_output(out)
    assert all(r["label"] == str(r["frame_index"]) for r in preds.select(["label", "frame_index"]).to_pylist())
    kept = frames_per_video(preds)
    assert kept[str(src / "good.mp4")] == list(range(n_good))
    assert kept[str(src / "key_frame_index_reversed.mp4")] == list(range(framecode.DAMAGED_FRAMES))
    assert len(kept[str(src / "truncated_faststart.mp4")]) > 10
    garbage = kept[str(src / "garbage_in_middle.mp4")]
    assert garbage[0] == 0 and garbage[-1] == framecode.DAMAGED_FRAMES - 1
    videos = {r["video_uri"].rsplit("/", 1)[-1]: r for r in read_output(out, "videos").to_pylist()}
    assert {k for k, v in videos.items() if v["error"]} == set(expect)
    assert videos["garbage_in_middle.mp4"]["frames"] == len(garbage)


def test_skip_similar_infers_fewer_frames_and_agrees_with_the_full_run(ray_session, shapes_model, tmp_path):
    """Static-camera footage (still scenes with sensor noise, every third scene moving), run
    twice: every frame through the model, then with --skip-similar. Same rows; reused rows
    repeat their source exactly; far fewer model calls; the same top-1 almost everywhere."""
    from rayvid import samples

    videos = tmp_path / "videos"
    videos.mkdir()
    samples.make_still_video(str(videos / "still.mp4"), 12, seed=5)
    full = pipeline.run(_cfg(str(videos), str(tmp_path / "full"), shapes_model["path"]))
    skip = pipeline.run(_cfg(str(videos), str(tmp_path / "skip"), shapes_model["path"],
                             sampling=SamplingConfig(skip_similar=2.0)))
    a, b = read_output(str(tmp_path / "full")), read_output(str(tmp_path / "skip"))
    assert a.column("frame_index").to_pylist() == b.column("frame_index").to_pylist() == list(range(180))
    assert a.column("reused_from").null_count == len(a)

    rows = b.to_pylist()
    by_index = {r["frame_index"]: r for r in rows}
    reused = [r for r in rows if r["reused_from"] is not None]
    for r in reused:
        src = by_index[r["reused_from"]]
        assert src["reused_from"] is None and src["frame_index"] < r["frame_index"]
        assert (r["label"], r["score"], r["topk"]) == (src["label"], src["score"], src["topk"])
    inferred = len(rows) - len(reused)
    assert inferred * 3 <= len(rows), f"{inferred} of {len(rows)} frames inferred"
    agree = np.mean([x == y for x, y in zip(a.column("label").to_pylist(), b.column("label").to_pylist())])
    assert agree >= 0.97, agree
    assert (skip.frames, skip.frames_reused) == (180, len(reused))
    record = json.load(open(tmp_path / "skip" / "runs" / f"{skip.run_id}.json"))
    assert record["stats"]["frames_inferred"] == inferred
    assert record["stats"]["inference"]["frames"] == inferred  # what the model actors saw
    assert full.inference["frames"] == 180 and 0 < full.inference["model_busy"] <= 1
    # the session's GPU node has a logical GPU: without a physical one TensorFlow computes on
    # the CPU, and the summary says so
    import tensorflow as tf

    from rayvid import report

    physical = bool(tf.config.list_physical_devices("GPU"))
    assert full.plan["infer_gpus"] == 1 and full.inference["devices"] == (["GPU"] if physical else ["CPU"])
    said = "1 GPU each (but TensorFlow found no GPU: the model ran on the CPU)" in report.summary(full)
    assert said != physical


def test_embeddings_round_trip_and_similar_frames(ray_session, shapes_model, tmp_path, capsys):
    """--embed writes the classifier's input per frame. Two byte-identical videos: each
    frame's nearest neighbour is its twin (similarity 1); the next nearest shows the same
    generated class; an image of a frame finds that frame."""
    import av
    from PIL import Image

    from rayvid import cli, samples

    videos = tmp_path / "videos"
    videos.mkdir()
    truth = samples.make_video(str(videos / "a.mp4"), 3.0, seed=1)
    shutil.copy(videos / "a.mp4", videos / "twin.mp4")
    other = samples.make_video(str(videos / "c.mp4"), 3.0, seed=2)
    out = str(tmp_path / "out")
    cfg = RunConfig(input=str(videos), output=out, progress=False,
                    model=ModelConfig(name=shapes_model["path"], embed="auto", embed_normalize=True))
    pipeline.run(cfg)
    preds = read_output(out)
    assert preds.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    emb = {(r["video_uri"], r["frame_index"]): np.array(r["embedding"]) for r in
           preds.select(["video_uri", "frame_index", "embedding"]).to_pylist()}
    a, twin, c = (str(videos / n) for n in ("a.mp4", "twin.mp4", "c.mp4"))
    assert len(emb) == len(truth) * 2 + len(other)
    np.testing.assert_allclose([np.linalg.norm(v) for v in emb.values()], 1.0, atol=1e-5)
    for i in range(len(truth)):
        np.testing.assert_array_equal(emb[(a, i)], emb[(twin, i)])

    ts = dict(zip(preds.filter(pa.compute.equal(preds.column("video_uri"), a)).column("frame_index").to_pylist(),
                  preds.filter(pa.compute.equal(preds.column("video_uri"), a)).column("timestamp_s").to_pylist()))
    classes = {a: truth, twin: truth, c: other}
    for i in range(0, len(truth), 3):
        got = query.similar(out, k=2, video=a, time_s=ts[i]).to_pylist()
        assert (got[0]["video_uri"], got[0]["frame_index"]) == (twin, i) and got[0]["similarity"] > 0.9999
        assert classes[got[1]["video_uri"]][got[1]["frame_index"]] == truth[i], (i, got[1])

    k = 30  # an image of frame 30 (decoded at full size, saved as PNG)
    with av.open(a) as container:
        frame = next(f for j, f in enumerate(container.decode(video=0)) if j == k).to_ndarray(format="rgb24")
    Image.fromarray(frame).save(tmp_path / "query.png")
    # results go to a file: the session's Ray prints its workers' log lines to stdout
    assert cli.main(["similar", out, "--image", str(tmp_path / "query.png"), "-k", "2", "--format", "json",
                     "--out", str(tmp_path / "hits.json")]) == 0
    hits = json.loads((tmp_path / "hits.json").read_text())
    assert {h["video_uri"] for h in hits} == {a, twin}
    assert all(abs(h["frame_index"] - k) <= 2 and h["similarity"] > 0.95 for h in hits), hits

    # runs/ files rayvid did not write are passed over; the model is that of the run whose
    # embeddings OUTPUT holds, not the latest --embed run (here one with another layer, which
    # wrote none: it skipped every video), whose image embeddings would be in another space
    runs = tmp_path / "out" / "runs"
    (record_file,) = runs.glob("*.json")
    (runs / "notes.json").write_text("not json")
    (runs / "list.json").write_text("[1, 2]")
    (runs / "noconfig.json").write_text(json.dumps({"status": "finished", "config": None}))
    later = json.loads(record_file.read_text())
    later.update(run_id="later", finished_at="9999-01-01T00:00:00Z")
    later["config"]["model"]["embed"] = "no_such_layer"
    (runs / "later.json").write_text(json.dumps(later))
    query_png = str(tmp_path / "query.png")

    def similar_to(image):
        assert cli.main(["similar", out, "--image", image, "-k", "2", "--format", "json",
                         "--out", str(tmp_path / "got.json")]) == 0
        return json.loads((tmp_path / "got.json").read_text())

    assert similar_to(query_png) == hits
    # a phone's photo: stored turned, its EXIF orientation (6) saying how to show it
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(frame).rotate(90, expand=True).save(tmp_path / "turned.png", exif=exif)
    assert similar_to(str(tmp_path / "turned.png")) == hits
    # 16-bit greys (Pillow's RGB of them was white) as their 8 bits
    grey = Image.fromarray(frame).convert("L")
    grey.save(tmp_path / "grey8.png")
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    assert similar_to(str(tmp_path / "grey16.png")) == similar_to(str(tmp_path / "grey8.png"))
    # the writing run's model was a signed URL (its record keeps no signature): --model
    signed = json.loads(record_file.read_text())
    signed["config"]["model"]["name"] = "https://models.example/shapes.keras?<redacted>"
    signed["config"]["model"]["labels"] = "https://models.example/shapes.labels.txt?<redacted>"  # (not needed)
    record_file.write_text(json.dumps(signed))
    capsys.readouterr()
    assert cli.main(["similar", out, "--image", query_png]) == 2
    assert (f"run {signed['run_id']!r} read its --model from a URL whose query its record does not keep "
            "(https://models.example/shapes.keras): give it again: similar --model URL") in capsys.readouterr().err
    assert cli.main(["similar", out, "--image", query_png, "--model", shapes_model["path"], "-k", "2",
                     "--format", "json", "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text()) == hits


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_detection_boxes_match_known_positions(ray_session, detector, tmp_path, capsys):
    """--head detect with the sample detector on generated videos of moving shapes: boxes in
    source pixels, decoded and NMS'd in the inference graph; IoU >= 0.5 with the known box
    for >= 95% of objects, and few false boxes."""
    from rayvid import cli, samples

    videos = tmp_path / "videos"
    videos.mkdir()
    truth = {str(videos / f"d{s}.mp4"): samples.make_detection_video(str(videos / f"d{s}.mp4"), 3.0, seed=s)
             for s in (11, 12)}
    out = str(tmp_path / "out")
    assert cli.main(["run", str(videos), out, "--model", detector["model"], "--head", "detect",
                     "--no-progress"]) == 0
    capsys.readouterr()
    preds = read_output(out)
    assert preds.schema.field("boxes").type == pa.list_(schema.BOX_TYPE)
    got = {(r["video_uri"], r["frame_index"]): r for r in preds.to_pylist()}
    objects = matched = boxes = 0
    for uri, frames in truth.items():
        for i, want in enumerate(frames):
            row = got[(uri, i)]
            found = list(row["boxes"])
            boxes += len(found)
            for cls, box in want:
                objects += 1
                best = max(found, key=lambda f: _iou(box, (f["x_min"], f["y_min"], f["x_max"], f["y_max"]))
                           if f["label"] == cls else -1, default=None)
                if best is not None and best["label"] == cls and \
                        _iou(box, (best["x_min"], best["y_min"], best["x_max"], best["y_max"])) >= 0.5:
                    matched += 1
                    found.remove(best)
            if row["boxes"]:
                assert row["label"] == row["boxes"][0]["label"] and row["score"] == row["boxes"][0]["score"]
    assert matched >= 0.95 * objects, f"{matched} of {objects} objects found at IoU >= 0.5"
    assert boxes <= 1.1 * objects, f"{boxes} boxes for {objects} objects"
    # the same query verbs: a frame's label is its best box's class
    dest = str(tmp_path / "frames.csv")  # boxes reach the spreadsheet export as JSON
    assert cli.main(["export", out, dest]) == 0
    import csv

    with open(dest) as f:
        exported = {(r["video_uri"], int(r["frame_index"])): json.loads(r["boxes"]) for r in csv.DictReader(f)}
    assert exported == {k: r["boxes"] for k, r in got.items()}
    uri = sorted(truth)[0]
    label = got[(uri, 0)]["label"]
    assert label in {cls for cls, _ in truth[uri][0]}
    assert cli.main(["find", out, label, "--format", "json", "--out", str(tmp_path / "found.json")]) == 0
    assert uri in {r["video_uri"] for r in json.loads((tmp_path / "found.json").read_text())}


def test_clip_model_labels_each_clip(ray_session, clip_model, tmp_path, capsys):
    """--clip-len 4 with the sample video model on static-camera footage (still scenes, every
    third one moving): one row per clip, tiling the video; clips inside one scene get its
    motion class (a clip across a scene change shows a jump, which is motion)."""
    from rayvid import cli, samples

    videos = tmp_path / "videos"
    videos.mkdir()
    labels = samples.make_still_video(str(videos / "cam.mp4"), 8.0, seed=21)
    motion = samples.still_motion(labels)
    assert "moving" in motion and "still" in motion
    out = str(tmp_path / "out")
    assert cli.main(["run", str(videos), out, "--model", clip_model["model"], "--clip-len", "4",
                     "--no-progress"]) == 0
    capsys.readouterr()
    preds = read_output(out).sort_by("frame_index")
    for name in ("clip_start_frame", "clip_end_frame", "start_s", "end_s"):
        assert name in preds.column_names
    rows = preds.to_pylist()
    n = len(labels)
    assert [r["clip_start_frame"] for r in rows] == list(range(0, n, 4))
    assert [r["clip_end_frame"] for r in rows] == [min(s + 3, n - 1) for s in range(0, n, 4)]
    ts = pts_of(str(videos / "cam.mp4"))
    np.testing.assert_allclose([r["start_s"] for r in rows], ts[::4], atol=1e-9)
    np.testing.assert_allclose([r["end_s"] for r in rows[:-1]], ts[4::4], atol=1e-9)
    assert all(r["frame_index"] == r["clip_start_frame"] and r["timestamp_s"] == r["start_s"] for r in rows)
    inside = [r for r in rows if len(set(labels[r["clip_start_frame"]: r["clip_end_frame"] + 1])) == 1]  # one scene
    right = sum(r["label"] == motion[r["clip_start_frame"]] for r in inside)
    assert right >= 0.9 * len(inside), f"{right} of {len(inside)} clips labelled as generated"
    # clips work with the query verbs: segments of "moving"
    assert cli.main(["segments", out, "--label", "moving", "--format", "json", "--out", str(tmp_path / "s.json")]) == 0
    segs = json.loads((tmp_path / "s.json").read_text())
    moving = [r for r in inside if r["label"] == "moving"]
    assert segs and sum(s["frames"] for s in segs) >= len(moving)
    # cut into segments of 1.1 s (30 fps: inside clips), the same clips, labels and scores (a
    # clip across a cut was padded: frame 32's clip [32, 32, 32, 32] read "still" in moving
    # footage, a QA helper found)
    cut = str(tmp_path / "cut")
    assert cli.main(["run", str(videos), cut, "--model", clip_model["model"], "--clip-len", "4",
                     "--segment-seconds", "1.1", "--no-progress"]) == 0
    capsys.readouterr()
    again = read_output(cut).sort_by("frame_index")  # (8 segments: seen failing before clips read on)
    keys = ["clip_start_frame", "clip_end_frame", "start_s", "end_s", "label"]
    assert again.select(keys).to_pylist() == preds.select(keys).to_pylist()
    # (segments after the first decode with PyAV, whole videos with decord: 1-2 grey levels apart)
    np.testing.assert_allclose(again.column("score").to_numpy(), preds.column("score").to_numpy(), atol=5e-3)


def test_a_head_that_does_not_fit_the_model_is_a_clear_error(ray_session, media, shapes_model, tmp_path):
    from rayvid.errors import ConfigError

    with pytest.raises(ConfigError, match="--clip-len needs a video model"):
        pipeline.run(_cfg(str(media["videos"]), str(tmp_path / "o"), shapes_model["path"],
                          sampling=SamplingConfig(clip_len=4)))
    assert not (tmp_path / "o").exists()  # found before any work
    # found when the inference actors load the model: raised as it is; nothing committed,
    # and the run record says why
    with pytest.raises(ModelError, match="--head detect needs a grid detector"):
        pipeline.run(RunConfig(input=str(media["videos"]), output=str(tmp_path / "o"), progress=False,
                               run_id="bad-head", model=ModelConfig(name=shapes_model["path"], head="detect")))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["runs"]
    record = json.loads((tmp_path / "o" / "runs" / "bad-head.json").read_text())
    assert record["status"] == "failed" and "--head detect needs a grid detector" in record["error"]


def test_a_run_that_fails_commits_the_videos_it_had_completed(ray_session, tmp_path):
    """A run that fails part way (here: the model rejects the last video's frames) commits
    the videos already complete, though its commit interval has not come: the next run
    does not redo them. (Before, they waited in memory for the next flush and were lost.)"""
    import subprocess

    from helpers import refusing_model
    from rayvid import samples

    src = tmp_path / "in"
    src.mkdir()
    for name in "abcd":
        subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        "color=c=gray:s=64x48:r=10:d=1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                        str(src / f"{name}.mp4")], check=True)
    # the last video turns white after 30 s: its 75 batches before that give a..d's rows time
    # to reach the driver whatever the machine's load (rows still in flight when a run fails
    # are lost to it; what matters here is what had arrived). With 4 s (10 batches) a CI
    # machine once lost a.mp4's last batch, still in the second of an inference actor's two
    # calls when zz.mp4's white frames failed the run.
    subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error",
                    "-f", "lavfi", "-i", "color=c=gray:s=64x48:r=10:d=30",
                    "-f", "lavfi", "-i", "color=c=white:s=64x48:r=10:d=1",
                    "-filter_complex", "[0][1]concat=n=2:v=1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(src / "zz.mp4")], check=True)

    refusing_model(str(tmp_path / "picky"),  # refuses frames brighter than 200
                   lambda tf, x: tf.debugging.assert_less(tf.reduce_max(x), 200.0, message="too bright"))
    out = str(tmp_path / "out")
    cfg = _cfg(str(src), out, str(tmp_path / "picky"), commit_interval_s=3600.0, run_id="fails",
               decode=DecodeConfig(max_actors=1), infer=InferConfig(batch_size=4))
    with pytest.raises(Exception, match="too bright"):
        pipeline.run(cfg)
    committed = set(read_output(out, "videos").column("video_uri").to_pylist())
    assert {str(src / "a.mp4"), str(src / "b.mp4")} <= committed <= {str(src / f"{n}.mp4") for n in "abcd"}
    assert frames_per_video(read_output(out)) == {u: list(range(10)) for u in committed}
    record = json.loads(open(os.path.join(out, "runs", "fails.json")).read())
    assert record["status"] == "failed" and "too bright" in record["error"]
    # what it ran with, as a finished run's record says it (`--config runs/fails.json` repeats it)
    assert record["plan"]["decode_max"] == 1 and record["plan"]["batch_size"] == 4
    assert record["model"]["name"] == str(tmp_path / "picky")


def test_a_failing_run_waits_on_no_output_that_does_not_answer(tmp_path, monkeypatch, caplog):
    """OUTPUT not answering when a run fails: the heartbeat's write in flight and the failed
    record's write would each take the store client's whole retries (gcsfs: ~35 s each, so
    a GCS outage took 90 s to be said); the run waits for neither past its bounds, warns,
    and once the store answers the record written last says failed (after the beat's)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    release = threading.Event()

    class Stuck(MemoryFileSystem):
        store, pseudo_dirs, stuck = {}, [""], False

        def _open(self, path, mode="rb", **kwargs):
            if "w" in mode and Stuck.stuck:
                release.wait(60)  # a store client retrying
            return super()._open(path, mode, **kwargs)

    Stuck.protocol = "stuckstore"
    fsspec.register_implementation("stuckstore", Stuck, clobber=True)
    monkeypatch.setattr(pipeline, "FAILED_RECORD_WAIT_S", 0.5)
    cfg = RunConfig(input=str(tmp_path), output="stuckstore://out", run_id="a")
    record = {"run_id": "a", "status": "running"}
    beat = commit.Heartbeat(cfg.output, "a", record, every_s=0.05)
    beat.start()
    try:
        Stuck.stuck = True
        time.sleep(0.3)  # a beat is writing, and stuck
        started = time.monotonic()
        stopped = beat.stop(wait_s=0.2)
        with caplog.at_level("WARNING", logger="rayvid"):
            pipeline._record_failure(cfg, dict(record, status="failed"), beat, stopped)
        assert not stopped and time.monotonic() - started < 5
        assert "cannot record the failed run: OUTPUT did not answer in 0.5 s" in caplog.text
    finally:
        Stuck.stuck = False
        release.set()
    deadline = time.monotonic() + 20
    status = lambda: json.loads(Stuck().cat("stuckstore://out/runs/a.json"))["status"]  # noqa: E731
    while status() != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status() == "failed"
    assert not beat._thread.is_alive()


def _one_video_run(media, shapes_model, tmp_path, code: str, *args: str):
    """`code` (a driver script: argv INPUT OUTPUT MODEL *args) run over one video on an
    embedded Ray, as on a laptop, with Ctrl-C as a terminal delivers it: (process, OUTPUT)."""
    src = tmp_path / "in"
    src.mkdir()
    first = sorted(media["truth"])[0]
    shutil.copy(first, src / os.path.basename(first))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(out), shapes_model["path"], *args], env=env,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, out


@pytest.mark.parametrize("sig, when", [("SIGINT", "start"), ("SIGTERM", "start"), ("SIGTERM", "late")])
def test_a_ctrl_c_while_ray_shuts_down_after_a_finished_run_stops_nothing(media, shapes_model, tmp_path, sig, when):
    """Ctrl-C (or SIGTERM) while the embedded Ray shut down at the end of a run that had
    committed everything left its record `running` (`rayvid runs`: interrupted, no counts;
    the finished record came after the shutdown) and said to run the command again (SIGTERM:
    exit 143): the record says finished before Ray shuts down, and the signal then is only
    said (exit 0). Here it comes from inside Ray's shutdown, the moment it starts, or late
    in it, as it stops the node's processes (after its C++ core had put the system's default
    on SIGTERM: the process ended 143, unsaid, a QA find; the handler is kept out while the
    driver joins Ray, the switch put back after)."""
    code = ("import json, os, signal, sys, ray\n"
            "from ray._private.node import Node\n"
            "from rayvid.cli import console\n"
            "shutdown, stop_node = ray.shutdown, Node.kill_all_processes\n"
            "def interrupted(*a, **k):\n"
            "    ray.shutdown = shutdown  # (once)\n"
            "    [record] = os.listdir(sys.argv[2] + '/runs')\n"
            "    print('record at shutdown:', json.load(open(sys.argv[2] + '/runs/' + record))['status'])\n"
            "    os.kill(os.getpid(), getattr(signal, sys.argv[4]))\n"
            "    return shutdown(*a, **k)\n"
            "def interrupted_late(self, *a, **k):\n"
            "    Node.kill_all_processes = stop_node  # (once)\n"
            "    print('record at shutdown: finished')  # (the signal is sent in the run's shutdown only)\n"
            "    from ray._private import ray_constants\n"
            "    print('switch at shutdown:', ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER)\n"
            "    os.kill(os.getpid(), getattr(signal, sys.argv[4]))\n"
            "    return stop_node(self, *a, **k)\n"
            "if sys.argv[5] == 'start':\n"
            "    ray.shutdown = interrupted\n"
            "else:\n"
            "    real_shutdown = ray.shutdown\n"
            "    def late(*a, **k):\n"
            "        Node.kill_all_processes = interrupted_late\n"
            "        ray.shutdown = real_shutdown\n"
            "        return real_shutdown(*a, **k)\n"
            "    ray.shutdown = late\n"
            "console(['run', sys.argv[1], sys.argv[2], '--model', sys.argv[3], '--no-progress'])\n")
    proc, out = _one_video_run(media, shapes_model, tmp_path, code, sig, when)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "record at shutdown: finished" in proc.stdout
    said = {"SIGINT": "Ctrl-C", "SIGTERM": "SIGTERM"}[sig]
    assert f"{said} while Ray shut down, after the run had finished: nothing was stopped" in proc.stderr
    [record] = [json.loads(p.read_text()) for p in (out / "runs").iterdir()]
    assert record["status"] == "finished" and record["stats"]["videos_ok"] == 1
    if when == "late":  # (Ray's switch, set while the driver joined, is as it was: a caller's next ray.init is Ray's)
        assert "switch at shutdown: False" in proc.stdout


def test_a_sigterm_whose_wind_down_is_slow_is_not_aborted(media, shapes_model, tmp_path):
    """SIGTERM (`ray job stop`, a pod's eviction) mid-run: Ray's C++ failure-signal handler
    took it too and set a 3 s alarm that aborted the driver (SIGABRT, exit -6) where winding
    down took longer (here the failed run's record, written 4 s late, as on a slow store):
    the record and the command's last line were lost. Now exit 143, the record says failed,
    also where a second SIGTERM comes meanwhile (it cut the record's write short)."""
    code = ("import os, signal, sys, threading, time\n"
            "from rayvid import commit\n"
            "from rayvid.cli import console\n"
            "write = commit.write_run_record\n"
            "def slow(output, run_id, record):\n"
            "    if record['status'] == 'failed':\n"
            "        time.sleep(4)\n"
            "    write(output, run_id, record)\n"
            "    if record['status'] == 'running' and not slow.sent:  # the run's record is there: stop it\n"
            "        slow.sent = True\n"
            "        for after in (0.5, 2.0):  # and again while it winds down: ignored\n"
            "            threading.Timer(after, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
            "slow.sent = False\n"
            "commit.write_run_record = slow\n"
            "console(['run', sys.argv[1], sys.argv[2], '--model', sys.argv[3], '--no-progress'])\n")
    proc, out = _one_video_run(media, shapes_model, tmp_path, code)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("rayvid: terminated (SIGTERM)"), proc.stderr[-3000:]
    [record] = [json.loads(p.read_text()) for p in (out / "runs").iterdir()]
    assert record["status"] == "failed" and "SystemExit: 15" in json.dumps(record), record


def test_a_local_ray_that_cannot_start_is_one_line(media, shapes_model, tmp_path):
    """An embedded Ray that could not start (here RAY_TMPDIR a file; under a load average of
    40, "The current node timed out during startup") was a traceback, exit 1: now one line,
    exit 2, and nothing written."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "rayvid", "run", str(media["videos"]), str(tmp_path / "out"),
                           "--model", shapes_model["path"]], env={**env, "RAY_TMPDIR": str(not_a_folder)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert re.fullmatch(r"rayvid: error: cannot start a local Ray: .*Not a directory.* \(another try may start it "
                        r"where the machine was busy; or start Ray yourself, `ray start --head`, and give "
                        r"--address auto\)", proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_after_a_run_the_callers_sigterm_handler_is_back(media, shapes_model, tmp_path):
    """ray.init puts Ray's SIGTERM handler in, and its shutdown left the system's default
    under it: a SIGTERM after `pipeline.run` returned ended a library caller's process, its
    own handler never called. Now the caller's handler is back (for the `rayvid` command,
    Python's default: exit 143)."""
    code = ("import os, signal, sys, time\n"
            "from rayvid import pipeline\n"
            "from rayvid.config import ModelConfig, RunConfig\n"
            "def mine(signum, frame):\n"
            "    print('mine', signum, flush=True); os._exit(0)\n"
            "signal.signal(signal.SIGTERM, mine)\n"
            "pipeline.run(RunConfig(input=sys.argv[1], output=sys.argv[2], model=ModelConfig(name=sys.argv[3]),\n"
            "                       progress=False))\n"
            "assert signal.getsignal(signal.SIGTERM) is mine\n"
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n")
    proc, _ = _one_video_run(media, shapes_model, tmp_path, code)
    assert (proc.returncode, proc.stdout.splitlines()[-1:]) == (0, ["mine 15"]), proc.stderr[-2000:]


def test_a_ctrl_c_inside_rays_shutdown_waits_for_its_end():
    """Ctrl-C while `ray.shutdown()` ran ended the process through Ray's C++ ("The core worker
    has already been shutdown ... will exit"), exit 1: the signal is held until the shutdown
    is done, then raised as KeyboardInterrupt (exit 130 with rayvid's line)."""
    code = ("import os, signal, sys, time\n"
            "from rayvid import pipeline\n"
            "done = False\n"
            "try:\n"
            "    with pipeline._sigint_after():\n"
            "        os.kill(os.getpid(), signal.SIGINT); time.sleep(0.3); done = True\n"
            "except KeyboardInterrupt:\n"
            "    sys.exit(42 if done else 1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 42, proc.stderr
