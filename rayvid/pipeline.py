"""The job, top to bottom: list -> decode -> infer -> commit.

    listing.list_videos      INPUT                 -> video_uri rows
    segments.plan_all        header probes         -> one row per segment of a long video
    decode.Decoder           CPU actor pool        -> uint8 frames at model size
    infer.Predictor          GPU (or CPU) actors   -> top-k rows
    commit.Committer         the driver            -> OUTPUT/predictions, errors, runs

Ray Data streams between the stages, so decoding, inference and committing overlap; each
stage's actor pool and resources are planned from the cluster in `resources.plan_resources`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, NoReturn, Optional

import pyarrow as pa

from rayvid import __version__, commit, decode, infer, listing, models, resources, segments, storage, video
from rayvid.config import ModelConfig, RunConfig, SamplingConfig
from rayvid.errors import ConfigError, ModelError, RayvidError, StorageError, StorageUnavailable

log = logging.getLogger("rayvid")


@dataclass
class RunResult:
    run_id: str
    output: str
    model: str
    videos_listed: int = 0
    videos_skipped: int = 0  # already committed by an earlier run into the same OUTPUT
    videos_skipped_failed: int = 0  # of those, the ones that failed then (--retry-failed redoes them)
    videos_ok: int = 0
    videos_failed: int = 0
    frames: int = 0
    frames_reused: int = 0  # --skip-similar: frames that repeat an earlier frame's prediction
    bytes_read: int = 0  # read by the decoders from remote stores (0: local videos)
    bytes_remote: int = 0  # the listed size of the remote videos it published
    wall_s: float = 0.0
    files: list = field(default_factory=list)
    top_labels: list = field(default_factory=list)
    plan: Optional[dict] = None
    inference: Optional[dict] = None  # infer.Reports.summary(): model busy vs waiting
    # `run(dry_run=True)`: what the run would do, nothing done: videos (to decode), bytes
    # (their listed sizes, where known), segments, unknown_sizes, input_size, clip_len
    dry_run: Optional[dict] = None

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0


def run(cfg: RunConfig, dry_run: bool = False) -> RunResult:
    """The job (a RunResult of what it did). `dry_run`: everything up to the first write
    (list INPUT, read what OUTPUT has without repairing it, load the model's shape, plan the
    segments and pools), then a RunResult of what the run would do (`dry_run`), nothing
    written."""
    import ray

    started = time.time()
    if storage.read_only(cfg.output):  # (before the listing and Ray: its first write was a traceback)
        raise StorageError(f"cannot write OUTPUT {storage.public_uri(cfg.output)}: an http(s):// URL is read-only; "
                           f"give a local folder or an object store's (s3://, gs://)")
    videos = listing.list_videos(cfg.input, cfg.limit)
    # The decoders need the model's input shape; where its name or file says it, the model
    # loads only in the inference actors, while everything before them starts.
    shape = models.static_shape(cfg.model)
    name = models.display_name(cfg.model)
    # (ray.init puts Ray's SIGTERM handler in, its shutdown leaves the system's default under it)
    sigterm_before = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    we_started_ray = _connect(cfg.address)
    from ray.data import DataContext

    _quiet_ray_data_about_our_stops()
    # before any dataset (planning's included): each copies the context as it is made
    DataContext.get_current().enable_progress_bars = cfg.progress
    record = {"run_id": cfg.run_id, "status": "running", "config": cfg.to_dict(),
              "started_at": commit.record_time(started), "versions": _versions()}
    finished = False
    try:
        _refuse_live_run_id(cfg, warn=not dry_run)  # (at once: and again before its listing and record are written)
        work = _plan_work(ray, cfg, videos, shape, name, we_started_ray, repair=not dry_run)
        result, info = work.result, work.info
        # a manifest's videos: what another run over some of them would find (and this run's listing)
        mine = work.videos.column("video_uri") if listing.is_manifest(cfg.input) else None
        if dry_run:
            # (as a run would stop at its start: another live run over the same INPUT or videos;
            # its record would be written now)
            commit.Rivals(cfg.output, dict(_redacted(record), recorded_at=time.time()), videos=mine).refuse_earlier()
            result.dry_run = _would_do(work)
            return result  # (before anything is written: no record, no listing, no retraction)
        record["plan"] = result.plan  # in every record of the run: running, failed, finished
        record["stats"] = _progress(result, None)  # (listed and skipped are known now: a run killed early says them)
        _refuse_live_run_id(cfg, warn=False)  # (before its listing and record, which would overwrite that run's)
        if mine is not None:  # before the record: a run that sees the record sees this
            _write_listing(cfg, mine)
            record["listing"] = True
        beat = _write_first_record(cfg, record)
        committer, retracted = None, False
        try:
            # an earlier run, alive, over INPUT or (manifests) over videos listed here too: stop
            rivals = commit.Rivals(cfg.output, _redacted(record), videos=mine)
            rivals.check_now()
            _drop_committed_meanwhile(cfg, work)
            committer = commit.Committer(cfg.output, cfg.run_id, name, listed=commit.Listed(work.videos),
                                         flush_interval_s=cfg.commit_interval_s, guard=rivals.check)
            beat.progress = lambda: _progress(result, committer)
            # --retry-failed: old errors go once the model is known to load (the first batch)
            if work.units is not None:
                reports = _reports_actor(ray)
                ds = _dataset(ray, cfg, work.units, work.shape, work.plan, reports, work.clip_len)
                try:  # (the commit interval is kept also while no block comes)
                    with committer.publishing_while_idle(every_s=min(5.0, max(0.5, cfg.commit_interval_s))):
                        for batch in results(ds):
                            if not retracted:
                                commit.retract(cfg.output, work.redo, work.committed, cfg.run_id)
                                retracted = True
                            committer.add(batch)
                except Exception as e:
                    _raise_model_error(ray, reports)  # the model could not load: say why, as it is
                    _raise_if_storage(e, cfg.output, work.videos, committer)
                    raise
                loaded, result.inference = _reports(ray, reports, committer.frames - committer.reused
                                                    + committer.dropped_inferred)
                info = info or loaded
            try:  # the last writes into OUTPUT: an outage here is one too
                if not retracted:
                    commit.retract(cfg.output, work.redo, work.committed, cfg.run_id)
                    retracted = True
                committer.close()
            except Exception as e:
                _raise_if_storage(e, cfg.output, work.videos, committer)
                raise
        except BaseException as e:
            stopped = beat.stop(wait_s=HEARTBEAT_STOP_S)  # a beat stuck in a store's retries is not waited for
            # (after an outage `_not_done` tried already; before a retraction old rows are there)
            if committer is not None and (retracted or not work.redo) and not isinstance(e, StorageUnavailable):
                _publish_complete(committer, e)
            # a copy: a beat still writing (stop's wait ran out) reads `record` meanwhile
            failed = dict(record, status="failed", error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
                          finished_at=commit.record_time(time.time()), model=info.to_dict() if info else {"name": name},
                          stats={**_progress(result, committer), "wall_s": round(time.time() - started, 3)})
            if not isinstance(e, commit.RunIdTaken):  # (else the record and listing are the other run's)
                _record_failure(cfg, _redacted(failed), beat, stopped)
                if mine is not None:
                    commit.forget_run_listing(cfg.output, cfg.run_id)
            raise
        beat.stop()
        _record_finished(cfg, record, result, committer, info, name, started)
        if mine is not None:
            commit.forget_run_listing(cfg.output, cfg.run_id)
        finished = True
    finally:
        if we_started_ray:
            # a Ctrl-C inside Ray's shutdown ends the process with Ray's C++ error, exit 1: held
            # till it is done; after a run that finished (its record says so) it stops nothing
            try:
                with _sigint_after(raise_after=not finished):
                    try:
                        ray.shutdown()
                    except SystemExit as e:  # Ray's SIGTERM handler (sys.exit(15)): after a finished run, too late
                        if not finished or e.code != signal.SIGTERM:
                            raise
                        log.warning("SIGTERM while Ray shut down, after the run had finished: nothing was stopped")
                        ray.shutdown()  # (the rest of it)
            finally:  # the caller's SIGTERM handler, as before the run (a library's caller: its own)
                if sigterm_before is not None:
                    signal.signal(signal.SIGTERM, sigterm_before)
    return result


@dataclass
class _Work:
    """What a run is to do, found before its first write: the videos left to decode (listed,
    less those committed, with --retry-failed's failed ones back), their segments, the model's
    shape and the pools."""

    videos: pa.Table
    committed: commit.Committed
    redo: set  # URIs of committed videos this run does again (changed, or failed and retried)
    units: Optional[pa.Table]  # segments.plan_all of `videos` (None: nothing to do)
    shape: models.Shape
    info: Optional[models.ModelInfo]  # where the model loaded in a worker to learn its shape
    clip_len: int
    plan: resources.Plan
    result: RunResult  # listed and skipped counts, and the plan; the rest filled in by the run


def _plan_work(ray, cfg: RunConfig, videos: pa.Table, shape: Optional[models.Shape], name: str,
               we_started_ray: bool, repair: bool) -> _Work:
    """Read what OUTPUT has committed (`repair`: finish or undo a dead run's half-writes, as a
    run does; else read them as they are), plan the segments, learn the model's shape, size
    the pools for the cluster, and warn about settings. Writes nothing but `repair`'s."""
    # where the shape is not in the model's name or file, the model loads once in a worker
    # while the driver reads what is committed and plans segments from the videos' headers
    probe = None if shape else _probe_model(ray, cfg)
    committed = _recover(cfg, videos, repair=repair)
    listed = videos
    videos, skipped, redo = commit.pending(listed, committed, cfg.retry_failed)
    failed_before, skipped_runs = commit.skipped_by(listed, committed, redo, cfg.output) if skipped else (0, [])
    _warn_if_settings_differ(cfg, skipped_runs)
    units = segments.plan_all(videos, cfg.decode.segment_s) if len(videos) else None
    info = probe() if probe else None
    shape = info.shape if info else shape
    clip_len = _clip_len(cfg, shape.clip_len)  # (a --clip-len the model refuses: before the cluster's checks)
    if len(videos) and committed.files:  # a head OUTPUT's predictions have not: said now, not at the first commit
        commit.check_head_planned(cfg.output, bool(cfg.model.embed), cfg.model.head == "detect", clip_len > 0)
    # an embedded local Ray, started here: no node is to come
    embedded = we_started_ray and not (cfg.address or os.environ.get("RAY_ADDRESS"))
    shape_now = dict(resources.cluster_shape(ray), embedded=embedded)
    plan = resources.plan_resources(cfg, shape_now, len(listed), remote=_any_remote(videos),
                          n_units=len(units) if units is not None else 0)
    resources.warn_about(shape_now, plan, cfg)
    resources.warn_if_local_on_cluster(ray, videos, shape_now)
    result = RunResult(cfg.run_id, cfg.output, name, videos_listed=len(listed), videos_skipped=skipped,
                       videos_skipped_failed=failed_before, plan=dataclasses.asdict(plan))
    return _Work(videos, committed, redo, units, shape, info, clip_len, plan, result)


def _drop_committed_meanwhile(cfg: RunConfig, work: _Work) -> None:
    """Another run over these videos may have committed some between this run's read of
    OUTPUT and its record (planning: the videos' headers and the model, minutes over a
    large INPUT), and ended since: no live run then stops either (a reviewer's find: both
    committed them). Once the record is written, the videos/ parts that appeared since the
    read are read (only those), and what this run knows committed is as they say: their
    videos leave its work as `pending` skips them, and those it still does (changed, or
    failed with --retry-failed) are retracted from them too, as any redone video is (a
    compaction meanwhile renamed the parts the first read knew: its part is read too)."""
    if work.units is None:
        return
    fs, root = storage.resolve(cfg.output)
    for attempt in range(3):  # (a part deleted between the listing and its read: a compaction's, done)
        try:
            new = set(commit.part_sizes(fs, f"{root.rstrip('/')}/{commit.VIDEOS_DIR}")) - set(work.committed.files)
            if not new:
                return
            since = commit.recover(cfg.output, only=work.videos.column("video_uri"), repair=False, parts=new)
            break
        except FileNotFoundError as e:
            if attempt == 2 or storage.is_unavailable(e):
                raise _unreadable_output(cfg, e) from None
        except (*storage.ACCESS_ERRORS, ValueError) as e:
            raise _unreadable_output(cfg, e) from None
    if not len(since):
        return
    import pyarrow.compute as pc

    since.mark_changed(work.committed.doubled)  # (a double moved by a compaction meanwhile: still one)
    left, skipped, redo = commit.pending(work.videos, since, cfg.retry_failed)
    failed, _ = commit.skipped_by(work.videos, since, redo) if skipped else (0, [])
    work.committed = work.committed.merged(since)
    keep = left.column("video_uri")
    ours = since.table.column("video_uri")
    work.redo = (work.redo - set(ours.filter(pc.invert(pc.is_in(ours, value_set=keep))).to_pylist())) | redo
    if skipped:
        work.units = work.units.filter(pc.is_in(work.units.column("video_uri"), value_set=keep))
        work.videos = left
        work.result.videos_skipped += skipped
        work.result.videos_skipped_failed += failed
        if not len(work.units):
            work.units = None
        log.info("%d videos committed by another run while this one planned: skipped", skipped)


def _would_do(work: _Work) -> dict:
    """`run(dry_run=True)`'s account: videos to do, their known bytes, segments, frame size."""
    import pyarrow.compute as pc

    sizes = pc.fill_null(work.videos.column("size_bytes"), -1)
    known = pc.fill_null(pc.greater_equal(sizes, 0), False)  # (NaN, -1, null: not known)
    return {"videos": len(work.videos), "bytes": int(pc.sum(pc.if_else(known, sizes, 0)).as_py() or 0),
            "unknown_sizes": len(work.videos) - int(pc.sum(known.cast(pa.int64())).as_py() or 0),
            "segments": len(work.units) if work.units is not None else 0,
            "input_size": list(work.shape.input_size), "clip_len": work.clip_len}


def _record_finished(cfg: RunConfig, record: dict, result: RunResult, committer: commit.Committer, info,
                     name: str, started: float) -> None:
    """The run's result and its last write, its record saying it finished (before Ray
    shuts down: a Ctrl-C or SIGTERM there leaves the record as true as the output)."""
    result.videos_ok, result.videos_failed = committer.videos_ok, committer.videos_failed
    result.frames, result.files = committer.frames, committer.files
    result.frames_reused = committer.reused
    result.bytes_read, result.bytes_remote = committer.bytes_read, committer.bytes_remote
    result.top_labels = committer.label_counts.most_common(5)
    result.wall_s = time.time() - started
    record.update(
        status="finished",
        finished_at=commit.record_time(time.time()),
        model=info.to_dict() if info else {"name": name},  # no info: no video needed the model
        plan=result.plan,
        stats={
            "videos_listed": result.videos_listed,
            "videos_skipped": result.videos_skipped,
            "videos_skipped_failed": result.videos_skipped_failed,
            "videos_ok": result.videos_ok,
            "videos_failed": result.videos_failed,
            "frames": result.frames,
            "frames_inferred": result.frames - result.frames_reused,
            "bytes_read": result.bytes_read,
            "bytes_remote": result.bytes_remote,
            "duplicate_rows_dropped": committer.duplicates_dropped,
            "wall_s": round(result.wall_s, 3),
            "frames_per_s": round(result.frames_per_s, 2),
            "files": result.files,
            "top_labels": result.top_labels,
            "inference": result.inference,
        },
    )
    try:  # the run's last write: every video is committed by now
        commit.write_run_record(cfg.output, cfg.run_id, _redacted(record))
    except storage.ACCESS_ERRORS as e:
        _raise_as_storage(e, cfg.output, f"every video is committed, only this run's record "
                                         f"({commit.RUNS_DIR}/{cfg.run_id}.json) does not say it finished: "
                                         f"nothing to run again")


# How long a failing run waits for its heartbeat's write in flight, and then for its
# `failed` record to be written: where OUTPUT is what is down, each would take the store
# client's whole retries (gcsfs: about 35 s), and the run's one-line error would wait on them.
HEARTBEAT_STOP_S = 5.0
FAILED_RECORD_WAIT_S = 15.0


@contextlib.contextmanager
def _sigint_after(raise_after: bool = True):
    """Hold SIGINT back while the body runs (a handler that notes it, in the main thread);
    one that came meanwhile goes to the handler before it once the body is done: a
    KeyboardInterrupt then, out of a body that finished. Without `raise_after` (there is
    nothing left to stop) it is only said."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
    if came and not raise_after:
        log.warning("Ctrl-C while Ray shut down, after the run had finished: nothing was stopped")
    elif came:
        if callable(before):
            before(signal.SIGINT, None)
        elif before == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def _record_failure(cfg: RunConfig, record: dict, beat: commit.Heartbeat, stopped: bool) -> None:
    """Write the failed run's record after any beat still writing (so the record says
    failed, not running), waiting at most FAILED_RECORD_WAIT_S: past that the run ends with
    a warning, and `rayvid runs` shows it interrupted (a write that lands later still says failed)."""
    def write() -> None:
        try:
            if not stopped:
                beat.join()
            commit.write_run_record(cfg.output, cfg.run_id, record)
        except storage.ACCESS_ERRORS as write_error:  # OUTPUT may be what is down
            log.warning("cannot record the failed run: %s", storage.describe(write_error))

    writer = threading.Thread(target=write, name="rayvid-failed-record", daemon=True)
    writer.start()
    writer.join(FAILED_RECORD_WAIT_S)
    if writer.is_alive():
        log.warning("cannot record the failed run: OUTPUT did not answer in %g s (`rayvid runs` shows the run "
                    "interrupted)", FAILED_RECORD_WAIT_S)


def _clip_len(cfg: RunConfig, fixed: int) -> int:
    """Frames per model input: 0 for image models; for video models --clip-len, else the
    N the model fixes (`fixed`: models.Shape.clip_len)."""
    asked = cfg.sampling.clip_len or 0
    name = models.display_name(cfg.model)
    if fixed == 0:
        if asked:
            raise ConfigError(f"--clip-len needs a video model (input [batch, N, H, W, 3]); "
                              f"{name} takes single frames")
        return 0
    if fixed > 0 and asked and asked != fixed:
        raise ConfigError(f"--clip-len {asked}, but {name} takes clips of {fixed} frames")
    if fixed < 0 and not asked:
        raise ConfigError(f"{name} takes clips of any length: pass --clip-len N")
    return asked or fixed


def _dataset(ray, cfg: RunConfig, units: pa.Table, shape: models.Shape, plan: resources.Plan, reports=None,
             clip_len: int = 0):
    """The Ray Data graph: one block per segment (or small group) -> decode -> infer."""
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    # Ray Data coalesces a stage's output batches into blocks of up to this size (default
    # 128 MiB): capped at decode.batch_bytes (32 MiB, about 200 frames at 224x224), frames reach
    # inference a few decode batches after they are decoded, not hundreds.
    ctx.target_max_block_size = cfg.decode.batch_bytes
    blocks = [units.slice(i, plan.units_per_block) for i in range(0, len(units), plan.units_per_block)]
    # from_blocks keeps each block as it is and reads its metadata here; from_arrow would
    # run a task to read it (measured: ~1 s before the first actor starts, 5 s per 1000 blocks)
    ds = ray.data.from_blocks(blocks)
    ds = ds.map_batches(
        decode.Decoder,
        fn_constructor_kwargs=dict(
            size=shape.input_size,
            every=cfg.sampling.every,
            fps=cfg.sampling.fps,
            keyframes=cfg.sampling.keyframes,
            skip_similar=cfg.sampling.skip_similar,
            clip_len=clip_len,
            clip_stride=cfg.sampling.clip_stride or clip_len,
            decoder=cfg.decode.decoder,
            threads=cfg.decode.threads,
            large_source_threads=plan.decode_threads,
            large_source_pixels=video.LARGE_SOURCE_PIXELS,  # the driver's: what the bench sets reaches the actors
            batch_frames=cfg.decode.batch_frames,
            batch_bytes=cfg.decode.batch_bytes,
            timeout_s=cfg.decode.timeout_s,
            retries=cfg.decode.retries,
        ),
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(
            min_size=plan.decode_min, max_size=plan.decode_max,
            max_concurrent_calls_per_actor=plan.decode_calls, enable_true_multi_threading=plan.decode_calls > 1,
        ),
        **decode.resources(int(plan.decode_cpus)),
    )
    ds = ds.map_batches(
        infer.Predictor,
        fn_constructor_kwargs=dict(
            model=cfg.model, batch_size=max(1, plan.batch_size // max(1, clip_len)),
            # on GPU the CPUs it holds; on CPU all the node's cores (infer.cpu_threads)
            threads=max(1, int(plan.infer_cpus)) if plan.infer_gpus else 0,
            reports=reports,
            clip_len=clip_len,
        ),
        batch_size=max(1, plan.batch_size // max(1, clip_len)),  # clips: about as many frames
        batch_format="numpy",
        compute=ActorPoolStrategy(
            min_size=plan.infer_min, max_size=plan.infer_max, initial_size=plan.infer_min,
            max_concurrent_calls_per_actor=infer.CALLS_PER_ACTOR, enable_true_multi_threading=True,
        ),
        **infer.resources(plan.infer_gpus, plan.infer_cpus),
    )
    return ds


def _any_remote(videos: pa.Table) -> bool:
    """Whether any listed video is on a remote filesystem (the listing writes local files as
    absolute paths, everything else as URLs)."""
    import pyarrow.compute as pc

    return len(videos) > 0 and pc.any(pc.match_substring(videos.column("video_uri"), "://")).as_py()


def results(ds):
    """The dataset's output blocks (pyarrow), each as soon as it exists, so the committer
    publishes a finished video while later ones are still being inferred. (A read-ahead
    window, `prefetch_batches` > 0, is filled before the first block is handed over: with
    4 the driver saw nothing until the fifth video was done, on a short archive nothing
    until the last, and an interrupted run had to redo all of it.)"""
    return ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0)


def _reports_actor(ray):
    """The actor the inference actors report their model and timings to, on the driver's
    node (which lives as long as the job; a worker node may be reclaimed)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_restarts=0)(infer.Reports).options(scheduling_strategy=here).remote()


