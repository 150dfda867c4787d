"""Fine-tune knobs (plain hyperparameters) land in the resolved mmdet config; bad values are one-line errors."""

from __future__ import annotations

import pytest
import torch
from mmengine.registry import PARAM_SCHEDULERS, init_default_scope

from conftest import det_mmdet, read_metrics, shapes_hparams, write_experiment
from det_mmdet.cli import main
from det_mmdet.config import build_config, experiment_from_dict
from det_mmdet.errors import UserError
from det_mmdet.runner import aggregation_frequency

FASTER = "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
MASK = "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"
RETINA = "retinanet/retinanet_r50_fpn_1x_coco.py"


def resolve(config: str = FASTER, searcher_metric: str | None = None, **knobs):
    hp = {"global_batch_size": 2, "config_file": config, "classes": ["a", "b"], **knobs}
    raw = {"hyperparameters": {k: v for k, v in hp.items() if v is not None}}
    if searcher_metric:
        raw["searcher"] = {"name": "single", "metric": searcher_metric, "smaller_is_better": False}
    return build_config(experiment_from_dict(raw))


def resize_scales(cfg) -> list:
    loaders = (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader)
    return [tuple(s.scale) for loader in loaders for s in loader.dataset.pipeline if s.type == "Resize"]


def test_optimizer_knobs():
    opt = resolve(optimizer="adamw", learning_rate=0.001, weight_decay=0.05,
                  extra_optim_args="betas=[0.9, 0.99]; amsgrad=True").optim_wrapper.optimizer  # fmt: skip
    assert dict(opt) == {"type": "AdamW", "lr": 0.001, "weight_decay": 0.05, "betas": [0.9, 0.99], "amsgrad": True}
    sgd = resolve(optimizer="SGD", extra_optim_args="nesterov=True").optim_wrapper.optimizer
    assert (sgd.type, sgd.momentum, sgd.nesterov, sgd.lr) == ("SGD", 0.9, True, 0.02)


def test_explicit_overrides_still_win():
    cfg = resolve(learning_rate=0.1, override_mmdet_config={"optim_wrapper.optimizer.lr": 0.5})
    assert cfg.optim_wrapper.optimizer.lr == 0.5


@pytest.mark.parametrize(
    "kind, types",
    [
        ("warmup_linear", ["LinearLR", "LinearLR"]),
        ("warmup_cosine", ["LinearLR", "CosineAnnealingLR"]),
        ("warmup_cosine_with_restarts", ["LinearLR", "CosineRestartLR"]),
        ("warmup_polynomial", ["LinearLR", "PolyLR"]),
        ("warmup_constant", ["LinearLR"]),
        ("constant", []),
    ],
)
def test_learning_rate_schedulers_build_in_mmengine(kind, types):
    cfg = resolve(learning_rate_scheduler=kind, warmup_steps=100, number_of_epochs=6)
    assert [s["type"] for s in cfg.param_scheduler] == types
    assert cfg.train_cfg.max_epochs == 6
    if types:
        assert cfg.param_scheduler[0]["end"] == 100
    init_default_scope("mmdet")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for spec in cfg.param_scheduler:
        PARAM_SCHEDULERS.build(dict(spec), default_args={"optimizer": optimizer, "epoch_length": 50})


def test_precision_clipping_accumulation_seed():
    cfg = resolve(precision="bf16", max_grad_norm=10, gradient_accumulation_step=4, random_seed=123)
    assert (cfg.optim_wrapper.type, cfg.optim_wrapper.dtype) == ("AmpOptimWrapper", "bfloat16")
    assert cfg.optim_wrapper.clip_grad == {"max_norm": 10.0, "norm_type": 2}
    assert aggregation_frequency(cfg) == 4 and cfg.randomness.seed == 123
    assert resolve(precision=16).optim_wrapper.get("dtype") == "float16"
    assert resolve(precision=32).optim_wrapper.type == "OptimWrapper"


