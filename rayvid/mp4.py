"""What an MP4/MOV's boxes (ISO/IEC 14496-12) say, read without FFmpeg. A remote file's
index fetched alone into a partial copy (`index_only`: the moov, and a fragmented MP4's
moofs), so that a segment or a sparse sample then fetches its own packets' bytes
(`video.plan_ranges`) instead of the whole file; and why a local file will not open
(`hint`). Bytes only: no columns in or out, no decoding.
"""

from __future__ import annotations

import os
from typing import Optional

from rayvid import storage


FETCH_GAP_BYTES = 2 * 2**20  # ranges closer than this are fetched as one: a request costs about as much
_SMALL_BOX = 2**20  # boxes walked past are fetched up to this much (ftyp, sidx, uuid, udta, meta)
_MAX_MOOF_WINDOW = 64 * 2**10  # a moof is read in one request up to this size
_MAX_TABLE = 16 * 2**20  # a fragmented MP4's random-access table (mfra) read whole up to this size


def index_only(copy: storage.RangeCopy, gap_bytes: int = FETCH_GAP_BYTES, max_rounds: int = 64,
               max_index_bytes: int = 512 * 2**20) -> bool:
    """Fetches every top-level box of an MP4/MOV but its media data (mdat) into `copy`:
    the index (moov, and in a fragmented MP4 every fragment's moof) says where each
    frame's bytes lie, so a segment's own bytes can be fetched next (`plan_ranges`).

    The boxes are walked in rounds: each round reads the header of every box whose place
    is known, then the bodies, several in flight (`RangeCopy.fetch_ranges`). A fragmented
    MP4 (its moov holds an mvex) may say where its fragments are, in a random-access table
    (mfra, which the file's last 16 bytes locate) or in segment indexes (sidx): then its
    moofs are read many at a time; else fragment after fragment.

    False, as soon as it is known (what was fetched by then stays counted), for anything
    else, which is copied whole: another container, no moov, an index over
    `max_index_bytes`, more than `max_rounds` rounds (a long fragmented MP4 without a
    table), or fragments smaller on average than `gap_bytes` (FETCH_GAP_BYTES: a request
    costs about as much as that many bytes, so fetching each moof on its own would cost
    more than the whole file)."""
    size = copy.size
    todo, walked, kinds, listed = {0}, set(), [], set()  # listed: moof offsets the file's tables give
    fragmented, moofs, moof_size = False, 0, 0
    for rounds in range(max_rounds + 1):
        todo = {at for at in todo if at < size and at not in walked}
        if max(moofs, len(listed)) * gap_bytes > size:  # fragments too small to fetch on their own
            return False
        if not todo:
            return b"moov" in kinds and b"mdat" in kinds
        if rounds == max_rounds:
            return False
        # once a moof was seen, each box is read with twice its size (a file's fragments
        # hold about as many frames each): a moof and its mdat's header in one request
        window = min(2 * moof_size + 16, _MAX_MOOF_WINDOW) if moof_size else 16
        copy.fetch_ranges([(at, window) for at in todo])
        heads = {at: _box_head(copy.read(at, min(16, size - at)), size - at) for at in sorted(todo)}
        bodies, after = [], set()
        for at, head in heads.items():
            if head is None or (at == 0 and head[0] != b"ftyp"):
                return False
            kind, n = head
            walked.add(at)
            kinds.append(kind)
            if kind == b"moov":
                if n > max_index_bytes:
                    return False
                bodies.append((at, n))
            elif kind == b"moof":
                moofs, moof_size = moofs + 1, max(moof_size, n)
                bodies.append((at, n + 16))  # and the header of the box after it (its mdat)
            elif kind not in (b"mdat", b"free", b"skip", b"wide"):
                bodies.append((at, min(n, _SMALL_BOX)))
            after.add(at + n)
        if max(moofs, len(listed)) * gap_bytes > size:
            return False
        copy.fetch_ranges(bodies)
        for at, (kind, n) in heads.items():
            if kind == b"moov" and not fragmented and b"mvex" in _children(copy, at, n):
                fragmented = True  # its fragments' moofs follow: where does its table say they are?
                listed |= _tfra_offsets(copy)
            elif kind == b"moof" and at + n < size:  # its mdat, whose header came with it
                mdat = _box_head(copy.read(at + n, min(16, size - at - n)), size - at - n)
                if mdat is not None and mdat[0] == b"mdat":
                    walked.add(at + n)
                    kinds.append(b"mdat")
                    after.add(at + n + mdat[1])
            elif kind == b"sidx":
                listed |= _sidx_offsets(copy.read(at, min(n, _SMALL_BOX)), at + n)
        todo = after | listed if moof_size else after  # the listed ones once a moof's size is known
    return False


