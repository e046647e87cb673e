"""cluster/: the launcher YAML, the KubeRay manifests, the Dockerfile and the runtime_env,
checked offline against Ray's and Kubernetes' own schemas (a misspelled field fails), and
placement of the stages on a multi-node Ray cluster."""

from __future__ import annotations

import copy
import json
import os
import re
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")


def _yaml(*parts):
    with open(os.path.join(CLUSTER, *parts)) as f:
        return yaml.safe_load(f)


# --- the cluster launcher YAML, through Ray's own validation ---------------------------


def _validate_launcher(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_launcher_yaml_is_valid_for_the_pinned_ray():
    cfg = _yaml("aws.yaml")
    prepared = _validate_launcher(cfg)
    types = prepared["available_node_types"]
    assert set(types) == {"head", "cpu", "gpu"} and prepared["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    assert types["cpu"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["gpu"]["node_config"]["InstanceType"].startswith(("g", "p"))
    from rayvid.decode import INFER_NODE_LABEL

    assert types["gpu"]["labels"] == dict([INFER_NODE_LABEL])
    for name in ("cpu", "gpu"):
        assert types[name]["max_workers"] >= max(1, types[name]["min_workers"])
    assert cfg["idle_timeout_minutes"] > 0 and cfg["docker"]["image"]
    text = open(os.path.join(CLUSTER, "aws.yaml")).read()
    assert not re.search(r"(?i)aws_secret|aws_access_key|AKIA[0-9A-Z]{16}", text)  # roles, not keys


@pytest.mark.parametrize("where, typo", [
    ((), ("idle_timeout_minutes", "idle_timout_minutes")),
    (("available_node_types", "cpu"), ("min_workers", "min_worker")),
    (("available_node_types", "gpu"), ("node_config", "node_confg")),
    (("docker",), ("image", "imgae")),
])
def test_launcher_yaml_typo_fails(where, typo):
    import jsonschema

    cfg = _yaml("aws.yaml")
    node = cfg
    for key in where:
        node = node[key]
    node[typo[1]] = node.pop(typo[0])
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError, AssertionError)):
        _validate_launcher(cfg)


# --- KubeRay manifests, against the RayCluster/RayJob schema and Kubernetes' own ---------

K8S_VERSION = "v1.33.0"


@pytest.fixture(scope="module")
def kuberay_validator():
    """RayCluster / RayJob schema (cluster/kuberay/schema, transcribed from KubeRay's CRDs
    with unknown fields rejected), its pod templates resolved to Kubernetes' strict
    PodTemplateSpec schema from the kubernetes-validate package."""
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    base = "https://rayvid.invalid/"
    with open(os.path.join(CLUSTER, "kuberay", "schema", "ray.io_v1.schema.json")) as f:
        text = f.read()
    text = text.replace('"k8s:podtemplatespec"',
                        '"/api/_definitions.json#/$defs/io.k8s.api.core.v1.PodTemplateSpec"')
    schema = json.loads(text)
    schema["$id"] = base + "ray.io_v1.schema.json"
    k8s_dir = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema",
                           f"{K8S_VERSION}-local-strict")
    with open(os.path.join(k8s_dir, "_definitions.json")) as f:
        definitions = json.load(f)
    registry = Registry().with_resources([
        (schema["$id"], Resource.from_contents(schema)),
        (base + "api/_definitions.json", Resource.from_contents(
            definitions, default_specification=__import__("referencing.jsonschema").jsonschema.DRAFT202012)),
    ])

    def validate(doc: dict) -> None:
        kind = doc.get("kind")
        sub = {"$ref": f"{schema['$id']}#/definitions/{kind}"}
        cls = jsonschema.validators.validator_for(schema)
        cls(sub, registry=registry).validate(doc)

    return validate


