"""Checkpoints written by mmengine's Runner (``epoch_N.pth``, ``iter_N.pth``, ``best_*.pth``), read safely.

The Runner saves its MessageHub (``HistoryBuffer`` objects, whose statistics table pickles as
``getattr(HistoryBuffer, "mean")`` and the like) and numpy values (seeds, learning rates, arrays) beside
the weights. torch's ``weights_only`` loader refuses those; this loader stays ``weights_only`` and
allows exactly them: ``HistoryBuffer``, numpy's array and scalar reconstruction and dtypes, and in
place of ``builtins.getattr`` a function that only returns a HistoryBuffer's own statistics methods.
A checkpoint that needs anything else is refused in one line naming it; nothing else is unpickled.
"""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from det_mmdet.errors import UserError


def history_method(obj: Any, name: str) -> Any:
    """``getattr`` as a HistoryBuffer's pickle uses it, and for nothing else."""
    from mmengine.logging import HistoryBuffer

    # The buffer's table of statistics holds HistoryBuffer.mean & co., which pickle by qualified name.
    # Only its own public functions (min, max, mean, current): no way out to anything else.
    member = vars(HistoryBuffer).get(name) if obj is HistoryBuffer and isinstance(name, str) else None
    if inspect.isfunction(member) and not name.startswith("_"):
        return member
    shown = obj.__name__ if isinstance(obj, type) else type(obj).__name__
    raise pickle.UnpicklingError(f"getattr({shown}, {name!r}) is not a HistoryBuffer statistic")


def allowed() -> list[Any]:
    from mmengine.logging import HistoryBuffer

    dtypes = [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")]
    return [
        HistoryBuffer,
        np._core.multiarray._reconstruct,
        np._core.multiarray.scalar,
        np.ndarray,
        np.dtype,
        *dtypes,
        (history_method, "builtins.getattr"),
    ]


def names(entries: list[Any]) -> set[str]:
    out = set()
    for entry in entries:
        if isinstance(entry, tuple):
            out.add(entry[1])
        else:
            out.add(f"{entry.__module__}.{entry.__qualname__}")
    return out


def load(path: Path, what: str) -> dict[str, Any]:
    """The whole checkpoint dict; ``what`` (e.g. "load_from: URL") begins the one-line refusal."""
    entries = allowed()
    unknown = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - names(entries))
    if unknown:
        raise UserError(
            f"{what}: needs classes that neither torch's weights-only loader nor det-mmdet's "
            f"allow-list for mmengine checkpoints accepts: {', '.join(unknown)}; it was not unpickled"
        )
    # The context removes what it added on exit: leave alone what was allowed already (Determined's RNG state).
    present = torch.serialization.get_safe_globals()
    try:
        with torch.serialization.safe_globals([e for e in entries if e not in present]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{what}: not a checkpoint torch can read ({first})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{what}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


# What Runner.resume reads from a checkpoint besides the weights.
RESUME_KEYS = ("meta", "optimizer", "message_hub")


def check_resumable(checkpoint: dict[str, Any], what: str) -> dict[str, Any]:
    """The checkpoint's ``meta`` when it holds everything ``Runner.resume`` reads; else one line saying what not."""
    missing = [k for k in RESUME_KEYS if k not in checkpoint]
    meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), dict) else {}
    missing += [f"meta.{k}" for k in ("epoch", "iter") if k not in meta]
    if missing:
        raise UserError(
            f"{what}: resume=True needs a checkpoint written by mmengine's Runner or `det-mmdet export --mmengine`; "
            f"this one has no {', '.join(missing)} (resume=False loads its weights only)"
        )
    if isinstance(checkpoint.get("param_schedulers"), dict):
        raise UserError(f"{what}: param_schedulers for several optimizers: det-mmdet trains one optimizer")
    return meta
