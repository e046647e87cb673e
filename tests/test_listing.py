"""Listing folders, prefixes and manifests, locally and on S3, in a deterministic order."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import upload_tree
from rayvid.errors import InputError
from rayvid.listing import list_videos


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