def test_kuberay_manifests_are_valid(kuberay_validator):
    cluster = _yaml("kuberay", "raycluster.yaml")
    job = _yaml("kuberay", "rayjob.yaml")
    kuberay_validator(cluster)
    kuberay_validator(job)
    import ray

    assert cluster["spec"]["rayVersion"] == ray.__version__
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu-infer"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    assert groups["gpu-infer"]["rayStartParams"]["labels"] == "rayvid.io/role=infer"
    assert all(g["maxReplicas"] >= g["minReplicas"] for g in groups.values())
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert "jobs/classify_videos.py" in job["spec"]["entrypoint"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]


def _rename(doc, path, new):
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[new] = node.pop(path[-1])


@pytest.mark.parametrize("manifest, path, new", [
    ("raycluster.yaml", ("spec", "enableInTreeAutoscaling"), "enableInTreeAutoscaler"),
    ("raycluster.yaml", ("spec", "workerGroupSpecs", 0, "minReplicas"), "minReplica"),
    ("raycluster.yaml", ("spec", "headGroupSpec", "rayStartParams"), "rayStartParam"),
    ("raycluster.yaml", ("spec", "workerGroupSpecs", 1, "template", "spec", "containers", 0, "resources"), "resource"),
    ("raycluster.yaml", ("spec", "headGroupSpec", "template", "spec", "serviceAccountName"), "serviceAcountName"),
    ("rayjob.yaml", ("spec", "entrypoint"), "entryPoint"),
    ("rayjob.yaml", ("spec", "clusterSelector"), "clusterSelectors"),
])
def test_kuberay_typo_fails(kuberay_validator, manifest, path, new):
    import jsonschema

    doc = _yaml("kuberay", manifest)
    _rename(doc, path, new)
    with pytest.raises(jsonschema.ValidationError):
        kuberay_validator(doc)


# --- the image and how code ships --------------------------------------------------------


def test_dockerfile_builds_on_the_pinned_ray_gpu_image():
    import ray

    text = open(os.path.join(CLUSTER, "Dockerfile")).read()
    assert f"ARG RAY_VERSION={ray.__version__}" in text
    assert f"ARG PYTHON=py{sys.version_info.major}{sys.version_info.minor}" in text
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-gpu" in text and "ray-ml" not in text.split("FROM", 1)[1]
    for package in ("tensorflow[and-cuda]", "decord", "av", "s3fs", "/tmp/rayvid"):
        assert package in text
    assert "COPY --chown=ray:users jobs /home/ray/jobs" in text
    lock = open(os.path.join(ROOT, "requirements.lock")).read()
    assert f"ray=={ray.__version__}" in lock


def test_runtime_env_ships_the_checkout_without_the_heavy_parts():
    env = _yaml("runtime_env.yaml")
    assert env["working_dir"] == "."
    assert {".venv", ".git", "samples", "tests"} <= set(env["excludes"])
    assert not any("KEY" in k or "SECRET" in k or "TOKEN" in k for k in env.get("env_vars", {}))


# --- placement on a multi-node cluster ---------------------------------------------------


