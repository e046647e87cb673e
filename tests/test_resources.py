import math

import pytest

from rayvid import resources
from rayvid.config import DecodeConfig, InferConfig, RunConfig
from rayvid.errors import ConfigError


def test_plan_resources_cpu_and_gpu():
    cfg = RunConfig(input="x", output="y")
    cpu = resources.plan_resources(cfg, {"CPU": 16.0}, n_videos=10)
    assert (cpu.infer_gpus, cpu.infer_min, cpu.infer_max) == (0.0, 1, 4)
    assert (cpu.decode_min, cpu.decode_max) == (1, 15)
    # decoders share the cores with CPU inference: each holds one CPU, decodes on two threads
    assert (cpu.decode_cpus, cpu.decode_threads) == (1.0, 2)
    gpu = resources.plan_resources(cfg, {"CPU": 32.0, "GPU": 4.0}, n_videos=10)
    assert (gpu.infer_gpus, gpu.infer_min, gpu.infer_max) == (1.0, 4, 4)
    assert gpu.decode_max == 28  # the 4 inference actors hold a CPU each
    assert (gpu.decode_cpus, gpu.decode_threads) == (1.0, 1)
    assert resources.plan_resources(cfg, {"CPU": 2.0}, n_videos=1_000_000).units_per_block == 50
    # segments grouped into blocks (Ray Data tasks) where every decode actor still gets 8
    assert [resources.plan_resources(cfg, {"CPU": 16.0}, 10, n_units=n).units_per_block
            for n in (10, 15 * 8 * 2 - 1, 15 * 8 * 2, 3000, 1_000_000)] == [1, 1, 2, 16, 50]
    # remote videos: two calls per decode actor, one fetching while the other decodes
    assert (cpu.decode_calls, resources.plan_resources(cfg, {"CPU": 16.0}, 10, remote=True).decode_calls) == (1, 2)


