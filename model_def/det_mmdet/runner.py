"""One ``fit`` for both worlds: training length and periods, then Determined's ``Trainer``.

Lengths come from the command line (``--max-batches`` / ``--max-epochs``), else from the
searcher (``time_metric`` + ``max_time``, what ASHA stops on), else from the mmdet config's
``train_cfg`` (``max_epochs`` / ``max_iters``). Periods are in batches when given; otherwise
validation follows ``train_cfg.val_interval`` in the loop's own unit.

Checkpoints: policy ``all`` everywhere, so every validation leaves a checkpoint (Determined's
``best`` would skip those that do not beat the experiment's best, and a restarted or preempted
trial would go back to its last improving validation, or to batch 0); ``--checkpoint-period``
adds more. Determined's checkpoint GC (``checkpoint_storage.save_trial_best`` / ``save_trial_latest``)
decides what is kept.
"""

from __future__ import annotations

import bisect
import logging
import sys
from collections import abc
from dataclasses import dataclass
from typing import Any

from determined import pytorch

from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")


# Training metrics every N batches, Determined's own default: on a cluster each report is a master
# round trip, an allgather of the metrics and a preemption check (bench/README.md, "report boundary").
DEFAULT_REPORT_PERIOD = 100


@dataclass
class Schedule:
    max_length: pytorch.TrainUnit
    validation_period: pytorch.TrainUnit | None
    checkpoint_period: pytorch.TrainUnit | None
    reporting_period: pytorch.TrainUnit


def schedule(
    cfg,
    exp_conf: dict[str, Any],
    max_batches: int | None = None,
    max_epochs: int | None = None,
    validation_period: int | None = None,
    checkpoint_period: int | None = None,
    reporting_period: int | None = None,
) -> Schedule:
    if max_batches is not None and max_epochs is not None:
        raise UserError("give --max-batches or --max-epochs, not both")
    for name, value in (
        ("--max-batches", max_batches),
        ("--max-epochs", max_epochs),
        ("--validation-period", validation_period),
        ("--checkpoint-period", checkpoint_period),
        ("--report-period", reporting_period),
    ):
        if value is not None and value < 1:
            raise UserError(f"{name} must be a positive number of batches/epochs, got {value}")

    train_cfg = cfg.get("train_cfg") or {}
    epoch_based = "max_epochs" in train_cfg or train_cfg.get("type") == "EpochBasedTrainLoop"
    searcher = exp_conf.get("searcher") or {}
    if max_batches is not None:
        length: pytorch.TrainUnit = pytorch.Batch(max_batches)
    elif max_epochs is not None:
        length = pytorch.Epoch(max_epochs)
    elif searcher.get("time_metric") in ("batches", "epochs") and searcher.get("max_time"):
        unit = pytorch.Batch if searcher["time_metric"] == "batches" else pytorch.Epoch
        length = unit(int(searcher["max_time"]))
    elif epoch_based and train_cfg.get("max_epochs"):
        length = pytorch.Epoch(int(train_cfg["max_epochs"]))
    elif train_cfg.get("max_iters"):
        length = pytorch.Batch(int(train_cfg["max_iters"]))
    else:
        raise UserError("training length unknown: pass --max-batches or --max-epochs (train_cfg has neither)")

    if validation_period is not None:
        val: pytorch.TrainUnit | None = pytorch.Batch(validation_period)
    elif train_cfg.get("val_interval") or train_cfg.get("dynamic_intervals"):
        unit = pytorch.Epoch if epoch_based else pytorch.Batch
        interval = int(train_cfg.get("val_interval") or 1)
        begin = int(train_cfg.get("val_begin") or 1)
        dynamic = train_cfg.get("dynamic_intervals") or []
        val = unit(ValidationPoints(interval, begin, dynamic) if dynamic or begin > 1 else interval)
    else:
        val = None
    ckpt = pytorch.Batch(checkpoint_period) if checkpoint_period else None
    report = pytorch.Batch(reporting_period or DEFAULT_REPORT_PERIOD)
    return Schedule(length, val, ckpt, report)


class ValidationPoints(abc.Container):
    """The epoch (or batch) counts after which mmengine's train loops validate.

    ``train_cfg.val_begin`` and ``dynamic_intervals`` (``[(from_epoch, interval), ...]``, RTMDet and
    YOLOX validate every epoch near the end) as the loops apply them; Determined takes a container
    as a validation schedule and always validates at the end of training.
    """

    def __init__(self, interval: int, begin: int = 1, dynamic: list | tuple = ()) -> None:
        pairs = sorted((int(at), int(every)) for at, every in dynamic)
        for at, every in pairs:
            if every < 1:
                raise UserError(f"train_cfg.dynamic_intervals: interval {every} (from {at}) must be at least 1")
        if interval < 1:
            raise UserError(f"train_cfg.val_interval must be at least 1, got {interval}")
        self.begin = begin
        self.milestones = [0] + [at for at, _ in pairs]
        self.intervals = [interval] + [every for _, every in pairs]

    def __contains__(self, count: object) -> bool:
        if not isinstance(count, int) or count < self.begin:
            return False
        interval = self.intervals[bisect.bisect(self.milestones, count + 1) - 1]
        return count % interval == 0

    def describe(self, unit: str) -> str:
        pairs = zip(self.milestones, self.intervals, strict=True)
        steps = [f"every {n} {unit}" + (f" from {at}" if at else "") for at, n in pairs]
        return ", ".join(steps) + (f", from {unit} {self.begin} on" if self.begin > 1 else "")

    def __repr__(self) -> str:
        return f"ValidationPoints(begin={self.begin}, milestones={self.milestones}, intervals={self.intervals})"


