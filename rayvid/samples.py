"""Labelled synthetic videos and the small classifier trained on them (`make run` offline).

Each video is a sequence of scenes (about 1.5 s each) showing one class: a moving circle,
square or triangle, stripes, a checkerboard, or a blank background, in random colours.
The class of every frame is known, so the sample run can be checked, and the classifier
(`model/shapes.keras` + `model/shapes.labels.txt`, a few-hundred-KB CNN trained here in
seconds, deterministically) is a real model with real predictions, loaded through the same
`--model URL` path as any user model.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Iterable, Optional

import numpy as np

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
        raise RuntimeError(f"ffmpeg failed writing {path}: {err.strip()}")


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
    z = keras.layers.Rescaling(1 / 255.0)(inp)
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
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, "shapes.keras")
    model.save(model_path)
    with open(os.path.join(out_dir, "shapes.labels.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    return {"model": model_path, "validation_accuracy": round(float(acc), 4)}


def ensure_samples(root: str, n_videos: int = 6, seconds: float = 4.0, force: bool = False) -> dict:
    """Create `root/videos/*.mp4`, `root/truth.json` and `root/model/` unless present."""
    videos = os.path.join(root, "videos")
    model_dir = os.path.join(root, "model")
    truth_path = os.path.join(root, "truth.json")
    os.makedirs(videos, exist_ok=True)
    if force or not os.path.exists(truth_path):
        truth = {}
        for i in range(n_videos):
            path = os.path.join(videos, f"sample_{i:02d}.mp4")
            truth[path] = make_video(path, seconds, seed=100 + i)
        with open(truth_path, "w") as f:
            json.dump(truth, f)
    info = {"videos": videos, "truth": truth_path}
    model_path = os.path.join(model_dir, "shapes.keras")
    if force or not os.path.exists(model_path):
        info.update(train_model(model_dir))
    info["model"] = model_path
    return info
