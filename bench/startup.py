"""Start-up at COCO scale: seconds and peak memory to build the training set, mmdet's way and ours.

Makes a COCO-format training file with COCO train2017's proportions (118,287 images, about 865k
polygon objects, about 1% of images without objects and 1% crowd regions; ``--images`` for fewer)
and builds mmdet's Mask R-CNN training set from it (``mask-rcnn_r50_fpn_1x_coco.py``'s
``train_dataloader.dataset``: CocoDataset, ``filter_cfg``, its pipeline) three ways, each in fresh
processes, after their imports:

- mmdet 3.3.0 as mmengine's Runner builds it (``DATASETS.build`` and ``full_init``), one process;
- det-mmdet's ``build_dataset`` in the first rank of a node: the cache is empty, it parses and stores;
- det-mmdet in the later ranks: ``--ranks`` processes at once (8: a node of 8 GPUs) on the stored cache.

Alternating, median of ``--repeat``; later ranks report their slowest process and largest memory.
Peak RSS is the process's high-water mark (``VmHWM``); "extra" is that minus its RSS just before the build.
The children also check that every build holds mmdet's ``data_bytes`` and ``data_address``.

    .venv/bin/python bench/startup.py [--images 118287] [--ranks 8] [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
COCO_IMAGES, COCO_OBJECTS = 118_287, 864_871  # COCO train2017 (instances, crowd regions included)
SIZES = ((640, 480), (640, 427), (480, 640), (640, 426), (427, 640), (500, 375), (640, 512), (612, 612))


def make_coco(path: Path, images: int, seed: int = 0) -> None:
    """A COCO-format file: polygons of 8-24 points (two decimals), sizes and counts as COCO's."""
    rng = np.random.default_rng(seed)
    counts = rng.geometric(COCO_IMAGES / COCO_OBJECTS, size=images)
    counts[rng.random(images) < 1021 / COCO_IMAGES] = 0  # COCO's images without objects
    sizes = np.array(SIZES)[rng.integers(0, len(SIZES), images)]
    imgs, anns = [], []
    for i in range(images):
        w, h = (int(v) for v in sizes[i])
        imgs.append({"license": 1, "file_name": f"{i + 1:012d}.jpg", "height": h, "width": w, "id": i + 1})
        n = int(counts[i])
        if n == 0:
            continue
        bw = np.round(rng.uniform(4, w * 0.6, n), 2)
        bh = np.round(rng.uniform(4, h * 0.6, n), 2)
        x, y = np.round(rng.uniform(0, w - bw), 2), np.round(rng.uniform(0, h - bh), 2)
        points = rng.integers(8, 25, n)
        for j in range(n):
            k = int(points[j])
            px = np.round(x[j] + bw[j] * rng.random(k), 2)
            py = np.round(y[j] + bh[j] * rng.random(k), 2)
            ann = {"segmentation": [np.stack([px, py], 1).reshape(-1).tolist()], "area": round(bw[j] * bh[j] * 0.6, 4)}
            if rng.random() < 0.01:  # a crowd region, COCO's uncompressed RLE
                ann["segmentation"] = {"counts": rng.integers(1, 400, 60).tolist(), "size": [h, w]}
            ann |= {"iscrowd": int(isinstance(ann["segmentation"], dict)), "image_id": i + 1}
            ann |= {"bbox": [x[j], y[j], bw[j], bh[j]], "category_id": int(rng.integers(1, 81)), "id": len(anns) + 1}
            anns.append(ann)
    cats = [{"supercategory": "thing", "id": c + 1, "name": f"class_{c + 1}"} for c in range(80)]
    coco = {"info": {"description": "synthetic, COCO train2017's proportions"}, "licenses": [], "images": imgs}
    coco |= {"annotations": anns, "categories": cats}
    scratch = path.with_suffix(".tmp")
    with open(scratch, "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    os.replace(scratch, path)


def dataset_cfg(ann: Path) -> dict:
    import mmdet
    from mmengine.config import Config

    config = Path(mmdet.__file__).parent / ".mim/configs/mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"
    cfg = Config.fromfile(str(config)).train_dataloader.dataset.to_dict()
    classes = tuple(c["name"] for c in json.loads(ann.with_suffix(".classes.json").read_text()))
    return cfg | {"data_root": f"{ann.parent}/", "ann_file": ann.name, "metainfo": {"classes": classes}}


def memory_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process; unlike ru_maxrss, VmHWM starts afresh at exec."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child(way: str, ann: Path, cache: Path, go: Path | None, out: Path) -> None:
    """One build in this process, measured after the imports; the figures to ``out`` as JSON."""
    sys.path.insert(0, str(ROOT / "model_def"))
    import mmdet.datasets  # noqa: F401  (imported before the clock starts: a trial imports it anyway)
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope

    from det_mmdet import data

    init_default_scope("mmdet")
    cfg = dataset_cfg(ann)
    if go is not None:  # the later ranks start together
        out.with_suffix(".ready").touch()
        while not go.exists():
            time.sleep(0.005)
    before = memory_mb("VmRSS")
    start = time.perf_counter()
    if way == "mmdet":
        dataset = DATASETS.build(cfg)
        dataset.full_init()
    else:
        dataset = data.build_dataset(cfg, "train_dataloader.dataset", {"annotation_cache": str(cache)})
    seconds = time.perf_counter() - start
    peak = memory_mb("VmHWM")
    digest = hashlib.sha256(np.asarray(dataset.data_bytes)).hexdigest()
    digest += hashlib.sha256(np.asarray(dataset.data_address, dtype=np.int64)).hexdigest()
    out.write_text(json.dumps({"s": seconds, "peak": peak, "extra": peak - before, "n": len(dataset), "d": digest}))


def run(way: str, ann: Path, cache: Path, work: Path, processes: int = 1) -> list[dict]:
    outs = [work / f"{way}-{i}.json" for i in range(processes)]
    go = work / "go" if processes > 1 else None
    for path in [*outs, *(o.with_suffix(".ready") for o in outs)] + ([go] if go else []):
        path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", way, "--ann", str(ann), "--cache", str(cache)]
    procs = [subprocess.Popen([*cmd, "--out", str(o)] + (["--go", str(go)] if go else [])) for o in outs]
    if go is not None:
        while not all(o.with_suffix(".ready").exists() for o in outs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
        go.touch()
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"bench/startup.py: the {way} build failed (exit {p.returncode})")
    return [json.loads(o.read_text()) for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=COCO_IMAGES)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, help="where the annotation file is made (kept for the next run)")
    p.add_argument("--child", choices=("mmdet", "first", "later"), help=argparse.SUPPRESS)
    p.add_argument("--ann", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--go", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stats:
        coco = json.loads(args.stats.read_text())
        args.stats.with_suffix(".classes.json").write_text(json.dumps(coco["categories"]))
        return print(json.dumps([len(coco["annotations"]), sum(a["iscrowd"] for a in coco["annotations"])]))
    if args.child:
        return child(args.child, args.ann, args.cache, args.go, args.out)

    work = args.workdir or Path(tempfile.gettempdir()) / "det-mmdet-startup-bench"
    work.mkdir(parents=True, exist_ok=True)
    ann = work / f"coco_{args.images}.json"
    if not ann.exists():
        start = time.perf_counter()
        make_coco(ann, args.images)
        print(f"made {ann} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    # Counted in a child: what this process reads stays out of the children's memory (they fork from it).
    stats = subprocess.run([sys.executable, __file__, "--stats", str(ann)], capture_output=True, text=True, check=True)
    objects, crowd = json.loads(stats.stdout)

    rows: dict[str, list[tuple[float, float, float]]] = {"mmdet": [], "first": [], "later": []}
    digests, lengths = set(), set()
    for _ in range(args.repeat):
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        for way, processes in (("mmdet", 1), ("first", 1), ("later", args.ranks)):
            results = run(way, ann, cache, work, processes)
            rows[way].append(tuple(max(r[k] for r in results) for k in ("s", "peak", "extra")))
            digests |= {r["d"] for r in results}
            lengths |= {r["n"] for r in results}
    shutil.rmtree(work / "cache", ignore_errors=True)

    size = ann.stat().st_size / 1e6
    print(f"{args.images} images, {objects} objects ({crowd} crowd), {size:.0f} MB; mmdet's Mask R-CNN training set "
          f"({lengths.pop() if len(lengths) == 1 else lengths} images after filter_cfg); {os.cpu_count()} cores; "
          f"median of {args.repeat}, alternating")  # fmt: skip
    print(f"same data_list as mmdet's: {'yes' if len(digests) == 1 else 'NO'}")
    names = {
        "mmdet": ("mmdet 3.3.0 (Runner's build)", "1"),
        "first": ("det-mmdet, first rank (parses, caches)", "1"),
        "later": ("det-mmdet, later ranks", f"{args.ranks} at once (slowest)"),
    }
    print("| build | processes | seconds | peak RSS (MB) | extra peak RSS (MB) |\n|---|---|---|---|---|")
    for way, values in rows.items():
        s, peak, extra = (statistics.median(v[k] for v in values) for k in range(3))
        print(f"| {names[way][0]} | {names[way][1]} | {s:.3g} | {peak:.0f} | {extra:.0f} |")


if __name__ == "__main__":
    main()
