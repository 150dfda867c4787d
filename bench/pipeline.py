"""Images/s per CPU core through mmdet 3.3.0's own training pipelines: mmdet's transforms vs det-mmdet's.

Makes photo-like 640x480 JPEGs (smooth colour fields, textures, shapes, sensor noise; one in five
portrait) and a COCO annotation file for them (COCO's 80 classes, about 7 polygon objects an image,
some crowd), then measures each mmdet config's training dataset in four loader-worker-like processes
of its own (spawned, torch and OpenCV on one thread, each building its dataset from the one config and
keeping its heap to itself, as a loader worker runs one pipeline):

    mmdet                mmdet's transforms, glibc's own heap thresholds: mmengine's Runner's workers
    ours                 det-mmdet's (``fast_transforms.swap``, ``data.fast_transforms: true``), the heap
                         kept (``worker_heap.reuse``, ``data.reuse_worker_heap: true``): det-mmdet's workers
    mmdet (heap kept)    what det-mmdet's workers give ``data.fast_transforms: false``
    ours (glibc's heap)  det-mmdet's transforms with ``data.reuse_worker_heap: false``

The four make the same ``--samples`` samples from the same random state, taking turns every ``--chunk``
samples (who goes first rotating), so that the machine's drifts in speed fall on all alike; median of
``--repeats`` runs, after a warm-up that fills the transforms' caches and whose samples, made from one
seed, are compared (the "same samples" column: bit for bit, or, where MixUp's float64 jitter resize runs
within one level of mmdet's, how many image values differ; all else must be equal). The table gives
the speed-up as the two loaders run the pipelines (ours against mmdet), the same in the processes' CPU
time (samples per CPU second: the cost per core, which time the process spends waiting for a core on a
shared machine does not inflate), the speed-ups with the same heap setting on both sides, and the
exclusive milliseconds per transform (time inside a transform, less the
time of transforms it calls, e.g. the decodes MixUp asks for; YOLOX's mosaic partners that det-mmdet
loads itself count as LoadImageFromFile).

    .venv/bin/python bench/pipeline.py [--images 200] [--samples 60] [--repeats 3] [--configs rtmdet_s,...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import choices
import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "model_def"))

# The processes each pipeline is measured in: (det-mmdet's transforms, the heap kept) (module docstring)
WORKERS = {
    "mmdet": (False, False),
    "ours": (True, True),
    "mmdet (heap kept)": (False, True),
    "ours (glibc's heap)": (True, False),
}
CONFIGS = {
    "rtmdet_s": ("RTMDet-s", "rtmdet/rtmdet_s_8xb32-300e_coco.py"),
    "yolox_s": ("YOLOX-s", "yolox/yolox_s_8xb8-300e_coco.py"),
    "mask_rcnn": ("Mask R-CNN", "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"),
    "faster_rcnn": ("Faster R-CNN", "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"),
    "rtmdet_tiny": ("RTMDet-tiny", "rtmdet/rtmdet_tiny_8xb32-300e_coco.py"),
    "yolox_tiny": ("YOLOX-tiny", "yolox/yolox_tiny_8xb8-300e_coco.py"),
}


# ---- data ------------------------------------------------------------------------------------


def photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A photo-like image: smooth colour fields at several scales, shapes with edges, sensor noise."""
    img = np.zeros((h, w, 3), np.float32)
    for cells, weight in ((4, 110.0), (16, 50.0), (64, 20.0)):
        field = rng.uniform(0, 1, (cells * h // w + 1, cells, 3)).astype(np.float32)
        img += cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC) * weight
    for _ in range(int(rng.integers(3, 9))):
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(10, w // 4)), int(rng.integers(10, h // 4)))
        color = tuple(float(c) for c in rng.uniform(0, 200, 3))
        cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def polygon(rng: np.random.Generator, w: int, h: int) -> list[float]:
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    r = rng.uniform(0.03, 0.3) * min(w, h)
    angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(8, 24))))
    radii = r * rng.uniform(0.6, 1.0, len(angles))
    xs = np.clip(cx + radii * np.cos(angles), 0, w - 1)
    ys = np.clip(cy + radii * np.sin(angles), 0, h - 1)
    return [round(float(v), 2) for xy in zip(xs, ys, strict=True) for v in xy]


