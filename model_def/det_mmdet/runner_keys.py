"""Every key mmengine's Runner reads from a config, and what it means under det-mmdet.

Each key is ``honoured`` (it means what it means under the Runner), ``replaced`` (Determined does
that job; a config that sets it gets a start-up line saying by what) or ``refused`` (a config that
sets it to anything but the Runner's default stops at start-up with one ``error:`` line). The lists
are checked against mmengine's own source by tests/test_runner_keys.py, so a key a new mmengine
reads fails that test until it is classified here; README's "mmdet config keys" table is this one.
"""

from __future__ import annotations

from typing import Any

from det_mmdet.errors import UserError

HONOURED, REPLACED, REFUSED = "honoured", "replaced", "refused"

# Top-level keys of Runner.from_cfg.
TOP: dict[str, tuple[str, str]] = {
    "model": (HONOURED, "built by mmdet's registry"),
    "data_preprocessor": (HONOURED, "as the model's data_preprocessor when the model names none, as the Runner does"),
    "train_dataloader": (
        HONOURED,
        "dataset, sampler, batch_sampler, the DataLoader keys the Runner passes; batch size: global_batch_size",
    ),
    "val_dataloader": (HONOURED, "validation data"),
    "test_dataloader": (HONOURED, "`det-mmdet evaluate` / `predict`"),
    "train_cfg": (HONOURED, "see train_cfg keys"),
    "val_cfg": (HONOURED, "ValLoop (other loop types refused)"),
    "test_cfg": (HONOURED, "`det-mmdet evaluate`"),
    "auto_scale_lr": (HONOURED, "every param group's lr times global batch / base_batch_size, before the schedulers"),
    "optim_wrapper": (HONOURED, "see optim_wrapper keys"),
    "param_scheduler": (HONOURED, "by epoch or by iteration, as mmengine's ParamSchedulerHook steps them"),
    "val_evaluator": (HONOURED, "mmdet's evaluator; CocoMetric scored by data.coco_backend"),
    "test_evaluator": (HONOURED, "`det-mmdet evaluate`"),
    "default_hooks": (HONOURED, "see default_hooks keys"),
    "custom_hooks": (HONOURED, "run at the Runner's hook points (EMA, pipeline switches, ...)"),
    "load_from": (HONOURED, "weights loaded by det-mmdet (file, http(s), s3, gs)"),
    "resume": (
        HONOURED,
        "with load_from: continues that Runner checkpoint (iteration, optimizer, schedulers, hooks, MessageHub); "
        "without: refused (a det-mmdet run continues with `det-mmdet train --resume`, a trial by Determined)",
    ),
    "launcher": (REPLACED, "Determined's launcher (determined.launch.torch_distributed)"),
    "env_cfg": (HONOURED, "see env_cfg keys"),
    "log_processor": (REPLACED, "Determined's metric reports, averaged over --report-period batches"),
    "log_level": (REPLACED, "det-mmdet's start-up and report lines (--verbose for mmengine's own)"),
    "visualizer": (HONOURED, "see visualizer keys"),
    "default_scope": (HONOURED, "the registry scope (mmdet)"),
    "randomness": (HONOURED, "see randomness keys"),
    "experiment_name": (HONOURED, "the MessageHub's name the hooks read"),
    "work_dir": (REPLACED, "Determined's checkpoint storage on a cluster, --output-dir locally"),
    "compile": (HONOURED, "torch.compile (True or its options) on each batch's forward and losses, as train_step"),
    "cfg": (HONOURED, "the config itself, saved as config.py in every checkpoint"),
    "find_unused_parameters": (HONOURED, "passed to Determined's DistributedDataParallel"),
    "model_wrapper_cfg": (
        REFUSED,
        "Determined wraps the model in DistributedDataParallel (find_unused_parameters passes)",
    ),
    "sync_bn": (REFUSED, "BatchNorm is not converted; SyncBN in the model config is kept on GPUs"),
    "activation_checkpointing": (REFUSED, "activation checkpointing is not applied by det-mmdet"),
    "efficient_conv_bn_eval": (REFUSED, "conv-BN folding is not applied by det-mmdet"),
}

