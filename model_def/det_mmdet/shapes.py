"""A small COCO data set of drawn shapes (boxes and polygon masks), made deterministically.

Used by ``make demo`` and the tests: no download, the same files for the same seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle")
PALETTE = [(220, 20, 60), (0, 128, 255), (40, 180, 40)]


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    corners = {"circle": 24, "square": 4, "triangle": 3}[kind]
    turn = angle + (math.pi / 4 if kind == "square" else -math.pi / 2)
    pts = [
        (cx + r * math.cos(turn + 2 * math.pi * i / corners), cy + r * math.sin(turn + 2 * math.pi * i / corners))
        for i in range(corners)
    ]
    return np.array(pts, dtype=np.float32)


def _image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict]]:
    base = rng.integers(0, 90, size=3)
    img = np.clip(rng.normal(base, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, 4))):
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        r = float(rng.uniform(0.09, 0.22) * size)
        cx, cy = (float(v) for v in rng.uniform(r, size - r, size=2))
        poly = _polygon(kind, cx, cy, r, 0.0 if kind != "triangle" else float(rng.uniform(-0.3, 0.3)))
        color = tuple(int(c) for c in rng.integers(130, 256, size=3))
        cv2.fillPoly(img, [np.round(poly).astype(np.int32)], color, lineType=cv2.LINE_AA)
        x0, y0 = poly.min(0)
        x1, y1 = poly.max(0)
        objects.append({"kind": kind, "poly": poly, "bbox": [x0, y0, x1 - x0, y1 - y0]})
    return img, objects


def make_split(root: Path, split: str, count: int, seed: int, size: int = 128) -> Path:
    """``root/<split>/*.jpg`` and ``root/annotations/<split>.json``; returns the annotation path."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        img, objects = _image(rng, size)
        name = f"{split}_{i:05d}.jpg"
        cv2.imwrite(str(root / split / name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for obj in objects:
            x, y, w, h = (round(float(v), 2) for v in obj["bbox"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": CLASSES.index(obj["kind"]) + 1,
                    "bbox": [x, y, w, h],
                    "area": round(float(cv2.contourArea(obj["poly"])), 2),
                    "iscrowd": 0,
                    "segmentation": [[round(float(v), 2) for v in obj["poly"].reshape(-1)]],
                }
            )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    ann = root / "annotations" / f"{split}.json"
    ann.write_text(json.dumps(coco))
    return ann


def make_shapes(root: str | Path, train: int = 400, val: int = 50, seed: int = 0) -> Path:
    """Make the data set once; a complete one already at ``root`` is kept as it is."""
    root = Path(root)
    marker = root / f".complete-{train}-{val}-{seed}"
    if not marker.exists():
        make_split(root, "train", train, seed)
        make_split(root, "val", val, seed + 1)
        marker.touch()
    return root
