"""Listing folders, prefixes and manifests, locally, on S3 and on GCS, in a deterministic order."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import HTTP_MODES, ftp_server, http_server, upload_tree
from rayvid.errors import InputError, StorageError, StorageUnavailable
from rayvid.listing import list_videos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tree(tmp_path):
    for rel in ["b.mp4", "A.MOV", "sub dir/ünïcode clip.mkv", "sub dir/deeper/x.WebM", "z.avi",
                "clip.ts", "readme.txt", "image.png", ".hidden.mp4", "noext"]:
        p = tmp_path / "in" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 3)
    return tmp_path / "in"


EXPECTED = ["A.MOV", "b.mp4", "clip.ts", "sub dir/deeper/x.WebM", "sub dir/ünïcode clip.mkv", "z.avi"]


def test_local_folder_recursive_by_extension_sorted(tree):
    t = list_videos(str(tree))
    assert t.column("video_uri").to_pylist() == [f"{tree}/{r}" for r in EXPECTED]
    assert t.column("size_bytes").to_pylist() == [3] * len(EXPECTED)
    assert list_videos(str(tree), limit=2).num_rows == 2
    assert list_videos(str(tree), limit=10**20).num_rows == len(EXPECTED)  # (an OverflowError in pyarrow's slice)


def test_an_ftp_folder_lists_urls_that_name_its_server_and_store_no_password(tree):
    """fsspec's FTP filesystem keeps the host (and the login) to itself and names its files
    `ftp:///path`: each listed video is named by its server, read with the login the INPUT
    URL gave, and stored without it."""
    with ftp_server(str(tree), "alice", "pw22S3CRET") as port:
        t = list_videos(f"ftp://alice:pw22S3CRET@127.0.0.1:{port}/sub dir/")
        assert t.column("video_uri").to_pylist() == [f"ftp://127.0.0.1:{port}/{r}" for r in EXPECTED[3:5]]
        assert t.column("source_uri").to_pylist() == [f"ftp://alice:pw22S3CRET@127.0.0.1:{port}/{r}"
                                                       for r in EXPECTED[3:5]]
        assert t.column("size_bytes").to_pylist() == [3, 3]
        with pytest.raises(StorageError, match=f"^cannot use URL 'ftp://127.0.0.1:{port}/': 530 ") as e:
            list_videos(f"ftp://alice:wrong@127.0.0.1:{port}/")
        assert "wrong" not in str(e.value)


def test_a_server_that_cannot_be_reached_is_not_a_missing_input():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InputError, match=f"^cannot read http://127.0.0.1:{port}/x.mp4: Cannot connect to host"):
        list_videos(f"http://user:S3CRET@127.0.0.1:{port}/x.mp4")
    with pytest.raises(StorageUnavailable, match=f"^cannot use URL 'ftp://127.0.0.1:{port}/x/': "):
        list_videos(f"ftp://127.0.0.1:{port}/x/")


def test_a_symlinked_video_is_listed_at_its_files_version(tree, tmp_path):
    """The version of a linked video is its file's modification time, not the link's: a
    rewritten file is a changed video (a rerun redoes it), and the decoder, which reads
    the file, finds the version it was listed at."""
    target = tmp_path / "elsewhere.mp4"
    target.write_bytes(b"v" * 7)
    os.utime(target, (1_500_000_000, 1_500_000_000))
    os.symlink(target, tree / "linked.mp4")
    row = list_videos(str(tree)).to_pandas().set_index("video_uri").loc[f"{tree}/linked.mp4"]
    assert row["size_bytes"] == 7 and float(row["version"]) == 1_500_000_000
    assert row["version"] == list_videos(str(tree / "linked.mp4")).column("version")[0].as_py()


def test_s3_prefix(tree, s3fs_client):
    upload_tree(s3fs_client, tree, "s3://rayvid-test/listing/")
    t = list_videos("s3://rayvid-test/listing/")
    assert t.column("video_uri").to_pylist() == [f"s3://rayvid-test/listing/{r}" for r in EXPECTED]
    assert all(v for v in t.column("version").to_pylist())  # etags recorded
    # an object with the prefix's name without its "/" (s3fs answered with it: "neither a
    # folder, a manifest nor a video file", a QA find): the prefix is listed
    s3fs_client.pipe("s3://rayvid-test/listing", b"not a folder")
    s3fs_client.invalidate_cache()
    assert list_videos("s3://rayvid-test/listing/").column("video_uri").to_pylist() == t.column("video_uri").to_pylist()
    s3fs_client.rm("s3://rayvid-test/listing")
    # ... and a video named with a "/" typed after it, nothing under that prefix: the video
    one = list_videos(f"s3://rayvid-test/listing/{EXPECTED[0]}/").column("video_uri").to_pylist()
    assert one == [f"s3://rayvid-test/listing/{EXPECTED[0]}"]


def test_gcs_prefix_page_by_page(tree, gcsfs_client):
    """A gs:// prefix is listed in GCS's own pages (gcsfs's find would gather all of them
    first), each object at its generation: the version a decoder finds in `info`."""
    from rayvid import storage

    upload_tree(gcsfs_client, tree, "gs://rayvid-test/listing/")
    upload_tree(gcsfs_client, tree, "gs://rayvid-test/listing-other/")  # shares the prefix's first letters
    pages = list(storage.iter_files("gs://rayvid-test/listing", page_size=4))
    assert [len(p) for p in pages] == [4, 4, 2]  # the tree's 10 files, 4 a page
    assert sorted(r[0] for p in pages for r in p) == sorted(
        f"gs://rayvid-test/listing/{os.path.relpath(os.path.join(d, f), tree)}"
        for d, _, files in os.walk(tree) for f in files)
    t = list_videos("gs://rayvid-test/listing/")
    assert t.column("video_uri").to_pylist() == [f"gs://rayvid-test/listing/{r}" for r in EXPECTED]
    assert t.column("size_bytes").to_pylist() == [3] * len(EXPECTED)
    gcsfs_client.invalidate_cache()
    info = gcsfs_client.info("gs://rayvid-test/listing/b.mp4")
    assert t.column("version")[EXPECTED.index("b.mp4")].as_py() == info["generation"]
    assert list_videos("gs://rayvid-test/listing/b.mp4").column("version").to_pylist() == [info["generation"]]


def test_manifests(tree, tmp_path):
    a, b = f"{tree}/b.mp4", f"{tree}/A.MOV"
    txt = tmp_path / "m.txt"
    txt.write_text(f"# comment\n{a}\n\n{b}\n{a}\n")
    assert list_videos(str(txt)).column("video_uri").to_pylist() == [b, a]
    csv = tmp_path / "m.csv"
    csv.write_text(f"video_uri,other\n{a},1\n{b},2\n")
    assert list_videos(str(csv)).num_rows == 2
    pqf = tmp_path / "m.parquet"
    pq.write_table(pa.table({"video_uri": [a, b]}), pqf)
    assert list_videos(str(pqf)).num_rows == 2
    rel = tree / "rel.txt"
    rel.write_text("b.mp4\nsub dir/deeper/x.WebM\n")
    assert list_videos(str(rel)).column("video_uri").to_pylist() == [f"{tree}/b.mp4", f"{tree}/sub dir/deeper/x.WebM"]
    # a "://" past its start makes no entry a URL ("Protocol not known: b.mp4?next=https"):
    # relative all the same (a local path, whose "//" is "/")
    rel.write_text("b.mp4?next=https://cdn.example/x\n")
    assert list_videos(str(rel)).column("video_uri").to_pylist() == [f"{tree}/b.mp4?next=https:/cdn.example/x"]
    # a video_uri column of bytes (as Hive and Impala write strings) is text; of numbers, refused
    pq.write_table(pa.table({"video_uri": pa.array([a.encode(), b.encode()], pa.binary())}), pqf)
    assert list_videos(str(pqf)).column("video_uri").to_pylist() == [b, a]
    pq.write_table(pa.table({"video_uri": [1, 2]}), pqf)
    with pytest.raises(InputError, match=r"manifest .*m.parquet: its video_uri column is int64, not text"):
        list_videos(str(pqf))


INVENTORY = [  # bucket, key, is_latest, is_delete_marker: what a report of every version holds
    ("archive", "2024/a clip+é.mp4", True, False),
    ("archive", "2024/b.MOV", True, False),
    ("archive", "2024/b.MOV", False, False),  # an older version of it
    ("archive", "2024/gone.mp4", True, True),  # deleted: its delete marker is the latest
    ("archive", "2024/gone.mp4", False, False),
    ("archive", "2024/notes.txt", True, False),
    ("archive", "2024/.thumbs/c.mp4", True, False),
    ("archive", "2024/", True, False),
    ("other-bucket", "d.mkv", True, False),
    ("other-bucket", "e/..f.webm", True, False),  # hidden: a name starting with "."
    ("other-bucket", "e/../g.ts", True, False),  # not hidden: ".." is no name
    ("other-bucket", "d.mkv", True, False),  # listed twice: one video
]
INVENTORY_VIDEOS = ["s3://archive/2024/a clip+é.mp4", "s3://archive/2024/b.MOV", "s3://other-bucket/d.mkv",
                    "s3://other-bucket/e/../g.ts"]
CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag"


def test_an_s3_inventory_report_in_parquet_is_a_manifest(tmp_path):
    """An S3 Inventory report (Parquet, every version listed) as it comes, no video_uri
    column: its current objects with a video extension, keys as they are (not URL-encoded
    in Parquet), neither delete markers, older versions, other files nor hidden names."""
    report = tmp_path / "inventory.parquet"
    pq.write_table(_inventory_table(INVENTORY), report)
    assert list_videos(str(report)).column("video_uri").to_pylist() == INVENTORY_VIDEOS
    current = tmp_path / "current.parquet"  # a report of current versions only has neither column
    pq.write_table(pa.table({"bucket": ["archive"], "key": ["x.webm"], "size": [3]}), current)
    assert list_videos(str(current)).column("video_uri").to_pylist() == ["s3://archive/x.webm"]
    neither = tmp_path / "neither.parquet"
    pq.write_table(pa.table({"path": ["x.mp4"]}), neither)
    with pytest.raises(InputError, match=r"has no video_uri column, nor an S3 Inventory report's bucket and key"):
        list_videos(str(neither))


def _inventory_csv(rows) -> bytes:
    """A CSV data file as S3 Inventory writes it: gzipped, no header, every field quoted,
    keys URL-encoded with a space as "+"."""
    import gzip
    import urllib.parse

    lines = [",".join(f'"{v}"' for v in (b, urllib.parse.quote_plus(k, safe="/"), "v1", str(latest).lower(),
                                         str(deleted).lower(), "3", "2026-12-01T00:00:00.000Z", "e"))
             for b, k, latest, deleted in rows]
    return gzip.compress(("\n".join(lines) + "\n").encode() if lines else b"")


def _inventory_table(rows) -> pa.Table:
    return pa.table({"bucket": [r[0] for r in rows], "key": [r[1] for r in rows], "version_id": ["v"] * len(rows),
                     "is_latest": [r[2] for r in rows], "is_delete_marker": [r[3] for r in rows],
                     "size": [3] * len(rows), "e_tag": ["e"] * len(rows)})


@pytest.mark.parametrize("form", ["CSV", "ORC", "Parquet"])
def test_an_s3_inventory_manifest_json_lists_its_data_files(s3fs_client, form):
    """INPUT an S3 Inventory report's manifest.json, on S3 as the report is delivered: the
    videos of every data file it lists (read from its destination bucket), in each of S3's
    three formats: CSV's URL-encoded keys decoded, current versions only, as a prefix
    listing takes them (an empty CSV data file holds none). A data file the manifest names
    that is gone is an InputError naming it."""
    import io
    import json

    from pyarrow import orc

    prefix = f"rayvid-test/inventory-{form.lower()}/archive/config"
    parts, files = (INVENTORY[:5], INVENTORY[5:], *([[]] if form == "CSV" else [])), []  # and an empty CSV
    for i, rows in enumerate(parts):
        key = f"{prefix}/data/part-{i}." + {"CSV": "csv.gz", "ORC": "orc", "Parquet": "parquet"}[form]
        if form == "CSV":
            body = _inventory_csv(rows)
        else:
            buf = io.BytesIO()
            (orc.write_table if form == "ORC" else pq.write_table)(_inventory_table(rows), buf)
            body = buf.getvalue()
        s3fs_client.pipe(key, body)
        files.append({"key": key.split("/", 1)[1], "size": len(body), "MD5checksum": "0"})
    manifest = {"sourceBucket": "archive", "destinationBucket": "arn:aws:s3:::rayvid-test", "version": "2016-11-30",
                "creationTimestamp": "1764547200000", "fileFormat": form, "files": files + files[:1],  # one twice
                "fileSchema": CSV_SCHEMA if form == "CSV" else "(its own, in each file)"}
    url = f"s3://{prefix}/2026-12-01T01-00Z/manifest.json"
    s3fs_client.pipe(url, json.dumps(manifest).encode())
    listing = list_videos(url)
    assert listing.column("video_uri").to_pylist() == INVENTORY_VIDEOS
    assert listing.column("size_bytes").to_pylist() == [-1] * 4 and listing.column("version").to_pylist() == [""] * 4
    s3fs_client.rm(f"rayvid-test/{files[1]['key']}")
    with pytest.raises(InputError, match=rf"cannot read S3 Inventory data file s3://{prefix}/data/part-1\..*"
                                         r": not found \(listed in s3://.*manifest.json"):
        list_videos(url)


def test_inventory_manifests_that_cannot_be_read_are_clear_errors(tmp_path):
    """A .json INPUT that is not an S3 Inventory manifest, one in a format S3 does not
    write, a CSV schema without Bucket and Key, and a CSV data file given alone (no header:
    its columns are named only in its manifest): InputError saying which and why. An ORC
    data file alone is read like a Parquet one."""
    import json

    from pyarrow import orc

    cases = {"notjson.json": ("{", r"is not JSON"),
             "other.json": (json.dumps({"videos": ["a.mp4"]}), r"is not an S3 Inventory manifest.json"),
             "format.json": (json.dumps({"fileFormat": "Avro", "files": [], "destinationBucket": "b"}),
                             r"format 'Avro' is not one of CSV, ORC, Parquet"),
             "schema.json": (json.dumps({"fileFormat": "CSV", "fileSchema": "Bucket, Size", "files": [],
                                         "destinationBucket": "b"}), r"its fileSchema has no Bucket and Key")}
    shape = r"is not an S3 Inventory manifest.json: its destinationBucket must be a bucket's name or ARN, and files"
    for i, (files, bucket) in enumerate([([{"size": 1}], "b"), ({"key": "x"}, "b"), (["a.csv.gz"], "b"), (None, "b"),
                                         ([{"key": ""}], "b"), ([{"key": "x"}], None), ([{"key": "x"}], "arn:aws:s3:::"),
                                         ([{"key": 5}], "b"), ([{"key": "inv/data/"}], "b")]):
        cases[f"files{i}.json"] = (json.dumps({"fileFormat": "Parquet", "files": files, "destinationBucket": bucket}),
                                   shape)
    for name, (body, message) in cases.items():
        (tmp_path / name).write_text(body)
        with pytest.raises(InputError, match=message):
            list_videos(str(tmp_path / name))
    (tmp_path / "data.csv.gz").write_bytes(_inventory_csv(INVENTORY))
    with pytest.raises(InputError, match=r"neither a folder, a manifest .* give its manifest.json"):
        list_videos(str(tmp_path / "data.csv.gz"))
    orc.write_table(_inventory_table(INVENTORY), str(tmp_path / "data.orc"))
    assert list_videos(str(tmp_path / "data.orc")).column("video_uri").to_pylist() == INVENTORY_VIDEOS
    strings = _inventory_table(INVENTORY).set_column(3, "is_latest", pa.array(["yes"] * len(INVENTORY)))
    orc.write_table(strings, str(tmp_path / "strings.orc"))
    with pytest.raises(InputError, match=r"cannot read .*strings.orc as ORC: "):
        list_videos(str(tmp_path / "strings.orc"))
    (tmp_path / "broken.orc").write_bytes(b"not orc at all")
    with pytest.raises(InputError, match=r"cannot read manifest .*broken.orc: Not an ORC file"):
        list_videos(str(tmp_path / "broken.orc"))


@pytest.mark.parametrize("mode", HTTP_MODES)
def test_manifests_over_http_whatever_the_server_does_with_byte_ranges(tree, mode):
    """Manifests at http(s):// URLs list the same videos whether the server serves byte
    ranges (a Parquet manifest is then read by its footer and one column) or not (read whole:
    pyarrow's footer seek would fail); relative entries are relative to the manifest's URL."""
    pq.write_table(pa.table({"size": [1, 2, 3], "video_uri": ["b.mp4", "sub dir/deeper/x.WebM", "b.mp4"]}),
                   tree / "m.parquet")
    # one object spelled three ways (a fragment is never sent): one video, named as requested
    (tree / "m.txt").write_text("# videos\nb.mp4\nsub%20dir/deeper/x.WebM\nsub dir/deeper/x.WebM\n./b.mp4#t=1\n")
    pq.write_table(pa.table({"path": ["b.mp4"]}), tree / "bad.parquet")
    with http_server(str(tree), mode) as base:
        want = [f"{base}/b.mp4", f"{base}/sub%20dir/deeper/x.WebM"]
        assert list_videos(f"{base}/m.parquet").column("video_uri").to_pylist() == want
        assert list_videos(f"{base}/m.txt").column("video_uri").to_pylist() == want
        with pytest.raises(InputError, match=r"has no video_uri column, nor an S3 Inventory report's bucket and key \(has: \['path'\]\)"):
            list_videos(f"{base}/bad.parquet")


SIGNED = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAFAKEKEYID0000TEST%2F20261130%2Fus-east-1"
          "%2Fs3%2Faws4_request&X-Amz-Signature=deadbeef")


def test_a_manifest_or_video_at_a_signed_http_url(tree):
    """A presigned manifest or video (`.../m.txt?X-Amz-Signature=...`) is one by its path's
    extension, not its query's; a manifest's relative entries are relative to its URL's
    folder, without the query that signs the manifest (here one with a "/" in it)."""
    (tree / "m.txt").write_text("b.mp4\nsub%20dir/deeper/x.WebM\n")
    pq.write_table(pa.table({"video_uri": ["b.mp4"]}), tree / "m.parquet")
    with http_server(str(tree), "ranges") as base:
        want = [f"{base}/b.mp4", f"{base}/sub%20dir/deeper/x.WebM"]
        for query in (SIGNED, "token=abc/def", "X-Amz-Signature=x#frag/ment"):
            t = list_videos(f"{base}/m.txt?{query}")
            assert t.column("video_uri").to_pylist() == want
            assert t.column("source_uri").to_pylist() == [None, None]
        assert list_videos(f"{base}/m.parquet?{SIGNED}").column("video_uri").to_pylist() == want[:1]
        t = list_videos(f"{base}/b.mp4?{SIGNED}")
        assert t.to_pylist() == [{"video_uri": f"{base}/b.mp4", "size_bytes": 3, "version": t["version"][0].as_py(),
                                  "source_uri": f"{base}/b.mp4?{SIGNED}"}]
        assert list_videos(f"{base}/b.mp4?v=2").column("video_uri").to_pylist() == [f"{base}/b.mp4?v=2"]
        with pytest.raises(InputError, match="neither a folder, a manifest"):
            list_videos(f"{base}/image.png?name=x.mp4")
        # a server that refuses (an expired signature) or fails every request: said, not "input not found"
        for status, said in ((403, "HTTP 403 Forbidden"), (500, "HTTP 500 Internal Server Error")):
            for name in ("v.mp4", "m.txt"):
                with pytest.raises(InputError) as e:
                    list_videos(f"{base}/status-{status}-{name}?{SIGNED}")
                assert str(e.value).startswith(f"cannot read {base}/status-{status}-{name}: {said}"), str(e.value)
                assert "deadbeef" not in str(e.value) and "AKIAFAKE" not in str(e.value)
        with pytest.raises(InputError, match=f"^input not found: {base}/gone.mp4$"):
            list_videos(f"{base}/gone.mp4?{SIGNED}")


def test_a_question_mark_or_hash_elsewhere_is_part_of_the_name(tree, tmp_path, s3fs_client):
    """Only an HTTP(S) URL has a query: a local file or an S3 key may have "?" or "#" in its name."""
    for name in ("q?x.mp4", "h#x.mp4", "v.mp4?x=1.txt"):
        (tree / name).write_bytes(b"x")
    names = sorted(EXPECTED + ["h#x.mp4", "q?x.mp4"])
    assert list_videos(str(tree)).column("video_uri").to_pylist() == [f"{tree}/{r}" for r in names]
    upload_tree(s3fs_client, tree, "s3://rayvid-test/qmark/")
    assert list_videos("s3://rayvid-test/qmark/").column("video_uri").to_pylist() == [
        f"s3://rayvid-test/qmark/{r}" for r in names]
    assert list_videos("s3://rayvid-test/qmark/q?x.mp4").column("video_uri").to_pylist() == [
        "s3://rayvid-test/qmark/q?x.mp4"]
    manifest = tmp_path / "m?.txt"
    manifest.write_text(f"{tree}/q?x.mp4\n")
    assert list_videos(str(manifest)).column("video_uri").to_pylist() == [f"{tree}/q?x.mp4"]


def test_hidden_folders_are_skipped_below_input_not_above(tmp_path, s3fs_client):
    """Files in a hidden folder below INPUT (`.snapshot/daily/a.mp4`) are skipped, like hidden
    files, locally and on S3; INPUT itself may be inside a hidden folder."""
    root = tmp_path / ".cache" / "videos"
    for rel in ["a.mp4", ".snapshot/daily/a.mp4", "sub/.hid/x.mp4", "sub/.h.mp4", "sub/b.mkv", "sub/c.d/e.mp4"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    want = ["a.mp4", "sub/b.mkv", "sub/c.d/e.mp4"]
    assert list_videos(str(root)).column("video_uri").to_pylist() == [f"{root}/{r}" for r in want]
    assert list_videos(f"{root}/").column("video_uri").to_pylist() == [f"{root}/{r}" for r in want]
    assert list_videos(f"{root}/sub/.hid").column("video_uri").to_pylist() == [f"{root}/sub/.hid/x.mp4"]
    upload_tree(s3fs_client, root, "s3://rayvid-test/.cache/videos/")
    for url in ("s3://rayvid-test/.cache/videos/", "s3://rayvid-test/.cache/videos", "s3a://rayvid-test/.cache/videos"):
        assert list_videos(url).column("video_uri").to_pylist() == [f"s3://rayvid-test/.cache/videos/{r}" for r in want]


def test_a_broken_symlink_is_skipped_with_a_warning(tree, tmp_path, caplog):
    """A dangling link (its file deleted or moved) anywhere below a local INPUT is skipped, and
    named in a warning; the rest is listed."""
    os.symlink(tmp_path / "gone.mp4", tree / "gone.mp4")
    os.symlink(tmp_path / "gone.txt", tree / "sub dir" / "notes.txt")
    os.symlink(tmp_path / "gone", tree / "sub dir" / "deeper" / "old folder")
    os.symlink("self.mp4", tree / "self.mp4")  # a link to itself: ELOOP
    with caplog.at_level("WARNING", logger="rayvid"):
        t = list_videos(str(tree))
    assert t.column("video_uri").to_pylist() == [f"{tree}/{r}" for r in EXPECTED]
    for link in ("gone.mp4", "sub dir/notes.txt", "sub dir/deeper/old folder", "self.mp4"):
        assert f"{tree}/{link}" in caplog.text
    assert str(tmp_path / "gone") not in caplog.text.replace(f"{tree}/", "")  # the link, not where it pointed


def test_videos_in_symlinked_folders_are_listed_once_without_looping(tree, tmp_path):
    """A linked folder is listed like a real one; a link back up (a loop) or to a folder listed
    already adds nothing, and a folder reached both ways is listed where it really is."""
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "c.mp4").write_bytes(b"x")
    (other / "sub" / "d.mkv").write_bytes(b"x")
    os.symlink(other, tree / "cam2")
    os.symlink(other, tree / "cam2 again")
    os.symlink(tree, tree / "sub dir" / "up")
    os.symlink(tree / "sub dir" / "deeper", tree / "a latest")  # sorts before "sub dir"
    os.symlink(tree / "cam2", other / "sub" / "back")
    names = sorted(EXPECTED + ["cam2/c.mp4", "cam2/sub/d.mkv"])
    t = list_videos(str(tree))
    assert t.column("video_uri").to_pylist() == [f"{tree}/{r}" for r in names]
    for row in t.to_pylist():  # the version a decode checks (storage.pin) is the one listed
        assert row["version"] == list_videos(row["video_uri"]).column("version")[0].as_py()
    assert list_videos(str(tree / "cam2")).column("video_uri").to_pylist() == [
        f"{tree}/cam2/c.mp4", f"{tree}/cam2/sub/d.mkv"]


def test_a_manifest_that_fails_part_way_is_a_clear_error(tree):
    """The manifest is found, then reading its body fails (an HTTP error status on the
    read): InputError naming it, not a traceback."""
    (tree / "m.txt").write_text("b.mp4\n")
    with http_server(str(tree), "range-errors") as base:
        with pytest.raises(InputError, match=f"cannot read manifest {base}/m.txt: HTTP 500 Internal Server Error"):
            list_videos(f"{base}/m.txt")


def test_single_video_and_errors(tree, tmp_path):
    assert list_videos(f"{tree}/b.mp4").column("video_uri").to_pylist() == [f"{tree}/b.mp4"]
    with pytest.raises(InputError, match="input not found"):
        list_videos(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="neither a folder, a manifest"):
        list_videos(f"{tree}/image.png")
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nx.mp4\n")
    with pytest.raises(InputError, match="no video_uri column"):
        list_videos(str(bad))


def test_a_100k_object_prefix_lists_in_bounded_memory(s3_endpoint, monkeypatch):
    """100,000 objects under a prefix (put straight into moto's store, listed through the
    real endpoint): the listing is ListObjectsV2 pages into Arrow, so the driver's peak RSS
    grows by tens of MB, not by the per-object metadata fsspec's find() would keep."""
    import functools
    import json
    import subprocess
    import sys

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    BUCKET = "rayvid-big"  # a bucket of its own: moto's listing cost grows with the bucket

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    # moto gathers and sorts every key of the bucket for each page it serves (0.37 s a page
    # here, 37 s in all): while the bucket does not change, one gathering serves every page
    # (moto still pages, orders and tokens them itself)
    plain = backend.list_objects

    @functools.lru_cache(maxsize=4)
    def gathered(bucket_name, prefix, delimiter, n_keys):
        return plain(backend.buckets[bucket_name], prefix, delimiter, None, None)

    def list_objects(bucket, prefix, delimiter, marker, max_keys):
        if bucket.name != BUCKET or marker is not None or max_keys is not None:
            return plain(bucket, prefix, delimiter, marker, max_keys)
        keys, folders, truncated, token = gathered(bucket.name, prefix, delimiter, len(bucket.keys))
        return list(keys), list(folders), truncated, token

    monkeypatch.setattr(backend, "list_objects", list_objects)  # (this backend's, for this test)
    backend.create_bucket(BUCKET, "us-east-1")
    for i in range(100_000):
        backend.put_object(BUCKET, f"big/{i // 1000:03d}/v{i:06d}.mp4", b"x")
    for i in range(1_000):
        backend.put_object(BUCKET, f"small/v{i:06d}.mp4", b"x")
    # the child's own peak: VmHWM, not getrusage's ru_maxrss, which Linux starts at the
    # parent's RSS when the child is forked (this test process: hundreds of MB), so that
    # both listings read the same and no growth could show
    measure = ("import json, sys, time; from rayvid import listing; t0 = time.time(); "
               "t = listing.list_videos(sys.argv[1]); "
               "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
               "print(json.dumps({'n': len(t), 's': time.time() - t0, 'peak_mb': hwm / 1024, "
               "'first': t['video_uri'][0].as_py(), 'last': t['video_uri'][-1].as_py()}))")
    got = {}
    for name in ("small", "big"):
        out = subprocess.run([sys.executable, "-c", measure, f"s3://{BUCKET}/{name}/"],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        got[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"listing 1,000 objects: {got['small']}; 100,000 objects: {got['big']}")
    assert got["big"]["n"] == 100_000 and got["small"]["n"] == 1_000
    assert (got["big"]["first"], got["big"]["last"]) == (f"s3://{BUCKET}/big/000/v000000.mp4",
                                                         f"s3://{BUCKET}/big/099/v099999.mp4")
    # measured: +30 MB (Arrow columns and each page's transient rows); fsspec's find()
    # of the same 100,000 objects: +136 MB
    assert got["big"]["peak_mb"] - got["small"]["peak_mb"] < 60, got


def test_names_that_are_not_utf8_are_skipped_with_a_warning(tree, caplog):
    """A file or folder whose name is not UTF-8 (a Latin-1 `café.mp4` from an old system) has
    no video_uri (an Arrow string is UTF-8): skipped and named in a warning, the rest listed
    (it failed the whole listing with a traceback)."""
    root = os.fsencode(tree)
    os.mkdir(os.path.join(root, b"caf\xe9 dir"))
    for name in (b"caf\xe9.mp4", os.path.join(b"caf\xe9 dir", b"in.mp4")):
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"x")
    with caplog.at_level("WARNING", logger="rayvid"):
        t = list_videos(str(tree))
    assert t.column("video_uri").to_pylist() == [f"{tree}/{r}" for r in EXPECTED]
    assert f"skipping {tree}/caf\\xe9.mp4: its name is not UTF-8" in caplog.text
    assert f"skipping {tree}/caf\\xe9 dir: its name is not UTF-8" in caplog.text
    with pytest.raises(InputError, match=r"cannot read .*caf\\xe9.mp4: its name is not UTF-8"):
        list_videos(os.fsdecode(os.path.join(root, b"caf\xe9.mp4")))  # given alone


def test_a_manifest_that_is_not_utf8_is_a_clear_error(tree, tmp_path):
    manifest = tmp_path / "latin1.txt"
    manifest.write_bytes(f"{tree}/b.mp4\n{tree}/caf\xe9.mp4\n".encode("latin-1"))
    with pytest.raises(InputError, match=rf"manifest {tmp_path}/latin1.txt is not UTF-8 text \(byte \d+: b'\\xe9'\)"):
        list_videos(str(manifest))


def test_a_manifest_entry_holding_a_nul_is_a_clear_error(tree, tmp_path):
    """A NUL in a manifest's entry (no file or object name holds one) was a traceback from
    os.stat while planning segments, exit 1 (a QA find): exit 2 naming the entry."""
    for name, text in (("nul.txt", f"{tree}/b.mp4\nbad\x00nul.mp4\n"), ("nul.csv", "video_uri\nb.mp4\nbad\x00.mp4\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=r"entry '.*bad\\x00.*' holds a NUL character, which no file or object "
                                             r"name can: remove it"):
            list_videos(str(tmp_path / name))


def test_manifest_entries_with_dot_segments_or_home_name_the_file_meant(tree, tmp_path, s3fs_client, monkeypatch):
    """`./b.mp4` and `../in/b.mp4` in a manifest are b.mp4 beside it, in a bucket as locally
    (on S3 they were keys of their own: NotFound rows); `~/x` in a local manifest is the
    user's home, as on a command line."""
    entries = "b.mp4\n./b.mp4\n../in/b.mp4\n./sub dir/../A.MOV\n"  # (and in a bucket a//b is another key)
    (tree / "m.txt").write_text(entries)
    assert list_videos(str(tree / "m.txt")).column("video_uri").to_pylist() == [f"{tree}/A.MOV", f"{tree}/b.mp4"]
    upload_tree(s3fs_client, tree, "s3://rayvid-test/dots/in/")
    assert list_videos("s3://rayvid-test/dots/in/m.txt").column("video_uri").to_pylist() == [
        "s3://rayvid-test/dots/in/A.MOV", "s3://rayvid-test/dots/in/b.mp4"]
    s3fs_client.pipe("s3://rayvid-test/dots/in/m2.txt", b"x//y.mp4\n./x/./y.mp4\n")
    assert list_videos("s3://rayvid-test/dots/in/m2.txt").column("video_uri").to_pylist() == [
        "s3://rayvid-test/dots/in/x//y.mp4", "s3://rayvid-test/dots/in/x/y.mp4"]
    monkeypatch.setenv("HOME", str(tree))
    (tmp_path / "home.txt").write_text("~/b.mp4\n")
    assert list_videos(str(tmp_path / "home.txt")).column("video_uri").to_pylist() == [f"{tree}/b.mp4"]
