from rayvid.pipeline import RunResult
from rayvid.report import summary


def test_summary_says_what_happened_and_where():
    r = RunResult("rid", "s3://b/out/", "shapes.keras", videos_listed=3, videos_ok=2, videos_failed=1,
                  frames=200, wall_s=4.0, files=["x"], top_labels=[("circle", 150), ("blank", 50)],
                  plan={"decode_min": 1, "decode_max": 3, "infer_min": 1, "infer_max": 1, "infer_gpus": 0.0})
    text = summary(r)
    assert "3 listed, 0 skipped (already done), 2 ok, 1 failed" in text
    assert "200 (50.0 frames/s end to end)" in text
    assert "s3://b/out/predictions/ (per frame), videos/ (per video); 1 file written" in text
    assert "s3://b/out/errors/" in text
    assert "circle 75%" in text and "inference 1..1 on CPU" in text
