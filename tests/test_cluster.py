"""The cluster path as a Determined 0.38.1 agent runs it, against the test master (tests/master.py).

Each test prepares the container as the agent's entrypoint does (``determined.exec.prep_container``:
info files, rendezvous, the context directory downloaded with ``.detignore`` applied), then runs the
experiment's entrypoint, ``python3 -m determined.launch.torch_distributed python3 train.py ...``, in
that working directory, and checks what the master received.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from det_mmdet.checkpoint import newest_checkpoint, steps_completed
from master import TestMaster, clear_info, full_config, prepare_container, trial_env

PYTHON = sys.executable
BIN = str(Path(sys.executable).parent)
ROOT = Path(__file__).resolve().parent.parent
SEARCHER = {"name": "single", "metric": "bbox_mAP", "smaller_is_better": False}
ASHA = {
    "name": "adaptive_asha",
    "metric": "bbox_mAP",
    "smaller_is_better": False,
    "time_metric": "batches",
    "max_time": 8,
    "max_trials": 4,
}

pytestmark = pytest.mark.skipif(not os.access("/run", os.W_OK), reason="the trial's info files live in /run/determined")


def hparams(shapes: Path, config: str = "configs/shapes_faster_rcnn.py", **overrides) -> dict:
    return {
        "global_batch_size": 4,
        "config_file": config,
        "validation_pictures": 2,
        "override_mmdet_config": {"data_root": str(shapes) + "/", **overrides},
    }


def run_trial(
    tmp_path: Path,
    master: TestMaster,
    hp: dict,
    args: list[str],
    slots: int = 1,
    latest: str | None = None,
    steps: int = 0,
    name: str = "run",
) -> subprocess.CompletedProcess:
    exp = full_config(
        {"hyperparameters": hp, "searcher": master.searcher, "entrypoint": "train.py"}, master.storage, slots
    )
    env = trial_env(master, exp, hp, slots=slots, latest_checkpoint=latest, steps_completed=steps)
    workdir = tmp_path / name
    prepare_container(env, PYTHON, workdir)
    try:
        return subprocess.run(
            [PYTHON, "-m", "determined.launch.torch_distributed", "python3", "train.py", *args],
            cwd=workdir,
            env={**os.environ, **env, "PATH": BIN + os.pathsep + os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        clear_info()


def final_weights(master: TestMaster) -> dict[str, torch.Tensor]:
    uuid = master.reported_checkpoints()[-1]["uuid"]
    return torch.load(master.storage / uuid / "model.pth", weights_only=True)["state_dict"]


@pytest.mark.parametrize("slots", [1, 2])
def test_one_trial_end_to_end(tmp_path, shapes, slots):
    storage = tmp_path / "storage"
    with TestMaster(storage=storage, searcher=SEARCHER) as master:
        r = run_trial(tmp_path, master, hparams(shapes), ["--max-batches", "6", "--validation-period", "4",
                                                            "--report-period", "2"], slots=slots)  # fmt: skip
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert master.unknown == [] and master.violations == []
        assert [m["steps"] for m in master.metrics("training")] == [2, 4, 6]
        assert all("loss" in m and "lr" in m for m in master.metrics("training"))
        validations = master.metrics("validation")
        assert [(m["steps"], m["batches"]) for m in validations] == [(4, 4), (6, 6)]
        assert all(isinstance(m["bbox_mAP"], float) and m["val_images"] == 16 for m in validations)
        assert master.progress()[-1] == 1.0 and all(0 <= p <= 1 for p in master.progress())
        # A checkpoint after every validation (policy "all"), each with its files in storage.
        reported = master.reported_checkpoints()
        assert [c["metadata"]["steps_completed"] for c in reported] == [4, 6]
        for c in reported:
            assert "model.pth" in c["resources"] and (storage / c["uuid"] / "model.pth").is_file()
        # The last validation's pictures reached the trial's TensorBoard (6 is not a multiple of 4).
        events = list((storage / "test-cluster" / "tensorboard").rglob("*tfevents*"))
        assert any(b"validation/val_" in e.read_bytes() for e in events)
        assert "entrypoint arguments" not in r.stdout + r.stderr  # the cluster reads its own arguments


def test_sampled_hyperparameters_reach_the_config(tmp_path, shapes):
    """As the searcher sends them: a const mapping as its value, a categorical merge config, a nested leaf."""
    hp = hparams(shapes)
    hp["merge_config"] = "merge_configs/adamw.py"
    hp["override_mmdet_config"]["optim_wrapper"] = {"optimizer": {"type": "AdamW", "lr": 0.00031, "weight_decay": 0.01}}
    hp["override_mmdet_config"]["model"] = {"rpn_head": {"loss_bbox": {"type": "L1Loss", "loss_weight": 2.0}}}
    with TestMaster(storage=tmp_path / "storage", searcher=SEARCHER) as master:
        r = run_trial(tmp_path, master, hp, ["--max-batches", "2", "--report-period", "1"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        config = (master.storage / master.reported_checkpoints()[-1]["uuid"] / "config.py").read_text()
    assert "type='AdamW'" in config and "lr=0.00031" in config and "weight_decay=0.01" in config
    assert "loss_weight=2.0, type='L1Loss'" in config or "type='L1Loss', loss_weight=2.0" in config


# RTMDet's random augmentations without its cached ones: CachedMosaic and CachedMixUp start with
# empty caches after any resume, here as under mmengine's Runner (README, "A local run and a cluster run").
RANDOM_PIPELINE = [
    {"type": "LoadImageFromFile", "backend_args": None},
    {"type": "LoadAnnotations", "with_bbox": True},
    {"type": "RandomCrop", "crop_size": [96, 96]},
    {"type": "YOLOXHSVRandomAug"},
    {"type": "RandomFlip", "prob": 0.5},
    {"type": "Pad", "size": [128, 128], "pad_val": {"img": 114}},
    {"type": "PackDetInputs"},
]


def test_preempted_trial_continues_to_the_weights_of_an_uninterrupted_run(tmp_path, shapes):
    """ASHA's searcher rules apply; the master preempts at batch 4; the relaunch ends where a whole run ends.

    RTMDet with its EMA, random augmentations drawn in the trial's process (the random state is in
    Determined's checkpoint), an epoch of 6 batches: the stop falls mid-epoch.
    """
    overrides = {"randomness.deterministic": True, "train_dataloader.dataset.pipeline": RANDOM_PIPELINE}
    hp = hparams(shapes, "configs/shapes_rtmdet.py", **overrides)
    hp["global_batch_size"] = 8
    args = ["--max-batches", "8", "--validation-period", "8", "--report-period", "2"]
    with TestMaster(storage=tmp_path / "whole", searcher=ASHA) as master:
        r = run_trial(tmp_path, master, hp, args, name="whole")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        whole = final_weights(master)
    with TestMaster(storage=tmp_path / "parts", searcher=ASHA, preempt_at_batch=2) as master:
        r = run_trial(tmp_path, master, hp, args, name="first")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert master.preemption_acked
        (saved,) = master.reported_checkpoints()
        # The watcher's long poll learns of it after the report at 4: the trial stops at that boundary
        # or the next one, checkpoints there and exits 0.
        assert saved["metadata"]["steps_completed"] in (2, 4) and master.metrics("validation") == []
        master.preempt_at_batch = None
        steps = saved["metadata"]["steps_completed"]
        r = run_trial(tmp_path, master, hp, args, latest=saved["uuid"], steps=steps, name="second")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert [m["steps"] for m in master.metrics("training")] == [2, 4, 6, 8]
        (validation,) = master.metrics("validation")
        assert validation["batches"] == 8 and isinstance(validation["bbox_mAP"], float)
        assert master.violations == [] and master.unknown == []
        resumed = final_weights(master)
    assert whole.keys() == resumed.keys()  # model.pth holds the EMA weights RTMDet validates with
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key


def test_a_runner_checkpoint_resumed_on_a_cluster_ends_as_the_laptop_run(tmp_path, shapes):
    """resume=True with load_from (a Runner-format checkpoint at batch 2, from `export --mmengine`): the
    trial's first checkpoint is that state at batch 2, it trains batches 3 and 4, and ends on the weights of
    the uninterrupted local run."""
    from conftest import det_mmdet, write_experiment

    # RTMDet with its EMA; no random step anywhere (the Runner's checkpoints carry no random state).
    fixed = [*RANDOM_PIPELINE[:2], {"type": "Resize", "scale": 128, "keep_ratio": True}, RANDOM_PIPELINE[-1]]
    hp = hparams(shapes, "configs/shapes_rtmdet.py", **{"train_dataloader.dataset.pipeline": fixed})
    hp["global_batch_size"] = 8
    local = tmp_path / "local"
    exp = write_experiment(tmp_path, hp)
    r = det_mmdet("train", exp, "--output-dir", local, "--max-batches", 4, "--checkpoint-period", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    at_two = next(d for d in (local / "checkpoints").iterdir() if d.is_dir() and steps_completed(d) == 2)
    saved = tmp_path / "iter_2.pth"
    assert det_mmdet("export", at_two, "--mmengine", saved).returncode == 0
    whole = torch.load(newest_checkpoint(local / "checkpoints") / "model.pth", weights_only=True)["state_dict"]

    hp["override_mmdet_config"].update({"load_from": str(saved), "resume": True})
    with TestMaster(storage=tmp_path / "storage", searcher=SEARCHER) as master:
        r = run_trial(tmp_path, master, hp, ["--max-batches", "4", "--report-period", "1"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert master.unknown == [] and master.violations == []
        assert [c["metadata"]["steps_completed"] for c in master.reported_checkpoints()] == [2, 4]
        assert [m["steps"] for m in master.metrics("training")] == [3, 4]
        resumed = final_weights(master)
    assert whole.keys() == resumed.keys()
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key


def test_a_validation_without_the_searcher_metric_fails_at_the_master(tmp_path, shapes):
    searcher = {**ASHA, "metric": "segm_mAP"}  # a box-only model never reports it
    with TestMaster(storage=tmp_path / "storage", searcher=searcher) as master:
        r = run_trial(tmp_path, master, hparams(shapes), ["--max-batches", "2"])
    assert r.returncode != 0
    assert "validation reported no segm_mAP, the searcher's metric" in r.stdout + r.stderr


def test_a_config_error_is_one_line_in_the_trial_log(tmp_path, shapes):
    hp = hparams(shapes)
    hp["config_file"] = "configs/no_such_config.py"
    with TestMaster(storage=tmp_path / "storage", searcher=SEARCHER) as master:
        r = run_trial(tmp_path, master, hp, ["--max-batches", "2"])
    log = r.stdout + r.stderr
    assert r.returncode != 0
    errors = [line for line in log.splitlines() if "error: " in line and "no_such_config" in line]
    assert len(errors) == 1, log[-3000:]
    # Our process prints no traceback; torch.distributed.run reports the exit status in its own words.
    assert "[rank0]: Traceback" not in log and "det_mmdet/" not in log


def shipped_search_experiments() -> list[tuple[str, dict]]:
    """search_asha.yaml and hydra's searcher=asha, as the master would receive them."""
    import yaml

    from det_mmdet.compose import compose_experiment

    asha = yaml.safe_load((ROOT / "experiments" / "search_asha.yaml").read_text())
    return [("search_asha.yaml", asha), ("hydra searcher=asha", compose_experiment(["searcher=asha"]))]