def test_decode_pools_size_from_the_nodes_decoders_may_use(ray_session):
    """Decode actors avoid nodes labelled for inference: their CPUs do not size the decode
    pool; on an autoscaling cluster the CPU node types' most CPUs do, and a cluster whose
    GPU nodes start on demand but has none yet is an error, not a silent CPU model."""
    from ray.core.generated import autoscaler_pb2

    cfg = RunConfig(input="x", output="y")
    # the session's cluster: a 2-CPU head, a 1-CPU GPU node labelled for inference
    shape = resources.cluster_shape(ray_session)
    assert shape["decode_CPU"] == 2.0 and shape["CPU"] == 3.0 and "max_GPU" not in shape
    assert resources.plan_resources(cfg, shape, 10).decode_max == 2
    # no autoscaler scales it (v1's monitor runs over a read-only provider): no warning that
    # label selectors go unread (the v1 and v2 autoscalers: tests/test_cluster.py)
    assert resources.autoscaler_version(ray_session) == ""
    # the shipped aws.yaml at rest: a 0-CPU head, one 8-CPU GPU node, CPU nodes 0..32 x 16
    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 0}, max_count=1),
        autoscaler_pb2.NodeGroupConfig(name="cpu", resources={"CPU": 16}, max_count=32),
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, max_count=4)])
    most = resources._most(config)
    assert most == {"CPU": 512.0, "GPU": 4.0}
    at_rest = {"CPU": 8.0, "GPU": 1.0, "decode_CPU": max(0.0, most["CPU"]), "max_GPU": most["GPU"]}
    plan = resources.plan_resources(cfg, at_rest, 10)
    assert (plan.decode_max, plan.infer_min, plan.infer_gpus) == (512, 1, 1.0)
    with pytest.raises(ConfigError, match="starts GPU nodes on demand"):
        resources.plan_resources(cfg, {"CPU": 0.0, "decode_CPU": 512.0, "max_GPU": 4.0}, 10)
    cold = resources.plan_resources(RunConfig(input="x", output="y", infer=InferConfig(gpus_per_actor=1.0, min_actors=4, max_actors=4)),
                                   {"CPU": 0.0, "decode_CPU": 512.0, "max_GPU": 4.0}, 10)
    assert (cold.infer_min, cold.infer_max, cold.decode_max) == (4, 4, 512)
    unlimited = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="cpu", resources={"CPU": 4}, max_count=-1)])
    assert resources.plan_resources(cfg, {"CPU": 4.0, "decode_CPU": resources._most(unlimited)["CPU"]}, 10).decode_max > 10_000
    # every node with CPUs kept for inference, none other to start: an error, not a decode
    # actor waiting for a node forever
    with pytest.raises(ConfigError, match="no node where decode actors may run"):
        resources.plan_resources(cfg, {"CPU": 8.0, "GPU": 1.0, "decode_CPU": 0.0}, 10)
    two_threads = RunConfig(input="x", output="y", decode=DecodeConfig(threads=2))
    with pytest.raises(ConfigError, match="a decode actor needs 2 CPU"):
        resources.plan_resources(two_threads, {"CPU": 9.0, "GPU": 1.0, "decode_CPU": 1.0}, 10)
    # an actor no one node can hold waited forever ("may hang forever", a QA helper found) where
    # the cluster's totals sufficed (or on a laptop's embedded Ray): --decode-threads 3 on 2 CPUs
    # (the labelled node's one not counted), 4 on the embedded Ray, 2 GPUs on 1-GPU nodes
    three = RunConfig(input="x", output="y", decode=DecodeConfig(threads=3))
    assert shape["nodes"] == [(2.0, 0.0), (1.0, 1.0)] or shape["nodes"] == [(1.0, 1.0), (2.0, 0.0)]
    with pytest.raises(ConfigError, match=r"no node where decode actors may run: the nodes not labelled have 2 CPUs "
                                          r"in all, every other node is labelled rayvid.io/role=infer"):
        resources.plan_resources(three, shape, 10)  # (too few CPUs for it in all)
    unlabelled = {"CPU": 3.0, "node_CPU": 2.0, "nodes": [(2.0, 0.0), (1.0, 0.0)]}
    with pytest.raises(ConfigError, match=r"--decode-threads 3: no node where decode actors may run has 3 CPUs "
                                          r"\(the largest has 2; .*\): pass --decode-threads 2 or fewer"):
        resources.plan_resources(three, unlabelled, 10)
    laptop = {"CPU": 2.0, "node_CPU": 2.0, "nodes": [(2.0, 0.0)]}
    four = RunConfig(input="x", output="y", decode=DecodeConfig(threads=4))
    assert resources.plan_resources(four, laptop, 10).decode_cpus == 4  # a node may join a cluster
    with pytest.raises(ConfigError, match=r"--decode-threads 4: .*the largest has 2"):
        resources.plan_resources(four, dict(laptop, embedded=True), 10)  # none joins an embedded Ray
    two_gpus = RunConfig(input="x", output="y", infer=InferConfig(gpus_per_actor=2.0))
    split = {"CPU": 4.0, "GPU": 2.0, "node_CPU": 2.0, "nodes": [(2.0, 0.0), (1.0, 1.0), (1.0, 1.0)]}
    with pytest.raises(ConfigError, match=r"an inference actor asks for 2 GPU and 1 CPU on one node, and no node has "
                                          r"as much \(nodes: 1 CPU 1 GPU, 2 CPU\)"):
        resources.plan_resources(two_gpus, split, 10)
    assert resources.plan_resources(two_gpus, dict(split, nodes=[(2.0, 0.0), (2.0, 2.0)]), 10).infer_gpus == 2.0
    # GPU nodes to start on demand (--infer-actors N N), or not enough GPUs in all yet: awaited
    on_demand = RunConfig(input="x", output="y", infer=InferConfig(gpus_per_actor=1.0, min_actors=2, max_actors=2))
    assert resources.plan_resources(on_demand, {"CPU": 8.0, "node_CPU": 8.0, "nodes": [(8.0, 0.0)]}, 10).infer_min == 2
    cpu_later = RunConfig(input="x", output="y", infer=InferConfig(gpus_per_actor=0.0))
    assert resources.plan_resources(cpu_later, {"CPU": 0.0, "node_CPU": 0.0, "nodes": [(0.0, 0.0)]}, 10)  # a 0-CPU head
    big = RunConfig(input="x", output="y", infer=InferConfig(gpus_per_actor=0.0, cpus_per_actor=4.0))
    with pytest.raises(ConfigError, match=r"asks for 4 CPU on one node"):
        resources.plan_resources(big, {"CPU": 4.0, "node_CPU": 2.0, "nodes": [(2.0, 0.0), (2.0, 0.0)]}, 10)
    assert resources.plan_resources(big, shape, 10)  # 3 CPUs in all: a node may be to come
    # nodes an autoscaler can start count (their types, where it says them)
    assert resources.plan_resources(three, dict(shape, node_CPU=math.inf, decode_CPU=math.inf, nodes=[(math.inf, math.inf)]), 10)


def test_local_videos_are_warned_about_only_where_other_nodes_decode(ray_session, caplog):
    """The warning that every node must see local videos is for clusters whose other nodes
    decode: nodes with CPUs and no inference label (the session's GPU node has one: no
    decoder goes there), a driver's node without CPUs (a head started with --num-cpus 0),
    or an autoscaler's nodes (tests/test_cluster.py: a CPU node added)."""
    import pyarrow as pa

    local, remote = pa.table({"video_uri": ["/v/a.mp4"]}), pa.table({"video_uri": ["s3://b/a.mp4"]})
    with caplog.at_level("WARNING", logger="rayvid"):
        resources.warn_if_local_on_cluster(ray_session, local, {"autoscaler": ""})
        resources.warn_if_local_on_cluster(ray_session, remote, {"autoscaler": "v2"})
        assert "local paths" not in caplog.text
        resources.warn_if_local_on_cluster(ray_session, local, {"autoscaler": "v2"})
    assert "INPUT's videos are local paths, and this Ray cluster decodes on nodes it starts" in caplog.text