def test_stages_land_on_the_right_nodes_and_pools_follow_resources(ray_cluster, media, shapes_model, tmp_path):
    """CPU-only nodes and GPU nodes (logical GPUs): inference actors only on GPU nodes, one
    per GPU; decode actors only on CPU nodes; the decode pool sized by the CPUs left."""
    import ray
    import ray._private.state as state

    from rayvid import pipeline
    from rayvid.config import ModelConfig, RunConfig

    added = [ray_cluster.add_node(num_cpus=1, object_store_memory=512 * 2**20),
             ray_cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=2**30,
                                  labels={"rayvid.io/role": "infer"})]
    ray_cluster.wait_for_nodes()
    try:
        before = set(state.actors())
        cfg = RunConfig(input=str(media["videos"]), output=str(tmp_path / "out"),
                        model=ModelConfig(name=shapes_model["path"]), progress=False)
        result = pipeline.run(cfg)
        assert result.videos_ok == 3 and result.videos_failed == 0
        nodes = [n for n in ray.nodes() if n["Alive"]]
        gpu_nodes = {n["NodeID"] for n in nodes if n["Resources"].get("GPU")}
        cpu_nodes = {n["NodeID"] for n in nodes if not n["Resources"].get("GPU")}
        assert len(gpu_nodes) == 2 and len(cpu_nodes) == 2
        # 5 CPUs, 2 GPUs: one inference actor per GPU (each holding a CPU there), 3 decoders
        assert (result.plan["infer_min"], result.plan["infer_max"], result.plan["infer_gpus"]) == (2, 2, 1.0)
        assert result.plan["decode_max"] == 3
        actors = [a for k, a in state.actors().items() if k not in before]
        where = lambda stage: [a["Address"]["NodeID"] for a in actors if f"({stage})" in a["ActorClassName"]]  # noqa: E731
        assert sorted(where("Predictor")) == sorted(gpu_nodes)  # one on each GPU node
        assert where("Decoder") and set(where("Decoder")) <= cpu_nodes
    finally:
        for node in added:
            ray_cluster.remove_node(node)


# --- a real `ray job submit` against a head with token authentication --------------------


def _stop(head) -> None:
    """Stop a `ray start --head --block` process (never `ray stop`: it would take down every
    Ray on the machine, the session's cluster too)."""
    import subprocess

    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()


def _free_ports(n: int) -> list:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_ray_job_submit_on_a_head_with_token_auth(media, shapes_model, tmp_path):
    """`ray start --head` (dashboard and job server: Ray's `default` extra) with token
    authentication, `ray job submit` of jobs/classify_videos.py with cluster/runtime_env.yaml,
    wait for SUCCEEDED, read its logs and its Parquet; the same --submission-id again is
    refused (no double submission); a wrong token is refused."""
    import secrets
    import subprocess
    import time

    import helpers

    bin_dir = os.path.dirname(sys.executable)
    gcs, dashboard, client, agent_grpc, agent_http, metrics = _free_ports(6)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=bin_dir + os.pathsep + env["PATH"])
    head = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    ray_cli = [os.path.join(bin_dir, "ray")]

    def job(*args, token_env=env, check=False, timeout=120):
        return subprocess.run(ray_cli + ["job", args[0], "--address", address, *args[1:]], env=token_env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, check=check)

    try:
        deadline = time.time() + 120
        while time.time() < deadline and job("list").returncode != 0:
            assert head.poll() is None, head.stderr.read()[-3000:]
            time.sleep(1)
        assert job("list").returncode == 0, "the job server did not come up"

        refused = job("list", token_env=dict(env, RAY_AUTH_TOKEN="0" * 64))
        assert refused.returncode != 0  # token authentication is on

        out = tmp_path / "out"
        submission = "rayvid-test-" + secrets.token_hex(4)
        entry = [sys.executable, "jobs/classify_videos.py", str(media["videos"]), str(out),
                 "--model", shapes_model["path"], "--no-progress"]
        submit = ["submit", "--no-wait", "--submission-id", submission,
                  "--runtime-env", "cluster/runtime_env.yaml", "--", *entry]
        first = job(*submit)
        assert first.returncode == 0, first.stderr[-3000:]
        again = job(*submit)
        assert again.returncode != 0 and "already exists" in (again.stdout + again.stderr)

        status = ""
        deadline = time.time() + 400
        while time.time() < deadline:
            status = job("status", submission).stdout
            if re.search(r"(?i)\b(succeeded|failed|stopped)\b", status):
                break
            time.sleep(2)
        logs = job("logs", submission).stdout
        assert re.search(r"(?i)\bsucceeded\b", status), logs[-4000:]
        assert re.search(r"videos:\s+3 listed, 0 skipped \(already done\), 3 ok, 0 failed", logs), logs[-3000:]
        preds = helpers.read_output(str(out))
        truth = {p: len(v) for p, v in media["truth"].items()}
        assert {u: len(v) for u, v in helpers.frames_per_video(preds).items()} == truth
        assert token not in logs
    finally:
        _stop(head)


