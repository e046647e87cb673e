"""One helper for every URL; secrets never survive `redact`."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time

import pytest

from helpers import FAKE_KEY_ID, FAKE_SECRET, HTTP_MODES, http_server
from rayvid import storage


def _blob(n: int, seed: int) -> bytes:
    """n fixed random bytes, the last not \r: gcsfs's one-request upload ends its body with
    "\n--==0==--", and the GCS emulator's MIME parser takes a last \r of the data for part
    of that line break (with os.urandom, one run in 256 of a test uploading to it failed on
    the upload, not on what it tested)."""
    return random.Random(seed).randbytes(n - 1) + b"."


def test_resolve_local_and_s3(tmp_path, s3_endpoint):
    fs, path = storage.resolve(str(tmp_path / "x"))
    assert storage.is_local(fs) and path == str(tmp_path / "x")
    fs, path = storage.resolve("s3://rayvid-test/a/b.mp4")
    assert path == "rayvid-test/a/b.mp4" and storage.to_url(fs, path) == "s3://rayvid-test/a/b.mp4"
    assert fs.exists("rayvid-test")  # reached the moto endpoint through AWS_ENDPOINT_URL


def test_a_copy_keeps_the_extension_of_its_object(tmp_path, s3fs_client):
    """Some demuxers look at the extension: a copy's name keeps it, also for keys holding
    "?" or "#" (part of the name on S3, a query or fragment only over HTTP)."""
    for key in ("clip #1.mkv", "what?.ts"):
        s3fs_client.pipe_file(f"s3://rayvid-test/suffix/{key}", b"x")
        with storage.local_copy(f"s3://rayvid-test/suffix/{key}", str(tmp_path)) as p:
            assert p.endswith("." + key.rsplit(".", 1)[1])
        with storage.shared_copy(f"s3://rayvid-test/suffix/{key}", str(tmp_path)) as (p, _):
            assert p.endswith("." + key.rsplit(".", 1)[1])
    assert storage._suffix("https://h/v.mp4?X-Amz-Signature=S.x#y") == ".mp4"


def test_a_double_colon_is_part_of_the_name_not_a_chain(tmp_path, s3fs_client):
    """fsspec reads "a::b" as the URL b seen through a; rayvid reads the object named so."""
    (tmp_path / "clip").write_bytes(b"another file")
    (tmp_path / "clip::1.mp4").write_bytes(b"this one")
    with storage.local_copy(str(tmp_path / "clip::1.mp4"), str(tmp_path)) as p:
        assert open(p, "rb").read() == b"this one"
    s3fs_client.pipe_file("s3://rayvid-test/in/a::b.mp4", b"on s3")
    with storage.local_copy("s3://rayvid-test/in/a::b.mp4", str(tmp_path)) as p:
        assert open(p, "rb").read() == b"on s3"
    fs, path = storage.resolve("s3://rayvid-test/in/a::b.mp4")
    assert storage.to_url(fs, path) == "s3://rayvid-test/in/a::b.mp4"


def test_local_copy_streams_s3_objects_to_a_temp_file(tmp_path, s3fs_client):
    data = _blob(3 * 2**20 + 17, 1)
    s3fs_client.pipe_file("s3://rayvid-test/blob.bin", data)
    with storage.local_copy("s3://rayvid-test/blob.bin", str(tmp_path)) as p:
        assert open(p, "rb").read() == data
        kept = p
    assert not os.path.exists(kept)
    with pytest.raises(FileNotFoundError):
        with storage.local_copy("s3://rayvid-test/nope.bin", str(tmp_path)):
            pass


@pytest.mark.parametrize("listed", [True, False])
def test_a_range_copy_of_an_object_replaced_by_a_shorter_one_is_object_changed(tmp_path, store, listed):
    """A shorter object answers a range with fewer bytes, or with 416 past its end: that is
    ObjectChanged (the next run reads the video again), whether or not a version was listed."""
    s3fs_client, bucket = store
    url = f"{bucket}/shrinks.bin"
    s3fs_client.pipe_file(url, _blob(9000, 2))
    version = storage.version_of(s3fs_client.info(url)) if listed else ""
    for offset, length in ((0, 9000), (6000, 1000)):  # a short answer; a range past the end
        with storage.range_copy(url, str(tmp_path), version) as part:
            s3fs_client.pipe_file(url, _blob(5000, 3))
            with pytest.raises(storage.ObjectChanged):
                part.fetch(offset, length)
        s3fs_client.pipe_file(url, _blob(9000, 4))
        version = storage.version_of(s3fs_client.info(url)) if listed else ""


def test_range_copy_fetches_only_the_ranges_asked(tmp_path, store):
    s3fs_client, bucket = store
    data = _blob(2 * storage.RangeCopy.CHUNK + 17, 5)
    s3fs_client.pipe_file(f"{bucket}/ranges.bin", data)
    with storage.range_copy(f"{bucket}/ranges.bin", str(tmp_path)) as part:
        assert part.size == len(data) == os.path.getsize(part.path)
        part.fetch(100, 1000)
        part.fetch(600, 1000)  # overlaps the first: only bytes 1100..1599 are new
        assert part.fetched == 1500
        with open(part.path, "rb") as f:
            assert f.read(2000) == bytes(100) + data[100:1600] + bytes(400)  # holes read as zeros
        part.fetch(len(data) - 10, 100)  # clamped at the end of the object
        part.fetch(5, 2 * storage.RangeCopy.CHUNK)  # streamed in chunks, around what is here
        assert part.fetched == 1500 + 10 + (2 * storage.RangeCopy.CHUNK - 1500)  # less bytes 100..1599
        fetched = part.fetched
        assert part.read(5, 2 * storage.RangeCopy.CHUNK) == data[5 : 5 + 2 * storage.RangeCopy.CHUNK]
        assert part.fetched == fetched  # all of it was here already
        kept = part.path
    assert not os.path.exists(kept)
    with pytest.raises(FileNotFoundError):
        with storage.range_copy(f"{bucket}/nope.bin", str(tmp_path)):
            pass
    assert os.listdir(tmp_path) == []


def test_range_copy_reads_many_pieces_in_flight_exactly(tmp_path, s3fs_client, monkeypatch):
    """Ranges asked together are merged, cut into CHUNK pieces and read READS_IN_FLIGHT at
    a time: the copy is byte for byte the object's, and no byte is read twice."""
    monkeypatch.setattr(storage.RangeCopy, "CHUNK", 64 * 2**10)  # many pieces from a small object
    data = _blob(2**20 + 333, 6)
    s3fs_client.pipe_file("s3://rayvid-test/pieces.bin", data)
    with storage.range_copy("s3://rayvid-test/pieces.bin", str(tmp_path)) as part:
        part.fetch_ranges([(300_000, 200_000), (10, 5), (350_000, 400_000), (10, 5), (2**20, 10**6)])
        assert part.fetched == 450_000 + 5 + 333  # 300000..749999, 10..14, 1048576..end
        with open(part.path, "rb") as f:
            copy = f.read()
        for lo, hi in ((10, 15), (300_000, 750_000), (2**20, len(data))):
            assert copy[lo:hi] == data[lo:hi]
        assert copy[15:300_000] == bytes(300_000 - 15)  # never asked: a hole
    with storage.local_copy("s3://rayvid-test/pieces.bin", str(tmp_path)) as p:
        assert open(p, "rb").read() == data  # 17 pieces, 4 in flight at a time


def test_an_object_shorter_than_its_listing_is_an_error_not_zeros(tmp_path, s3fs_client):
    data = _blob(5000, 7)
    s3fs_client.pipe_file("s3://rayvid-test/short.bin", data)
    fs, path = storage.resolve("s3://rayvid-test/short.bin")
    copy = str(tmp_path / "copy.bin")
    open(copy, "wb").close()
    part = storage.RangeCopy(fs, path, 9000, copy)  # listed longer than it is now
    with pytest.raises(storage.ObjectChanged, match=r"changed while it was read \(9000 bytes, now 5000\)"):
        part.fetch(4000, 2000)
    assert part.fetched == 1000


def test_version_of_names_what_each_store_says_about_content():
    assert storage.version_of({"ETag": '"9b2cf535f27731c974343645a3985328"'}) == "9b2cf535f27731c974343645a3985328"
    assert storage.version_of({"etag": "CKih16GjycICEAE="}) == "CKih16GjycICEAE="  # adlfs
    # gcsfs: the generation, which only a new upload changes (the ETag changes with metadata)
    assert storage.version_of({"etag": "CKih16GjycICEAI=", "generation": "1764460800123456"}) == "1764460800123456"
    assert storage.version_of({"mtime": 1764460800.25}) == "1764460800.25"  # local files
    assert storage.version_of({"Last-Modified": "Sun, 29 Nov 2026 10:00:00 GMT"}) == "Sun, 29 Nov 2026 10:00:00 GMT"
    assert storage.version_of({"size": 10}) == ""


