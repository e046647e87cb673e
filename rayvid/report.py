"""What a person reads and looks at: the end-of-run summary (input: a pipeline.RunResult),
and `rayvid report`'s label-timeline PNGs and HTML index (input: an OUTPUT)."""

from __future__ import annotations

from typing import Optional


def summary(result) -> str:
    from rayvid.schema import label_text
    from rayvid.storage import public_uri

    output = public_uri(result.output).rstrip("/")  # an ftp://user:password@... OUTPUT too
    if result.dry_run is not None:
        return _dry_run(result, output)
    lines = [
        f"rayvid run {result.run_id}: finished in {result.wall_s:.1f} s",
        _videos(result) + f", {result.videos_ok} ok, {result.videos_failed} failed",
        f"  frames:  {result.frames} ({result.frames_per_s:.1f} frames/s end to end)"
        + (f"; {result.frames - result.frames_reused} inferred, {result.frames_reused} reused "
           f"(--skip-similar)" if result.frames_reused else ""),
        f"  model:   {result.model}",
        f"  output:  {output}/predictions/ (per frame), videos/ (per video); {_written(result.files)}",
    ]
    if result.bytes_read:
        of = (f" ({result.bytes_read / result.bytes_remote:.2f}x the {_mb(result.bytes_remote)} of the remote videos)"
              if result.bytes_remote else "")
        lines.append(f"  storage: read {_mb(result.bytes_read)} from remote stores{of}")
    if result.videos_failed:
        lines.append(f"  errors:  {output}/errors/ (one row per failed video)")
    lines.append(f"  record:  {output}/runs/{result.run_id}.json")
    if result.top_labels and result.frames:
        tops = ", ".join(f"{label_text(label)} {100 * n / result.frames:.0f}%" for label, n in result.top_labels)
        lines.append(f"  labels:  {tops} of frames")
    t = result.inference
    if t and t.get("frames"):  # (a run whose videos all failed had batches of end rows only)
        actors = "" if t["actors"] == 1 else f", {t['actors']} actors"
        lines.append(
            f"  infer:   model busy {100 * t['model_busy']:.0f}% of the inference actors' time, "
            f"waiting for frames {100 * t['waiting']:.0f}% ({_plural(t['frames'], 'frame')} in {_plural(t['batches'], 'batch')}{actors})"
        )
    if result.plan:
        devices = (t or {}).get("devices") or []
        gpu = ""
        if result.plan["infer_gpus"] and "CPU" in devices:
            gpu = (" (but TensorFlow found no GPU on some actors: the model ran on the CPU there)" if "GPU" in devices
                   else " (but TensorFlow found no GPU: the model ran on the CPU)")
        lines.append(_actors(result.plan) + gpu)
    return "\n".join(lines)


def _written(files) -> str:
    """The files a run wrote, by folder: `2 files written (1 in predictions/, 1 in videos/)`
    (where every video failed, none in predictions/: no count there to suggest one)."""
    if not files:
        return "no file written"
    folders: dict = {}
    for url in files:
        folder = url.rstrip("/").rsplit("/", 2)[-2] if url.count("/") else ""
        folders[folder] = folders.get(folder, 0) + 1
    where = ", ".join(f"{n} in {folder}/" for folder, n in sorted(folders.items()) if folder)
    return f"{_plural(len(files), 'file')} written" + (f" ({where})" if where else "")


def _videos(result) -> str:
    """The summary's line of listed and skipped videos (a run's and a dry run's)."""
    failed = (f"; {result.videos_skipped_failed} of them failed then: --retry-failed redoes them"
              if result.videos_skipped_failed else "")
    return f"  videos:  {result.videos_listed} listed, {result.videos_skipped} skipped (already done{failed})"


def _actors(p: dict) -> str:
    """The summary's line of the planned pools (`resources.Plan`, as a dict)."""
    gpu = f", {p['infer_gpus']:g} GPU each" if p["infer_gpus"] else " on CPU"
    return f"  actors:  decode {p['decode_min']}..{p['decode_max']}, inference {p['infer_min']}..{p['infer_max']}{gpu}"


def _dry_run(result, output: str) -> str:
    """What `rayvid run --dry-run` prints: what the run would do."""
    d = result.dry_run
    unknown = f" ({d['unknown_sizes']} of unknown size)" if d["unknown_sizes"] else ""
    size = ("size unknown (not listed: a manifest's videos)" if d["videos"] and d["unknown_sizes"] == d["videos"]
            else f"{_mb(d['bytes'])} in the videos to do{unknown}")
    clips = f", clips of {d['clip_len']} frames" if d["clip_len"] else ""
    lines = [
        f"rayvid run --dry-run: {_plural(d['videos'], 'video')} to do, nothing written",
        _videos(result) + f", {d['videos']} to do",
        f"  input:   {size}; {_plural(d['segments'], 'segment')} to decode",
        f"  model:   {result.model}, frames at {d['input_size'][0]}x{d['input_size'][1]}{clips}",
        f"  output:  {output}/ (nothing written; a run would resume into it)",
    ]
    if result.plan:
        lines.append(_actors(result.plan))
    return "\n".join(lines)


