"""The actor pools a run plans from the cluster it runs on: the decode pool (CPU actors,
kept off nodes labelled for inference), the inference pool (a GPU each where the cluster
has GPUs, else CPU actors), how many segments a Ray Data task holds, and what the
cluster's autoscaler will not do for the run (said as it starts).

Input: the cluster's shape (`cluster_shape`: Ray's resources, its nodes and their labels,
the node types its autoscaler can start) and the run's config. Output: a `Plan`, which
`pipeline._dataset` gives to Ray Data (`map_batches`' concurrency and resources)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import pyarrow as pa

from rayvid import decode
from rayvid.config import RunConfig
from rayvid.errors import ConfigError, RayvidError

log = logging.getLogger("rayvid")


@dataclass(frozen=True)
class Plan:
    """Actor pools and resources for one run on one cluster."""

    decode_min: int
    decode_max: int
    decode_cpus: float
    infer_min: int
    infer_max: int
    infer_gpus: float
    infer_cpus: float
    units_per_block: int
    batch_size: int = 32
    decode_threads: int = 1  # decoder threads per decode actor on HD and larger sources
    decode_calls: int = 1  # calls in hand per decode actor (remote videos: fetch the next meanwhile)


def cluster_shape(ray) -> dict:
    """What `plan_resources` plans from: Ray's cluster resources now; `decode_CPU`, the CPUs
    decode actors may use (not on nodes labelled `rayvid.io/role=infer`), where any node
    is so labelled or the cluster autoscales; `autoscaler` (`autoscaler_version`); and on
    an autoscaling cluster whose node types Ray reports, `max_GPU`. Ray 2.60's own
    autoscalers (v1, v2; `ray up`, KubeRay) do not report them to the GCS, hosted Ray does:
    where they are not reported, `decode_CPU` is unbounded (the decode pool grows as far as
    the autoscaler starts nodes for it) and `node_types_unknown` is set."""
    shape = dict(ray.cluster_resources())
    key, value = decode.INFER_NODE_LABEL
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    infer = [(n.get("Labels") or {}).get(key) == value for n in nodes]
    if any(infer):
        shape["decode_CPU"] = sum(float(n["Resources"].get("CPU", 0)) for n, i in zip(nodes, infer) if not i)
    # one actor runs on one node: the largest a decode actor may use, and every node's (CPU, GPU)
    shape["node_CPU"] = max((float(n["Resources"].get("CPU", 0)) for n, i in zip(nodes, infer) if not i),
                            default=0.0)
    shape["nodes"] = [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0))) for n in nodes]
    try:
        from ray._private.state import state  # as Ray Data reads it (hash_shuffle.py)

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - information only: no autoscaler, an older Ray
        config = None
    if config is not None and config.node_group_configs:
        most = _most(config)
        shape["decode_CPU"] = max(shape.get("decode_CPU", float(shape.get("CPU", 0))), most["CPU"])
        shape["max_GPU"] = most["GPU"]
        for group in config.node_group_configs:  # the nodes it can start
            cpu, gpu = float(group.resources.get("CPU", 0)), float(group.resources.get("GPU", 0))
            shape["nodes"].append((cpu, gpu))
            if not gpu:
                shape["node_CPU"] = max(shape["node_CPU"], cpu)
    shape["autoscaler"] = autoscaler_version(ray)
    if shape["autoscaler"] and "max_GPU" not in shape:
        shape["decode_CPU"], shape["node_types_unknown"] = math.inf, True
        shape["node_CPU"] = math.inf
        shape["nodes"].append((math.inf, math.inf))
    return shape


def autoscaler_version(ray) -> str:
    """"v2" or "v1", the autoscaler scaling this cluster, or "" where none does (a laptop's
    local Ray, a fixed cluster: v1's monitor runs there too, over a read-only provider whose
    node types are its nodes, `node_<id>`). Read from the GCS as `ray status` reads it."""
    try:
        from ray._private import ray_constants
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            return "v2"
        status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or b"{}")
        types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
        return "v1" if any(kind != f"node_{node}" for node, kind in types.items()) else ""
    except Exception:  # noqa: BLE001 - information only: private API of another Ray
        return ""


def warn_about(shape: dict, plan: Plan, cfg: RunConfig) -> None:
    """What the cluster's autoscaler will not do for this run, said as it starts.

    Ray's v1 autoscaler ignores label selectors: it counts a GPU node's spare CPUs as room
    for a decode actor (which may not run there) and never starts the CPU node the actor
    waits for, so the job waits forever (measured with Ray's fake multi-node provider:
    tests/test_cluster.py). v2 reads them (`ray up` starts v2 since Ray 2.50; KubeRay with
    `autoscalerOptions.version: v2`, as in cluster/). And where the autoscaler does not say
    which node types it can start, a cluster with no GPU now may have GPU nodes to start:
    the model then runs on CPUs unless --gpus-per-actor says otherwise."""
    if shape.get("autoscaler") == "v1":
        key, value = decode.INFER_NODE_LABEL
        log.warning("this cluster's autoscaler is Ray's v1, which ignores label selectors: where node types "
                    "carry the label %s=%s (as in cluster/), decode actors (kept off them) may wait forever for "
                    "a CPU node it never starts, counting a GPU node's spare CPUs as room for them; start the "
                    "cluster with autoscaler v2 (`ray up` does since Ray 2.50 unless RAY_UP_enable_autoscaler_v2=0; "
                    "KubeRay: spec.autoscalerOptions.version: v2)", key, value)
    if shape.get("node_types_unknown") and plan.infer_gpus == 0 and cfg.infer.gpus_per_actor is None:
        log.warning("the cluster autoscales and has no GPU now: the model runs on CPUs; if GPU nodes start on "
                    "demand, pass --gpus-per-actor 1 --infer-actors N N for N GPUs (Ray's autoscaler does not "
                    "tell a job which node types it can start)")


def warn_if_local_on_cluster(ray, videos: pa.Table, shape: dict) -> None:
    """Local videos (paths, not URLs) on a cluster whose other nodes decode (any with CPUs
    and no inference label, or nodes an autoscaler starts, or any where this one has no
    CPU: a head started with --num-cpus 0): each node must
    see them at the same path (a shared filesystem); where one does not, each video it gets
    is an error row `NotFound` naming its host (the next run reads those again)."""
    import pyarrow.compute as pc

    if not len(videos) or pc.all(pc.match_substring(videos.column("video_uri"), "://")).as_py():
        return
    me = ray.get_runtime_context().get_node_id()
    key, value = decode.INFER_NODE_LABEL  # (no decode actor goes there)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    others = [n for n in nodes if n.get("NodeID") != me and float((n.get("Resources") or {}).get("CPU", 0)) > 0
              and (n.get("Labels") or {}).get(key) != value]
    mine = sum(float((n.get("Resources") or {}).get("CPU", 0)) for n in nodes if n.get("NodeID") == me)
    if others or not mine or shape.get("autoscaler"):
        log.warning("INPUT's videos are local paths, and this Ray cluster decodes on %s: each of them must see "
                    "the videos at the same paths (a shared filesystem: NFS, EFS); a node that does not fails each "
                    "video it gets (NotFound, 'no such file on host ...': the next run reads those again). Else "
                    "put the videos in object storage (s3://, gs://)",
                    f"{len(others)} other node(s)" if others else "nodes it starts")


def _most(config) -> dict:
    """The most CPUs an autoscaling cluster's node types without GPUs can have (where
    decode actors go: cluster/ labels the GPU node types for inference) and the most GPUs,
    from its autoscaler config (`autoscaler_pb2.ClusterConfig`; a max_count of -1: no limit)."""
    most = {"CPU": 0.0, "GPU": 0.0}
    for group in config.node_group_configs:
        gpus = float(group.resources.get("GPU", 0))
        count = math.inf if group.max_count == -1 else float(group.max_count)
        if gpus:
            most["GPU"] += count * gpus
        else:
            most["CPU"] += count * float(group.resources.get("CPU", 0))
    return most


# Blocks of work (tasks) per decode actor at the least before segments are grouped into
# blocks, and the most segments a block groups: each block is a Ray Data task, whose cost
# (dispatch in the driver, a call in the actor, its metadata) was most of the work for
# short videos (3,000 half-second clips took 2.1x the time in one-segment blocks).
BLOCKS_PER_DECODE_ACTOR = 8
MAX_UNITS_PER_BLOCK = 16


def plan_resources(cfg: RunConfig, cluster: dict, n_videos: int, remote: bool = False,
                   n_units: int | None = None) -> Plan:
    """`cluster`: `cluster_shape`'s; `remote`: some videos are on a remote filesystem
    (fetched before they are decoded); `n_units`: segments to decode (default: a video each)."""
    cpus = float(cluster.get("CPU", 0))
    gpus = float(cluster.get("GPU", 0))
    if cfg.infer.gpus_per_actor is None and gpus < 1 and cluster.get("max_GPU", 0) >= 1:
        raise ConfigError(
            "the cluster starts GPU nodes on demand and has no GPU yet: pass --gpus-per-actor 1 "
            "--infer-actors N N for N GPUs (Ray Data's GPU pools do not grow, ray#59144), "
            "or --gpus-per-actor 0 to run the model on CPUs")
    gpus_per_actor = cfg.infer.gpus_per_actor if cfg.infer.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if gpus_per_actor > 0:
        if gpus < gpus_per_actor and not cfg.infer.min_actors:
            raise RayvidError(
                f"inference asks for {gpus_per_actor:g} GPU per actor but the cluster has {gpus:g} GPUs "
                f"(on an autoscaling cluster whose GPU nodes start on demand, also pass --infer-actors N N)")
        # Ray Data's GPU pools do not grow on autoscaling clusters (ray#59144): start them
        # at the GPUs there are, or at --infer-actors when GPU nodes start on demand.
        n = max(1, int(gpus // gpus_per_actor))
        infer_min = cfg.infer.min_actors or n
        infer_max = max(infer_min, cfg.infer.max_actors or n)
        infer_cpu_total = infer_max * cfg.infer.cpus_per_actor  # held on the GPU nodes
    else:
        infer_min = cfg.infer.min_actors or 1
        infer_max = max(infer_min, cfg.infer.max_actors or max(1, int(cpus // 4)))
        infer_cpu_total = infer_min * cfg.infer.cpus_per_actor
    threads = cfg.decode.threads
    # An actor no one node can hold waits forever (Ray: "may hang forever"). Said where no
    # node is to come (an embedded local Ray) or where the cluster's totals would hold it
    # (no more nodes are awaited for it); a node with none: below, where every node with
    # CPUs is kept for inference.
    final = bool(cluster.get("embedded"))
    largest = cluster.get("node_CPU", math.inf)
    if 0 < largest < threads and (final or cluster.get("decode_CPU", cpus) >= threads):
        hint = f"pass --decode-threads {int(largest)} or fewer" if largest >= 1 else "give it a node with whole CPUs"
        raise ConfigError(f"--decode-threads {threads:g}: no node where decode actors may run has {threads:g} CPUs "
                          f"(the largest has {largest:g}; a decode actor runs on one node): {hint}")
    if "decode_CPU" in cluster:  # decoders have nodes of their own; CPU inference may share them
        decode_cpus = float(cluster["decode_CPU"])
        if decode_cpus < threads:  # else the decode actor waits for a node forever
            key, value = decode.INFER_NODE_LABEL
            which = ("every node with CPUs is labelled" if decode_cpus <= 0 else
                     f"the nodes not labelled have {decode_cpus:g} CPUs in all, every other node is labelled")
            raise ConfigError(
                f"no node where decode actors may run: {which} {key}={value} "
                f"(kept for inference), and no node type without that label can be started (a decode "
                f"actor needs {threads:g} CPU); add CPU nodes without the label (cluster/: the `cpu` "
                f"worker type, the `cpu-decode` group) or take the label off")
        spare = max(threads, decode_cpus - (0 if gpus_per_actor > 0 else infer_cpu_total))
    else:  # decoders and inference share every node
        spare = max(threads, cpus - infer_cpu_total)
    nodes = cluster.get("nodes", [(math.inf, math.inf)])
    need_cpu, need_gpu = float(cfg.infer.cpus_per_actor), float(gpus_per_actor)
    # (--infer-actors N N with GPUs: GPU nodes are to start on demand)
    awaited = not final and (cpus < need_cpu or gpus < need_gpu or (need_gpu > 0 and cfg.infer.min_actors))
    if nodes and not awaited and not any(c >= need_cpu and g >= need_gpu for c, g in nodes):
        has = ", ".join(sorted({f"{c:g} CPU" + (f" {g:g} GPU" if g else "") for c, g in nodes}))
        asked = f"{need_gpu:g} GPU and {need_cpu:g} CPU" if need_gpu else f"{need_cpu:g} CPU"
        raise ConfigError(f"an inference actor asks for {asked} on one node, and no node has as much "
                          f"(nodes: {has}): pass a --gpus-per-actor (or cpus_per_actor) one node holds")
    decode_max = cfg.decode.max_actors or max(1, int(min(spare, 1e6) // threads))
    decode_min = min(cfg.decode.min_actors, decode_max)
    # Segments grouped into blocks (a block is one task of a decode actor) where there are
    # enough that every decode actor still gets BLOCKS_PER_DECODE_ACTOR of them, and always
    # where a listing is so long that per-segment blocks would swamp the driver.
    units = n_videos if n_units is None else n_units
    per_block = max(1, math.ceil(units / 20_000),
                    min(MAX_UNITS_PER_BLOCK, units // (BLOCKS_PER_DECODE_ACTOR * decode_max)))
    batch = cfg.infer.batch_size or (128 if gpus_per_actor > 0 else 32)
    return Plan(decode_min, decode_max, float(threads), infer_min, infer_max,
                float(gpus_per_actor), float(cfg.infer.cpus_per_actor), per_block, batch,
                decode.threads_on(threads, shares_cores_with_inference=gpus_per_actor == 0),
                decode.REMOTE_CALLS_PER_ACTOR if remote else 1)
