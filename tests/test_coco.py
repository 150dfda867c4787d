"""COCO scoring: mmdet's CocoMetric numbers, through hotcoco, faster-coco-eval or pycocotools alike."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import pickle

import numpy as np
import pytest

from conftest import ROOT, det_mmdet, write_experiment
from det_mmdet import coco
from det_mmdet.errors import UserError

CLASSES = tuple(f"class {c}" for c in range(80))


def bench_eval():
    spec = importlib.util.spec_from_file_location("bench_eval", ROOT / "bench" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """bench/eval.py's result set, small: 40 images, 80 classes, 100 detections each, masks."""
    ann, pkl = bench_eval().make(tmp_path_factory.mktemp("coco"), images=40, seed=3)
    return ann, pkl


def score(metric_cls, ann, pkl, **kwargs) -> tuple[dict, object]:
    with contextlib.redirect_stdout(io.StringIO()):
        metric = metric_cls(ann_file=str(ann), **kwargs)
        metric.dataset_meta = {"classes": CLASSES}
        return metric.compute_metrics(pickle.loads(pkl.read_bytes())), metric


@pytest.mark.parametrize("proposal_nums", [(100, 300, 1000), (100, 1, 10)])  # mmdet's default; RTMDet's
def test_pycocotools_backend_reports_what_mmdets_cocometric_reports(synthetic, proposal_nums):
    """Every key and value of mmdet's CocoMetric (bbox, segm, proposal, classwise, AR items), exactly."""
    from mmdet.evaluation.metrics import CocoMetric

    kwargs = dict(metric=["bbox", "segm", "proposal"], classwise=True, proposal_nums=proposal_nums)
    theirs, _ = score(CocoMetric, *synthetic, **kwargs)
    ours, _ = score(coco.FastCocoMetric, *synthetic, backend="pycocotools", **kwargs)
    assert len(theirs) == 6 + 6 + 6 + 80  # bbox, segm, proposal recall, classwise keys
    same = {k: ours[k] for k in theirs}
    nan = [k for k, v in theirs.items() if v != v]
    assert {k: v for k, v in same.items() if k not in nan} == {k: v for k, v in theirs.items() if k not in nan}
    assert all(ours[k] != ours[k] for k in nan)
    added = set(ours) - set(theirs)  # and per-class AP under names Determined can plot
    assert added == {f"{kind}_AP_class_{c}" for kind in ("bbox", "segm") for c in range(80)}

    items = dict(metric="bbox", metric_items=["mAP", "AR@100", "AR_l@1000"], proposal_nums=proposal_nums)
    theirs, _ = score(CocoMetric, *synthetic, **items)
    ours, _ = score(coco.FastCocoMetric, *synthetic, backend="pycocotools", **items)
    assert {k: ours[k] for k in theirs} == theirs and len(theirs) == 3


@pytest.mark.parametrize("backend", ["hotcoco", "faster-coco-eval"])
@pytest.mark.parametrize("proposal_nums", [(100, 300, 1000), (100, 1, 10)])
def test_the_fast_backends_score_like_pycocotools(synthetic, proposal_nums, backend):
    """The same predictions, bbox and segm: every reported metric, and the unrounded numbers (hotcoco:
    exactly; faster-coco-eval: within 1e-6, its precision is a few ULPs off)."""
    kwargs = dict(metric=["bbox", "segm", "proposal"], classwise=True, proposal_nums=proposal_nums)
    slow, slow_metric = score(coco.FastCocoMetric, *synthetic, backend="pycocotools", **kwargs)
    fast, fast_metric = score(coco.FastCocoMetric, *synthetic, backend=backend, **kwargs)
    assert set(fast) == set(slow)
    for key in slow:
        assert fast[key] == pytest.approx(slow[key], abs=1e-6, nan_ok=True), key
    assert 0.05 < fast["bbox_mAP"] < 0.95 and 0.05 < fast["segm_mAP"] < 0.95  # neither trivial nor perfect
    assert fast_metric.tables == slow_metric.tables and fast_metric.class_ap == slow_metric.class_ap

    ann, pkl = synthetic
    gt = json.loads(ann.read_text())
    _, preds = zip(*pickle.loads(pkl.read_bytes()), strict=True)
    for kind in ("bbox", "segm"):
        found = coco.detections(preds, [c["id"] for c in gt["categories"]], kind)
        raw = {}
        for name in ("pycocotools", backend):
            evaluation = coco.match(
                coco.ground_truth(json.loads(ann.read_text()), name), found, kind, name, max_dets=proposal_nums
            )
            raw[name] = (coco.summary(evaluation), coco.per_class(evaluation))
        (stats_a, classes_a), (stats_b, classes_b) = raw.values()
        tolerance = 0 if backend == "hotcoco" else 1e-6
        np.testing.assert_allclose(stats_a, stats_b, rtol=0, atol=tolerance)
        np.testing.assert_allclose(
            np.array(list(classes_a.values())), np.array(list(classes_b.values())), rtol=0, atol=tolerance
        )


