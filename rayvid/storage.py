"""Every URL becomes a filesystem and a path here; no other module talks to S3 clients.

Accepts local paths, `file://`, `s3://` (s3fs, honouring the standard AWS environment:
`AWS_ENDPOINT_URL[_S3]`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`,
`AWS_PROFILE`, instance roles; `AWS_NO_SIGN_REQUEST=true` for anonymous public buckets),
`gs://` (gcsfs, `pip install gcsfs`) and any other fsspec protocol.

Also home of `redact()`: what any URL or message passes through before it is logged or
written, so keys, tokens and signed-URL signatures never leave the process.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import datetime
import errno
import fcntl
import fnmatch
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import urllib.parse
import uuid
from typing import BinaryIO, Callable, Iterator, Optional

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from rayvid.errors import StorageError, StorageUnavailable

_TRUE = {"1", "true", "yes", "on"}


def _access_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:  # no S3 support installed
        pass
    try:
        from aiohttp import ClientError as HttpError  # fsspec's HTTP filesystem: an error status on a read

        errors.append(HttpError)
    except ImportError:
        pass
    return tuple(errors)


# Exceptions that mean "this URL cannot be read or written" (missing object, no permission,
# no credentials, endpoint down), as opposed to a bug. Read it where an error is caught
# (`except storage.ACCESS_ERRORS`), never copied: `resolve` adds gcsfs's error class the
# first time a process makes a GCS filesystem (importing gcsfs costs every process that
# imports this module, decode children included, about 0.3 s and 40 MB, S3 users too).
ACCESS_ERRORS = _access_errors()


def _with_gcs_errors() -> None:
    """gcsfs's HttpError (an error status other than 403/404/412, which are OSErrors, after
    its retries) and google-auth's errors (credentials that cannot be had: a token endpoint
    that refuses them or cannot be reached, which gcsfs raises as they are) are access
    errors from the first GCS filesystem on. gcsfs logs each request that ran out of
    retries with its traceback: rayvid says what failed in one line instead."""
    global ACCESS_ERRORS
    from gcsfs.retry import HttpError as GCSError

    auth = sys.modules.get("google.auth.exceptions")  # imported by gcsfs (google-auth is its dependency)
    for error in (GCSError, getattr(auth, "GoogleAuthError", None)):
        if error is not None and error not in ACCESS_ERRORS:
            ACCESS_ERRORS = (*ACCESS_ERRORS, error)
    gcs_log = logging.getLogger("gcsfs")
    if not any(isinstance(f, _RetryTraceback) for f in gcs_log.filters):
        gcs_log.addFilter(_RetryTraceback())
    # gcsfs reads files through fsspec's BackgroundPrefetcher, which logs each error it then
    # raises, three records with two tracebacks per read (a GCS outage: ~300 lines)
    prefetch_log = logging.getLogger("fsspec.prefetcher")
    if not any(isinstance(f, _RaisedAnyway) for f in prefetch_log.filters):
        prefetch_log.addFilter(_RaisedAnyway())


class _RaisedAnyway(logging.Filter):
    """Drops fsspec's prefetcher's ERROR records: each is about an exception it raises to
    the read that rayvid then reports once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


class _RetryTraceback(logging.Filter):
    """Drops gcsfs's "<request> out of retries / non-retriable exception" records (ERROR,
    with a traceback): the exception reaches rayvid, which reports it once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (record.exc_info and ("out of retries" in text or "non-retriable" in text))


def _is_google_auth_error(error: BaseException) -> bool:
    return any(c.__module__ == "google.auth.exceptions" for c in type(error).__mro__)


def is_unavailable(error: BaseException) -> bool:
    """True when the store itself is unreachable (after the client's bounded retries), as
    opposed to one object being missing or forbidden. fsspec's HTTP filesystem reports a
    server it cannot reach, or one that answers 502/503/504, as FileNotFoundError: its
    cause says which. An HTTP server that answered and then sent nothing for
    `http_read_timeout_s()` is this object's (`stalled`): the others it serves go on."""
    return _unreachable_cause(error) is not None and not stalled(error)


def stalled(error: BaseException) -> bool:
    """Whether an HTTP(S) read gave up waiting for the server's next bytes (aiohttp's
    SocketTimeoutError, which fsspec raises as FSTimeoutError from it)."""
    return _aiohttp_said(error, "SocketTimeoutError", context=False)


def _aiohttp_said(error: Optional[BaseException], kind: str, context: bool = True) -> bool:
    """Whether `error` or a cause of it (with `context`, or an error it was raised while
    handling) is aiohttp's `kind`."""
    try:
        import aiohttp
    except ImportError:
        return False
    for _ in range(8):
        if error is None:
            return False
        if isinstance(error, getattr(aiohttp, kind)):
            return True
        error = error.__cause__ or (error.__context__ if context else None)
    return False


def _unreachable_cause(error: BaseException | None) -> BaseException | None:
    """`error` or the first of its causes that says the store is unreachable, else None."""
    seen = 0
    while error is not None and seen < 8:
        if _unreachable(error):
            return error
        error, seen = error.__cause__, seen + 1
    return None


def underlying(error: BaseException) -> BaseException:
    """The error a store's client answered with, where fsspec's HTTP filesystem reports it
    as FileNotFoundError(url): its `info` (a HEAD, then a GET) says FileNotFoundError for
    any status the GET got, a 403 or a 500 as well as a 404; the status is its cause's. Any
    other error is itself."""
    cause = error.__cause__
    if isinstance(error, FileNotFoundError) and error.errno is None and cause is not None:
        try:
            import aiohttp
        except ImportError:
            return error
        if isinstance(cause, aiohttp.ClientResponseError) and cause.status != 404 or stalled(cause):
            return cause  # (a status, or a server that sent nothing: not "nothing there")
    return error


def absent(error: BaseException) -> bool:
    """Whether a FileNotFoundError means nothing is there: not a store that cannot be
    reached, nor an HTTP server's other answer (a 403, a 500: fsspec's HTTP filesystem says
    FileNotFoundError for those too)."""
    return isinstance(error, FileNotFoundError) and not is_unavailable(error) and underlying(error) is error


def _http_status(error: BaseException) -> Optional[int]:
    """The status of an HTTP(S) server's answer (aiohttp's ClientResponseError), else None."""
    try:
        import aiohttp
    except ImportError:
        return None
    return error.status if isinstance(error, aiohttp.ClientResponseError) else None


def http_refused(error: BaseException) -> bool:
    """An HTTP(S) server's 401 or 403 (a signed URL expired or wrong, a token refused)."""
    return _http_status(error) in (401, 403)


def _is_gcs_error(error: BaseException) -> bool:
    """gcsfs's HttpError: an error status from GCS that is not 403/404/412 (OSErrors)."""
    return type(error).__module__ == "gcsfs.retry" and type(error).__name__ == "HttpError"


def _unreachable(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, ReadTimeoutError

        if isinstance(error, (BotoConnectionError, ReadTimeoutError)):
            return True
    except ImportError:
        pass
    if _is_gcs_error(error):  # what gcsfs retries, still failing
        return str(getattr(error, "code", "")) in {"408", "429", "500", "501", "502", "503", "504"}
    if any(c.__module__ == "requests.exceptions" and c.__name__ in ("ConnectionError", "Timeout")
           for c in type(error).__mro__):  # requests' (gcsfs raises a 502 as its ProxyError)
        return True
    try:
        import aiohttp

        if isinstance(error, aiohttp.ClientResponseError):
            return error.status in (502, 503, 504)
        return isinstance(error, (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError))
    except ImportError:
        return False


CREDENTIALS_HINT = (
    "check credentials: AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (S3), "
    "GOOGLE_APPLICATION_CREDENTIALS (GCS), or the instance role / service account"
)


def describe(error: BaseException) -> str:
    """A one-line, credential-free description of an access error, with a hint when the
    cause is missing or refused credentials: a store's refusal (s3fs's PermissionError,
    which has no errno; botocore's credential errors; gcsfs's 401 and its "Forbidden"
    OSError for a 403), not an operating system's EACCES or EPERM on a local file or from
    FFmpeg (those carry an errno), which no credential fixes. Of a store that cannot be
    reached, why not (fsspec's HTTP filesystem says only FileNotFoundError(url): its cause
    says "Cannot connect to host")."""
    # google-auth's errors (a token that cannot be had) say so, with why: a token endpoint
    # that refuses (the hint), or cannot be reached (an outage: its cause)
    auth = _is_google_auth_error(error)
    unreachable = _unreachable_cause(error)
    error = unreachable or underlying(error)
    message = error.args[0] if auth and not unreachable and error.args and isinstance(error.args[0], str) else str(error)
    if _http_status(error):  # (aiohttp's text repeats the URL the message names already)
        message = f"HTTP {error.status} {error.message or ''}".strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    # the first line, and the next where the first only leads to it ("Parameter validation failed:")
    text = redact(" ".join(lines[:2] if len(lines) > 1 and lines[0].endswith(":") else lines[:1])
                  or type(error).__name__)
    name = type(error).__name__
    if auth:
        return f"cannot get GCS credentials: {text}" + ("" if unreachable else f" ({CREDENTIALS_HINT})")
    if isinstance(error, FileNotFoundError) and error.errno is None:
        gcs = _gcs_not_found(text)
        bare = len(error.args) == 1 and isinstance(error.args[0], str) and error.args[0].strip()
        if gcs:
            text = gcs
        elif bare and ": " not in text and not text.endswith("."):  # (fsspec's HTTP, s3fs: the URL or key alone)
            text = f"not found: {text}"
    if stalled(error):
        return (f"the server sent nothing for {http_read_timeout_s():g} s (a stalled transfer; "
                f"RAYVID_HTTP_READ_TIMEOUT_S sets how long to wait)")
    if type(error).__name__ == "TooManyRedirects":  # (aiohttp's: "HTTP 0")
        return f"too many redirects ({len(getattr(error, 'history', ()) or ())} followed: a redirect loop?)"
    if http_refused(error):  # (a signed URL's, whose query is not shown)
        return f"{text} (the server refused it: a signed URL may have expired, or its token is wrong)"
    refused = (isinstance(error, PermissionError) and error.errno is None
               or _is_gcs_error(error) and getattr(error, "code", None) == 401
               or type(error) is OSError and error.errno is None and text.startswith("Forbidden: "))
    if refused or "Credentials" in name or "AccessDenied" in text:
        return f"{text} ({CREDENTIALS_HINT})"
    return text


def _gcs_not_found(text: str) -> Optional[str]:
    """gcsfs's FileNotFoundError says only the JSON API path it asked (`b/<bucket>/o/<key>`,
    or the upload URL `.../b/<bucket>/o?name=...` for a bucket that is not there): what it
    means, or None for any other text."""
    m = re.search(r"(?:^|/storage/v1/)b/([^/?#\s]+)/o(?:/([^?#\s]+))?", text)
    if m is None:
        return None
    bucket, key = urllib.parse.unquote(m[1]), m[2] and urllib.parse.unquote(m[2])
    return f"no such object: gs://{bucket}/{key}" if key else f"no such bucket: gs://{bucket}"


def _attempts() -> int:
    """RAYVID_S3_MAX_ATTEMPTS (default 5), a whole number >= 1, else StorageError naming it."""
    text = os.environ.get("RAYVID_S3_MAX_ATTEMPTS", "5")
    try:
        attempts = int(text)
    except ValueError:
        attempts = 0
    if attempts < 1:
        raise StorageError(f"RAYVID_S3_MAX_ATTEMPTS must be a whole number >= 1, got {text!r}")
    return attempts


def http_read_timeout_s() -> float:
    """RAYVID_HTTP_READ_TIMEOUT_S (default 60): how long an HTTP(S) read waits for the
    server's next bytes (its answer's head, or more of its body) before that object's read
    fails; a number > 0, else StorageError naming it."""
    text = os.environ.get("RAYVID_HTTP_READ_TIMEOUT_S", "60")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise StorageError(f"RAYVID_HTTP_READ_TIMEOUT_S must be a number of seconds > 0, got {text!r}")
    return seconds


def _storage_options(protocol: str) -> dict:
    if protocol in ("s3", "s3a"):
        opts: dict = {}
        if os.environ.get("AWS_NO_SIGN_REQUEST", "").lower() in _TRUE:
            opts["anon"] = True
        # s3fs retries transient errors itself; bound them so a dead endpoint fails in
        # seconds with a clear message instead of hanging.
        opts["config_kwargs"] = {
            "retries": {"max_attempts": _attempts(),
                        "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 60,
        }
        return opts
    if protocol in ("http", "https"):
        import aiohttp

        # aiohttp's default gives up on any request after 300 s (a slow server's whole
        # copy) and waits that long on one that stalls: no limit on the whole, one on
        # waiting for the server's next bytes (a stall is that video's error row)
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=30,
                                                                    sock_read=http_read_timeout_s())}}
    return {}


