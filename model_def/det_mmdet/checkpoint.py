"""What a checkpoint holds besides Determined's own state, and finding checkpoints on disk.

Every checkpoint directory gets ``model.pth`` (the bare model ``state_dict`` and
``meta.dataset_meta``: tensors and plain Python types only, so ``torch.load(weights_only=True)``
accepts it) and ``config.py`` (the resolved config, credentials redacted), which is exactly what
``mmdet.apis.DetInferencer(model="config.py", weights="model.pth")`` needs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from determined import pytorch

from det_mmdet.config import pretty_text

PARTIAL = ".partial-"  # where local runs write a checkpoint before renaming it (det_mmdet.local)

logger = logging.getLogger("det_mmdet")

MODEL_FILE = "model.pth"
CONFIG_FILE = "config.py"


def allow_numpy_rng_state() -> None:
    """Let ``torch.load(weights_only=True)`` read Determined's checkpoints.

    Determined saves ``np.random.get_state()`` (a numpy array) with the RNG state and restores it
    with a plain ``torch.load``; since torch 2.6 that load is ``weights_only`` and refuses numpy
    arrays. Allowing numpy's array reconstruction (data only, no code) keeps the safe loader on.
    """
    import numpy as np

    torch.serialization.add_safe_globals(
        [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    )


def plain(value: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python: what ``weights_only`` loading allows."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):
        return value.item()
    return value


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def write_checkpoint_files(
    directory: Path, checkpoint: dict[str, Any], cfg, dataset_meta: dict[str, Any], text: str | None = None
) -> None:
    """``model.pth`` from an mmengine-format checkpoint (as the hooks left it) and ``config.py``.

    With EMAHook that is mmengine's layout: the averaged weights as ``state_dict`` (what mmdet
    evaluates and publishes), the trained ones kept in ``ema_state_dict``.
    """
    meta = {k: dataset_meta[k] for k in ("classes", "palette") if k in dataset_meta}
    saved = {k: to_cpu(v) for k, v in checkpoint.items() if k != "meta"}
    saved["meta"] = plain(
        {**{k: v for k, v in checkpoint["meta"].items() if k != "dataset_meta"}, "dataset_meta": meta}
    )
    torch.save(saved, directory / MODEL_FILE)
    (directory / CONFIG_FILE).write_text(text if text is not None else pretty_text(cfg))


def weights_kind(saved: dict[str, Any]) -> str:
    """Which weights a ``model.pth`` holds as its ``state_dict``, in words."""
    if "ema_state_dict" in saved:
        steps = saved["ema_state_dict"].get("steps")
        return (
            f"EMA weights (EMAHook, {int(steps) if steps is not None else '?'} updates); trained ones in ema_state_dict"
        )
    return "the trained weights"


def to_cpu(value: Any) -> Any:
    """Tensors (inside dicts, lists and tuples too) detached and on the CPU."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


class ExportOnCheckpoint(pytorch.PyTorchCallback):
    """Adds ``model.pth`` and ``config.py`` to each checkpoint as Determined writes it (chief only).

    The weights are the checkpoint the hooks made for this save (``hooks.HooksCallback``), so an
    EMA run publishes its averaged weights, as mmengine's checkpoints do.
    """

    def __init__(self, trial, hook_state) -> None:
        self.trial, self.hook_state = trial, hook_state
        self.text: str | None = None  # the config does not change during training: format it once

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        if self.text is None:
            self.text = pretty_text(self.trial.cfg)
        saved = self.hook_state.take_checkpoint()
        write_checkpoint_files(Path(checkpoint_dir), saved, self.trial.cfg, self.trial.train_set.metainfo, self.text)


def is_complete(directory: Path) -> bool:
    """Determined writes ``metadata.json`` last, after the trial's own files; a local run writes the
    whole checkpoint under a ``.partial-`` name first (``local.PARTIAL``), whose files may be half written."""
    if directory.name.startswith(PARTIAL):
        return False
    return (directory / "metadata.json").is_file() and (directory / "state_dict.pth").is_file()


def steps_completed(directory: Path) -> int:
    return int(json.loads((directory / "metadata.json").read_text()).get("steps_completed", 0))


def newest_checkpoint(checkpoints: Path) -> Path | None:
    """The complete checkpoint with the most batches trained under ``checkpoints``, if any."""
    done = [d for d in checkpoints.iterdir() if d.is_dir() and is_complete(d)] if checkpoints.is_dir() else []
    return max(done, key=lambda d: (steps_completed(d), d.stat().st_mtime), default=None)
