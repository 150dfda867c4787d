"""A hook for the tests, run by mmengine's Runner and by det-mmdet alike (``custom_imports``).

It writes one JSON line per training batch (the batch's image shapes, the loss terms, and what the
MessageHub says at that moment) and one per validation (the metrics) to ``path``: what two trainers
did can then be compared line by line.
"""

from __future__ import annotations

import json

import torch
from mmdet.registry import HOOKS
from mmengine.hooks import Hook


@HOOKS.register_module()
class RecordHook(Hook):
    priority = "LOWEST"

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        hub = runner.message_hub
        self.seen = {k: hub.get_info(k) for k in ("iter", "epoch", "max_iters", "max_epochs")}

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._write(
            {
                "rank": runner.rank,
                "iter": runner.iter,
                "epoch": runner.epoch,
                "batch_idx": batch_idx,
                "hub": self.seen,
                "shapes": [list(x.shape) for x in data_batch["inputs"]],
                "losses": {k: float(v) for k, v in outputs.items()},
                "weights_sum": float(sum(p.detach().double().sum() for p in runner.model.parameters())),
            }
        )

    def after_val_epoch(self, runner, metrics=None) -> None:
        scalars = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float, torch.Tensor))}
        self._write({"validation_at": runner.iter, "epoch": runner.epoch, "metrics": scalars})