def _reports(ray, reports, inferred: int) -> tuple[Optional[models.ModelInfo], Optional[dict]]:
    """(the model the inference actors loaded, their timings), waiting briefly for their
    last reports, which may trail their last batch; (None, None) if they cannot be had:
    they are information, never a reason to fail a run."""
    deadline = time.monotonic() + 2.0
    try:
        while True:
            summary = ray.get(reports.summary.remote(), timeout=10)
            if summary["frames"] >= inferred or time.monotonic() > deadline:
                info, _ = ray.get(reports.outcome.remote(), timeout=10)
                return info, summary
            time.sleep(0.05)
    except (ray.exceptions.RayError, TimeoutError) as e:
        log.warning("no inference reports: %s", storage.redact(str(e)))
        return None, None


# model settings that do not decide a video's rows: how fast they come, and where a model
# file's code is (weights and name are compared on their own, below)
_SPEED_ONLY = ("name", "weights", "mixed_precision", "xla", "custom_objects")


def _settings(config: dict) -> dict:
    """What decides a committed video's rows: the model (name, weights, output, and the rest
    of its settings: --topk, --preprocess, --embed, the detection head's...) and the sampling.
    A setting a record lacks (a run from before it existed) is its default; `--preprocess
    auto` and no `--input-size` are what they resolve to where the name says it."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    name, weights = model.get("name"), model.get("weights")
    if name in models.APPLICATIONS:  # (no weights: ImageNet's, as `--weights imagenet`)
        weights = weights or "imagenet"
    else:  # a model file's own (a run before they were refused with one recorded them, unused)
        weights = None
    rest = {f.name: model.get(f.name, f.default) for f in dataclasses.fields(ModelConfig) if f.name not in _SPEED_ONLY}
    if isinstance(rest["input_size"], tuple):  # (JSON: a list)
        rest["input_size"] = list(rest["input_size"])
    # as the model resolves them, where that is known without it: `auto` is an application's
    # own preprocessing (a file's: raw), no --input-size an application's default size
    if rest["preprocess"] == "auto":
        rest["preprocess"] = models.APPLICATIONS[name][2] if name in models.APPLICATIONS else "raw"
    if rest["input_size"] is None and name in models.APPLICATIONS:
        rest["input_size"] = [models.APPLICATIONS[name][1]] * 2
    if rest["head"] != "detect":  # (settings of a head or an output the run did not use: none)
        rest.update(max_boxes=None, iou_threshold=None, min_box_score=None)
    if not rest["embed"]:
        rest["embed_normalize"] = None
    sampling = config.get("sampling")
    if isinstance(sampling, dict):
        sampling = {f.name: sampling.get(f.name, f.default) for f in dataclasses.fields(SamplingConfig)}
    return {"model": name, "weights": weights, **rest, "sampling": sampling}


def _warn_if_settings_differ(cfg: RunConfig, runs: list) -> None:
    """Committed videos are skipped whatever this run's settings: say so, and how many,
    where the runs that committed them (`runs`: (run_id, videos), their records; the 20
    holding most) had another model or sampling."""
    if not runs:
        return
    fs, root = storage.resolve(cfg.output)
    now = _settings(json.loads(json.dumps(_redacted({"config": cfg.to_dict()})["config"], default=str)))
    other, skipped = {}, 0
    for run_id, n in runs[:20]:
        record = commit.read_run_record(fs, root.rstrip("/"), run_id)
        config = record.get("config") if isinstance(record, dict) else None
        if isinstance(config, dict) and _settings(config) != now:
            other[run_id] = _settings(config)
            skipped += n
    if other:
        was = next(iter(other.values()))
        shown = "; ".join(f"{k}: {was[k]!r}, now {now[k]!r}" for k in now if was[k] != now[k])
        runs_shown = ", ".join(list(other)[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        log.warning("OUTPUT already holds %d of the listed videos, committed by %s with other settings (%s): they "
                    "are skipped, not redone, and this run's settings apply to the other videos only; to classify "
                    "every video this way, write into a new OUTPUT", skipped, runs_shown, shown)


def _progress(result: RunResult, committer: Optional[commit.Committer]) -> dict:
    """A run's counts of what it has committed so far (its record's `stats` until it ends)."""
    done = committer.done() if committer is not None else {"videos_ok": 0, "videos_failed": 0, "frames": 0}
    return {"videos_listed": result.videos_listed, "videos_skipped": result.videos_skipped,
            "videos_skipped_failed": result.videos_skipped_failed, **done}


class _OurStop(logging.Filter):
    """Marks Ray Data's log records about a stage's exception `hide` (its console handler
    drops them; its log file keeps them) where that exception is rayvid's own stop (a
    RayvidError: a store outage a decode actor met): Ray Data logs it with its full traceback,
    and calls it possibly a Ray bug, before the driver says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]  # (logged inside `except`)
        if _ours(error):
            record.hide = True
        return True


