"""experiments/*.yaml and docker/: valid for Determined 0.38, resolvable, and on the project's pins."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

import expconf
from conftest import ROOT, det_mmdet, read_metrics, shapes_hparams, write_experiment
from det_mmdet.cli import main
from det_mmdet.config import build_config, experiment_for_trial

EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
IMAGE = re.search(r"^IMAGE \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_expected_experiments_exist():
    names = {p.stem for p in EXPERIMENTS}
    assert {"fasterrcnn", "maskrcnn", "retinanet", "finetune_custom_coco", "search_asha", "s3", "gcs"} <= names
    assert any(load(p).get("resources", {}).get("slots_per_trial") == 8 for p in EXPERIMENTS)


@pytest.mark.skipif(expconf.EXPCONF_DIR is None, reason="Determined's expconf schemas are not available here")
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_is_valid_for_determined_038(path):
    """Determined 0.38.1's own schemas (with its custom keywords) plus the master's 0.38 rules."""
    assert expconf.sanity_errors(load(path)) == []


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_uses_the_038_contract(path):
    conf = load(path)
    text = path.read_text()
    assert text.startswith("#"), "each experiment opens with comments saying what it is and how to run it"
    assert conf["entrypoint"].split()[:4] == ["python3", "-m", "determined.launch.torch_distributed", "python3"]
    assert " train.py" in conf["entrypoint"]
    assert "max_length" not in conf["searcher"] and "min_validation_period" not in conf
    assert "records_per_epoch" not in conf
    if conf["searcher"]["name"] == "adaptive_asha":
        assert conf["searcher"]["time_metric"] == "batches" and conf["searcher"]["max_time"] > 0
    image = (conf.get("environment") or {}).get("image")
    if image is not None:
        assert image == {"cuda": IMAGE}, f"{path.name} names an image other than the one `make image` builds"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_print_config_resolves_each_experiment(path, tmp_path, shapes, monkeypatch, capsys):
    # The fine-tune example reads its classes from data/my_dataset: give it the shapes set there.
    shutil.copytree(shapes, tmp_path / "data" / "my_dataset")
    monkeypatch.chdir(tmp_path)
    local = ["--set", "data_root=data/my_dataset/"] if path.stem == "finetune_custom_coco" else []
    assert main(["train", str(path), "--print-config", *local]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "model = dict(" in out and "train_dataloader = dict(" in out
    if path.stem == "finetune_custom_coco":
        assert "num_classes=3" in out and "'triangle'" in out and "num_classes=80" not in out


def test_search_spaces_resolve_locally_to_logged_values(capsys):
    assert main(["train", str(ROOT / "experiments" / "search_asha.yaml"), "--print-config"]) == 0
    captured = capsys.readouterr()
    assert "type='SGD'" in captured.out  # the first categorical choice: merge_configs/sgd_warmup_cosine.py
    assert "lr=0.001" in captured.out  # 10 ** midpoint(-4.5, -1.5)
    assert "merge_config" in captured.err and "categorical" in captured.err


@pytest.mark.parametrize(
    "merge_config, optimizer",
    [("merge_configs/adamw.py", "AdamW"), ("merge_configs/sgd_warmup_cosine.py", "SGD")],
)
def test_sampled_hyperparameters_land_in_the_config(merge_config, optimizer):
    """A trial's hparams as Determined hands them: search spaces replaced by sampled values, nesting kept."""
    exp_conf = load(ROOT / "experiments" / "search_asha.yaml")
    sampled = {
        "global_batch_size": 16,
        "config_file": "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
        "merge_config": merge_config,
        "override_mmdet_config": {
            "data_root": "/mnt/coco/",
            "train_dataloader": {"num_workers": 4},
            "optim_wrapper": {"optimizer": {"lr": 0.000731, "weight_decay": 3.3e-5}},
        },
    }
    cfg = build_config(experiment_for_trial(exp_conf, sampled))
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == (optimizer, 0.000731, 3.3e-5)
    assert cfg.train_dataloader.num_workers == 4
    assert cfg.train_dataloader.dataset.data_root == "/mnt/coco/"
    assert cfg.val_evaluator.ann_file == "/mnt/coco/annotations/instances_val2017.json"


