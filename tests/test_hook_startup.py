"""What the Runner does that the trial must do too, checked at start-up or in a few batches.

TOODHead reads ``epoch`` from the MessageHub; SyncBN becomes BN on one process; validation periods
follow ``val_begin`` and ``dynamic_intervals``; a hook or config the trial cannot honour stops the run
before training with one line naming it.
"""

from __future__ import annotations

import bisect

import pytest
import torch
from determined import pytorch

from conftest import det_mmdet, read_metrics, shapes_hparams, write_experiment
from det_mmdet.runner import ValidationPoints, schedule
from det_mmdet.trial import revert_sync_batchnorm


def test_validation_points_follow_mmengines_loop_rule():
    from mmengine.runner.utils import calc_dynamic_intervals

    # mmengine's EpochBasedTrainLoop, after each epoch: interval for (epoch + 1), then the modulo test.
    milestones, intervals = calc_dynamic_intervals(10, [(280, 1), (295, 2)])

    def mmengine_validates(epoch: int) -> bool:
        interval = intervals[bisect.bisect(milestones, epoch + 1) - 1]
        return epoch >= 5 and epoch % interval == 0

    points = ValidationPoints(10, begin=5, dynamic=[(295, 2), (280, 1)])
    assert [e for e in range(1, 301) if e in points] == [e for e in range(1, 301) if mmengine_validates(e)]
    assert 10 in points and 4 not in points and 279 in points and 283 in points and 295 not in points


def test_schedule_takes_dynamic_intervals_from_train_cfg():
    from mmengine.config import Config

    cfg = Config({"train_cfg": {"max_epochs": 300, "val_interval": 10, "dynamic_intervals": [(280, 1)]}})
    plan = schedule(cfg, {})
    assert isinstance(plan.validation_period, pytorch.Epoch)
    assert plan.validation_period.should_stop(10) and not plan.validation_period.should_stop(11)
    assert plan.validation_period.should_stop(281)
    assert isinstance(schedule(cfg, {}, validation_period=7).validation_period.value, int)  # the flag wins


def test_sync_batchnorm_becomes_batchnorm_on_one_process():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SyncBatchNorm(4))
    single = revert_sync_batchnorm(model, slots=1, device=torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in single.modules())
    assert single(torch.rand(2, 3, 8, 8)).shape == (2, 4, 6, 6)
    kept = revert_sync_batchnorm(torch.nn.Sequential(torch.nn.SyncBatchNorm(4)), slots=2, device=torch.device("cuda"))
    assert isinstance(kept[0], torch.nn.SyncBatchNorm)  # DDP on GPUs: the statistics are synchronised


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"custom_hooks": [{"type": "NaiveVisualizationHook"}]},
            "error: custom_hooks[0]: NaiveVisualizationHook reads runner.visualizer, "
            "which det-mmdet's trial does not provide",
        ),
        (
            {"custom_hooks": [{"type": "MeanTeacherHook"}]},
            "error: custom_hooks[0]: MeanTeacherHook (semi-supervised training (teacher/student)) is not supported",
        ),
        ({"custom_hooks": [{"type": "NoSuchHook"}]}, "error: custom_hooks[0]: NoSuchHook is not in the"),
        (
            {"custom_hooks": [{"type": "EMAHook", "begin_iter": 5, "begin_epoch": 1}]},
            "error: custom_hooks[0]: EMAHook: `begin_iter` and `begin_epoch` should not be both set.",
        ),
        (
            {"default_hooks.visualization.draw": True},
            "error: default_hooks.visualization.draw=True is not supported: draw predictions with `det-mmdet predict`",
        ),
        (
            {"train_dataloader.sampler.type": "ClassAwareSampler"},
            "error: train_dataloader.sampler.type 'ClassAwareSampler' is not supported "
            "(choose DefaultSampler or InfiniteSampler)",
        ),
    ],
)
def test_what_the_trial_cannot_honour_stops_at_startup(tmp_path, shapes, overrides, message):
    exp = write_experiment(tmp_path, shapes_hparams(shapes, **overrides))
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "run", "--max-batches", 2)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the first batch


def test_soft_teacher_stops_with_one_line(tmp_path, shapes):
    hp = {
        "global_batch_size": 4,
        "config_file": "soft_teacher/soft-teacher_faster-rcnn_r50-caffe_fpn_180k_semi-0.1-coco.py",
        "override_mmdet_config": {"data_root": f"{shapes}/"},
    }
    r = det_mmdet("train", write_experiment(tmp_path, hp), "--output-dir", tmp_path / "run", "--max-batches", 2)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "semi-supervised" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


def test_tood_reads_the_epoch_from_the_message_hub(tmp_path, shapes):
    """TOODHead switches assigners at ``initial_epoch`` by the MessageHub's ``epoch``."""
    overrides = {
        "data_root": f"{shapes}/",
        "train_dataloader.dataset.ann_file": "annotations/train.json",
        "train_dataloader.dataset.data_prefix.img": "train/",
        "train_dataloader.dataset.pipeline.2.scale": 128,
        "val_dataloader.dataset.ann_file": "annotations/val.json",
        "val_dataloader.dataset.data_prefix.img": "val/",
        "val_dataloader.dataset.pipeline.1.scale": 128,
        "val_evaluator.ann_file": f"{shapes}/annotations/val.json",
        "model.backbone": {"depth": 18, "base_channels": 16, "init_cfg": None, "frozen_stages": -1},
        "model.neck": {"in_channels": [16, 32, 64, 128], "out_channels": 64},  # GroupNorm: 32 groups
        "model.bbox_head": {"in_channels": 64, "feat_channels": 64, "stacked_convs": 2},
        "model.train_cfg.initial_epoch": 1,
    }
    hp = {"global_batch_size": 8, "config_file": "tood/tood_r50_fpn_1x_coco.py", "override_mmdet_config": overrides}
    exp = write_experiment(tmp_path, hp, data={"classes_from_annotations": True})
    out = tmp_path / "run"
    r = det_mmdet("train", exp, "--output-dir", out, "--max-epochs", 2, "--report-period", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    training = [x for x in read_metrics(out) if x["group"] == "training"]
    assert [x["batches"] for x in training] == list(range(1, 13))  # epoch 0: ATSS assigner, epoch 1: task-aligned
    assert all(x["metrics"]["loss"] == x["metrics"]["loss"] for x in training)  # finite under both
