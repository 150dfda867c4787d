"""mmdet zoo configs beyond the detectors the shapes configs cover: class counts everywhere, optional extras."""

from __future__ import annotations

import pytest
import torch

from conftest import det_mmdet, read_metrics, write_experiment
from det_mmdet.errors import UserError


def coco_overrides(shapes, train_dataset: str = "train_dataloader.dataset") -> dict:
    return {
        "data_root": f"{shapes}/",
        f"{train_dataset}.ann_file": "annotations/train.json",
        f"{train_dataset}.data_prefix.img": "train/",
        "val_dataloader.dataset.ann_file": "annotations/val.json",
        "val_dataloader.dataset.data_prefix.img": "val/",
        "val_dataloader.dataset.indices": 4,
        "val_evaluator.ann_file": f"{shapes}/annotations/val.json",
    }


def test_mask2former_takes_every_class_count_from_the_annotations(tmp_path, shapes):
    """num_things_classes, num_stuff_classes, the top-level num_classes and the per-class loss weights."""
    pipeline = [
        {"type": "LoadImageFromFile"},
        {"type": "LoadAnnotations", "with_bbox": True, "with_mask": True},
        {"type": "Resize", "scale": 128, "keep_ratio": True},
        {"type": "PackDetInputs"},
    ]
    overrides = {
        **coco_overrides(shapes),
        "train_dataloader.dataset.pipeline": {"type": "const", "val": pipeline},
        "val_dataloader.dataset.pipeline.1.scale": 128,
        "model.data_preprocessor.batch_augments": None,  # LSJ's fixed 1024-px padding
        "model.backbone": {"depth": 18, "base_channels": 16, "init_cfg": None},
        "model.panoptic_head.in_channels": [16, 32, 64, 128],
    }
    hp = {"global_batch_size": 2, "config_file": "mask2former/mask2former_r50_8xb2-lsj-50e_coco.py"}
    exp = write_experiment(
        tmp_path, {**hp, "override_mmdet_config": overrides}, data={"classes_from_annotations": True}
    )
    r = det_mmdet("train", exp, "--print-config")
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("num_things_classes=3", "num_stuff_classes=0", "num_classes = 3"):
        assert line in r.stdout, line
    out = tmp_path / "run"
    r = det_mmdet("train", exp, "--output-dir", out, "--max-batches", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    (validation,) = [x for x in read_metrics(out) if x["group"] == "validation"]
    assert {"segm_mAP", "bbox_mAP"} <= set(validation["metrics"]) and validation["metrics"]["val_images"] == 4


def test_a_mismatched_class_count_names_the_field(tmp_path, shapes):
    overrides = {
        **coco_overrides(shapes),
        "train_dataloader.dataset.metainfo.classes": ["circle", "square", "triangle"],
        "val_dataloader.dataset.metainfo.classes": ["circle", "square", "triangle"],
    }
    hp = {"global_batch_size": 2, "config_file": "mask2former/mask2former_r50_8xb2-lsj-50e_coco.py"}
    r = det_mmdet("train", write_experiment(tmp_path, {**hp, "override_mmdet_config": overrides}), "--max-batches", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: model.panoptic_head.num_things_classes is 80 but the training set has 3 classes "
        "(circle, square, triangle); set data.classes_from_annotations: true or override the field"
    )


def test_a_predicted_class_outside_the_data_set_is_one_line(shapes):
    from mmdet.structures import DetDataSample
    from mmengine.evaluator import Evaluator
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData

    from det_mmdet.evaluation import EvaluatorReducer

    init_default_scope("mmdet")
    evaluator = Evaluator({"type": "CocoMetric", "ann_file": str(shapes / "annotations" / "val.json")})
    evaluator.dataset_meta = {"classes": ("circle", "square", "triangle")}
    reducer = EvaluatorReducer(evaluator, True, "model.bbox_head.num_classes")
    sample = DetDataSample(metainfo={"img_id": 1, "ori_shape": (128, 128)})
    sample.pred_instances = InstanceData(
        bboxes=torch.tensor([[1.0, 1, 20, 20]]), scores=torch.tensor([0.9]), labels=torch.tensor([57])
    )
    with pytest.raises(UserError, match=r"predicted class index 57 but the data set has 3 classes; set the model's "):
        reducer.update({"inputs": [torch.zeros(3, 8, 8)], "data_samples": [sample]}, [sample])


def test_a_missing_extra_is_one_line(tmp_path, shapes):
    """GLIP's language model needs transformers, which the project does not install."""
    pytest.importorskip("mmdet")
    try:
        import transformers  # noqa: F401

        pytest.skip("transformers is installed here")
    except ImportError:
        pass
    overrides = coco_overrides(shapes, "train_dataloader.dataset.dataset")
    hp = {"global_batch_size": 2, "config_file": "glip/glip_atss_swin-t_a_fpn_dyhead_16xb2_ms-2x_funtune_coco.py"}
    exp = write_experiment(
        tmp_path, {**hp, "override_mmdet_config": overrides}, data={"classes_from_annotations": True}
    )
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "run", "--max-batches", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: GLIP needs the transformers package: pip install transformers"


def test_a_head_mmdet_cannot_validate_stops_before_training(tmp_path, shapes):
    """mmdet 3.3.0's SSDHead trains but its prediction reads a loss_cls it does not have."""
    hp = {"global_batch_size": 2, "config_file": "ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py"}
    overrides = coco_overrides(shapes, "train_dataloader.dataset.dataset")  # SSD repeats its training set
    exp = write_experiment(
        tmp_path, {**hp, "override_mmdet_config": overrides}, data={"classes_from_annotations": True}
    )
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "run", "--max-batches", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: model.bbox_head (SSDHead) cannot be validated with this mmdet: its prediction reads loss_cls"
        )
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_zoo_subset_trains_and_validates(tmp_path):
    """One config per distinct path (two-stage, one-stage, DETR-like, instance masks, hook-dependent), as
    bench/zoo.py shrinks them: mmdet's own model, smaller images, one batch, then validation."""
    import subprocess
    import sys

    from conftest import ROOT

    only = "Faster R-CNN,RetinaNet,Deformable DETR,SOLOv2,RTMDet"
    cmd = [sys.executable, "bench/zoo.py", "--only", only, "--trainers", "ours", "--batches", "1", "--size", "128"]
    proc = subprocess.run([*cmd, "--work", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 5, proc.stdout
    for row in rows:
        assert "| trains + validates |" in row, row
