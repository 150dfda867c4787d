"""`make demo` in miniature: the same command with fewer batches, pictures included."""

from __future__ import annotations

import json

from conftest import det_mmdet


def test_demo_makes_data_trains_and_draws(tmp_path):
    out, data = tmp_path / "demo", tmp_path / "shapes"
    r = det_mmdet("demo", "--output-dir", out, "--data-dir", data, "--max-batches", 9)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((data / "train").glob("*.jpg"))) == 400 and len(list((data / "val").glob("*.jpg"))) == 50
    for picture in ("predictions.png", "curves.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["batches"] for x in records if x["group"] == "validation"] == [3, 6, 9]
    assert "bbox_mAP" in r.stdout and "after 9 batches" in r.stdout
    # DetInferencer's lines while drawing predictions.png: held back as training's are (predict --verbose shows them).
    for noise in ("Loads checkpoint by local backend", "Failed to search registry", "provide the `save_dir` argument"):
        assert noise not in r.stdout + r.stderr, noise
