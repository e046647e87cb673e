"""Labelled synthetic videos and the small classifier trained on them (`make run` offline).

Each video is a sequence of scenes (about 1.5 s each) showing one class: a moving circle,
square or triangle, stripes, a checkerboard, or a blank background, in random colours.
The class of every frame is known, so the sample run can be checked, and the classifier
(`model/shapes.keras` + `model/shapes.labels.txt`, a few-hundred-KB CNN trained here in
seconds, deterministically) is a real model with real predictions, loaded through the same
`--model URL` path as any user model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import zipfile
from typing import Iterable, Optional

import numpy as np

from rayvid.errors import ConfigError

CLASSES = ("blank", "checker", "circle", "square", "stripes", "triangle")
MODEL_SIZE = 64
VIDEO_SIZE = (120, 160)  # (height, width)
FPS = 15


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def render(cls: str, rng: np.random.Generator, size=VIDEO_SIZE, phase: float = 0.0) -> np.ndarray:
    """One RGB frame of a class. `phase` (0..1) moves the content within a scene."""
    h, w = size
    bg = rng.integers(0, 90, 3)
    fg = rng.integers(150, 256, 3)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg
    yy, xx = np.mgrid[0:h, 0:w]
    r = rng.uniform(0.18, 0.32) * min(h, w)
    cy = rng.uniform(r, h - r)
    cx = r + (w - 2 * r) * ((rng.uniform(0, 1) + 0.3 * phase) % 1.0)
    if cls == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif cls == "square":
        mask = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    elif cls == "triangle":
        top, base = cy - r, cy + r
        half = (yy - top) / (2 * r) * r
        mask = (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)
    elif cls == "stripes":
        period = rng.integers(8, 16)
        mask = ((xx + int(phase * period * 4)) // (period // 2)) % 2 == 0
    elif cls == "checker":
        cell = rng.integers(8, 16)
        mask = ((yy // cell) + (xx + int(phase * cell * 4)) // cell) % 2 == 0
    elif cls == "blank":
        mask = np.zeros((h, w), bool)
    else:
        raise ValueError(f"unknown class {cls!r}")
    img[mask] = fg
    return img


def scene_labels(n_frames: int, seed: int, fps: int = FPS) -> list[str]:
    """The class of each frame: scenes of about 1.5 s, classes in a seeded order."""
    rng = np.random.default_rng(seed)
    labels: list[str] = []
    while len(labels) < n_frames:
        cls = CLASSES[int(rng.integers(len(CLASSES)))]
        labels += [cls] * int(fps * rng.uniform(1.0, 2.0))
    return labels[:n_frames]


def scene_frames(labels: list[str], seed: int, size=VIDEO_SIZE) -> Iterable[np.ndarray]:
    """Frames for per-frame labels; a scene keeps its colours and moves smoothly."""
    start = 0
    while start < len(labels):
        end = start
        while end < len(labels) and labels[end] == labels[start]:
            end += 1
        for i in range(start, end):
            rng = np.random.default_rng([seed, start])  # same draw for the whole scene
            yield render(labels[start], rng, size, phase=(i - start) / max(1, end - start))
        start = end


def still_frames(labels: list[str], seed: int, size=VIDEO_SIZE, noise: float = 3.0,
                 moving_every: int = 3) -> Iterable[np.ndarray]:
    """Static-camera footage: within a scene the content stands still and only sensor noise
    (Gaussian, `noise` grey levels) changes, except every `moving_every`-th scene, which
    moves as in `scene_frames`. For content-adaptive frame skipping (--skip-similar)."""
    noise_rng = np.random.default_rng([seed, 1])
    start, scene = 0, 0
    while start < len(labels):
        end = start
        while end < len(labels) and labels[end] == labels[start]:
            end += 1
        moving = moving_every and scene % moving_every == moving_every - 1
        for i in range(start, end):
            rng = np.random.default_rng([seed, start])
            phase = (i - start) / max(1, end - start) if moving else 0.0
            img = render(labels[start], rng, size, phase=phase).astype(np.float32)
            img += noise_rng.normal(0.0, noise, img.shape)
            yield np.clip(np.round(img), 0, 255).astype(np.uint8)
        start, scene = end, scene + 1


def make_still_video(path: str, seconds: float, seed: int, fps: int = FPS, size=VIDEO_SIZE) -> list[str]:
    labels = scene_labels(int(round(seconds * fps)), seed, fps)
    write_video(path, still_frames(labels, seed, size), fps, size)
    return labels


def write_video(path: str, frames: Iterable[np.ndarray], fps: float, size, codec_args: Optional[list] = None) -> None:
    """Encode RGB frames with the ffmpeg binary of the imageio-ffmpeg wheel."""
    h, w = size
    args = codec_args or ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p"]
    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", *args, path]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for f in frames:
            proc.stdin.write(np.ascontiguousarray(f, dtype=np.uint8).tobytes())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        raise OSError(f"ffmpeg failed writing {path}: {err.strip()}")  # (a full disk, a read-only folder)


def make_video(path: str, seconds: float, seed: int, fps: int = FPS, size=VIDEO_SIZE) -> list[str]:
    labels = scene_labels(int(round(seconds * fps)), seed, fps)
    write_video(path, scene_frames(labels, seed, size), fps, size)
    return labels


def training_set(n_per_class: int, seed: int, size: int = MODEL_SIZE):
    """Frames rendered at video size and stretched to model size, as the decoder does."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k, cls in enumerate(CLASSES):
        for _ in range(n_per_class):
            xs.append(render(cls, rng, VIDEO_SIZE, phase=float(rng.uniform())))
            ys.append(k)
    x = tf.image.resize(np.stack(xs), (size, size), method="bicubic")
    x = np.clip(np.round(x.numpy()), 0, 255).astype(np.uint8)
    return x, np.array(ys, np.int32)