def tiny_ground_truth(tmp_path):
    """Two images, three classes; 'empty class' has no ground truth at all."""
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "traffic light"}, {"id": 3, "name": "empty class"}]
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 30], "area": 600, "iscrowd": 0},
    ]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def result(img_id, boxes, labels):
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.linspace(0.9, 0.5, len(boxes)).astype(np.float32)
    return ({"img_id": img_id, "width": 100, "height": 100}, {"img_id": img_id, "bboxes": boxes, "scores": scores,
            "labels": np.array(labels, dtype=np.int64)})  # fmt: skip


@pytest.mark.parametrize("backend", coco.BACKENDS)
def test_a_class_without_ground_truth_and_an_empty_prediction_set(tmp_path, backend):
    """No detections at all: AP 0 where ground truth exists, -1 where none does (mmdet reports nothing)."""
    ann = tiny_ground_truth(tmp_path)
    metric = coco.FastCocoMetric(ann_file=str(ann), metric="bbox", backend=backend)
    metric.dataset_meta = {"classes": ("cat", "traffic light", "empty class")}
    with contextlib.redirect_stdout(io.StringIO()):
        empty = metric.compute_metrics([result(1, [], []), result(2, [], [])])
    assert empty["bbox_mAP"] == empty["bbox_mAP_50"] == empty["bbox_mAP_s"] == empty["bbox_mAP_m"] == 0.0
    assert empty["bbox_mAP_l"] == -1.0  # no large object in the ground truth
    assert (empty["bbox_AP_cat"], empty["bbox_AP_traffic_light"], empty["bbox_AP_empty_class"]) == (0.0, 0.0, -1.0)

    # found: the cat exactly, and a false 'empty class' box, which does not count against any AP
    with contextlib.redirect_stdout(io.StringIO()):
        found = metric.compute_metrics([result(1, [[10, 10, 50, 50], [60, 60, 90, 90]], [0, 2]), result(2, [], [])])
    assert (found["bbox_AP_cat"], found["bbox_AP_traffic_light"], found["bbox_AP_empty_class"]) == (1.0, 0.0, -1.0)
    assert found["bbox_mAP"] == 0.5  # the mean over the two classes that have ground truth
    assert "| empty class | -1.000 |" in coco.class_table(metric.class_ap)


def test_class_names_become_metric_names_determined_accepts():
    assert coco.metric_names(["traffic light", "hair drier", "a/b.c", "x-y", "x y"]) == [
        "traffic_light", "hair_drier", "a_b_c", "x_y_3", "x_y_4",
    ]  # fmt: skip


