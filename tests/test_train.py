"""Real training runs of the tiny detectors through ``det-mmdet train`` (Determined's local mode)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, det_mmdet, read_metrics, shapes_hparams, write_experiment
from det_mmdet import worker_heap
from det_mmdet.checkpoint import newest_checkpoint

MAP_KEYS = ["bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"]


def train(tmp_path, shapes, *args, config="configs/shapes_faster_rcnn.py", name="run", **overrides):
    exp = write_experiment(tmp_path, shapes_hparams(shapes, config, **overrides), name=f"{name}.yaml")
    out = tmp_path / name
    r = det_mmdet("train", exp, "--output-dir", out, *args)
    return r, out


def test_faster_rcnn_trains_validates_and_exports(tmp_path, shapes):
    r, out = train(tmp_path, shapes, "--max-batches", 40, "--report-period", 5)
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_metrics(out)
    training = [x for x in records if x["group"] == "training"]
    assert [x["batches"] for x in training] == list(range(5, 45, 5))
    for x in training:
        assert {"loss", "loss_cls", "loss_bbox", "loss_rpn_cls", "loss_rpn_bbox", "lr"} <= set(x["metrics"])
    first, last = training[0]["metrics"]["loss"], sum(x["metrics"]["loss"] for x in training[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    assert training[0]["epochs"] == 0 and training[-1]["epochs"] == 3  # 12 batches of 4 per epoch
    (validation,) = [x for x in records if x["group"] == "validation"]
    assert validation["batches"] == 40
    assert set(MAP_KEYS) <= set(validation["metrics"])
    assert validation["metrics"]["val_images"] == 16
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in r.stdout + r.stderr
    if worker_heap.available():  # data.reuse_worker_heap's default, said at start-up
        assert "loader workers keep freed memory: heap blocks under 32 MB" in r.stdout + r.stderr

    ckpt = newest_checkpoint(out / "checkpoints")
    assert ckpt is not None and (ckpt / "model.pth").is_file() and (ckpt / "config.py").is_file()
    saved = torch.load(ckpt / "model.pth", weights_only=True)
    assert saved["meta"]["dataset_meta"]["classes"] == ["circle", "square", "triangle"]

    from mmdet.apis import DetInferencer

    inferencer = DetInferencer(
        model=str(ckpt / "config.py"), weights=str(ckpt / "model.pth"), device="cpu", show_progress=False
    )
    result = inferencer(str(shapes / "val" / "val_00000.jpg"), no_save_vis=True)
    assert len(result["predictions"]) == 1 and "bboxes" in result["predictions"][0]
    assert inferencer.model.dataset_meta["classes"] == ["circle", "square", "triangle"]


def test_mask_rcnn_reports_segm_map(tmp_path, shapes):
    r, out = train(tmp_path, shapes, "--max-batches", 6, config="configs/shapes_mask_rcnn.py")
    assert r.returncode == 0, r.stderr[-3000:]
    (validation,) = [x for x in read_metrics(out) if x["group"] == "validation"]
    assert {"segm_mAP", "segm_mAP_50", "bbox_mAP"} <= set(validation["metrics"])


def test_two_slots_train_and_validate_every_image_once(tmp_path, shapes):
    overrides = {"val_dataloader.batch_size": 3, "env_cfg.dist_cfg": {"backend": "nccl", "timeout": 120}}
    r, out = train(tmp_path, shapes, "--max-batches", 6, "--slots", 2, **overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    # env_cfg.dist_cfg as the Runner's init_dist takes it; nccl needs GPUs, and this machine has none
    assert "env_cfg: process group: gloo, timeout 120 s (dist_cfg.backend nccl needs GPUs: none here)" in r.stderr
    (validation,) = [x for x in read_metrics(out) if x["group"] == "validation"]
    assert validation["metrics"]["val_images"] == 16  # 6 batches of 3 split over 2 slots, none twice
    assert validation["metrics"]["bbox_mAP"] >= 0


def test_find_unused_parameters_reaches_ddp(tmp_path, shapes):
    # ResNet computes its last stage even when out_indices leave it out: its weights get no gradient,
    # which torch DDP only accepts with find_unused_parameters=True (mmdet's config key for it).
    unused_stage = {"model.backbone.out_indices": [0, 1, 2], "model.neck.in_channels": [16, 32, 64]}
    r, _ = train(tmp_path, shapes, "--max-batches", 3, "--slots", 2, name="without", **unused_stage)
    assert r.returncode != 0 and "set find_unused_parameters: true" in r.stderr
    assert "Traceback" not in r.stderr
    r, out = train(tmp_path, shapes, "--max-batches", 3, "--slots", 2, find_unused_parameters=True, **unused_stage)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["batches"] for x in read_metrics(out) if x["group"] == "validation"] == [3]


def _weights(run_dir):
    return torch.load(newest_checkpoint(run_dir / "checkpoints") / "model.pth", weights_only=True)["state_dict"]


def test_pause_and_resume_gives_the_same_weights(tmp_path, shapes):
    r, full = train(tmp_path, shapes, "--max-batches", 8, name="full")
    assert r.returncode == 0, r.stderr[-3000:]
    r, half = train(tmp_path, shapes, "--max-batches", 4, name="half")
    assert r.returncode == 0, r.stderr[-3000:]
    exp = tmp_path / "half.yaml"
    r = det_mmdet("train", exp, "--output-dir", half, "--max-batches", 8, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from batch 4" in r.stdout + r.stderr
    a, b = _weights(full), _weights(half)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    batches = [x["batches"] for x in read_metrics(half) if x["group"] == "training"]
    assert batches[-1] == 8


def test_resume_without_checkpoint_is_one_line_error(tmp_path, shapes):
    exp = write_experiment(tmp_path, shapes_hparams(shapes))
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "empty", "--max-batches", 2, "--resume")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --resume: no complete checkpoint in")


def test_nan_loss_stops_with_clear_error(tmp_path, shapes):
    r, _ = train(tmp_path, shapes, "--max-batches", 3, "--set", "model.rpn_head.loss_cls.loss_weight=.nan")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: non-finite loss nan at batch 0 (epoch 0)")


def test_global_batch_size_must_divide_by_slots(tmp_path, shapes):
    hp = shapes_hparams(shapes)
    hp["global_batch_size"] = 3
    exp = write_experiment(tmp_path, hp)
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "x", "--max-batches", 2, "--slots", 2)
    assert r.returncode == 2
    assert "global_batch_size 3 is not divisible by 2 slots" in r.stderr
    assert "Traceback" not in r.stderr


def test_cluster_entrypoint_runs_locally_from_the_context_directory(tmp_path, shapes):
    """``model_def/train.py`` is what the cluster runs; off a cluster it is ``det-mmdet train``."""
    exp = write_experiment(tmp_path, shapes_hparams(shapes))
    out = tmp_path / "entry"
    r = subprocess.run(
        [sys.executable, "train.py", str(exp), "--output-dir", str(out), "--max-batches", "2"],
        cwd=ROOT / "model_def",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["group"] for x in read_metrics(out)][-1] == "validation"


def test_epoch_based_schedulers_step_at_epoch_ends_as_mmengine_does(tmp_path, shapes):
    """48 images / batch 4 = 12 batches an epoch; the lr after every batch matches mmengine's hook."""
    schedulers = [
        {
            "type": "LinearLR",
            "start_factor": 0.5,
            "by_epoch": True,
            "begin": 0,
            "end": 1,
            "convert_to_iter_based": True,
        },
        {"type": "MultiStepLR", "by_epoch": True, "milestones": [1], "gamma": 0.1},
    ]
    r, out = train(
        tmp_path,
        shapes,
        "--max-batches", 14, "--report-period", 1,
        "--set", "optim_wrapper.optimizer.lr=0.01",
        **{"param_scheduler": {"type": "const", "val": schedulers}},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lr = {x["batches"]: x["metrics"]["lr"] for x in read_metrics(out) if x["group"] == "training"}
    assert lr == pytest.approx(mmengine_lrs(schedulers, base_lr=0.01, epoch_length=12, iters=14))
    assert lr[12] == pytest.approx(0.001)  # epoch 0 ended at batch 12: the multi-step decay applied


def mmengine_lrs(schedulers: list[dict], base_lr: float, epoch_length: int, iters: int) -> dict[int, float]:
    """The learning rate after each iteration as mmengine's ParamSchedulerHook steps its schedulers."""
    import mmengine.optim  # noqa: F401  (registers the schedulers)
    from mmengine.registry import PARAM_SCHEDULERS

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    built = [
        PARAM_SCHEDULERS.build(dict(s), default_args={"optimizer": optimizer, "epoch_length": epoch_length})
        for s in schedulers
    ]
    out = {}
    for it in range(1, iters + 1):
        for s in built:
            if not s.by_epoch:  # after_train_iter
                s.step()
        if it % epoch_length == 0:
            for s in built:
                if s.by_epoch:  # after_train_epoch
                    s.step()
        out[it] = optimizer.param_groups[0]["lr"]
    return out


def test_amp_config_without_gpu_trains_in_float32_and_says_so(tmp_path, shapes):
    r, out = train(
        tmp_path,
        shapes,
        "--max-batches", 2,
        "--set", "optim_wrapper.type=AmpOptimWrapper",
        "--set", "optim_wrapper.clip_grad.max_norm=10",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "optim_wrapper.type AmpOptimWrapper: no GPU here, training in float32" in r.stdout + r.stderr
    assert [x["group"] for x in read_metrics(out)] == ["training", "validation"]
