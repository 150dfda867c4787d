"""What decoding only the part YOLOX's warp reads is worth: det_mmdet.jpeg_rows against OpenCV's decoder.

Two tables, on photo-like 640x480 JPEGs that the script makes (bench/pipeline.py's):

1. One JPEG, ms a decode: ``cv2.imdecode`` (what mmdet's ``LoadImageFromFile`` calls), and
   ``jpeg_rows.decode`` for all rows, the first three quarters, the first half, a middle half
   (skipped rows at the top as well), and the right half or a middle half of the columns. Each
   decoded part is checked against OpenCV's pixels there.
2. mmdet's YOLOX-tiny and YOLOX-s training pipelines as det-mmdet runs them (``data.fast_transforms``),
   ms a sample with parts decoded apart (as shipped) and with every image decoded whole by OpenCV
   (``jpeg_rows`` switched off), in one process taking turns every ``--chunk`` samples from the same
   random state. Images the warp never shows are not decoded either way; the rows and columns not
   decoded besides are det-mmdet's own count (``yolox_fast.SKIPPED``).

Median of the turns; torch and OpenCV on one thread, the worker heap kept (as det-mmdet's loader workers).

    .venv/bin/python bench/jpeg_rows.py [--images 200] [--samples 240] [--chunk 20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pipeline
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "model_def"))

CONFIGS = {"YOLOX-tiny": "yolox/yolox_tiny_8xb8-300e_coco.py", "YOLOX-s": "yolox/yolox_s_8xb8-300e_coco.py"}
BANDS = {  # rows, columns: fractions of the image's
    "all rows": (0.0, 1.0, 0.0, 1.0),
    "first 3/4": (0.0, 0.75, 0.0, 1.0),
    "first 1/2": (0.0, 0.5, 0.0, 1.0),
    "middle 1/2": (0.25, 0.75, 0.0, 1.0),
    "all rows, right 1/2 of the columns": (0.0, 1.0, 0.5, 1.0),
    "middle 1/2, middle 1/2 of the columns": (0.25, 0.75, 0.25, 0.75),
}


def decode_table(files: list[Path], repeats: int) -> str:
    """ms a decode, OpenCV against each part jpeg_rows decodes (each checked against OpenCV's pixels)."""
    from det_mmdet import jpeg_rows

    datas = [f.read_bytes() for f in files]
    whole = [cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR) for d in datas]
    ways = {"OpenCV, whole image": lambda d, img: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)}
    for name, fractions in BANDS.items():
        ways[f"jpeg_rows, {name}"] = lambda d, img, f=fractions: jpeg_rows.decode(d, img.shape[:2], *part(img, f))
    for name, fractions in BANDS.items():
        for d, img in zip(datas, whole, strict=True):
            first, last, left, right = part(img, fractions)
            out = jpeg_rows.decode(d, img.shape[:2], first, last, left, right)
            if out is None or not np.array_equal(out[first:last, left:right], img[first:last, left:right]):
                sys.exit(f"error: jpeg_rows, {name}: not OpenCV's pixels")
    ms: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):  # taking turns, so that drifts in the machine's speed fall on all alike
        for name, way in ways.items():
            start = time.perf_counter()
            for d, img in zip(datas, whole, strict=True):
                way(d, img)
            ms[name].append((time.perf_counter() - start) / len(datas) * 1e3)
    base = statistics.median(ms["OpenCV, whole image"])
    lines = ["| decoder, part | ms / image | against OpenCV's whole decode |", "|---|---|---|"]
    for name, values in ms.items():
        lines.append(f"| {name} | {statistics.median(values):.2f} | {base / statistics.median(values):.2f}x |")
    return "\n".join(lines)