def test_image_sizes_workers_batches_and_length():
    cfg = resolve(image_min_size=600, image_max_size=1000, number_of_workers=3, training_batch_size=4,
                  validation_batch_size=2, max_steps=5000)  # fmt: skip
    assert resize_scales(cfg) == [(1000, 600)] * 3
    assert all(
        s.keep_ratio for loader in (cfg.train_dataloader,) for s in loader.dataset.pipeline if s.type == "Resize"
    )
    assert [cfg[f"{s}_dataloader"].num_workers for s in ("train", "val", "test")] == [3, 3, 3]
    assert (cfg.train_dataloader.batch_size, cfg.val_dataloader.batch_size, cfg.test_dataloader.batch_size) == (4, 2, 2)
    assert (cfg.train_cfg.type, cfg.train_cfg.max_iters) == ("IterBasedTrainLoop", 5000)


def test_apply_augmentations_false_keeps_loading_resize_pack():
    cfg = resolve(apply_augmentations=False)
    assert [s.type for s in cfg.train_dataloader.dataset.pipeline] == [
        "LoadImageFromFile", "LoadAnnotations", "Resize", "PackDetInputs"
    ]  # fmt: skip
    assert "RandomFlip" in [s.type for s in resolve(apply_augmentations=True).train_dataloader.dataset.pipeline]


def test_thresholds_for_two_stage_and_one_stage_models():
    faster = resolve(box_score_threshold=0.3, iou_threshold=0.6).model.test_cfg.rcnn
    assert (faster.score_thr, faster.nms.iou_threshold) == (0.3, 0.6)
    retina = resolve(RETINA, box_score_threshold=0.2, iou_threshold=0.4).model.test_cfg
    assert (retina.score_thr, retina.nms.iou_threshold) == (0.2, 0.4)


def test_metric_for_best_model_must_match_the_searcher():
    cfg = resolve(metric_for_best_model="recall", searcher_metric="bbox_AR@100")
    assert "AR@100" in cfg.val_evaluator.metric_items
    resolve(MASK, task_name="image-instance-segmentation", metric_for_best_model="mean_average_precision",
            searcher_metric="segm_mAP")  # fmt: skip
    with pytest.raises(UserError, match="selects bbox_mAP_50 but searcher.metric is bbox_mAP"):
        resolve(metric_for_best_model="precision", searcher_metric="bbox_mAP")


def test_head_lr_multiplier_makes_heads_learn_faster():
    from mmdet.registry import MODELS
    from mmengine.optim import build_optim_wrapper

    cfg = resolve(head_lr_multiplier=10, learning_rate=0.01)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {"rpn_head": {"lr_mult": 10.0}, "roi_head": {"lr_mult": 10.0}}
    init_default_scope("mmdet")
    model = MODELS.build(cfg.model)
    wrapper = {k: v for k, v in cfg.optim_wrapper.to_dict().items() if k != "type"}
    groups = build_optim_wrapper(model, dict(type="OptimWrapper", **wrapper)).optimizer.param_groups
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    lrs = {n: g["lr"] for n, g in zip(names, groups, strict=True)}
    assert lrs["roi_head.bbox_head.fc_cls.weight"] == pytest.approx(0.1)
    assert lrs["neck.lateral_convs.0.conv.weight"] == pytest.approx(0.01)


