"""COCO scoring backends against pycocotools, case by case: hotcoco (the default) must give pycocotools'
precision and recall arrays bit for bit, faster-coco-eval within a few ULPs; and the scoring path
around them (detections as arrays, ground truth from the data samples, what ``process`` keeps)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from typing import Any

import numpy as np
import pytest

from conftest import ROOT
from det_mmdet import coco
from test_coco import bench_eval

CLASSES = tuple(f"class {c}" for c in range(12))


@pytest.fixture(scope="module")
def small() -> tuple[dict, list]:
    """24 images, 12 classes (dense enough for crowds, ties and limits to matter), 60 detections each, masks."""
    gen = bench_eval()
    rng = np.random.default_rng(11)
    gt = gen.make_ground_truth(rng, images=24, classes=len(CLASSES), per_image=9)
    preds = [pred for _, pred in gen.make_results(rng, gt, per_image=60, masks=True)]
    return gt, preds


def uncompressed(rle: dict) -> dict:
    """An RLE with its counts as a list of run lengths (COCO's crowd annotations are written so)."""
    from pycocotools import mask as mask_utils

    flat = mask_utils.decode(rle).flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    counts = runs.tolist() if flat[0] == 0 else [0, *runs.tolist()]
    return {"size": list(rle["size"]), "counts": counts}


def variant(gt: dict, case: str, rng: np.random.Generator) -> dict:
    """The ground truth of one case."""
    from pycocotools import mask as mask_utils

    gt = copy.deepcopy(gt)
    anns = gt["annotations"]
    if case == "crowds":
        for a in anns:
            a["iscrowd"] = int(rng.random() < 0.25)
    elif case == "ignore flags":  # pycocotools ignores 'ignore' (iscrowd decides), so must the others
        for a in anns:
            a["ignore"] = int(rng.random() < 0.25)
    elif case == "no ground truth for a class, images without any":
        gt["annotations"] = [a for a in anns if a["category_id"] != 3 and a["image_id"] % 5 != 0]
    elif case in ("segm RLE", "segm uncompressed RLE"):
        sizes = {i["id"]: (i["height"], i["width"]) for i in gt["images"]}
        for a in anns:
            a["iscrowd"] = int(rng.random() < 0.25)
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], *sizes[a["image_id"]]))
            rle = {"size": rle["size"], "counts": rle["counts"].decode()}
            a["segmentation"] = uncompressed(rle) if case == "segm uncompressed RLE" and a["iscrowd"] else rle
    return gt


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("bbox", "plain", {"max_dets": (100, 300, 1000)}),
    ("bbox", "plain", {"max_dets": (100, 1, 10)}),  # RTMDet's proposal_nums
    ("bbox", "plain", {"max_dets": (1, 10, 100)}),
    ("bbox", "plain", {"iou_thrs": np.array([0.5, 0.75])}),
    ("bbox", "plain", {"iou_thrs": np.array([0.5])}),
    ("bbox", "plain", {"use_cats": False}),  # 'proposal'
    ("bbox", "plain", {"cat_ids": list(range(1, 7)), "img_ids": list(range(1, 13))}),
    ("bbox", "empty predictions", {}),
    ("bbox", "score ties", {}),
    ("bbox", "results file", {}),
    ("bbox", "crowds", {}),
    ("bbox", "ignore flags", {}),
    ("bbox", "no ground truth for a class, images without any", {}),
    ("segm", "plain", {"max_dets": (100, 1, 10)}),  # polygons
    ("segm", "plain", {"iou_thrs": np.array([0.5, 0.75])}),
    ("segm", "empty predictions", {}),
    ("segm", "results file", {}),
    ("segm", "crowds", {}),
    ("segm", "no ground truth for a class, images without any", {}),
    ("segm", "segm RLE", {}),
    ("segm", "segm uncompressed RLE", {}),
]


