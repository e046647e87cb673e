"""Helpers shared by the tests: reference values from PyAV, reading outputs back."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.server
import os
import re
import threading
import urllib.parse

import numpy as np

# Known fake credentials: tests grep every output for them (they must never leak).
FAKE_KEY_ID = "AKIAFAKEKEYID0000TEST"
FAKE_SECRET = "fake-secret-5c2e1d/ShouldNeverAppear+InOutput"
BUCKET = "rayvid-test"


def pts_of(path: str) -> np.ndarray:
    """Reference presentation times from PyAV: (pts - start_time) x time_base, sorted. AVI
    and ASF store decode times only: there, of H.264 (whose frames FFmpeg times in decode
    order, a frame's delay later), the k-th decode time from the first (constant rate)."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        if c.format.name in ("avi", "asf") and s.codec_context.name == "h264":
            pts = [p.dts for p in c.demux(s) if p.size]
            start = pts[0]
        else:
            pts = sorted(f.pts for f in c.decode(s))
            start = s.start_time or 0
        tb = s.time_base
    return np.array([(p - start) * tb.numerator / tb.denominator for p in pts])


def read_output(output: str, what: str = "predictions"):
    import pyarrow.dataset as ds

    from rayvid import storage

    fs, path = storage.resolve(output.rstrip("/") + "/" + what)
    if not fs.exists(path):
        return None
    return ds.dataset(path, filesystem=fs, format="parquet").to_table()


def upload_tree(fs, local_dir, url_prefix: str) -> None:
    for dirpath, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, local_dir)
            fs.put_file(src, url_prefix.rstrip("/") + "/" + rel)


HTTP_MODES = ("ranges", "whole", "no-length")


@contextlib.contextmanager
def ftp_server(root: str, user: str, password: str):
    """A real FTP server (pyftpdlib) on 127.0.0.1 serving `root` read-only to `user` with
    `password`; yields its port."""
    import logging

    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import ThreadedFTPServer

    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    users = DummyAuthorizer()
    users.add_user(user, password, root, perm="elr")
    server = ThreadedFTPServer(("127.0.0.1", 0), type("Handler", (FTPHandler,), {"authorizer": users}))
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.2}, daemon=True)
    thread.start()
    try:
        yield server.address[1]
    finally:
        server.close_all()
        thread.join(10)


HTTP_SENT: collections.Counter = collections.Counter()  # body bytes `http_server` sent, per path
HTTP_ASKED: collections.Counter = collections.Counter()  # (method, path, Range header) of each request


