"""export / predict / evaluate on a model trained here, through the console script."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import det_mmdet, read_metrics, shapes_hparams, write_experiment
from det_mmdet.checkpoint import newest_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes):
    root = tmp_path_factory.mktemp("trained")
    exp = write_experiment(root, shapes_hparams(shapes))
    r = det_mmdet("train", exp, "--output-dir", root / "run", "--max-batches", 24)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run"


def test_export_from_a_run_and_from_determined_state_alone(tmp_path, trained):
    r = det_mmdet("export", trained, "--out", tmp_path / "model")
    assert r.returncode == 0, r.stderr[-2000:]
    exported = torch.load(tmp_path / "model" / "model.pth", weights_only=True)
    assert exported["meta"]["dataset_meta"]["classes"] == ["circle", "square", "triangle"]
    config = (tmp_path / "model" / "config.py").read_text()
    assert "test_dataloader = dict(" in config and "test_evaluator = dict(" in config and "load_from = None" in config

    # A checkpoint holding only Determined's state (state_dict.pth), as an older run would have.
    bare = tmp_path / "bare"
    shutil.copytree(newest_checkpoint(trained / "checkpoints"), bare)
    (bare / "model.pth").unlink()
    r = det_mmdet("export", bare, "--out", tmp_path / "from_state")
    assert r.returncode == 0, r.stderr[-2000:]
    again = torch.load(tmp_path / "from_state" / "model.pth", weights_only=True)
    assert again["state_dict"].keys() == exported["state_dict"].keys()
    assert all(torch.equal(again["state_dict"][k], v) for k, v in exported["state_dict"].items())
    assert again["meta"]["dataset_meta"]["classes"] == ["circle", "square", "triangle"]


def test_predict_draws_pictures_and_writes_coco_results(tmp_path, trained, shapes):
    r = det_mmdet("predict", trained, shapes / "val", "--out", tmp_path / "pred", "--score-thr", "0.05")
    assert r.returncode == 0, r.stderr[-2000:]
    pictures = sorted(p.name for p in (tmp_path / "pred" / "vis").iterdir())
    assert pictures == sorted(p.name for p in (shapes / "val").iterdir())
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    assert all(r["score"] >= 0.05 and r["category_id"] in (1, 2, 3) and len(r["bbox"]) == 4 for r in results)
    index = json.loads((tmp_path / "pred" / "images.json").read_text())
    assert [c["name"] for c in index["categories"]] == ["circle", "square", "triangle"]
    assert len(index["images"]) == 16


def test_evaluate_prints_the_coco_table_and_matches_training_validation(tmp_path, trained, shapes):
    r = det_mmdet(
        "evaluate", trained, "--ann", shapes / "annotations" / "val.json", "--images", shapes / "val",
        "--out", tmp_path / "eval",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert out.count("Average Precision  (AP) @[") == 6 and out.count("Average Recall     (AR) @[") == 6
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    (validation,) = [x for x in read_metrics(trained) if x["group"] == "validation"]
    assert metrics["bbox_mAP"] == pytest.approx(validation["metrics"]["bbox_mAP"], abs=1e-3)
    table = (tmp_path / "eval" / "per_class_ap.md").read_text()
    assert "| circle |" in table and "| triangle |" in table


def test_evaluate_with_a_missing_annotation_file_is_one_line_error(tmp_path, trained, shapes):
    r = det_mmdet("evaluate", trained, "--ann", tmp_path / "nope.json", "--images", shapes / "val")
    assert (
        r.returncode == 2 and r.stderr.strip().splitlines()[-1] == f"error: --ann {tmp_path}/nope.json does not exist"
    )


def test_mask_rcnn_predictions_carry_rle_masks_and_evaluate_reports_segm(tmp_path, shapes):
    exp = write_experiment(tmp_path, shapes_hparams(shapes, "configs/shapes_mask_rcnn.py"))
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "run", "--max-batches", 12)
    assert r.returncode == 0, r.stderr[-3000:]
    images = [shapes / "val" / f"val_0000{i}.jpg" for i in range(3)]
    r = det_mmdet("predict", tmp_path / "run", *images, "--out", tmp_path / "pred", "--score-thr", "0.01")
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert results and all(set(x["segmentation"]) == {"size", "counts"} for x in results)
    assert results[0]["segmentation"]["size"] == [128, 128]
    ann = shapes / "annotations" / "val.json"
    r = det_mmdet("evaluate", tmp_path / "run", "--ann", ann, "--images", shapes / "val", "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"bbox_mAP", "segm_mAP"} <= set(metrics)
    assert "segm:\n Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in r.stdout
    assert "| class | bbox AP | segm AP |" in (tmp_path / "eval" / "per_class_ap.md").read_text()


def test_evaluate_scores_a_results_file_without_a_model(tmp_path, shapes):
    """Every ground-truth box as a detection scores AP 1; the same boxes shifted score less."""
    import json

    ann = shapes / "annotations" / "val.json"
    gt = json.loads(ann.read_text())["annotations"]
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0} for a in gt
    ]
    (tmp_path / "perfect.json").write_text(json.dumps(perfect))
    r = det_mmdet("evaluate", "--results", tmp_path / "perfect.json", "--ann", ann, "--out", tmp_path / "p")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("Average Precision  (AP) @[") == 6 and "loading annotations" not in r.stdout
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert metrics["bbox_mAP"] == 1.0 and metrics["bbox_mAP_50"] == 1.0
    assert "| circle | 1.000 |" in (tmp_path / "p" / "per_class_ap.md").read_text()

    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] / 4, *d["bbox"][1:]]} for d in perfect]
    (tmp_path / "shifted.json").write_text(json.dumps(shifted))
    r = det_mmdet("evaluate", "--results", tmp_path / "shifted.json", "--ann", ann, "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr[-2000:]
    assert 0 < json.loads((tmp_path / "s" / "metrics.json").read_text())["bbox_mAP"] < 1.0

    (tmp_path / "stray.json").write_text(json.dumps([{**perfect[0], "image_id": 99999}]))
    r = det_mmdet("evaluate", "--results", tmp_path / "stray.json", "--ann", ann)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: --results {tmp_path / 'stray.json'}: image_id 99999 is not in {ann}"
    )