def test_classes_given_or_read_from_the_annotation_file(shapes):
    cfg = resolve(MASK, classes=["cat", "dog"])
    assert cfg.model.roi_head.bbox_head.num_classes == 2 and cfg.model.roi_head.mask_head.num_classes == 2
    assert cfg.train_dataloader.dataset.metainfo.classes == ("cat", "dog")
    inferred = resolve(
        classes=None,
        learning_rate=0.01,
        override_mmdet_config={
            "data_root": f"{shapes}/",
            "train_dataloader.dataset.ann_file": "annotations/train.json",
        },
    )
    assert inferred.model.roi_head.bbox_head.num_classes == 3
    assert inferred.val_dataloader.dataset.metainfo.classes == ("circle", "square", "triangle")


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"optimizer": "rmsprop"}, "hyperparameters.optimizer: 'rmsprop' is not one of sgd, adamw, adam, adagrad"),
        ({"learning_rate_scheduler": "cosine"}, "'cosine' is not one of warmup_linear, warmup_cosine,"),
        ({"precision": 8}, "hyperparameters.precision: 8 is not one of 16, 32, bf16"),
        ({"learning_rate": -1}, "hyperparameters.learning_rate: -1 must be > 0"),
        ({"learning_rate": "fast"}, "hyperparameters.learning_rate: 'fast' is not a number"),
        ({"extra_optim_args": "momentum"}, "hyperparameters.extra_optim_args: 'momentum' is not name=value"),
        ({"image_min_size": 0}, "hyperparameters.image_min_size: 0 must be >= 1"),
        ({"iou_threshold": 2}, "hyperparameters.iou_threshold: 2 must be within (0, 1]"),
        ({"early_stopping": "yes"}, "hyperparameters.early_stopping: 'yes' is not true or false"),
        ({"training_batch_size": 2.5}, "hyperparameters.training_batch_size: 2.5 is not an integer"),
        ({"warmup_steps": 10}, "hyperparameters.warmup_steps needs learning_rate_scheduler"),
        ({"task_name": "image-instance-segmentation"}, "needs a model with masks; FasterRCNN has none"),
        ({"task_name": "classification"}, "'classification' is not one of image-object-detection,"),
        ({"number_of_epochs": 3, "max_steps": 10}, "give number_of_epochs or max_steps, not both"),
        ({"metric_for_best_model": "f1"}, "'f1' is not one of mean_average_precision, precision, recall"),
        ({"classes": "cat"}, "hyperparameters.classes: 'cat' is not a non-empty list of names"),
    ],
)
def test_bad_knob_values_are_one_line_errors(tmp_path, capsys, knobs, message):
    exp = write_experiment(tmp_path, {"global_batch_size": 2, "config_file": FASTER, "classes": ["a"], **knobs})
    assert main(["train", str(exp), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_print_config_shows_knobs(tmp_path):
    exp = write_experiment(tmp_path, {"training_batch_size": 3, "config_file": FASTER, "classes": ["a"],
                                      "optimizer": "adam", "learning_rate": 0.0003})  # fmt: skip
    r = det_mmdet("train", exp, "--print-config")
    assert r.returncode == 0, r.stderr
    assert "type='Adam'" in r.stdout and "lr=0.0003" in r.stdout and "batch_size=3" in r.stdout


def test_training_knobs_early_stopping_checkpoint_limit_and_per_slot_batch(tmp_path, shapes):
    hparams = shapes_hparams(shapes, **{"optim_wrapper.optimizer.lr": 0.0})  # nothing improves
    del hparams["global_batch_size"]
    hparams.update(training_batch_size=2, early_stopping=True, early_stopping_patience=1, save_total_limit=1)
    exp = write_experiment(tmp_path, hparams)
    out = tmp_path / "run"
    r = det_mmdet("train", exp, "--output-dir", out, "--max-batches", 40, "--validation-period", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    validations = [x["batches"] for x in read_metrics(out) if x["group"] == "validation"]
    assert validations == [4, 8]  # the second validation did not beat the first: stop
    assert "early stopping: bbox_mAP has not improved" in r.stderr
    checkpoints = [d for d in (out / "checkpoints").iterdir() if d.is_dir()]
    assert len(checkpoints) == 1
    training = [x for x in read_metrics(out) if x["group"] == "training"]
    assert training[-1]["epochs"] == 0  # 8 batches of 2 of 48 images: still the first epoch


def test_readme_documents_every_knob():
    from conftest import ROOT
    from det_mmdet.knobs import KNOBS

    readme = (ROOT / "README.md").read_text()
    for name, meaning in KNOBS.items():
        assert f"| `{name}` | {meaning} |" in readme, name
