"""Images/s per CPU core through mmdet 3.3.0's own training pipelines: mmdet's transforms vs det-mmdet's.

Makes photo-like 640x480 JPEGs (smooth colour fields, textures, shapes, sensor noise; one in five
portrait) and a COCO annotation file for them (COCO's 80 classes, about 7 polygon objects an image,
some crowd), then builds the training dataset of each mmdet config below twice, from one config:
as mmdet builds it, and with ``det_mmdet.fast_transforms.swap`` (what ``data.fast_transforms: true``
does). A process per pipeline, torch and OpenCV on one thread. The two are timed ``--repeats`` times each over
the same ``--samples`` samples, taking turns every ``--chunk`` samples, after a warm-up that fills the
transforms' caches and whose samples, made from one seed, are compared (the "same samples" column:
bit for bit, or, where MixUp's float64 jitter resize runs within one level of mmdet's, how many image
values differ; all else must be equal); the table gives the median, the speed-up, and the exclusive
milliseconds per transform (time inside a transform, less the time of transforms it calls, e.g. the
decodes MixUp asks for).

    .venv/bin/python bench/pipeline.py [--images 200] [--samples 60] [--repeats 3] [--configs rtmdet_s,...]
"""

from __future__ import annotations

import argparse
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

import choices
import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "model_def"))

# glibc's heap settings in a loader worker: its own (mmengine's Runner) and det-mmdet's (det_mmdet.worker_heap)
HEAPS = {"default": "glibc's own thresholds", "kept": "data.reuse_worker_heap", "both": "each, a process each"}
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


def run(dataset, order: list[int], clock: Clock) -> float:
    """Seconds to make the samples of ``order`` (clock collects the per-transform times)."""
    start = time.perf_counter()
    for i in order:
        dataset[i]
    return time.perf_counter() - start


def measure(name: str, config: str, root: Path, args) -> dict:
    cfg = train_dataset_cfg(config, root)
    clocks = {"mmdet": Clock(), "ours": Clock()}
    datasets = {"mmdet": build(cfg, False), "ours": build(cfg, True)}
    for way, dataset in datasets.items():
        time_transforms(dataset, clocks[way])
    rng = random.Random(0)
    n = len(datasets["mmdet"])
    seconds: dict[str, list[float]] = {"mmdet": [], "ours": []}
    per_transform: dict[str, list[dict[str, float]]] = {"mmdet": [], "ours": []}
    order = [rng.randrange(n) for _ in range(args.warmup)]
    samples = {}
    for way, dataset in datasets.items():  # warm-up (caches filled, files in the page cache), compared
        random.seed(0)
        np.random.seed(0)
        samples[way] = [dataset[i] for i in order]
    same = sameness(samples["mmdet"], samples["ours"])
    for _ in range(args.repeats):
        order = [rng.randrange(n) for _ in range(args.samples)]
        # Both make the same samples from the same random state, taking turns every --chunk samples (each
        # one's state kept between its turns, who goes first swapped each turn), so that the machine's
        # drifts in speed fall on both alike.
        random.seed(1)
        np.random.seed(1)
        states = {way: (random.getstate(), np.random.get_state()) for way in datasets}
        spent = dict.fromkeys(datasets, 0.0)
        for clock in clocks.values():
            clock.ms.clear()
        for turn, start in enumerate(range(0, len(order), args.chunk)):
            ways = list(datasets) if turn % 2 == 0 else list(datasets)[::-1]
            for way in ways:
                random.setstate(states[way][0])
                np.random.set_state(states[way][1])
                spent[way] += run(datasets[way], order[start : start + args.chunk], clocks[way])
                states[way] = (random.getstate(), np.random.get_state())
        for way in datasets:
            seconds[way].append(spent[way])
            per_transform[way].append({k: v / args.samples for k, v in clocks[way].ms.items()})
    result = {"name": name, "config": config, "same": same}
    for way in datasets:
        s = statistics.median(seconds[way])
        result[way] = {
            "ms": 1e3 * s / args.samples,
            "rate": args.samples / s,
            "transforms": {
                k: statistics.median(d.get(k, 0.0) for d in per_transform[way]) for k in per_transform[way][0]
            },
        }
    result["speedup"] = result["ours"]["rate"] / result["mmdet"]["rate"]
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


