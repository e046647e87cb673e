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