def _mb(n: int) -> str:
    """Bytes in MB, or in kB under 0.1 MB (20 kB read would show as 0.0 MB)."""
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB" if n else "0 bytes"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("ch") else f"{n} {word}s"


# --- pictures: `rayvid report OUTPUT DIR` ------------------------------------------------
# A timeline PNG per video: time on x (LEFT px of label names, then PLOT_W px for the
# video's duration), one lane per top label (LANE_H px, LANE_GAP apart, from TOP), filled
# where that label is the frame's top-1, in the label's colour blended from white by the
# score (score 1: the full colour). The geometry is fixed so a reader (or a test) can map
# a pixel column back to a time: x = LEFT + t / duration * PLOT_W.

LEFT, PLOT_W, TOP, LANE_H, LANE_GAP, BOTTOM = 130, 800, 24, 18, 4, 22
MAX_LANES = 6
TIMELINE_COLUMNS = ["video_uri", "frame_index", "timestamp_s", "label", "score", "end_s"]  # what a timeline reads (end_s: clip runs' parts)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def colours(labels) -> dict:
    """A stable colour per label: the palette in sorted label order (cycling after 10)."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(sorted(set(labels)))}


def lanes_of(preds) -> list:
    """The labels given lanes: the video's most frequent top-1 labels (at most MAX_LANES)."""
    import pyarrow.compute as pc

    counts = pc.value_counts(preds.column("label").drop_null()).to_pylist()
    counts.sort(key=lambda c: (-c["counts"], c["values"]))
    return [c["values"] for c in counts[:MAX_LANES]]


