"""List the videos a run will process.

Input: INPUT, one of
  - a folder or prefix URL (`s3://bucket/videos/`, `/data/videos`): every file below it,
    recursively, whose extension is a video extension (case-insensitive), except hidden
    ones: a name starting with `.`, of the file or of a folder below INPUT;
  - a manifest file: `.txt`/`.lst` (one URL per line, `#` comments), `.csv`, `.parquet`
    or `.orc` with a `video_uri` column;
  - an S3 Inventory report: its `manifest.json` (every data file it lists, CSV, ORC or
    Parquet), or one Parquet or ORC data file (`bucket`, `key`): its current objects with
    a video extension and no hidden name;
  - a single video file.
Output: an Arrow table with columns
  `video_uri: string` (the URL as stored in the output, `storage.stored_uri`: no user-info
  or signing query parameters; local files as absolute paths),
  `size_bytes: int64` (-1 when unknown), `version: string` (etag or mtime when known),
  `source_uri: string` (the URL to read, where it is not video_uri: a presigned URL; else null),
sorted by `video_uri` so runs are deterministic.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import posixpath
import re
import urllib.parse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayvid import storage
from rayvid.errors import InputError

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .qt .mkv .webm .avi .mpg .mpeg .m2v .ts .m2ts .mts .wmv .flv .3gp .3g2 "
    ".ogv .mxf .vob .dv .y4m .h264 .264 .hevc .h265 .ivf".split()
)
MANIFEST_EXTENSIONS = frozenset({".txt", ".lst", ".csv", ".parquet", ".orc", ".json"})
_VIDEO_KEY = "(?i)\\.(" + "|".join(sorted(e[1:] for e in VIDEO_EXTENSIONS)) + ")$"
_HIDDEN_KEY = r"(^|/)\.([^./]|\.[^/])"  # a name starting with "." (not "." or ".." alone)

LISTING_SCHEMA = pa.schema(
    [("video_uri", pa.string()), ("size_bytes", pa.int64()), ("version", pa.string()),
     ("source_uri", pa.string())]
)


def is_video(path: str) -> bool:
    return _extension(path) in VIDEO_EXTENSIONS


def _is_http(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


def _extension(url: str) -> str:
    """Of an HTTP(S) URL, its path's (a presigned URL's query is no extension); elsewhere
    a `?` or `#` is part of the S3 key or file name."""
    if _is_http(url):
        url = urllib.parse.urlsplit(url).path
    return os.path.splitext(url)[1].lower()


def _folder(url: str) -> str:
    """What a manifest's relative entries are relative to: of an HTTP(S) URL, its path's
    folder, without the query or fragment (they sign or name the manifest, not its entries)."""
    if not _is_http(url):
        return os.path.dirname(url)
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=posixpath.dirname(parts.path), query="", fragment=""))


def is_manifest(input_url: str) -> bool:
    """Whether INPUT is read as a manifest (a file with a manifest's extension), whose
    videos may be anywhere, not below INPUT."""
    fs, path = storage.resolve(input_url)
    if _extension(path) not in MANIFEST_EXTENSIONS:
        return False
    try:
        return fs.info(path).get("type") != "directory"
    except (FileNotFoundError, *storage.ACCESS_ERRORS):
        return True


def list_videos(input_url: str, limit: int | None = None) -> pa.Table:
    """List INPUT (folder, prefix, manifest or single file) into the listing table."""
    fs, path = storage.resolve(input_url)
    if storage.not_utf8(path):  # (no output column can hold it; below a folder: skipped, with a warning)
        raise InputError(f"cannot read {storage.not_utf8(path)}: its name is not UTF-8 (rename it)")
    try:
        info = fs.info(path)
    except FileNotFoundError as e:
        # (fsspec's HTTP filesystem: also a server it cannot reach, or one answering 403 or 500)
        if storage.absent(e):
            raise InputError(f"input not found: {storage.public_uri(input_url)}") from None
        raise InputError(f"cannot read {storage.public_uri(input_url)}: {storage.describe(e)}") from None
    except storage.ACCESS_ERRORS as e:
        raise InputError(f"cannot read {storage.public_uri(input_url)}: {storage.describe(e)}") from None

    # a prefix with its last "/" on S3 or GCS is that prefix, even where an object has its
    # name without it (s3fs and gcsfs answered with the object `in` for `s3://b/in/`); where
    # nothing is under it, the object (a video or manifest named with a "/" typed after it)
    table = None
    if info.get("type") == "directory":
        table = _walk(input_url)
    elif input_url.endswith("/") and storage.object_store(fs):
        table = _walk(input_url)
        table = table if len(table) else None
    if table is None:
        if _extension(path) in MANIFEST_EXTENSIONS:
            with storage.access(input_url, "read manifest", InputError):
                table = _manifest(fs, path, input_url)
        elif is_video(path):
            table = _table([_row(fs, path, info)])
        else:
            hint = (" (of an S3 Inventory report in CSV, give its manifest.json: the data files have no header)"
                    if path.lower().endswith(".csv.gz") else "")
            raise InputError(
                f"{storage.public_uri(input_url)} is neither a folder, a manifest "
                f"({', '.join(sorted(MANIFEST_EXTENSIONS))}) nor a video file{hint}"
            )
    table = table.sort_by("video_uri")
    return table.slice(0, min(limit, len(table))) if limit is not None else table  # (pyarrow: 2**63 and more overflow)


def _table(rows: list) -> pa.Table:
    """(url, size, version) rows; a url that carries secrets is read from, never stored."""
    stored = [storage.stored_uri(r[0]) for r in rows]
    return pa.table(
        {
            "video_uri": stored,
            "size_bytes": [r[1] for r in rows],
            "version": [r[2] for r in rows],
            "source_uri": [r[0] if r[0] != name else None for r, name in zip(rows, stored)],
        },
        schema=LISTING_SCHEMA,
    )


def _walk(url: str) -> pa.Table:
    """A folder or prefix, page by page into Arrow: about 100 bytes per video, so a
    100,000-object prefix costs the driver about 30 MB at its peak, against 136 MB for
    fsspec's find() (tests/test_listing.py measures it)."""
    root = storage.to_url(*storage.resolve(url))  # what each listed URL starts with
    tables = []
    try:
        for page in storage.iter_files(url):
            rows = [r for r in page if is_video(r[0]) and not _hidden(r[0], root)]
            if rows:
                tables.append(_table(rows))
    except storage.ACCESS_ERRORS as e:
        raise InputError(f"cannot list {storage.public_uri(url)}: {storage.describe(e)}") from None
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()


def _hidden(url: str, root: str) -> bool:
    """Whether a name below `root` (the file's or a folder's) starts with "." (`.snapshot/`,
    `.Trash/`); those of `root` itself do not count: INPUT may be in one (`~/.cache/videos`)."""
    below = url[len(root):] if url.startswith(root) else url.rsplit("/", 1)[-1]
    return any(name.startswith(".") and name not in (".", "..") for name in below.split("/"))


def _row(fs, path: str, info: dict) -> tuple[str, int, str]:
    size = info.get("size")
    return (storage.to_url(fs, path), int(size) if size is not None else -1, storage.version_of(info))


def _inventory(batches, encoded: bool = False) -> pa.Table:
    """The listing of an S3 Inventory report's rows (Arrow batches with `bucket`, `key`
    and, in a report of every version, `is_latest` and `is_delete_marker`): its current
    versions, not delete markers, keys with a video extension and no hidden name, as a
    prefix listing takes them (a report lists every object). Keys are URL-encoded (a space
    as "+") in CSV reports (`encoded`), as stored in ORC and Parquet ones. Arrow compute
    throughout: about 100 bytes per kept video, none per other object."""
    uris = []
    for batch in batches:
        names = batch.schema.names
        keep = pc.and_(pc.is_valid(batch["bucket"]), pc.is_valid(batch["key"]))
        if "is_latest" in names:
            keep = pc.and_(keep, pc.fill_null(batch["is_latest"], True))
        if "is_delete_marker" in names:
            keep = pc.and_(keep, pc.invert(pc.fill_null(batch["is_delete_marker"], False)))
        bucket, key = (pc.filter(batch[c], keep) for c in ("bucket", "key"))
        if encoded:
            key = _unquote_plus(key)
        video = pc.and_(pc.match_substring_regex(key, _VIDEO_KEY),
                        pc.invert(pc.match_substring_regex(key, _HIDDEN_KEY)))
        video = pc.and_(video, pc.not_equal(bucket, ""))
        uris.append(pc.binary_join_element_wise("s3://", pc.filter(bucket, video), "/", pc.filter(key, video), ""))
    return _listing(pa.chunked_array(uris, pa.string()).combine_chunks() if uris else pa.array([], pa.string()))


def _listing(uris: pa.Array) -> pa.Table:
    """The listing of `uris` as manifests give them: no size, no version, read where named."""
    n = len(uris)
    empty = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(np.zeros(n + 1, np.int32)), pa.py_buffer(b"")])
    return pa.table({"video_uri": uris, "size_bytes": pa.array(np.full(n, -1, np.int64)), "version": empty,
                     "source_uri": pa.nulls(n, pa.string())}, schema=LISTING_SCHEMA)


