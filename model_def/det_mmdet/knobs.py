"""Fine-tune knobs: plain hyperparameters translated into the mmdet config.

The names and meanings follow Azure ML's mmdetection fine-tuning component, plus AutoGluon
AutoMM's ``head_lr_multiplier``. They are applied to the config after ``merge_config`` and before
``override_mmdet_config``, so an explicit override still wins. ``KNOBS`` documents each one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import yaml

from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")

TASKS = ("image-object-detection", "image-instance-segmentation")
OPTIMIZERS = {"sgd": "SGD", "adamw": "AdamW", "adam": "Adam", "adagrad": "Adagrad"}
SCHEDULERS = (
    "warmup_linear",
    "warmup_cosine",
    "warmup_cosine_with_restarts",
    "warmup_polynomial",
    "constant",
    "warmup_constant",
)
PRECISIONS = {"16": "float16", "32": None, "bf16": "bfloat16"}
METRICS = {"mean_average_precision": "mAP", "precision": "mAP_50", "recall": "AR@100"}
# What apply_augmentations: false keeps of a training pipeline: loading, resizing, packing.
ESSENTIAL_STEPS = ("LoadImageFromFile", "LoadAnnotations", "Resize", "PackDetInputs", "FilterAnnotations")

# knob -> what it changes (the README's table is this list).
KNOBS = {
    "task_name": "checks the model: image-instance-segmentation needs a mask head",
    "learning_rate": "optim_wrapper.optimizer.lr",
    "optimizer": "optim_wrapper.optimizer.type (sgd, adamw, adam, adagrad; SGD gets momentum 0.9)",
    "weight_decay": "optim_wrapper.optimizer.weight_decay",
    "extra_optim_args": 'more optimizer arguments: "momentum=0.9; nesterov=True" (values are YAML data)',
    "learning_rate_scheduler": "param_scheduler: warm-up (LinearLR) then linear, cosine, cosine with one restart, "
    "polynomial or constant",
    "warmup_steps": "iterations of the linear warm-up (0: none)",
    "max_grad_norm": "optim_wrapper.clip_grad.max_norm",
    "precision": "16: AmpOptimWrapper float16, bf16: AmpOptimWrapper bfloat16, 32: OptimWrapper",
    "gradient_accumulation_step": "optim_wrapper.accumulative_counts (Determined's aggregation_frequency)",
    "image_min_size": "short side of every Resize step (train, val, test), keep_ratio",
    "image_max_size": "long side of every Resize step (train, val, test), keep_ratio",
    "apply_augmentations": "false: the training pipeline keeps only loading, Resize and PackDetInputs",
    "number_of_workers": "num_workers of every dataloader",
    "training_batch_size": "train_dataloader.batch_size, per slot (global_batch_size = it x slots)",
    "validation_batch_size": "val_dataloader.batch_size and test_dataloader.batch_size",
    "number_of_epochs": "train_cfg: EpochBasedTrainLoop max_epochs",
    "max_steps": "train_cfg: IterBasedTrainLoop max_iters",
    "box_score_threshold": "model.test_cfg score_thr (rcnn stage for two-stage models)",
    "iou_threshold": "model.test_cfg nms iou_threshold (rcnn stage for two-stage models)",
    "random_seed": "randomness.seed",
    "metric_for_best_model": "validation metric to select on: mean_average_precision -> bbox_mAP (segm_mAP for "
    "segmentation), precision -> bbox_mAP_50, recall -> bbox_AR@100; must equal searcher.metric",
    "early_stopping": "stop a trial whose metric has not improved for early_stopping_patience validations",
    "early_stopping_patience": "validations without improvement before stopping (default 3)",
    "save_total_limit": "default_hooks.checkpoint.max_keep_ckpts; local runs keep that many newest checkpoints",
    "auto_find_batch_size": "on CUDA out-of-memory, split each per-slot batch in halves and retry (logged)",
    "head_lr_multiplier": "paramwise_cfg.custom_keys: heads learn N times faster than backbone and neck",
    "classes": "every dataset's metainfo.classes and every num_classes (default: from the annotation file)",
}


def present(hparams: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hparams.items() if k in KNOBS and v is not None}


def apply(tree: dict[str, Any], hparams: dict[str, Any]) -> list[str]:
    """Translate the knobs in ``hparams`` into ``tree``; returns the names applied."""
    knobs = present(hparams)
    for name, value in knobs.items():
        if name in ("early_stopping_patience",):
            continue  # read with early_stopping
        HANDLERS[name](tree, value, knobs)
    return sorted(knobs)


# ---- value checks -----------------------------------------------------------------------------------


def choice(name: str, value: Any, choices) -> str:
    text = str(value).lower()
    if text not in choices:
        raise UserError(f"hyperparameters.{name}: {value!r} is not one of {', '.join(choices)}")
    return text


def number(name: str, value: Any, minimum: float = 0.0, integer: bool = False, strict: bool = False) -> Any:
    kind = int if integer else float
    try:
        if isinstance(value, bool):
            raise ValueError
        number_value = kind(value)
        if integer and number_value != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"hyperparameters.{name}: {value!r} is not {'an integer' if integer else 'a number'}") from None
    if number_value < minimum or (strict and number_value == minimum):
        raise UserError(f"hyperparameters.{name}: {value!r} must be {'>' if strict else '>='} {minimum}")
    return number_value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"hyperparameters.{name}: {value!r} is not true or false")
    return value


# ---- handlers ---------------------------------------------------------------------------------------


def _optimizer(tree: dict[str, Any]) -> dict[str, Any]:
    wrapper = tree.setdefault("optim_wrapper", {"type": "OptimWrapper"})
    return wrapper.setdefault("optimizer", {"type": "SGD", "lr": 0.02})


def task_name(tree, value, knobs) -> None:
    task = choice("task_name", value, TASKS)
    has_masks = bool((tree.get("model") or {}).get("roi_head", {}).get("mask_head")) or "mask_head" in (
        tree.get("model") or {}
    )
    if task == "image-instance-segmentation" and not has_masks:
        model_type = (tree.get("model") or {}).get("type")
        raise UserError(
            f"hyperparameters.task_name: image-instance-segmentation needs a model with masks; {model_type} has none"
        )


def learning_rate(tree, value, knobs) -> None:
    _optimizer(tree)["lr"] = number("learning_rate", value, strict=True)


def optimizer(tree, value, knobs) -> None:
    kind = OPTIMIZERS[choice("optimizer", value, OPTIMIZERS)]
    old = _optimizer(tree)
    new = {"type": kind, "lr": old.get("lr", 0.02), "weight_decay": old.get("weight_decay", 0.0)}
    if kind == "SGD":
        new["momentum"] = old.get("momentum", 0.9)
    tree["optim_wrapper"]["optimizer"] = new


def weight_decay(tree, value, knobs) -> None:
    _optimizer(tree)["weight_decay"] = number("weight_decay", value)


def extra_optim_args(tree, value, knobs) -> None:
    opt = _optimizer(tree)
    for part in str(value).split(";"):
        if not part.strip():
            continue
        key, sep, raw = part.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f'hyperparameters.extra_optim_args: {part.strip()!r} is not name=value ("momentum=0.9")')
        opt[key.strip()] = yaml.safe_load(raw.strip())  # data, never code


def _length(tree, knobs) -> tuple[int, bool]:
    """(total length, by_epoch) of training, for schedulers that span it."""
    train_cfg = tree.get("train_cfg") or {}
    if train_cfg.get("max_epochs"):
        return int(train_cfg["max_epochs"]), True
    if train_cfg.get("max_iters"):
        return int(train_cfg["max_iters"]), False
    raise UserError("hyperparameters.learning_rate_scheduler: the config's train_cfg has no max_epochs or max_iters")


def learning_rate_scheduler(tree, value, knobs) -> None:
    kind = choice("learning_rate_scheduler", value, SCHEDULERS)
    warmup = int(number("warmup_steps", knobs.get("warmup_steps", 0), integer=True))
    # The length knobs act before this one reads train_cfg, whatever the order they were given in.
    for name in ("number_of_epochs", "max_steps"):
        if name in knobs:
            HANDLERS[name](tree, knobs[name], knobs)
    total, by_epoch = _length(tree, knobs)
    span = {"by_epoch": by_epoch, "begin": 0, "end": total}
    if by_epoch:
        span["convert_to_iter_based"] = True
    steps: list[dict[str, Any]] = []
    if kind.startswith("warmup") and warmup > 0:
        steps.append({"type": "LinearLR", "start_factor": 0.001, "by_epoch": False, "begin": 0, "end": warmup})
    if kind == "warmup_linear":
        steps.append({"type": "LinearLR", "start_factor": 1.0, "end_factor": 0.0, **span})
    elif kind == "warmup_cosine":
        steps.append({"type": "CosineAnnealingLR", "T_max": total, "eta_min": 0.0, **span})
    elif kind == "warmup_cosine_with_restarts":  # two cosine cycles: one restart half way
        half = max(1, total // 2)
        steps.append({"type": "CosineRestartLR", "periods": [half, total - half], "restart_weights": [1.0, 1.0],
                      "eta_min": 0.0, **span})  # fmt: skip
    elif kind == "warmup_polynomial":
        steps.append({"type": "PolyLR", "power": 1.0, "eta_min": 1e-7, **span})
    tree["param_scheduler"] = steps  # constant / warmup_constant: nothing after the warm-up


def warmup_steps(tree, value, knobs) -> None:
    number("warmup_steps", value, integer=True)
    if "learning_rate_scheduler" not in knobs:
        raise UserError("hyperparameters.warmup_steps needs learning_rate_scheduler (e.g. warmup_cosine)")


def max_grad_norm(tree, value, knobs) -> None:
    tree.setdefault("optim_wrapper", {})["clip_grad"] = {"max_norm": number("max_grad_norm", value, strict=True),
                                                         "norm_type": 2}  # fmt: skip


def precision(tree, value, knobs) -> None:
    dtype = PRECISIONS[choice("precision", value, PRECISIONS)]
    wrapper = tree.setdefault("optim_wrapper", {})
    wrapper.pop("dtype", None)
    wrapper.pop("loss_scale", None)
    if dtype is None:
        wrapper["type"] = "OptimWrapper"
    else:
        wrapper["type"] = "AmpOptimWrapper"
        wrapper["dtype"] = dtype


def gradient_accumulation_step(tree, value, knobs) -> None:
    tree.setdefault("optim_wrapper", {})["accumulative_counts"] = int(
        number("gradient_accumulation_step", value, minimum=1, integer=True)
    )


def _pipelines(tree) -> list[tuple[str, list]]:
    found = []
    for split in ("train", "val", "test"):
        dataset = (tree.get(f"{split}_dataloader") or {}).get("dataset") or {}
        while "pipeline" not in dataset and isinstance(dataset.get("dataset"), dict):
            dataset = dataset["dataset"]
        if isinstance(dataset.get("pipeline"), list):
            found.append((split, dataset["pipeline"]))
    return found


def _image_size(tree, value, knobs, name: str) -> None:
    size = int(number(name, value, minimum=1, integer=True))
    resized = 0
    for _split, pipeline in _pipelines(tree):
        for step in pipeline:
            if step.get("type") == "Resize":
                long_side, short_side = step.get("scale") or (1333, 800)
                step["scale"] = (size, short_side) if name == "image_max_size" else (long_side, size)
                step["keep_ratio"] = True
                resized += 1
    if not resized:
        raise UserError(f"hyperparameters.{name}: the config's pipelines have no Resize step to size")


def image_min_size(tree, value, knobs) -> None:
    _image_size(tree, value, knobs, "image_min_size")


def image_max_size(tree, value, knobs) -> None:
    _image_size(tree, value, knobs, "image_max_size")


def apply_augmentations(tree, value, knobs) -> None:
    if boolean("apply_augmentations", value):
        return
    for split, pipeline in _pipelines(tree):
        if split != "train":
            continue
        dropped = [s.get("type") for s in pipeline if s.get("type") not in ESSENTIAL_STEPS]
        pipeline[:] = [s for s in pipeline if s.get("type") in ESSENTIAL_STEPS]
        logger.info(
            "apply_augmentations: false: removed %s from the training pipeline", ", ".join(dropped) or "nothing"
        )


def number_of_workers(tree, value, knobs) -> None:
    workers = int(number("number_of_workers", value, integer=True))
    for split in ("train", "val", "test"):
        loader = tree.get(f"{split}_dataloader")
        if loader:
            loader["num_workers"] = workers
            loader["persistent_workers"] = workers > 0


def training_batch_size(tree, value, knobs) -> None:
    tree["train_dataloader"]["batch_size"] = int(number("training_batch_size", value, minimum=1, integer=True))


def validation_batch_size(tree, value, knobs) -> None:
    size = int(number("validation_batch_size", value, minimum=1, integer=True))
    for split in ("val", "test"):
        if tree.get(f"{split}_dataloader"):
            tree[f"{split}_dataloader"]["batch_size"] = size


def number_of_epochs(tree, value, knobs) -> None:
    if "max_steps" in knobs:
        raise UserError("hyperparameters: give number_of_epochs or max_steps, not both")
    old = tree.get("train_cfg") or {}
    tree["train_cfg"] = {"type": "EpochBasedTrainLoop", "max_epochs": int(number("number_of_epochs", value, 1, True)),
                         "val_interval": old.get("val_interval", 1) if "max_epochs" in old else 1}  # fmt: skip


def max_steps(tree, value, knobs) -> None:
    steps = int(number("max_steps", value, 1, True))
    old = tree.get("train_cfg") or {}
    tree["train_cfg"] = {"type": "IterBasedTrainLoop", "max_iters": steps,
                         "val_interval": old.get("val_interval", steps) if "max_iters" in old else steps}  # fmt: skip


def _test_cfg(tree) -> dict[str, Any]:
    test_cfg = (tree.get("model") or {}).get("test_cfg")
    if not isinstance(test_cfg, dict):
        raise UserError("box_score_threshold/iou_threshold: the model has no test_cfg")
    return test_cfg.get("rcnn", test_cfg)  # two-stage models threshold their final (rcnn) stage


def box_score_threshold(tree, value, knobs) -> None:
    _test_cfg(tree)["score_thr"] = number("box_score_threshold", value)


def iou_threshold(tree, value, knobs) -> None:
    iou = number("iou_threshold", value, strict=True)
    if iou > 1:
        raise UserError(f"hyperparameters.iou_threshold: {value!r} must be within (0, 1]")
    _test_cfg(tree).setdefault("nms", {"type": "nms"})["iou_threshold"] = iou


def random_seed(tree, value, knobs) -> None:
    tree.setdefault("randomness", {})["seed"] = int(number("random_seed", value, integer=True))


def metric_name(knobs: dict[str, Any]) -> str:
    which = METRICS[choice("metric_for_best_model", knobs["metric_for_best_model"], METRICS)]
    segm = str(knobs.get("task_name", "")).lower() == "image-instance-segmentation"
    return f"{'segm' if segm and which == 'mAP' else 'bbox'}_{which}"


def metric_for_best_model(tree, value, knobs) -> None:
    name = metric_name(knobs)
    if name.endswith("AR@100"):  # CocoMetric reports recall only when asked for it
        for evaluator in (tree.get("val_evaluator"), tree.get("test_evaluator")):
            if isinstance(evaluator, dict):
                items = list(evaluator.get("metric_items") or ["mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"])
                evaluator["metric_items"] = [*items, "AR@100"] if "AR@100" not in items else items


def early_stopping(tree, value, knobs) -> None:
    boolean("early_stopping", value)
    number("early_stopping_patience", knobs.get("early_stopping_patience", 3), minimum=1, integer=True)


def save_total_limit(tree, value, knobs) -> None:
    hooks = tree.setdefault("default_hooks", {})
    checkpoint = hooks.setdefault("checkpoint", {"type": "CheckpointHook"})
    checkpoint["max_keep_ckpts"] = int(number("save_total_limit", value, minimum=1, integer=True))


def auto_find_batch_size(tree, value, knobs) -> None:
    boolean("auto_find_batch_size", value)


def head_lr_multiplier(tree, value, knobs) -> None:
    factor = number("head_lr_multiplier", value, strict=True)
    wrapper = tree.setdefault("optim_wrapper", {})
    paramwise = wrapper.setdefault("paramwise_cfg", {})
    keys = paramwise.setdefault("custom_keys", {})
    model = tree.get("model") or {}
    heads = [k for k in ("rpn_head", "roi_head", "bbox_head", "mask_head") if k in model]
    if not heads:
        raise UserError(f"hyperparameters.head_lr_multiplier: the model ({model.get('type')}) has no *_head")
    for head in heads:
        keys[head] = {**keys.get(head, {}), "lr_mult": factor}


def classes(tree, value, knobs) -> None:
    from det_mmdet.config import set_classes

    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise UserError(f"hyperparameters.classes: {value!r} is not a non-empty list of names")
    set_classes(tree, list(value))


HANDLERS: dict[str, Callable[[dict[str, Any], Any, dict[str, Any]], None]] = {
    name: globals()[name] for name in KNOBS if name != "early_stopping_patience"
}


def with_global_batch_size(hparams: dict[str, Any], slots: int) -> dict[str, Any]:
    """Determined needs ``global_batch_size``; the ``training_batch_size`` knob is per slot."""
    if hparams.get("training_batch_size") is None:
        return hparams
    total = int(number("training_batch_size", hparams["training_batch_size"], minimum=1, integer=True)) * slots
    given = hparams.get("global_batch_size")
    if given is not None and int(given) != total:
        raise UserError(
            f"hyperparameters.training_batch_size {hparams['training_batch_size']} x {slots} slots is {total}, "
            f"but global_batch_size is {given}; give one of them"
        )
    return {**hparams, "global_batch_size": total}