def train_model(out_dir: str, seed: int = 0, epochs: int = 5) -> dict:
    """Train the sample classifier; writes shapes.keras and shapes.labels.txt."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    x, y = training_set(250, seed)
    xv, yv = training_set(60, seed + 1)
    inp = keras.Input((MODEL_SIZE, MODEL_SIZE, 3), name="frame")
    z = keras.layers.Rescaling(1 / 255.0, name="rescaling")(inp)  # (named: not rescaling_N after others built)
    for filters in (16, 32, 48):
        z = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(z)
        z = keras.layers.MaxPooling2D()(z)
    z = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(z)
    z = keras.layers.GlobalMaxPooling2D()(z)
    out = keras.layers.Dense(len(CLASSES), activation="softmax", name="classes")(z)
    model = keras.Model(inp, out, name="shapes")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x.astype("float32"), y, epochs=epochs, batch_size=64, shuffle=True, verbose=0)
    _, acc = model.evaluate(xv.astype("float32"), yv, verbose=0)
    return {"model": _save(model, out_dir, "shapes", CLASSES), "validation_accuracy": round(float(acc), 4)}


def ensure_samples(root: str, n_videos: int = 6, seconds: float = 4.0, force: bool = False) -> dict:
    """Create `root/videos/*.mp4`, `root/truth.json` and `root/model/` unless present: the
    videos again where those present are not `n_videos` of `seconds` (a sample video of
    another run of `samples` left in videos/ is deleted: the job would list it)."""
    if not 1 <= n_videos <= MAX_VIDEOS:
        raise ConfigError(f"--videos must be 1 to {MAX_VIDEOS}, got {n_videos}")
    if not 1 / FPS <= seconds <= MAX_SECONDS:
        raise ConfigError(f"--seconds must be {1 / FPS:g} (one frame) to {MAX_SECONDS:g}, got {seconds:g}")
    videos = os.path.join(root, "videos")
    model_dir = os.path.join(root, "model")
    truth_path = os.path.join(root, "truth.json")
    os.makedirs(videos, exist_ok=True)
    paths = [os.path.abspath(os.path.join(videos, f"sample_{i:02d}.mp4")) for i in range(n_videos)]  # as video_uri
    if force or _truth(truth_path, videos) != {os.path.basename(p): int(round(seconds * FPS)) for p in paths}:
        # truth.json goes first and comes back last: one interrupted meanwhile (Ctrl-C) leaves
        # none, so the next `samples` makes them again (it kept a video cut short, its truth
        # the old one's); each video is written under a temporary name, then renamed
        with contextlib.suppress(FileNotFoundError):
            os.remove(truth_path)
        for name in os.listdir(videos):
            if re.fullmatch(r"sample_\d+\.mp4|\.sample_\d+\.mp4\.tmp\.mp4", name):  # (and an interrupted one's)
                os.remove(os.path.join(videos, name))
        truth = {}
        for i, path in enumerate(paths):
            tmp = os.path.join(videos, f".{os.path.basename(path)}.tmp.mp4")
            truth[path] = make_video(tmp, seconds, seed=100 + i)
            os.replace(tmp, path)
        with open(truth_path + ".tmp", "w") as f:
            json.dump(truth, f)
        os.replace(truth_path + ".tmp", truth_path)
    info = {"videos": videos, "truth": truth_path}
    model_path = os.path.join(model_dir, "shapes.keras")
    if force or not _model_saved(model_dir, "shapes"):
        info.update(train_model(model_dir))
    info["model"] = model_path
    return info


MAX_VIDEOS, MAX_SECONDS = 1000, 3600.0  # (1 h of 160x120 video: about 200 MB a video)


def _model_saved(out_dir: str, name: str) -> bool:
    """Whether `_save` finished: the labels file is written after the model, and the model
    file is whole (a zip archive: one cut short by a Ctrl-C was taken as present)."""
    path = os.path.join(out_dir, f"{name}.keras")
    if not (os.path.exists(path) and os.path.exists(os.path.join(out_dir, f"{name}.labels.txt"))):
        return False
    return zipfile.is_zipfile(path)


def _truth(path: str, videos: str) -> Optional[dict]:
    """{video file name: frames} of a truth.json's videos that are in `videos` (by name: the
    same folder may be spelled another way, `samples` or `./samples/`), else None."""
    try:
        with open(path) as f:
            truth = json.load(f)
        if not isinstance(truth, dict):
            return None
        return {os.path.basename(p): len(labels) for p, labels in truth.items()
                if os.path.exists(os.path.join(videos, os.path.basename(p)))}
    except (OSError, ValueError, TypeError):
        return None


# --- detection: moving shapes with known boxes, and a small grid detector ----------------

DET_CLASSES = ("circle", "square", "triangle")
DET_SIZE = 64  # the detector's input (frames are stretched to it, as the decoder does)
DET_GRID = 8  # output cells per side (stride 8)


def _draw(img: np.ndarray, cls: str, cx: float, cy: float, r: float, colour) -> tuple:
    """Draw one shape; returns its box (x_min, y_min, x_max, y_max) in pixels."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    if cls == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif cls == "square":
        mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    else:  # triangle, apex up
        mask = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
    img[mask] = colour
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def detection_scene(rng: np.random.Generator, size=VIDEO_SIZE):
    """1-3 objects, each in its own vertical lane (they never overlap), moving up or down
    and bouncing: returns frame(t) -> (image, [(class, box)])."""
    h, w = size
    n = int(rng.integers(1, 4))
    lane = w / n
    bg = rng.integers(0, 80, 3)
    objs = []
    for k in range(n):
        r = float(rng.uniform(9, min(18, lane / 2 - 3)))
        objs.append(dict(cls=DET_CLASSES[int(rng.integers(len(DET_CLASSES)))], r=r,
                         cx=float(k * lane + rng.uniform(r + 1, lane - r - 1)),
                         cy=float(rng.uniform(r + 1, h - r - 1)), v=float(rng.uniform(-3, 3)),
                         colour=rng.integers(140, 256, 3)))

    def frame(t: int):
        img = np.empty((h, w, 3), np.uint8)
        img[:] = bg
        found = []
        for o in objs:
            lo, hi = o["r"] + 1, h - o["r"] - 1
            span = hi - lo
            pos = (o["cy"] - lo + o["v"] * t) % (2 * span)  # bounce between lo and hi
            cy = lo + (pos if pos <= span else 2 * span - pos)
            found.append((o["cls"], _draw(img, o["cls"], o["cx"], cy, o["r"], o["colour"])))
        return img, found

    return frame