def test_a_range_reader_reads_what_a_file_would(store, tmp_path):
    """What planning reads headers through: the bytes a local file would give, at any seek,
    in blocks; past the end nothing."""
    import io

    client, bucket = store
    data = _blob(3000, 11)
    client.pipe_file(f"{bucket}/reader.bin", data)
    assert client.cat_file(f"{bucket}/reader.bin") == data
    fs, path = storage.resolve(f"{bucket}/reader.bin")
    reader = storage.RangeReader(fs, path, len(data), block=512)
    f, here = io.BufferedReader(reader, 256), io.BytesIO(data)
    rng = random.Random(7)
    for _ in range(40):
        offset, whence = rng.choice([(rng.randrange(-100, 3100), io.SEEK_SET), (rng.randrange(-50, 50), io.SEEK_CUR),
                                     (-rng.randrange(0, 600), io.SEEK_END)])
        if whence == io.SEEK_SET:
            offset = max(0, offset)
        elif whence == io.SEEK_CUR:
            offset = max(-here.tell(), offset)
        assert f.seek(offset, whence) == here.seek(offset, whence)
        n = rng.randrange(0, 900)
        assert f.read(n) == here.read(n)
    f.seek(0)
    assert f.read() == data
    # listed longer than it is now: S3 refuses the range past its end (an access error:
    # planning makes the video one segment, the decoder says the object changed); an empty
    # answer (the GCS emulator, a local file) ends the file
    try:
        longer = io.BufferedReader(storage.RangeReader(fs, path, len(data) + 100, block=512)).read()
    except storage.ACCESS_ERRORS:
        longer = None
    assert longer in (None, data)
    (tmp_path / "reader.bin").write_bytes(data)
    local = storage.RangeReader(*storage.resolve(str(tmp_path / "reader.bin")), len(data) + 100, block=512)
    assert io.BufferedReader(local).read() == data
    for raw in (reader, storage.RangeReader(*storage.resolve(str(tmp_path / "reader.bin")), len(data), block=512)):
        for _ in range(20):  # unbuffered (as pyarrow reads it): every read whole but at the end,
            offset, n = rng.randrange(0, 3000), rng.randrange(1, 1500)  # also one past the block held
            raw.seek(offset)
            assert raw.read(10) + raw.read(n) == data[offset : offset + 10 + n]


def test_a_copy_is_of_the_listed_version_or_says_the_object_changed(tmp_path, store):
    """A copy begins by asking the store for the object's version: a version other than the
    listed one is ObjectChanged before a byte is copied; a copy whose object was replaced
    between two of its range reads says so when verified; a deleted one too."""
    s3fs_client, bucket = store
    url = f"{bucket}/versioned.bin"
    first, second = _blob(100_000, 8), _blob(100_000, 9)
    s3fs_client.pipe_file(url, first)
    listed = storage.version_of(s3fs_client.info(url))
    assert listed
    with storage.local_copy(url, str(tmp_path), listed) as p:
        assert open(p, "rb").read() == first
    with storage.range_copy(url, str(tmp_path), listed) as part:
        part.fetch(0, 50_000)
        part.verify()  # unchanged: nothing to say
        s3fs_client.pipe_file(url, second)
        part.fetch(50_000, 50_000)  # the second half is the new object's
        with pytest.raises(storage.ObjectChanged, match=f"changed while it was read .version {listed}, now "):
            part.verify()
    for copy in (storage.local_copy, storage.range_copy):
        with pytest.raises(storage.ObjectChanged, match=f"changed after it was listed .version {listed}, now "):
            with copy(url, str(tmp_path), listed):
                pass
    with storage.local_copy(url, str(tmp_path)) as p:  # no version listed: the one there now
        assert open(p, "rb").read() == second
    with storage.range_copy(url, str(tmp_path)) as part:
        s3fs_client.rm(url)
        with pytest.raises(storage.ObjectChanged, match="deleted while it was read"):
            part.verify()
    assert os.listdir(tmp_path) == []


def test_an_s3_copy_with_the_listed_etag_and_size_is_its_gets_alone(tmp_path, s3fs_client, moto, monkeypatch):
    """With the listing's ETag and size a copy from S3 asks no metadata: each ranged GET is
    conditional on that ETag (If-Match), so a clip is one request, not a HEAD, a GET and a
    HEAD. An object replaced after the listing, or between two of a copy's reads, is
    ObjectChanged; one deleted before its copy is not found, as when asked first."""
    monkeypatch.setattr(storage.RangeCopy, "CHUNK", 64 * 2**10)
    first, second = _blob(100_000, 10), _blob(100_000, 11)
    s3fs_client.pipe_file("s3://rayvid-test/cond/clip.mp4", first)
    [[(url, size, etag)]] = list(storage.iter_files("s3://rayvid-test/cond/"))
    assert size == len(first) and etag == storage.version_of(s3fs_client.info(url))
    with moto.requests() as seen:
        with storage.local_copy(url, str(tmp_path), etag, size) as p:
            assert open(p, "rb").read() == first
    assert [m for m, _ in seen] == ["GET", "GET"]  # two 64 KB pieces, in flight together
    with moto.requests() as seen:
        with storage.range_copy(url, str(tmp_path), etag, size) as part:
            part.fetch(0, 1000)
            part.verify()
            s3fs_client.pipe_file(url, second)  # replaced between two reads
            with pytest.raises(storage.ObjectChanged, match=f"changed after it was listed .version {etag}, now "):
                part.fetch(50_000, 1000)
    assert [m for m, _ in seen if m != "PUT"] == ["GET", "GET", "HEAD"]  # the refused GET, then why
    for copy in (storage.local_copy, storage.range_copy):  # replaced since the listing
        with pytest.raises(storage.ObjectChanged, match=f"changed after it was listed .version {etag}, now "):
            with copy(url, str(tmp_path), etag, size) as part:
                if copy is storage.range_copy:
                    part.fetch(0, 10)
    s3fs_client.rm(url)
    with pytest.raises(FileNotFoundError, match="rayvid-test/cond/clip.mp4"):
        with storage.local_copy(url, str(tmp_path), etag, size):
            pass
    assert os.listdir(tmp_path) == []
    # not conditional: no listed size, an mtime for a version, not S3
    fs, path = storage.resolve(url)
    assert storage._conditional(fs, path, etag, size)
    assert not storage._conditional(fs, path, etag, -1) and not storage._conditional(fs, path, "2026-12-06T10:00:00", size)
    assert not storage._conditional(*storage.resolve(str(tmp_path / "x.mp4")), etag, size)


def test_conditional_copies_on_stores_that_ignore_or_refuse_if_match(tmp_path, s3fs_client, moto, monkeypatch):
    """An S3-like store that ignores If-Match: each answer's own ETag (and total size) says
    it is another version: ObjectChanged, never bytes of two versions. One that refuses
    every If-Match (412) though a HEAD finds the listed version: the copy goes on without
    the condition, checked after as before (it was every run's failure)."""
    monkeypatch.setattr(storage.RangeCopy, "CHUNK", 64 * 2**10)
    monkeypatch.setattr(storage, "_NO_IF_MATCH", set())  # (the session's one s3fs instance: put back whatever happens)
    url = "s3://rayvid-test/cond2/clip.mp4"
    first = _blob(100_000, 12)
    s3fs_client.pipe_file(url, first)
    [[(_, size, etag)]] = list(storage.iter_files("s3://rayvid-test/cond2/"))

    def ignore(environ):
        environ.pop("HTTP_IF_MATCH", None)

    with moto.hook(ignore):
        with storage.range_copy(url, str(tmp_path), etag, size) as part:
            part.fetch(0, 1000)
            s3fs_client.pipe_file(url, _blob(100_000, 13))  # same size, another version
            with pytest.raises(storage.ObjectChanged, match=f"changed after it was listed .version {etag}, now "):
                part.fetch(50_000, 1000)
        with pytest.raises(storage.ObjectChanged, match=f"changed after it was listed .version {etag}, now "):
            with storage.local_copy(url, str(tmp_path), etag, size):
                pass
    s3fs_client.pipe_file(url, first)  # the listed version again (same bytes: same ETag)
    refused = []

    def refuse(environ):
        if environ["REQUEST_METHOD"] == "GET" and environ.get("HTTP_IF_MATCH"):
            refused.append(environ["HTTP_IF_MATCH"])
            return "412 Precondition Failed", (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PreconditionFailed'
                                               b"</Code><Message>At least one of the pre-conditions you specified did "
                                               b"not hold</Message><Condition>If-Match</Condition></Error>")

    with moto.requests() as seen, moto.hook(refuse):
        with storage.local_copy(url, str(tmp_path), etag, size) as p:
            assert open(p, "rb").read() == first
        assert refused == [f'"{etag}"'] * 2 and [m for m, _ in seen] == ["GET", "GET", "HEAD", "GET", "GET", "HEAD"]
        del seen[:]  # that store's next copies ask first: no refused GETs each time
        with storage.local_copy(url, str(tmp_path), etag, size) as p:
            assert open(p, "rb").read() == first
        assert len(refused) == 2 and [m for m, _ in seen] == ["HEAD", "GET", "GET", "HEAD"]
    storage._NO_IF_MATCH.clear()

    def bad_request(environ):  # a 400 of another kind (an argument, a token): this copy alone reads on unconditionally
        if environ["REQUEST_METHOD"] == "GET" and environ.get("HTTP_IF_MATCH"):
            refused.append(environ["HTTP_IF_MATCH"])
            return "400 Bad Request", (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidArgument</Code>'
                                       b"<Message>Invalid Argument</Message></Error>")

    with moto.hook(bad_request):
        with storage.local_copy(url, str(tmp_path), etag, size) as p:
            assert open(p, "rb").read() == first
    assert len(refused) == 4 and not storage._NO_IF_MATCH  # the next copy is conditional again
    assert os.listdir(tmp_path) == []