def _ours(error: Optional[BaseException]) -> bool:
    return any(isinstance(e, RayvidError) or _died_of_ours(e) for e in _causes(error))  # (RayTaskError(X) is an X)


def _died_of_ours(error: BaseException) -> bool:
    """An actor whose constructor raised a RayvidError (an inference actor that cannot load
    its model, which told the driver why): Ray keeps that error as text only."""
    from ray.exceptions import RayActorError

    return isinstance(error, RayActorError) and bool(getattr(error, "actor_init_failed", False)) and \
        "rayvid.errors." in str(error)


def _causes(error: Optional[BaseException]) -> Iterator[BaseException]:
    """`error`, then what caused it (Ray's `cause` of a task's error first), each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__


# Where Ray Data 2.60 logs a stage's exception: when the executor fetches the failed block,
# and when the dataset's iterator raises it (as "internal code" where it is no UserCodeException).
# (and an actor pool's "actors died during initialization", where that is the model's stop)
RAY_DATA_ERROR_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions",
                          "ray.data._internal.execution.operators.actor_pool_map_operator")


def _quiet_ray_data_about_our_stops() -> None:
    for name in RAY_DATA_ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OurStop) for f in logger.filters):
            logger.addFilter(_OurStop())
    _quiet_retries_of_our_stops()


# A failed actor task Ray retries, as its driver prints it (Ray 2.60's `listen_error_messages`:
# "(raylet) Task MapWorker(MapBatches(Predictor)).get_location failed. There are infinite
# retries remaining, so the task will be retried. Error: Traceback ...").
_RETRIED_TASK = re.compile(r"Task MapWorker\(.*?\)\.\w+ failed\. There are .*? retries remaining")


def _quiet_retries_of_our_stops() -> None:
    """Ray's driver prints each failed task of an actor it will retry, whole traceback and
    all, on stdout: about 100 lines where an inference actor stopped on rayvid's own error (a
    model that cannot load: the driver says why in one line), a few where Ray Data killed its
    actors as an interrupted run stopped. Those are not printed; any other (a worker that
    died, killed for memory) is, as before. Ray's printer stays where it is for anything else
    (worker logs are not touched)."""
    from ray._private import worker

    printer = worker.print_to_stdstream  # (looked up by name at each message)
    if getattr(printer, "rayvid_filter", False):
        return

    def unless_ours(data, ignore_prefix):
        if data.get("pid") == "raylet" and _retry_of_our_stop("\n".join(map(str, data.get("lines") or []))):
            return
        printer(data, ignore_prefix)

    unless_ours.rayvid_filter = True
    worker.print_to_stdstream = unless_ours


def _retry_of_our_stop(text: str) -> bool:
    """A retried actor task's failure (`_RETRIED_TASK`) whose error is rayvid's own (a
    RayvidError, an actor's constructor's included) or Ray Data's ray.kill of its actors."""
    return bool(_RETRIED_TASK.match(text)) and ("rayvid.errors." in text
                                                 or "The actor is dead because it was killed by `ray.kill`." in text)


