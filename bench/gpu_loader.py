"""RTMDet-s training on one GPU fed by 2, 4 and 8 loader workers: mmdet's data pipeline against det-mmdet's.

Makes photo-like 640x480 JPEGs (``bench/pipeline.py``'s ``make_coco``), then trains mmdet 3.3.0's own
``rtmdet/rtmdet_s_8xb32-300e_coco.py`` (batch 32, 640 px, AdamW, EMAHook) with ``det-mmdet train`` for each
number of loader workers (the backbone from random weights: nothing downloads), in two ways, alternating:

    mmdet   the Runner's workers: ``data.fast_transforms: false``, ``data.reuse_worker_heap: false``
    ours    det-mmdet's: both true (the defaults)

Each run is a process of its own. After ``--warmup`` training steps (workers started, mosaic caches filled)
it times ``--batches`` steps: images/s from the moments the trial's training steps end (each step waits
for the GPU), the step's own time (the images/s the step alone allows), and the GPU's utilisation as
NVML reports it (the share of time a kernel ran), read every 100 ms by this script over the same window.
The run's process ends right after the timed window: the final validation and checkpoint are not timed.
``--precision amp`` trains with ``optim_wrapper.type=AmpOptimWrapper`` (float16) instead, ``--precision fp32
amp`` both ways; ``--logs DIR`` keeps each run's training log.

Needs a CUDA GPU and refuses to run without one. Prints a markdown table (and writes it to ``--out``).

    python bench/gpu_loader.py [--workers 2 4 8] [--precision fp32 [amp]] [--warmup 8] [--batches 25]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "rtmdet/rtmdet_s_8xb32-300e_coco.py"
BATCH = 32  # the config's images per GPU
WAYS = {"mmdet": False, "ours": True}  # name: det-mmdet's transforms and worker heap


def experiment(root: Path, fast: bool) -> dict:
    """A det-mmdet experiment: the config as mmdet ships it, reading the made data set."""
    ann = "annotations/train.json"
    return {
        "name": "gpu-loader-rtmdet-s",
        "hyperparameters": {
            "global_batch_size": BATCH,
            "config_file": CONFIG,
            "override_mmdet_config": {
                "data_root": f"{root}/",
                "train_dataloader.dataset.ann_file": ann,
                "train_dataloader.dataset.data_prefix.img": "train/",
                "val_dataloader.dataset.ann_file": ann,
                "val_dataloader.dataset.data_prefix.img": "train/",
                "val_evaluator.ann_file": f"{root}/{ann}",
                "model.backbone.init_cfg": None,  # random weights: nothing downloads, a step costs the same
            },
        },
        "data": {"fast_transforms": fast, "reuse_worker_heap": fast},
        "searcher": {"name": "single", "metric": "bbox_mAP", "smaller_is_better": False},
    }


# ---- a run: one training process, stopped after its timed window -----------------------------------


def run_training(args: argparse.Namespace) -> None:
    """Inside the run's process: ``det-mmdet train`` with the trial's training step timed."""
    import torch

    sys.path.insert(0, str(ROOT / "model_def"))
    from det_mmdet.cli import main
    from det_mmdet.trial import MMDetTrial

    ends: list[float] = []  # time.time() as each step ends: the parent's NVML readings use the same clock
    steps: list[float] = []
    step = MMDetTrial.train_batch
    last = args.warmup + args.batches

    def timed_step(self, *a, **kw):
        start = time.perf_counter()
        out = step(self, *a, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are done: its time is the GPU's, not the launch's
        steps.append(time.perf_counter() - start)
        ends.append(time.time())
        if len(ends) == last:
            Path(args.result).write_text(json.dumps({"ends": ends, "steps": steps}))
            os._exit(0)  # the timed window is over; validation and checkpoint are not measured
        return out

    MMDetTrial.train_batch = timed_step
    argv = ["train", args.experiment, "--max-batches", str(last + 10), "--output-dir", args.output_dir]
    argv += ["--set", f"train_dataloader.num_workers={args.num_workers}", "--report-period", "10"]
    if args.run_amp:
        argv += ["--set", "optim_wrapper.type=AmpOptimWrapper"]
    rc = main(argv)
    raise SystemExit(f"training ended after {len(ends)} of {last} steps (exit {rc})")


# ---- the parent: runs, GPU readings, table ---------------------------------------------------------


class GpuReadings(threading.Thread):
    """NVML's GPU utilisation (percent of time a kernel ran) every ``period`` s, with time.time()."""

    def __init__(self, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]))
        self.name = pynvml.nvmlDeviceGetName(self.handle)
        self.period = period
        self.readings: list[tuple[float, int, int]] = []  # (time, GPU %, memory used MiB)

    def run(self) -> None:
        while True:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            used = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used >> 20
            self.readings.append((time.time(), util, used))
            time.sleep(self.period)

    def between(self, start: float, end: float) -> list[tuple[float, int, int]]:
        return [r for r in self.readings if start <= r[0] <= end]


