"""Each merge config in merge_configs/, merged into a real mmdet base, builds a model and an optimizer."""

from __future__ import annotations

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS, init_default_scope

from det_mmdet.config import CONTEXT_DIR, build_config, experiment_from_dict

FASTER = "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"


def merged(name: str):
    exp = experiment_from_dict(
        {"hyperparameters": {"global_batch_size": 2, "config_file": FASTER, "merge_config": f"merge_configs/{name}"}}
    )
    return build_config(exp)


def build(cfg):
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    model = MODELS.build(cfg.model)
    wrapper_cfg = {k: v for k, v in cfg.optim_wrapper.to_dict().items() if k not in ("type", "loss_scale")}
    optim = build_optim_wrapper(model, dict(type="OptimWrapper", **wrapper_cfg)).optimizer
    schedulers = [
        PARAM_SCHEDULERS.build(dict(s), default_args={"optimizer": optim, "epoch_length": 100})
        for s in cfg.param_scheduler
    ]
    return model, optim, schedulers


def test_every_merge_config_is_tested():
    shipped = {p.name for p in (CONTEXT_DIR / "merge_configs").glob("*.py")}
    assert shipped == {name for name, _ in CASES}


def check_adamw(cfg, model, optim, schedulers):
    assert isinstance(optim, torch.optim.AdamW) and optim.defaults["lr"] == 1e-4
    assert "momentum" not in cfg.optim_wrapper.optimizer  # _delete_ dropped SGD's keys
    assert min(g["weight_decay"] for g in optim.param_groups) == 0.0  # norm and bias layers


def check_cosine(cfg, model, optim, schedulers):
    assert isinstance(optim, torch.optim.SGD)
    assert [type(s).__name__ for s in schedulers] == ["LinearLR", "CosineAnnealingLR"]
    assert schedulers[1].by_epoch is False and schedulers[1].end == 1200  # 12 epochs of 100 batches


def check_amp(cfg, model, optim, schedulers):
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.optim_wrapper.optimizer.type == "SGD"


def check_clip(cfg, model, optim, schedulers):
    assert cfg.optim_wrapper.clip_grad.to_dict() == {"max_norm": 35, "norm_type": 2}


def check_custom(cfg, model, optim, schedulers):
    assert model.roi_head.bbox_head.num_classes == 2
    assert cfg.train_dataloader.dataset.metainfo.classes == ("cat", "dog")
    assert cfg.val_evaluator.ann_file == "data/my_dataset/annotations/val.json"


def check_multiscale(cfg, model, optim, schedulers):
    resize = cfg.train_dataloader.dataset.pipeline[2]
    assert resize.type == "RandomChoiceResize" and len(resize.scales) == 6


CASES = [
    ("adamw.py", check_adamw),
    ("sgd_warmup_cosine.py", check_cosine),
    ("amp.py", check_amp),
    ("clip_grad.py", check_clip),
    ("custom_coco.py", check_custom),
    ("multiscale_train.py", check_multiscale),
]


@pytest.mark.parametrize("name, check", CASES, ids=[c[0] for c in CASES])
def test_merge_config_builds(name, check):
    cfg = merged(name)
    check(cfg, *build(cfg))