def arrays(gt: dict, found: Any, kind: str, backend: str, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    evaluation = coco.match(coco.ground_truth(copy.deepcopy(gt), backend), found, kind, backend, **kwargs)
    return np.asarray(evaluation.eval["precision"]), np.asarray(evaluation.eval["recall"])


@pytest.mark.parametrize(("kind", "case", "settings"), CASES, ids=[f"{k}-{c}-{s}" for k, c, s in CASES])
def test_each_backend_gives_pycocotools_precision_and_recall(small, kind, case, settings):
    gt, preds = small
    rng = np.random.default_rng(len(case))
    gt = variant(gt, case, rng)
    found = coco.detections(preds, [c["id"] for c in gt["categories"]], kind)
    if case == "empty predictions":
        found = coco.detections([], [], kind)
    elif case == "score ties":
        found.scores = np.round(found.scores, 1)
    settings = {"max_dets": (100, 300, 1000), **settings}
    reference = arrays(gt, found.dicts() if case == "results file" else found, kind, "pycocotools", **settings)
    assert (reference[0] > 0).any() or case == "empty predictions"
    for backend in ("hotcoco", "faster-coco-eval"):
        # 'results file': result dicts, as `det-mmdet evaluate --results` reads them
        ours = arrays(gt, found.dicts() if case == "results file" else found, kind, backend, **settings)
        for name, theirs, mine in zip(("precision", "recall"), reference, ours, strict=True):
            if backend == "hotcoco":
                assert np.array_equal(theirs, mine), f"{backend} {name}"
            else:
                np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-12, err_msg=f"{backend} {name}")


def test_hotcoco_keeps_max_dets_in_the_order_given(small):
    """Where hotcoco differs from pycocotools: a COCOeval of its own keeps ``maxDets`` as given
    (RTMDet's (100, 1, 10)) where pycocotools sorts them; ``match`` sorts them first."""
    import hotcoco

    gt, preds = small
    found = coco.detections(preds, [c["id"] for c in gt["categories"]], "bbox")
    index = hotcoco.COCO(copy.deepcopy(gt))
    evaluation = hotcoco.COCOeval(index, index.load_res(found.rows()), "bbox")
    params = evaluation.params
    params.maxDets = [100, 1, 10]
    evaluation.params = params
    evaluation.evaluate()
    evaluation.accumulate()
    assert list(evaluation.params.maxDets) == [100, 1, 10]
    ours = arrays(gt, found, "bbox", "hotcoco", max_dets=(100, 1, 10))[0]
    theirs = np.asarray(evaluation.eval["precision"])
    assert np.array_equal(ours[..., 0], theirs[..., 1]) and np.array_equal(ours[..., 2], theirs[..., 0])
    assert not np.array_equal(ours, theirs)


def test_detections_are_what_mmdets_results2json_writes(small, tmp_path):
    """The arrays (and their dicts) hold the values of mmdet's result files after its JSON round trip."""
    from mmdet.evaluation.metrics import CocoMetric

    gt, preds = small
    metric = CocoMetric(metric=["bbox", "segm"])
    metric.dataset_meta = {"classes": CLASSES}
    metric.cat_ids = [c["id"] for c in gt["categories"]]
    files = metric.results2json(preds, str(tmp_path / "results"))
    for kind in ("bbox", "segm"):
        theirs = json.loads(open(files[kind]).read())
        if kind == "segm":
            for d in theirs:
                d.pop("bbox")  # CocoMetric drops it before scoring masks
        mine = coco.detections(preds, metric.cat_ids, kind).dicts()
        assert mine == theirs, kind


