"""What one training report costs a cluster trial: ``--report-period 1`` against ``--report-period N``.

A report boundary in Determined 0.38.1's PyTorchTrial loop (``_pytorch_trial.py``) is an allgather
of the batch metrics, a POST of the training metrics and of the progress to the master, a preemption
check broadcast from the chief and a TensorBoard sync. Each run here is a real trial through the test
master (``tests/master.py``, on 127.0.0.1) with the launcher, on the shapes Faster R-CNN; the same
trial with a report every batch and with one report at the end, alternating, median of ``--repeat``.
The difference over the extra boundaries is the cost of one.

    .venv/bin/python bench/report_boundary.py [--batches 40] [--slots 1 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "model_def"))

from det_mmdet.shapes import make_shapes  # noqa: E402
from master import TestMaster, clear_info, full_config, prepare_container, trial_env  # noqa: E402

SEARCHER = {"name": "single", "metric": "bbox_mAP", "smaller_is_better": False}


def one_trial(work: Path, shapes: Path, slots: int, batches: int, period: int) -> tuple[float, int]:
    """Seconds from launch to exit, and the training reports the master received."""
    hp = {
        "global_batch_size": 2 * slots,
        "config_file": "configs/shapes_faster_rcnn.py",
        "validation_pictures": 0,
        "override_mmdet_config": {"data_root": f"{shapes}/"},
    }
    # Validation only at the end (a period past the length): what is timed is training and reporting.
    args = ["--max-batches", str(batches), "--validation-period", str(batches), "--report-period", str(period)]
    with TestMaster(storage=work / "storage", searcher=SEARCHER, slots=slots) as master:
        exp = full_config(
            {"hyperparameters": hp, "searcher": SEARCHER, "entrypoint": "train.py"}, master.storage, slots
        )
        env = trial_env(master, exp, hp, slots=slots)
        prepare_container(env, sys.executable, work / "trial")
        bin_dir = str(Path(sys.executable).parent)
        start = time.perf_counter()
        try:
            r = subprocess.run(
                [sys.executable, "-m", "determined.launch.torch_distributed", "python3", "train.py", *args],
                cwd=work / "trial",
                env={**os.environ, **env, "PATH": bin_dir + os.pathsep + os.environ["PATH"]},
                capture_output=True,
                text=True,
            )
        finally:
            clear_info()
        seconds = time.perf_counter() - start
        if r.returncode:
            sys.exit(f"trial failed ({slots} slots, period {period}):\n{r.stderr[-3000:]}")
        return seconds, len(master.metrics("training"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--slots", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shapes = make_shapes(Path(tmp) / "shapes", train=48, val=16, seed=0)  # a validation batch per slot
        print(f"{args.batches} batches, median of {args.repeat}, alternating")
        print("| slots | every batch: s, reports | once: s, reports | per extra boundary (ms) |")
        print("|---|---|---|---|")
        for slots in args.slots:
            times: dict[int, list[float]] = {1: [], args.batches: []}
            reports: dict[int, int] = {}
            for i in range(args.repeat):
                for period in times:
                    seconds, reports[period] = one_trial(
                        Path(tmp) / f"{slots}-{period}-{i}", shapes, slots, args.batches, period
                    )
                    times[period].append(seconds)
                    print(f"  {slots} slots, period {period}, run {i + 1}: {seconds:.1f} s", file=sys.stderr)
            every, once = statistics.median(times[1]), statistics.median(times[args.batches])
            extra = reports[1] - reports[args.batches]
            print(
                f"| {slots} | {every:.1f}, {reports[1]} | {once:.1f}, {reports[args.batches]} | "
                f"{1000 * (every - once) / extra:.0f} |"
            )


if __name__ == "__main__":
    main()
