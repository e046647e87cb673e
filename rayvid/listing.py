"""List the videos a run will process.

Input: INPUT, one of
  - a folder or prefix URL (`s3://bucket/videos/`, `/data/videos`): every file below it,
    recursively, whose extension is a video extension (case-insensitive), except hidden
    ones: a name starting with `.`, of the file or of a folder below INPUT;
  - a manifest file: `.txt`/`.lst` (one URL per line, `#` comments), `.csv` or `.parquet`
    with a `video_uri` column, or an S3 Inventory report in Parquet (`bucket`, `key`: its
    current objects with a video extension);
  - a single video file.
Output: an Arrow table with columns
  `video_uri: string` (the URL as stored in the output, `storage.stored_uri`: no user-info
  or signing query parameters; local files as absolute paths),
  `size_bytes: int64` (-1 when unknown), `version: string` (etag or mtime when known),
  `source_uri: string` (the URL to read, where it is not video_uri: a presigned URL; else null),
sorted by `video_uri` so runs are deterministic.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import urllib.parse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayvid import storage
from rayvid.errors import InputError

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .qt .mkv .webm .avi .mpg .mpeg .m2v .ts .m2ts .mts .wmv .flv .3gp .3g2 "
    ".ogv .mxf .vob .dv .y4m .h264 .264 .hevc .h265 .ivf".split()
)
MANIFEST_EXTENSIONS = frozenset({".txt", ".lst", ".csv", ".parquet"})

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


def list_videos(input_url: str, limit: int | None = None) -> pa.Table:
    """List INPUT (folder, prefix, manifest or single file) into the listing table."""
    fs, path = storage.resolve(input_url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(f"input not found: {storage.public_uri(input_url)}") from None
    except storage.ACCESS_ERRORS as e:
        raise InputError(f"cannot read {storage.public_uri(input_url)}: {storage.describe(e)}") from None

    if info.get("type") == "directory":
        table = _walk(input_url)
    else:
        if _extension(path) in MANIFEST_EXTENSIONS:
            with storage.access(input_url, "read manifest", InputError):
                rows = _manifest(fs, path, input_url)
        elif is_video(path):
            rows = [_row(fs, path, info)]
        else:
            raise InputError(
                f"{storage.public_uri(input_url)} is neither a folder, a manifest "
                f"({', '.join(sorted(MANIFEST_EXTENSIONS))}) nor a video file"
            )
        table = _table(rows)
    table = table.sort_by("video_uri")
    return table.slice(0, limit) if limit is not None else table


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


def _inventory(report: pq.ParquetFile, names: list) -> list[str]:
    """The videos of an S3 Inventory report in Parquet (`bucket`, `key`: not URL-encoded in
    Parquet, unlike CSV reports): its current versions, not delete markers (a report of
    every version has `is_latest`, `is_delete_marker`), keys with a video extension and no
    hidden name, as a prefix listing takes them (a report lists every object)."""
    table = report.read(columns=["bucket", "key"] + [c for c in ("is_latest", "is_delete_marker") if c in names])
    keep = pc.and_(pc.is_valid(table["bucket"]), pc.is_valid(table["key"]))
    if "is_latest" in names:
        keep = pc.and_(keep, pc.fill_null(table["is_latest"], True))
    if "is_delete_marker" in names:
        keep = pc.and_(keep, pc.invert(pc.fill_null(table["is_delete_marker"], False)))
    table = table.filter(keep)
    return [f"s3://{bucket}/{key}" for bucket, key in zip(table["bucket"].to_pylist(), table["key"].to_pylist())
            if bucket and is_video(key) and not _hidden(key, "")]


def _manifest(fs, path: str, input_url: str) -> list[tuple[str, int, str]]:
    ext = _extension(path)
    where = storage.public_uri(input_url)
    if ext == ".parquet":  # read by ranges (the footer, then one column) where the store serves them
        ranged = storage.serves_ranges(fs, path)
        with (fs.open(path, "rb") if ranged else io.BytesIO(storage.read_bytes(input_url))) as f:
            manifest = pq.ParquetFile(f)
            names = manifest.schema_arrow.names
            if "video_uri" in names:
                uris = manifest.read(columns=["video_uri"]).column("video_uri").to_pylist()
            elif {"bucket", "key"} <= set(names):
                uris = _inventory(manifest, names)
            else:
                raise InputError(f"manifest {where} has no video_uri column, nor an S3 Inventory report's "
                                 f"bucket and key (has: {names})")
    else:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
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
    base = _folder(storage.to_url(fs, path))
    rows, seen = [], set()
    for uri in uris:
        if uri is None or not str(uri).strip():
            continue
        uri = str(uri).strip()
        if "://" not in uri and not os.path.isabs(uri):
            uri = storage.join(base, uri)  # relative entries are relative to the manifest
        uri = storage.to_url(*storage.resolve(uri))
        name = storage.stored_uri(uri)
        if name in seen:  # the same object, signed again, is one video
            continue
        seen.add(name)
        rows.append((uri, -1, ""))
    return rows
