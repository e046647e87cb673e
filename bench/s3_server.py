"""moto's S3 server on 127.0.0.1, as the tests run it, for the benchmarks that measure what
reaches a store: `start(hook)` starts it, points boto (and so s3fs) at it with throwaway
keys, and calls `hook(environ)` before each request is answered (to count requests, the
bytes a GET asks for, or to add a store's latency)."""

import logging
import os


def start(hook=None):
    """The running server (`.stop()` it when done)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    if hook is not None:
        wsgi = server._server
        app = wsgi.app

        def hooked(environ, start_response):
            hook(environ)
            return app(environ, start_response)

        wsgi.app = hooked
    return server
