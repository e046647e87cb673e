"""Session fixtures: one moto S3 server, one GCS emulator, one local Ray, generated media,
one trained model.

Order matters: the S3 endpoint and fake credentials, and the GCS emulator's address, go
into the environment before Ray starts, so Ray's workers inherit the same standard AWS and
Google environment a user's would.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import types

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# gcsfs's plain GCSFileSystem, read when gcsfs is imported: its default subclass first asks
# the Storage Control gRPC API for each bucket's layout, which the GCS emulator does not
# serve (gRPC retries, for minutes).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# No GCE metadata server is probed for credentials (google-auth reads this when first imported).
os.environ["NO_GCE_CHECK"] = "true"

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


class Moto:
    """moto's S3 server on 127.0.0.1; `stop()` and `start()` take it down and bring it back
    on the same port with the same buckets (moto keeps its state in this process). Hooks
    see each request before moto answers it: `requests()` records them, `refuse(...)`
    answers some 403, `down_at(...)` takes the server down at one; `without_header(...)`
    drops a header from moto's answers."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._server_class = ThreadedMotoServer
        self.hooks: list = []
        self.answer_filters: list = []  # (environ, headers) -> headers, on moto's answers
        self.port = 0
        self.start()
        self.host, self.port = self.server.get_host_and_port()
        self.url = f"http://{self.host}:{self.port}"

    def stop(self):
        self.server.stop()

    def start(self):
        self.server = self._server_class(ip_address="127.0.0.1", port=self.port)
        self.server.start()
        wsgi = self.server._server  # moto's werkzeug server: it looks its app up per request
        app = wsgi.app

        def hooked(environ, start_response):
            for hook in list(self.hooks):
                answer = hook(environ)
                if answer is not None:  # (status, XML body): answered here, moto never sees it
                    status, body = answer
                    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
                    return [body]
            filters = list(self.answer_filters)
            if not filters:
                return app(environ, start_response)

            def filtered(status, headers, *exc_info):
                for f in filters:
                    headers = f(environ, headers)
                return start_response(status, headers, *exc_info)

            return app(environ, filtered)

        wsgi.app = hooked

    @contextlib.contextmanager
    def hook(self, fn):
        self.hooks.append(fn)
        try:
            yield
        finally:
            self.hooks.remove(fn)

    @contextlib.contextmanager
    def without_header(self, method: str, name: str):
        """moto's answers to `method` requests lack header `name` (as some S3-like stores' do)."""
        def drop(environ, headers):
            if environ["REQUEST_METHOD"] != method:
                return headers
            return [(k, v) for k, v in headers if k.lower() != name.lower()]

        self.answer_filters.append(drop)
        try:
            yield
        finally:
            self.answer_filters.remove(drop)

    @contextlib.contextmanager
    def requests(self):
        """[(method, path and query)] of every request the server is sent meanwhile."""
        seen: list = []

        def record(environ):
            query = environ.get("QUERY_STRING")
            seen.append((environ["REQUEST_METHOD"], environ["PATH_INFO"] + (f"?{query}" if query else "")))

        with self.hook(record):
            yield seen

    @contextlib.contextmanager
    def slow(self, matches, delay_s: float):
        """Each request `matches(environ)` is true of waits `delay_s` before moto answers,
        as a far store's would. Yields a dict whose "most" is the most such requests in
        flight at once."""
        import threading
        import time

        lock, seen = threading.Lock(), {"now": 0, "most": 0}

        def wait(environ):
            if not matches(environ):
                return
            with lock:
                seen["now"] += 1
                seen["most"] = max(seen["most"], seen["now"])
            time.sleep(delay_s)
            with lock:
                seen["now"] -= 1

        with self.hook(wait):
            yield seen

    @staticmethod
    def _matches(environ, method: str, prefix: str, body_has: bytes) -> bool:
        """Whether a request is `method` for a path under `prefix` with `body_has` in its
        body (read here, and put back for moto)."""
        import io

        if environ["REQUEST_METHOD"] != method or not environ["PATH_INFO"].startswith(prefix):
            return False
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        return body_has in body

    @contextlib.contextmanager
    def refuse(self, method: str, prefix: str, body_has: bytes = b""):
        """Every `method` request for a path under `prefix` whose body holds `body_has` is
        answered 403 AccessDenied, as S3 answers a write its credentials do not allow.
        Yields the paths refused."""
        refused: list = []
        answer = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                  b"<Message>Access Denied</Message><RequestId>rayvid-test</RequestId></Error>")

        def deny(environ):
            if self._matches(environ, method, prefix, body_has):
                refused.append(environ["PATH_INFO"])
                return "403 Forbidden", answer
            return None

        with self.hook(deny):
            yield refused

    @contextlib.contextmanager
    def down_at(self, method: str, path: str, body_has: bytes = b""):
        """The server goes down at the first `method` request for `path` whose body holds
        `body_has`: that request's connection is cut before an answer, the client's
        retries find nothing listening (as when an endpoint's host goes away). Yields a
        list that holds that request's path once it happened; the server is back after."""
        import socket
        import threading

        hit: list = []

        def cut(environ):
            if hit or environ["PATH_INFO"] != path or not self._matches(environ, method, path, body_has):
                return
            hit.append(path)
            stopping = threading.Thread(target=self.stop)  # not from this request's thread: it waits for none
            stopping.start()
            stopping.join()
            environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
            raise ConnectionAbortedError("rayvid test: the S3 endpoint went down")

        try:
            with self.hook(cut):
                yield hit
        finally:
            if hit:
                self.start()


