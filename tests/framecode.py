"""The frame-exact harness: frames that carry their own index, and a model that reads it.

Each frame is a grid of ROWS x COLS large black/white blocks, the frame index in binary
(most significant bit first, row by row). Lossy codecs, scaling, chroma subsampling and
rotation keep blocks that large readable. `build_reader` makes a tiny tf.keras model with
fixed weights (no training) that averages each block, thresholds it and scores every
possible index: its top-1 label is the index it read, as a string. Running the job with it
must give `label == str(frame_index)` for every frame.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np

ROWS, COLS = 3, 4
BITS = ROWS * COLS  # indices 0 .. 4095
SIZE = (48, 64)  # the reader's input (height, width): 16 x 16 pixel blocks


def code_frame(index: int, height: int, width: int) -> np.ndarray:
    """An upright RGB frame showing `index` (grid covers the whole frame)."""
    bits = [(index >> (BITS - 1 - b)) & 1 for b in range(BITS)]
    img = np.zeros((height, width, 3), np.uint8)
    ys = np.linspace(0, height, ROWS + 1).round().astype(int)
    xs = np.linspace(0, width, COLS + 1).round().astype(int)
    for b, bit in enumerate(bits):
        r, c = divmod(b, COLS)
        if bit:
            img[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = 255
    return img


def read_code(frame: np.ndarray) -> int:
    """The index a frame shows, read with numpy (a reference for the model)."""
    h, w = frame.shape[:2]
    ys = np.linspace(0, h, ROWS + 1).round().astype(int)
    xs = np.linspace(0, w, COLS + 1).round().astype(int)
    value = 0
    for b in range(BITS):
        r, c = divmod(b, COLS)
        block = frame[ys[r] : ys[r + 1], xs[c] : xs[c + 1]]
        # the centre half of the block: robust to blur across block edges
        bh, bw = block.shape[:2]
        centre = block[bh // 4 : bh - bh // 4, bw // 4 : bw - bw // 4]
        value = (value << 1) | int(centre.mean() > 127.5)
    return value


def build_reader(path: str) -> None:
    """Save the fixed-weight reader model as a .keras file (safe to load: no Lambda)."""
    import keras

    h, w = SIZE
    bh, bw = h // ROWS, w // COLS
    inp = keras.Input((h, w, 3), name="frame")
    gray = keras.layers.Conv2D(1, 1, use_bias=False, name="gray")(inp)
    # average the centre of each block: crop a quarter border of each block by a strided
    # conv whose kernel weights the block's centre only
    kernel = np.zeros((bh, bw, 1, 1), np.float32)
    kernel[bh // 4 : bh - bh // 4, bw // 4 : bw - bw // 4] = 1.0
    kernel /= kernel.sum()
    blocks = keras.layers.Conv2D(1, (bh, bw), strides=(bh, bw), use_bias=False, name="blocks")(gray)
    flat = keras.layers.Flatten()(blocks)  # ROWS*COLS values, row-major: bit order
    bits = keras.layers.Dense(BITS, activation="sigmoid", name="threshold")(flat)
    logits = keras.layers.Dense(2**BITS, name="decode")(bits)
    out = keras.layers.Activation("softmax", name="softmax")(logits)
    model = keras.Model(inp, out, name="framecode")

    model.get_layer("gray").set_weights([np.full((1, 1, 3, 1), 1 / 3, np.float32)])
    model.get_layer("blocks").set_weights([kernel])
    model.get_layer("threshold").set_weights(
        [np.eye(BITS, dtype=np.float32) * 0.2, np.full(BITS, -127.5 * 0.2, np.float32)]
    )
    codes = np.array([[(i >> (BITS - 1 - b)) & 1 for i in range(2**BITS)] for b in range(BITS)], np.float32)
    model.get_layer("decode").set_weights([(2 * codes - 1) * 8.0, np.zeros(2**BITS, np.float32)])
    model.save(path)
    with open(path[: -len(".keras")] + ".labels.txt", "w") as f:
        f.write("\n".join(str(i) for i in range(2**BITS)) + "\n")


X264 = ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]

# name -> (frames, (height, width), encoder args, extra); extra: fps, vf, audio, turns
MATRIX = {
    "h264.mp4": (40, (96, 128), X264 + ["-g", "10"], {}),
    "h264_10bit.mkv": (40, (96, 128), ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p10le"], {}),
    "hevc_opengop.mp4": (60, (96, 128), ["-c:v", "libx265", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                                         "-x265-params", "log-level=error:keyint=20:open-gop=1"], {}),
    "vp9.webm": (40, (96, 128), ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "1M"], {}),
    "av1.mkv": (30, (96, 128), ["-c:v", "libaom-av1", "-cpu-used", "8", "-b:v", "1M", "-g", "15"], {}),
    "mpeg4.avi": (40, (96, 128), ["-c:v", "mpeg4", "-q:v", "3"], {}),
    "mjpeg.mov": (30, (96, 128), ["-c:v", "mjpeg", "-q:v", "3"], {}),
    "prores.mov": (20, (96, 128), ["-c:v", "prores_ks", "-profile:v", "0"], {}),
    "odd_444.mkv": (20, (121, 161), ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv444p"], {}),
    "one_frame.mp4": (1, (96, 128), X264, {}),
    "with_audio.mp4": (40, (96, 128), X264 + ["-c:a", "aac"], {"audio": True}),
    "vfr.mkv": (50, (96, 128), X264 + ["-fps_mode", "passthrough"],
                {"vf": "setpts='if(lt(N,30),N/30,1+(N-30)/10)/TB'"}),
    "rotated_90.mp4": (20, (96, 128), X264, {"turns": 1}),
    "rotated_180.mp4": (20, (96, 128), X264, {"turns": 2}),
    "rotated_270.mp4": (20, (96, 128), X264, {"turns": 3}),
    "rotated_90.mkv": (20, (96, 128), X264, {"turns": 1}),  # (decord turns MP4/MOV frames only)
    # x264's intra refresh: one IDR, then P pictures with recovery points, flagged key frames
    "intra_refresh.mp4": (60, (96, 128), ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                                          "-x264-params", "intra-refresh=1:keyint=20"], {}),
    # a jittery clock the muxer rounds: frames 2 and 3 (and 7, 8...) share a timestamp
    "same_pts.mp4": (40, (96, 128), X264 + ["-fps_mode", "passthrough", "-bf", "2"],
                     {"vf": "setpts='(N/30+0.011*mod(N*7,5))/TB'"}),
    "h264_bframes.ts": (40, (96, 128), X264 + ["-g", "10", "-bf", "3"], {}),
    "mpeg2.mpg": (40, (96, 128), ["-c:v", "mpeg2video", "-q:v", "3", "-g", "10", "-bf", "2"], {}),
    # decode times only: frames known by their order (video.DECODE_TIME_CONTAINERS)
    "h264_bframes.avi": (40, (96, 128), X264 + ["-g", "12", "-bf", "3"], {}),
    "h264_bframes.wmv": (40, (96, 128), X264 + ["-g", "12", "-bf", "3"], {}),
}
# The `codec` column (the codec's name, not its decoder's: av1, not libdav1d); else h264.
CODEC = {"hevc_opengop.mp4": "hevc", "vp9.webm": "vp9", "av1.mkv": "av1", "mpeg4.avi": "mpeg4", "mjpeg.mov": "mjpeg",
         "prores.mov": "prores", "mpeg2.mpg": "mpeg2video"}
# What `auto` picks (see video.DECORD_CODECS).
EXPECTED_DECODER = {"vp9.webm": "pyav", "av1.mkv": "pyav", "h264_bframes.ts": "pyav", "rotated_90.mkv": "pyav",
                    "same_pts.mp4": "pyav"}


def write_code_video(path: str, n: int, size, args, fps: int = 30, vf=None, audio=False, turns=0) -> None:
    """Encode frames 0..n-1 with their codes. With `turns`, the stored pixels are rotated
    the other way and the container says to rotate them back for display: correct output
    is upright."""
    from rayvid import samples

    h, w = size
    stored = path if not turns else path + ".norot.mp4"
    cmd = [samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}" if turns % 2 == 0 else f"{h}x{w}", "-r", str(fps), "-i", "-"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={n / fps:.3f}"]
    if vf:
        cmd += ["-vf", vf]
    proc = subprocess.Popen(cmd + args + [stored], stdin=subprocess.PIPE)
    for i in range(n):
        img = np.rot90(code_frame(i, h, w), k=-turns)
        proc.stdin.write(np.ascontiguousarray(img).tobytes())
    proc.stdin.close()
    assert proc.wait() == 0, path
    if turns:
        subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation", str(90 * turns),
                        "-i", stored, "-c", "copy", path], check=True)
        os.remove(stored)


def make_matrix(directory: str) -> dict:
    """Write every MATRIX video into `directory`; returns name -> (path, frames)."""
    out = {}
    for name, (n, size, args, extra) in MATRIX.items():
        path = os.path.join(directory, name)
        write_code_video(path, n, size, args, **extra)
        out[name] = (path, n)
    return out


TRIMMED = {  # name -> (source, how): videos whose container holds packets no player shows
    "trim_mid_gop.mp4": ("closed", ["-ss", "0.5", "-t", "1"]),  # an MP4 edit list starting inside a GOP
    "trim_bframes.mp4": ("bframes", ["-ss", "1.1", "-t", "1.5"]),  # the same with B-frames
    "trim_bframes.mov": ("bframes", ["-ss", "0.5"]),
    "capture_mid_gop.ts": ("bframes", None),  # a transport stream cut at a packet a third of the way in
}
JOINED = "joined_capture.ts"  # two transport streams end to end, the clock restarting at the second


def make_trimmed(directory: str) -> dict:
    """Write every TRIMMED video into `directory` (cut by stream copy from 90-frame code
    videos, GOP 30, as `ffmpeg -ss T -i IN -c copy OUT` and captures make them); returns
    name -> path."""
    from rayvid import samples

    d = lambda name: os.path.join(directory, name)  # noqa: E731
    write_code_video(d("closed.mp4"), 90, (96, 128), X264 + ["-bf", "0", "-g", "30", "-x264-params", "scenecut=0"])
    write_code_video(d("bframes.mp4"), 90, (96, 128), X264 + ["-bf", "3", "-g", "30"])
    subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error", "-i", d("bframes.mp4"), "-c", "copy",
                    d("bframes.ts")], check=True)
    out = {}
    for name, (source, cut) in TRIMMED.items():
        out[name] = d(name)
        if cut is None:
            data = open(d(source + ".ts"), "rb").read()
            with open(out[name], "wb") as f:
                f.write(data[len(data) // 3 // 188 * 188:])
        else:
            subprocess.run([samples.ffmpeg_exe(), "-y", "-loglevel", "error", *cut[:2], "-i", d(source + ".mp4"),
                            *cut[2:], "-c", "copy", out[name]], check=True)
    ff = [samples.ffmpeg_exe(), "-y", "-loglevel", "error"]
    subprocess.run(ff + ["-i", d("bframes.mp4"), "-t", "1.5", "-c", "copy", "-output_ts_offset", "10", d("a.ts")],
                   check=True)
    subprocess.run(ff + ["-ss", "1", "-i", d("bframes.mp4"), "-c", "copy", d("b.ts")], check=True)
    out[JOINED] = d(JOINED)
    with open(out[JOINED], "wb") as f:
        f.write(open(d("a.ts"), "rb").read() + open(d("b.ts"), "rb").read())
    for name in ("closed.mp4", "bframes.mp4", "bframes.ts", "a.ts", "b.ts"):
        os.remove(d(name))
    return out


def shown(path: str) -> list:
    """What a player shows of `path`: (time from the stream's start, code, key frame) of
    each frame FFmpeg decodes, in presentation order."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        start, tb = s.start_time or 0, s.time_base
        frames = sorted((f.pts, read_code(f.to_ndarray(format="rgb24")), bool(f.key_frame)) for f in c.decode(s))
    return [((p - start) * tb.numerator / tb.denominator, code, key) for p, code, key in frames]


DAMAGED_FRAMES = 120  # each damaged file is cut from a 120-frame H.264 code video, GOP 30


def make_damaged(directory: str) -> dict:
    """Bad inputs, each made from a known-good code video: name -> path."""
    from rayvid import samples

    ff = samples.ffmpeg_exe()
    d = lambda name: os.path.join(directory, name)  # noqa: E731
    write_code_video(d("good.mp4"), DAMAGED_FRAMES, (96, 128), ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "30"])
    subprocess.run([ff, "-y", "-loglevel", "error", "-i", d("good.mp4"), "-c", "copy", "-movflags", "+faststart",
                    d("good_faststart.mp4")], check=True)
    out = {}
    plain = open(d("good.mp4"), "rb").read()  # ffmpeg's default: media data first, index (moov) last
    assert plain.find(b"moov") > plain.find(b"mdat")
    fast = bytearray(open(d("good_faststart.mp4"), "rb").read())
    assert fast.find(b"moov") < fast.find(b"mdat")
    out["truncated_moov_at_end.mp4"] = plain[: len(plain) * 6 // 10]
    out["truncated_faststart.mp4"] = bytes(fast[: len(fast) * 6 // 10])
    mdat = fast.find(b"mdat")
    at = mdat + (len(fast) - mdat) // 2
    stss = fast.find(b"stss") - 4  # the key frames' table: size, "stss", version+flags, count, numbers
    count = int.from_bytes(fast[stss + 12: stss + 16], "big")
    numbers = [int.from_bytes(fast[stss + 16 + 4 * k: stss + 20 + 4 * k], "big") for k in range(count)]
    reordered = bytearray(fast)
    reordered[stss + 16: stss + 16 + 4 * count] = b"".join(n.to_bytes(4, "big") for n in numbers[::-1])
    out["key_frame_index_reversed.mp4"] = bytes(reordered)  # demuxes, but FFmpeg cannot seek in it
    fast[at: at + 200] = bytes((i * 7919) % 251 for i in range(200))  # deterministic garbage
    out["garbage_in_middle.mp4"] = bytes(fast)
    write_code_video(d("mpeg4.avi"), 30, (96, 128), ["-c:v", "mpeg4", "-vtag", "FMP4"])
    avi = open(d("mpeg4.avi"), "rb").read()
    out["unsupported_codec.avi"] = avi.replace(b"FMP4", b"ZQ9X")  # a FourCC no decoder knows
    for name in ("good.mp4", "good_faststart.mp4", "mpeg4.avi"):
        os.remove(d(name))
    paths = {}
    for name, data in out.items():
        paths[name] = d(name)
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


FRAGMENTED = {  # name -> ffmpeg muxer args: fragmented MP4 as muxers write it (each file 20 s, 15 fps)
    "frag_table.mp4": ["-movflags", "+frag_keyframe+empty_moov"],  # a fragment per key frame, an mfra table
    "frag_no_table.mp4": ["-movflags", "+frag_keyframe+empty_moov+skip_trailer"],  # no mfra: walked
    "frag_short.mp4": ["-frag_duration", "700000", "-movflags", "+empty_moov"],  # fragments without key frames
    "frag_sidx.mp4": ["-f", "mp4", "-movflags", "+dash+skip_trailer"],  # one sidx for all (`_one_sidx`)
}


def make_fragmented(directory: str) -> dict:
    """Write every FRAGMENTED video (300 frames, 96x128) into `directory`; returns name -> path."""
    out = {}
    for name, mux in FRAGMENTED.items():
        path = os.path.join(directory, name)
        write_code_video(path, 300, (96, 128), X264 + ["-g", "45", "-bf", "3"] + mux, fps=15,
                         vf="noise=alls=20:allf=t+u")  # frames of KBs, not bytes: the index is small
        if name == "frag_sidx.mp4":
            _one_sidx(path)
        out[name] = path
    return out


def _one_sidx(path: str) -> None:
    """Rewrites FFmpeg's DASH output (a sidx before each fragment, moofs whose data offsets
    count from themselves) into the DASH on-demand layout: one sidx after the moov listing
    every fragment (the `global_sidx` files of the FFmpeg here do not decode)."""
    import struct

    boxes = top_boxes(path)
    head = b"".join(box for kind, box in boxes if kind in (b"ftyp", b"moov"))
    sidxs = [box for kind, box in boxes if kind == b"sidx"]  # one reference each
    moofs = [box for kind, box in boxes if kind == b"moof"]
    mdats = [box for kind, box in boxes if kind == b"mdat"]
    assert len(sidxs) == len(moofs) == len(mdats) > 1
    wide = 8 if sidxs[0][8] == 1 else 4  # version 1: 64-bit time and offset
    ref = 24 + 2 * wide  # the first reference: size, duration, SAP
    refs = b"".join(struct.pack(">I", len(moof) + len(mdat)) + sidx[ref + 4 : ref + 12]
                    for sidx, moof, mdat in zip(sidxs, moofs, mdats))
    body = (sidxs[0][8 : 20 + wide]  # version, flags, reference id, timescale, earliest time
            + bytes(wide) + struct.pack(">HH", 0, len(moofs)) + refs)  # first offset 0: right after it
    sidx = struct.pack(">I4s", 8 + len(body), b"sidx") + body
    with open(path, "wb") as f:
        f.write(head + sidx + b"".join(moof + mdat for moof, mdat in zip(moofs, mdats)))


def top_boxes(path: str) -> list[tuple[bytes, bytes]]:
    """The top-level boxes of an MP4 file: (kind, the whole box)."""
    data, at, boxes = open(path, "rb").read(), 0, []
    while at < len(data):
        n = int.from_bytes(data[at : at + 4], "big")
        boxes.append((data[at + 4 : at + 8], data[at : at + n]))
        at += n
    return boxes


def latin1_metadata(src: str, dst: str) -> None:
    """`src` (an MP4 made by ffmpeg) with a Latin-1 byte (é) in its metadata: the moov's
    encoder tag and its video track's handler name, as older cameras and tools write
    them. The media is untouched; the tags are not UTF-8."""
    data = bytearray(open(src, "rb").read())
    for tag in (b"Lavf", b"VideoHandler"):
        at = data.find(tag)
        assert at > 0, tag
        data[at + 1] = 0xE9
    with open(dst, "wb") as f:
        f.write(bytes(data))