def test_ground_truth_from_the_data_samples_is_mmdets_conversion(small, tmp_path):
    """No ann_file: the COCO dict made in memory is the one CocoMetric writes to a file and reads back."""
    from mmdet.evaluation.metrics import CocoMetric
    from pycocotools import mask as mask_utils

    gt, _ = small
    sizes = {i["id"]: i for i in gt["images"]}
    gts = []
    for image in gt["images"]:
        anns = []
        for a in (a for a in gt["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = a["bbox"]
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], image["height"], image["width"]))
            mask = rle if a["id"] % 2 else a["segmentation"]  # RLE (bytes) and polygons, as datasets give them
            anns.append({"bbox": [x, y, x + w, y + h], "bbox_label": a["category_id"] - 1, "ignore_flag": a["iscrowd"],
                         "mask": mask})  # fmt: skip
        gts.append(
            {"img_id": image["id"], "width": sizes[image["id"]]["width"], "height": image["height"], "anns": anns}
        )
    metric = CocoMetric(metric="bbox")
    metric.dataset_meta = {"classes": CLASSES}
    theirs = json.loads(open(metric.gt_to_coco_json(copy.deepcopy(gts), str(tmp_path / "x"))).read())
    mine = json.loads(json.dumps(coco.ground_truth_dict(gts, CLASSES)))
    assert {k: v for k, v in mine.items() if k != "info"} == {k: v for k, v in theirs.items() if k != "info"}
    assert all(isinstance(a["mask"], list) or isinstance(a["mask"]["counts"], bytes) for g in gts for a in g["anns"])


def sample(img_id: int, masks: bool, instances: bool) -> dict:
    """A data sample as mmengine's Evaluator hands it to ``process`` (tensors, dicts)."""
    import torch

    pred = {
        "bboxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
    }
    if masks:
        pred["masks"] = torch.zeros(1, 48, 64, dtype=torch.bool)
        pred["masks"][0, 2:40, 1:30] = True
    found = {"img_id": img_id, "ori_shape": (48, 64), "pred_instances": pred}
    if instances:
        polygon = [[1.0, 2.0, 30.0, 2.0, 30.0, 40.0, 1.0, 40.0]]
        found["instances"] = [{"bbox": [1.0, 2.0, 30.0, 40.0], "bbox_label": 1, "ignore_flag": 0, "mask": polygon}]
    return found


def test_process_keeps_only_what_scoring_reads():
    """What the chief gathers from every slot: masks only when segm is scored, each image's ground-truth
    instances (no ann_file) once per run; and the scores are those of keeping everything."""
    bbox_only = coco.FastCocoMetric(metric="bbox")
    with_segm = coco.FastCocoMetric(metric=["bbox", "segm"])
    for metric in (bbox_only, with_segm):
        metric.dataset_meta = {"classes": CLASSES}
        for _ in range(2):  # two validations
            metric.process({}, [sample(i, masks=True, instances=True) for i in (1, 2)])
    kept = {id(m): [(sorted(g), sorted(p)) for g, p in m.results] for m in (bbox_only, with_segm)}
    first, again = ["anns", "height", "img_id", "width"], ["height", "img_id", "width"]
    assert (
        kept[id(bbox_only)]
        == [(first, ["bboxes", "img_id", "labels", "scores"])] * 2
        + [(again, ["bboxes", "img_id", "labels", "scores"])] * 2
    )
    assert [p for _, p in kept[id(with_segm)]] == [["bboxes", "img_id", "labels", "masks", "scores"]] * 4
    with contextlib.redirect_stdout(io.StringIO()):
        scores = with_segm.compute_metrics(with_segm.results[:2])
        again_scores = with_segm.compute_metrics(with_segm.results[2:])  # ground truth reused: no instances needed
    assert scores == again_scores and scores["bbox_mAP"] == 1.0 and scores["segm_mAP"] > 0.5