def _raise_model_error(ray, reports) -> None:
    """Raise the error an inference actor reported before it died loading the model (a
    ModelError or ConfigError, with its message), if one did."""
    try:
        _, error = ray.get(reports.outcome.remote(), timeout=10)
    except (ray.exceptions.RayError, TimeoutError):
        return
    if error is not None:
        kind, message = error
        raise {"ConfigError": ConfigError}.get(kind, ModelError)(message) from None


def _unavailable(error: BaseException, output: str) -> Optional[str]:
    """The message of a storage outage behind `error` (raised by a decode actor, or by the
    committer writing OUTPUT), or None for any other failure."""
    for e in _causes(error):
        if isinstance(e, StorageUnavailable):  # (its first line: Ray Data appends its retry advice)
            return (str(e.args[0]) if e.args else str(e)).strip().splitlines()[0]
        if isinstance(e, storage.ACCESS_ERRORS) and storage.is_unavailable(e):
            return f"storage unreachable writing OUTPUT {storage.public_uri(output)}: {storage.describe(e)}"
    return None


def _publish_complete(committer: commit.Committer, failure: BaseException) -> None:
    """On a failure (an exception, a Ctrl-C): commit the videos already complete, which
    would otherwise wait for the next flush, so the next run does not redo them."""
    try:
        committer.flush()
    except Exception as e:  # noqa: BLE001 - the run fails with its own error, not this one
        if str(e) != str(failure):  # (the flush that failed the run, failing again: said once)
            log.warning("could not commit the videos complete when the run failed: %s", storage.redact(str(e)))