@pytest.mark.parametrize("name", ["search_asha.yaml", "hydra searcher=asha"])
def test_a_trial_the_searcher_stops_checkpoints_and_exits_cleanly(tmp_path, shapes, name):
    """The experiment's own searcher and a sampled point of its hyperparameters, on the shapes model.

    The master takes every validation (its metric and time_metric are the rule), then stops the
    trial after the first one as ASHA does, telling it nothing; the trial hears it and ends there.
    """
    from det_mmdet.check import sample_points

    exp = dict(shipped_search_experiments())[name]
    assert exp["searcher"]["name"] == "adaptive_asha"
    searcher = {**exp["searcher"], "max_time": 8}
    _, hp = sample_points(exp["hyperparameters"])[0]
    hp = {**hp, "global_batch_size": 4, "config_file": "configs/shapes_faster_rcnn.py", "validation_pictures": 0}
    hp["override_mmdet_config"] = {**hp.get("override_mmdet_config", {}), "data_root": str(shapes) + "/"}
    hp["override_mmdet_config"].pop("train_dataloader.num_workers", None)
    with TestMaster(storage=tmp_path / "storage", searcher=searcher, stop_after_validations=1) as master:
        r = run_trial(tmp_path, master, hp, ["--validation-period", "2", "--report-period", "1"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert master.violations == [] and master.unknown == []
        validations = master.metrics("validation")
        assert [v["batches"] for v in validations] == [2], (validations, r.stdout[-3000:] + r.stderr[-3000:])
        assert isinstance(validations[0][searcher["metric"]], float)
        assert [m["steps"] for m in master.metrics("training")] == [1, 2]  # of max_time 8
        assert [c["metadata"]["steps_completed"] for c in master.reported_checkpoints()] == [2]
    assert "the searcher stopped this trial; it ends at batch 2" in r.stdout + r.stderr


def test_a_rank_killed_loses_at_most_one_checkpoint_period(tmp_path, shapes):
    """SIGKILL to rank 1 of 2 after the checkpoint at batch 4; the relaunch goes on from there."""
    import psutil

    args = ["--max-batches", "8", "--validation-period", "2", "--report-period", "1"]
    hp = {**hparams(shapes), "validation_pictures": 0}
    with TestMaster(storage=tmp_path / "storage", searcher=SEARCHER, slots=2) as master:
        exp = full_config({"hyperparameters": hp, "searcher": SEARCHER, "entrypoint": "train.py"}, master.storage, 2)
        env = trial_env(master, exp, hp, slots=2)
        workdir = tmp_path / "killed"
        prepare_container(env, PYTHON, workdir)
        launcher = subprocess.Popen(
            [PYTHON, "-m", "determined.launch.torch_distributed", "python3", "train.py", *args],
            cwd=workdir,
            env={**os.environ, **env, "PATH": BIN + os.pathsep + os.environ["PATH"]},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 300
            while not any(c["metadata"]["steps_completed"] >= 4 for c in master.reported_checkpoints()):
                if launcher.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("no checkpoint at batch 4:\n" + launcher.communicate(timeout=60)[0][-3000:])
                time.sleep(0.1)
            workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "train.py" in p.cmdline()]
            # The launcher wraps each rank (determined.launch.wrap_rank); the rank is the innermost process.
            (rank1,) = [p for p in workers if p.environ().get("RANK") == "1" and not p.children()]
            rank1.send_signal(signal.SIGKILL)
            log, _ = launcher.communicate(timeout=120)
        finally:
            for p in (
                [*psutil.Process(launcher.pid).children(recursive=True), launcher] if launcher.poll() is None else []
            ):
                p.kill()
            clear_info()
        assert launcher.returncode != 0, log[-3000:]  # the agent reports a failed trial: a restart follows
        trained_before = max(m["steps"] for m in master.metrics("training"))
        saved = master.reported_checkpoints()[-1]
        steps = saved["metadata"]["steps_completed"]
        assert trained_before - steps <= 2  # at most one checkpoint period (here the validation period)
        calls_before = len(master.metrics("training"))
        r = run_trial(tmp_path, master, hp, args, slots=2, latest=saved["uuid"], steps=steps, name="relaunched")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        again = [m["steps"] for m in master.metrics("training")[calls_before:]]
        assert again == list(range(steps + 1, 9))
        assert master.violations == [] and master.unknown == []