def part(img: np.ndarray, fractions: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """First and last row, first and last column of ``img`` at these fractions of its height and width."""
    (h, w), (top, bottom, left, right) = img.shape[:2], fractions
    return int(h * top), int(h * bottom), int(w * left), int(w * right)


def pipeline_row(name: str, config: str, root: Path, args) -> str:
    """ms a sample through det-mmdet's YOLOX pipeline with parts decoded apart and with whole decodes."""
    from det_mmdet import jpeg_rows, yolox_fast

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # pycocotools' index messages
        dataset = pipeline.build(pipeline.train_dataset_cfg(config, root), True)
    library, n = jpeg_rows.LIBRARY, len(dataset)
    for i in range(args.warmup):
        dataset[i % n]
    ms: dict[bool, list[float]] = {True: [], False: []}
    skipped = {True: [0, 0, 0], False: [0, 0, 0]}  # images, rows, columns not decoded
    for turn in range(args.samples // args.chunk):
        for apart in (True, False) if turn % 2 else (False, True):
            jpeg_rows.LIBRARY = library if apart else None
            random.seed(turn)
            np.random.seed(turn)
            yolox_fast.SKIPPED.update(decodes=0, canvases=0, rows=0, columns=0)
            start = time.perf_counter()
            for i in range(args.chunk):
                dataset[(turn * args.chunk + i) * 7 % n]
            ms[apart].append((time.perf_counter() - start) / args.chunk * 1e3)
            skipped[apart][0] += yolox_fast.SKIPPED["decodes"]
            skipped[apart][1] += yolox_fast.SKIPPED["rows"]
            skipped[apart][2] += yolox_fast.SKIPPED["columns"]
    jpeg_rows.LIBRARY = library
    samples = len(ms[True]) * args.chunk
    infos = [dataset.dataset.get_data_info(i) for i in range(n)]
    rows = 4 * statistics.mean(info["height"] for info in infos)  # a sample's four images'
    columns = 4 * statistics.mean(info["width"] for info in infos)
    apart, whole = statistics.median(ms[True]), statistics.median(ms[False])
    images, not_decoded, columns_not = (count / samples for count in skipped[True])
    return (
        f"| {name} (`{config.split('/')[-1]}`) | {whole:.2f} | {apart:.2f} | {whole / apart:.3f}x | "
        f"{images:.2f} | {not_decoded:.0f} of {rows:.0f} ({not_decoded / rows:.0%}) | "
        f"{columns_not:.0f} of {columns:.0f} ({columns_not / columns:.0%}) |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="JPEGs to make")
    p.add_argument("--samples", type=int, default=240, help="samples a way, per pipeline")
    p.add_argument("--chunk", type=int, default=20, help="samples per turn (the two ways take turns)")
    p.add_argument("--warmup", type=int, default=25, help="samples before timing")
    p.add_argument("--repeats", type=int, default=15, help="turns over the JPEGs in the decoder table")
    args = p.parse_args()
    if args.chunk < 1 or args.samples < 2 * args.chunk:
        sys.exit(f"error: --samples {args.samples} / --chunk {args.chunk}: at least two turns of one sample or more")
    from mmengine.registry import init_default_scope

    from det_mmdet import jpeg_rows, worker_heap

    if not jpeg_rows.available():
        sys.exit("error: det_mmdet.jpeg_rows: no libturbojpeg 3 found (pip install turbojpeg); nothing measured")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    init_default_scope("mmdet")
    worker_heap.reuse()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipeline.make_coco(root, args.images)
        files = sorted((root / "train").glob("*.jpg"))[:60]
        print(f"{len(files)} photo-like JPEGs (640x480, 1 in 5 portrait), {args.repeats} turns, median; 1 thread\n")
        print(decode_table(files, args.repeats))
        print(
            f"\nmmdet's YOLOX pipelines as det-mmdet runs them, {args.samples} samples a way, taking turns every "
            f"{args.chunk}, median of the turns; {os.cpu_count()} cores\n"
        )
        print(
            "| pipeline (mmdet config) | whole decodes, ms / sample | parts decoded apart, ms / sample | speed-up | "
            "images not decoded a sample (both ways) | rows not decoded a sample, of the four images' | "
            "columns not decoded a sample, of the four images' |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, config in CONFIGS.items():
            print(pipeline_row(name, config, root, args))


if __name__ == "__main__":
    main()