def make_coco(root: Path, images: int, seed: int = 0) -> None:
    """``root/train/*.jpg`` and ``root/annotations/train.json`` with COCO's 80 classes."""
    from mmdet.datasets import CocoDataset

    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    classes = CocoDataset.METAINFO["classes"]
    imgs, anns = [], []
    for i in range(images):
        w, h = (480, 640) if i % 5 == 4 else (640, 480)
        name = f"{i:06d}.jpg"
        cv2.imwrite(str(root / "train" / name), photo(rng, w, h), [cv2.IMWRITE_JPEG_QUALITY, 90])
        imgs.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for _ in range(int(rng.integers(1, 14))):
            poly = polygon(rng, w, h)
            xs, ys = poly[0::2], poly[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, len(classes) + 1)),
                    "segmentation": [poly],
                    "bbox": box,
                    "area": box[2] * box[3] * 0.7,
                    "iscrowd": int(rng.random() < 0.03),
                }
            )
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(classes)]
    (root / "annotations" / "train.json").write_text(
        json.dumps({"images": imgs, "annotations": anns, "categories": cats})
    )


# ---- datasets --------------------------------------------------------------------------------


def train_dataset_cfg(config: str, root: Path) -> dict:
    """The config's training dataset, reading the made data set."""
    import mmdet
    from mmengine.config import Config

    cfg = Config.fromfile(os.path.join(mmdet.__path__[0], ".mim", "configs", config))
    dataset = cfg.train_dataloader.dataset.to_dict()
    inner = dataset
    while "ann_file" not in inner:
        inner = inner["dataset"]
    inner.update(data_root=str(root) + "/", ann_file="annotations/train.json", data_prefix=dict(img="train/"))
    return dataset


def build(dataset_cfg: dict, fast: bool):
    from mmdet.registry import DATASETS

    from det_mmdet import fast_transforms

    dataset = DATASETS.build(dataset_cfg)
    fast_transforms.swap(dataset, fast)
    return dataset


# ---- timing ----------------------------------------------------------------------------------


class Clock:
    """Exclusive time per transform name: a nested call pauses its caller's clock."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []
        self.last = 0.0

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        if self.stack:
            self.ms[self.stack[-1]] += (now - self.last) * 1e3
        self.stack.append(name)
        self.last = now

    def leave(self) -> None:
        now = time.perf_counter()
        self.ms[self.stack.pop()] += (now - self.last) * 1e3
        self.last = now


def timed(method, name: str, clock: Clock):
    def call(*args, **kwargs):
        clock.enter(name)
        try:
            return method(*args, **kwargs)
        finally:
            clock.leave()

    return call


def time_transforms(dataset, clock: Clock) -> None:
    """Charge every pipeline step of the dataset (and of a wrapped dataset) to its mmdet name on ``clock``.

    The step's bound ``transform`` (what ``__call__`` runs) and ``get_indexes`` (a mixing transform's
    choice of the other samples: MixUp decodes some) are replaced on the instance, so that the
    objects keep their classes (``fast_transforms`` recognises a loading pipeline by its classes).
    """
    for node in (dataset, getattr(dataset, "dataset", None)):
        pipeline = getattr(node, "pipeline", None)
        if pipeline is None:
            continue
        for t in pipeline.transforms if hasattr(pipeline, "transforms") else pipeline:
            name = type(t).__name__.removeprefix("Fast")
            t.transform = timed(t.transform, name, clock)
            if hasattr(t, "get_indexes"):
                t.get_indexes = timed(t.get_indexes, name, clock)
    from det_mmdet import yolox_fast

    if not hasattr(yolox_fast.partner, "timed"):  # the mosaic partners det-mmdet reads and decodes itself
        yolox_fast.partner = timed(yolox_fast.partner, "LoadImageFromFile", clock)
        yolox_fast.partner.timed = True


def run(dataset, order: list[int], clock: Clock) -> tuple[float, float]:
    """Seconds to make the samples of ``order``: on the clock, and of the process's CPU time (clock
    collects the per-transform times)."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in order:
        dataset[i]
    return time.perf_counter() - start, time.process_time() - cpu