def test_sampled_mappings_are_taken_as_the_master_sends_them():
    """A const mapping arrives as its raw value and a categorical of mappings as the chosen mapping:
    neither is a search space any more (resolving them again failed every trial)."""
    exp_conf = load(ROOT / "experiments" / "search_asha.yaml")
    sampled = {
        "global_batch_size": 16,
        "config_file": "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
        "override_mmdet_config": {
            "optim_wrapper": {"optimizer": {"type": "AdamW", "lr": 0.0001, "weight_decay": 0.05}},
            "model": {"roi_head": {"bbox_head": {"loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0}}}},
        },
    }
    exp = experiment_for_trial(exp_conf, sampled)
    assert exp.hparams == sampled and exp.notes == []
    cfg = build_config(exp)
    assert cfg.optim_wrapper.optimizer.type == "AdamW" and cfg.optim_wrapper.optimizer.lr == 0.0001
    assert cfg.model.roi_head.bbox_head.loss_bbox == {"type": "GIoULoss", "loss_weight": 2.0}


def test_classes_from_annotations_trains_with_the_right_heads(tmp_path, shapes):
    # The config claims 7 classes named otherwise; the flag makes datasets and heads follow the file.
    wrong = {"model.roi_head.bbox_head.num_classes": 7, "train_dataloader.dataset.metainfo.classes": ["a", "b"]}
    exp = write_experiment(tmp_path, shapes_hparams(shapes, **wrong), data={"classes_from_annotations": True})
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "out", "--max-batches", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "classes from" in r.stderr and "circle, square, triangle (3)" in r.stderr
    assert [x["batches"] for x in read_metrics(tmp_path / "out") if x["group"] == "validation"] == [3]


# ---- docker/ -----------------------------------------------------------------------------------------


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[=<>!~]", line, maxsplit=1)[0]
            pins[name.lower()] = line[len(name) :]
    return pins


def test_dockerfile_installs_the_project_pins():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    pins = requirement_pins()
    # The base is the default task image of the pinned Determined release (const.go at 0.38.1), the
    # image Determined's own expconf cases of that release write out in full.
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    if expconf.EXPCONF_DIR is None:
        pytest.skip("Determined's expconf test cases are not here")
    (cases,) = yaml.safe_load_all((expconf.EXPCONF_DIR / "test_cases" / "experiment.yaml").read_text())
    (full,) = [c for c in cases if c["name"] == "full valid experiment"]
    assert pins["determined"] == "==0.38.1" and base
    assert base.group(1) == full["case"]["environment"]["image"]["cuda"] == "determinedai/pytorch-ngc:0.38.1"
    # Everything installed comes from requirements.txt: torch with its torchvision, then mmcv, then the rest.
    assert "COPY requirements.txt /tmp/det-mmdet/" in dockerfile and "import torch, torchvision" in dockerfile
    assert pins["torch"] == "==2.14.1" and pins["torchvision"] == "==0.29.1"  # torchvision 0.29.1 is 2.14.1's
    order = [
        dockerfile.index(s)
        for s in ("grep '^torchvision=='", "docker/build-mmcv.sh python3", "-r /tmp/det-mmdet/requirements.txt")
    ]
    assert order == sorted(order)
    # Any version written in the Dockerfile itself must be the project's.
    for name, spec in re.findall(r'"?([A-Za-z][\w-]*)((?:==|>=|<=|<|>)[\w.,<>=]+)"?', dockerfile):
        if name.lower() in pins:
            assert spec.rstrip('"') == pins[name.lower()], (
                f"Dockerfile pins {name}{spec}, requirements.txt {pins[name]}"
            )
    assert "MMDETECTION_CONFIG_DIR=" in dockerfile and "MMCV_WITH_OPS=1" in dockerfile
    assert "TORCH_CUDA_ARCH_LIST" in dockerfile
