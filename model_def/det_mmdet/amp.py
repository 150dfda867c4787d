"""Mixed precision as mmengine configures it: ``AmpOptimWrapper``'s autocast and loss scaler for training,
``val_cfg.fp16`` for validation.

The trial decides both before it wraps the model, because Determined takes a scaler only before
``wrap_model``. ``loss_scale`` keeps mmengine's three meanings: ``"dynamic"`` (the default), a number (a
fixed scale: mmengine hands it to every ``update()``, so the scale never moves), or a dict of
``torch.amp.GradScaler`` arguments. Validation runs in float32 unless ``val_cfg.fp16`` asks for float16,
also when training with ``AmpOptimWrapper``: the Runner's ``ValLoop`` does not use the optimizer's autocast.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import torch

from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")

KINDS = ("OptimWrapper", "AmpOptimWrapper")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class FixedLossScale(torch.amp.GradScaler):
    """A numeric ``loss_scale``: steps with inf/NaN gradients are skipped, the scale stays where it is."""

    def __init__(self, scale: float) -> None:
        super().__init__("cuda", init_scale=scale)
        self.fixed = scale

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        super().update(self.fixed if new_scale is None else new_scale)


def settings(
    wrapper_cfg: dict[str, Any], device: torch.device
) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler | None]:
    """``optim_wrapper``'s ``type``, ``dtype`` and ``loss_scale`` -> (autocast context, scaler or None)."""
    kind = wrapper_cfg.get("type", "OptimWrapper")
    if kind not in KINDS:
        raise UserError(f"optim_wrapper.type {kind!r}: choose OptimWrapper or AmpOptimWrapper")
    if kind == "OptimWrapper":
        return contextlib.nullcontext(), None
    dtype = wrapper_cfg.get("dtype") or "float16"
    if dtype not in DTYPES:
        raise UserError(f"optim_wrapper.dtype {dtype!r}: choose float16 or bfloat16")
    with warnings.catch_warnings():  # without CUDA, torch says the scaler is disabled: here it is only checked
        warnings.filterwarnings("ignore", message=".*GradScaler is enabled, but CUDA is not available.*")
        scaler = _scaler(wrapper_cfg.get("loss_scale", "dynamic"))  # checked for bfloat16 too, as mmengine does
    if DTYPES[dtype] == torch.bfloat16:
        scaler = None  # bfloat16 has float32's range: nothing to scale
    if device.type != "cuda":
        # mmcv's CPU kernels (nms, RoIAlign) are float32-only, as mmengine's AmpOptimWrapper knows.
        logger.warning("optim_wrapper.type AmpOptimWrapper: no GPU here, training in float32")
        return contextlib.nullcontext(), None
    return torch.autocast(device_type="cuda", dtype=DTYPES[dtype]), scaler


def validation(val_cfg: dict[str, Any], device: torch.device) -> contextlib.AbstractContextManager:
    """``val_cfg.fp16`` as mmengine's ``ValLoop`` reads it: float16 autocast around each validation step."""
    if not val_cfg.get("fp16"):
        return contextlib.nullcontext()
    if device.type != "cuda":
        logger.warning("val_cfg.fp16: no GPU here, validating in float32")
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.float16)


def _scaler(loss_scale: Any) -> torch.amp.GradScaler:
    """mmengine's reading of ``loss_scale`` (checked on every device, so a CPU run refuses what a GPU would)."""
    if loss_scale == "dynamic":
        return torch.amp.GradScaler("cuda")
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool) and loss_scale > 0:
        return FixedLossScale(float(loss_scale))
    if isinstance(loss_scale, dict):
        try:
            return torch.amp.GradScaler("cuda", **loss_scale)
        except TypeError as exc:
            message = f"optim_wrapper.loss_scale {loss_scale!r}: not torch.amp.GradScaler's arguments ({exc})"
            raise UserError(message) from None
    raise UserError(
        f"optim_wrapper.loss_scale {loss_scale!r}: choose 'dynamic', a positive number (a fixed scale) "
        "or a dict of torch.amp.GradScaler arguments"
    )
