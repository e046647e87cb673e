"""The end-of-run summary a person reads in the terminal (input: a pipeline.RunResult)."""

from __future__ import annotations


def summary(result) -> str:
    lines = [
        f"rayvid run {result.run_id}: finished in {result.wall_s:.1f} s",
        f"  videos:  {result.videos_listed} listed, {result.videos_skipped} skipped (already done), "
        f"{result.videos_ok} ok, {result.videos_failed} failed",
        f"  frames:  {result.frames} ({result.frames_per_s:.1f} frames/s end to end)"
        + (f"; {result.frames - result.frames_reused} inferred, {result.frames_reused} reused "
           f"(--skip-similar)" if result.frames_reused else ""),
        f"  model:   {result.model}",
        f"  output:  {result.output.rstrip('/')}/predictions/ (per frame), videos/ (per video); "
        f"{_plural(len(result.files), 'file')} written",
    ]
    if result.videos_failed:
        lines.append(f"  errors:  {result.output.rstrip('/')}/errors/ (one row per failed video)")
    lines.append(f"  record:  {result.output.rstrip('/')}/runs/{result.run_id}.json")
    if result.top_labels and result.frames:
        tops = ", ".join(f"{label} {100 * n / result.frames:.0f}%" for label, n in result.top_labels)
        lines.append(f"  labels:  {tops} of frames")
    t = result.inference
    if t and t.get("batches"):
        actors = "" if t["actors"] == 1 else f", {t['actors']} actors"
        lines.append(
            f"  infer:   model busy {100 * t['model_busy']:.0f}% of the inference actors' time, "
            f"waiting for frames {100 * t['waiting']:.0f}% ({t['frames']} frames in {t['batches']} batches{actors})"
        )
    if result.plan:
        p = result.plan
        gpu = f", {p['infer_gpus']:g} GPU each" if p["infer_gpus"] else " on CPU"
        lines.append(
            f"  actors:  decode {p['decode_min']}..{p['decode_max']}, "
            f"inference {p['infer_min']}..{p['infer_max']}{gpu}"
        )
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