def one_run(way: str, workers: int, amp: bool, work: Path, gpu: GpuReadings, args: argparse.Namespace) -> dict:
    tag = f"{way}-{workers}{'-amp' if amp else ''}"
    exp = work / f"{way}.json"  # JSON is YAML: det-mmdet reads it as an experiment config
    exp.write_text(json.dumps(experiment(work / "data", WAYS[way])))
    result = work / f"{tag}.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", "--experiment", str(exp), "--result", str(result)]
    cmd += ["--output-dir", str(work / tag), "--num-workers", str(workers), "--warmup", str(args.warmup)]
    cmd += ["--batches", str(args.batches)] + (["--run-amp"] if amp else [])
    log = work / f"{tag}.log"
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        rc = proc.wait()
    with_children(proc.pid)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, args.logs / log.name)
    if rc or not result.exists():
        raise SystemExit(f"run {tag} failed (exit {rc}):\n{log.read_text()[-4000:]}")
    timed = json.loads(result.read_text())
    ends, steps = timed["ends"], timed["steps"]
    w = args.warmup
    start, end = ends[w - 1], ends[-1]
    window_steps = steps[w:]
    readings = gpu.between(start, end)
    return {
        "way": way,
        "workers": workers,
        "amp": amp,
        "images_s": BATCH * len(window_steps) / (end - start),
        "step_ms": 1000 * statistics.median(window_steps),
        "wait_ms": 1000 * ((end - start) - sum(window_steps)) / len(window_steps),
        "gpu_util": statistics.mean(r[1] for r in readings) if readings else float("nan"),
        "gpu_mem_gib": max((r[2] for r in readings), default=0) / 1024,
        "start_s": ends[0] - started,
    }


def with_children(pgid: int) -> None:
    """Stop what the run's process left behind (its loader workers outlive an ``os._exit`` for a moment)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group has already exited


def table(results: list[dict], device: str, args: argparse.Namespace) -> str:
    lines = [
        f"RTMDet-s (`{CONFIG}`), batch {BATCH}, 640 px, {args.images} photo-like JPEGs; {device}, "
        f"{os.cpu_count()} CPU cores; {args.warmup} steps of warm-up, then {args.batches} timed (median of "
        f"{args.repeats} run(s) a row)",
        "",
        "| loader workers | pipeline | images/s | GPU utilisation % | data wait ms / step | "
        "training step ms (images/s it allows) | GPU memory GiB | first step after s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["workers"], r["way"], r["amp"]), []).append(r)
    for (workers, way, amp), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):

        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        name = ("mmdet's (Runner's workers)" if way == "mmdet" else "det-mmdet's") + (", AMP float16" if amp else "")
        lines.append(
            f"| {workers} | {name} | {med('images_s'):.0f} | {med('gpu_util'):.0f} | {med('wait_ms'):.0f} | "
            f"{med('step_ms'):.0f} ({BATCH * 1000 / med('step_ms'):.0f}) | {med('gpu_mem_gib'):.1f} | "
            f"{med('start_s'):.0f} |"
        )
    lines.append("")
    for amp in sorted({r["amp"] for r in results}):
        for workers in args.workers:
            mine = {
                way: [r["images_s"] for r in results if (r["workers"], r["amp"], r["way"]) == (workers, amp, way)]
                for way in WAYS
            }
            if all(mine.values()):
                ratio = statistics.median(mine["ours"]) / statistics.median(mine["mmdet"])
                lines.append(
                    f"- {workers} workers{', AMP' if amp else ''}: det-mmdet's pipeline {ratio:.2f}x mmdet's images/s"
                )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8], help="loader workers, a row pair each")
    p.add_argument("--warmup", type=int, default=8, help="training steps before the timed window")
    p.add_argument("--batches", type=int, default=25, help="training steps timed")
    p.add_argument("--images", type=int, default=300, help="JPEGs to make")
    p.add_argument("--repeats", type=int, default=1, help="runs per row (median taken)")
    p.add_argument("--precision", nargs="+", choices=("fp32", "amp"), default=["fp32"], help="amp: AmpOptimWrapper")
    p.add_argument("--logs", type=Path, help="keep each run's training log here")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_loader_results.md")
    # one training run (this script runs itself for each)
    p.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--experiment", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--num-workers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--output-dir", help=argparse.SUPPRESS)
    p.add_argument("--run-amp", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        run_training(args)
        return
    if args.warmup < 1 or args.batches < 1:
        sys.exit(f"error: --warmup {args.warmup} / --batches {args.batches}: each at least 1")

    import torch

    if not torch.cuda.is_available():
        sys.exit("error: bench/gpu_loader.py: torch sees no CUDA GPU here; nothing measured")
    sys.path.insert(0, str(ROOT / "bench"))
    from pipeline import make_coco

    gpu = GpuReadings()
    gpu.start()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_coco(work / "data", args.images)
        print(f"{args.images} JPEGs made; {gpu.name}", flush=True)
        for amp in [p == "amp" for p in args.precision]:
            for i in range(args.repeats):
                for workers in args.workers:
                    for way in WAYS if i % 2 == 0 else reversed(WAYS):  # who goes first alternates
                        results.append(one_run(way, workers, amp, work, gpu, args))
                        print(json.dumps(results[-1]), flush=True)
    text = table(results, gpu.name, args)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