def worker(conn, config: str, root: str, fast: bool, heap_kept: bool) -> None:
    """One pipeline in a process of its own, as a loader worker runs it; told by ``conn`` what to make."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from mmengine.registry import init_default_scope

    from det_mmdet import worker_heap

    init_default_scope("mmdet")
    if heap_kept:
        worker_heap.reuse()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # pycocotools' index messages
        dataset = build(train_dataset_cfg(config, Path(root)), fast)
    clock = Clock()
    time_transforms(dataset, clock)
    conn.send(len(dataset))
    while (message := conn.recv()) is not None:
        kind, value = message
        if kind == "seed":  # a fresh run: the same random state in every process, the clock cleared
            random.seed(value)
            np.random.seed(value)
            clock.ms.clear()
        elif kind == "samples":
            conn.send([dataset[i] for i in value])
        elif kind == "run":
            conn.send(run(dataset, value, clock))
        elif kind == "clock":
            conn.send(dict(clock.ms))
        elif kind == "peak":  # the process's peak resident memory, MB (its own: ru_maxrss survives exec)
            status = Path("/proc/self/status").read_text()
            conn.send(int(status.split("VmHWM:")[1].split()[0]) / 1024)


def measure(name: str, config: str, root: Path, args) -> dict:
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    conns, processes = {}, []
    for way, (fast, heap_kept) in WORKERS.items():
        conns[way], theirs = spawn.Pipe()
        processes.append(spawn.Process(target=worker, args=(theirs, config, str(root), fast, heap_kept)))
        processes[-1].start()
    try:
        return timed_ways(name, config, conns, args)
    finally:
        for conn in conns.values():
            conn.send(None)
        for process in processes:
            process.join()


def timed_ways(name: str, config: str, conns: dict, args) -> dict:
    lengths = {way: conn.recv() for way, conn in conns.items()}
    assert len(set(lengths.values())) == 1, lengths
    n, rng = lengths["mmdet"], random.Random(0)
    order = [rng.randrange(n) for _ in range(args.warmup)]
    samples = {}
    for way, conn in conns.items():  # warm-up (caches filled, files in the page cache), compared
        conn.send(("seed", 0))
        conn.send(("samples", order))
        samples[way] = conn.recv()
    same = sameness(samples["mmdet"], samples["ours"])
    if not (
        equal(samples["mmdet"], samples["mmdet (heap kept)"]) and equal(samples["ours"], samples["ours (glibc's heap)"])
    ):
        same = "NO (the heap setting changed a sample)"
    seconds: dict[str, list[float]] = {way: [] for way in conns}
    cpu_seconds: dict[str, list[float]] = {way: [] for way in conns}
    per_transform: dict[str, list[dict[str, float]]] = {way: [] for way in conns}
    ways = list(conns)
    for _ in range(args.repeats):
        order = [rng.randrange(n) for _ in range(args.samples)]
        spent, cpu = dict.fromkeys(ways, 0.0), dict.fromkeys(ways, 0.0)
        for conn in conns.values():
            conn.send(("seed", 1))
        for turn, start in enumerate(range(0, len(order), args.chunk)):
            for way in ways[turn % len(ways) :] + ways[: turn % len(ways)]:  # one at a time, who goes first rotating
                conns[way].send(("run", order[start : start + args.chunk]))
                wall, used = conns[way].recv()
                spent[way] += wall
                cpu[way] += used
        for way, conn in conns.items():
            conn.send(("clock", None))
            per_transform[way].append({k: v / args.samples for k, v in conn.recv().items()})
            seconds[way].append(spent[way])
            cpu_seconds[way].append(cpu[way])
    result: dict[str, Any] = {"name": name, "config": config, "same": same}
    for way, conn in conns.items():
        conn.send(("peak", None))
        result.setdefault("peak_mb", {})[way] = conn.recv()
    for way in ways:
        s = statistics.median(seconds[way])
        result[way] = {
            "ms": 1e3 * s / args.samples,
            "rate": args.samples / s,
            "cpu_rate": args.samples / statistics.median(cpu_seconds[way]),
            "transforms": {
                k: statistics.median(d.get(k, 0.0) for d in per_transform[way]) for k in per_transform[way][0]
            },
        }
    return result


def equal(a, b, pixels: list[int] | None = None, key: str = "") -> bool:
    """Samples equal bit for bit: tensors, arrays, boxes, masks, data samples, plain values. With
    ``pixels`` (a list [differing, total, largest difference]) the images (``inputs``) may differ,
    counted there: MixUp's jitter resize is within one level of mmdet's, not the same bits."""
    from mmdet.structures.bbox import BaseBoxes
    from mmdet.structures.mask import BitmapMasks, PolygonMasks
    from mmengine.structures import BaseDataElement

    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k], pixels, k) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y, pixels, key) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and key == "inputs" and pixels is not None and a.shape == b.shape:
        apart = (a.to(torch.int16) - b.to(torch.int16)).abs()
        pixels[0] += int(torch.count_nonzero(apart))
        pixels[1] += apart.numel()
        pixels[2] = max(pixels[2], int(apart.max()) if apart.numel() else 0)
        return a.dtype == b.dtype
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, BaseBoxes):
        return equal(a.tensor, b.tensor)
    if isinstance(a, (BitmapMasks, PolygonMasks)):
        return (a.height, a.width) == (b.height, b.width) and equal(a.masks, b.masks)
    if isinstance(a, BaseDataElement):
        return equal(dict(a.all_items()), dict(b.all_items()), pixels)
    return a == b


def sameness(a: list, b: list) -> str:
    """The table's "same samples": yes (bit for bit), or how many image values differ and by how much."""
    pixels = [0, 0, 0]
    if not equal(a, b, pixels):
        return "NO"
    if not pixels[0]:
        return "yes"
    return f"images: {100 * pixels[0] / pixels[1]:.3f}% of values differ, by up to {pixels[2]}; all else yes"


