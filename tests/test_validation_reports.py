"""What a validation reports: honest scores when nothing is detected, and the searcher's metric always."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import det_mmdet, shapes_hparams, write_experiment


@pytest.mark.parametrize("backend", ["hotcoco", "faster-coco-eval", "pycocotools"])
def test_a_validation_without_detections_reports_zero_ap_not_nothing(shapes, backend):
    """mmdet's CocoMetric reports no score at all then, and a cluster trial would die for it."""
    from mmdet.structures import DetDataSample
    from mmengine.evaluator import Evaluator
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData

    from det_mmdet.coco import with_backend
    from det_mmdet.evaluation import EvaluatorReducer

    init_default_scope("mmdet")
    ann = shapes / "annotations" / "val.json"
    evaluator = Evaluator(
        with_backend({"type": "CocoMetric", "ann_file": str(ann), "metric": ["bbox", "segm"]}, backend)
    )
    evaluator.dataset_meta = {"classes": ("circle", "square", "triangle")}
    reducer = EvaluatorReducer(evaluator, True)
    for image in json.loads(ann.read_text())["images"]:
        sample = DetDataSample(metainfo={"img_id": image["id"], "ori_shape": (128, 128)})
        sample.pred_instances = InstanceData(
            bboxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long),
            masks=torch.zeros(0, 128, 128, dtype=torch.bool),
        )  # fmt: skip
        reducer.update({"inputs": [torch.zeros(3, 8, 8)], "data_samples": [sample]}, [sample])
    metrics = reducer.cross_slot_reduce([reducer.per_slot_reduce()])
    areas = [a["area"] for a in json.loads(ann.read_text())["annotations"]]
    for kind in ("bbox", "segm"):
        assert metrics[f"{kind}_mAP"] == metrics[f"{kind}_mAP_50"] == metrics[f"{kind}_mAP_s"] == 0.0
        assert metrics[f"{kind}_mAP_l"] == (0.0 if max(areas) >= 96**2 else -1.0)  # no large shapes: -1
    assert metrics["val_images"] == 16


def test_a_validation_without_the_searcher_metric_stops_locally_too(tmp_path, shapes):
    exp = write_experiment(tmp_path, shapes_hparams(shapes), searcher={"name": "single", "metric": "segm_mAP"})
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "run", "--max-batches", 2)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == (
        "error: validation reported no segm_mAP, the searcher's metric (it reported bbox_mAP, bbox_mAP_50, "
        "bbox_mAP_75, bbox_mAP_l, bbox_mAP_m, bbox_mAP_s, val_images, 3 per-class APs)"
    )
