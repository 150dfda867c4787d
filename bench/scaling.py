"""Images/s of ``det-mmdet train --slots 2`` against one slot (CPU, gloo), start-up cost cancelled.

Each configuration trains the tiny Faster R-CNN (model_def/configs/shapes_faster_rcnn.py) for a short
and a long run as whole processes; images/s = extra images / extra wall time, so process start,
data set indexing and the final validation cancel. The global batch is the same (8) in both, so
two slots each take 4 images per step. Prints a markdown table (copied into bench/README.md).

    .venv/bin/python bench/scaling.py [--short 10] [--long 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "det-mmdet"
BATCH = 8


def experiment(work: Path, data: Path) -> Path:
    path = work / "scaling.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "scaling",
                "hyperparameters": {
                    "global_batch_size": BATCH,
                    "config_file": "configs/shapes_faster_rcnn.py",
                    "override_mmdet_config": {"data_root": f"{data}/"},
                },
                "searcher": {"name": "single", "metric": "bbox_mAP", "smaller_is_better": False},
            }
        )
    )
    return path


def wall(exp: Path, slots: int, batches: int, out: Path) -> float:
    args = [str(EXE), "train", str(exp), "--max-batches", str(batches), "--validation-period", str(batches)]
    start = time.perf_counter()
    r = subprocess.run(
        [*args, "--slots", str(slots), "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    if r.returncode:
        sys.exit(f"det-mmdet failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from det_mmdet.shapes import make_shapes

    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    exp = experiment(work, make_shapes(work / "shapes", train=400, val=16, seed=0))
    rates: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for slots in (1, 2):  # alternating, so that drifts in machine load hit both alike
            short = wall(exp, slots, args.short, work / f"s{slots}-{repeat}-short")
            long = wall(exp, slots, args.long, work / f"s{slots}-{repeat}-long")
            rates[slots].append((args.long - args.short) * BATCH / (long - short))
            print(f"slots={slots} short {short:.1f}s long {long:.1f}s -> {rates[slots][-1]:.1f} img/s", file=sys.stderr)

    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"\n{os.cpu_count()} CPU cores, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; "
          f"global batch {BATCH}, {args.short} vs {args.long} batches, median of {args.repeats}\n")  # fmt: skip
    print("| slots | images/s | vs 1 slot |")
    print("| --- | --- | --- |")
    print(f"| 1 | {one:.1f} | 1.00 |")
    print(f"| 2 (gloo) | {two:.1f} | {two / one:.2f} |")


if __name__ == "__main__":
    main()
