"""Listing folders, prefixes and manifests, locally and on S3, in a deterministic order."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import HTTP_MODES, http_server, upload_tree
from rayvid.errors import InputError
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


@pytest.mark.parametrize("mode", HTTP_MODES)
def test_manifests_over_http_whatever_the_server_does_with_byte_ranges(tree, mode):
    """Manifests at http(s):// URLs list the same videos whether the server serves byte
    ranges (a Parquet manifest is then read by its footer and one column) or not (read whole:
    pyarrow's footer seek would fail); relative entries are relative to the manifest's URL."""
    pq.write_table(pa.table({"size": [1, 2, 3], "video_uri": ["b.mp4", "sub dir/deeper/x.WebM", "b.mp4"]}),
                   tree / "m.parquet")
    (tree / "m.txt").write_text("# videos\nb.mp4\nsub%20dir/deeper/x.WebM\n")
    pq.write_table(pa.table({"path": ["b.mp4"]}), tree / "bad.parquet")
    with http_server(str(tree), mode) as base:
        want = [f"{base}/b.mp4", f"{base}/sub dir/deeper/x.WebM"]
        assert list_videos(f"{base}/m.parquet").column("video_uri").to_pylist() == want
        assert list_videos(f"{base}/m.txt").column("video_uri").to_pylist() == [want[0], f"{base}/sub%20dir/deeper/x.WebM"]
        with pytest.raises(InputError, match=r"has no video_uri column \(has: \['path'\]\)"):
            list_videos(f"{base}/bad.parquet")


def test_a_manifest_that_fails_part_way_is_a_clear_error(tree):
    """The manifest is found, then reading its body fails (an HTTP error status on the
    read): InputError naming it, not a traceback."""
    (tree / "m.txt").write_text("b.mp4\n")
    with http_server(str(tree), "range-errors") as base:
        with pytest.raises(InputError, match=f"cannot read manifest {base}/m.txt: 500, message='Internal Server Error'"):
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


def test_a_100k_object_prefix_lists_in_bounded_memory(s3_endpoint):
    """100,000 objects under a prefix (put straight into moto's store, listed through the
    real endpoint): the listing is ListObjectsV2 pages into Arrow, so the driver's peak RSS
    grows by a few MB, not by the per-object metadata fsspec's find() would keep."""
    import json
    import subprocess
    import sys

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    BUCKET = "rayvid-big"  # a bucket of its own: moto's listing cost grows with the bucket

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    backend.create_bucket(BUCKET, "us-east-1")
    for i in range(100_000):
        backend.put_object(BUCKET, f"big/{i // 1000:03d}/v{i:06d}.mp4", b"x")
    for i in range(1_000):
        backend.put_object(BUCKET, f"small/v{i:06d}.mp4", b"x")
    measure = ("import json, resource, sys, time; from rayvid import listing; t0 = time.time(); "
               "t = listing.list_videos(sys.argv[1]); "
               "print(json.dumps({'n': len(t), 's': time.time() - t0, "
               "'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
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
    assert got["big"]["peak_mb"] - got["small"]["peak_mb"] < 100, got
