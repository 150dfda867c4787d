"""COCO evaluators side by side at COCO-val scale: time, peak memory and agreement with pycocotools.

The result set is bench/eval.py's (5,000 images, 80 classes, 100 detections per image; polygon
ground truth, an RLE mask on every detection). Each measurement is one fresh process that indexes
the ground truth (a loaded annotation dict), reads the detections as COCO result dicts (``loadRes``,
as a results file is read), then matches and accumulates (``evaluate`` + ``accumulate``), with
``maxDets`` (100, 300, 1000) as mmdet's CocoMetric sets them. It reports the wall time of that, the
process's peak RSS, and how far its precision and recall arrays are from pycocotools' (0: the same
bits). Libraries that are not installed are skipped (ultrafast-pycocotools is not a dependency of
det-mmdet: ``pip install ultrafast-pycocotools`` to include it). Rust thread pools are held to one
thread (``RAYON_NUM_THREADS=1``), as pycocotools has one.

    python bench/coco_backends.py                      # bbox and segm, 5,000 images, one run each
    python bench/coco_backends.py --images 500
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
LIBRARIES = ("pycocotools", "faster-coco-eval", "hotcoco", "ultrafast-pycocotools")
MODULES = dict(zip(LIBRARIES, ("pycocotools", "faster_coco_eval", "hotcoco", "ultrafast_pycocotools"), strict=True))


def bench_eval() -> Any:
    spec = importlib.util.spec_from_file_location("bench_eval", HERE / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def api(library: str) -> tuple[type, type]:
    """(COCO, COCOeval) of a library."""
    if library == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if library == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    if library == "hotcoco":
        from hotcoco import COCO, COCOeval

        return COCO, COCOeval
    from ultrafast_pycocotools import COCO, COCOeval

    return COCO, COCOeval


def result_dicts(results: list, kind: str) -> list[dict]:
    """CocoMetric's processed results as COCO result dicts (segm: the mask, no box)."""
    found = []
    for _, pred in results:
        labels = (np.asarray(pred["labels"]) + 1).tolist()  # bench/eval.py's category ids start at 1
        xyxy = pred["bboxes"].astype(np.float64)
        boxes = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1).tolist()
        for i, (score, label) in enumerate(zip(pred["scores"].astype(np.float64).tolist(), labels, strict=True)):
            entry = {"image_id": pred["img_id"], "score": score, "category_id": label}
            if kind == "segm":
                mask = pred["masks"][i]
                entry["segmentation"] = {"size": mask["size"], "counts": mask["counts"].decode()}
            else:
                entry["bbox"] = boxes[i]
            found.append(entry)
    return found


def measure(library: str, kind: str, ann: Path, pkl: Path, out: Path) -> dict[str, Any]:
    """One library, one IoU type; its precision and recall arrays saved under ``out``."""
    coco_cls, eval_cls = api(library)
    dataset = json.loads(ann.read_text())
    found = result_dicts(pickle.loads(pkl.read_bytes()), kind)
    extra = {"print_function": lambda *_: None} if library == "faster-coco-eval" else {}
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        if library == "pycocotools":
            gt = coco_cls()
            gt.dataset = dataset
            gt.createIndex()
        else:
            gt = coco_cls(dataset)
        evaluation = eval_cls(gt, gt.loadRes(found), kind, **extra)
        params = evaluation.params
        params.maxDets = [100, 300, 1000]
        evaluation.params = params
        evaluation.evaluate()
        evaluation.accumulate()
        seconds = time.perf_counter() - start
    np.save(out / f"{library}-{kind}-precision.npy", np.asarray(evaluation.eval["precision"]))
    np.save(out / f"{library}-{kind}-recall.npy", np.asarray(evaluation.eval["recall"]))
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_one(library: str, kind: str, ann: Path, pkl: Path, out: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", library, "--kind", kind, "--ann", str(ann), "--pkl", str(pkl)]
    command += ["--out", str(out)]
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def difference(out: Path, library: str, kind: str) -> str:
    """The largest difference of a library's precision and recall from pycocotools'."""
    worst = 0.0
    for name in ("precision", "recall"):
        ours = np.load(out / f"{library}-{kind}-{name}.npy")
        theirs = np.load(out / f"pycocotools-{kind}-{name}.npy")
        if ours.shape != theirs.shape:
            return f"shape {ours.shape}"
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return "0 (the same bits)" if worst == 0 else f"{worst:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--kinds", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument("--one", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="bbox", help=argparse.SUPPRESS)
    parser.add_argument("--ann", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pkl", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.kind, args.ann, args.pkl, args.out)))
        return

    installed = [lib for lib in LIBRARIES if importlib.util.find_spec(MODULES[lib]) is not None]
    versions = {lib: _version(lib) for lib in installed}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        print(f"making {args.images} images of results ...", file=sys.stderr, flush=True)
        ann, pkl = bench_eval().make(out, args.images, masks="segm" in args.kinds)
        rows = []
        for library in installed:
            cells = []
            for kind in args.kinds:
                found = run_one(library, kind, ann, pkl, out)
                print(f"{library} {kind}: {found['seconds']:.1f} s", file=sys.stderr, flush=True)
                cells.append(f"{found['seconds']:.1f} s, {found['peak_mib']:.0f} MiB, {difference(out, library, kind)}")
            rows.append(f"| {library} {versions[library]} | " + " | ".join(cells) + " |")
    print(f"{args.images} images, 80 classes, 100 detections per image; one process each, one thread")
    header = " | ".join(f"{k}: time, peak memory, largest difference from pycocotools" for k in args.kinds)
    print(f"| library | {header} |")
    print("|---" * (len(args.kinds) + 1) + "|")
    print("\n".join(rows))
    missing = [lib for lib in LIBRARIES if lib not in installed]
    if missing:
        print(f"not installed, skipped: {', '.join(missing)}")


def _version(library: str) -> str:
    from importlib.metadata import version

    return version(library)


if __name__ == "__main__":
    main()