def test_proposal_fast_is_mmdets_recall_and_format_only_writes_mmdets_files(tmp_path, synthetic):
    """'proposal_fast' (mmdet's RPN configs): mmdet 3.3.0's own fails under numpy 2 unless every image
    has as many boxes as every other; on such a set ours gives its numbers exactly."""
    from mmdet.evaluation.metrics import CocoMetric

    gen = bench_eval()
    rng = np.random.default_rng(5)
    gt = gen.make_ground_truth(rng, images=30, classes=80, per_image=9)
    per_image: dict[int, list] = {}
    for a in gt["annotations"]:
        per_image.setdefault(a["image_id"], []).append({**a, "iscrowd": 0})
    gt["images"] = [i for i in gt["images"] if len(per_image.get(i["id"], [])) >= 4]
    gt["annotations"] = [a for i in gt["images"] for a in per_image[i["id"]][:4]]  # four boxes per image
    ann, pkl = tmp_path / "even.json", tmp_path / "even.pkl"
    ann.write_text(json.dumps(gt))
    pkl.write_bytes(pickle.dumps(gen.make_results(rng, gt, per_image=50, masks=False)))
    for nums in ((100, 300, 1000), (100, 1, 10), (1, 10, 100)):  # (100, 1, 10): only 10 proposals count
        theirs, _ = score(CocoMetric, ann, pkl, metric="proposal_fast", proposal_nums=nums)
        ours, _ = score(coco.FastCocoMetric, ann, pkl, metric="proposal_fast", proposal_nums=nums)
        assert ours == theirs and set(ours) == {f"AR@{n}" for n in nums}
    assert 0 < ours["AR@10"] < ours["AR@100"] < 1

    with pytest.raises(ValueError, match="inhomogeneous"):  # mmdet's, on the uneven set
        score(CocoMetric, *synthetic, metric="proposal_fast")
    ours, _ = score(coco.FastCocoMetric, *synthetic, metric="proposal_fast")
    assert 0 < ours["AR@100"] <= ours["AR@1000"] < 1

    prefix = tmp_path / "out" / "results"
    prefix.parent.mkdir()
    kwargs = dict(metric=["bbox", "segm"], format_only=True, outfile_prefix=str(prefix))
    assert score(coco.FastCocoMetric, *synthetic, **kwargs)[0] == {}
    boxes = json.loads((tmp_path / "out" / "results.bbox.json").read_text())
    assert len(boxes) == 40 * 100 and {"image_id", "bbox", "score", "category_id"} == set(boxes[0])
    assert (tmp_path / "out" / "results.segm.json").exists()


def test_only_cocometric_is_replaced_and_bad_settings_are_one_line(tmp_path):
    cfg = [{"type": "CocoMetric", "metric": "bbox"}, {"type": "VOCMetric"}, {"type": "mmdet.CocoMetric"}]
    assert coco.with_backend(cfg, "pycocotools") == [
        {"type": coco.FastCocoMetric, "metric": "bbox", "backend": "pycocotools"},
        {"type": "VOCMetric"},
        {"type": coco.FastCocoMetric, "backend": "pycocotools"},
    ]
    with pytest.raises(
        UserError, match=r"^data.coco_backend: 'cocoapi' is not one of: hotcoco, faster-coco-eval, pycocotools$"
    ):
        coco.with_backend(cfg, "cocoapi")
    ann = tiny_ground_truth(tmp_path)
    with pytest.raises(UserError, match=r"^val_evaluator.metric_items: 'mAP_xl' is not one of: mAP, "):
        coco.FastCocoMetric(ann_file=str(ann), metric_items=["mAP_xl"])
    with pytest.raises(UserError, match=r"^val_evaluator.proposal_nums: COCO's summary reads three detection limits"):
        coco.FastCocoMetric(ann_file=str(ann), proposal_nums=(100,))


def test_an_unknown_coco_backend_in_the_experiment_is_one_line(tmp_path, shapes):
    from conftest import shapes_hparams

    exp = write_experiment(tmp_path, shapes_hparams(shapes), data={"coco_backend": "cocoapi"})
    r = det_mmdet("train", exp, "--max-batches", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: data.coco_backend: 'cocoapi' is not one of: hotcoco, faster-coco-eval, pycocotools"
    )