def _box_head(head: bytes, left: int) -> Optional[tuple[bytes, int]]:
    """(kind, size) of the box whose first bytes are `head`, `left` bytes before the end
    of the file; None if they are not a box header that fits."""
    if len(head) < 8:
        return None
    n, kind = int.from_bytes(head[:4], "big"), head[4:8]
    if n == 1:
        n = int.from_bytes(head[8:16], "big") if len(head) >= 16 else 0
    elif n == 0:  # to the end of the file
        n = left
    if n < 8 or n > left or not kind.isalnum():
        return None
    return kind, n


def _children(copy: storage.RangeCopy, start: int, n: int) -> list[bytes]:
    """The kinds of the boxes directly inside the container box (moov) at `start`, `n` bytes long."""
    out, at, end = [], start + 8, start + n
    while at + 8 <= end:
        head = _box_head(copy.read(at, min(16, end - at)), end - at)
        if head is None:
            break
        out.append(head[0])
        at += head[1]
    return out


def _tfra_offsets(copy: storage.RangeCopy) -> set[int]:
    """The moof offsets that a fragmented MP4's random-access table lists: the tfra boxes
    (ISO/IEC 14496-12, 8.8.10) of the mfra box whose size the mfro box, the file's last 16
    bytes, gives. Empty if there is none."""
    tail = copy.read(copy.size - 16, 16) if copy.size >= 32 else b""
    if len(tail) < 16 or int.from_bytes(tail[:4], "big") != 16 or tail[4:8] != b"mfro":
        return set()
    n = int.from_bytes(tail[12:16], "big")
    if not 32 <= n <= min(copy.size, _MAX_TABLE):
        return set()
    mfra = copy.read(copy.size - n, n)
    if _box_head(mfra, n) != (b"mfra", n):
        return set()
    out, at = set(), 8
    while at + 8 <= len(mfra):
        head = _box_head(mfra[at : at + 16], len(mfra) - at)
        if head is None:
            break
        kind, size = head
        box = mfra[at : at + size]
        if kind == b"tfra" and len(box) >= 24:
            wide = 8 if box[8] == 1 else 4  # version 1: 64-bit time and offset
            sizes = int.from_bytes(box[16:20], "big")  # traf, trun and sample numbers: 1-4 bytes each
            step = 2 * wide + ((sizes >> 4) & 3) + ((sizes >> 2) & 3) + (sizes & 3) + 3
            for k in range(min(int.from_bytes(box[20:24], "big"), (len(box) - 24) // step)):
                entry = 24 + k * step + wide
                out.add(int.from_bytes(box[entry : entry + wide], "big"))
        at += size
    return out


def _sidx_offsets(sidx: bytes, end: int) -> set[int]:
    """The offsets of the media subsegments (a moof and its mdat each) that a sidx box
    lists (ISO/IEC 14496-12, 8.16.3), counted from `end`, where the box ends."""
    wide = 8 if len(sidx) > 8 and sidx[8] == 1 else 4  # version 1: 64-bit time and offset
    at = 20 + wide  # past size, type, version and flags, reference_ID, timescale, earliest time
    if len(sidx) < at + wide + 4:
        return set()
    offset = end + int.from_bytes(sidx[at : at + wide], "big")
    count = int.from_bytes(sidx[at + wide + 2 : at + wide + 4], "big")
    out, at = set(), at + wide + 4
    for _ in range(count):
        if at + 12 > len(sidx):
            break
        ref = int.from_bytes(sidx[at : at + 4], "big")
        if not ref >> 31:  # media (1: another sidx, walked when it is reached)
            out.add(offset)
        offset += ref & 0x7FFFFFFF
        at += 12
    return out


def hint(path: str) -> str:
    """Why an MP4/MOV will not open, when its top-level boxes say: the index (moov) is
    written last unless the file was made with faststart, so a cut file loses it."""
    boxes, offset = [], 0
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while offset + 8 <= size and len(boxes) < 64:
            f.seek(offset)
            head = f.read(16)
            n, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if n == 1 and len(head) == 16:
                n = int.from_bytes(head[8:16], "big")
            elif n == 0:
                n = size - offset
            if n < 8 or not kind.isalnum() and kind not in (b"free", b"skip"):
                break
            boxes.append((kind, offset + n > size))
            offset += n
    kinds = [k for k, _ in boxes]
    if b"ftyp" in kinds and any(kind == b"moov" and cut for kind, cut in boxes):
        return " (truncated MP4: the file ends inside its index (moov))"
    if b"ftyp" not in kinds or b"moov" in kinds:
        return ""
    if any(cut for _, cut in boxes):
        return " (truncated MP4: the file ends inside its media data and its index (moov), written last, is missing)"
    return " (MP4 without an index (moov))"