# fsspec's filesystems made over another file or filesystem (an archive, a reference set, a
# cache): their constructors need that file, which rayvid never chains in from a URL
_OVER_A_FILE = frozenset({"zip", "tar", "libarchive", "reference", "simplecache", "filecache", "blockcache",
                          "cached", "dir", "generic", "async_wrapper", "asyncwrapper"})


def resolve(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Turn any URL or local path into (filesystem, path-within-it). Never fsspec's URL
    chaining (`simplecache::s3://...`): "::" is part of a key or a file name."""
    if not url:
        raise StorageError("empty URL")
    protocol = (fsspec.core.split_protocol(url)[0] or "file").lower()
    if "://" in url and not url.startswith(protocol):  # S3://b/k: a scheme is case-insensitive (RFC 3986)
        url = protocol + url[len(protocol):]
    if protocol in ("s3", "s3a", "gs", "gcs") and any(c in url.split("://", 1)[-1].split("/", 1)[0] for c in "@:"):
        # a bucket name has neither: KEY:SECRET@bucket (whose secret may hold a "/", so
        # the URL is not shown), which s3fs and gcsfs would take for a bucket's name
        raise StorageError(f"credentials in a {protocol}:// URL are not used (the URL is not shown here): "
                           f"give them to the store's client instead ({CREDENTIALS_HINT})")
    if protocol == "data":  # (fsspec's data: filesystem cannot list or stat its own URLs)
        raise StorageError("data: URLs are not read: give the video a path or a URL of a store")
    if protocol in _OVER_A_FILE:  # (made over another file, which a URL cannot carry: an odd error each)
        raise StorageError(f"{protocol}:// URLs are not read (fsspec's filesystems over another file or store: "
                           f"{', '.join(sorted(_OVER_A_FILE))}): unpack the archive, or give the videos' own URLs")
    if protocol == "file" and url[:7].lower() == "file://":
        url = _file_url_path(url)
    try:
        cls = fsspec.get_filesystem_class(protocol)
        fs = cls(**cls._get_kwargs_from_urls(url), **_storage_options(protocol))
        path = cls._strip_protocol(url)
    except ImportError as e:
        raise StorageError(
            f"no filesystem for {protocol}:// URLs ({e}); for gs:// run `pip install gcsfs`"
        ) from None
    except ValueError as e:
        raise StorageError(f"cannot use URL {public_uri(url)!r}: {redact(str(e))}") from None
    except Exception as e:  # noqa: BLE001 (a third party's filesystem refusing this URL)
        # a filesystem that connects as it is made (FTP, SFTP, SMB) fails here where its
        # server cannot be reached (an outage: stops a run) or refuses the login; another
        # where the URL lacks a part it needs (zip://, reference://, data:)
        error = StorageUnavailable if is_unavailable(e) else StorageError
        raise error(f"cannot use URL {public_uri(url)!r}: {describe(e)}") from None
    if is_local(fs):
        path = os.path.abspath(os.path.expanduser(path))
        if path.startswith("//"):  # (POSIX keeps a leading "//"; here it is "/": one name per file)
            path = "/" + path.lstrip("/")
    elif {"gs", "gcs"}.intersection(_protocols(fs)):
        _with_gcs_errors()
    return fs, path


def files_in(fs: fsspec.AbstractFileSystem, folder: str, pattern: str = "*") -> dict:
    """{path: info} of the files directly in `folder` whose names match `pattern` (fnmatch:
    `*`, `?`), listed afresh; {} where there is no such folder. The folder is taken as it
    is spelled: fsspec's glob would read a `[`, `*` or `?` of an OUTPUT's own name as a
    pattern (and search from the folder above it: another output's files, or a bucket)."""
    folder = folder.rstrip("/")
    fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=True)
    except (FileNotFoundError, NotADirectoryError) as e:
        if isinstance(e, FileNotFoundError) and not absent(e):  # fsspec's HTTP: a server it cannot reach, a 403
            raise
        return {}
    return {e["name"]: e for e in entries
            if e.get("type") == "file" and fnmatch.fnmatchcase(e["name"].rsplit("/", 1)[-1], pattern)}


def _file_url_path(url: str) -> str:
    """The path a `file://` URL names (RFC 8089): percent-encoding decoded (`Path.as_uri()`
    writes `a%20b.mp4` for `a b.mp4`), `localhost` as the host allowed; another host refused."""
    rest = url[len("file://"):]
    host, slash, path = rest.partition("/")
    if host and host.lower() != "localhost":
        raise StorageError(f"cannot use URL {public_uri(url)!r}: a file:// URL names a file on this machine "
                           f"(file:///path or file://localhost/path), not on {host.rsplit('@', 1)[-1]!r}")
    return urllib.parse.unquote(slash + path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The inverse of `resolve`: local files stay plain absolute paths. A server's files
    (FTP, SFTP, SMB: the host is the filesystem's, not in its paths) get back the host,
    port and user-info `resolve` took from the URL (`stored_uri` keeps the user-info out
    of every output; a video is read from the URL with it)."""
    if is_local(fs):
        return path
    url = fs.unstrip_protocol(path)
    scheme, sep, rest = url.partition("://")
    opts = getattr(fs, "storage_options", None) or {}
    if sep and rest.startswith("/") and opts.get("host"):
        # as written in the URL: fsspec takes these from it without decoding them
        user, password, port = opts.get("username"), opts.get("password"), opts.get("port")
        userinfo = f"{user}{f':{password}' if password else ''}@" if user else ""
        url = f"{scheme}://{userinfo}{opts['host']}{f':{port}' if port else ''}{rest}"
    return url


def canonical(url: str) -> str:
    """A URL as the listing writes it into video_uri (local paths absolute; `stored_uri`)."""
    return stored_uri(to_url(*resolve(url)))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path (parts are trusted names, never input keys)."""
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


@contextlib.contextmanager
def local_copy(url: str, tmpdir: str, version: str = "", size: int = -1) -> Iterator[str]:
    """Yield a local path holding the object's bytes; remote objects are copied to a temp
    file (a few ranges in memory at a time, `RangeCopy`) that is deleted afterwards. A
    copy is of one version (`version`, as listed, else the one there when it began):
    `ObjectChanged` if the object is another, or was replaced while it was copied. `size`
    is the object's as listed (-1: unknown): with `version` it may spare the store's
    metadata requests (`_conditional`)."""
    fs, path = resolve(url)
    if is_local(fs):
        if os.path.isdir(path):  # (named by a manifest; a folder INPUT lists only files)
            raise IsADirectoryError(errno.EISDIR, "a folder, not a video file", path)
        if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or a device: never opened (it may block)
            raise OSError(errno.EINVAL, "not a regular file (a pipe, socket or device)", path)
        if not os.path.isfile(path):  # (on a cluster: which node did not have it)
            raise FileNotFoundError(f"no such file on host {socket.gethostname()}: {path}")
        yield path
        return
    size, expected, ranged, conditional = _source_of(url, fs, path, version, size)
    if ranged:
        with _range_copy(fs, path, size, tmpdir, expected, conditional) as part:
            part.fetch(0, part.size)  # several ranges in flight
            part.verify()
            yield part.path
        return
    with _temp_file(path, tmpdir) as tmp:  # a store that cannot serve ranges (some HTTP servers): one stream
        _again_if_cut(lambda: fs.get_file(path, tmp))  # (each try writes the file anew)
        check_version(fs, path, expected)
        yield tmp


PAYLOAD_RETRIES = 2  # reads again of a body cut short before the read fails


def _cut_short(error: Optional[BaseException]) -> bool:
    """Whether a read failed because its body was cut short (aiohttp's ClientPayloadError,
    itself or a cause: a dropped connection, or a server whose Content-Length overstates
    the file, which fails every time)."""
    return _aiohttp_said(error, "ClientPayloadError")


def _again_if_cut(read: Callable):
    """`read()`, tried again (PAYLOAD_RETRIES times, a moment apart) where a body came cut
    short: one dropped connection failed the video for good (a QA find); one cut every
    time still fails it, an error row (not the store down: a run would stop on it for ever)."""
    for attempt in range(PAYLOAD_RETRIES + 1):
        try:
            return read()
        except Exception as e:  # noqa: BLE001 - only a cut body is tried again
            if attempt == PAYLOAD_RETRIES or not _cut_short(e):
                raise
            time.sleep(0.25 * (attempt + 1))


def _source_of(url: str, fs: fsspec.AbstractFileSystem, path: str, version: str, size: int) -> tuple:
    """`_source`, its FileNotFoundError naming the URL: s3fs and gcsfs name the bucket and
    key alone (error rows said `not found: bkt/x.mp4`; HTTP's name the URL already)."""
    try:
        return _source(fs, path, version, size)
    except FileNotFoundError as e:
        if e.errno is None and e.args == (path,) and "://" not in path:
            raise FileNotFoundError(public_uri(url)) from None
        raise


def _source(fs: fsspec.AbstractFileSystem, path: str, version: str,
            listed_size: int = -1) -> tuple[Optional[int], str, bool, bool]:
    """(size or None, the version a copy must be of, whether it can be copied in ranges,
    whether its reads are conditional): from one request for the object's metadata
    (`ObjectChanged` if it is not at the listed `version`), or from none where the copy's
    reads can be conditional (`_conditional`: S3 or GCS with the listing's version and size)."""
    if _conditional(fs, path, version, listed_size):
        return int(listed_size), version, True, True
    info = fs.info(path)
    if info.get("type") == "directory":  # (named by a manifest: s3fs says a prefix is one of 0 bytes)
        raise IsADirectoryError(errno.EISDIR, "a folder, not a video file", public_uri(to_url(fs, path)))
    expected = _expect(version, info)
    size = info.get("size")
    size = int(size) if size is not None else None
    return size, expected, size is not None and serves_ranges(fs, path, size), False


# Filesystems (by fsspec's token: one per store and options) whose store refused a read's
# condition (412) with the listed version still there: this process's copies from them ask first.
_NO_IF_MATCH: set = set()

# An ETag as S3 lists it (and MinIO, R2, Ceph, GCS's XML API): an MD5, or a multipart
# upload's MD5 of its parts' MD5s and their count.
_S3_ETAG = re.compile(r"[0-9a-fA-F]{32}(-[0-9]+)?")
_GCS_GENERATION = re.compile(r"[0-9]{1,20}")  # a GCS object's generation, as its listing gives it


def _conditional(fs: fsspec.AbstractFileSystem, path: str, version: str, size: int) -> bool:
    """Whether a copy of the object can go without any metadata request: when the listing
    gave its version and size, each ranged GET carries the condition that the object is
    still at that version (S3: `If-Match: <ETag>`; GCS: `ifGenerationMatch=<generation>`),
    and the store serves it from that version or refuses it (412): no metadata request
    before the copy (to learn its size and version) nor after it (to learn it was not
    replaced meanwhile). A clip of a few MB is then one request instead of three (a short
    clip's copy is latency-bound)."""
    if size is None or int(size) <= 0 or _fs_key(fs) in _NO_IF_MATCH:
        return False
    protocols = set(_protocols(fs))
    if protocols & {"s3", "s3a"}:
        ok = _S3_ETAG.fullmatch(version or "") and hasattr(fs, "_call_s3")
    elif protocols & {"gs", "gcs"}:
        ok = _GCS_GENERATION.fullmatch(version or "") and hasattr(fs, "_call") and hasattr(fs, "url") \
            and not _zonal(fs, path)
    else:
        return False
    if not ok:
        return False
    try:
        return not fs.split_path(path)[2]  # a version in the URL (S3's versionId, GCS's #generation): read that one
    except Exception:
        return False


# (filesystem token, bucket) -> whether the bucket is zonal, as gcsfs told it once in this process
_ZONAL: dict = {}


def _zonal(fs, path: str) -> bool:
    """Whether a GCS object is in a zonal bucket, which gcsfs's default filesystem (its
    ExtendedGcsFileSystem) reads over gRPC in its own `_cat_file`: its reads are left to
    it, checked before and after as without conditions. A bucket whose layout gcsfs cannot
    look up (no access to the Storage Control API, an emulator) it takes as not zonal and
    reads through the JSON API, as rayvid does then. Asked once per bucket and process:
    gcsfs asks again at every read where it could not tell (a lookup that cannot connect
    retries for up to a minute)."""
    if not hasattr(fs, "_is_zonal_bucket"):  # the plain GCSFileSystem: the JSON API
        return False
    key = (_fs_key(fs), fs.split_path(path)[0])
    if key not in _ZONAL:
        try:
            _ZONAL[key] = bool(fsspec.asyn.sync(fs.loop, fs._is_zonal_bucket, key[1]))
        except Exception:  # noqa: BLE001 - not told (an event loop's error): gcsfs's own route, as before
            return True
    return _ZONAL[key]


def _fs_key(fs) -> str:
    return str(getattr(fs, "_fs_token", id(fs)))


async def _s3_ranges(fs, path: str, ranges: list, etag: str) -> list:
    """(bytes, the answer's ETag or "", the object's size it gave or None) of each [lo, hi)
    of `ranges` of an S3 object, read concurrently, each GET on the condition that the
    object is still at `etag` (else that read fails: 412). As s3fs's own `_cat_file` reads a
    range (its retries of the call, and of reading the body), with If-Match added; s3fs's
    request-wide options (requester pays, SSE-C) apply."""
    from s3fs.core import _error_wrapper

    bucket, key, _ = fs.split_path(path)

    async def one(lo: int, hi: int) -> tuple:
        async def get() -> tuple:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={lo}-{hi - 1}",
                                     IfMatch=f'"{etag}"')
            try:
                data = await resp["Body"].read()
            finally:
                resp["Body"].close()
            return data, str(resp.get("ETag") or "").strip('"'), _total(resp.get("ContentRange"))

        return await _error_wrapper(get, retries=fs.retries)

    return await _all_of(one(lo, hi) for lo, hi in ranges)


def _total(content_range) -> Optional[int]:
    """The object's size a Content-Range names ("bytes 0-99/1000": 1000), else None."""
    total = str(content_range or "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


async def _all_of(reads) -> list:
    """The results of `reads` run concurrently, once all of them are done (none still
    writing once this returns); the first one's exception, if any failed."""
    import asyncio

    out = await asyncio.gather(*reads, return_exceptions=True)
    for data in out:
        if isinstance(data, BaseException):
            raise data
    return out


async def _gcs_ranges(fs, path: str, ranges: list, generation: str) -> list:
    """`_s3_ranges` on GCS: each [lo, hi) of `ranges` read concurrently, each GET on the
    condition that the object is still at `generation` (`ifGenerationMatch`, else 412:
    gcsfs's FileExistsError), through gcsfs's request path (its credentials, retries and
    requester-pays project); each answer's `x-goog-generation` ("" where it names none)."""
    url = fs.url(path)

    async def one(lo: int, hi: int) -> tuple:
        headers, data = await fs._call("GET", url, headers={"Range": f"bytes={lo}-{hi - 1}"},
                                       ifGenerationMatch=generation)
        return data, str(headers.get("x-goog-generation") or ""), _total(headers.get("Content-Range"))

    return await _all_of(one(lo, hi) for lo, hi in ranges)


def _refused(e: BaseException) -> bool:
    """Whether a conditional read failed on its condition (412), or on a range past the end
    of a shorter object now there (416): s3fs's EINVAL for both; gcsfs's FileExistsError
    for a 412, its HttpError with the code for a 416 (a ValueError, which gcsfs makes of an
    error saying "invalid", is no refusal: raised as it is)."""
    if isinstance(e, FileExistsError):
        return True
    if isinstance(e, OSError) and e.errno == errno.EINVAL:
        return True
    return getattr(e, "code", None) in (412, 416)


@contextlib.contextmanager
def shared_copy(url: str, tmpdir: str, version: str = "", size: int = -1) -> Iterator[tuple[str, int]]:
    """(local path, bytes this call copied) of a whole copy of a remote object that every
    process on this machine reading the same object (at the same listed `version`) at the
    same time shares: the first to ask copies it (`local_copy`: the same version checks),
    the others wait and copy nothing, the last to finish deletes it. For the segments of a
    long video that cannot be read in parts: a node's decode actors, and an actor's two
    calls (one decoding while the next fetches), otherwise copy it once per segment.

    The copies live in a directory of this user's (`user_dir`), one folder per object
    with a `state.json` (ready or not, and the pids using it) that changes only under one
    lock file (`fcntl.flock`). Users that died (a SIGKILLed actor) are dropped when anyone
    next takes the lock, and a copy nobody alive uses is deleted then. Without such a
    directory (not ours, or not writable) it is `local_copy` into `tmpdir`."""
    root = user_dir("rayvid-shared")
    if root is None:
        with local_copy(url, tmpdir, version, size) as path:
            yield path, os.path.getsize(path)
        return
    key = hashlib.sha256(f"{stored_uri(url)}\n{version}".encode()).hexdigest()[:40]
    folder, me = os.path.join(root, key), os.getpid()
    data = os.path.join(folder, "video" + _suffix(url))
    copier = None
    while copier is None:
        with _locked(root):
            _sweep(root)
            state = _state(folder)
            if state is None:
                os.makedirs(folder, mode=0o700)
                _set_state(folder, {"ready": False, "users": [me]})
                copier = True
            elif state["ready"]:
                _set_state(folder, dict(state, users=state["users"] + [me]))
                copier = False
        if copier is None:  # another process (or call) is copying it: wait for that copy
            time.sleep(0.05)
    copied = 0
    try:
        if copier:
            with local_copy(url, folder, version, size) as path:
                os.replace(path, data)
            copied = os.path.getsize(data)
            with _locked(root):
                _set_state(folder, dict(_state(folder), ready=True))
        yield data, copied
    finally:
        with _locked(root):
            state = _state(folder) or {"ready": False, "users": []}
            users = list(state["users"])
            if me in users:
                users.remove(me)
            if not users or not state["ready"]:  # the last user, or a copy that failed
                shutil.rmtree(folder, ignore_errors=True)
            else:
                _set_state(folder, dict(state, users=users))


def user_dir(prefix: str) -> Optional[str]:
    """`$TMPDIR/<prefix>-<uid>`, a directory this user alone may enter (made if needed), or
    None where it cannot be ours: a link, or someone else's: never write through it."""
    root = os.path.join(tempfile.gettempdir(), f"{prefix}-{os.getuid()}")
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        st = os.lstat(root)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return root


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
    fd = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


def _state(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, "state.json")) as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def _set_state(folder: str, state: dict) -> None:
    tmp = os.path.join(folder, "state.json.tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(folder, "state.json"))


def _sweep(root: str) -> None:
    """(Under the lock) forget the users that are gone; delete the copies no one alive uses."""
    for name in os.listdir(root):
        folder = os.path.join(root, name)
        if name == ".lock" or not os.path.isdir(folder):
            continue
        state = _state(folder)
        users = [pid for pid in (state or {}).get("users", []) if process_running(pid)]
        if not users:
            shutil.rmtree(folder, ignore_errors=True)
        elif users != state["users"]:
            _set_state(folder, dict(state, users=users))


def process_started(pid: int) -> Optional[str]:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat), with a "Z"
    before it for a zombie (dead, not yet reaped); None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold anything
    except (OSError, IndexError):
        return None
    return ("Z" if fields[0] == b"Z" else "") + fields[19].decode()


def process_running(pid: int, started: str = "") -> bool:
    """Whether process `pid` of this machine is running: no zombie and, where `started`
    (`process_started` when it was recorded) is known, the same process (a pid is reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it is running, but is it the one?
        pass
    now = process_started(pid)
    return now is None or not now.startswith("Z") and (not started or now == started)


def _suffix(path: str) -> str:
    """A copy's extension: the object's (some demuxers look at it), letters and digits only
    (of an HTTP URL's path, not its query: a presigned URL's signature is no extension)."""
    if path.lower().startswith(("http://", "https://")):  # elsewhere "?" and "#" are part of the key
        path = urllib.parse.urlsplit(path).path
    return "." + re.sub(r"[^A-Za-z0-9]", "", os.path.splitext(path)[1])[:12]


class ObjectChanged(OSError):
    """The object is not the version listed, or was replaced while it was read: its frames
    would come from another video, or from two. That video's error row, which the next
    run reads again (commit.pending)."""


def version_of(info: dict) -> str:
    """What names one version of an object's content in fsspec's `info`: a GCS object's
    generation (its ETag changes with its metadata too), else its ETag, else its
    modification time ("" when the store tells neither)."""
    for key in ("generation", "ETag", "etag", "mtime", "LastModified", "Last-Modified"):
        if info.get(key):
            return str(info[key]).strip('"')
    return ""


def check_version(fs: fsspec.AbstractFileSystem, path: str, expected: str, since: str = "while it was read") -> None:
    """Raise `ObjectChanged` unless the object is still at version `expected` ("": not known,
    nothing to check). Asks the store afresh, never a listing cache."""
    if not expected:
        return
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    try:
        now = version_of(fs.info(path))
    except FileNotFoundError as e:
        if not absent(e):  # (a store it cannot reach; an HTTP server's 403 or 500: said as such)
            raise
        raise ObjectChanged(f"the object was deleted {since}") from None
    if now and now != expected:
        raise ObjectChanged(f"the object changed {since} (version {expected}, now {now})")


def pin(url: str, version: str = "") -> Callable[[], None]:
    """For reading an object in place (a local file): `ObjectChanged` now unless it is at
    `version` (as listed; "": any), and a function that raises it later unless the object
    is still at the version it is now."""
    fs, path = resolve(url)
    expected = _expect(version, fs.info(path))
    return lambda: check_version(fs, path, expected)


def _expect(listed: str, info: dict) -> str:
    """The version a read must see: the listed one, which `info` (the store's answer now)
    must still be, else the one there now."""
    now = version_of(info)
    if listed and now and now != listed:
        raise ObjectChanged(f"the object changed after it was listed (version {listed}, now {now})")
    return listed or now


# HTTP servers' answers to `serves_ranges`, by (URL, size): a decode actor asks once per
# object, not once per segment (a request each, and a round trip before every copy).
_RANGES_SEEN: dict = {}
RANGES_SEEN_MAX = 4096


def serves_ranges(fs: fsspec.AbstractFileSystem, path: str, size: Optional[int] = None) -> bool:
    """Whether the store answers a byte-range request for the object with those bytes
    alone (asks nothing of object stores: S3, GCS and Azure always do). An HTTP server may
    not say how large the object is, or may send all of it instead (Python's http.server
    does): there one request for byte 1 tells, and fsspec refuses an answer that is not
    that range before reading its body."""
    if not {"http", "https"}.intersection(_protocols(fs)):
        return True
    size = fs.size(path) if size is None else size
    if size is None:
        return False
    if size < 2:
        return True
    known = _RANGES_SEEN.get((path, size))
    if known is not None:  # asked before in this process: a video's planning, its segments' copies
        return known
    try:
        with fs.open(path, "rb", block_size=1, cache_type="none", size=size) as f:
            f.seek(1)
            answer = len(f.read(1)) == 1
    except ValueError:  # "The HTTP server doesn't appear to support range requests"
        answer = False
    if len(_RANGES_SEEN) >= RANGES_SEEN_MAX:
        _RANGES_SEEN.clear()
    _RANGES_SEEN[(path, size)] = answer
    return answer


def open_read(fs: fsspec.AbstractFileSystem, path: str, size: Optional[int] = None, block: int = 256 * 2**10):
    """A seekable read-only file over the object, for pyarrow's reads of a footer and the
    columns it wants: byte ranges where the store serves them (`RangeReader` where the size
    is known, else fsspec's file without read-ahead), else the whole body read at once (an
    HTTP server that ignores ranges, as Python's http.server: fsspec's file refused every
    seek there, "doesn't appear to support range requests")."""
    if not serves_ranges(fs, path, size):
        return io.BytesIO(fs.cat_file(path))
    return RangeReader(fs, path, size, block) if size is not None else fs.open(path, "rb", cache_type="none")


class RangeReader(io.RawIOBase):
    """A read-only, seekable file over an object of known size that asks its store for
    byte ranges only (`fs.cat_file(path, start, end)`), at least `block` bytes at a time.
    A file opened through fsspec asks for the object's metadata first (s3fs before its
    first read, gcsfs as it opens): one request more per object than a listing that gave
    its size needs."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, size: int, block: int = 256 * 2**10):
        super().__init__()
        self.fs, self.path, self.size, self.block = fs, path, int(size), int(block)
        self.pos, self._start, self._data = 0, 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + int(offset))
        return self.pos

    def readinto(self, buffer) -> int:
        """Fills `buffer` (short only at the end of the object: pyarrow takes a short read
        for the end of its file), from the block held and a request for what it lacks."""
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self.pos < self.size:
            if not self._start <= self.pos < self._start + len(self._data):
                end = min(self.size, self.pos + max(self.block, len(view) - done))
                self._start, self._data = self.pos, self.fs.cat_file(self.path, start=self.pos, end=end)
                if not self._data:  # the object is shorter than it was listed
                    break
            at = self.pos - self._start
            n = min(len(view) - done, len(self._data) - at)
            view[done : done + n] = self._data[at : at + n]
            self.pos += n
            done += n
        return done


@contextlib.contextmanager
def _temp_file(path: str, tmpdir: str) -> Iterator[str]:
    """An empty file in `tmpdir` for a copy of the object at `path`, deleted afterwards. Its
    name keeps the extension (some demuxers look at it), and nothing else of the key:
    letters and digits only, so no key can steer where the copy is written."""
    fd, tmp = tempfile.mkstemp(prefix="rayvid-", suffix=_suffix(path), dir=tmpdir)
    os.close(fd)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


class RangeCopy:
    """A local sparse file as long as a remote object, filled range by range: `fetch`
    copies byte ranges of the object to the same offsets (ranges already here are not
    fetched again). What was never fetched reads as zeros.

    Ranges are read in pieces of at most CHUNK bytes, READS_IN_FLIGHT pieces at a time
    (`cat_ranges`: s3fs and gcsfs send them concurrently): an object store serves each
    connection at a bounded rate and several connections to one object at several times
    it (AWS, "Use byte-range fetches": 8 or 16 MB ranges over concurrent connections), so
    a copy is not held to one connection's speed, and at most CHUNK x READS_IN_FLIGHT
    bytes are in memory. Smaller pieces (a key-frame scan's packets, a fragmented MP4's
    moofs: there each request's latency is the cost) go more at a time, up to
    SMALL_READS_IN_FLIGHT, within the same bytes.

    With `conditional` (`_conditional`: S3 or GCS, the listed ETag or generation as
    `version`) every read is a GET on the condition that the object is still that version,
    and each answer's own version and total size are compared with the listed ones (a store
    that ignores the condition is caught too): no byte can come from another version, so
    `verify` asks nothing. Where an answer names no version, `verify` asks after, as
    without conditions; where the store
    refuses the condition but the listed version is what a HEAD finds (a store comparing
    ETags its own way), the copy goes on without conditions, checked after."""

    CHUNK = 8 * 2**20
    READS_IN_FLIGHT = 4
    SMALL_READS_IN_FLIGHT = 32

    def __init__(self, fs: fsspec.AbstractFileSystem, remote: str, size: int, path: str, version: str = "",
                 conditional: bool = False):
        self.fs, self.remote, self.size, self.path = fs, remote, int(size), path
        self.version = version  # the object's version its ranges must come from ("": unknown)
        self.conditional = conditional
        # whose conditional reads these are (`conditional` only): GCS's, else S3's
        self._gcs = bool({"gs", "gcs"}.intersection(_protocols(fs)))
        self._unconfirmed = False  # a conditional read whose answer named no version: `verify` asks
        self.fetched = 0  # bytes read from the store
        self._have: list[tuple[int, int]] = []  # sorted, disjoint [start, end) ranges

    def fetch(self, offset: int, length: int) -> None:
        self.fetch_ranges([(offset, length)])

    def fetch_ranges(self, ranges: list) -> None:
        """Fetches every (offset, length) of `ranges` not here yet, their pieces in flight together."""
        asked = _merged([(max(0, int(o)), min(self.size, int(o) + int(n))) for o, n in ranges])
        pieces = [(at, min(at + self.CHUNK, hi)) for start, end in asked
                  for lo, hi in self._missing(start, end) for at in range(lo, hi, self.CHUNK)]
        if not pieces:  # all here already (`read` of what was fetched): no file to open
            return
        with open(self.path, "r+b") as dst:
            for batch in self._batches(pieces):
                for (lo, hi), data in zip(batch, self._read(batch)):
                    if len(data) > hi - lo:  # never written: it would land on the wrong bytes
                        raise OSError(f"the store sent {len(data)} bytes for a range of {hi - lo}: "
                                      "it does not serve byte ranges")
                    dst.seek(lo)
                    dst.write(data)
                    self.fetched += len(data)
                    if len(data) < hi - lo:
                        self._raise_if_replaced()
                        raise OSError(f"the object ended at byte {lo + len(data)} of {self.size}")
                    self._add(lo, hi)

    def _batches(self, pieces: list) -> Iterator[list]:
        """The pieces in groups read at once: up to CHUNK x READS_IN_FLIGHT bytes, and up to
        SMALL_READS_IN_FLIGHT pieces (READS_IN_FLIGHT when they are whole CHUNKs)."""
        batch, budget = [], self.CHUNK * self.READS_IN_FLIGHT
        for lo, hi in pieces:
            if batch and (len(batch) == self.SMALL_READS_IN_FLIGHT or hi - lo > budget):
                yield batch
                batch, budget = [], self.CHUNK * self.READS_IN_FLIGHT
            batch.append((lo, hi))
            budget -= hi - lo
        if batch:
            yield batch

    def _read(self, batch: list) -> list:
        """The bytes of each [lo, hi) of `batch`, read from the store together."""
        if not self.conditional:
            try:
                return _again_if_cut(lambda: self.fs.cat_ranges([self.remote] * len(batch), [lo for lo, _ in batch],
                                                                [hi for _, hi in batch], on_error="raise"))
            except OSError as e:  # e.g. a range past the end of a shorter object now there
                if not is_unavailable(e):
                    self._raise_if_replaced()
                raise
        try:
            answers = fsspec.asyn.sync(self.fs.loop, _gcs_ranges if self._gcs else _s3_ranges, self.fs,
                                       self.remote, batch, self.version)
        except FileNotFoundError as e:
            if is_unavailable(e):
                raise
            if not self.fetched:  # not there (as the metadata request said before: it named the object)
                raise FileNotFoundError(public_uri(to_url(self.fs, self.remote))) from None  # (with its scheme)
            raise ObjectChanged("the object was deleted after it was listed") from None
        except Exception as e:
            # refused (412), or a range past the end (416) of a shorter object now there:
            # the object changed, unless a metadata request finds the listed version still
            # there: then the store compares versions its own way (read on without
            # conditions, checked after, and this process asks that store's objects first
            # from now on)
            if not _refused(e) or is_unavailable(e) or isinstance(e, ObjectChanged):
                raise
            check_version(self.fs, self.remote, self.version, since="after it was listed")
            answer = getattr(e.__cause__, "response", None) or {}
            if (self._gcs and getattr(e, "code", 412) == 412) or answer.get("Error", {}).get("Code") == "PreconditionFailed":
                _NO_IF_MATCH.add(_fs_key(self.fs))  # (not a 400 of another kind)
            self.conditional = False
            return self._read(batch)
        for _, etag, total in answers:
            if not etag:
                self._unconfirmed = True
            elif etag != self.version:  # a store that ignored If-Match
                raise ObjectChanged(f"the object changed after it was listed (version {self.version}, now {etag})")
            if total is not None and total != self.size:
                raise ObjectChanged(f"the object changed after it was listed ({self.size} bytes, now {total})")
        return [data for data, _, _ in answers]

    def _raise_if_replaced(self) -> None:
        """`ObjectChanged` where a read failed because the object is another one now (a
        shorter one answers a range with fewer bytes, or not at all): by its version, or
        without one known, by its size."""
        if self.conditional:  # (each answer was of the listed version and size: a short one is a bad store)
            check_version(self.fs, self.remote, self.version, since="after it was listed")
            return
        self.verify()
        if self.version:
            return
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.remote)
        try:
            now = self.fs.info(self.remote).get("size")
        except FileNotFoundError as e:
            if not absent(e):  # (a store it cannot reach; an HTTP server's 403 or 500: said as such)
                raise
            raise ObjectChanged("the object was deleted while it was read") from None
        if now is not None and int(now) != self.size:
            raise ObjectChanged(f"the object changed while it was read ({self.size} bytes, now {now})")

    def verify(self) -> None:
        """`ObjectChanged` if the object is no longer the version the copy began with (its
        ranges are separate reads: a replaced object would have mixed two versions). Asks
        nothing after conditional reads whose answers each named that version."""
        if not self.conditional or self._unconfirmed:
            check_version(self.fs, self.remote, self.version)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the object, fetched first if they are not here yet."""
        self.fetch(offset, length)
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def _missing(self, start: int, end: int) -> list[tuple[int, int]]:
        out, at = [], start
        first = max(0, bisect.bisect_right(self._have, (start,)) - 1)  # the last range from before start
        for lo, hi in itertools.islice(self._have, first, None):
            if lo >= end:
                break
            if hi <= at:
                continue
            if lo > at:
                out.append((at, lo))
            at = max(at, hi)
        if at < end:
            out.append((at, end))
        return out

    def _add(self, start: int, end: int) -> None:
        """Adds [start, end) to the ranges here, joined with those it overlaps or touches
        (by bisection: a fragmented MP4's index is thousands of ranges)."""
        i = bisect.bisect_left(self._have, (start,))
        if i > 0 and self._have[i - 1][1] >= start:
            i -= 1
            start = self._have[i][0]
        j = i
        while j < len(self._have) and self._have[j][0] <= end:
            end = max(end, self._have[j][1])
            j += 1
        self._have[i:j] = [(start, end)]


def _merged(ranges: list) -> list[tuple[int, int]]:
    """[start, end) ranges sorted, the overlapping or touching ones joined, the empty ones dropped."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] < r[1]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


@contextlib.contextmanager
def range_copy(url: str, tmpdir: str, version: str = "", size: int = -1) -> Iterator[Optional[RangeCopy]]:
    """A `RangeCopy` of an object in `tmpdir` (named like `local_copy`'s), deleted
    afterwards: for reading the parts of a large object that one task needs. None when the
    store cannot serve parts of it (an HTTP server that gives no size or ignores byte
    ranges): copy it whole instead. `ObjectChanged` if the object is not at `version` (as
    listed; ""; any); `RangeCopy.verify` says whether it still is once all is read. `size`:
    as `local_copy`'s."""
    fs, path = resolve(url)
    size, expected, ranged, conditional = _source_of(url, fs, path, version, size)
    if not ranged:
        yield None
        return
    with _range_copy(fs, path, size, tmpdir, expected, conditional) as part:
        yield part


@contextlib.contextmanager
def _range_copy(fs, path: str, size: int, tmpdir: str, version: str, conditional: bool = False) -> Iterator[RangeCopy]:
    with _temp_file(path, tmpdir) as tmp:
        os.truncate(tmp, size)  # a hole: takes no disk until written
        yield RangeCopy(fs, path, size, tmp, version, conditional)


def is_remote(url: str) -> bool:
    """Whether a URL is on a filesystem other than this machine's."""
    return not is_local(resolve(url)[0])


def iter_files(url: str, page_size: int = 1000) -> Iterator[list[tuple[str, int, str]]]:
    """Every file below a folder or prefix URL, a page at a time: lists of
    (url, size_bytes, version). On S3 and GCS these are the store's own listing pages
    (ListObjectsV2; the JSON API's objects.list): bounded memory however many objects there
    are, and no per-object metadata kept; a local folder is walked (`_local_files`);
    elsewhere fsspec's find, which holds the whole listing."""
    fs, root = resolve(url)
    if {"gs", "gcs"}.intersection(_protocols(fs)):
        yield from _gcs_pages(fs, root, page_size)
        return
    if {"s3", "s3a"}.intersection(_protocols(fs)):
        bucket, key, _ = fs.split_path(root)
        prefix = key.rstrip("/") + "/" if key else ""
        _fast_timestamps(fs)
        token = None
        while True:
            args = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
            if token:
                args["ContinuationToken"] = token
            page = fs.call_s3("list_objects_v2", **args)
            yield [(f"s3://{bucket}/{o['Key']}", int(o.get("Size", -1)), str(o.get("ETag", "")).strip('"'))
                   for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
    if is_local(fs):
        found = ((path, {"size": st.st_size, "mtime": st.st_mtime}) for path, st in _local_files(root))
    else:
        found = fs.find(root, detail=True, withdirs=False).items()
    rows = []
    for path, info in found:
        if info.get("islink"):  # find gives a symlink's own mtime; the version is its file's
            info = fs.info(path)
        size = info.get("size")
        rows.append((to_url(fs, path), int(size) if size is not None else -1, version_of(info)))
        if len(rows) == page_size:
            yield rows
            rows = []
    yield rows


def _fast_timestamps(fs) -> None:
    """botocore reads each timestamp of a response with dateutil's general parser: 48 of the
    62 ms of CPU a 1,000-object ListObjectsV2 page cost to parse here, a minute of the
    driver's CPU for a million objects. S3 writes them as ISO 8601 in UTC ("…T09:51:57.000Z"),
    which `datetime.fromisoformat` reads as the same instant in a fraction of that; anything
    else still goes to botocore's own parser. Set on the parser factory of this filesystem's
    botocore session (fsspec keeps one filesystem per set of options), from which its clients
    make a parser for each response."""
    try:
        fs.connect()  # (the client it has, or a new one)
        fs.session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_iso_utc)
    except Exception:  # noqa: BLE001 - only speed is lost; the listing's first call meets any real problem again
        return


_S3_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")  # as S3 writes LastModified


def _iso_utc(value):
    """botocore's `parse_timestamp`, fast for S3's ISO 8601 form in UTC."""
    if isinstance(value, str) and _S3_TIMESTAMP.fullmatch(value):
        try:
            return datetime.datetime.fromisoformat(value[:-1]).replace(tzinfo=datetime.timezone.utc)
        except ValueError:  # (a month 13: botocore says so)
            pass
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple:
    """A filesystem's protocol names, its own first (s3fs: ("s3", "s3a"))."""
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol or ())


def is_folder(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether `path` is a folder (FileNotFoundError where nothing is there). fsspec's HTTP
    `info` says "file" of any URL: there a listing page with links is one."""
    if fs.info(path).get("type") == "directory":
        return True
    return bool({"http", "https"}.intersection(_protocols(fs))) and fs.isdir(path)


def missing_bucket(fs: fsspec.AbstractFileSystem, root: str) -> Optional[str]:
    """`s3://bucket` (or `gs://`) where `root` is in an object store's bucket that does not
    exist; None where it does, where the store cannot tell, or off object stores."""
    protocol = next((p for p in _protocols(fs) if p in ("s3", "s3a", "gs", "gcs")), None)  # (its own first name)
    bucket = root.strip("/").split("/", 1)[0]
    if protocol is None or not bucket:
        return None
    with contextlib.suppress(*ACCESS_ERRORS, ValueError):  # (cannot tell)
        if not fs.exists(bucket):
            return f"{protocol}://{bucket}"
    return None


def _gcs_pages(fs, root: str, page_size: int) -> Iterator[list[tuple[str, int, str]]]:
    """gcsfs's find gathers every page before it returns; this asks for one page at a time
    (objects.list, GCS's own paging: at most 1000 a page), through gcsfs's request path
    (its credentials, retries and requester-pays project)."""
    bucket, key, _ = fs.split_path(root)
    args = {"prefix": key.rstrip("/") + "/" if key else None, "maxResults": min(page_size, 1000)}
    while True:
        page = fs.call("GET", "b/{}/o", bucket, json_out=True, **args)
        yield [(f"gs://{bucket}/{o['name']}", int(o.get("size", -1)), version_of(o))
               for o in page.get("items", []) if not o["name"].endswith("/")]
        args["pageToken"] = page.get("nextPageToken")
        if not args["pageToken"]:
            return


def _local_files(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """(path, stat of its file) of every regular file below a local folder, symbolic links
    followed, to folders too (fsspec's find follows links to files only, and fails at a
    broken one). Paths are as reached (`root/link/x.mp4`: the name the user sees). A broken
    link is skipped, with a warning. Each folder is listed once (by device and inode), the
    ones reached without a link first: a link loop ends, and a folder linked from inside
    `root` is listed where it is. Files stream out folder by folder: what is held is the
    folders, not the files."""
    seen: set = set()
    real, linked = [(root, os.stat(root))], collections.deque()
    while real or linked:
        folder, st = real.pop() if real else linked.popleft()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        subfolders, links = [], []
        try:
            entries = os.scandir(folder)
        except (PermissionError, FileNotFoundError, NotADirectoryError) as e:  # lost+found; gone meanwhile
            logging.getLogger("rayvid").warning("skipping %s: %s", folder, e.strerror)
            continue
        with entries:
            for entry in entries:
                if not_utf8(entry.name):  # no Arrow string (video_uri) can hold it
                    logging.getLogger("rayvid").warning(
                        "skipping %s: its name is not UTF-8 (rename it to read it)", not_utf8(entry.path))
                    continue
                try:
                    st = entry.stat()  # of what a link points to
                except OSError as e:
                    if e.errno == errno.EACCES:  # a link into a folder this user cannot enter
                        logging.getLogger("rayvid").warning("skipping %s: permission denied", entry.path)
                        continue
                    if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        raise
                    if entry.is_symlink():  # else deleted while listed
                        logging.getLogger("rayvid").warning("skipping %s: a broken symbolic link", entry.path)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    (links if entry.is_symlink() else subfolders).append((entry.path, st))
                elif stat.S_ISREG(st.st_mode):
                    yield entry.path, st
        real.extend(sorted(subfolders, key=lambda f: f[0], reverse=True))
        linked.extend(sorted(links, key=lambda f: f[0]))


def not_utf8(name: str) -> Optional[str]:
    """None where a name from the operating system is UTF-8; else the name as it may be
    shown (its other bytes as \\xNN: Python holds them as surrogates, which no UTF-8
    string, an Arrow one included, can encode)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return None


@contextlib.contextmanager
def access(url: str, doing: str, error: type = StorageError) -> Iterator[None]:
    """Inside, an access error becomes `error("cannot {doing} {url}: {why}")`, so a
    message names the URL that failed (`with storage.access(dest, "write"): ...`)."""
    try:
        yield
    except ACCESS_ERRORS as e:
        raise error(f"cannot {doing} {public_uri(url)}: {describe(e)}") from None


def read_bytes(url: str) -> bytes:
    fs, path = resolve(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_atomic(url: str, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that readers see all of it or nothing.

    Object stores publish an object only when its upload completes, so writing in place is
    atomic there, as long as a write that fails is never completed: fsspec's files upload
    what they hold when closed, even from an exception (a Ctrl-C inside `write` would
    publish a truncated Parquet file), so a failed write is discarded (a multipart upload
    aborted) and never closed. On a local or shared filesystem we write `.<name>.tmp-<id>`
    (a name no `*.parquet` glob matches) and rename it over the final name: a symbolic
    link's target (the link stays), keeping an existing file's permissions; a name that
    is no regular file (a device such as /dev/null, a FIFO) is written into, as a shell's
    `>` does (a rename would replace it with a file).
    """
    fs, path = resolve(url)
    if is_local(fs):
        path = os.path.realpath(path)  # (a link's target, through every link)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            with open(path, "wb") as f:
                write(f)
            return
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if mode is not None:
                os.chmod(tmp, stat.S_IMODE(mode))
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    try:
        f = fs.open(path, "wb")
    except NotImplementedError:  # (fsspec's HTTP filesystem, and others that only read)
        raise PermissionError(errno.EROFS, f"{url.split('://', 1)[0].lower()}:// is read-only: it cannot be "
                              f"written") from None
    try:
        write(f)
    except BaseException:
        with contextlib.suppress(Exception):
            f.discard()
        with contextlib.suppress(AttributeError):
            f.closed = True  # so that nothing (close, __del__) uploads what was written
        raise
    f.close()


def object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is S3's or GCS's (prefixes, not folders)."""
    return bool({"s3", "s3a", "gs", "gcs"}.intersection(_protocols(fs)))


def read_only(url: str) -> bool:
    """Whether rayvid cannot write at `url` by its kind alone (http(s)://: fsspec reads it only)."""
    return bool({"http", "https"}.intersection(_protocols(resolve(url)[0])))


def makedirs(url: str) -> None:
    fs, path = resolve(url)
    fs.makedirs(path, exist_ok=True)


# --- secrets -------------------------------------------------------------------------

# user-info: a password runs to the last "@" before the path; or where it holds a "/" (an
# AWS secret key, unencoded: such a URL is invalid, so its parts are guesses), to the last
# "@" (IPv6 hosts, [::1]:80/a@b, never match)
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/?#\s:@]*)"
                       r"(?P<password>:[^/?#\s]*|:[^?#\s\[\]]*)?@")
_PORT_PATH = re.compile(r":\d{1,5}/")  # host:8080/a@b.mp4: a port, then a path holding an "@"
_NO_PORTS = ("s3://", "s3a://", "gs://", "gcs://")  # (a bucket has no port: s3://KEY:8/SECRET@bucket)
_ADDRESS_USERINFO = ("github://",)  # github://org:repo@ref/path: an address


def _secret_userinfo(m: re.Match) -> bool:
    """A URL's user-info is a secret where it holds a password (to the last "@": a password
    may hold one; the user may be empty: https://:<token>@host/...), or over HTTP(S) a bare
    token as user (https://<token>@host/...); elsewhere a bare name@ is part of the address
    (Azure's abfs://container@account..., github://org:repo@ref...)."""
    scheme = m["scheme"].lower()
    return scheme not in _ADDRESS_USERINFO and (bool(m["password"]) or scheme in ("http://", "https://"))


def _port_path(m: re.Match) -> bool:
    """Whether that "password" may be host:port/path@... (https://host:8080/a@b.mp4): a
    name keeps it; shown, it is redacted all the same (a password may begin with digits
    and a "/": over-redacting a message costs less than showing one)."""
    return bool(_PORT_PATH.match(m["password"] or "")) and m["scheme"].lower() not in _NO_PORTS


def _without_userinfo(url: str, in_name: bool = True) -> str:
    """`url` with its user-info taken out where that is a secret (`_secret_userinfo`): of
    the URL itself, not of another URL inside its path or query. Shown (not `in_name`),
    host:port/path@... reads `***@`."""
    m = _USERINFO.match(url)
    if m is None or not _secret_userinfo(m):
        return url
    if _port_path(m):
        return url if in_name else m["scheme"] + "***@" + url[m.end():]
    return m["scheme"] + url[m.end():]


# a query string: only where a "?" starts one (HTTP, FTP); in s3://, gs://, ... it is the key's
# (the query or fragment to the URL's end: whitespace or a quote; the punctuation a sentence
# puts after it, `(https://h/x?sig=...): ...`, stays: `_redacted_query`)
_QUERY = re.compile(r"(?<![\w+.-])(?P<base>(?i:https?|ftps?)://[^\s?#'\"]+)(?P<sep>[?#])(?P<rest>[^\s'\"]*)")
# A URL of a store whose "?" and "#" are its key's (s3://, gs://, sftp://...: not HTTP(S) or
# FTP, nor git+https and the like): no query to redact. It starts at a word's start and ends
# at whitespace, a quote, or a separator followed by another URL (`s3://a,https://...`), so
# an HTTP URL beside it, or one ahead of it (`https://proxy/gs://b/k?sig=...`), is redacted.
_KEY_URL = re.compile(r"(?<![\w+./-])(?![\w+.-]*?(?i:https?|ftps?)://)[a-zA-Z][a-zA-Z0-9+.-]*://"
                      r"(?:(?![,;|()<>\[\]{}=][a-zA-Z][\w+.-]*://)[^\s'\"])+")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[0-9A-Z]{12,20}\b")
_SECRET_ENV = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|SAS)",
                         re.IGNORECASE)


def _secret_values() -> list[str]:
    vals = [v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 6]
    return sorted(set(vals), key=len, reverse=True)


def redact(text: str) -> str:
    """Remove credentials from a message: URL user-info, query strings (signed URLs), AWS
    key ids, and the value of any secret-looking environment variable."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@" if _secret_userinfo(m) else m[0], text)
    pieces, last = [], 0  # s3://b/cams?key=7/ is a key: kept whole, the text around it redacted
    for m in _KEY_URL.finditer(text):
        pieces += [_redact_queries(text[last:m.start()]), m[0]]
        last = m.end()
    text = "".join(pieces) + _redact_queries(text[last:])
    for value in _secret_values():
        text = text.replace(value, "***")
    return _AWS_KEY_ID.sub("***", text)


def _redacted_query(m: re.Match) -> str:
    base, sep, rest = m["base"], m["sep"], m["rest"]
    if sep == "#" and base[:3].lower() == "ftp":  # (FTP's "#": a name's, as fsspec reads it; its query is not)
        if "?" not in rest:
            return m[0]
        name, _, rest = rest.partition("?")
        base, sep = f"{base}#{name}", "?"
    return f"{base}{sep}<redacted>{rest[len(rest.rstrip(').,:;]')):]}"


def _redact_queries(text: str) -> str:
    text = _QUERY.sub(_redacted_query, text)
    # a signing parameter where _QUERY did not see a URL (a space or quote in its path)
    return _PARAM.sub(lambda m: m[1] + ("<redacted>" if _secret_param(m[2]) else m[3]), text)


_SIGNING = re.compile(r"x-amz-.*|x-goog-.*|x-oss-.*|x-cos-.*|q-.*|.*accesskey.*|googleaccessid|.*signature.*"
                      r"|sig|sign|auth_key|expires|policy|key-pair-id|.*token.*|.*credential.*|hdnts|hdnea"
                      r"|ec_secure",  # (Akamai's, Edgio's)
                      re.IGNORECASE)
# nginx's secure_link: `md5` signs where `expires` comes with it (alone, `?md5=` may name a file)
_SECURE_LINK = frozenset({"md5"})
# Parameters that carry a standing credential. A password, a secret or an auth token may
# be one a person chose (a digest of it could be reversed by guessing): `stored_uri` drops
# them, as it drops signatures. An API key (machine-made: a digest keeps it secret) may be
# all that tells two objects apart (`?key=` names an object in some APIs): `stored_uri`
# keeps it with the value replaced by a digest.
_SECRET = re.compile(r".*secret.*|.*passw(or)?d.*|pass|pw|.*passphrase.*|pwd|psk|auth|authorization|bearer"
                     r"|.*hmac.*|jwt|.*private[-_.]?key.*", re.IGNORECASE)
# (and a session or ticket: a credential while it lasts, or a stream's number: a digest keeps both)
_API_KEY = re.compile(r"key|.*api[-_.]?key.*|.*access[-_.]?key.*|session|.*session[-_.]?id|sid|ticket",
                      re.IGNORECASE)


def _secret_param(name: str) -> bool:
    return bool(_SIGNING.fullmatch(name) or _SECRET.fullmatch(name) or _API_KEY.fullmatch(name))


_PARAM = re.compile(r"([?&;](?P<name>[A-Za-z0-9_.~%-]+)=)(?P<value>[^&#\s'\"]*)")
_SAS = frozenset("sv ss srt sp se st spr sr si sdd skoid sktid skt ske sks skv saoid suoid scid sip".split())


def stored_uri(url: str) -> str:
    """A video's name in every output and the key of its resume point: the URL without
    user-info and without the query parameters that sign it (S3 and GCS presigned URLs:
    X-Amz-*, X-Goog-*, AWSAccessKeyId, Signature, Expires; CloudFront: Policy, Key-Pair-Id;
    an Azure SAS: sig and its companions; Alibaba OSS: OSSAccessKeyId, security-token,
    x-oss-*; Tencent COS: q-*, x-cos-*, sign; CDN URL signing: sign (Tencent, Qiniu),
    auth_key (Alibaba, Huawei), __token__, hdnts and hdnea (Akamai), ec_secure (Edgio),
    md5 beside expires (nginx's secure_link); and any name holding
    token, signature, credential or accesskey), so no secret is written and
    the same object signed again is the same video. Passwords and secrets (`*secret*`,
    `*password*`, `pwd`, `auth`, `authorization`, `*hmac*`, `jwt`, `*private_key*`:
    `_SECRET`) go too; an API key (`key`, `*api_key*`, `*access_key*`: `_API_KEY`) stays
    with its value replaced by `redacted-` and 12 hex digits of its SHA-256 (the same key:
    the same name; `?key=` names the object in some APIs). Other query parameters of an
    HTTP(S) URL stay, as they were: they may name the object."""
    url = _without_userinfo(url)
    if not url.lower().startswith(("http://", "https://")):
        return url  # elsewhere a "?" or "#" is part of the key
    base, _, query = url.split("#", 1)[0].partition("?")  # a fragment is never sent
    base = _http_canonical(base)
    if not query:
        return base
    pieces = [p for p in query.split("&") if p]
    names = [urllib.parse.unquote_plus(p.split("=", 1)[0]).lower() for p in pieces]
    sas, secure_link = "sig" in names, "expires" in names
    kept = [_digest_value(p) if _API_KEY.fullmatch(name) else p for p, name in zip(pieces, names)
            if not (_SIGNING.fullmatch(name) or _SECRET.fullmatch(name) or (sas and name in _SAS)
                    or (secure_link and name in _SECURE_LINK))]
    return base + ("?" + "&".join(kept) if kept else "")


def _http_canonical(url: str) -> str:
    """An HTTP(S) URL (no query) as it is requested: scheme and host in lower case, no
    default port, the path percent-encoded one way (`a b.mp4` and `a%20b.mp4`, `café` and
    `caf%C3%A9` are one object: one name), as aiohttp's yarl writes it."""
    try:
        import yarl

        return str(yarl.URL(url))
    except (ImportError, ValueError, TypeError):
        return url


def _digest_value(piece: str) -> str:
    """`name=value` -> `name=redacted-<12 hex digits of the value's SHA-256>`."""
    name, _, value = piece.partition("=")
    return f"{name}=redacted-{hashlib.sha256(value.encode()).hexdigest()[:12]}"


def public_uri(url: str) -> str:
    """The URL as it may be shown in a message: no user-info, no query string or fragment
    (of an HTTP(S) or FTP URL: elsewhere a "?" or "#" is part of the key, and stays)."""
    url = _without_userinfo(url, in_name=False)
    if url.lower().startswith(("http://", "https://", "ftp://", "ftps://")):
        url = url.split("?", 1)[0].split("#", 1)[0]
    return url