# ---- LVIS ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lvis_set(tmp_path_factory) -> tuple[str, list]:
    """An LVIS-format set: 40 images, 24 categories (rare, common, frequent), negative and not-exhaustive
    category lists per image, and 400 detections per image (more than LVIS's limit of 300)."""
    gen = bench_eval()
    rng = np.random.default_rng(7)
    gt = gen.make_ground_truth(rng, images=40, classes=24, per_image=6)
    for a in gt["annotations"]:
        a["iscrowd"] = 0  # LVIS has no crowds
    for c in gt["categories"]:
        c.update(frequency="rcf"[c["id"] % 3], synset=c["name"], image_count=1, instance_count=1)
    positive: dict[int, set] = {}
    for a in gt["annotations"]:
        positive.setdefault(a["image_id"], set()).add(a["category_id"])
    for image in gt["images"]:
        others = [c for c in range(1, 25) if c not in positive.get(image["id"], ())]
        image["neg_category_ids"] = sorted(int(c) for c in rng.choice(others, 5, replace=False))
        found = sorted(positive.get(image["id"], ()))
        image["not_exhaustive_category_ids"] = found[:1] if rng.random() < 0.3 else []
    path = tmp_path_factory.mktemp("lvis") / "lvis_val.json"
    path.write_text(json.dumps(gt))
    results = gen.make_results(rng, gt, per_image=400, masks=True)
    return str(path), results


def lvis_scores(metric_cls: type, ann: str, results: list, **kwargs: Any) -> dict[str, float]:
    metric = metric_cls(ann_file=ann, **kwargs)
    metric.dataset_meta = {"classes": tuple(f"class {c}" for c in range(24))}
    with contextlib.redirect_stdout(io.StringIO()):
        return metric.compute_metrics(copy.deepcopy(results))


def test_lvis_through_hotcoco_reports_what_mmdets_lvismetric_reports(lvis_set, monkeypatch):
    """Every key and value of mmdet's LVISMetric (lvis-api): bbox, segm, proposal, classwise, metric_items."""
    pytest.importorskip("lvis", reason="lvis-api (requirements-dev.txt) is the reference")
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3 still spells float so; numpy 2 does not
    from mmdet.evaluation.metrics import LVISMetric

    from det_mmdet.lvis import FastLVISMetric

    ann, results = lvis_set
    kwargs = dict(metric=["bbox", "segm", "proposal"], classwise=True)
    theirs = lvis_scores(LVISMetric, ann, results, **kwargs)
    ours = lvis_scores(FastLVISMetric, ann, results, **kwargs)
    assert len(theirs) == 9 + 9 + 4 + 24 and 0.05 < theirs["bbox_AP"] < 0.95 and theirs["segm_APr"] > 0
    nan = {k for k, v in theirs.items() if v != v}
    assert {k: v for k, v in ours.items() if k not in nan} == {k: v for k, v in theirs.items() if k not in nan}
    assert set(ours) == set(theirs) and all(ours[k] != ours[k] for k in nan)
    items = dict(metric="segm", metric_items=["APr", "AR@300"])
    assert lvis_scores(FastLVISMetric, ann, results, **items) == lvis_scores(LVISMetric, ann, results, **items)


def test_lvismetric_is_replaced_and_needs_its_annotation_file(lvis_set):
    from det_mmdet.errors import UserError
    from det_mmdet.lvis import FastLVISMetric

    cfg = coco.with_backend([{"type": "LVISMetric", "ann_file": "x.json"}, {"type": "mmdet.CocoMetric"}], "hotcoco")
    assert cfg[0] == {"type": FastLVISMetric, "ann_file": "x.json"} and cfg[1]["type"] is coco.FastCocoMetric
    with pytest.raises(UserError, match=r"^val_evaluator \(LVISMetric\): ann_file is required"):
        FastLVISMetric(metric="bbox")
    with pytest.raises(UserError, match=r"^val_evaluator.metric_items: 'mAP' is not one of: AP, AP50"):
        FastLVISMetric(ann_file=lvis_set[0], metric_items=["mAP"])


def test_bench_coco_backends_smoke(tmp_path):
    """bench/coco_backends.py with tiny parameters: a row per installed library, hotcoco's the same bits."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "coco_backends.py"), "--images", "12"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| library | bbox: time") and len(rows) >= 1 + 3  # pycocotools, faster, hotcoco
    hot = next(r for r in rows if r.startswith("| hotcoco "))
    assert hot.count("0 (the same bits)") == 2