# Keys inside the sections, as the Runner's loops, OptimWrapper, setup_env and hooks read them.
SECTIONS: dict[str, dict[str, tuple[str, str]]] = {
    "train_cfg": {
        "type": (HONOURED, "EpochBasedTrainLoop or IterBasedTrainLoop: epochs or batches"),
        "by_epoch": (HONOURED, "as the loop type"),
        "max_epochs": (HONOURED, "training length, unless --max-epochs/--max-batches or the searcher's max_time"),
        "max_iters": (HONOURED, "training length, as max_epochs"),
        "val_begin": (HONOURED, "first validation"),
        "val_interval": (HONOURED, "validation period, unless --validation-period"),
        "dynamic_intervals": (HONOURED, "validation period changes"),
    },
    "val_cfg": {
        "type": (HONOURED, "ValLoop"),
        "fp16": (HONOURED, "float16 autocast in validation on a GPU (else float32, also with AmpOptimWrapper)"),
    },
    "optim_wrapper": {
        "type": (HONOURED, "OptimWrapper or AmpOptimWrapper"),
        "optimizer": (HONOURED, "built by mmengine's optimizer registry"),
        "paramwise_cfg": (HONOURED, "mmengine's param-wise rules"),
        "constructor": (HONOURED, "mmengine's optimizer constructors"),
        "clip_grad": (HONOURED, "gradient clipping before each step"),
        "accumulative_counts": (REPLACED, "Determined's aggregation_frequency"),
        "loss_scale": (HONOURED, "AmpOptimWrapper's 'dynamic', fixed (a number) or GradScaler-argument scale"),
        "dtype": (HONOURED, "float16 or bfloat16 autocast"),
        "use_fsdp": (REFUSED, "Determined wraps the model in DistributedDataParallel"),
    },
    "env_cfg": {
        "cudnn_benchmark": (HONOURED, "torch.backends.cudnn.benchmark"),
        "mp_cfg": (HONOURED, "start method of the loader workers, OpenCV threads in the trial and every worker"),
        "dist_cfg": (
            HONOURED,
            "backend and timeout for `train --slots N`; a cluster's group is Determined's: other values refused there",
        ),
        "resource_limit": (HONOURED, "open-file limit (RLIMIT_NOFILE), at least 4096 as under the Runner"),
    },
    "randomness": {
        "seed": (HONOURED, "the seed (on a cluster: else Determined's trial seed)"),
        "deterministic": (HONOURED, "deterministic algorithms, cudnn.benchmark off"),
        "diff_rank_seed": (HONOURED, "seed + rank for each process's random state (the data order stays shared)"),
    },
    "default_hooks": {
        "runtime_info": (HONOURED, "the MessageHub the hooks read"),
        "timer": (REPLACED, "Determined's timings"),
        "sampler_seed": (REPLACED, "det-mmdet's epoch-seeded sampler"),
        "logger": (REPLACED, "Determined's metric reports"),
        "param_scheduler": (HONOURED, "the schedulers, stepped as the hook steps them"),
        "checkpoint": (REPLACED, "Determined's checkpoints (every validation, --checkpoint-period)"),
        "visualization": (REPLACED, "det-mmdet's validation pictures (validation_pictures)"),
    },
    "visualizer": {
        "type": (HONOURED, "DetLocalVisualizer for the validation pictures"),
        "name": (HONOURED, "-"),
        "vis_backends": (
            HONOURED,
            "the chief's training and validation scalars and the config, to each backend (vis_data/ in the run)",
        ),
        "save_dir": (REPLACED, "pictures go to --output-dir/vis locally, the trial's TensorBoard on a cluster"),
        "image": (HONOURED, "-"),
        "fig_save_cfg": (HONOURED, "-"),
        "fig_show_cfg": (HONOURED, "-"),
    },
    "log_processor": {
        key: (REPLACED, "Determined's metric reports")
        for key in ("type", "window_size", "by_epoch", "custom_cfg", "num_digits", "log_with_hierarchy", "mean_pattern")
    },
}

# What the Runner does with a key left at these values: nothing to refuse or to replace.
RUNNER_DEFAULTS: dict[str, Any] = {"resume": False, "compile": False, "launcher": "none"}


def _value(cfg, key: str) -> Any:
    return cfg.get(key) if hasattr(cfg, "get") else None


def _entries(cfg):
    """``(name, status, why, value, default)`` for every classified key, top level first."""
    for key, (status, why) in TOP.items():
        yield key, status, why, _value(cfg, key), RUNNER_DEFAULTS.get(key)
    for section, keys in SECTIONS.items():
        body = _value(cfg, section) or {}
        for key, (status, why) in keys.items():
            yield f"{section}.{key}", status, why, body.get(key), False if status == REFUSED else None


def check(cfg) -> list[str]:
    """Refuse what the trial cannot honour (one ``error:`` line); return the start-up lines for the rest."""
    replaced = []
    for name, status, why, value, default in _entries(cfg):
        if value is None or value == default:
            continue
        if name == "resume" and not _value(cfg, "load_from"):
            raise UserError(
                "resume=True without load_from: the Runner would look for the newest checkpoint in work_dir; "
                "continue a det-mmdet run with `det-mmdet train --resume --output-dir DIR`, or set load_from to "
                "the Runner checkpoint to continue"
            )
        if status == REFUSED:
            raise UserError(f"{name}={value!r} is not supported by det-mmdet: {why}")
        elif status == REPLACED and not name.startswith("log_processor."):  # named once, at the top level
            replaced.append(f"{name} ({why})")
    return [f"replaced by Determined: {', '.join(replaced)}"] if replaced else []