def test_ground_truth_from_the_data_samples_when_there_is_no_ann_file(synthetic):
    """No ann_file: CocoMetric converts the samples' instances to COCO; both backends score them like mmdet."""
    from mmdet.evaluation.metrics import CocoMetric

    ann, pkl = synthetic
    gt = json.loads(ann.read_text())
    instances: dict[int, list] = {}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        entry = {"bbox_label": a["category_id"] - 1, "bbox": [x, y, x + w, y + h], "ignore_flag": a["iscrowd"]}
        instances.setdefault(a["image_id"], []).append(entry)
    results = [({**g, "anns": instances.get(g["img_id"], [])}, p) for g, p in pickle.loads(pkl.read_bytes())]
    scored = {}
    for name, metric in (
        ("mmdet", CocoMetric(metric="bbox")),
        *((backend, coco.FastCocoMetric(metric="bbox", backend=backend)) for backend in coco.BACKENDS),
    ):
        metric.dataset_meta = {"classes": CLASSES}
        with contextlib.redirect_stdout(io.StringIO()):
            scored[name] = metric.compute_metrics([(dict(g, anns=list(g["anns"])), p) for g, p in results])
    assert 0.05 < scored["mmdet"]["bbox_mAP"] < 0.95
    for backend in coco.BACKENDS:
        assert {k: scored[backend][k] for k in scored["mmdet"]} == scored["mmdet"], backend


def test_only_the_slot_that_scores_reads_the_annotation_file(tmp_path, synthetic):
    """A metric that only processes batches (every slot but the chief) never reads ann_file; the chief
    reads it when it scores, with mmdet's numbers; a missing file is one line when the metric is built."""
    import torch
    from mmdet.evaluation.metrics import CocoMetric

    ann, pkl = synthetic
    results = pickle.loads(pkl.read_bytes())
    metric = coco.FastCocoMetric(str(ann), "bbox", backend="hotcoco")  # positional, as CocoMetric takes them
    metric.dataset_meta = {"classes": CLASSES}
    assert metric._coco_api._coco is None  # built: not read
    gt, pred = results[0]
    instances = {k: torch.from_numpy(pred[k]) for k in ("bboxes", "scores", "labels")}
    sample = {"img_id": gt["img_id"], "ori_shape": (gt["height"], gt["width"]), "pred_instances": instances}
    metric.process({}, [sample])
    assert metric._coco_api._coco is None and "anns" not in metric.results[0][0]  # processed: still not read
    with contextlib.redirect_stdout(io.StringIO()):
        ours = metric.compute_metrics(results)
        reference = CocoMetric(ann_file=str(ann), metric="bbox")
        reference.dataset_meta = {"classes": CLASSES}
        theirs = reference.compute_metrics(pickle.loads(pkl.read_bytes()))
    assert {k: ours[k] for k in theirs} == theirs and metric._coco_api._coco is not None

    with pytest.raises(UserError, match=r"^val_evaluator.ann_file: .*missing.json does not exist$"):
        coco.FastCocoMetric(ann_file=str(tmp_path / "missing.json"))


def test_sort_categories_sorts_the_lazily_read_ground_truth(tmp_path):
    """objects365's files list categories out of order; CocoMetric sorts them where asked, and so do we."""
    from mmdet.evaluation.metrics import CocoMetric

    data = json.loads(tiny_ground_truth(tmp_path).read_text())
    data["categories"] = data["categories"][::-1]
    path = tmp_path / "unsorted.json"
    path.write_text(json.dumps(data))
    for sort in (False, True):
        with contextlib.redirect_stdout(io.StringIO()):
            theirs = CocoMetric(ann_file=str(path), sort_categories=sort)._coco_api
        ours = coco.FastCocoMetric(ann_file=str(path), sort_categories=sort)._coco_api
        assert list(ours.cats) == list(theirs.cats) and ours.dataset["categories"] == theirs.dataset["categories"]
        assert ours.get_cat_ids(cat_names=["cat", "traffic light"]) == theirs.get_cat_ids(
            cat_names=["cat", "traffic light"]
        )
