"""Determined's local mode, as ``det-mmdet train`` runs it: no master, same trial, same Trainer.

``pytorch.init()`` keeps local checkpoints under ``~/.local/share/determined``; here the core
context is assembled from Determined's own local ("dummy") parts so that checkpoints land in
``OUTPUT/checkpoints/<uuid>/`` (written under a temporary name and renamed when complete) and
every metrics report is appended to ``OUTPUT/metrics.jsonl`` and shown on a progress bar.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import shutil
import sys
from collections.abc import Iterator
from typing import Any

from determined import core, pytorch
from determined.common.storage import SharedFSStorageManager

from det_mmdet.checkpoint import PARTIAL
from det_mmdet.config import CONTEXT_DIR

logger = logging.getLogger("det_mmdet")


class AtomicStorage(SharedFSStorageManager):
    """Local checkpoints: complete or absent, and with the context directory as their code.

    A checkpoint is written under a temporary name and renamed once Determined has written its
    ``metadata.json``, so a killed run never leaves a half checkpoint under a real name. Determined's
    local mode also copies the working directory into every checkpoint (``code/``); while a
    checkpoint is written the working directory is ``model_def/``, the code a cluster would store.
    """

    def __init__(self, base_path: pathlib.Path, keep: int | None = None) -> None:
        super().__init__(str(base_path.resolve()))
        self.keep = keep  # newest complete checkpoints to keep (mmengine's max_keep_ckpts); None: all
        for leftover in pathlib.Path(self._base_path).glob(PARTIAL + "*"):
            shutil.rmtree(leftover)  # from a process that was killed mid-write

    @contextlib.contextmanager
    def store_path(self, dst: str) -> Iterator[pathlib.Path]:
        partial = pathlib.Path(self._base_path, PARTIAL + dst)
        partial.mkdir(parents=True)
        previous = os.getcwd()
        os.chdir(CONTEXT_DIR)
        try:
            yield partial
        finally:
            os.chdir(previous)
        os.replace(partial, pathlib.Path(self._base_path, dst))
        if self.keep:
            self._prune(self.keep)

    def _prune(self, keep: int) -> None:
        from det_mmdet.checkpoint import is_complete, steps_completed

        done = [d for d in pathlib.Path(self._base_path).iterdir() if d.is_dir() and is_complete(d)]
        done.sort(key=lambda d: (steps_completed(d), d.stat().st_mtime))
        for old in done[:-keep]:
            shutil.rmtree(old)
            logger.info("removed checkpoint %s (keeping the newest %d)", old.name, keep)


class LocalTrainContext(core.DummyTrainContext):
    """Writes each report to ``metrics.jsonl`` and keeps a progress bar (chief only)."""

    def __init__(
        self, metrics_path: pathlib.Path, show_progress: bool, tensorboard_dir: pathlib.Path | None = None
    ) -> None:
        super().__init__()
        self.metrics_path = metrics_path
        self.writer = None  # the same scalars for TensorBoard, next to the validation pictures
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))
        self.bar = None
        if show_progress and sys.stderr.isatty():  # a log file or a web UI gets one plain line per report
            from tqdm import tqdm

            self.bar = tqdm(
                total=1000, desc="train", unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}"
            )

    def _report_trial_metrics(
        self,
        group: str,
        steps_completed: int,
        metrics: dict[str, Any],
        batch_metrics: list[dict[str, Any]] | None = None,
    ) -> None:
        values = {k: _number(v) for k, v in metrics.items() if k not in ("batches", "epochs")}
        record = {
            "group": group,
            "batches": metrics.get("batches", steps_completed),
            "epochs": metrics.get("epochs", 0),
            "metrics": values,
        }
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{group}/{key}", value, record["batches"])
            self.writer.flush()
        shown = {k: v for k, v in values.items() if k in ("loss", "lr", "bbox_mAP", "segm_mAP")}
        line = f"[{group} @ batch {record['batches']}] " + " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        if self.bar is not None:
            self.bar.set_postfix_str(line, refresh=True)
            if group == "validation":
                self.bar.write(line)
        else:
            logger.info(line)

    def report_progress(self, progress: float) -> None:
        if self.bar is not None:
            self.bar.update(round(progress * 1000) - self.bar.n)

    def set_status(self, status: str) -> None:
        logger.debug("status: %s", status)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _number(value: Any) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return None if math.isnan(number) else number


@contextlib.contextmanager
def local_context(
    hparams: dict[str, Any],
    exp_conf: dict[str, Any],
    output_dir: pathlib.Path,
    distributed: core.DistributedContext | None,
    aggregation_frequency: int = 1,
    show_progress: bool = True,
    keep_checkpoints: int | None = None,
) -> Iterator[pytorch.PyTorchTrialContext]:
    """What ``det.pytorch.init()`` builds off-cluster, with our storage and metrics sinks."""
    distributed = distributed or core.DummyDistributedContext()
    storage_dir = output_dir / "checkpoints"
    storage_dir.mkdir(parents=True, exist_ok=True)
    chief = distributed.get_rank() == 0
    tensorboard = output_dir / "tensorboard" if chief else None
    train = LocalTrainContext(output_dir / "metrics.jsonl", show_progress and chief, tensorboard)
    core_context = core.Context(
        checkpoint=core.DummyCheckpointContext(distributed, AtomicStorage(storage_dir, keep_checkpoints)),
        distributed=distributed,
        preempt=core.DummyPreemptContext(distributed, core.PreemptMode.WorkersAskChief),
        train=train,
        searcher=core.DummySearcherContext(distributed),
        profiler=core.DummyProfilerContext(),
    )
    try:
        with core_context:
            yield pytorch.PyTorchTrialContext(
                core_context=core_context,
                trial_seed=None,
                hparams=hparams,
                slots_per_trial=distributed.get_size(),
                num_gpus=_num_gpus(),
                exp_conf=exp_conf,
                aggregation_frequency=aggregation_frequency,
                steps_completed=0,
                managed_training=True,
                debug_enabled=False,
                enable_tensorboard_logging=False,
            )
    finally:
        train.close()


def _num_gpus() -> int:
    import torch

    return torch.cuda.device_count()
