"""Validation results to the chief: Determined's reducer allgather vs det-mmdet's gather, at 8 slots.

Each of ``--slots`` processes (gloo on CPU, Determined's ``DistributedContext`` over it, as a cluster
trial has) holds its share of a COCO-val-sized validation's per-image results, shaped as mmdet's
CocoMetric keeps them (100 detections per image, an RLE mask on each with ``--masks``). Each way
hands them over once, in a fresh set of processes; the table gives every rank's peak RSS growth.

    .venv/bin/python bench/gather.py [--slots 8] [--images 5000] [--masks]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp


def results(rank: int, slots: int, images: int, masks: bool) -> list:
    rng = np.random.default_rng(rank)
    out = []
    for img_id in range(rank, images, slots):
        pred = {
            "img_id": img_id,
            "bboxes": rng.random((100, 4), dtype=np.float32) * 600,
            "scores": rng.random(100, dtype=np.float32),
            "labels": rng.integers(0, 80, 100),
        }
        if masks:  # compressed RLE strings of about mmdet's size for 640x480 masks
            pred["masks"] = [{"size": [480, 640], "counts": rng.bytes(600)} for _ in range(100)]
        out.append(({"img_id": img_id, "width": 640, "height": 480}, pred))
    return out


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(rank: int, slots: int, port: int, way: str, images: int, masks: bool, queue) -> None:
    from determined import core

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(slots))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(slots), GROUP_RANK="0", GROUP_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=rank, world_size=slots)
    distributed = core.DistributedContext.from_torch_distributed()
    mine = results(rank, slots, images, masks)
    dist.barrier()
    before = peak_mib()
    start = time.perf_counter()
    if way == "allgather":  # what Determined's MetricReducer path does with per_slot_reduce()
        got = distributed.allgather(mine)
    else:  # det_mmdet.evaluation.EvaluatorReducer
        got = distributed.gather(mine)
    seconds = time.perf_counter() - start
    received = sum(len(x) for x in got) if got else 0
    queue.put((rank, peak_mib() - before, seconds, received))
    distributed.close()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(way: str, slots: int, images: int, masks: bool) -> list[tuple]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, slots, port, way, images, masks, queue)) for r in range(slots)]
    for p in procs:
        p.start()
    rows = sorted(queue.get() for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            sys.exit(f"{way}: a rank exited with {p.exitcode}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--masks", action="store_true")
    args = p.parse_args()
    table = {way: measure(way, args.slots, args.images, args.masks) for way in ("allgather", "gather")}
    print(f"{args.slots} slots, {args.images} images, masks: {args.masks}")
    print("| way | chief: peak RSS growth, images received | other ranks: peak RSS growth (max), images received | s |")
    print("|---|---|---|---|")
    for way, rows in table.items():
        chief, others = rows[0], rows[1:]
        print(
            f"| {way} | {chief[1]:.0f} MiB, {chief[3]} | {max(r[1] for r in others):.0f} MiB, "
            f"{max(r[3] for r in others)} | {max(r[2] for r in rows):.1f} |"
        )


if __name__ == "__main__":
    main()