def table(results: list[dict[str, dict]], top: int) -> str:
    """One row per pipeline from its runs by heap setting (``default``: glibc's own, as mmengine's Runner's
    workers run; ``kept``: ``worker_heap.reuse``, as det-mmdet's workers run): the speed-up as the two
    loaders run the pipelines where both were measured, and each run's own (the same heap for both)."""
    both = all(len(runs) == 2 for runs in results)
    head = "| pipeline (mmdet config) | mmdet ms / sample | ours ms / sample | mmdet images/s | ours images/s "
    head += "| speed-up as the loaders run them " if both else ""
    head += "| speed-up, same heap | same samples | largest transforms, ms (mmdet -> ours) |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for runs in results:
        first = runs.get("default") or runs["kept"]
        mmdet, ours = first["mmdet"], runs.get("kept", first)["ours"]
        mm, fast = first["mmdet"]["transforms"], first["ours"]["transforms"]
        biggest = sorted(mm, key=mm.get, reverse=True)[:top]
        where = ", ".join(f"{k} {mm[k]:.1f} -> {fast.get(k, 0.0):.1f}" for k in biggest)
        same_heap = ", ".join(f"{r['speedup']:.2f}x ({heap})" for heap, r in runs.items())
        row = f"| {first['name']} (`{Path(first['config']).name}`) | {mmdet['ms']:.1f} | {ours['ms']:.1f} | "
        row += f"{mmdet['rate']:.0f} | {ours['rate']:.0f} | "
        row += f"{ours['rate'] / mmdet['rate']:.2f}x | " if both else ""
        lines.append(row + f"{same_heap} | {first['same']} | {where} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="JPEGs to make")
    p.add_argument("--samples", type=int, default=60, help="samples per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median taken)")
    p.add_argument("--warmup", type=int, default=25, help="samples before timing (fills the caches)")
    p.add_argument("--chunk", type=int, default=10, help="samples per turn (the two take turns)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--top", type=int, default=5, help="transforms named per row")
    p.add_argument(
        "--heap",
        default="both",
        help="loader workers' heap: default (glibc's own, as the Runner's), kept (data.reuse_worker_heap, "
        "as det-mmdet's), or both (a process each; the speed-up as the two loaders run the pipelines)",
    )
    p.add_argument("--one", nargs=2, metavar=("ROOT", "OUT"), help=argparse.SUPPRESS)  # a child: one config
    args = p.parse_args()
    chosen = choices.chosen(args.configs, CONFIGS, "--configs")
    heaps = choices.chosen(args.heap, HEAPS, "--heap")
    heaps = ["default", "kept"] if "both" in heaps else heaps
    if args.chunk < 1:
        sys.exit(f"error: --chunk: {args.chunk} (samples per turn, at least 1)")

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if args.one:  # the child measuring one config on the parent's data set
        from mmengine.registry import init_default_scope

        init_default_scope("mmdet")
        if heaps == ["kept"]:
            from det_mmdet import worker_heap

            worker_heap.reuse()
        Path(args.one[1]).write_text(json.dumps(measure(*CONFIGS[chosen[0]], Path(args.one[0]), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_coco(root, args.images)
        results = [{heap: measure_apart(c, heap, root, args) for heap in heaps} for c in chosen]
    print(
        f"{args.images} photo-like JPEGs (640x480, 1 in 5 portrait), {args.samples} samples a run, median of "
        f"{args.repeats} runs, the two taking turns every {args.chunk} samples; a process per pipeline and heap "
        f"setting ({', '.join(heaps)}), torch/OpenCV threads 1; {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores"
    )
    print(table(results, args.top))


def measure_apart(config: str, heap: str, root: Path, args) -> dict:
    """:func:`measure` in a fresh process with the ``heap`` setting: a pipeline measured after another
    in the same process ran with that one's heap (YOLOX-s after RTMDet-s: 2.5x against 2.8-3.1x on its
    own), and glibc's heap settings hold for the whole process."""
    import subprocess

    out = root / f"{config}-{heap}.json"
    cmd = [sys.executable, __file__, "--configs", config, "--heap", heap, "--one", str(root), str(out)]
    for flag in ("images", "samples", "repeats", "warmup", "chunk"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


if __name__ == "__main__":
    main()