def _unquote_plus(keys: pa.Array) -> pa.Array:
    """URL-decoded keys (a "+" is a space), in Python only for those with a "%" or "+"."""
    needs = pc.match_substring_regex(keys, r"[%+]")
    if not pc.any(needs).as_py():
        return keys
    decoded = [urllib.parse.unquote_plus(k) for k in pc.filter(keys, needs).to_pylist()]
    return pc.replace_with_mask(keys, needs, pa.array(decoded, pa.string()))


def _manifest(fs, path: str, input_url: str) -> pa.Table:
    ext = _extension(path)
    where = storage.public_uri(input_url)
    if ext == ".json":
        return _inventory_manifest(fs, path, where)
    if ext in (".parquet", ".orc"):
        with _columnar(fs, path, input_url, ext) as (names, batches):
            if "video_uri" in names:
                uris = [u for b in batches(["video_uri"]) for u in _text(b.column(0), where).to_pylist()]
            elif {"bucket", "key"} <= set(names):
                return _unique(_inventory(batches(["bucket", "key"] + [c for c in _FLAGS if c in names])))
            else:
                raise InputError(f"manifest {where} has no video_uri column, nor an S3 Inventory report's "
                                 f"bucket and key (has: {names})")
    else:
        with fs.open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InputError(f"manifest {where} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                             f"write it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
        if ext == ".csv":
            reader = csv.DictReader(io.StringIO(text))
            if not reader.fieldnames or "video_uri" not in reader.fieldnames:
                raise InputError(
                    f"manifest {where} has no video_uri column (has: {reader.fieldnames})"
                )
            uris = [row["video_uri"] for row in reader]
        else:
            uris = [line.strip() for line in text.splitlines()]
            uris = [u for u in uris if u and not u.startswith("#")]
    base, local = _folder(storage.to_url(fs, path)), storage.is_local(fs)
    rows, seen = [], set()
    for uri in uris:
        if uri is None or not str(uri).strip():
            continue
        uri = str(uri).strip()
        if "\x00" in uri:  # (os.stat's ValueError, deep in planning: a traceback)
            raise InputError(f"manifest {where}: entry {storage.public_uri(uri)!r} holds a NUL character, which no "
                             f"file or object name can: remove it")
        if local and uri.startswith("~"):
            uri = os.path.expanduser(uri)  # a local manifest's ~/x is the user's, as on a command line
        if not _SCHEME.match(uri) and not os.path.isabs(uri):  # (a "://" further on is the name's)
            uri = _relative_to(base, uri)  # relative entries are relative to the manifest
        uri = storage.to_url(*storage.resolve(uri))
        name = storage.stored_uri(uri)
        if name in seen:  # the same object, signed again, is one video
            continue
        seen.add(name)
        rows.append((uri, -1, ""))
    return _table(rows)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+._-]*://")  # what makes a manifest's entry a URL (arrow_hdfs:// too)


