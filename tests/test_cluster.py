"""The cluster path as a Determined 0.38.1 agent runs it, against the test master (tests/master.py).

Each test prepares the container as the agent's entrypoint does (``determined.exec.prep_container``:
info files, rendezvous, the context directory downloaded with ``.detignore`` applied), then runs the
experiment's entrypoint, ``python3 -m determined.launch.torch_distributed python3 train.py ...``, in
that working directory, and checks what the master received.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from master import TestMaster, clear_info, full_config, prepare_container, trial_env

PYTHON = sys.executable
BIN = str(Path(sys.executable).parent)
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


@pytest.mark.xfail(
    strict=True,
    reason="open defect (issue 20): a cluster trial resumed after preemption continues from the right batch "
    "but its weights differ from an uninterrupted run by ~1e-3 (mid-epoch and at an epoch's end alike); "
    "the local --resume path is exact (tests/test_hooks.py)",
)
def test_preempted_trial_continues_to_the_weights_of_an_uninterrupted_run(tmp_path, shapes):
    """ASHA's searcher rules apply; the master preempts at batch 4; the relaunch ends where a whole run ends."""
    hp = hparams(shapes, "configs/shapes_rtmdet.py", **{"randomness.deterministic": True})
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
