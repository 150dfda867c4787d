"""``det-mmdet evaluate --results``: the results file read into columns (det_mmdet/results_file.py) must
score exactly as pycocotools scores the same file read by Python's ``json`` (``loadRes`` of its dicts:
bbox as written, segm without the box so that a mask's own area counts), and every malformed file is
one line naming the file and the place."""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
from pathlib import Path

import numpy as np
import pytest

from det_mmdet import coco, results_file
from det_mmdet.errors import UserError
from det_mmdet.export import STANDARD_MAX_DETS, evaluate_results
from test_coco import bench_eval


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """An annotation file (20 images, 8 classes, crowds) and a results file with boxes and RLE masks."""
    gen = bench_eval()
    rng = np.random.default_rng(5)
    gt = gen.make_ground_truth(rng, images=20, classes=8, per_image=8)
    found = []
    for _, pred in gen.make_results(rng, gt, per_image=40, masks=True):
        xyxy = pred["bboxes"].astype(np.float64)
        boxes = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1).tolist()
        for box, score, label, mask in zip(
            boxes, pred["scores"].tolist(), pred["labels"].tolist(), pred["masks"], strict=True
        ):
            rle = {"size": mask["size"], "counts": mask["counts"].decode()}
            found.append(
                {"image_id": pred["img_id"], "category_id": label + 1, "bbox": box, "score": score, "segmentation": rle}
            )
    found[3]["area"] = 5.0  # keys loadRes replaces are ignored
    root = tmp_path_factory.mktemp("results")
    ann, results = root / "ann.json", root / "results.json"
    ann.write_text(json.dumps(gt))
    results.write_text(json.dumps(found))
    return ann, results, found


def reference(ann: Path, found: list[dict], kind: str) -> list[float]:
    """pycocotools on the file's dicts, as ``evaluate --results`` scored them before it read columns."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = copy.deepcopy(found)
    if kind == "segm":
        dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        evaluation = COCOeval(gt, gt.loadRes(dets), kind)
        evaluation.params.maxDets = list(STANDARD_MAX_DETS)
        evaluation.evaluate()
        evaluation.accumulate()
    return [round(v, 3) for v in coco.summary(evaluation)[:6]]


@pytest.mark.parametrize("backend", ["hotcoco", "pycocotools"])
def test_a_results_file_scores_as_pycocotools_scores_its_dicts(files, backend):
    ann, results, found = files
    with contextlib.redirect_stdout(io.StringIO()):
        scores = evaluate_results(results, ann, None, backend)
    for kind in ("bbox", "segm"):
        ours = [scores[f"{kind}_{name}"] for name in coco.DETECTION_ITEMS]
        assert ours == reference(ann, found, kind), kind
    assert 0 < scores["bbox_mAP"] < 1 and scores["segm_mAP"] != scores["bbox_mAP"]


def test_the_columns_are_the_files_values(files):
    ann, results, found = files
    read = results_file.read(results)
    assert read.bbox.boxes.tolist() == [d["bbox"] for d in found]
    assert read.bbox.scores.tolist() == [d["score"] for d in found]
    assert read.segm.category_ids.tolist() == [d["category_id"] for d in found]
    assert read.segm.masks == [d["segmentation"] for d in found]
    assert read.image_ids.tolist() == [d["image_id"] for d in found]
    assert gc.isenabled()  # paused while reading, on again after


def test_a_detection_without_a_mask_leaves_segm_unscored_and_says_so(files, tmp_path, capsys):
    ann, _, found = files
    partial = copy.deepcopy(found)
    del partial[7]["segmentation"]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(partial))
    scores = evaluate_results(path, ann, None, "hotcoco")
    assert "bbox_mAP" in scores and not any(k.startswith("segm") for k in scores)
    assert f"segm not scored: detection 7 of {path} has no segmentation" in capsys.readouterr().out

    masks_only = [{k: v for k, v in d.items() if k != "bbox"} for d in found]
    path.write_text(json.dumps(masks_only))
    scores = evaluate_results(path, ann, None, "hotcoco")
    assert scores["segm_mAP"] == reference(ann, found, "segm")[0] and "bbox_mAP" not in scores
    assert f"bbox not scored: detection 0 of {path} has no bbox" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        ("[{", "is not valid JSON"),
        ("[]", ": expected a non-empty list of COCO detections"),
        ('{"image_id": 1}', ": not a list of COCO detections (Expected `array`, got `object`)"),
        ('[{"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [1, 2, 3]}]', "at `$[0].bbox`"),
        ('[{"image_id": "1", "category_id": 1, "score": 0.5, "bbox": [1, 2, 3, 4]}]', "at `$[0].image_id`"),
        ('[{"image_id": 1, "score": 0.5, "bbox": [1, 2, 3, 4]}]', "missing required field `category_id`"),
        ('[{"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": [[1, 2, 3, 4, 5, 6]]}]', "segmentation"),
        ('[{"image_id": 1, "category_id": 1, "score": 0.5}]', ": no detection has a bbox or a segmentation"),
        ('[{"image_id": 99999, "category_id": 1, "score": 0.5, "bbox": [1, 2, 3, 4]}]', ": image_id 99999 is not in"),
    ],
)
def test_a_malformed_results_file_is_one_line(files, tmp_path, content, message):
    ann = files[0]
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError) as raised:
        evaluate_results(path, ann, None, "hotcoco")
    text = str(raised.value)
    assert text.startswith(f"--results {path}") and message in text and "\n" not in text