def table(results: list[dict], top: int) -> str:
    lines = [
        "| pipeline (mmdet config) | mmdet ms / sample | ours ms / sample | mmdet images/s | ours images/s "
        "| speed-up | in CPU time | same heap: glibc's, kept | same samples | largest transforms, ms (mmdet -> ours) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mmdet, ours = r["mmdet"], r["ours"]
        mm, fast = mmdet["transforms"], ours["transforms"]
        biggest = sorted(mm, key=mm.get, reverse=True)[:top]
        where = ", ".join(f"{k} {mm[k]:.1f} -> {fast.get(k, 0.0):.1f}" for k in biggest)
        glibc = r["ours (glibc's heap)"]["rate"] / mmdet["rate"]
        kept = ours["rate"] / r["mmdet (heap kept)"]["rate"]
        lines.append(
            f"| {r['name']} (`{Path(r['config']).name}`) | {mmdet['ms']:.1f} | {ours['ms']:.1f} | "
            f"{mmdet['rate']:.0f} | {ours['rate']:.0f} | {ours['rate'] / mmdet['rate']:.2f}x | "
            f"{ours['cpu_rate'] / mmdet['cpu_rate']:.2f}x | "
            f"{glibc:.2f}x, {kept:.2f}x | {r['same']} | {where} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="JPEGs to make")
    p.add_argument("--samples", type=int, default=60, help="samples per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median taken)")
    p.add_argument("--warmup", type=int, default=25, help="samples before timing (fills the caches)")
    p.add_argument("--chunk", type=int, default=10, help="samples per turn (the processes take turns)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--top", type=int, default=5, help="transforms named per row")
    args = p.parse_args()
    chosen = choices.chosen(args.configs, CONFIGS, "--configs")
    if args.chunk < 1:
        sys.exit(f"error: --chunk: {args.chunk} (samples per turn, at least 1)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_coco(root, args.images)
        results = [measure(*CONFIGS[c], root, args) for c in chosen]
    print(
        f"{args.images} photo-like JPEGs (640x480, 1 in 5 portrait), {args.samples} samples a run, median of "
        f"{args.repeats} runs; a process per pipeline and way ({', '.join(WORKERS)}), taking turns every "
        f"{args.chunk} samples, torch/OpenCV threads 1; {platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    )
    print(table(results, args.top))
    print("\nPeak resident memory of each process, MB (" + ", ".join(WORKERS) + "):")
    for r in results:
        print(f"- {r['name']}: " + ", ".join(f"{r['peak_mb'][way]:.0f}" for way in WORKERS))


if __name__ == "__main__":
    main()