def make_detection_video(path: str, seconds: float, seed: int, fps: int = FPS, size=VIDEO_SIZE) -> list:
    """A video of moving shapes, a new scene every second; returns each frame's
    [(class, (x_min, y_min, x_max, y_max))] in pixels."""
    rng = np.random.default_rng(seed)
    frames, truth = [], []
    scene = None
    for i in range(int(round(seconds * fps))):
        if i % fps == 0:
            scene = detection_scene(rng, size)
        img, boxes = scene(i % fps)
        frames.append(img)
        truth.append(boxes)
    write_video(path, frames, fps, size)
    return truth


def detection_targets(boxes: list, size=VIDEO_SIZE) -> np.ndarray:
    """The [S, S, 5 + C] training target of one frame (models.detection_classes)."""
    h, w = size
    t = np.zeros((DET_GRID, DET_GRID, 5 + len(DET_CLASSES)), np.float32)
    for cls, (x0, y0, x1, y1) in boxes:
        cx, cy = (x0 + x1) / 2 / w * DET_GRID, (y0 + y1) / 2 / h * DET_GRID
        i, j = min(int(cy), DET_GRID - 1), min(int(cx), DET_GRID - 1)
        t[i, j, :5] = (1.0, cx - j, cy - i, (x1 - x0) / w, (y1 - y0) / h)
        t[i, j, 5 + DET_CLASSES.index(cls)] = 1.0
    return t


