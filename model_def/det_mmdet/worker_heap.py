"""Loader workers keep the memory they free for their next sample (``data.reuse_worker_heap``).

A training pipeline allocates and frees images of megabytes every sample: mmdet's YOLOX mosaic is a
1280x1280 canvas, deep-copied before each later transform. glibc serves blocks above its mmap
threshold by ``mmap`` and gives the top of its heap back to the system once more than its trim
threshold is free there (both follow the largest block freed lately, the trim threshold at twice
the mmap one), so a sample's arrays keep coming back as fresh pages, which the kernel hands out
zeroed one 4 KB page fault at a time. How often depends on the process's allocation history: mmdet's
YOLOX-tiny pipeline took up to 3,100 page faults a sample and 20-39 ms a sample from process to
process; with the settings below about 2 faults, and steady (bench/README.md, "The heap", in
"Training pipelines per CPU core").

:func:`reuse`, run in each loader worker when ``data.reuse_worker_heap`` is true (the default), sets
through glibc's ``mallopt``: blocks under 32 MB (the most glibc takes) come from the heap, and up to
64 MB may lie free at its top. A worker then holds on to what it freed (up to 64 MB more than it
uses at a time) instead of asking the kernel again. The trial process itself keeps glibc's
defaults, so ``num_workers=0`` runs are as before. Where the C library is not a 64-bit glibc (macOS,
musl), nothing changes and the start-up line says so.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from typing import Any

from det_mmdet.errors import UserError

KNOB = "data.reuse_worker_heap"
MMAP_THRESHOLD_MB = 32  # glibc refuses more (half its 64 MB heap size on 64-bit)
TRIM_THRESHOLD_MB = 64
# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def check_setting(value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{KNOB}: {value!r} is not true or false")
    return value


def available() -> bool:
    """Whether this process's C library is a 64-bit glibc (whose ``mallopt`` takes these settings)."""
    return platform.libc_ver()[0] == "glibc" and sys.maxsize > 2**32


def reuse() -> None:
    """Set this process's glibc heap to keep freed memory (module docstring); nothing elsewhere."""
    if not available():
        return
    libc = ctypes.CDLL(None)
    for param, megabytes in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MB), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_MB)):
        if libc.mallopt(param, megabytes << 20) != 1:
            raise RuntimeError(f"glibc mallopt({param}, {megabytes} MB) refused")


def startup_line(enabled: bool) -> str:
    if not enabled:
        return f"loader workers: glibc's own heap thresholds ({KNOB}: false)"
    if not available():
        return f"loader workers: the C library's own heap settings ({KNOB} needs a 64-bit glibc; not here)"
    return (
        f"loader workers keep freed memory: heap blocks under {MMAP_THRESHOLD_MB} MB, "
        f"up to {TRIM_THRESHOLD_MB} MB free kept ({KNOB})"
    )
