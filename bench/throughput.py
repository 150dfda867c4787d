"""Training throughput: mmengine's own ``Runner`` vs ``det-mmdet train``, same config, data and seed.

Both train one config on one drawn-shapes set (``make_shapes``), batch 4 (``--batch``), the config's
``num_workers``, seed 0, each as a whole separate process. ``--model`` picks the config:

- ``tiny`` (default): ``model_def/configs/shapes_faster_rcnn.py``, ResNet-18 with 16 base channels,
  FPN 32, 128 px;
- ``r50-320``: ``bench/configs/faster_rcnn_r50_fpn_320.py``, the model of mmdet's
  ``faster-rcnn_r50_fpn_1x_coco.py`` (backbone from random weights) at 320 px;
- ``rtmdet``: ``model_def/configs/shapes_rtmdet.py``, mmdet's RTMDet-tiny recipe at 1/8 width and
  128 px, with its hooks (EMAHook updating every batch, PipelineSwitchHook) run by both trainers.

Both start from the same weights: one random initialisation made here and given as ``load_from``
(see ``initial_weights``).

The trainers:

- mmengine Runner: ``Runner.from_cfg(cfg).train()`` as mmdet's ``tools/train.py`` does it, with
  ``IterBasedTrainLoop(max_iters=N, val_interval=N)``, the config's default hooks (log interval 10,
  ``CheckpointHook`` interval 10**9, so its ``save_last`` writes one checkpoint at the end) and a work_dir
  in a temporary directory;
- det-mmdet: ``det_mmdet.cli.main(["train", EXP.yaml, "--max-batches", N, "--validation-period", N,
  "--output-dir", ...])``, the body of the ``det-mmdet`` console script (Determined's local mode, progress
  bar and ``metrics.jsonl`` included; one validation and one checkpoint at the end).

Each process is a worker of this script (``--worker runner|ours``) that wraps a few functions with timers
before it starts (the training stream's ``next()``, the model's training step - mmengine's
``BaseModel.train_step`` / our ``MMDetTrial.train_batch`` -, the validation loop, checkpoint saving) and
writes them to a JSON file; nothing else is changed (the ``ours`` worker and the console script take the
same time to within run-to-run noise). Runs alternate (runner, ours, runner, ours, ...) for two lengths;
start-up cancels in ``per-batch s = (median wall(long) - median wall(short)) / (long - short)``. CPU time
and peak RSS come from ``os.wait4`` on each child (user+sys of the process and its reaped children; peak
RSS is the largest single process, not a sum).

The machine may be shared: before each run the script waits (up to ``--max-wait`` s) until other
processes use fewer than ``--quiet`` cores, records how many cores others used during the run, and repeats
a run during which they used more than ``--noisy`` cores (``--retries`` times, the last one is kept).
A 2-core machine with one core taken by someone else runs either trainer several times slower.
Prints markdown tables (bench/throughput_results.md holds one run); about 4 minutes per
``--num-workers`` value on an idle 2-core machine with the defaults.

    .venv/bin/python bench/throughput.py [--repeats 3] [--short 20] [--long 100] [--num-workers 0 [2]]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # --model: (config, what the report calls it)
    "tiny": (ROOT / "model_def" / "configs" / "shapes_faster_rcnn.py", "tiny Faster R-CNN, 128 px"),
    "r50-320": (ROOT / "bench" / "configs" / "faster_rcnn_r50_fpn_320.py", "Faster R-CNN R50-FPN, 320 px"),
    "rtmdet": (ROOT / "model_def" / "configs" / "shapes_rtmdet.py", "RTMDet-tiny 1/8 width (EMAHook), 128 px"),
}
SYSTEMS = {"runner": "mmengine Runner", "ours": "det-mmdet"}


# ---- timers, installed inside a worker process -------------------------------------------------------


class Timers:
    def __init__(self) -> None:
        self.data_s = 0.0  # inside next() of the training data stream
        self.batches = 0
        self.first_batch_at: float | None = None  # time.time() when the first training batch was asked for
        self.val_s = 0.0  # validation passes (checkpointing excluded)
        self.val_runs = 0
        self.ckpt_s = 0.0
        self.ckpt_runs = 0
        self.step_s = 0.0  # the model's training step: preprocess, forward, losses, backward, optimizer
        self.loop_start: float | None = None  # perf_counter: first training batch asked for
        self.loop_s = 0.0  # first training batch asked for -> first validation starts
        self.ckpt_in_loop_s = 0.0  # checkpoints written inside that window (the runner's save_last)

    def step_done(self, s: float) -> None:
        self.step_s += s

    def ckpt_done(self, s: float) -> None:
        self.ckpt_s += s
        self.ckpt_runs += 1

    def val_starts(self) -> None:
        if self.loop_start is not None and not self.loop_s:
            self.loop_s = time.perf_counter() - self.loop_start
            self.ckpt_in_loop_s = self.ckpt_s

    def fetch_started(self) -> float:
        if self.first_batch_at is None:
            self.first_batch_at = time.time()
            self.loop_start = time.perf_counter()
        return time.perf_counter()

    def fetched(self, start: float) -> None:
        self.data_s += time.perf_counter() - start
        self.batches += 1

    def dump(self, path: str, **extra) -> None:
        import torch

        Path(path).write_text(json.dumps({**vars(self), "torch_threads": torch.get_num_threads(), **extra}))


def timed(fn, on_done):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            on_done(time.perf_counter() - start)

    return wrapper


def worker_runner(args: argparse.Namespace, timers: Timers) -> None:
    from mmengine.config import Config
    from mmengine.model import BaseModel
    from mmengine.runner import Runner, loops

    data_root = str(args.data) + "/"
    cfg = Config.fromfile(str(MODELS[args.model][0]))
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[key].dataset.data_root = data_root
        cfg[key].num_workers = args.workers
    cfg.train_dataloader.batch_size = args.batch
    cfg.val_evaluator.ann_file = data_root + "annotations/val.json"
    cfg.test_evaluator.ann_file = data_root + "annotations/val.json"
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=args.batches, val_interval=args.batches)
    cfg.default_hooks.logger.interval = 10
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=10**9)
    cfg.log_processor.by_epoch = False
    cfg.randomness = dict(seed=0)
    cfg.launcher = "none"
    cfg.work_dir = str(args.out)
    cfg.load_from = str(args.init)

    next_ = loops._InfiniteDataloaderIterator.__next__

    def timed_next(self):
        start = timers.fetch_started()
        batch = next_(self)
        timers.fetched(start)
        return batch

    loops._InfiniteDataloaderIterator.__next__ = timed_next

    val_run = loops.ValLoop.run

    def timed_val(self):
        timers.val_starts()
        start = time.perf_counter()
        try:
            return val_run(self)
        finally:
            timers.val_s += time.perf_counter() - start
            timers.val_runs += 1

    loops.ValLoop.run = timed_val
    Runner.save_checkpoint = timed(Runner.save_checkpoint, timers.ckpt_done)
    BaseModel.train_step = timed(BaseModel.train_step, timers.step_done)
    Runner.from_cfg(cfg).train()


def worker_ours(args: argparse.Namespace, timers: Timers) -> None:
    from determined.pytorch import _pytorch_trial

    from det_mmdet.cli import main
    from det_mmdet.trial import MMDetTrial

    next_stream = _pytorch_trial.dataloader_next

    def timed_stream(iterator):
        stream = next_stream(iterator)
        while True:
            start = timers.fetch_started()
            try:
                batch = next(stream)
            except StopIteration:
                return
            timers.fetched(start)
            yield batch

    _pytorch_trial.dataloader_next = timed_stream
    controller = _pytorch_trial._PyTorchTrialController
    checkpoint, validate = controller._checkpoint, controller._validate

    def timed_validate(self):
        timers.val_starts()
        start, ckpt_before = time.perf_counter(), timers.ckpt_s
        try:
            return validate(self)
        finally:  # _validate ends with the checkpoint that follows every validation: not validation time
            timers.val_s += time.perf_counter() - start - (timers.ckpt_s - ckpt_before)
            timers.val_runs += 1

    controller._checkpoint = timed(checkpoint, timers.ckpt_done)
    controller._validate = timed_validate
    MMDetTrial.train_batch = timed(MMDetTrial.train_batch, timers.step_done)
    argv = ["train", str(args.experiment), "--max-batches", str(args.batches), "--validation-period"]
    argv += [str(args.batches), "--output-dir", str(args.out)]
    if args.workers:
        argv += ["--set", f"train_dataloader.num_workers={args.workers}"]
        argv += ["--set", f"val_dataloader.num_workers={args.workers}"]
    rc = main(argv)
    if rc:
        raise SystemExit(rc)


def run_worker(args: argparse.Namespace) -> None:
    timers = Timers()
    (worker_runner if args.worker == "runner" else worker_ours)(args, timers)
    timers.dump(args.result)


# ---- the parent: alternate whole processes, collect wall, CPU and peak RSS ---------------------------


def initial_weights(config: Path, path: Path) -> Path:
    """One random initialisation that both trainers load (their RNG streams differ, so their own would too).

    A step's cost depends on the weights: mmdet's RoI extractor calls RoIAlign once per FPN level that
    proposals land on, and random weights decide the levels. From their own initialisations the runner's
    R50 steps used 2 levels and ours 3 (cProfile), which made ours 7 % slower for reasons not the trainer's.
    """
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.logging import MMLogger

    register_all_modules()
    MMLogger.get_instance("bench-init", log_level="WARNING")  # now 'current': no per-tensor init report on stdout
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(config)).model)
    model.init_weights()
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, every process)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def wait_quiet(limit: float, max_wait: float, window: float = 3.0) -> float:
    """Wait until other processes use less than ``limit`` cores over ``window`` s; returns the seconds waited."""
    start = time.perf_counter()
    while True:
        before = busy_cpu_s()
        time.sleep(window)
        if (busy_cpu_s() - before) / window < limit or time.perf_counter() - start > max_wait:
            return time.perf_counter() - start


def measure(system: str, batches: int, workers: int, work: Path, tag: str, common: list[str]) -> dict:
    """One whole worker process; ``common``: the worker arguments every run shares (data, weights, model)."""
    out = work / f"{system}-{tag}"
    result = work / f"{system}-{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--batches", str(batches)]
    cmd += ["--workers", str(workers), "--out", str(out), "--result", str(result), *common]
    with open(work / f"{system}-{tag}.log", "w") as log:
        launched = time.time()
        busy = busy_cpu_s()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        busy = busy_cpu_s() - busy
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = (work / f"{system}-{tag}.log").read_text()[-3000:]
        raise SystemExit(f"{system} worker ({batches} batches) failed with {proc.returncode}:\n{tail}")
    timers = json.loads(result.read_text())
    return {
        "system": system,
        "batches": batches,
        "workers": workers,
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        # cores used by every other process on the machine during the run (0 on an idle machine)
        "others": max(0.0, busy - (usage.ru_utime + usage.ru_stime)) / wall,
        "rss_mb": usage.ru_maxrss / 1024,
        "startup": timers["first_batch_at"] - launched,
        **{k: timers[k] for k in ("data_s", "batches", "val_s", "val_runs", "ckpt_s", "ckpt_runs", "torch_threads")},
        "step_s": timers["step_s"],
        "after_startup": wall - (timers["first_batch_at"] - launched),
        "loop_net_s": timers["loop_s"] - timers["ckpt_in_loop_s"],
        # the training loop's own cost: the loop's time less data, model steps and checkpoints
        "overhead_s": timers["loop_s"] - timers["data_s"] - timers["step_s"] - timers["ckpt_in_loop_s"],
    }


def summarize(runs: list[dict], system: str, short: int, long: int) -> dict:
    def med(key: str, n: int) -> float:
        return statistics.median(r[key] for r in runs if r["system"] == system and r["batches"] == n)

    span = long - short
    per_batch = (med("wall", long) - med("wall", short)) / span
    mine = [r for r in runs if r["system"] == system]
    return {
        "wall_short": med("wall", short),
        "wall_long": med("wall", long),
        "per_batch": per_batch,
        # the same difference with each run's own start-up taken out, and of the training loop alone
        "per_batch_after_startup": (med("after_startup", long) - med("after_startup", short)) / span,
        "per_batch_loop": (med("loop_net_s", long) - med("loop_net_s", short)) / span,
        "cpu_long": med("cpu", long),
        "cpu_per_batch": (med("cpu", long) - med("cpu", short)) / span,
        "rss_mb": statistics.median(r["rss_mb"] for r in mine),
        "data_per_batch": (med("data_s", long) - med("data_s", short)) / span,
        "val_s": statistics.median(r["val_s"] for r in mine),
        "ckpt_s": statistics.median(r["ckpt_s"] for r in mine),
        "startup": statistics.median(r["startup"] for r in mine),
        "threads": sorted({r["torch_threads"] for r in mine}),
        # inside the long runs' training loop, per batch
        "loop_data": med_per_batch(runs, system, long, "data_s"),
        "loop_step": med_per_batch(runs, system, long, "step_s"),
        "loop_overhead": med_per_batch(runs, system, long, "overhead_s"),
    }


def med_per_batch(runs: list[dict], system: str, n: int, key: str) -> float:
    return statistics.median(r[key] / n for r in runs if r["system"] == system and r["batches"] == n)


def report(runs: list[dict], workers: int, short: int, long: int, noisy: float, batch: int) -> str:
    mine = [r for r in runs if r["workers"] == workers]
    stats = {s: summarize(mine, s, short, long) for s in SYSTEMS}
    lines = [
        f"### num_workers {workers}",
        "",
        f"| trainer | wall {short} batches s | wall {long} batches s | per-batch s | images/s | "
        f"CPU s ({long}) | CPU s/batch | peak RSS MB | data ms/batch (share) | validation s | checkpoint s | "
        "start-up s |",
        "| --- | " + "--- | " * 11,
    ]
    for system, name in SYSTEMS.items():
        s = stats[system]
        share = s["data_per_batch"] / s["per_batch"]
        lines.append(
            f"| {name} | {s['wall_short']:.2f} | {s['wall_long']:.2f} | {s['per_batch']:.4f} | "
            f"{batch / s['per_batch']:.1f} | {s['cpu_long']:.1f} | {s['cpu_per_batch']:.4f} | {s['rss_mb']:.0f} | "
            f"{1000 * s['data_per_batch']:.1f} ({share:.0%}) | {s['val_s']:.2f} | {s['ckpt_s']:.2f} | "
            f"{s['startup']:.2f} |"
        )
    lines += [
        "",
        f"Inside the training loop of the {long}-batch runs (first batch asked for to validation start), ms per batch:",
        "",
        "| trainer | data (next()) | model step | trainer overhead (the rest, checkpoint excluded) |",
        "| --- | --- | --- | --- |",
    ]
    for system, name in SYSTEMS.items():
        s = stats[system]
        lines.append(
            f"| {name} | {1000 * s['loop_data']:.1f} | {1000 * s['loop_step']:.1f} | {1000 * s['loop_overhead']:.1f} |"
        )
    ours, theirs = stats["ours"], stats["runner"]
    lines += [
        "",
        "- per-batch speed ratio (runner per-batch / ours per-batch): "
        f"**{theirs['per_batch'] / ours['per_batch']:.2f}x** (goal ≥ 1.5x); the same ratio from wall less each "
        f"run's start-up: {theirs['per_batch_after_startup'] / ours['per_batch_after_startup']:.2f}x "
        f"({1000 * theirs['per_batch_after_startup']:.1f} vs {1000 * ours['per_batch_after_startup']:.1f} ms), "
        f"from the training loop alone: {theirs['per_batch_loop'] / ours['per_batch_loop']:.2f}x "
        f"({1000 * theirs['per_batch_loop']:.1f} vs {1000 * ours['per_batch_loop']:.1f} ms)",
        f"- CPU ratio (ours / runner): {ours['cpu_long'] / theirs['cpu_long']:.2f} for the whole {long}-batch process, "
        f"{ours['cpu_per_batch'] / theirs['cpu_per_batch']:.2f} per batch",
        f"- peak RSS ratio (ours / runner): {ours['rss_mb'] / theirs['rss_mb']:.2f}",
        f"- validation ratio (ours / runner): {ours['val_s'] / theirs['val_s']:.2f}; wall ratio "
        f"{long} batches (ours / runner): {ours['wall_long'] / theirs['wall_long']:.2f}",
        f"- torch threads in the trainers: runner {theirs['threads']}, ours {ours['threads']}; other processes "
        f"used {statistics.median(r['others'] for r in mine):.2f} cores (median over the runs, "
        f"max {max(r['others'] for r in mine):.2f}) of the machine's {os.cpu_count()} while these ran; "
        f"{sum(r['attempts'] - 1 for r in mine)} run(s) repeated because other processes used more than "
        f"{noisy} cores",
        "",
        "<details><summary>every run</summary>",
        "",
        "| run | trainer | batches | wall s | CPU s | peak RSS MB | data s | model step s | trainer overhead s "
        "| validation s | checkpoint s | start-up s | other processes, cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(mine):
        lines.append(
            f"| {i + 1} | {SYSTEMS[r['system']]} | {r['batches']} | {r['wall']:.2f} | {r['cpu']:.1f} | "
            f"{r['rss_mb']:.0f} | {r['data_s']:.2f} | {r['step_s']:.2f} | {r['overhead_s']:.2f} | "
            f"{r['val_s']:.2f} | {r['ckpt_s']:.2f} | {r['startup']:.2f} | {r['others']:.2f} |"
        )
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per trainer and length (median taken)")
    parser.add_argument("--short", type=int, default=20, help="batches of the short run")
    parser.add_argument("--long", type=int, default=100, help="batches of the long run")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0], help="loader workers (each a table)")
    parser.add_argument("--model", choices=MODELS, default="tiny", help="the config both train (see above)")
    parser.add_argument("--batch", type=int, default=4, help="images per batch")
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=50)
    parser.add_argument(
        "--quiet", type=float, default=0.3, help="before each run, wait until other processes use fewer cores"
    )
    parser.add_argument("--max-wait", type=float, default=120, help="seconds to wait for --quiet before running anyway")
    parser.add_argument(
        "--noisy", type=float, default=0.25, help="a run during which other processes used more cores is repeated"
    )
    parser.add_argument("--retries", type=int, default=2, help="repeats of a noisy run (the last one is kept)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, work dirs)")
    # worker mode (one measured process)
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--experiment", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--init", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if not 0 < args.short < args.long:
        parser.error("need 0 < --short < --long")

    import shutil

    import torch
    import yaml

    from det_mmdet.shapes import make_shapes

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    data = make_shapes(work / "shapes", train=args.train_images, val=args.val_images, seed=0)
    experiment = work / "exp.yaml"
    init = initial_weights(MODELS[args.model][0], work / "init.pth")
    experiment.write_text(
        yaml.safe_dump(
            {
                "name": "throughput",
                "hyperparameters": {
                    "global_batch_size": args.batch,
                    "config_file": str(MODELS[args.model][0]),
                    "load_from": str(init),
                    "override_mmdet_config": {"data_root": str(data) + "/"},
                },
                "searcher": {"name": "single", "metric": "bbox_mAP", "smaller_is_better": False},
            }
        )
    )
    common = ["--data", str(data), "--experiment", str(experiment), "--init", str(init)]
    common += ["--model", args.model, "--batch", str(args.batch)]
    load_before = os.getloadavg()
    started = time.time()
    runs: list[dict] = []
    for workers in args.num_workers:
        for rep in range(args.repeats):
            for n in (args.short, args.long):
                for system in SYSTEMS:
                    for attempt in range(1 + args.retries):
                        waited = wait_quiet(args.quiet, args.max_wait)
                        tag = f"w{workers}-n{n}-r{rep}-a{attempt}"
                        run = measure(system, n, workers, work, tag, common)
                        run.update(waited=waited, attempts=attempt + 1)
                        if run["others"] <= args.noisy:
                            break
                        print(f"  other processes used {run['others']:.2f} cores: run again", file=sys.stderr)
                    runs.append(run)
                    print(
                        f"{SYSTEMS[system]:16s} workers={workers} batches={n:4d} wall {run['wall']:6.2f}s "
                        f"cpu {run['cpu']:6.1f}s rss {run['rss_mb']:5.0f}MB val {run['val_s']:5.2f}s "
                        f"data {run['data_s']:5.2f}s others {run['others']:.2f} cores (waited {waited:.0f}s)",
                        file=sys.stderr,
                    )
    elapsed = time.time() - started
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"

    print(
        f"\n`bench/throughput.py {' '.join(sys.argv[1:])}` ({datetime.date.today().isoformat()}): "
        f"{MODELS[args.model][1]}, batch {args.batch} "
        f"(`{MODELS[args.model][0].relative_to(ROOT)}`), {args.train_images} training / {args.val_images} "
        f"validation drawn-shapes images, seed 0; {os.cpu_count()} CPU cores, {gpu}, "
        f"Python {platform.python_version()}, torch {torch.__version__}; "
        f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; {elapsed / 60:.1f} min.\n"
    )
    print(
        "Each cell is the median of the runs; per-batch s = (wall long - wall short) / (long - short); "
        "CPU is user+sys of the whole process tree; data ms/batch is time inside the training stream's next() "
        "(same difference), its share of per-batch s; validation s is one pass over the validation set "
        "(loader, predict, COCO evaluation, checkpoint excluded); start-up s is launch to the first training "
        "batch asked for.\n"
    )
    for workers in args.num_workers:
        print(report(runs, workers, args.short, args.long, args.noisy, args.batch))
    if args.keep:
        print(f"(kept {work})", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