def _text(column: pa.Array, where: str) -> pa.Array:
    """A columnar manifest's video_uri column as text: binary (as Hive and Impala write
    strings) read as UTF-8; another type (a number: each was taken for a local file's
    name) refused, naming it."""
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):  # (all null: none)
        return column
    if str(kind) in ("string_view", "binary_view"):
        kind = pa.binary()
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        try:
            return column.cast(pa.large_string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InputError(f"manifest {where}: its video_uri column holds bytes that are not UTF-8 text") from None
    raise InputError(f"manifest {where}: its video_uri column is {column.type}, not text (URLs or paths)")


def _relative_to(folder: str, entry: str) -> str:
    """A manifest's relative entry (`a.mp4`, `./a.mp4`, `../in/a.mp4`) under the manifest's
    folder, with `.` and `..` resolved as a shell would, in a bucket too (where they would
    otherwise be read as keys of their own: not the object the entry means)."""
    if "://" not in folder:
        return os.path.normpath(os.path.join(folder, entry))
    scheme, _, rest = folder.partition("://")
    bucket, _, key = rest.partition("/")
    tail = ""
    if _is_http(folder):  # an entry's query (a signature, which may hold a "/") is no path
        cut = min((i for i in (entry.find("?"), entry.find("#")) if i >= 0), default=len(entry))
        entry, tail = entry[:cut], entry[cut:]
    parts: list = []  # "." and ".." resolved, no higher than the bucket; "a//b" stays (another key)
    for part in (key.rstrip("/").split("/") if key.rstrip("/") else []) + entry.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part != ".":
            parts.append(part)
    return f"{scheme}://{bucket}/{'/'.join(parts)}{tail}"


_FLAGS = ("is_latest", "is_delete_marker")


@contextlib.contextmanager
def _columnar(fs, path: str, url: str, ext: str):
    """(column names, batches(columns) -> iterator of record batches) of a Parquet or ORC
    file, read by ranges (its footer, then the columns asked for) where the store serves
    them, else whole (pyarrow's footer seek would fail on a server that ignores ranges)."""
    ranged = storage.serves_ranges(fs, path)
    with (fs.open(path, "rb") if ranged else io.BytesIO(storage.read_bytes(url))) as f:
        try:
            if ext == ".orc":
                from pyarrow import orc

                data = orc.ORCFile(f)
                names = data.schema.names
                yield names, lambda columns: (data.read_stripe(i, columns=columns) for i in range(data.nstripes))
            else:
                data = pq.ParquetFile(f)
                yield data.schema_arrow.names, lambda columns: data.iter_batches(columns=columns)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise InputError(f"cannot read {storage.public_uri(url)} as {ext[1:].upper()}: {_said(e)}") from None


_CSV_COLUMNS = {"Bucket": "bucket", "Key": "key", "IsLatest": "is_latest", "IsDeleteMarker": "is_delete_marker"}


def _inventory_manifest(fs, path: str, where: str) -> pa.Table:
    """An S3 Inventory report by its manifest.json: each data file it lists (`files`, in
    its `destinationBucket`), in its `fileFormat` (CSV, gzipped, no header: the columns
    are named by `fileSchema`; ORC; Parquet), one after another, a batch at a time."""
    with fs.open(path, "rb") as f:
        try:
            manifest = json.load(f)
        except ValueError as e:
            raise InputError(f"{where} is not JSON ({e}); a .json INPUT is an S3 Inventory manifest.json") from None
    if not isinstance(manifest, dict) or not {"fileFormat", "files", "destinationBucket"} <= set(manifest):
        raise InputError(f"{where} is not an S3 Inventory manifest.json (it has no fileFormat, files and "
                         f"destinationBucket); a .json INPUT is one")
    form = str(manifest["fileFormat"]).upper()
    if form not in ("CSV", "ORC", "PARQUET"):
        raise InputError(f"{where}: S3 Inventory format {manifest['fileFormat']!r} is not one of CSV, ORC, Parquet")
    columns = []
    if form == "CSV":
        columns = [c.strip() for c in str(manifest.get("fileSchema") or "").split(",")]
        if not {"Bucket", "Key"} <= set(columns):
            raise InputError(f"{where}: its fileSchema has no Bucket and Key ({manifest.get('fileSchema')!r})")
    bucket = manifest["destinationBucket"]
    bucket = bucket.rsplit(":", 1)[-1] if isinstance(bucket, str) else ""  # arn:aws:s3:::name
    files = manifest["files"]
    keys = [f.get("key") if isinstance(f, dict) else None for f in files] if isinstance(files, list) else [None]
    if not bucket or "/" in bucket or not all(isinstance(k, str) and k.strip("/") and not k.endswith("/")
                                              for k in keys):  # (a folder's key names no data file)
        raise InputError(f"{where} is not an S3 Inventory manifest.json: its destinationBucket must be a bucket's "
                         f"name or ARN, and files a list of objects each with the key of a data file")
    tables = []
    for key in dict.fromkeys(keys):  # (a file listed twice is read once)
        url = f"s3://{bucket}/{key}"
        data_fs, data_path = storage.resolve(url)
        with storage.access(url, "read S3 Inventory data file", InputError), _missing(url, where):
            if form == "CSV":
                tables.append(_inventory_csv(data_fs, data_path, url, columns))
            else:
                ext = ".orc" if form == "ORC" else ".parquet"
                with _columnar(data_fs, data_path, url, ext) as (names, batches):
                    if not {"bucket", "key"} <= set(names):
                        raise InputError(f"S3 Inventory data file {storage.public_uri(url)} has no bucket and key "
                                         f"columns (has: {names})")
                    tables.append(_inventory(batches(["bucket", "key"] + [c for c in _FLAGS if c in names])))
    return _unique(pa.concat_tables(tables)) if tables else LISTING_SCHEMA.empty_table()


def _unique(listing: pa.Table) -> pa.Table:
    """A listing with each video once (a report may list an object on two rows, or in two
    files): a video listed twice would be decoded twice."""
    uris = pc.unique(listing.column("video_uri"))
    return listing if len(uris) == len(listing) else _listing(uris)


@contextlib.contextmanager
def _missing(url: str, manifest: str):
    try:
        yield
    except FileNotFoundError:
        raise InputError(f"cannot read S3 Inventory data file {storage.public_uri(url)}: not found (listed in "
                         f"{manifest}: a report's data files may have expired or been deleted)") from None


def _inventory_csv(fs, path: str, url: str, columns: list) -> pa.Table:
    """One CSV data file of an S3 Inventory report (gzipped where its name says so),
    streamed: its keys are URL-encoded."""
    from pyarrow import csv as pacsv

    names = [_CSV_COLUMNS.get(c, f"_{i}") for i, c in enumerate(columns)]
    wanted = [n for n in names if not n.startswith("_")]
    types = {n: (pa.bool_() if n in _FLAGS else pa.string()) for n in wanted}
    with fs.open(path, "rb") as f:
        stream = pa.input_stream(f, compression="gzip" if path.endswith(".gz") else None)
        try:
            reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(column_names=names),
                                    convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types=types,
                                                                         strings_can_be_null=False))
            return _inventory(reader, encoded=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            if str(e).startswith("Empty CSV file"):  # a report of no objects (or of none in this file)
                return LISTING_SCHEMA.empty_table()
            raise InputError(f"cannot read S3 Inventory data file {storage.public_uri(url)} as CSV: {_said(e)}") from None


def _said(error: BaseException) -> str:
    """pyarrow's message on one line, printable, cut: it may quote a binary file's bytes."""
    text = "".join(c if c.isprintable() else "?" for c in " ".join(str(error).split()))
    return text if len(text) <= 200 else text[:199] + "…"
