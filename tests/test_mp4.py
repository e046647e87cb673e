"""Partial copies of MP4/MOV files (rayvid/mp4.py): the index alone is fetched, in few
round trips, and probes like the whole file. Round trips are counted on the local file
system (`_Counting`); the decode stage's reads of these copies from S3 and GCS are
tests/test_segments.py's."""

from __future__ import annotations

import math
import os

import fsspec
import numpy as np
import pytest

import framecode
from rayvid import storage
from rayvid.mp4 import index_only
from rayvid.video import probe


class _Counting(fsspec.implementations.local.LocalFileSystem):
    """The local file system, counting the calls that read byte ranges (each a round trip on a store)."""

    calls = 0

    def cat_ranges(self, *args, **kwargs):
        _Counting.calls += 1
        return super().cat_ranges(*args, **kwargs)


@pytest.mark.parametrize("name", sorted(framecode.FRAGMENTED))
def test_index_of_a_fragmented_mp4_is_every_moof(fragmented, tmp_path, name):
    """A fragmented MP4's partial copy holds its moov and every fragment's moof, and probes
    like the whole file; with a table (mfra) the moofs are read in a few round trips, without
    one a fragment at a time; where fragments are smaller than fetching each on its own is
    worth (the default 2 MB), nothing past the first fragment is read and it is copied whole."""
    path = fragmented[name]

    def copy(**kwargs):
        part = storage.RangeCopy(_Counting(), path, os.path.getsize(path), str(tmp_path / "part.mp4"))
        open(part.path, "wb").close()
        os.truncate(part.path, part.size)
        _Counting.calls = 0
        return part, index_only(part, **kwargs)

    part, ok = copy(gap_bytes=0)
    assert ok and part.fetched < part.size / 3
    whole, partial = probe(path), probe(part.path, partial=True)
    assert len(whole.pts) == 300
    for field in ("pts", "times", "keyframes", "pos", "nbytes", "order"):
        np.testing.assert_array_equal(getattr(partial, field), getattr(whole, field), err_msg=field)
    calls, moofs = _Counting.calls, sum(kind == b"moof" for kind, _ in framecode.top_boxes(path))
    listed = name != "frag_no_table.mp4"  # by the mfra, or by the sidx: the moofs many at a time
    assert moofs >= 7 and (calls < moofs + 5 if listed else calls >= moofs)  # else a fragment at a time
    part, ok = copy(gap_bytes=0, max_rounds=6)
    assert ok == listed  # the boxes before the fragments, a moof, then all: walking takes more rounds
    part, ok = copy()  # fragments of ~10 KB: a whole copy costs less than a request for each
    assert not ok and part.fetched < 10_000


@pytest.mark.parametrize("version", [0, 1])
def test_index_of_a_long_fragmented_mp4_reads_its_table(tmp_path, version):
    """A long fragmented MP4 with fragments of 2 MB (an index only: its media data is a
    hole) whose mfra table has 32-bit (version 0) or 64-bit (version 1) offsets: every moof
    is read, many in each round trip, and little else."""
    import struct

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I4s", 8 + len(payload), kind) + payload

    src, moof = str(tmp_path / "long.mp4"), box(b"moof", bytes(600))
    offsets = []
    with open(src, "wb") as f:
        f.write(box(b"ftyp", b"isom" + bytes(4) + b"isomiso6"))
        f.write(box(b"moov", box(b"mvhd", bytes(100)) + box(b"mvex", box(b"trex", bytes(24)))))
        for _ in range(100):
            offsets.append(f.tell())
            f.write(moof + struct.pack(">I4s", 8 + 2 * 2**20, b"mdat"))
            f.seek(2 * 2**20, os.SEEK_CUR)  # media data: a hole
        wide = ">QQ" if version else ">II"  # each entry: time, moof offset, then 1-byte numbers
        entries = b"".join(struct.pack(wide, 0, at) + b"\x01\x01\x01" for at in offsets)
        tfra = box(b"tfra", bytes([version, 0, 0, 0]) + struct.pack(">III", 1, 0, len(offsets)) + entries)
        f.write(box(b"mfra", tfra + struct.pack(">I4sII", 16, b"mfro", 0, 8 + len(tfra) + 16)))
    part = storage.RangeCopy(_Counting(), src, os.path.getsize(src), str(tmp_path / "part.mp4"))
    open(part.path, "wb").close()
    os.truncate(part.path, part.size)
    _Counting.calls = 0
    assert index_only(part)  # the default: fragments of 2 MB are worth reading in parts
    # ftyp, moov, the table and the first moof (a round trip each, about), then the moofs
    # SMALL_READS_IN_FLIGHT at a time (walked, a moof at a time: 100 and more)
    assert _Counting.calls <= 8 + math.ceil(len(offsets) / storage.RangeCopy.SMALL_READS_IN_FLIGHT)
    with open(part.path, "rb") as copy:
        for at in offsets:
            copy.seek(at)
            assert copy.read(len(moof) + 8)[4:12] == b"moof" + bytes(4)
    # each moof in one request of twice its size (its mdat's header in it), the boxes around
    assert len(moof) * len(offsets) < part.fetched < 2**16 + len(offsets) * (2 * len(moof) + 16)
