"""The benches keep working and measure what their tables say they measure (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from conftest import ROOT


def test_r50_bench_config_is_mmdets_coco_model_at_320_px():
    """The "R50-FPN at 320 px" row trains mmdet's own COCO 1x model, not a variant of the tiny one."""
    import mmdet

    coco = Config.fromfile(os.path.join(mmdet.__path__[0], ".mim/configs/faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"))
    ours = Config.fromfile(str(ROOT / "bench/configs/faster_rcnn_r50_fpn_320.py"))
    expected, got = coco.model.to_dict(), ours.model.to_dict()
    # the only differences: random backbone weights (nothing downloads) and the data set's 3 classes
    expected["backbone"]["init_cfg"] = None
    expected["roi_head"]["bbox_head"]["num_classes"] = 3
    got["backbone"].pop("base_channels")
    got.pop("_scope_", None)  # added by inheriting through mmdet::
    assert got == expected
    for loader in (ours.train_dataloader, ours.val_dataloader):
        resize = [t for t in loader.dataset.pipeline if t["type"] == "Resize"]
        assert [t["scale"] for t in resize] == [(320, 320)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_bench_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "gpu_results.md"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "bench/gpu.sh: torch sees no CUDA GPU here; nothing measured"
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_loader_bench_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "gpu_loader_results.md"
    cmd = [sys.executable, "bench/gpu_loader.py", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: bench/gpu_loader.py: torch sees no CUDA GPU here; nothing measured"
    assert not out.exists()


def test_gpu_loader_bench_trains_mmdets_rtmdet_s_on_the_made_data(tmp_path, monkeypatch):
    """Both ways of bench/gpu_loader.py train mmdet's own RTMDet-s config as shipped, reading the made JPEGs;
    only the data section (det-mmdet's transforms and worker heap, or not) tells them apart."""
    import mmdet
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules

    from det_mmdet.config import build_config, experiment_from_dict

    register_all_modules()

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_loader
    from pipeline import make_coco

    make_coco(tmp_path, 3)
    shipped = Config.fromfile(os.path.join(mmdet.__path__[0], ".mim/configs", gpu_loader.CONFIG))
    shipped.model.backbone.init_cfg = None  # the one change: random backbone weights (nothing downloads)
    for fast in (False, True):
        exp = experiment_from_dict(gpu_loader.experiment(tmp_path, fast))
        assert exp.data == {"fast_transforms": fast, "reuse_worker_heap": fast}
        cfg = build_config(exp)
        assert cfg.model.to_dict() == shipped.model.to_dict()
        assert cfg.train_dataloader.dataset.pipeline == shipped.train_dataloader.dataset.pipeline
        assert cfg.train_dataloader.batch_size == gpu_loader.BATCH == shipped.train_dataloader.batch_size
        dataset = DATASETS.build(cfg.train_dataloader.dataset)
        assert len(dataset) == 3
        assert dataset.get_data_info(0)["img_path"] == f"{tmp_path}/train/000000.jpg"


def test_throughput_bench_runs_both_trainers(tmp_path):
    """A miniature run of bench/throughput.py: both trainers train, validate and are reported."""
    cmd = [sys.executable, "bench/throughput.py", "--repeats", "1", "--short", "1", "--long", "2"]
    cmd += ["--train-images", "8", "--val-images", "4", "--quiet", "99", "--noisy", "99"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if "| mmengine Runner |" in line or "| det-mmdet |" in line]
    assert len(rows) == 2 + 2 + 4  # summary, loop breakdown, every run (2 trainers x 2 lengths)
    assert "per-batch speed ratio (runner per-batch / ours per-batch)" in proc.stdout
    assert "tiny Faster R-CNN, 128 px, batch 4" in proc.stdout
    assert "KaimingInit" not in proc.stdout  # tables only, no per-tensor init report


def test_eval_bench_times_both_metrics_on_the_same_results():
    """A miniature bench/eval.py: mmdet's CocoMetric and ours score one result set, with the same numbers."""
    cmd = [sys.executable, "bench/eval.py", "--images", "30", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| bbox |", "| segm |"))]
    assert len(rows) == 2 and all(row.endswith("| yes |") for row in rows), proc.stdout


def test_loader_threads_bench_runs_both_loaders():
    """A miniature bench/loader_threads.py: mmdet's RTMDet pipeline through both loaders."""
    cmd = [sys.executable, "bench/loader_threads.py", "--images", "16", "--repeat", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "images/s" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["OpenCV default", "mp_cfg opencv_num_threads=0"]
    assert all(float(row.split("|")[2]) > 0 for row in rows)