def _raise_if_storage(error: BaseException, output: str, videos: pa.Table, committer: commit.Committer) -> None:
    """Where `error` is the store's, not a bug: StorageUnavailable for an outage (from a
    decode actor or the driver); StorageError where the store refuses the driver's writes
    into OUTPUT (access denied, a bucket gone, a quota). Each says what is not done."""
    from ray.exceptions import RayError

    if _unavailable(error, output) is not None or (isinstance(error, storage.ACCESS_ERRORS)
                                                   and not isinstance(error, RayError)):  # (an actor's: a bug)
        _raise_as_storage(error, output, _not_done(videos, committer))


def _raise_as_storage(error: BaseException, output: str, status: str) -> None:
    """StorageUnavailable where `error` is a storage outage, else StorageError (the store
    refused a write into OUTPUT), each followed by `status`: what is done, what is not."""
    down = _unavailable(error, output)
    if down is not None:
        raise StorageUnavailable(f"{down}; {status}") from None
    raise StorageError(f"cannot write to OUTPUT {storage.public_uri(output)}: {storage.describe(error)}; "
                       f"{status}") from None


def _not_done(videos: pa.Table, committer: commit.Committer) -> str:
    """What a storage outage left undone, and how to finish it."""
    try:
        committer.flush()  # publish what is complete, if OUTPUT is reachable
    except storage.ACCESS_ERRORS:
        pass
    uris = videos.column("video_uri").to_pylist()
    missing = [u for u in uris if u not in committer.committed]
    first = ", ".join(storage.public_uri(u) for u in missing[:3])
    return (f"{len(missing)} of {len(uris)} videos not committed (first: {first}); "
            f"run the same command again to finish them")


