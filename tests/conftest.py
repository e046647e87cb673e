"""Session fixtures: one moto S3 server, one local Ray, generated media, one trained model.

Order matters: the S3 endpoint and fake credentials go into the environment before Ray
starts, so Ray's workers inherit the same standard AWS environment a user's would.
"""

from __future__ import annotations

import os
import subprocess

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from helpers import BUCKET, FAKE_KEY_ID, FAKE_SECRET


def pytest_collection_modifyitems(config, items):
    has_gpu = False
    try:
        has_gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    except FileNotFoundError:
        pass
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a physical GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def s3fs_client(s3_endpoint):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_endpoint)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    import ray

    # One logical GPU (no physical one): the inference pool takes the product's GPU path
    # (num_gpus=1 per actor) and TensorFlow, finding no device, computes on the CPU.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """Small generated videos whose content is known (see rayvid.samples)."""
    from rayvid import samples

    root = tmp_path_factory.mktemp("media")
    videos = root / "videos"
    (videos / "nested dir").mkdir(parents=True)
    truth = {}
    specs = [("a_clip.mp4", 2.0, 1), ("nested dir/b clip é.MP4", 1.4, 2), ("c.mkv", 1.0, 3)]
    for name, seconds, seed in specs:
        path = str(videos / name)
        truth[path] = samples.make_video(path, seconds, seed=seed)
    (videos / "notes.txt").write_text("not a video")
    return {"root": root, "videos": videos, "truth": truth}


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory):
    """The sample classifier, trained once per session (deterministic)."""
    from rayvid import samples

    out = tmp_path_factory.mktemp("model")
    info = samples.train_model(str(out), epochs=4)
    assert info["validation_accuracy"] >= 0.95, info
    return {"path": info["model"], "labels": str(out / "shapes.labels.txt"), "dir": out}


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    """Frame-code videos over codecs, containers, sizes, rotations (tests/framecode.py)."""
    import framecode

    root = tmp_path_factory.mktemp("matrix")
    return framecode.make_matrix(str(root))


@pytest.fixture(scope="session")
def code_reader(tmp_path_factory):
    import framecode

    path = str(tmp_path_factory.mktemp("reader") / "framecode.keras")
    framecode.build_reader(path)
    return path