# --- the real autoscaler against a fake node provider -------------------------------------


def test_autoscaler_adds_cpu_and_gpu_nodes_for_the_backlog_and_removes_them_idle(media, shapes_model, tmp_path):
    """Ray's autoscaler (monitor.py, the same code as in the cloud) with its fake multi-node
    provider, on a head with no CPUs: the job's decode and inference actors make a CPU node
    and a GPU node appear; the job completes; both go away once idle. (AutoscalingCluster
    would do this, but its start() runs `ray stop --force`, which would take the session's
    cluster down too; this starts the same configuration on ports of its own.)"""
    import subprocess
    import time

    import helpers

    bin_dir = os.path.dirname(sys.executable)
    gcs, = _free_ports(1)
    address = f"127.0.0.1:{gcs}"
    small = {"object_store_memory": 300 * 2**20}
    config = {
        "cluster_name": "rayvid-autoscaling-test", "max_workers": 4, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": address},
        "auth": {"ssh_user": "ubuntu"}, "docker": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu": {"resources": {"CPU": 1, **small}, "node_config": {}, "min_workers": 0, "max_workers": 2},
            "gpu": {"resources": {"CPU": 1, "GPU": 1, **small}, "labels": {"rayvid.io/role": "infer"},
                    "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    config_path = tmp_path / "autoscaling.json"
    config_path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1",
               PATH=bin_dir + os.pathsep + env["PATH"])
    head = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--num-cpus=0", f"--object-store-memory={300 * 2**20}",
         f"--autoscaling-config={config_path}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes_script = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                    "print('NODES', json.dumps([(n['Alive'], n['Resources'].get('GPU', 0), n['Resources'].get('CPU', 0)) "
                    "for n in ray.nodes() if 'node:__internal_head__' not in n['Resources'] "
                    "and not n['Resources'].get('node:__internal_head__')]))" % address)

    def workers():
        out = subprocess.run([sys.executable, "-c", nodes_script], env=env, capture_output=True, text=True, timeout=120)
        # the driver also echoes autoscaler events to stdout: take our own line
        lines = [line for line in out.stdout.splitlines() if line.startswith("NODES ")]
        return json.loads(lines[-1][len("NODES "):])

    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # the head is up when a driver can connect
            try:
                assert workers() == []  # nothing but the head before the job
                break
            except (ValueError, IndexError):
                time.sleep(1)
        out = tmp_path / "out"
        job = subprocess.run(
            [sys.executable, os.path.join(ROOT, "jobs", "classify_videos.py"), str(media["videos"]), str(out),
             "--model", shapes_model["path"], "--no-progress", "--address", address,
             "--gpus-per-actor", "1", "--infer-actors", "1", "1"],
            env=env, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stderr[-3000:]
        assert "3 listed, 0 skipped (already done), 3 ok, 0 failed" in job.stdout
        appeared = workers()
        assert any(gpu == 1 for _, gpu, _ in appeared), appeared  # a GPU node came up
        assert any(gpu == 0 and cpu >= 1 for _, gpu, cpu in appeared), appeared  # and a CPU node
        truth = {p: len(v) for p, v in media["truth"].items()}
        preds = helpers.read_output(str(out))
        assert {u: len(v) for u, v in helpers.frames_per_video(preds).items()} == truth
        deadline = time.time() + 120
        while time.time() < deadline and any(alive for alive, _, _ in workers()):
            time.sleep(3)
        assert not any(alive for alive, _, _ in workers()), "idle nodes were not removed"
    finally:
        _stop(head)
        for pid, title in helpers.processes(""):  # any fake node process left behind
            if f":{gcs}" in title and pid != os.getpid():
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
