"""RandomResize + RandomCrop's image work: OpenCV resizing the whole image vs det-mmdet's crop window.

RTMDet's first stage scales a 1280x1280 mosaic by 0.5x..2x and keeps a 640x640 window; its second
stage scales a 640x480 photo by 0.1x..2x (of 640x640) and keeps at most 640x640. For each scale
the script times, on one thread and alternately (median of ``--repeats`` runs of ``--calls``
calls each), what mmdet does (``cv2.resize`` of the whole image, then the window as a view), the
numpy window alone (:func:`det_mmdet.crop_resize.resized_window`), and what det-mmdet runs
(:class:`det_mmdet.crop_resize.ResizedLater` sliced: the cheaper of the two by its cost rule);
every result is checked equal to OpenCV's bit for bit. The last row: the mean over scales drawn
as RandomResize draws them (uniform ratio).

    .venv/bin/python bench/crop_resize.py [--calls 5] [--repeats 3] [--points 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import choices
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "model_def"))

from det_mmdet.crop_resize import ResizedLater, resized_window  # noqa: E402

CASES = {  # name: (source (h, w), RandomResize scale (w, h), ratio range, crop (h, w))
    "mosaic": ((1280, 1280), (1280, 1280), (0.5, 2.0), (640, 640)),
    "stage2": ((480, 640), (640, 640), (0.1, 2.0), (640, 640)),
}


def image(h: int, w: int) -> np.ndarray:
    """Smooth colour fields with noise: the resize does real work, as on a photo."""
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.float32), (w, h))
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def target_size(src: tuple[int, int], scale: tuple[int, int], ratio: float) -> tuple[int, int]:
    """(w, h) as RandomResize (keep_ratio) makes it: mmcv's rescale_size of the drawn scale."""
    import mmcv

    drawn = int(scale[0] * ratio), int(scale[1] * ratio)
    return mmcv.rescale_size((src[1], src[0]), drawn)


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def measure(img: np.ndarray, size: tuple[int, int], crop: tuple[int, int], args) -> dict[str, float]:
    width, height = size
    rows, cols = min(crop[0], height), min(crop[1], width)
    top, left = (height - rows) // 3, (width - cols) // 2
    window = (slice(top, top + rows), slice(left, left + cols), Ellipsis)
    expected = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)[window]
    ways = {
        "opencv": lambda: cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)[window],
        "numpy": lambda: resized_window(img, size, top, left, rows, cols),
        "ours": lambda: ResizedLater(img, size)[window],
    }
    for way, fn in ways.items():
        if not np.array_equal(fn(), expected):
            sys.exit(f"error: {way} differs from cv2.resize at {size}")
    ms: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.repeats):
        for way, fn in ways.items():
            ms[way].append(timed(fn, args.calls))
    return {way: statistics.median(v) for way, v in ms.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=5, help="calls per timed run")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per way (median taken)")
    p.add_argument("--points", type=int, default=16, help="ratios per case, evenly spread over its range")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    args = p.parse_args()
    chosen = choices.chosen(args.cases, CASES, "--cases")
    cv2.setNumThreads(1)
    print(
        f"median of {args.repeats} alternating runs of {args.calls} calls; OpenCV {cv2.__version__} on one thread; "
        f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    )
    print("| case | ratio | resized to | OpenCV whole + window, ms | numpy window, ms | ours, ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for case in chosen:
        src, scale, (low, high), crop = CASES[case]
        img = image(*src)
        results = []
        for ratio in np.linspace(low, high, args.points):
            size = target_size(src, scale, float(ratio))
            r = measure(img, size, crop, args)
            results.append(r)
            print(
                f"| {case} {src[1]}x{src[0]} | {ratio:.2f} | {size[0]}x{size[1]} | {r['opencv']:.2f} | "
                f"{r['numpy']:.2f} | {r['ours']:.2f} | {r['opencv'] / r['ours']:.2f}x |"
            )
        mean = {way: statistics.fmean(r[way] for r in results) for way in results[0]}
        print(
            f"| {case}: mean over ratios | {low}..{high} | | {mean['opencv']:.2f} | {mean['numpy']:.2f} | "
            f"{mean['ours']:.2f} | {mean['opencv'] / mean['ours']:.2f}x |"
        )


if __name__ == "__main__":
    main()
