"""COCO scoring at COCO-val scale: mmdet's CocoMetric against det-mmdet's, same inputs, one run.

The script makes its own result set (nothing downloads): 5,000 images, 80 classes, ~7.7 ground-truth
objects per image (COCO val2017 has 36,781 in 5,000), 1% of them crowds, and 100 detections per
image: noisy copies of the ground truth plus false positives, scores spread over (0, 1), and for
segm a rectangle-ish RLE mask on every detection (polygon masks on the ground truth, as COCO has).

Each measurement is one fresh process that builds the metric from the annotation file and scores the
results (``compute_metrics``: results to numbers, ground truth loading included) and reports its wall
time and peak memory (the chief's, on a cluster). mmdet's CocoMetric (pycocotools) and ours
(``data.coco_backend``'s default, hotcoco) alternate, three times each; the table shows medians and
checks the numbers agree. Then ``det-mmdet evaluate --results`` (``export.evaluate_results``: a COCO
results file with boxes and masks, bbox and segm) once with hotcoco and once with pycocotools.

    python bench/eval.py                       # bbox and segm, 5,000 images (~15 min on 2 cores)
    python bench/eval.py --images 500 --repeats 1"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def make_ground_truth(rng: np.random.Generator, images: int, classes: int, per_image: float) -> dict[str, Any]:
    """A COCO annotation dict: boxes of every size, octagon polygons inside them, 1% crowds."""
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": c + 1, "name": f"class {c}"} for c in range(classes)]  # ids from 1, as COCO's
    for image_id in range(1, images + 1):
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        coco["images"].append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id:06d}.jpg"})
        for _ in range(rng.poisson(per_image)):
            side = float(np.exp(rng.uniform(np.log(8), np.log(min(w, h) * 0.9))))  # small, medium and large
            bw, bh = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            bw, bh = min(bw, w - 2), min(bh, h - 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cut = 0.2 * min(bw, bh)
            polygon = [x + cut, y, x + bw - cut, y, x + bw, y + cut, x + bw, y + bh - cut]
            polygon += [x + bw - cut, y + bh, x + cut, y + bh, x, y + bh - cut, x, y + cut]
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.integers(1, classes + 1)),
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh - 2 * cut * cut,
                    "segmentation": [polygon],
                    "iscrowd": int(rng.random() < 0.01),
                }
            )
    return coco


def make_results(
    rng: np.random.Generator, coco: dict[str, Any], per_image: int, masks: bool
) -> list[tuple[dict, dict]]:
    """CocoMetric's processed results ``(gt, pred)`` per image, as its ``process`` leaves them."""
    from pycocotools import mask as mask_utils

    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    classes = len(coco["categories"])
    results = []
    for image in coco["images"]:
        w, h, truth = image["width"], image["height"], by_image.get(image["id"], [])
        boxes, labels = [], []
        for ann in truth:  # found, roughly: the box jittered by up to a fifth of its size
            x, y, bw, bh = ann["bbox"]
            dx, dy, dw, dh = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
            boxes.append([x + dx, y + dy, x + dx + bw + dw, y + dy + bh + dh])
            labels.append(ann["category_id"] - 1 if rng.random() < 0.9 else int(rng.integers(classes)))
        while len(boxes) < per_image:  # false positives
            bw, bh = rng.uniform(4, w * 0.6), rng.uniform(4, h * 0.6)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            boxes.append([x, y, x + bw, y + bh])
            labels.append(int(rng.integers(classes)))
        xyxy = np.clip(np.array(boxes[:per_image], dtype=np.float32), 0, [w, h, w, h]).astype(np.float32)
        n = len(xyxy)
        scores = np.where(np.arange(n) < len(truth), rng.uniform(0.3, 1, n), rng.uniform(0, 0.7, n)).astype(np.float32)
        pred = {"img_id": image["id"], "bboxes": xyxy, "scores": scores, "labels": np.array(labels[:n])}
        if masks:  # rectangle-ish: the box with its corners cut
            pred["masks"] = [_rle(mask_utils, box, w, h) for box in xyxy.tolist()]
        results.append(({"width": w, "height": h, "img_id": image["id"]}, pred))
    return results


def _rle(mask_utils: Any, box: list[float], w: int, h: int) -> dict:
    x1, y1, x2, y2 = box
    cut = 0.15 * min(x2 - x1, y2 - y1)
    polygon = [x1 + cut, y1, x2, y1, x2, y2 - cut, x2 - cut, y2, x1, y2, x1, y1 + cut]
    return mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))


def make(out: Path, images: int, seed: int = 0, masks: bool = True) -> tuple[Path, Path]:
    """The annotation file and the pickled results of a synthetic set, written under ``out``."""
    rng = np.random.default_rng(seed)
    coco = make_ground_truth(rng, images, classes=80, per_image=7.7)
    results = make_results(rng, coco, per_image=100, masks=masks)
    ann, pkl = out / "annotations.json", out / "results.pkl"
    ann.write_text(json.dumps(coco))
    pkl.write_bytes(pickle.dumps(results))
    return ann, pkl


# ---- one measurement, in its own process -------------------------------------------------------------


def metric_class(which: str) -> type:
    """Imported before the clock starts: importing mmdet is not scoring."""
    from mmdet.evaluation.metrics import CocoMetric

    from det_mmdet.coco import FastCocoMetric

    return {"mmdet": CocoMetric, "ours": FastCocoMetric}[which]


def build_metric(metric_cls: type, ann: Path, kind: str):
    metric = metric_cls(ann_file=str(ann), metric=kind)
    metric.dataset_meta = {"classes": tuple(f"class {c}" for c in range(80))}
    return metric