def timeline_png(preds, duration_s: float, title: str, palette: dict, fps: float = 0.0,
                 shaded: Optional[bool] = None):
    """The timeline of one video's prediction rows (sorted by frame_index) as a PIL image:
    each row's bar lasts as `rayvid segments` counts it (`query.row_ends`: a frame until
    the next, a clip to its end_s). `shaded`: whether scores are probabilities, each bar's
    colour blended from white by its score (else the full colour); None: where this
    video's scores all lie in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from rayvid.query import clip_ends_of, row_ends

    lanes = lanes_of(preds)
    height = TOP + max(1, len(lanes)) * (LANE_H + LANE_GAP) + BOTTOM
    img = np.full((height, LEFT + PLOT_W + 10, 3), 255, np.uint8)
    t = preds.column("timestamp_s").to_numpy()
    ends = row_ends(t, duration_s or None, fps or None, clip_ends_of(preds)) if len(t) else t
    duration = max(duration_s or 0.0, float(ends[-1]) if len(t) else 0.0) or 1.0
    x0 = LEFT + np.round(t / duration * PLOT_W).astype(int)
    x1 = np.maximum(x0 + 1, LEFT + np.round(ends / duration * PLOT_W).astype(int))
    labels = preds.column("label").to_pylist()
    scores = np.nan_to_num(preds.column("score").fill_null(0.0).to_numpy().astype(np.float64))
    if shaded is None:
        shaded = probabilities(scores)
    if not shaded:  # no probabilities (raw scores): full colour
        scores = np.ones_like(scores)
    for lane, label in enumerate(lanes):
        y = TOP + lane * (LANE_H + LANE_GAP)
        img[y : y + LANE_H, LEFT : LEFT + PLOT_W] = 240
        base = np.array(palette[label], np.float64)
        for a, b, name, s in zip(x0, x1, labels, scores):
            if name == label:
                img[y : y + LANE_H, a:b] = np.round(255 - (255 - base) * min(max(s, 0.0), 1.0)).astype(np.uint8)
    pic = Image.fromarray(img)
    draw = ImageDraw.Draw(pic)
    font = ImageFont.load_default(size=11)
    draw.text((4, 5), title, fill=(0, 0, 0), font=font)
    for lane, label in enumerate(lanes):
        y = TOP + lane * (LANE_H + LANE_GAP)
        draw.rectangle([4, y + 4, 14, y + 14], fill=palette[label])
        draw.text((18, y + 3), label[:18], fill=(0, 0, 0), font=font)
    axis = TOP + len(lanes) * (LANE_H + LANE_GAP) + 2
    for k in range(6):
        x = LEFT + round(k * PLOT_W / 5)
        draw.line([x, axis, x, axis + 4], fill=(0, 0, 0))
        draw.text((min(x, LEFT + PLOT_W - 30), axis + 6), f"{k * duration / 5:.1f}s", fill=(0, 0, 0), font=font)
    return pic


def probabilities(scores) -> bool:
    """Whether top-1 scores (a numpy array) could be probabilities: all in [0, 1]."""
    return bool(((scores >= 0) & (scores <= 1)).all())


REPORT_LIMIT = 1000  # videos in a report unless --limit says otherwise: a page a person reads


def write_report(output: str, directory: str, limit: int = REPORT_LIMIT, match: Optional[str] = None) -> dict:
    """`rayvid report OUTPUT DIR`: DIR/index.html (the per-video table, each row linking
    its timeline) and DIR/timelines/<name>.png per video with predictions, for the first
    `limit` videos by video_uri (0: all) of those whose video_uri matches the glob `match`
    (fnmatch; None: all). Works part by part; returns {video_uri: png url}."""
    import fnmatch
    import hashlib
    import html

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from rayvid import query, storage

    videos = query.read(output, "videos")
    listed = len(videos)
    if match is not None:
        videos = videos.filter(pa.array([fnmatch.fnmatchcase(u, match) for u in videos.column("video_uri").to_pylist()],
                                        pa.bool_()))
    matched = len(videos)
    videos = videos.sort_by("video_uri")
    if limit:
        videos = videos.slice(0, min(limit, len(videos)))  # (pyarrow: 2**63 and more overflow)
    # (the videos not shown: parts and row groups whose video_uri range holds none of the
    # chosen are not read past their footer)
    chosen = videos.column("video_uri").to_pylist() if len(videos) < listed else None
    durations = dict(zip(videos.column("video_uri").to_pylist(),
                         zip(videos.column("duration_s").to_pylist(), videos.column("fps").to_pylist())))
    # one colour per label, and one rule for the scores (shaded where every score shown is
    # in [0, 1]: a raw-score model's videos all full colour), across the timelines shown
    found, shaded = set(), True
    for part in query.parts(output, columns=["label", "score"], videos=chosen):
        found.update(pc.unique(part.column("label").drop_null()).to_pylist())
        shaded = shaded and probabilities(np.nan_to_num(part.column("score").fill_null(0.0).to_numpy()))
    palette = colours(found)
    pngs: dict = {}
    for part in query.parts(output, columns=TIMELINE_COLUMNS, videos=chosen):
        if not len(part):
            continue
        part = part.sort_by([("video_uri", "ascending"), ("frame_index", "ascending")])
        uris = part.column("video_uri").combine_chunks()
        starts = np.flatnonzero(pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1)).to_numpy(zero_copy_only=False)) + 1
        for lo, hi in zip([0, *starts.tolist()], [*starts.tolist(), len(uris)]):  # each video's rows
            uri, preds = uris[lo].as_py(), part.slice(lo, hi - lo)
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
            rel = f"timelines/{safe}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}.png"
            duration, fps = durations.get(uri) or (0.0, 0.0)
            # (the name as stored: a presigned URL's signature is not there; its other parameters may name the object)
            pic = timeline_png(preds, duration or 0.0, uri[-110:], palette, fps or 0.0, shaded)
            with storage.access(directory, "write to"):
                storage.write_atomic(storage.join(directory, rel), lambda f, p=pic: p.save(f, format="PNG"))
            pngs[uri] = rel
    table = query.summary_of(videos)
    rows = []
    for r in table.to_pylist():
        png = pngs.get(r["video_uri"])
        cells = "".join(f"<td>{html.escape(query._cell(v))}</td>" for k, v in r.items() if k != "video_uri")
        link = (f'<a href="{html.escape(png)}"><img src="{html.escape(png)}" width="480"></a>' if png
                else "(no frames)")
        rows.append(f"<tr><td>{html.escape(r['video_uri'])}<br>{link}</td>{cells}</tr>")
    head = "".join(f"<th>{html.escape(n)}</th>" for n in table.column_names)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>rayvid report</title>"
            f"<style>body{{font-family:sans-serif}} td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}"
            f"table{{border-collapse:collapse}}</style></head><body>"
            f"<h1>rayvid: {html.escape(storage.public_uri(output))}</h1>"
            f"<p>{_plural(len(table), 'video')}{_shown(len(table), matched, listed, match)}, "
            f"{_plural(sum(table.column('frames').to_pylist()), 'frame')}. "
            f"Timelines: time on x, one lane per top label, colour intensity = score.</p>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table></body></html>")
    with storage.access(directory, "write to"):
        storage.write_atomic(storage.join(directory, "index.html"), lambda f: f.write(page.encode()))
    return pngs


def _shown(shown: int, matched: int, listed: int, match: Optional[str]) -> str:
    import html

    which = f" matching {html.escape(match)}" if match is not None else ""
    more = " (the first by video_uri; rayvid report --limit N, or 0 for all)" if shown < matched else ""
    return f" of the {matched}{which} in OUTPUT's {listed}{more}" if shown < listed else ""