@pytest.fixture(scope="session")
def moto():
    import logging

    # werkzeug (moto's server) gives its logger a handler of its own at its first message,
    # on sys.stderr as it is then: a test's capture, closed by the next test ("--- Logging
    # error ---" in a later test's stderr). Its warnings go through the root logger instead.
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.WARNING)
    werkzeug.addHandler(logging.NullHandler())
    server = Moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(moto):
    endpoint = moto.url
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as mp:  # the environment as it was, after the session
        for k, v in env.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture(scope="session")
def s3fs_client(s3_endpoint):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_endpoint)


class GCS:
    """gcp-storage-emulator's GCS JSON API on 127.0.0.1, in memory, with one bucket, made to
    do two things as GCS does that it does not: page object listings (it returns every
    object in one page, ignoring `maxResults` and `pageToken`; GCS returns at most
    `maxResults`, up to 1000, in name order, and a `nextPageToken` while more remain), and
    cancel a resumable upload on DELETE of its session URL (answered 501, which gcsfs
    retries for half a minute; GCS drops the session and answers 499), and serve a media
    download (objects.get with alt=media) on its `ifGenerationMatch` condition (412 if the
    object is at another generation), naming the generation it served (`x-goog-generation`).
    `requests()` records (kind, object name) of each object read: "info" (its metadata),
    "media" (a GET of its bytes) or "media if" (one on an `ifGenerationMatch` condition)."""

    def __init__(self):
        from gcp_storage_emulator import server
        from gcp_storage_emulator.handlers import objects

        self.seen: list | None = None
        self.strip_generation = False  # answers name no generation (as a store might not)
        self.ignore_conditions = False  # serves whatever generation is there (as a store might)
        self.refuse_conditions = False  # refuses every condition (412), as a store comparing its own way might
        for _, handlers in server.HANDLERS:
            if handlers.get(server.GET) is objects.ls:
                handlers[server.GET] = self._paged(objects.ls)
            if handlers.get(server.PUT) is objects.upload_partial:
                handlers[server.DELETE] = self._cancel_upload
            if handlers.get(server.GET) is objects.download:
                handlers[server.GET] = self._conditional(objects.download)
            if handlers.get(server.GET) is objects.get:
                handlers[server.GET] = self._recorded(objects.get)
        self.server = server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
        self.server.start()
        host, port = self.server._api._httpd.server_address
        self.url = f"http://{host}:{port}"

    @property
    def uploads_in_progress(self) -> int:
        return len(self.server._storage.resumable)

    @staticmethod
    def _cancel_upload(request, response, storage, *args, **kwargs):
        import types

        from gcp_storage_emulator.storage import RESUMABLE_DIR

        upload_id = (request.query.get("upload_id") or [""])[0]
        if upload_id in storage.resumable:
            storage.delete_resumable_file_obj(upload_id)
            storage._delete_file(RESUMABLE_DIR, storage.safe_id(upload_id))
            response.status = types.SimpleNamespace(value=499, phrase="Client Closed Request")
        else:
            response.status = types.SimpleNamespace(value=404, phrase="Not Found")

    @contextlib.contextmanager
    def requests(self):
        """(kind, object name) of each object read meanwhile (the class's docstring)."""
        self.seen = []
        try:
            yield self.seen
        finally:
            self.seen = None

    def _recorded(self, get):
        def recorded(request, response, storage, *args, **kwargs):
            if self.seen is not None:
                self.seen.append(("info", request.params.get("object_id")))
            return get(request, response, storage, *args, **kwargs)

        return recorded

    def _conditional(self, download):
        def conditional(request, response, storage, *args, **kwargs):
            name = request.params.get("object_id")
            wanted = (request.query.get("ifGenerationMatch") or [None])[0]
            if self.seen is not None:
                self.seen.append(("media" if wanted is None else "media if", name))
            try:
                obj = storage.get_file_obj(request.params["bucket_name"], name)
            except Exception:  # noqa: BLE001 - not there: the emulator's own 404
                return download(request, response, storage, *args, **kwargs)
            if wanted is not None and (self.refuse_conditions or (
                    str(obj.get("generation")) != str(wanted) and not self.ignore_conditions)):
                response.status = types.SimpleNamespace(value=412, phrase="Precondition Failed")
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                         "specified did not hold.", "errors": [{"reason": "conditionNotMet"}]}})
                return
            download(request, response, storage, *args, **kwargs)
            if not self.strip_generation:
                response["x-goog-generation"] = str(obj.get("generation"))

        return conditional

    @staticmethod
    def _paged(ls):
        import json

        def paged(request, response, storage, *args, **kwargs):
            ls(request, response, storage, *args, **kwargs)
            if response.status != 200:
                return
            body = json.loads(response._content)
            items = sorted(body.get("items") or [], key=lambda o: o["name"])
            after = (request.query.get("pageToken") or [""])[0]
            size = min(int((request.query.get("maxResults") or ["1000"])[0]), 1000)
            items = [o for o in items if o["name"] > after]
            body["items"] = items[:size]
            if after:  # folders (with a delimiter) come whole, with the first page
                body["prefixes"] = []
            if len(items) > size:
                body["nextPageToken"] = items[size - 1]["name"]
            response.json(body)

        return paged

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """The emulator, its address in STORAGE_EMULATOR_HOST, where gcsfs (and every Google
    client) looks for it; a developer's own Google credentials (application default, gcloud's)
    are out of reach: the emulator needs none, and nothing may reach the real GCS."""
    server = GCS()
    no_gcloud = tmp_path_factory.mktemp("gcloud-config")
    env = {"STORAGE_EMULATOR_HOST": server.url, "GOOGLE_APPLICATION_CREDENTIALS": "", "CLOUDSDK_CONFIG": str(no_gcloud)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield server
    server.stop()


@pytest.fixture(scope="session")
def gcsfs_client(gcs):
    import gcsfs

    return gcsfs.GCSFileSystem(token="anon")


@pytest.fixture(params=["s3", "gs"])
def store(request):
    """(fsspec client, bucket URL) of moto's S3 or the GCS emulator: the same test on both."""
    client = request.getfixturevalue("s3fs_client" if request.param == "s3" else "gcsfs_client")
    return client, f"{request.param}://{BUCKET}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint, gcs):
    """The session's Ray: a `ray.cluster_utils.Cluster` shaped like a small production
    cluster, so every pipeline test runs the multi-node path, and tests can add and remove
    nodes: a CPU head (2 CPUs: the driver and the decode actors) and a GPU node (1 CPU and
    one logical GPU, no physical one; labelled as cluster/ labels GPU nodes), where the
    inference pool takes the product's GPU
    path (num_gpus=1 per actor) and TensorFlow, finding no device, computes on the CPU."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=2 * 2**30))
    cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=2**30, labels={"rayvid.io/role": "infer"})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    import ray

    return ray


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
def fragmented(tmp_path_factory):
    """Fragmented MP4 as muxers write it (tests/framecode.py FRAGMENTED): name -> path."""
    import framecode

    return framecode.make_fragmented(str(tmp_path_factory.mktemp("fragmented")))


@pytest.fixture(scope="session")
def trimmed(tmp_path_factory):
    """Trimmed by stream copy (MP4/MOV edit lists inside a GOP) and a transport stream
    captured mid-GOP (tests/framecode.py TRIMMED): name -> path."""
    import framecode

    return framecode.make_trimmed(str(tmp_path_factory.mktemp("trimmed")))


@pytest.fixture(scope="session")
def damaged(tmp_path_factory):
    """Truncated (both MP4 layouts), garbage in the middle, a damaged key-frame index,
    unsupported codec: name -> path."""
    import framecode

    return framecode.make_damaged(str(tmp_path_factory.mktemp("damaged")))


@pytest.fixture(scope="session")
def code_reader(tmp_path_factory):
    import framecode

    path = str(tmp_path_factory.mktemp("reader") / "framecode.keras")
    framecode.build_reader(path)
    return path


@pytest.fixture(scope="session")
def detector(tmp_path_factory):
    """The sample grid detector (rayvid.samples.train_detector), trained once per session."""
    from rayvid import samples

    out = tmp_path_factory.mktemp("detector")
    return samples.train_detector(str(out))


@pytest.fixture(scope="session")
def clip_model(tmp_path_factory):
    """The sample video model (rayvid.samples.train_clip_model): still vs moving clips."""
    from rayvid import samples

    info = samples.train_clip_model(str(tmp_path_factory.mktemp("clips")))
    assert info["accuracy"] >= 0.95, info
    return info