def measure(which: str, kind: str, ann: Path, pkl: Path) -> dict[str, Any]:
    import contextlib
    import io

    results = pickle.loads(pkl.read_bytes())
    metric_cls = metric_class(which)
    if which == "ours":
        import hotcoco  # noqa: F401  (imported on first use; a module import, not scoring)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines
        start = time.perf_counter()
        metric = build_metric(metric_cls, ann, kind)
        scores = metric.compute_metrics(results)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    numbers = {k: v for k, v in scores.items() if k.startswith(f"{kind}_mAP")}
    return {"seconds": seconds, "peak_mib": peak, "scores": numbers}


def measure_results_file(backend: str, results: Path, ann: Path) -> dict[str, Any]:
    """``det-mmdet evaluate --results``, scoring only (the CLI's imports are not scoring)."""
    import contextlib
    import io

    import hotcoco  # noqa: F401  (module imports, not scoring)

    from det_mmdet import coco  # noqa: F401
    from det_mmdet.export import evaluate_results

    with contextlib.redirect_stdout(io.StringIO()):  # the tables
        start = time.perf_counter()
        scores = evaluate_results(results, ann, None, backend)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mib": peak, "scores": {k: v for k, v in scores.items() if "_AP_" not in k}}


def results_file(pkl: Path, out: Path) -> Path:
    """The result set as a COCO results file, as ``det-mmdet predict`` writes one (box, score, RLE mask)."""
    found = []
    for _, pred in pickle.loads(pkl.read_bytes()):
        xyxy = pred["bboxes"].astype(np.float64)
        boxes = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1).tolist()
        scores = pred["scores"].astype(np.float64).tolist()
        for box, score, label, mask in zip(boxes, scores, pred["labels"].tolist(), pred["masks"], strict=True):
            segmentation = {"size": mask["size"], "counts": mask["counts"].decode()}
            found.append({"image_id": pred["img_id"], "category_id": label + 1, "bbox": box, "score": score,
                          "segmentation": segmentation})  # fmt: skip
    path = out / "results.json"
    path.write_text(json.dumps(found))
    return path


def run_one(which: str, kind: str, ann: Path, pkl: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", which, "--kind", kind, "--ann", str(ann), "--pkl", str(pkl)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument("--one", choices=["mmdet", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="bbox", help=argparse.SUPPRESS)
    parser.add_argument("--ann", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pkl", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--results-file", action=argparse.BooleanOptionalAction, default=True,
        help="also time det-mmdet evaluate --results (hotcoco and pycocotools, once each)",
    )  # fmt: skip
    parser.add_argument("--one-results", choices=["hotcoco", "pycocotools"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.kind, args.ann, args.pkl)))
        return
    if args.one_results:
        print(json.dumps(measure_results_file(args.one_results, args.pkl, args.ann)))
        return

    with tempfile.TemporaryDirectory() as scratch:
        print(f"making {args.images} images of results ...", file=sys.stderr, flush=True)
        ann, pkl = make(Path(scratch), args.images, masks="segm" in args.kinds)
        rows = []
        for kind in args.kinds:
            runs: dict[str, list[dict]] = {"mmdet": [], "ours": []}
            for r in range(args.repeats):
                for which in ("mmdet", "ours"):  # alternating
                    runs[which].append(run_one(which, kind, ann, pkl))
                    last = runs[which][-1]
                    print(f"{kind} {which} run {r + 1}: {last['seconds']:.1f} s", file=sys.stderr, flush=True)
            mmdet_s = statistics.median(r["seconds"] for r in runs["mmdet"])
            ours_s = statistics.median(r["seconds"] for r in runs["ours"])
            same = all(r["scores"] == runs["mmdet"][0]["scores"] for r in runs["mmdet"] + runs["ours"])
            rows.append(
                f"| {kind} | {mmdet_s:.1f} s | {ours_s:.1f} s | {mmdet_s / ours_s:.1f}x "
                f"| {max(r['peak_mib'] for r in runs['mmdet']):.0f} MiB "
                f"| {max(r['peak_mib'] for r in runs['ours']):.0f} MiB | {'yes' if same else 'NO'} |"
            )
            if not same:
                print(f"{kind}: the numbers differ: {runs['mmdet'][0]['scores']} vs {runs['ours'][0]['scores']}")
        if args.results_file and "segm" in args.kinds:
            path = results_file(pkl, Path(scratch))
            command = [sys.executable, __file__, "--ann", str(ann), "--pkl", str(path), "--one-results"]
            files = {}
            for backend in ("hotcoco", "pycocotools"):
                done = subprocess.run([*command, backend], capture_output=True, text=True, check=True)
                files[backend] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"evaluate --results {backend}: {files[backend]['seconds']:.1f} s", file=sys.stderr, flush=True)
    print(f"{args.images} images, 80 classes, 100 detections per image; median of {args.repeats}, alternating")
    print(
        "| IoU type | mmdet CocoMetric | det-mmdet | speed-up | peak memory, mmdet | peak memory, ours | same numbers |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.results_file and "segm" in args.kinds:
        hot, ref = files["hotcoco"], files["pycocotools"]
        same = "yes" if hot["scores"] == ref["scores"] else "NO"
        print("\n| det-mmdet evaluate --results (bbox and segm) | hotcoco | pycocotools | speed-up | same numbers |")
        print("|---|---|---|---|---|")
        cells = [f"{run['seconds']:.1f} s, {run['peak_mib']:.0f} MiB" for run in (hot, ref)]
        print(f"| {args.images} images | {' | '.join(cells)} | {ref['seconds'] / hot['seconds']:.1f}x | {same} |")


if __name__ == "__main__":
    main()
