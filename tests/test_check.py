"""``det-mmdet check``: every shipped experiment passes as written; each kind of problem is an error line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT, det_mmdet
from det_mmdet.check import check_experiment, sample_points
from det_mmdet.compose import compose_experiment, groups

EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
ENTRY = "python3 -m determined.launch.torch_distributed python3 train.py"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_runs_on_a_cluster_as_written(path):
    lines, problems = check_experiment(path)
    assert problems == []
    assert any(line.startswith("ok: ") and " built (" in line for line in lines)
    assert any("searcher.metric" in line for line in lines)


@pytest.mark.parametrize("data", groups()["data"])
def test_every_hydra_data_group_runs_on_a_cluster(tmp_path, data):
    experiment = compose_experiment([f"data={data}", "searcher=asha"])
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment))
    lines, problems = check_experiment(path)
    assert problems == []
    assert "ok: searcher.time_metric batches is reported by every validation" in lines


def test_sample_points_cover_every_choice_and_bound():
    hparams = yaml.safe_load((ROOT / "experiments" / "search_asha.yaml").read_text())["hyperparameters"]
    labels = [label for label, _ in sample_points(hparams)]
    assert labels[0] == "the local values"
    assert "merge_config='merge_configs/adamw.py'" in labels
    assert {
        "override_mmdet_config.optim_wrapper.optimizer.lr=10^-4.5",
        "override_mmdet_config.optim_wrapper.optimizer.lr=10^-1.5",
    } <= set(labels)
    (_, low_lr), *_ = [p for p in sample_points(hparams) if p[0].endswith("lr=10^-4.5")]
    assert low_lr["override_mmdet_config"]["optim_wrapper"]["optimizer"]["lr"] == pytest.approx(10**-4.5)


def write(tmp_path: Path, hparams: dict, **extra) -> Path:
    exp = {
        "name": "bad",
        "entrypoint": ENTRY,
        "hyperparameters": {"global_batch_size": 8, "config_file": "configs/shapes_faster_rcnn.py", **hparams},
        "searcher": {"name": "single", "metric": "bbox_mAP", "smaller_is_better": False},
        **extra,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_problems_are_error_lines_and_exit_2(tmp_path):
    # data/ is in model_def/.detignore; the searcher metric is not reported; one categorical choice
    # names a model that does not exist.
    path = write(
        tmp_path,
        {
            "override_mmdet_config": {
                "data_root": "data/shapes/",
                "model.backbone.depth": {"type": "categorical", "vals": [18, 19]},
            }
        },
        searcher={"name": "single", "metric": "segm_mAP", "smaller_is_better": False},
    )
    r = det_mmdet("check", path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert any(
        "train_dataloader.dataset.ann_file data/shapes/annotations/train.json" in e and ".detignore" in e
        for e in errors
    ), errors
    assert any("searcher.metric segm_mAP: validation does not report it" in e for e in errors), errors
    assert any(e.startswith("error: override_mmdet_config.model.backbone.depth=19: ") for e in errors), errors
    assert "ok: FasterRCNN built" in r.stdout


def test_mounted_and_bucket_paths_are_named_not_checked(tmp_path):
    path = write(
        tmp_path,
        {"override_mmdet_config": {"data_root": "/mnt/shapes/"}},
        bind_mounts=[{"host_path": "/data/shapes", "container_path": "/mnt/shapes", "read_only": True}],
    )
    r = det_mmdet("check", path)
    assert r.returncode == 0, r.stderr[-2000:]
    mounted = "/mnt/shapes/annotations/train.json (bind mount of /data/shapes/annotations/train.json on the agents)"
    assert f"not checkable here: train_dataloader.dataset.ann_file {mounted}" in r.stdout
    path = write(tmp_path, {"override_mmdet_config": {"data_root": "s3://bucket/shapes/"}})
    r = det_mmdet("check", path)
    assert r.returncode == 0, r.stderr[-2000:]
    bucket = "s3://bucket/shapes/annotations/train.json (a bucket"
    assert f"not checkable here: train_dataloader.dataset.ann_file {bucket}" in r.stdout


def test_compose_submit_checks_first(tmp_path):
    # A relative data_root under data/ (left out by model_def/.detignore): nothing reaches the master.
    r = det_mmdet(
        "compose",
        "data=custom",
        "hyperparameters.override_mmdet_config.data_root=data/my_dataset/",
        "--submit",
        cwd=tmp_path,
        env={"DET_MASTER": "http://127.0.0.1:9"},
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ".detignore leaves it out of the upload" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: compose --submit: det-mmdet check found problems (above); nothing submitted"
    )
