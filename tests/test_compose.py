"""``det-mmdet compose``: every combination of the config groups is a valid Determined 0.38.1 experiment
that det-mmdet resolves; bad input is one line listing the choices."""

from __future__ import annotations

import itertools
import shutil

import pytest
import yaml

import expconf
from conftest import det_mmdet
from det_mmdet.compose import compose_experiment, groups
from det_mmdet.config import build_config, experiment_from_dict

CHOICES = groups()
COMBINATIONS = [dict(zip(CHOICES, combo, strict=True)) for combo in itertools.product(*CHOICES.values())]


def test_the_groups_the_issue_names():
    assert CHOICES == {
        "data": ["coco", "custom", "gcs", "s3"],
        "model": ["faster_rcnn", "mask_rcnn", "retinanet", "rtmdet"],
        "optimizer": ["adamw", "sgd"],
        "searcher": ["asha", "single"],
    }
    assert compose_experiment([])["name"] == "faster-rcnn-coco-sgd-single"  # the defaults


@pytest.mark.skipif(expconf.EXPCONF_DIR is None, reason="Determined's expconf schemas are not available here")
def test_every_combination_is_valid_and_resolves(tmp_path, shapes, monkeypatch):
    shutil.copytree(shapes, tmp_path / "data" / "my_dataset")  # data=custom reads its classes from here
    monkeypatch.chdir(tmp_path)
    for choice in COMBINATIONS:
        experiment = compose_experiment([f"{k}={v}" for k, v in choice.items()])
        assert expconf.sanity_errors(experiment) == [], choice
        if choice["data"] == "custom":  # the cluster's bind mount, here a copy in the working directory
            experiment["hyperparameters"]["override_mmdet_config"]["data_root"] = "data/my_dataset/"
        cfg = build_config(experiment_from_dict(experiment))
        assert cfg.optim_wrapper.optimizer.type == ("AdamW" if choice["optimizer"] == "adamw" else "SGD"), choice
        if choice["data"] == "custom":
            assert cfg.train_dataloader.dataset.metainfo["classes"] == ("circle", "square", "triangle")
        if choice["searcher"] == "asha":
            assert experiment["searcher"]["time_metric"] == "batches" and experiment["searcher"]["max_time"] > 0
        assert experiment["searcher"]["metric"] == ("segm_mAP" if choice["model"] == "mask_rcnn" else "bbox_mAP")


def test_written_experiment_trains_command_line_keys_win(tmp_path):
    out = tmp_path / "exp.yaml"
    r = det_mmdet("compose", "model=retinanet", "data=s3", "resources.slots_per_trial=2", "-o", out)
    assert r.returncode == 0, r.stderr[-2000:]
    experiment = yaml.safe_load(out.read_text())
    assert experiment["resources"]["slots_per_trial"] == 2 and experiment["name"] == "retinanet-s3-sgd-single"
    r = det_mmdet("train", out, "--print-config")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data_root = 's3://my-bucket/coco/'" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["model=yolo"],
            "error: compose: model=yolo: no such model (choose faster_rcnn, mask_rcnn, retinanet, rtmdet)",
        ),
        (["slots"], "error: compose: 'slots' is not key=value (groups: data, model, optimizer, searcher)"),
        (["resources.slot_per_trial=2"], "error: compose: Could not override 'resources.slot_per_trial'."),
        (["--submit"], "error: compose --submit: set DET_MASTER to your Determined master"),
    ],
)
def test_bad_input_is_one_line(args, message):
    r = det_mmdet("compose", *args, env={"DET_MASTER": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-1000:]