def test_a_conditional_answer_without_an_etag_is_checked_after(tmp_path, s3fs_client, moto, monkeypatch):
    """A store whose GET answers name no ETag: the copy cannot know which version each
    answer was of, so it asks once after it (as a copy without conditions does): a copy of
    an object replaced between two reads is ObjectChanged."""
    monkeypatch.setattr(storage.RangeCopy, "CHUNK", 64 * 2**10)
    url = "s3://rayvid-test/cond3/clip.mp4"
    data = _blob(100_000, 14)
    s3fs_client.pipe_file(url, data)
    [[(_, size, etag)]] = list(storage.iter_files("s3://rayvid-test/cond3/"))
    with moto.without_header("GET", "ETag"):
        with moto.requests() as seen:
            with storage.local_copy(url, str(tmp_path), etag, size) as p:
                assert open(p, "rb").read() == data
        assert [m for m, _ in seen] == ["GET", "GET", "HEAD"]
        with storage.range_copy(url, str(tmp_path), etag, size) as part:
            part.fetch(0, 1000)
            s3fs_client.pipe_file(url, _blob(100_000, 15))
            with pytest.raises(storage.ObjectChanged, match="changed after it was listed"):
                part.fetch(50_000, 1000)  # If-Match refused it: found at once
    s3fs_client.pipe_file(url, data)
    with moto.without_header("GET", "ETag"), moto.hook(lambda environ: [environ.pop("HTTP_IF_MATCH", None)] and None):
        with storage.range_copy(url, str(tmp_path), etag, size) as part:  # and a store ignoring If-Match too
            part.fetch(0, 1000)
            s3fs_client.pipe_file(url, _blob(100_000, 16))
            part.fetch(50_000, 1000)  # nothing says it changed yet
            with pytest.raises(storage.ObjectChanged, match=f"changed while it was read .version {etag}, now "):
                part.verify()


def test_a_gcs_copy_with_the_listed_generation_and_size_is_its_gets_alone(tmp_path, gcs, gcsfs_client, monkeypatch):
    """On GCS as on S3: with the listing's generation and size a copy asks no metadata, each
    ranged GET on the condition `ifGenerationMatch` (GCS answers 412 for another generation),
    so a clip is one request, not a metadata request, a GET and another. An object replaced
    after the listing or between two reads is ObjectChanged, on a store ignoring the condition
    too (each answer names its generation); an answer naming none is checked once after;
    one refused while the listed generation is still there reads on without the condition."""
    monkeypatch.setattr(storage.RangeCopy, "CHUNK", 64 * 2**10)
    monkeypatch.setattr(storage, "_NO_IF_MATCH", set())
    url, name = "gs://rayvid-test/gcond/clip.mp4", "gcond/clip.mp4"
    first = _blob(100_000, 17)

    def listed():
        gcsfs_client.invalidate_cache()
        [[(u, size, generation)]] = list(storage.iter_files("gs://rayvid-test/gcond/"))
        assert u == url and size == 100_000 and generation.isdigit()
        return size, generation

    gcsfs_client.pipe_file(url, first)
    size, gen = listed()
    with gcs.requests() as seen:
        with storage.local_copy(url, str(tmp_path), gen, size) as p:
            assert open(p, "rb").read() == first
    assert seen == [("media if", name)] * 2  # two 64 KB pieces, in flight together: nothing else
    with gcs.requests() as seen:
        with storage.range_copy(url, str(tmp_path), gen, size) as part:
            part.fetch(0, 1000)
            part.verify()
            gcsfs_client.pipe_file(url, _blob(100_000, 18))  # replaced between two reads
            with pytest.raises(storage.ObjectChanged, match=f"changed after it was listed .version {gen}, now "):
                part.fetch(50_000, 1000)
    assert [k for k, _ in seen] == ["media if", "media if", "info"]  # the refused GET, then why
    for copy in (storage.local_copy, storage.range_copy):  # replaced since the listing
        with pytest.raises(storage.ObjectChanged, match=f"changed after it was listed .version {gen}, now "):
            with copy(url, str(tmp_path), gen, size) as part:
                if copy is storage.range_copy:
                    part.fetch(0, 10)
    size, gen = listed()
    gcs.ignore_conditions = True  # a store serving whatever is there: the answer's generation says so
    try:
        with storage.range_copy(url, str(tmp_path), gen, size) as part:
            part.fetch(0, 1000)
            gcsfs_client.pipe_file(url, _blob(100_000, 19))
            with pytest.raises(storage.ObjectChanged, match=f"changed after it was listed .version {gen}, now "):
                part.fetch(50_000, 1000)
        size, gen = listed()
        gcs.strip_generation = True  # and naming no generation: checked once after
        with gcs.requests() as seen:
            with storage.local_copy(url, str(tmp_path), gen, size) as p:
                data = open(p, "rb").read()
        assert [k for k, _ in seen] == ["media if", "media if", "info"]
        with storage.range_copy(url, str(tmp_path), gen, size) as part:
            part.fetch(0, 1000)
            gcsfs_client.pipe_file(url, _blob(100_000, 20))
            part.fetch(50_000, 1000)  # nothing says it changed yet
            with pytest.raises(storage.ObjectChanged, match=f"changed while it was read .version {gen}, now "):
                part.verify()
    finally:
        gcs.ignore_conditions = gcs.strip_generation = False
    gcsfs_client.pipe_file(url, data)
    size, gen = listed()
    monkeypatch.setattr(gcs, "refuse_conditions", True)  # refused, though the listed generation is there
    with gcs.requests() as seen:
        with storage.local_copy(url, str(tmp_path), gen, size) as p:
            assert open(p, "rb").read() == data
        assert [k for k, _ in seen] == ["media if", "media if", "info", "media", "media", "info"]
        del seen[:]  # that store's next copies ask first: no refused GETs each time
        with storage.local_copy(url, str(tmp_path), gen, size) as p:
            assert open(p, "rb").read() == data
        assert [k for k, _ in seen] == ["info", "media", "media", "info"]
    storage._NO_IF_MATCH.clear()
    gcsfs_client.rm(url)
    with pytest.raises(FileNotFoundError, match="rayvid-test/gcond/clip.mp4"):
        with storage.local_copy(url, str(tmp_path), gen, size):
            pass
    assert os.listdir(tmp_path) == [] and not storage._NO_IF_MATCH
    fs, path = storage.resolve(url)
    assert storage._conditional(fs, path, gen, size)
    assert not storage._conditional(fs, path, gen, -1) and not storage._conditional(fs, path, "abc", size)

    asked = []

    class Zonal(type(fs)):  # gcsfs's default filesystem on a zonal bucket: its own gRPC reads, as before
        async def _is_zonal_bucket(self, bucket):
            asked.append(bucket)
            return bucket == "rayvid-test"

    monkeypatch.setattr(storage, "_ZONAL", {})
    zonal = Zonal(token="anon", skip_instance_cache=True)
    assert not storage._conditional(zonal, path, gen, size) and storage._conditional(zonal, "other/clip.mp4", gen, size)
    assert not storage._conditional(zonal, path, gen, size) and asked == ["rayvid-test", "other"]  # once a bucket