def _connect(address: Optional[str]) -> bool:
    """Connect to RAY_ADDRESS / --address, or start an embedded local Ray. True if started."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:  # (also where this process joined a Ray before: an address that cannot be is said)
        _check_reachable(address)
    if ray.is_initialized():
        return False
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address:
        try:
            with _no_failure_signal_handler():
                ray.init(address=address, **kwargs)
        except (ValueError, ConnectionError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "@" in address and "://" not in address:  # (user-info however Ray spells the address)
                why = why.replace(address.rsplit("@", 1)[0] + "@", "***@")
            raise ConfigError(f"cannot connect to the Ray cluster at {_shown_address(address)}: "
                              f"{storage.redact(why)}") from None
        _sigterm_without_abort()
        return True
    # "local": always a fresh embedded instance, never one a `ray start` left on this machine
    try:
        with _no_failure_signal_handler():
            ray.init(address="local", include_dashboard=False, **kwargs)
    except (OSError, RuntimeError) as e:  # (RAY_TMPDIR not a folder, a disk full, no ports)
        _no_local_ray(ray, e)
    except Exception as e:  # noqa: BLE001 - Ray's start-up timeout is a bare Exception; others are bugs
        if type(e) is not Exception:
            raise
        _no_local_ray(ray, e)
    _sigterm_without_abort()
    return True


def _no_local_ray(ray, error: BaseException) -> NoReturn:
    """ConfigError, in one line, for an embedded Ray that could not start ("The current node
    timed out during startup": its raylet did not register in 30 s, on a machine loaded to
    a load average of 40; a RAY_TMPDIR that is not a folder); what it started is stopped."""
    with contextlib.suppress(Exception):
        ray.shutdown()
    if isinstance(error, OSError):
        why = storage.describe(error)
    else:
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise ConfigError(f"cannot start a local Ray: {why} (another try may start it where the machine was busy; "
                      f"or start Ray yourself, `ray start --head`, and give --address auto)") from None


@contextlib.contextmanager
def _no_failure_signal_handler():
    """Keep Ray's C++ failure-signal handler (abseil's) out of this driver while it joins
    Ray, by Ray's own switch (RAY_DISABLE_FAILURE_SIGNAL_HANDLER, read when the driver's core
    worker starts; its workers keep theirs): `ray.shutdown` took it off SIGTERM for its last
    second or so by setting the system's default there, under Python's handler, so a
    SIGTERM then ended a finished run with 143, unsaid (a QA find). The switch is put back
    as it was once joined: a library caller's own later `ray.init` is Ray's as usual.
    (`_sigterm_without_abort` stays: a Ray that does not read the switch.)"""
    try:
        from ray._private import ray_constants
    except ImportError:
        yield
        return
    before = ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        yield
    finally:
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = before


def _sigterm_without_abort() -> None:
    """Put Python's SIGTERM handler (Ray's own: sys.exit(15)) back over the C++ one that
    ray.init installs (abseil's failure-signal handler): that one printed a stack and set a
    3 s alarm that aborted the driver (SIGABRT) whatever it was doing then, a final commit or
    the failed run's record. A SIGTERM is the SystemExit the run winds down from, in its
    own time, a second one ignored; the command's exit is 143."""
    handler = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or handler is None:
        return
    if not callable(handler):
        signal.signal(signal.SIGTERM, handler)
        return

    def once(signum, frame):
        # another SIGTERM while this one winds the run down (a final commit, the failed
        # record) would cut that short: ignored (SIGKILL still ends the process)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        handler(signum, frame)

    signal.signal(signal.SIGTERM, once)


RAY_CONNECT_TIMEOUT_S = 10.0


def _shown_address(address: str) -> str:
    """A Ray address as messages show it: a URL's credentials out (`storage.redact`), and
    user-info before an "@" in one without a scheme (`user:pw@host:6379`, no Ray address's)."""
    shown = storage.redact(address)
    return "***@" + shown.rsplit("@", 1)[1] if "@" in shown and "://" not in shown else shown


def _check_reachable(address: str) -> None:
    """ConfigError, in one line, for a Ray address rayvid cannot join: the dashboard's
    http:// address (`ray job submit`'s, not the cluster's), or a host:port nothing answers
    at (Ray retried it for minutes, saying only that it could not connect)."""
    if address.lower().startswith(("http://", "https://")):
        raise ConfigError(f"--address/RAY_ADDRESS {_shown_address(address)} is a dashboard's URL (what `ray job "
                          f"submit --address` takes): give the cluster's address, host:6379 or auto")
    if address.lower().startswith("ray://"):  # (it failed inside Ray Data's executor: a traceback, exit 1)
        raise ConfigError(f"--address/RAY_ADDRESS {_shown_address(address)} is a Ray Client address: Ray Data's "
                          f"streaming executor does not run through Ray Client; submit the job to the cluster "
                          f"(`ray job submit --address http://HEAD:8265 -- python jobs/classify_videos.py ...`) "
                          f"or run rayvid on one of its nodes (--address auto)")
    if "://" in address or address in ("auto", "local"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # (Ray says what it makes of it)
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {_shown_address(address)}: {e.strerror or e} "
                          f"(is its head running? `ray status --address {_shown_address(address)}`)") from None


def _probe_model(ray, cfg: RunConfig):
    """Start loading the model once, in a throwaway worker (for models whose input shape
    only loading tells: models.static_shape); the returned function waits for it. A model
    that cannot load fails the job then, with the reason, before any frame is decoded.
    (Otherwise the inference actors' own load says it: `_raise_model_error`. Either way no
    committed row changes.)"""
    ref = ray.remote(num_cpus=1, max_retries=0, max_calls=1)(models.probe).remote(cfg.model)

    def result() -> models.ModelInfo:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, RayvidError):
                raise type(cause)(str(cause)) from None
            raise ModelError(f"cannot load model {models.display_name(cfg.model)}: "
                             f"{storage.redact(str(cause or e))}") from None
        except ray.exceptions.RuntimeEnvSetupError as e:  # the job's runtime env: no worker could run it
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
            why = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"  # (a traceback's last line says why)
            raise ModelError(f"cannot load model {models.display_name(cfg.model)}: the Ray worker loading it "
                             f"failed: {type(e).__name__}: {storage.redact(why)[:500]}") from None

    return result


