"""gcp-storage-emulator's GCS JSON API on 127.0.0.1, in memory, for the benchmarks that
measure what reaches a store (`s3_server.py`'s counterpart): `start(hook)` starts it with
one bucket, points gcsfs at it (STORAGE_EMULATOR_HOST), and calls `hook(kind, name)`
("info", "list" or "media"; the object's name, a listing's prefix) before each object
read or listing is answered (to count them, or to add a store's latency). As GCS does and the emulator does not, a media
download honours `ifGenerationMatch` (412 for another generation) and names the
generation it served (`x-goog-generation`)."""

import os
import types

# gcsfs's plain GCSFileSystem (read when gcsfs is imported): its default subclass first asks
# the Storage Control gRPC API for each bucket's layout, which the emulator does not serve.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ["NO_GCE_CHECK"] = "true"  # no GCE metadata server probed for credentials

def start(bucket: str, hook=None):
    """The running server (`.stop()` it when done)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    def read(handler, kind):
        def answer(request, response, storage, *args, **kwargs):
            name = request.params.get("object_id") if kind != "list" else (request.query.get("prefix") or [""])[0]
            if hook is not None:
                hook(kind, name)
            if kind == "media":
                try:
                    obj = storage.get_file_obj(request.params["bucket_name"], name)
                except Exception:  # noqa: BLE001 - not there: the emulator's own 404
                    return handler(request, response, storage, *args, **kwargs)
                wanted = (request.query.get("ifGenerationMatch") or [None])[0]
                if wanted is not None and str(obj.get("generation")) != str(wanted):
                    response.status = types.SimpleNamespace(value=412, phrase="Precondition Failed")
                    response.json({"error": {"code": 412, "message": "Precondition Failed"}})
                    return None
                handler(request, response, storage, *args, **kwargs)
                response["x-goog-generation"] = str(obj.get("generation"))
                return None
            return handler(request, response, storage, *args, **kwargs)

        return answer

    for _, handlers in server.HANDLERS:
        if handlers.get(server.GET) is objects.download:
            handlers[server.GET] = read(objects.download, "media")
        elif handlers.get(server.GET) is objects.get:
            handlers[server.GET] = read(objects.get, "info")
        elif handlers.get(server.GET) is objects.ls:
            handlers[server.GET] = read(objects.ls, "list")
    emulator = server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    emulator.start()
    host, port = emulator._api._httpd.server_address
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://{host}:{port}"
    return emulator