def detection_loss(y_true, raw):
    """Objectness (BCE, positives weighted up), box (squared error after the sigmoid) and
    class (cross-entropy) terms of the grid detector, per image."""
    import keras
    from keras import ops

    obj = y_true[..., 0]
    bce = keras.losses.binary_crossentropy(obj[..., None], raw[..., :1], from_logits=True)
    box = ops.sum(ops.square(ops.sigmoid(raw[..., 1:5]) - y_true[..., 1:5]), axis=-1)
    cls = keras.losses.categorical_crossentropy(y_true[..., 5:], raw[..., 5:], from_logits=True)
    per_cell = (1.0 + 4.0 * obj) * bce + obj * (10.0 * box + cls)
    return ops.sum(per_cell, axis=(1, 2))


def train_detector(out_dir: str, seed: int = 0, n_images: int = 2000, epochs: int = 12) -> dict:
    """Train the sample grid detector on generated frames; writes detector.keras and
    detector.labels.txt (run it with `--head detect`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    while len(xs) < n_images:
        scene = detection_scene(rng)
        for t in rng.integers(0, 60, 4):
            img, boxes = scene(int(t))
            xs.append(img)
            ys.append(detection_targets(boxes))
    x = tf.image.resize(np.stack(xs), (DET_SIZE, DET_SIZE), method="bicubic")
    x = np.clip(np.round(x.numpy()), 0, 255).astype(np.float32)
    inp = keras.Input((DET_SIZE, DET_SIZE, 3), name="frame")
    z = keras.layers.Rescaling(1 / 255.0, name="rescaling")(inp)  # (named: not rescaling_N after others built)
    for filters in (16, 32, 64):  # three stride-2 convolutions: 64 px -> an 8x8 grid
        z = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(z)
    z = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(z)
    z = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(z)
    out = keras.layers.Conv2D(5 + len(DET_CLASSES), 1, name="grid")(z)
    model = keras.Model(inp, out, name="shapes_detector")
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=detection_loss)
    history = model.fit(x, np.stack(ys), epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    path = _save(model, out_dir, "detector", DET_CLASSES)
    return {"model": path, "final_loss": round(float(history.history["loss"][-1]), 4)}


# --- clips: a small video model that tells moving content from still -----------------

CLIP_CLASSES = ("still", "moving")
CLIP_LEN = 4


def still_motion(labels: list[str], moving_every: int = 3) -> list[str]:
    """Per frame of `still_frames(labels, ...)`: "moving" where the content moves (every
    `moving_every`-th scene, unless blank: nothing there to move), else "still"."""
    out, start, scene = [], 0, 0
    while start < len(labels):
        end = start
        while end < len(labels) and labels[end] == labels[start]:
            end += 1
        moving = scene % moving_every == moving_every - 1 and labels[start] != "blank"
        out += [CLIP_CLASSES[int(moving)]] * (end - start)
        start, scene = end, scene + 1
    return out


def train_clip_model(out_dir: str, seed: int = 0, seconds: float = 80.0, epochs: int = 10) -> dict:
    """Train the sample video model (early fusion of CLIP_LEN frames at MODEL_SIZE):
    `moving` when the scene's content moves across the clip, `still` when only sensor
    noise (and the codec's flicker) changes. It learns from static-camera videos encoded and
    decoded as rayvid will see them (every other scene moving). Writes clips.keras and
    clips.labels.txt."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from rayvid.video import FrameReader

    keras.utils.set_random_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "clips-train.mp4")
    labels = scene_labels(int(round(seconds * FPS)), seed + 1000)
    write_video(path, still_frames(labels, seed + 1000, moving_every=2), FPS, VIDEO_SIZE)
    motion = still_motion(labels, moving_every=2)
    reader = FrameReader((MODEL_SIZE, MODEL_SIZE), decoder="pyav")
    frames = np.concatenate([b["frame"] for b in reader.read(path, path) if b["kind"][0] == "frame"])
    os.remove(path)
    xs, ys = [], []
    for start in range(0, len(frames) - CLIP_LEN + 1, 2):  # windows inside one scene
        window = motion[start : start + CLIP_LEN]
        if len(set(window)) == 1 and labels[start] == labels[start + CLIP_LEN - 1]:
            xs.append(frames[start : start + CLIP_LEN])
            ys.append(CLIP_CLASSES.index(window[0]))
    x = np.stack(xs).astype(np.float32)
    inp = keras.Input((CLIP_LEN, MODEL_SIZE, MODEL_SIZE, 3), name="clip")
    z = keras.layers.Rescaling(1 / 255.0, name="rescaling")(inp)  # (named: not rescaling_N after others built)
    # early fusion: the clip's frames side by side as channels (TF's Conv3D is ~15x slower
    # on CPU), so the first convolution sees every frame of a neighbourhood at once
    z = keras.layers.Permute((2, 3, 1, 4))(z)
    z = keras.layers.Reshape((MODEL_SIZE, MODEL_SIZE, CLIP_LEN * 3))(z)
    z = keras.layers.Conv2D(24, 3, activation="relu")(z)
    z = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(z)
    z = keras.layers.GlobalMaxPooling2D()(z)
    out = keras.layers.Dense(len(CLIP_CLASSES), activation="softmax", name="motion")(z)
    model = keras.Model(inp, out, name="motion")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, np.array(ys), epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    path = _save(model, out_dir, "clips", CLIP_CLASSES)
    return {"model": path, "accuracy": round(float(history.history["accuracy"][-1]), 4)}


def _save(model, out_dir: str, name: str, labels) -> str:
    """`name`.keras and `name`.labels.txt (where rayvid looks for a model file's labels)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.keras")
    with contextlib.suppress(FileNotFoundError):  # (the labels file says the model is whole: it goes first)
        os.remove(os.path.join(out_dir, f"{name}.labels.txt"))
    tmp = os.path.join(out_dir, f".{name}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)
    with open(os.path.join(out_dir, f"{name}.labels.txt"), "w") as f:
        f.write("\n".join(labels) + "\n")
    return path