def _recover(cfg: RunConfig, videos: pa.Table, repair: bool = True) -> commit.Committed:
    try:  # what OUTPUT has of these videos (a shard's, not every shard's)
        committed = commit.recover(cfg.output, only=videos.column("video_uri"), repair=repair)
    except (*storage.ACCESS_ERRORS, ValueError) as e:
        raise _unreadable_output(cfg, e) from None
    import pyarrow.compute as pc

    doubled = pa.array(sorted(committed.doubled), pa.string())
    doubled = doubled.filter(pc.is_in(doubled, value_set=videos.column("video_uri"))).to_pylist() if len(doubled) else []
    if doubled:  # (of those listed: a retraction's videos are read too)
        log.warning("%d of the listed videos are committed twice in OUTPUT (%s): they are read again, every copy "
                    "of their rows retracted first", len(doubled), ", ".join(storage.public_uri(u) for u in doubled[:3])
                    + (" and more" if len(doubled) > 3 else ""))
    for name, n_videos, frames in committed.lost:
        log.warning("%s/%s/%s is missing, though its videos/ file says it holds %d rows of %d videos: those "
                    "videos are read again", storage.public_uri(cfg.output).rstrip("/"), commit.PREDICTIONS_DIR,
                    name, frames, n_videos)
    return committed


