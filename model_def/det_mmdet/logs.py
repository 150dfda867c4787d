"""What a run prints: our lines, not the libraries' chatter.

pycocotools prints "loading annotations into memory... / creating index... / DONE (t=...)" whenever
it reads an annotation file or scores a validation, and mmengine logs an INFO line per initialised
parameter and per evaluation. Those calls run inside :func:`chatter`, which keeps their stdout and
mmengine's INFO lines to itself: with ``--verbose`` (``DET_MMDET_VERBOSE=1``, which the local worker
processes inherit) they are passed on, otherwise they are dropped. Warnings and errors are never held
back. The 12-line COCO table of the last validation is printed once, at the end of training.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

VERBOSE_ENV = "DET_MMDET_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def quiet_mmengine() -> Iterator[None]:
    """mmengine's INFO lines (one paragraph per initialised parameter, "Evaluating bbox...") held back."""
    from mmengine.logging import MMLogger

    mm_logger = MMLogger.get_current_instance()
    level = mm_logger.level
    if not verbose():
        mm_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        mm_logger.setLevel(level)


@contextlib.contextmanager
def chatter(captured: io.StringIO | None = None) -> Iterator[io.StringIO]:
    """Library stdout and mmengine INFO inside the block: kept in ``captured``, shown only when verbose."""
    buffer = captured if captured is not None else io.StringIO()
    if verbose():
        yield buffer
        return
    with contextlib.redirect_stdout(buffer), quiet_mmengine():
        yield buffer


# Known-harmless lines, each from one place; matched by message and emitter, never a blanket silence.
HARMLESS_LOG = ("It is skipped since bypass_duplicate=True",)  # mmengine: a module shared by two heads
HARMLESS_WARNINGS = (
    (FutureWarning, r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated", r"mmdet\."),
    (UserWarning, r"torch\.meshgrid: in an upcoming release", r"torch\.functional"),
)


class _DropHarmless(logging.Filter):
    def __init__(self, texts: tuple[str, ...] = HARMLESS_LOG) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


@contextlib.contextmanager
def harmless_dropped(texts: tuple[str, ...] = HARMLESS_LOG) -> Iterator[None]:
    """mmengine's known-harmless warnings (``HARMLESS_LOG``, or ``texts``) held back inside the block."""
    from mmengine.logging import MMLogger

    mm_logger, dropper = MMLogger.get_current_instance(), _DropHarmless(texts)
    if not verbose():
        mm_logger.addFilter(dropper)
    try:
        yield
    finally:
        mm_logger.removeFilter(dropper)


# mmdet's DetInferencer (the demo's pictures, predict, evaluate) on every construction: the model's config
# names the registry scope again, and its visualizer's LocalVisBackend has no save_dir (nothing is saved).
INFERENCER_LOG = ('Failed to search registry with scope "mmdet" in the "function" registry tree',)  # pseudo_collate
INFERENCER_WARNINGS = (
    (
        UserWarning,
        r"Failed to add <class 'mmengine\.visualization\.vis_backend\.LocalVisBackend'>, please provide the `save_dir`",
        r"mmengine\.visualization\.visualizer",
    ),
)


@contextlib.contextmanager
def inferencer_chatter() -> Iterator[None]:
    """Building and running mmdet's DetInferencer: "Loads checkpoint by local backend from path: ..." (printed),
    ``INFERENCER_LOG`` and ``INFERENCER_WARNINGS`` held back unless verbose."""
    if verbose():
        yield
        return
    import warnings

    with chatter(), harmless_dropped(INFERENCER_LOG), warnings.catch_warnings():
        for category, message, module in INFERENCER_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield


def ignore_harmless_warnings() -> None:
    """Python warnings that mmdet's own code triggers in torch on every run (``HARMLESS_WARNINGS``)."""
    if verbose():
        return
    import warnings

    for category, message, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


class ReportLines:
    """One plain log line per training report and per validation, for a cluster's log (no terminal there).

    A ``PyTorchCallback`` (built by the trial, chief only); local runs print their lines themselves.
    ``progress()`` gives ``(batches done, batches in all)``.
    """

    def __init__(self, progress: Callable[[], tuple[int, int]]) -> None:
        self.progress = progress

    def line(self, group: str, metrics: dict[str, Any]) -> str:
        done, total = self.progress()
        shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items() if k in SHOWN and _is_number(v))
        return f"[{group} @ batch {done}/{total}, {100 * done / max(total, 1):.0f}%] {shown}".rstrip()


SHOWN = ("loss", "lr", "bbox_mAP", "segm_mAP")


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def coco_table(text: str) -> str:
    """The 12 "Average Precision/Recall" lines pycocotools printed (per IoU type), from captured output."""
    return "\n".join(line for line in text.splitlines() if line.lstrip().startswith("Average "))


def print_table(title: str, table: str) -> None:
    if table:
        print(f"{title}\n{table}", file=sys.stderr, flush=True)
