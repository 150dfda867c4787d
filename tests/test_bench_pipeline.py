"""A miniature bench/pipeline.py: mmdet's own training pipelines, mmdet's transforms and ours, timed alike."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_pipeline_bench_times_both_implementations():
    cmd = [sys.executable, "bench/pipeline.py", "--images", "6", "--samples", "2", "--repeats", "1", "--warmup", "6"]
    cmd += ["--configs", "rtmdet_tiny,yolox_tiny,mask_rcnn"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "`" in line]
    assert [r[0].split("(")[0].strip() for r in rows] == ["RTMDet-tiny", "YOLOX-tiny", "Mask R-CNN"]
    for name, mm_ms, ours_ms, mm_rate, ours_rate, speedup, cpu_speedup, same_heap, same, where in rows:
        assert min(float(mm_ms), float(ours_ms), float(mm_rate), float(ours_rate)) > 0 and speedup.strip()[-1] == "x"
        assert float(cpu_speedup.strip().removesuffix("x")) > 0  # the same samples per CPU second of each
        # the four processes: mmdet's and ours, each with glibc's own heap thresholds and with the heap kept
        assert re.fullmatch(r" [0-9.]+x, [0-9.]+x ", same_heap), same_heap
        assert same.strip() == "yes", name  # the warm-up samples of all four, from one seed, compared
        assert len(where.split(",")) == 5 and where.count("->") == 5, name  # the five largest transforms
    assert "CachedMixUp" in rows[0][-1] and "Mosaic" in rows[1][-1]  # the mixing transforms are timed too


def test_pipeline_bench_names_an_unknown_config():
    cmd = [sys.executable, "bench/pipeline.py", "--configs", "rtmdet_s,detr"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --configs: unknown detr (choose from rtmdet_s,")


def test_pipeline_bench_refuses_an_empty_turn():
    proc = subprocess.run(
        [sys.executable, "bench/pipeline.py", "--chunk", "0"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: --chunk: 0 (samples per turn, at least 1)"]


def test_jpeg_rows_bench_times_bands_and_both_yolox_pipelines():
    cmd = [sys.executable, "bench/jpeg_rows.py", "--images", "8", "--samples", "4", "--chunk", "2", "--warmup", "2"]
    proc = subprocess.run([*cmd, "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    decoders = [r for r in rows if r[0].strip().startswith(("OpenCV,", "jpeg_rows,"))]
    # each part was checked against OpenCV's pixels before it was timed (the script exits with an error otherwise)
    assert [r[0].strip() for r in decoders][:2] == ["OpenCV, whole image", "jpeg_rows, all rows"]
    assert len(decoders) == 7 and all(float(r[1]) > 0 for r in decoders)
    yolox = [r for r in rows if "`yolox" in r[0]]
    assert [r[0].split("(")[0].strip() for r in yolox] == ["YOLOX-tiny", "YOLOX-s"]
    for name, whole, apart, speedup, images, rows_not, columns_not in yolox:
        assert float(whole) > 0 and float(apart) > 0 and speedup.strip().endswith("x"), name
        assert float(images) >= 0 and re.fullmatch(r" \d+ of \d+ \(\d+%\) ", rows_not), rows_not
        assert re.fullmatch(r" \d+ of \d+ \(\d+%\) ", columns_not), columns_not