def _refuse_live_run_id(cfg: RunConfig, warn: bool = True) -> None:
    try:
        commit.refuse_live_run_id(cfg.output, cfg.run_id, warn)
    except storage.ACCESS_ERRORS as e:
        raise _unreadable_output(cfg, e) from None


def _unreadable_output(cfg: RunConfig, error: BaseException) -> StorageError:
    fs, path = storage.resolve(cfg.output)
    a_file = isinstance(error, NotADirectoryError) and storage.is_local(fs) and os.path.isfile(path)
    why = "it is a file, not a folder" if a_file else storage.describe(error)
    return StorageError(f"cannot read OUTPUT {storage.public_uri(cfg.output)}: {why}")


def _write_listing(cfg: RunConfig, uris) -> None:
    try:
        commit.write_run_listing(cfg.output, cfg.run_id, uris)
    except (*storage.ACCESS_ERRORS, ValueError) as e:
        raise StorageError(f"cannot write to OUTPUT {storage.public_uri(cfg.output)}: {storage.describe(e)}") from None


def _write_first_record(cfg: RunConfig, record: dict) -> commit.Heartbeat:
    """The run record, written before any work (proves OUTPUT is writable, or says why not)
    and kept fresh while the run runs, so other runs into OUTPUT leave its work alone."""
    try:
        beat = commit.Heartbeat(cfg.output, cfg.run_id, record, _redacted)
        beat.start()
        return beat
    except (*storage.ACCESS_ERRORS, ValueError) as e:
        raise StorageError(f"cannot write to OUTPUT {storage.public_uri(cfg.output)}: {storage.describe(e)}") from None


def _versions() -> dict:
    import ray

    return {"rayvid": __version__, "ray": ray.__version__, "python": platform.python_version()}


def _redacted(record: dict) -> dict:
    """Run records hold URLs the user typed: keep no credentials in them. Which settings of
    its `config` lost some are listed under `redacted` (dotted paths: `input`,
    `model.labels`): a rerun from the record must be given those again (`cli`), and only
    those (a local path holding `***` was taken for one)."""
    taken: list = []

    def clean(v, path: str):
        if isinstance(v, str):
            out = storage.redact(v)
            if out != v and path.startswith("config."):
                taken.append(path[len("config."):])
            return out
        if isinstance(v, dict):
            return {k: clean(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, path) for x in v]
        return v

    out = clean(record, "")
    if isinstance(record.get("config"), dict):
        out["redacted"] = sorted(set(taken))
    return out