def test_a_local_file_read_in_place_is_pinned_to_its_version(tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(b"one")
    listed = storage.version_of(storage.resolve(str(path))[0].info(str(path)))
    check = storage.pin(str(path), listed)
    check()
    os.utime(path, (1_000_000_000, 1_000_000_000))  # rewritten: a new modification time
    with pytest.raises(storage.ObjectChanged, match="changed while it was read"):
        check()
    with pytest.raises(storage.ObjectChanged, match="changed after it was listed"):
        storage.pin(str(path), listed)
    storage.pin(str(path))()  # nothing listed: pinned to what is there now


@pytest.fixture
def shared_root(tmp_path, monkeypatch):
    """shared_copy's directory under this test's tmp_path (it lives in the temp directory)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "work").mkdir()
    return tmp_path / "tmp" / f"rayvid-shared-{os.getuid()}"


def test_segments_read_at_the_same_time_share_one_whole_copy(shared_root, tmp_path, s3fs_client):
    """Two readers of one object at the same time: one copies it, the other waits for that
    copy and copies nothing; the last to finish deletes it. One after the other, each
    copies (nothing is kept for later)."""
    import threading

    url = "s3://rayvid-test/shared/long.mkv"
    data = _blob(3 * 2**20 + 5, 21)
    s3fs_client.pipe_file(url, data)
    listed = storage.version_of(s3fs_client.info(url))
    work = str(tmp_path / "work")
    got, inside, leave = [], threading.Barrier(2), threading.Event()

    def read():
        with storage.shared_copy(url, work, listed) as (path, copied):
            got.append((path, copied, open(path, "rb").read() == data, path.endswith(".mkv")))
            inside.wait(30)  # both hold it at once
            leave.wait(30)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(got) == 2 and got[0][0] == got[1][0] and all(ok and mkv for _, _, ok, mkv in got)
    assert sorted(c for _, c, _, _ in got) == [0, len(data)]  # copied once
    leave.set()
    for r in readers:
        r.join(30)
    assert not os.path.exists(got[0][0]) and os.listdir(shared_root) == [".lock"]
    for _ in range(2):
        with storage.shared_copy(url, work, listed) as (path, copied):
            assert copied == len(data)
    with pytest.raises(storage.ObjectChanged, match="changed after it was listed"):
        with storage.shared_copy(url, work, "stale-etag"):
            pass
    with pytest.raises(FileNotFoundError):
        with storage.shared_copy("s3://rayvid-test/shared/missing.mkv", work):
            pass
    assert os.listdir(shared_root) == [".lock"] and os.listdir(work) == []


def test_a_shared_copy_whose_users_died_is_deleted(shared_root, tmp_path, s3fs_client):
    """An actor SIGKILLed while it holds a shared copy never deletes it: the next reader of
    any object finds its pid gone and deletes the copy."""
    import signal
    import subprocess
    import sys

    url = "s3://rayvid-test/shared/killed.mkv"
    s3fs_client.pipe_file(url, _blob(100_000, 22))
    code = ("import sys, time; from rayvid import storage\n"
            f"with storage.shared_copy({url!r}, {str(tmp_path / 'work')!r}) as (path, _):\n"
            "    print(path, flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, TMPDIR=str(tmp_path / "tmp")))
    try:
        path = holder.stdout.readline().strip()
        assert os.path.isfile(path) and path.startswith(str(shared_root))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.isfile(path)  # left behind
    s3fs_client.pipe_file("s3://rayvid-test/shared/other.mkv", b"x" * 10)
    with storage.shared_copy("s3://rayvid-test/shared/other.mkv", str(tmp_path / "work")):
        assert not os.path.exists(os.path.dirname(path))


def test_no_shared_copies_through_a_directory_others_can_write(shared_root, tmp_path, s3fs_client):
    url = "s3://rayvid-test/shared/open.mkv"
    s3fs_client.pipe_file(url, b"y" * 1000)
    shared_root.mkdir(mode=0o700)
    shared_root.chmod(0o777)
    with storage.shared_copy(url, str(tmp_path / "work")) as (path, copied):
        assert copied == 1000 and path.startswith(str(tmp_path / "work"))
    assert os.listdir(shared_root) == []


@pytest.mark.parametrize("mode", HTTP_MODES)
def test_http_copies_are_of_one_version(tmp_path, mode):
    """HTTP servers send an ETag (the helper's, like S3's, is the MD5 of the bytes): a
    whole copy, ranged or streamed, checks it before and after."""
    (tmp_path / "www").mkdir()
    (tmp_path / "copies").mkdir()
    (tmp_path / "www" / "v.bin").write_bytes(b"x" * 5000)
    with http_server(str(tmp_path / "www"), mode) as base:
        url = f"{base}/v.bin"
        listed = storage.version_of(storage.resolve(url)[0].info(storage.resolve(url)[1]))
        assert listed == hashlib.md5(b"x" * 5000).hexdigest()
        with storage.local_copy(url, str(tmp_path / "copies"), listed) as p:
            assert open(p, "rb").read() == b"x" * 5000
        (tmp_path / "www" / "v.bin").write_bytes(b"y" * 5000)
        with pytest.raises(storage.ObjectChanged, match="changed after it was listed"):
            with storage.local_copy(url, str(tmp_path / "copies"), listed):
                pass


@pytest.mark.parametrize("mode", ["ranges", "whole"])
def test_an_http_server_is_asked_once_per_object_whether_it_serves_ranges(tmp_path, mode):
    """The probe (a GET of byte 1) goes once per object and size per process, not once per
    segment's copy; an object of another size (replaced) is asked again."""
    from helpers import HTTP_ASKED

    (tmp_path / "www").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "www" / "v.mp4").write_bytes(b"x" * 5000)
    with http_server(str(tmp_path / "www"), mode) as base:
        url = f"{base}/v.mp4"
        fs, path = storage.resolve(url)
        probes = lambda: HTTP_ASKED[("GET", "/v.mp4", "bytes=1-1")]  # noqa: E731
        before = probes()
        for _ in range(3):  # three segments' copies
            with storage.local_copy(url, str(tmp_path / "work")) as p:
                assert open(p, "rb").read() == b"x" * 5000
        assert storage.serves_ranges(fs, path, 5000) == (mode == "ranges")
        assert probes() - before == 1
        (tmp_path / "www" / "v.mp4").write_bytes(b"y" * 6000)
        with storage.local_copy(url, str(tmp_path / "work")) as p:
            assert open(p, "rb").read() == b"y" * 6000
        assert probes() - before == 2


@pytest.mark.parametrize("mode", HTTP_MODES)
def test_http_copies_are_exact_whatever_the_server_does_with_byte_ranges(tmp_path, monkeypatch, mode):
    """Over HTTP a whole copy is the object byte for byte: in ranges read 4 at a time where
    the server serves them, else in one stream. A partial copy exists only where it serves
    them; an answer longer than the range asked is never written."""
    monkeypatch.setattr(storage.RangeCopy, "CHUNK", 64 * 2**10)  # many pieces from a small object
    data = _blob(2**20 + 333, 23)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a b.mp4").write_bytes(data)
    work = tmp_path / "work"
    work.mkdir()
    with http_server(str(tmp_path / "www"), mode) as base:
        url = f"{base}/a%20b.mp4"
        fs, path = storage.resolve(url)
        assert storage.serves_ranges(fs, path) == (mode == "ranges")
        with storage.local_copy(url, str(work)) as p:
            assert open(p, "rb").read() == data
        with storage.range_copy(url, str(work)) as part:
            if mode == "ranges":
                part.fetch_ranges([(70_000, 200_000), (2**20, 1000)])
                assert part.read(70_000, 200_000) == data[70_000:270_000]
                assert part.read(2**20, 1000) == data[2**20:]
                assert part.fetched == 200_000 + 333
            else:
                assert part is None
        if mode == "whole":  # made by hand, as if the server had said it serves ranges
            copy = str(work / "copy.mp4")
            open(copy, "wb").close()
            part = storage.RangeCopy(fs, path, len(data), copy)
            with pytest.raises(OSError, match=f"the store sent {len(data)} bytes for a range of 1000: "
                                              "it does not serve byte ranges"):
                part.fetch(5000, 1000)
            assert os.path.getsize(copy) == 0 and part.fetched == 0
        with pytest.raises(FileNotFoundError):
            with storage.local_copy(f"{base}/missing.mp4", str(work)):
                pass
    assert sorted(os.listdir(work)) == (["copy.mp4"] if mode == "whole" else [])