@contextlib.contextmanager
def listing_http_server(root: str):
    """Python's own HTTP server on 127.0.0.1 over the files below `root` (folders listed as
    HTML links, byte ranges ignored: the whole file); yields its base URL."""
    import functools

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def http_server(root: str, mode: str):
    """A real HTTP server on 127.0.0.1 serving the files below `root`; yields its base URL.
    `mode` is what it does with a byte-range request (`Range: bytes=a-b`): "ranges" answers
    206 with those bytes (object stores, nginx, CDNs); "whole" sends the whole file, as
    Python's http.server does; "no-length" sends the whole file and no Content-Length
    (a streamed response); "unavailable" answers everything 503 Service Unavailable;
    "range-errors" serves ranges on HEAD and plain GETs but answers a range request 500.
    "cut-first" and "cut-always" send the whole file, as "whole" does, but cut the body of a
    path's first GET of the whole file (a dropped connection), or of every GET (a
    Content-Length that overstates the file), in half.
    In every mode a file named `status-NNN-...` is answered NNN to every request (an expired
    signed URL's 403, a broken backend's 500); a GET of a file named `stall-...` gets its
    head and half its body, then nothing more until the server stops, one named
    `stall-head-...` not even its head, one named `stall-all-...` nothing to a HEAD
    either (a server stuck on one object); one named
    `redirect-loop-...` is redirected to itself. Every answer carries the file's ETag (the MD5 of its bytes, read afresh each time)."""
    assert mode in HTTP_MODES + ("unavailable", "range-errors", "cut-first", "cut-always")
    gets: collections.Counter = collections.Counter()
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            HTTP_ASKED[(self.command, urllib.parse.urlparse(self.path).path, self.headers.get("Range"))] += 1
            if mode == "unavailable" or (mode == "range-errors" and body and "Range" in self.headers):
                self.send_error(503 if mode == "unavailable" else 500)
                return
            status = re.match(r"status-(\d{3})-", os.path.basename(urllib.parse.urlparse(self.path).path))
            if os.path.basename(urllib.parse.urlparse(self.path).path).startswith("redirect-loop-"):
                self.send_response(302)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if status:
                self.send_error(int(status[1]))
                return
            path = os.path.join(root, urllib.parse.unquote(urllib.parse.urlparse(self.path).path).lstrip("/"))
            if not os.path.isfile(path):
                self.send_error(404)
                return
            with open(path, "rb") as f:
                data = f.read()
            name = os.path.basename(path)
            if name.startswith("stall-") and (body or name.startswith("stall-all-")):
                if not name.startswith(("stall-head-", "stall-all-")):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                stop.wait()
                self.close_connection = True
                return
            etag = hashlib.md5(data).hexdigest()  # as S3's for a single-part upload
            asked = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if mode == "ranges" and asked:
                lo, hi = int(asked[1]), min(len(data), int(asked[2]) + 1 if asked[2] else len(data))
                if lo >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(data)}")
                data = data[lo:hi]
            else:
                self.send_response(200)
            if mode in ("ranges", "range-errors"):
                self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{etag}"')
            if mode != "no-length":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                gets[self.path] += "Range" not in self.headers  # (a probe for ranges is not counted)
                if mode == "cut-always" or (mode == "cut-first" and gets[self.path] == 1 and "Range" not in self.headers):
                    data = data[: len(data) // 2]
                    self.close_connection = True
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)
                    HTTP_SENT[urllib.parse.urlparse(self.path).path] += len(data)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a client that hung up early
            pass

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def refusing_model(path: str, check) -> str:
    """A TensorFlow SavedModel at `path` (two classes, 32x32 frames) that runs `check(tf, x)`
    on every batch before it answers: a model that fails on the input `check` asserts
    against (a `tf.debugging` assertion, which names its message in the error)."""
    import tensorflow as tf

    class Refusing(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def serve(self, x):
            check(tf, x)
            return {"probs": tf.nn.softmax(tf.zeros([tf.shape(x)[0], 2]))}

    module = Refusing()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path


def processes(title_prefix: str, ours: bool = False) -> list:
    """(pid, title) of this machine's processes whose command line starts with the prefix
    (Ray names worker processes after what they run: `ray::MapWorker(MapBatches(Decoder))`).
    `ours`: only this process's descendants, which its Ray's are (their raylet is its child):
    not those of another pytest worker's Ray on the same machine."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith(title_prefix) and (not ours or _descends_from(int(pid), os.getpid())):
            found.append((int(pid), title))
    return found


def parent(pid: int) -> int:
    """A process's parent's pid (-1: it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        pid = parent(pid)
        if pid == root:
            return True
    return False


def frames_per_video(table) -> dict:
    """video_uri -> sorted frame indices (duplicates kept, so a test can see them)."""
    seen: dict = {}
    for uri, idx in zip(table.column("video_uri").to_pylist(), table.column("frame_index").to_pylist()):
        seen.setdefault(uri, []).append(idx)
    return {u: sorted(v) for u, v in seen.items()}


def write_output(output: str, videos: dict, fps: float = 10.0, run_id: str = "r1",
                 rows_per_file: int = 1_000_000, every: int = 1, failed: tuple = (), embed_dim: int = 0,
                 k: int = 2, listed: bool = False) -> None:
    """An OUTPUT written by the real Committer from known predictions: `videos` maps a
    video_uri to its frames' (label, score), frame i at t = i / fps; with `every`, only
    frames 0, every, 2*every, ... have rows (sparse sampling). `failed`: URIs that get an
    error row and no frames. rows_per_file=1 writes one part per video. `embed_dim`: an
    `embedding` column (as --embed writes) of that many seeded random floats per frame.
    `k`: top-k entries per frame (the label, another, then `extra_<i>` at score 0).
    `listed`: each video's videos/ row holds its size and version as a listing sees them now."""
    import pyarrow as pa

    from rayvid.commit import Committer
    from rayvid.schema import INFERRED_SCHEMA, KIND_FRAME, embedding_field

    seen = None
    if listed:
        from rayvid import storage
        from rayvid.commit import Listed

        infos = [storage.resolve(uri)[0].info(storage.resolve(uri)[1]) for uri in videos]
        seen = Listed(pa.table({"video_uri": list(videos), "size_bytes": [i["size"] for i in infos],
                                "version": [storage.version_of(i) for i in infos]}))
    committer = Committer(output, run_id, "test-model", rows_per_file=rows_per_file, listed=seen)
    others = ("zz_other", "zz_third")
    for uri, frames in videos.items():
        idx = list(range(0, len(frames), every))
        rows = [frames[i] for i in idx]
        n = len(idx)
        topk = [[{"class_id": 0, "label": lab, "score": float(s)},
                 {"class_id": 1, "label": others[0] if lab != others[0] else others[1], "score": float(1 - s)}][:k]
                + [{"class_id": i, "label": f"extra_{i}", "score": 0.0} for i in range(2, k)]
                for lab, s in rows]
        table = pa.table({
            "video_uri": [uri] * n, "segment": [0] * n, "n_segments": [1] * n, "kind": [KIND_FRAME] * n,
            "frame_index": idx, "timestamp_s": [i / fps for i in idx],
            "label": [lab for lab, _ in rows], "score": np.array([s for _, s in rows], np.float32),
            "topk": topk, "n_frames": [0] * n, "error_stage": [""] * n, "error_type": [""] * n,
            "message": [""] * n, "decoder": [""] * n, "codec": [""] * n, "width": [0] * n,
            "height": [0] * n, "fps": [0.0] * n, "duration_s": [0.0] * n, "reused_from": [-1] * n,
            "bytes_read": [0] * n,
        }, schema=INFERRED_SCHEMA)
        if embed_dim:
            vectors = np.random.default_rng(len(uri)).standard_normal(n * embed_dim).astype(np.float32)
            table = table.append_column(embedding_field(embed_dim), pa.FixedSizeListArray.from_arrays(vectors, embed_dim))
        committer.add(table)
        committer.add(_end_row(uri, n, len(frames) / fps, fps))
    for uri in failed:
        committer.add(_end_row(uri, 0, 0.0, fps, error="VideoError"))
    committer.close()


def _end_row(uri, n, duration, fps, error=""):
    import pyarrow as pa

    from rayvid.schema import INFERRED_SCHEMA, KIND_END

    return pa.table({
        "video_uri": [uri], "segment": [0], "n_segments": [1], "kind": [KIND_END], "frame_index": [-1],
        "timestamp_s": [float("nan")], "label": [None], "score": pa.array([None], pa.float32()),
        "topk": pa.array([None], INFERRED_SCHEMA.field("topk").type), "n_frames": [n],
        "error_stage": ["decode" if error else ""], "error_type": [error],
        "message": ["cannot open video" if error else ""], "decoder": ["pyav"], "codec": ["h264"],
        "width": [160], "height": [120], "fps": [fps], "duration_s": [duration], "reused_from": [-1],
        "bytes_read": [0],
    }, schema=INFERRED_SCHEMA)


def split_rows(batches) -> tuple[list, list]:
    """(frame rows, terminal rows) of the decode stage's batches, each row a dict."""
    from rayvid.schema import KIND_FRAME

    frames, ends = [], []
    for b in batches:
        for i, kind in enumerate(b["kind"]):
            (frames if kind == KIND_FRAME else ends).append({k: v[i] for k, v in b.items()})
    return frames, ends


def listing_hook_store(protocol: str):
    """An in-memory fsspec store (registered as `protocol`) that runs a hook once, right
    after its next listing of a folder ending in a given suffix: `Store.after_listing =
    ("/videos", fn)` (the moment between two listings of an OUTPUT, say); with a third
    item n, after the (n+1)th such listing."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Store(MemoryFileSystem):
        store, pseudo_dirs, after_listing = {}, [""], None

        def ls(self, path, detail=True, **kwargs):
            try:
                return super().ls(path, detail=detail, **kwargs)
            finally:
                if Store.after_listing and path.rstrip("/").endswith(Store.after_listing[0]):
                    suffix, hook, *skip = Store.after_listing
                    if skip and skip[0]:
                        Store.after_listing = (suffix, hook, skip[0] - 1)
                    else:
                        Store.after_listing = None
                        hook()

    Store.protocol = protocol
    fsspec.register_implementation(protocol, Store, clobber=True)
    return Store


def retract_killed_at(output: str, videos: set, crash_at: int, run_id: str = "r2") -> int:
    """`commit.retract` of `videos` in a process of its own, killed (os._exit(9), as SIGKILL
    ends it: no cleanup) at its `crash_at`-th file operation (a rename or a delete: intent
    record, predictions, errors, videos, intent gone); its exit status."""
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent(f"""
        import os
        from fsspec.implementations.local import LocalFileSystem
        from rayvid import commit
        n = 0
        real = os.replace, LocalFileSystem.rm

        def step():
            global n
            n += 1
            if n == {crash_at}:
                os._exit(9)  # killed

        def replace(*a, **k):
            step()
            return real[0](*a, **k)

        def rm(*a, **k):
            step()
            return real[1](*a, **k)

        state = commit.recover({output!r})
        os.replace, LocalFileSystem.rm = replace, rm
        commit.retract({output!r}, {set(videos)!r}, state, {run_id!r})
        os._exit(0)
    """)
    return subprocess.run([sys.executable, "-c", child], cwd=os.getcwd()).returncode