def aggregation_frequency(cfg) -> int:
    """mmengine's ``optim_wrapper.accumulative_counts`` is Determined's gradient aggregation frequency."""
    return int((cfg.get("optim_wrapper") or {}).get("accumulative_counts", 1))


def fit(
    trial: pytorch.PyTorchTrial,
    context: pytorch.PyTorchTrialContext,
    plan: Schedule,
    latest_checkpoint: str | None,
    checkpoint_policy: str = "all",
    resume_at_batch: int = 0,
) -> None:
    continues_at = int(getattr(trial, "continues_at", 0))
    if latest_checkpoint is None and continues_at:  # resume=True from a Runner checkpoint, not restarted since
        latest_checkpoint, resume_at_batch = seed_checkpoint(trial, context, plan, continues_at), continues_at
    if resume_at_batch:
        controller(trial, context, plan, latest_checkpoint, resume_at_batch).run()
    else:
        trainer = pytorch.Trainer(trial, context)
        trainer.fit(
            max_length=plan.max_length,
            validation_period=plan.validation_period,
            checkpoint_period=plan.checkpoint_period,
            reporting_period=plan.reporting_period,
            latest_checkpoint=latest_checkpoint,
            checkpoint_policy=checkpoint_policy,
        )
    final_report = getattr(trial, "final_report", None)
    if final_report is not None:
        final_report()


def controller(
    trial: pytorch.PyTorchTrial,
    context: pytorch.PyTorchTrialContext,
    plan: Schedule,
    latest_checkpoint: str | None,
    steps_completed: int,
) -> pytorch._PyTorchTrialController:
    """``Trainer.fit``'s controller for a run continuing from a checkpoint taken at ``steps_completed``.

    Determined's local mode always starts its data stream and batch count at 0 (only a cluster
    passes the trial's steps completed), and a cluster passes only the steps of its own checkpoints;
    a run resumed locally, or continuing a Runner checkpoint, would replay the first batches and
    count validation periods and epoch ends from the restart. This builds the same controller that
    ``Trainer.fit`` builds, with the checkpoint's batch count, as the cluster does after a restart.
    """
    import determined as det

    info = det.get_cluster_info()
    on_cluster = info is not None and info.task_type == "TRIAL"
    searcher = (info.trial._config.get("searcher") or {}) if on_cluster else {}
    return pytorch._PyTorchTrialController(
        trial_inst=trial,
        context=context,
        checkpoint_period=plan.checkpoint_period or pytorch.Batch(sys.maxsize),
        validation_period=plan.validation_period or pytorch.Batch(sys.maxsize),
        smaller_is_better=bool(searcher.get("smaller_is_better", True)),
        steps_completed=steps_completed,
        latest_checkpoint=latest_checkpoint,
        local_training=not on_cluster,
        test_mode=False,
        reporting_period=plan.reporting_period,
        searcher_metric_name=searcher.get("metric"),
        checkpoint_policy="all",
        step_zero_validation=False,
        max_length=plan.max_length,
        global_batch_size=None,
        profiling_enabled=False,
    )


def seed_checkpoint(
    trial: pytorch.PyTorchTrial, context: pytorch.PyTorchTrialContext, plan: Schedule, steps: int
) -> str:
    """A Determined checkpoint of the trial as built (a Runner checkpoint restored), at batch ``steps``.

    Determined counts batches from its own checkpoints only; this one, written by Determined's own
    checkpoint code with the Runner's iteration as batches trained, is where the run then continues
    (and where a restart on a cluster comes back to before the next checkpoint).
    """
    first = controller(trial, context, plan, None, steps)
    epoch_len = max(1, int(getattr(trial, "epoch_len", 1)))
    # The Runner validated (or chose not to) before it saved: no validation is due at this batch.
    first.state = pytorch._TrialState(
        trial_id=first.trial_id, batches_trained=steps, epochs_trained=steps // epoch_len, last_val=steps
    )
    stored = StorageId()
    first.callbacks["det_mmdet_seed_checkpoint"] = stored
    first._checkpoint(already_exiting=False)
    if not stored.uuid:
        raise RuntimeError("Determined reported no storage id for the checkpoint it wrote")
    return stored.uuid


class StorageId(pytorch.PyTorchCallback):
    """The storage id Determined gives a checkpoint (every rank hears it)."""

    uuid = ""

    def on_checkpoint_upload_end(self, uuid: str) -> None:
        self.uuid = uuid