def test_the_credentials_hint_is_for_a_stores_refusals_only(damaged):
    """s3fs turns S3's AccessDenied into a PermissionError with no errno: the message says
    to check credentials. The operating system's or FFmpeg's EACCES/EPERM (an errno) does
    not: no credential fixes a local file's mode or a damaged index."""
    import errno

    import av
    import s3fs
    from botocore.exceptions import ClientError

    denied = s3fs.errors.translate_boto_error(ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject"))
    assert isinstance(denied, PermissionError)
    assert storage.describe(denied) == f"Access Denied ({storage.CREDENTIALS_HINT})"
    local = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/videos/a.mp4")  # as open() raises it
    assert storage.describe(local) == "[Errno 13] Permission denied: '/data/videos/a.mp4'"
    with av.open(damaged["key_frame_index_reversed.mp4"]) as c:  # FFmpeg cannot seek in it: EPERM
        with pytest.raises(av.error.PermissionError) as seek:
            c.seek(int(c.streams.video[0].duration // 2), stream=c.streams.video[0], backward=True)
    assert isinstance(seek.value, PermissionError) and "check credentials" not in storage.describe(seek.value)


def test_gcs_refusals_and_outages_are_access_errors_with_the_right_meaning(gcs):
    """What gcsfs raises for GCS's answers (its own `validate_response`, after its retries):
    401 and 403 say to check credentials, what gcsfs retries (408, 429, 5xx) means the store
    is unavailable (the run stops, resumable, instead of one error row per video), 404 is
    one missing object; each is an access error (once the process has a GCS filesystem),
    none a crash."""
    import json
    import subprocess
    import sys

    from gcsfs.retry import validate_response

    # gcsfs is imported by the first GCS filesystem, not by rayvid: S3 users and decode
    # children do not pay for it
    code = "import sys, rayvid.decode, rayvid.pipeline; print(sorted(m for m in sys.modules if m.startswith('gcsfs')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    storage.resolve("gs://rayvid-test/v.mp4")

    def raised(status: int, message: str) -> BaseException:
        body = json.dumps({"error": {"code": status, "message": message}}).encode()
        with pytest.raises(Exception) as e:
            validate_response(status, body, "b/{}/o/{}", ["rayvid-test", "v.mp4"])
        assert isinstance(e.value, storage.ACCESS_ERRORS), type(e.value)
        return e.value

    unauthorized = raised(401, "Invalid Credentials")
    forbidden = raised(403, "rayvid@p.iam.gserviceaccount.com does not have storage.objects.get access")
    for refused in (unauthorized, forbidden):
        assert storage.describe(refused).endswith(f"({storage.CREDENTIALS_HINT})")
        assert not storage.is_unavailable(refused)
    for status in (408, 429, 500, 502, 503, 504):  # a 502 comes as requests' ProxyError
        down = raised(status, "Service Unavailable")
        assert storage.is_unavailable(down) and "check credentials" not in storage.describe(down)
    missing = raised(404, "No such object")
    assert isinstance(missing, FileNotFoundError) and not storage.is_unavailable(missing)
    assert "check credentials" not in storage.describe(missing)

    # google-auth's errors, as gcsfs raises them: a token endpoint that cannot be reached is an
    # outage (said with its cause, no hint); one that refuses is credentials (its message, no tuple)
    import google.auth.exceptions as auth
    import requests

    def chained(outer, inner):
        try:
            try:
                raise inner
            except Exception as e:
                raise outer from e
        except Exception as e:
            return e

    down = requests.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded with url: /token")
    for error in (chained(auth.TransportError(str(down)), down),
                  chained(auth.RefreshError("Failed to retrieve token", auth.TransportError(str(down))),
                          chained(auth.TransportError(str(down)), down))):
        assert isinstance(error, storage.ACCESS_ERRORS) and storage.is_unavailable(error)
        assert storage.describe(error) == f"cannot get GCS credentials: {down}"
    refused = auth.RefreshError("invalid_grant: Invalid JWT Signature.", {"error": "invalid_grant"})
    assert not storage.is_unavailable(refused)
    assert storage.describe(refused) == ("cannot get GCS credentials: invalid_grant: Invalid JWT Signature. "
                                         f"({storage.CREDENTIALS_HINT})")


def test_gcs_missing_objects_and_buckets_are_said_as_such(gcs):
    """gcsfs's FileNotFoundError holds only the JSON API path it asked: the message says
    what is missing (an error row's message, a verb's one line)."""
    fs, _ = storage.resolve("gs://rayvid-test/in/")
    for what, action in (("no such object: gs://rayvid-test/in/no such.mp4", lambda: fs.info("rayvid-test/in/no such.mp4")),
                         ("no such bucket: gs://no-such-bucket", lambda: fs.info("no-such-bucket/x.mp4")),
                         ("no such bucket: gs://no-such-bucket", lambda: storage.write_atomic("gs://no-such-bucket/o/r.json", lambda f: f.write(b"{}")))):
        with pytest.raises(FileNotFoundError) as e:
            action()
        assert storage.describe(e.value) == what


def test_gcs_credentials_that_cannot_be_had_or_a_store_down_are_one_line(gcs, tmp_path):
    """A service account whose token endpoint cannot be reached was a google-auth traceback
    (exit 1); a GCS that cannot be reached made a read verb say "no rayvid output" after
    gcsfs's tracebacks (its retries, ~35 s): both are exit 2, one line, saying why."""
    import json
    import subprocess
    import sys

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    account = tmp_path / "sa.json"
    account.write_text(json.dumps({"type": "service_account", "project_id": "p", "private_key_id": "k1",
                                   "private_key": key, "client_email": "rayvid@p.iam.gserviceaccount.com",
                                   "client_id": "1", "token_uri": "http://127.0.0.1:9/token"}))
    dead = "http://127.0.0.1:9"  # nothing listens there
    for env, said in (({"GOOGLE_APPLICATION_CREDENTIALS": str(account)},
                       "rayvid: error: cannot read gs://rayvid-test/out/: cannot get GCS credentials: "),
                      ({"STORAGE_EMULATOR_HOST": dead}, "rayvid: error: cannot read gs://rayvid-test/out/: Cannot connect to host")):
        done = subprocess.run([sys.executable, "-m", "rayvid", "summary", "gs://rayvid-test/out/"], capture_output=True,
                              text=True, timeout=300, env={**os.environ, **env})
        lines = [line for line in done.stderr.splitlines() if not line.startswith("Authentication failed using Compute")]
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(said), done.stderr[-3000:]
        assert "PRIVATE KEY" not in done.stderr and "rayvid@p.iam" not in done.stderr


def test_an_http_server_down_or_overloaded_is_unavailable_a_missing_file_is_not(tmp_path):
    """fsspec reports all three as FileNotFoundError; its cause tells a store that is down
    (connection refused, 503) from an object that is not there (404)."""
    (tmp_path / "a.mp4").write_bytes(b"x" * 10)

    def error_of(url):
        fs, path = storage.resolve(url)
        with pytest.raises(FileNotFoundError) as e:
            fs.size(path)
        return e.value

    with http_server(str(tmp_path), "ranges") as base:
        assert not storage.is_unavailable(error_of(f"{base}/missing.mp4"))
    assert storage.is_unavailable(error_of(f"{base}/a.mp4"))  # stopped: connection refused
    with http_server(str(tmp_path), "unavailable") as base:
        assert storage.is_unavailable(error_of(f"{base}/a.mp4"))
    assert not storage.is_unavailable(FileNotFoundError("s3://b/k.mp4"))


def test_write_atomic_local_and_s3(tmp_path, s3fs_client):
    target = tmp_path / "d" / "f.parquet"
    storage.write_atomic(str(target), lambda f: f.write(b"abc"))
    assert target.read_bytes() == b"abc" and os.listdir(tmp_path / "d") == ["f.parquet"]
    with pytest.raises(ZeroDivisionError):
        storage.write_atomic(str(tmp_path / "d" / "g.parquet"), lambda f: (f.write(b"x"), 1 / 0))
    assert os.listdir(tmp_path / "d") == ["f.parquet"]  # no partial file, no temp left
    storage.write_atomic("s3://rayvid-test/w/f.bin", lambda f: f.write(b"xyz"))
    assert s3fs_client.cat_file("s3://rayvid-test/w/f.bin") == b"xyz"


@pytest.mark.parametrize("size", [1000, 12 * 2**20])  # one PUT at close; a multipart (resumable) upload
def test_write_atomic_publishes_nothing_of_an_interrupted_write_on_object_stores(store, size, request):
    """An exception inside the write (a Ctrl-C while Parquet encodes) leaves no object, not
    the bytes written so far, and (S3) no multipart upload behind; the old object stays."""
    s3fs_client, bucket = store
    url = f"{bucket}/w/interrupted-{size}.bin"
    storage.write_atomic(url, lambda f: f.write(b"old"))
    uploads_before = request.getfixturevalue("gcs").uploads_in_progress if bucket.startswith("gs://") else 0

    def write(f):
        f.write(b"x" * size)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.write_atomic(url, write)
    s3fs_client.invalidate_cache()
    assert s3fs_client.cat_file(url) == b"old"
    if bucket.startswith("s3://"):
        uploads = s3fs_client.call_s3("list_multipart_uploads", Bucket="rayvid-test")
        assert not uploads.get("Uploads")
    else:
        assert request.getfixturevalue("gcs").uploads_in_progress == uploads_before


def test_redact_removes_credentials(s3_endpoint):
    text = (
        f"failed https://bucket.s3.amazonaws.com/k.mp4?X-Amz-Credential={FAKE_KEY_ID}&X-Amz-Signature=abc "
        f"and s3://user:pass@bucket/key with key {FAKE_KEY_ID} secret {FAKE_SECRET}"
    )
    out = storage.redact(text)
    for secret in (FAKE_KEY_ID, FAKE_SECRET, "X-Amz-Signature", "pass@"):
        assert secret not in out
    assert "https://bucket.s3.amazonaws.com/k.mp4?<redacted>" in out
    # a fragment too; the punctuation after a URL stays, and redacting twice changes nothing
    assert storage.redact("see https://h/x#access_token=FRAG17 now") == "see https://h/x#<redacted> now"
    assert storage.redact("ftp://h/clip#1.mp4") == "ftp://h/clip#1.mp4"  # (an FTP file's name)
    assert storage.redact("cannot read ftp://h/d#2/v.mp4?code=S3CRET: x") == "cannot read ftp://h/d#2/v.mp4?<redacted>: x"
    said = "recorded input (https://h/m.txt?sig=S3CRET): give INPUT, or https://h/a?b=c."
    assert storage.redact(said) == storage.redact(storage.redact(said)) == \
        "recorded input (https://h/m.txt?<redacted>): give INPUT, or https://h/a?<redacted>."
    assert storage.public_uri("https://h/p.mp4?sig=1#f") == "https://h/p.mp4"
    assert storage.public_uri("https://ghp_T0KEN@host/m.keras") == "https://host/m.keras"
    assert storage.stored_uri("https://user:p@ss@host/a.mp4") == "https://host/a.mp4"
    azure = "abfs://videos@acct.dfs.core.windows.net/cam/a.mp4"  # container@account: an address, no secret
    assert storage.stored_uri(azure) == storage.public_uri(azure) == storage.redact(azure) == azure
    assert storage.stored_uri("s3://user:p@w@b/k") == "s3://b/k"
    for leaky in ("http://h/sub dir/a.mp4?X-Amz-Signature=S3CRETSIG&v=1", "https://cdn/it's.mp4?token=S3CRETSIG",
                  'no such file: "https://h/a b.mp4?sig=S3CRETSIG"'):  # _QUERY stops at the space/quote
        assert "S3CRETSIG" not in storage.redact(leaky), storage.redact(leaky)
    assert storage.redact("http://h/sub dir/a.mp4?X-Amz-Signature=S&v=1").endswith("X-Amz-Signature=<redacted>&v=1")
    assert "ghp_T0KEN" not in storage.redact("cannot read https://ghp_T0KEN@host/m.keras: 404")
    # a token as password with no user (Azure DevOps' personal access tokens)
    empty_user = "https://:PAT0KEN@dev.azure.com/org/v.mp4"
    assert storage.stored_uri(empty_user) == storage.public_uri(empty_user) == "https://dev.azure.com/org/v.mp4"
    assert "PAT0KEN" not in storage.redact(f"input not found: {empty_user}")
    # outside HTTP a "?" is the key's: shown, and recorded, as it is
    for key_url in ("s3://b/in?2024/", "gs://b/a?b#c.mp4"):
        assert storage.public_uri(key_url) == storage.redact(key_url) == key_url
    # a password with a "/" (an AWS secret key, unencoded; invalid in a URL, so its host
    # parts are not one): not in any message, output name or shown URL
    for url, base in ((f"s3://minio:{FAKE_SECRET}@bucket/a.mp4", "s3://bucket/a.mp4"),
                      ("https://alice:se/cr3tPW@127.0.0.1:9/c.mp4", "https://127.0.0.1:9/c.mp4"),
                      ("ftp://bob:pa/ss@host/b.mp4", "ftp://host/b.mp4")):
        assert storage.stored_uri(url) == storage.public_uri(url) == base
        assert "fake-secret" not in storage.redact(f"has: [{url!r}]") and "cr3tPW" not in storage.redact(url)
        assert "pa/ss" not in storage.redact(url)
    for url in ("https://bob:pa/ss:word@host/v.mp4", "https://bob:pa/ss@word@host/v.mp4"):
        assert storage.stored_uri(url) == storage.public_uri(url) == "https://host/v.mp4"
        assert storage.redact(url) == "https://***@host/v.mp4"
    # ... while in a name a port before a path with an "@" is an address (as is an IPv6
    # host's, and github://org:repo@ref); shown (a message, a summary line) it is redacted
    # all the same, as a password may begin with digits and a "/" (an AWS secret may):
    # then a bucket has no port
    for address in ("http://[::1]:8080/cam@1.mp4", "https://u:p@h/me@x.mp4",
                    "github://fsspec:filesystem_spec@master/docs/a.mp4", "s3://b/https://x:y/z@w.mp4"):
        assert storage.stored_uri(address) == storage.public_uri(address) == address.replace("u:p@", "")
    assert storage.stored_uri("https://host:8080/cams/a@b.mp4") == "https://host:8080/cams/a@b.mp4"
    digits = "8/ZrK2b9nQe7Xh1LkPq4Tz0VwYs3Md6FjHc5GaRu"
    assert storage.stored_uri(f"s3://KEY:{digits}@bucket/k.mp4") == "s3://bucket/k.mp4"
    for url in (f"https://minio:{digits}@127.0.0.1:9000/b/a.mp4", f"ftp://bob:{digits}@host/b.mp4",
                "https://host:8080/cams/a@b.mp4"):
        assert "ZrK2b9" not in storage.redact(f"cannot read {url}: gone") and "***@" in storage.redact(url)
        assert "ZrK2b9" not in storage.public_uri(url) and "***@" in storage.public_uri(url)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_credentials_in_a_bucket_url_are_a_clear_error_that_shows_none(scheme):
    """s3fs and gcsfs take `KEY:SECRET@bucket` for a bucket's name (and fail with a
    parameter error, cut where its next line would show the name): rayvid says what to
    do instead, and the message holds neither the key nor the secret."""
    from rayvid.errors import StorageError

    for url in (f"{scheme}://{FAKE_KEY_ID}:{FAKE_SECRET}@bucket/in/", f"{scheme}://{FAKE_KEY_ID}:abc@bucket/in/",
                f"{scheme.upper()}://{FAKE_KEY_ID}:{FAKE_SECRET}@bucket/in/"):  # (a scheme in capitals is one)
        with pytest.raises(StorageError) as e:  # (FAKE_SECRET holds a "/", as AWS secrets may)
            storage.resolve(url)
        message = str(e.value)
        assert message.startswith(f"credentials in a {scheme}:// URL are not used (the URL is not shown here): ")
        assert FAKE_KEY_ID not in message and "fake-secret" not in message and "AWS_PROFILE" in message
    assert storage.resolve(f"{scheme}://bucket/a@b.mp4")[1] == "bucket/a@b.mp4"  # an @ in a key is a key's


def test_stored_uri_drops_what_signs_a_url_and_keeps_what_names_the_object():
    s3 = ("https://b.s3.amazonaws.com/k%20a.mp4?versionId=3&X-Amz-Algorithm=AWS4-HMAC-SHA256&"
          f"X-Amz-Credential={FAKE_KEY_ID}%2F20261130&X-Amz-Signature=abc&x-amz-security-token=T")
    assert storage.stored_uri(s3) == "https://b.s3.amazonaws.com/k%20a.mp4?versionId=3"
    assert storage.stored_uri("https://b.s3.amazonaws.com/k.mp4?AWSAccessKeyId=A&Expires=1&Signature=S") == \
        "https://b.s3.amazonaws.com/k.mp4"
    assert storage.stored_uri("https://storage.googleapis.com/b/k.mp4?X-Goog-Signature=S&X-Goog-Credential=C") == \
        "https://storage.googleapis.com/b/k.mp4"
    sas = "https://a.blob.core.windows.net/c/k.mp4?sv=2024&sp=r&se=2026-12-01&sr=b&sig=S%3D"
    assert storage.stored_uri(sas) == "https://a.blob.core.windows.net/c/k.mp4"
    assert storage.stored_uri("https://cdn/k.mp4?Policy=P&Key-Pair-Id=K&Signature=S") == "https://cdn/k.mp4"
    assert storage.stored_uri("https://user:pw@host/v?id=7&sp=2&token=t#frag") == "https://host/v?id=7&sp=2"
    assert storage.stored_uri("https://ghp_T0KEN@host/v.mp4?id=7") == "https://host/v.mp4?id=7"
    # a standing credential stays as a digest: the same key the same name, another key another
    api = storage.stored_uri("https://h/v.mp4?alt=media&key=AIzaS3CRET&id=7")
    assert api == "https://h/v.mp4?alt=media&key=redacted-%s&id=7" % hashlib.sha256(b"AIzaS3CRET").hexdigest()[:12]
    assert storage.stored_uri("https://h/v.mp4?alt=media&key=AIzaOTHER&id=7") != api
    for name in ("api_key", "X-API-Key", "apikey", "access_key"):  # machine-made keys: a digest
        stored = storage.stored_uri(f"https://h/v.mp4?{name}=S3CRET&v=2")
        assert stored == f"https://h/v.mp4?{name}=redacted-{hashlib.sha256(b'S3CRET').hexdigest()[:12]}&v=2"
    for name in ("client_secret", "password", "pwd", "auth", "hmac", "jwt", "private-key",  # maybe a person's: gone
                 "pass", "pw", "psk", "bearer", "passphrase"):  # (an IP camera's user=...&pass=...: a QA find)
        assert storage.stored_uri(f"https://h/v.mp4?{name}=S3CRET&v=2") == "https://h/v.mp4?v=2"
    for name in ("session", "sessionid", "session_id", "sid", "ticket"):  # a credential or a stream's number
        stored = storage.stored_uri(f"https://h/v.mp4?{name}=S3CRET&v=2")
        assert stored == f"https://h/v.mp4?{name}=redacted-{hashlib.sha256(b'S3CRET').hexdigest()[:12]}&v=2"
    for name in ("api_key", "client_secret", "password", "key"):
        assert "S3CRET" not in storage.redact(f"http://h/a b.mp4?{name}=S3CRET")  # where _QUERY sees no URL
    # in s3://, gs://, ... a "?" is the key's: kept whole in messages and records, whatever follows
    for key_url in ("s3://b/cams?key=7/", "gs://b/odd?sig=1&token=2.mp4", "sftp://h/a?b"):
        assert storage.redact(f"cannot read {key_url}: gone") == f"cannot read {key_url}: gone"
    assert storage.redact("s3://b/https://x/a?sig=1") == "s3://b/https://x/a?sig=1"  # an http:// inside a key
    # ... but an HTTP URL beside one (a CSV row, a list), or ahead of one, is redacted
    for text in ("s3://b/k,https://h/x?X-Amz-Signature=S3CRET", "s3://b/k;https://h/x?token=S3CRET",
                 "[s3://b/k](https://h/x?token=S3CRET)", "git+https://host/repo?token=S3CRET",
                 "https://proxy/p/gs://b/k?X-Goog-Signature=S3CRET"):
        assert "S3CRET" not in storage.redact(text), storage.redact(text)
    assert storage.redact("text \x001\x00 and s3://b/k") == "text \x001\x00 and s3://b/k"  # (UTF-16 bytes in a message)
    others = {  # Alibaba OSS (STS), Tencent COS, Akamai
        "https://b.oss-cn-hangzhou.aliyuncs.com/k.mp4?OSSAccessKeyId=A&Expires=1&Signature=S&security-token=T":
            "https://b.oss-cn-hangzhou.aliyuncs.com/k.mp4",
        "https://b.cos.ap-beijing.myqcloud.com/k.mp4?q-sign-algorithm=sha1&q-ak=A&q-sign-time=1;2&q-key-time=1;2"
        "&q-header-list=&q-url-param-list=&q-signature=S&x-cos-security-token=T": "https://b.cos.ap-beijing.myqcloud.com/k.mp4",
        "https://cdn.example/k.mp4?__token__=exp=1~hmac=H&hdnts=st=1~hmac=H&v=2": "https://cdn.example/k.mp4?v=2",
        # CDN URL signing: Tencent COS/CDN and Qiniu `sign`, Alibaba and Huawei `auth_key`
        "https://b.cos.ap-beijing.myqcloud.com/k.mp4?sign=q-sign-algorithm%3Dsha1%26q-ak%3DA%26q-signature%3DS":
            "https://b.cos.ap-beijing.myqcloud.com/k.mp4",
        "https://cdn.example/k.mp4?auth_key=1700000000-0-0-80cd3862d699b7&v=2": "https://cdn.example/k.mp4?v=2",
        # nginx secure_link, Akamai's hdnea, Edgio's ec_secure (each kept whole: a QA find)
        "https://cdn.example/k.mp4?md5=Hx9fQWsecretSIGa1&expires=1999999999&v=2": "https://cdn.example/k.mp4?v=2",
        "https://cdn.example/k.mp4?hdnea=exp=1~acl=/*~hmac=H": "https://cdn.example/k.mp4",
        "https://cdn.example/k.mp4?ec_secure=0123456789abcdef&v=2": "https://cdn.example/k.mp4?v=2",
        "https://h.example/get?md5=aaa": "https://h.example/get?md5=aaa",  # (alone, it may name the file)
    }
    for signed, stored in others.items():
        assert storage.stored_uri(signed) == stored
    for kept in ("https://host/get?id=7&st=10", "s3://b/k.mp4", "/local/a?sig=1.mp4", "gs://b/x y.mkv",
                 "s3://b/odd?sig=1&token=2.mp4"):  # outside HTTP a "?" is part of the key
        assert storage.stored_uri(kept) == kept
    assert storage.public_uri("/local/a?b.mp4") == "/local/a?b.mp4"


def test_a_scheme_in_capitals_is_the_scheme(s3_endpoint, s3fs_client):
    s3fs_client.pipe("rayvid-test/caps/a.mp4", b"x")
    fs, path = storage.resolve("S3://rayvid-test/caps/a.mp4")
    assert path == "rayvid-test/caps/a.mp4" and fs.cat_file(path) == b"x"
    assert storage.canonical("S3://rayvid-test/caps/a.mp4") == "s3://rayvid-test/caps/a.mp4"


def test_a_filesystem_that_cannot_be_made_from_a_url_is_a_clear_error():
    """fsspec's filesystems that connect as they are made (FTP) raise what they raise: one
    line naming the URL instead, StorageUnavailable where the server cannot be reached (a run
    stops, resumable); those made over another file (zip://, reference://, the caches), which
    a URL cannot carry, are refused saying so (zip:// said "Is a directory: '/tmp'")."""
    from rayvid.errors import StorageError, StorageUnavailable

    with pytest.raises(StorageUnavailable, match=r"^cannot use URL 'ftp://127\.0\.0\.1:1/x/': .*Connection refused"):
        storage.resolve("ftp://bob:S3CRET@127.0.0.1:1/x/")
    over = r":// URLs are not read \(fsspec's filesystems over another file or store: .*\): unpack the archive"
    for url, said in (("zip://videos/", "^zip" + over), ("zip://a.mp4::/tmp/x.zip", "^zip" + over),
                      ("reference://x/", "^reference" + over), ("simplecache://x/", "^simplecache" + over),
                      ("data:video/mp4;base64,AAAA", "data: URLs are not read")):
        with pytest.raises(StorageError, match=said) as e:
            storage.resolve(url)
        assert not isinstance(e.value, StorageUnavailable)


def test_describe_keeps_the_line_a_first_line_only_leads_to():
    from botocore.exceptions import ParamValidationError

    error = ParamValidationError(report="Invalid bucket name \"Bad_Bucket!\": Bucket name must match the regex")
    assert str(error).splitlines()[0] == "Parameter validation failed:"
    assert storage.describe(error) == ("Parameter validation failed: Invalid bucket name \"Bad_Bucket!\": "
                                       "Bucket name must match the regex")
    assert storage.describe(OSError("one line\nand a traceback's next")) == "one line"


def test_access_errors_name_the_url_that_failed(tmp_path, s3_endpoint):
    from rayvid.errors import InputError, StorageError

    with pytest.raises(StorageError, match="cannot write s3://no-such-bucket/x.csv: "):
        with storage.access("s3://no-such-bucket/x.csv", "write"):
            storage.write_atomic("s3://no-such-bucket/x.csv", lambda f: f.write(b"x"))
    with pytest.raises(InputError, match=f"cannot read video {tmp_path / 'gone.mp4'}: "):
        with storage.access(str(tmp_path / "gone.mp4"), "read video", InputError):
            storage.read_bytes(str(tmp_path / "gone.mp4"))
    with pytest.raises(KeyError):  # anything else passes through as it is
        with storage.access("s3://any/where", "write"):
            raise KeyError("a bug")


def test_local_listing_skips_folders_it_cannot_enter(tmp_path):
    """A folder under a local INPUT this user may not read (lost+found, another user's),
    and a link into one, are skipped with a warning; the rest is listed. Root reads any
    folder, so as root the listing runs without the capabilities that let it."""
    import json
    import shutil
    import subprocess
    import sys

    root = tmp_path / "in"
    (root / "open").mkdir(parents=True)
    (root / "locked" / "inner").mkdir(parents=True)
    for name in ("a.mp4", "open/c.mp4", "locked/b.mp4", "locked/inner/d.mp4"):
        (root / name).write_bytes(b"x")
    (root / "link").symlink_to(root / "locked" / "inner")
    cmd = [sys.executable, "-c",
           "import json, sys; from rayvid import storage; "
           "print(json.dumps(sorted(u for page in storage.iter_files(sys.argv[1]) for u, _, _ in page)))",
           str(root)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: every folder is readable")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] + cmd
    (root / "locked").chmod(0)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        (root / "locked").chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == [str(root / "a.mp4"), str(root / "open" / "c.mp4")]
    assert f"skipping {root / 'locked'}: Permission denied" in proc.stderr
    assert f"skipping {root / 'link'}: permission denied" in proc.stderr


def test_file_urls_name_the_files_rfc_8089_says(tmp_path):
    """A file:// URL is percent-encoded (`Path.as_uri()` writes `a%20b%20%C3%A9.mp4`), with
    no host or `localhost`: it names the file as a plain path does; another host is refused."""
    import urllib.parse

    from rayvid.errors import StorageError
    from rayvid.listing import list_videos

    video = tmp_path / "a b é 50%.mp4"
    video.write_bytes(b"x")
    for url in (video.as_uri(), "file://localhost" + urllib.parse.quote(str(video)), f"file://{video}"):
        assert storage.canonical(url) == str(video), url
    assert list_videos(video.as_uri()).column("video_uri").to_pylist() == [str(video)]
    assert storage.canonical("/" + str(video)) == str(video)  # POSIX keeps "//": one name per file here
    assert list_videos(tmp_path.as_uri() + "/").column("video_uri").to_pylist() == [str(video)]
    for url in ("file://nas/share/a.mp4", "file://AKIAFAKE:s3cr%2Fet@nas/share/a.mp4"):
        with pytest.raises(StorageError, match="a file:// URL names a file on this machine .* not on 'nas'") as e:
            storage.resolve(url)
        assert "AKIAFAKE" not in str(e.value) and "s3cr" not in str(e.value)


def test_one_http_object_spelled_two_ways_is_one_name():
    """HTTP(S) URLs are named as they are requested: `a b.mp4` and `a%20b.mp4` (or `café`
    and `caf%C3%A9`, HTTP and http, :80 and none) are one object, one video_uri; a fragment
    is never sent, so it is no part of the name."""
    same = ["http://h.example/v/a b é.mp4", "http://h.example/v/a%20b%20%C3%A9.mp4", "HTTP://H.example:80/v/a b é.mp4",
            "http://h.example/v/a b é.mp4#t=10"]
    assert {storage.stored_uri(u) for u in same} == {"http://h.example/v/a%20b%20%C3%A9.mp4"}
    assert storage.stored_uri("https://h.example/v/a%2Fb.mp4?v=2#x") == "https://h.example/v/a%2Fb.mp4?v=2"
    assert storage.stored_uri("s3://b/a%20b.mp4#x") == "s3://b/a%20b.mp4#x"  # elsewhere, the key's own characters


def test_write_atomic_writes_through_links_into_devices_and_keeps_permissions(tmp_path):
    """`--out` renamed its file over whatever had the name: a symbolic link became a file
    (its target unchanged), a FIFO a file (its reader got nothing; as root, /dev/null
    itself), a mode-600 file came back 644. Now a link's target is written, a name that is
    no regular file is written into, and a file keeps its permissions."""
    import stat
    import threading

    target, link = tmp_path / "real.csv", tmp_path / "link.csv"
    target.write_text("old")
    link.symlink_to(target)
    storage.write_atomic(str(link), lambda f: f.write(b"new"))
    assert link.is_symlink() and target.read_text() == "new"

    private = tmp_path / "private.csv"
    private.write_text("old")
    private.chmod(0o600)
    storage.write_atomic(str(private), lambda f: f.write(b"new"))
    assert private.read_text() == "new" and stat.S_IMODE(private.stat().st_mode) == 0o600

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    storage.write_atomic(str(fifo), lambda f: f.write(b"through the pipe"))
    reader.join(10)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_gcs_read_that_fails_is_not_logged_by_fsspecs_prefetcher(gcs):
    """gcsfs reads through fsspec's BackgroundPrefetcher, which logged each error it raised:
    three records, two tracebacks, per failed read (a GCS outage under a run: ~300 lines of
    stderr, a QA helper found). The error reaches rayvid, which says it once."""
    import logging
    import subprocess
    import sys

    url = "gs://rayvid-test/prefetch/gone.bin"
    storage.write_atomic(url, lambda f: f.write(b"x" * 1000))
    script = ("import logging, sys; logging.basicConfig(level=logging.WARNING, format='%(name)s: %(message)s'); "
              "from rayvid import storage; fs, path = storage.resolve(sys.argv[1]); f = fs.open(path, 'rb'); "
              "fs.rm(path)\n"
              "try:\n    f.read()\nexcept Exception as e:\n    print('raised', type(e).__name__)")
    done = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, timeout=120)
    assert "raised" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "fsspec.prefetcher" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert logging.getLogger("fsspec.prefetcher").filters  # (this process: its first GCS filesystem set it)


def test_s3_listings_read_timestamps_fast_and_the_same(s3_endpoint, s3fs_client, monkeypatch):
    """A listing has the S3 filesystem's botocore session parse S3's ISO 8601 UTC timestamps
    with `datetime.fromisoformat` (botocore's dateutil parse was most of a listing page's
    CPU): each key's LastModified goes through it, and every form reads as botocore reads it
    (the same instant; botocore's error where it has one)."""
    import threading

    import boto3
    from botocore.utils import parse_timestamp

    for i in range(3):
        s3fs_client.pipe_file(f"s3://rayvid-test/stamps/v{i}.mp4", b"x" * (i + 1))
    parsed, fast = [], storage._iso_utc

    def counted(value):  # (moto, serving in this process, parses with botocore's own: not counted)
        parsed.append((threading.current_thread().name, value))
        return fast(value)

    monkeypatch.setattr(storage, "_iso_utc", counted)
    pages = list(storage.iter_files("s3://rayvid-test/stamps/"))
    assert sorted(u for page in pages for u, _, _ in page) == [f"s3://rayvid-test/stamps/v{i}.mp4" for i in range(3)]
    assert len(parsed) == 3 and all(value.endswith("Z") for _, value in parsed), parsed  # one per key
    fs, _ = storage.resolve("s3://rayvid-test/stamps/")
    listed = {o["Key"]: o["LastModified"] for o in fs.call_s3("list_objects_v2", Bucket="rayvid-test", Prefix="stamps/")["Contents"]}
    plain = boto3.client("s3", endpoint_url=s3_endpoint)  # botocore's own parser
    expected = {o["Key"]: o["LastModified"] for o in plain.list_objects_v2(Bucket="rayvid-test", Prefix="stamps/")["Contents"]}
    assert listed == expected and len(parsed) == 6
    for text in ("2026-12-06T09:51:57.000Z", "2026-12-06T09:51:57Z", "2026-12-06T09:51:57.123456Z",
                 "Sun, 06 Dec 2026 09:51:57 GMT", "1796545917", "2026-12-06T09:51:57.1234567Z"):
        assert fast(text) == parse_timestamp(text), text
    for text in ("2026-12-06T09:51:57+01:00Z", "2026-13-06T09:51:57Z"):  # botocore refuses these: so does it
        with pytest.raises(ValueError):
            parse_timestamp(text)
        with pytest.raises(ValueError):
            fast(text)


@pytest.mark.parametrize("value", ["abc", "0", "2.5"])
def test_a_bad_s3_attempts_setting_is_said_naming_it(monkeypatch, value):
    """RAYVID_S3_MAX_ATTEMPTS=abc said "invalid literal for int() with base 10", naming no
    setting (a QA find)."""
    from rayvid.errors import StorageError

    monkeypatch.setenv("RAYVID_S3_MAX_ATTEMPTS", value)
    with pytest.raises(StorageError, match=f"RAYVID_S3_MAX_ATTEMPTS must be a whole number >= 1, got '{value}'"):
        storage.resolve("s3://bucket/key")


def test_a_store_that_only_reads_is_said_read_only(tmp_path, capsys):
    """An http(s):// OUTPUT or destination: fsspec's HTTP filesystem raised
    NotImplementedError, a traceback and exit 1, after the listing and Ray's start-up for
    `run` (a QA find). A run refuses it first; a verb writing there says it cannot."""
    from rayvid import cli

    with pytest.raises(PermissionError, match="http:// is read-only: it cannot be written"):
        storage.write_atomic("http://127.0.0.1:9/x.csv", lambda f: f.write(b"x"))
    assert storage.read_only("https://host/out") and not storage.read_only(str(tmp_path))
    (tmp_path / "in").mkdir()
    assert cli.main(["run", str(tmp_path / "in"), "http://127.0.0.1:9/out"]) == 2
    assert capsys.readouterr().err == ("rayvid: error: cannot write OUTPUT http://127.0.0.1:9/out: an http(s):// URL "
                                       "is read-only; give a local folder or an object store's (s3://, gs://)\n")


def test_a_folder_on_s3_named_as_a_video_is_said_a_folder(s3fs_client, tmp_path):
    """A manifest naming an S3 prefix (`s3://b/in/sub/`): s3fs says it is a directory of 0
    bytes, and the copy was "empty file (0 bytes)"; it is a folder, as a local one is."""
    s3fs_client.pipe("s3://rayvid-test/afolder/x.mp4", b"x")
    with pytest.raises(IsADirectoryError, match="a folder, not a video file"):
        with storage.local_copy("s3://rayvid-test/afolder/", str(tmp_path)):
            pass


def test_an_object_not_found_on_s3_is_named_by_its_url(s3fs_client, tmp_path):
    """s3fs names a missing object by bucket and key alone: error rows said `not found:
    bucket/key` (HTTP's said the URL; a QA find); the URL, with its scheme."""
    for version, size in (("", -1), ('"0123456789abcdef0123456789abcdef"', 10)):  # (metadata first; conditional)
        with pytest.raises(FileNotFoundError) as e:
            with storage.local_copy("s3://rayvid-test/no/such.mp4", str(tmp_path), version, size):
                pass
        assert storage.describe(e.value) == "not found: s3://rayvid-test/no/such.mp4"
        with pytest.raises(FileNotFoundError) as e:  # (a partial copy's: segments, sparse sampling)
            with storage.range_copy("s3://rayvid-test/no/such.mp4", str(tmp_path), version, size) as part:
                part.fetch(0, 10)
        assert storage.describe(e.value) == "not found: s3://rayvid-test/no/such.mp4"


def test_a_body_cut_short_is_read_again_and_one_cut_every_time_fails_the_video(tmp_path):
    """A connection dropped mid-body (aiohttp's ClientPayloadError) failed the video for
    good, an error row reruns skip (a QA find): the read is tried again. A server that cuts
    every answer (a Content-Length that overstates its file) still fails that video, as the
    video's error, not the store's: a run does not stop on it for ever."""
    from helpers import http_server

    (tmp_path / "www").mkdir()
    body = bytes(range(256)) * 64
    (tmp_path / "www" / "v.mp4").write_bytes(body)
    with http_server(str(tmp_path / "www"), "cut-first") as base:
        with storage.local_copy(f"{base}/v.mp4", str(tmp_path)) as local:
            assert open(local, "rb").read() == body
    with http_server(str(tmp_path / "www"), "cut-always") as base:
        with pytest.raises(Exception) as e:
            with storage.local_copy(f"{base}/v.mp4", str(tmp_path)):
                pass
        assert storage._cut_short(e.value) and not storage.is_unavailable(e.value)
