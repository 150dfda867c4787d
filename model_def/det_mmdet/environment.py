"""``env_cfg`` as mmengine's Runner applies it (``Runner.setup_env``), before loaders and model exist.

``cudnn_benchmark``; ``mp_cfg``: OpenCV's thread count in the trial process and again in every
loader worker (so it holds whatever the start method), the workers' start method given to each
DataLoader rather than set process-wide, and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = 1 for
several processes when unset, as the Runner does; ``resource_limit`` for open files. ``dist_cfg``:
the process group's backend and timeout, as the Runner's ``init_dist`` takes them, for the processes
``det-mmdet train --slots N`` starts. On a cluster Determined 0.38.1's ``pytorch.init`` starts the group
itself (nccl with GPUs, gloo without, torch's default timeout) whatever the trial passes: there a
``dist_cfg`` that asks for anything else stops at start-up.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")

START_METHODS = ("fork", "spawn", "forkserver")


@dataclass(frozen=True)
class LoaderEnv:
    """What each loader worker needs from ``env_cfg.mp_cfg``."""

    start_method: str | None = None
    opencv_threads: int | None = None
    reuse_heap: bool = False  # data.reuse_worker_heap (det_mmdet.worker_heap)

    def in_worker(self) -> None:
        if self.opencv_threads is not None:
            import cv2

            cv2.setNumThreads(self.opencv_threads)
        if self.reuse_heap:
            from det_mmdet import worker_heap

            worker_heap.reuse()


def apply(env_cfg: dict[str, Any] | None, processes: int) -> tuple[LoaderEnv, list[str]]:
    """Apply ``env_cfg`` to this process; the loader workers' part and the start-up lines back."""
    env_cfg = dict(env_cfg or {})
    dist_settings(env_cfg.get("dist_cfg"))  # a single process starts no group: its settings are checked all the same
    lines = []
    if env_cfg.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
        lines.append("cudnn.benchmark on")
    mp_cfg = dict(env_cfg.get("mp_cfg") or {})
    unknown = sorted(set(mp_cfg) - {"mp_start_method", "opencv_num_threads"})
    if unknown:
        raise UserError(f"env_cfg.mp_cfg: unknown keys {unknown} (choose mp_start_method, opencv_num_threads)")
    method = mp_cfg.get("mp_start_method")
    if method is not None and method not in START_METHODS:
        raise UserError(f"env_cfg.mp_cfg.mp_start_method {method!r}: choose {', '.join(START_METHODS)}")
    threads = mp_cfg.get("opencv_num_threads")
    if threads is not None:
        import cv2

        cv2.setNumThreads(int(threads))
    if processes > 1:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if name not in os.environ:
                os.environ[name] = "1"
                lines.append(f"{name}=1 (unset, {processes} processes)")
    limit = env_cfg.get("resource_limit", 4096)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(max(int(limit), soft), hard) if hard != resource.RLIM_INFINITY else max(int(limit), soft)
    if wanted != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    loader = LoaderEnv(method, None if threads is None else int(threads))
    if method or threads is not None:
        lines.append(f"loader workers: start method {method or 'default'}, OpenCV threads {threads}")
    return loader, lines


DIST_KEYS = ("backend", "timeout")
BACKENDS = ("nccl", "gloo")


def init_process_group(dist_cfg: dict[str, Any] | None) -> str:
    """Start torch's process group as ``env_cfg.dist_cfg`` says; the start-up line back.

    ``backend`` (nccl needs GPUs: a process without one uses gloo, and says so) and ``timeout`` (seconds),
    the two keys mmengine's ``init_dist`` passes for a torchrun-style launch; any other key stops here.
    """
    import torch.distributed as dist

    backend, kwargs, note = dist_settings(dist_cfg)
    dist.init_process_group(backend, **kwargs)
    shown = f", timeout {kwargs['timeout'].total_seconds():g} s" if kwargs else ""
    return f"process group: {backend}{shown}{note}"


def cluster_process_group(dist_cfg: dict[str, Any] | None) -> str:
    """The start-up line for a cluster trial's process group, which Determined starts; or one ``error:`` line."""
    backend, kwargs, note = dist_settings(dist_cfg)
    started = "nccl" if torch.cuda.is_available() else "gloo"
    if kwargs:
        raise UserError(
            "env_cfg.dist_cfg.timeout: on a Determined cluster pytorch.init starts the process group with torch's "
            "default timeout and takes none from the trial; remove it (it applies to `det-mmdet train --slots N`)"
        )
    if backend != started:
        raise UserError(f"env_cfg.dist_cfg.backend {backend!r}: on a Determined cluster pytorch.init starts {started}")
    return f"process group: {started}, started by Determined{note}"


def dist_settings(dist_cfg: dict[str, Any] | None) -> tuple[str, dict[str, Any], str]:
    """``(backend, init_process_group kwargs, note)`` from ``dist_cfg``; one ``error:`` line for what it cannot be."""
    dist_cfg = dict(dist_cfg or {})
    unknown = sorted(set(dist_cfg) - set(DIST_KEYS))
    if unknown:
        raise UserError(
            f"env_cfg.dist_cfg: {', '.join(unknown)} not supported (det-mmdet passes {', '.join(DIST_KEYS)})"
        )
    backend = dist_cfg.get("backend") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in BACKENDS:
        raise UserError(f"env_cfg.dist_cfg.backend {backend!r}: choose {', '.join(BACKENDS)}")
    note = ""
    if backend == "nccl" and not torch.cuda.is_available():
        backend, note = "gloo", " (dist_cfg.backend nccl needs GPUs: none here)"
    kwargs: dict[str, Any] = {}
    if dist_cfg.get("timeout") is not None:
        seconds = dist_cfg["timeout"]
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
            raise UserError(f"env_cfg.dist_cfg.timeout {seconds!r}: a positive number of seconds")
        kwargs["timeout"] = timedelta(seconds=seconds)
    return backend, kwargs, note
