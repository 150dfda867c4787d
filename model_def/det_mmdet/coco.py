"""COCO scoring for validation and ``det-mmdet evaluate``: mmdet's CocoMetric, matched in C++.

mmdet's CocoMetric matches detections to ground truth through pycocotools, in Python: at COCO-val
size (5,000 images, 500k detections) that is most of a minute per IoU type, and on a cluster every
slot waits while the chief scores. :class:`FastCocoMetric` is CocoMetric (same ``process``, result
files, ``format_only``, ``classwise``, ``metric_items``, proposal recall, metric names, rounding)
whose matching runs in faster-coco-eval's COCOeval; ``backend="pycocotools"`` keeps pycocotools'.

The summary numbers are computed here from the accumulated precision/recall arrays by pycocotools'
rules, whichever backend matched: faster-coco-eval's own summary reads other ``maxDets`` (with mmdet's
``proposal_nums=(100, 300, 1000)`` its AP is at 1000 detections, pycocotools' at exactly 100). Both
sort ``maxDets`` before matching, so the arrays agree. Two further differences from mmdet's
CocoMetric, both deliberate: a validation without any detection reports AP 0 (-1 where a class has no
ground truth) instead of nothing, and every class's AP is reported as ``bbox_AP_<class>`` /
``segm_AP_<class>`` so that Determined's web UI can plot it.
"""

from __future__ import annotations

import os.path as osp
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from mmdet.datasets.api_wrappers import COCO
from mmdet.evaluation.metrics import CocoMetric

from det_mmdet import logs
from det_mmdet.errors import UserError

BACKENDS = ("faster-coco-eval", "pycocotools")
DEFAULT_BACKEND = BACKENDS[0]

# CocoMetric's names for pycocotools' 12 summary numbers, in pycocotools' order.
NAMES = (
    "mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
    "AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000",
)  # fmt: skip
DETECTION_ITEMS = NAMES[:6]  # what CocoMetric reports for bbox and segm unless metric_items says otherwise
PROPOSAL_ITEMS = NAMES[6:]  # ... and for 'proposal'


def check_backend(value: Any, where: str = "data.coco_backend") -> str:
    if value not in BACKENDS:
        raise UserError(f"{where}: {value!r} is not one of: {', '.join(BACKENDS)}")
    return value


def with_backend(evaluator_cfg: Any, backend: str) -> Any:
    """An evaluator config whose ``CocoMetric`` entries score through ``backend``; others unchanged."""
    check_backend(backend)
    if isinstance(evaluator_cfg, (list, tuple)):
        return [with_backend(each, backend) for each in evaluator_cfg]
    if isinstance(evaluator_cfg, dict) and evaluator_cfg.get("type") in ("CocoMetric", "mmdet.CocoMetric", CocoMetric):
        return {**evaluator_cfg, "type": FastCocoMetric, "backend": backend}
    return evaluator_cfg


def safe_name(name: str) -> str:
    """A class name as part of a Determined metric name: letters, digits and underscores."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", str(name)).strip("_") or "class"


def metric_names(classes: Sequence[str]) -> list[str]:
    """``safe_name`` of each class, numbered where two would otherwise report under one name."""
    names = [safe_name(c) for c in classes]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


# ---- the two backends ----------------------------------------------------------------------------


def _api(backend: str) -> tuple[type, type]:
    """(COCO, COCOeval) of a backend."""
    if backend == "pycocotools":
        from mmdet.datasets.api_wrappers import COCO, COCOeval  # pycocotools', as CocoMetric uses them

        return COCO, COCOeval
    from faster_coco_eval import COCO, COCOeval_faster

    return COCO, COCOeval_faster


def ground_truth(dataset: dict[str, Any], backend: str) -> Any:
    """A backend's COCO index over a loaded annotation dict (shared, not copied)."""
    coco_cls, _ = _api(backend)
    with logs.chatter():
        coco = coco_cls()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def match(
    gt: Any,
    detections: list[dict[str, Any]],
    iou_type: str,
    backend: str,
    *,
    cat_ids: Sequence[int] | None = None,
    img_ids: Sequence[int] | None = None,
    max_dets: Sequence[int] = (100, 300, 1000),
    iou_thrs: Any = None,
    use_cats: bool = True,
    multiprocess: bool = False,
) -> Any:
    """A COCOeval of ``backend`` that has matched ``detections`` to ``gt`` and accumulated the result.

    No detections at all is a valid input (pycocotools' loadRes cannot read an empty list): the
    result then holds precision and recall 0 wherever there is ground truth.
    """
    coco_cls, evaluator_cls = _api(backend)
    if multiprocess and backend == "pycocotools":
        from mmdet.datasets.api_wrappers import COCOevalMP as evaluator_cls
    extra = {"print_function": print} if backend == "faster-coco-eval" else {}  # into logs.chatter
    with logs.chatter():
        if backend == "pycocotools" and detections:
            results = gt.loadRes(detections)  # CocoMetric's way, exactly (an empty list it cannot read)
        else:
            results = results_index(gt, coco_cls, detections, iou_type)
        evaluation = evaluator_cls(gt, results, iou_type, **extra)
        params = evaluation.params
        params.catIds = list(gt.getCatIds() if cat_ids is None else cat_ids)
        params.imgIds = list(gt.getImgIds() if img_ids is None else img_ids)
        params.maxDets = list(max_dets)
        if iou_thrs is not None:
            params.iouThrs = iou_thrs
        params.useCats = int(use_cats)
        evaluation.evaluate()
        evaluation.accumulate()
    return evaluation


def results_index(gt: Any, coco_cls: type, detections: list[dict[str, Any]], iou_type: str) -> Any:
    """Detections as a COCO index, with what ``loadRes`` adds for scoring (ids from 1, ``iscrowd`` 0,
    the box's or for segm the mask's area) computed for all at once rather than one by one."""
    unknown = {d["image_id"] for d in detections} - set(gt.getImgIds())
    if unknown:
        raise UserError(
            f"COCO scoring: detections for image id {sorted(unknown, key=str)[0]}, which the annotations lack"
        )
    if iou_type == "segm" and detections:
        from faster_coco_eval.core import mask as mask_utils  # pycocotools' overflows on long lists

        areas = mask_utils.area([d["segmentation"] for d in detections]).tolist()
        for i, (found, area) in enumerate(zip(detections, areas, strict=True)):
            found.update(area=area, id=i + 1, iscrowd=0)  # no box: segm is matched by mask alone
    else:
        for i, found in enumerate(detections):
            found.update(area=found["bbox"][2] * found["bbox"][3], id=i + 1, iscrowd=0)
    results = coco_cls()
    results.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"]}
    results.dataset["annotations"] = detections
    results.createIndex()
    return results


# ---- numbers from the accumulated arrays, by pycocotools' rules -------------------------------------


def _mean(evaluation: Any, ap: bool, iou: float | None = None, area: str = "all", dets: int = 100) -> float:
    """pycocotools' ``_summarize``: the mean over valid entries, -1 where there are none."""
    params = evaluation.params
    values = evaluation.eval["precision" if ap else "recall"]  # [T, R, K, A, M] / [T, K, A, M]
    if iou is not None:
        values = values[np.where(iou == params.iouThrs)[0]]  # exact, as pycocotools compares
    a = params.areaRngLbl.index(area)
    m = [i for i, d in enumerate(params.maxDets) if d == dets]  # none: no such maxDets, -1
    values = values[:, :, :, a, m] if ap else values[:, :, a, m]
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def summary(evaluation: Any) -> list[float]:
    """pycocotools' 12 numbers: AP at exactly 100 detections, the rest at the largest of ``maxDets``."""
    d = list(evaluation.params.maxDets)  # sorted by evaluate(), in both backends
    stats = [_mean(evaluation, True, dets=100), _mean(evaluation, True, 0.5, dets=d[2])]
    stats += [_mean(evaluation, True, 0.75, dets=d[2])]
    stats += [_mean(evaluation, True, area=a, dets=d[2]) for a in ("small", "medium", "large")]
    stats += [_mean(evaluation, False, dets=n) for n in d[:3]]
    stats += [_mean(evaluation, False, area=a, dets=d[2]) for a in ("small", "medium", "large")]
    return stats


def per_class(evaluation: Any) -> dict[int, float]:
    """AP per category id (IoU 0.50:0.95, all areas, the most detections; NaN: no ground truth), as
    mmdet's ``classwise`` reads it."""
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # maxDets sorted: -1 is the most
    scores = {}
    for k, cat in enumerate(evaluation.params.catIds):  # the K axis: sorted category ids, in both backends
        valid = precision[:, :, k][precision[:, :, k] > -1]
        scores[cat] = float(np.mean(valid)) if valid.size else float("nan")
    return scores


def add_class_aps(
    evaluation: Any, kind: str, names: dict[int, str], scores: dict[str, float], class_ap: dict[str, dict[str, float]]
) -> dict[int, float]:
    """Each class's AP into ``scores`` as ``<kind>_AP_<safe name>`` and ``class_ap[name][kind]`` (-1: no
    ground truth); returns the rounded APs by category id, NaN kept, for mmdet's ``classwise`` keys."""
    safe = dict(zip(names, metric_names(list(names.values())), strict=True))
    rounded = {cat: round(value, 3) for cat, value in per_class(evaluation).items()}
    for cat, ap in rounded.items():
        reported = -1.0 if np.isnan(ap) else ap  # as pycocotools' summary: -1, no ground truth
        scores[f"{kind}_AP_{safe[cat]}"] = reported
        class_ap.setdefault(names[cat], {})[kind] = reported
    return rounded


def table(stats: Sequence[float], iou_type: str, params: Any) -> str:
    """The 12-line table in pycocotools' layout (``params``: the evaluation's)."""
    d, iou_thrs = list(params.maxDets), params.iouThrs
    rows = [(1, None, "all", 100), (1, 0.5, "all", d[2]), (1, 0.75, "all", d[2])]
    rows += [(1, None, a, d[2]) for a in ("small", "medium", "large")]
    rows += [(0, None, "all", n) for n in d[:3]] + [(0, None, a, d[2]) for a in ("small", "medium", "large")]
    thrs = np.asarray(iou_thrs).reshape(-1)
    lines = []
    for (ap, iou, area, dets), value in zip(rows, stats, strict=True):
        title = "Average Precision  (AP)" if ap else "Average Recall     (AR)"
        ious = f"{thrs[0]:0.2f}:{thrs[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
        lines.append(f" {title} @[ IoU={ious:<9} | area={area:>6s} | maxDets={dets:>3d} ] = {value:0.3f}")
    return f"{iou_type}:\n" + "\n".join(lines)


def class_table(rows: dict[str, dict[str, float]]) -> str:
    """Per class, AP of each IoU type (``rows[class][iou_type]``), a markdown table; -1: no ground truth."""
    kinds = sorted({kind for scores in rows.values() for kind in scores})
    lines = ["| class | " + " | ".join(f"{k} AP" for k in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores.get(k, float('nan')):.3f}" for k in kinds) + " |")
    return "\n".join(lines)


# ---- the metric --------------------------------------------------------------------------------------


class FastCocoMetric(CocoMetric):
    """mmdet's CocoMetric, scored through ``backend`` (faster-coco-eval or pycocotools)."""

    def __init__(self, *args: Any, backend: str = DEFAULT_BACKEND, **kwargs: Any) -> None:
        with logs.chatter():  # pycocotools' "loading annotations into memory..."
            super().__init__(*args, **kwargs)
        self.backend = check_backend(backend, "val_evaluator.backend")
        for item in self.metric_items or ():
            if item not in NAMES:
                raise UserError(f"val_evaluator.metric_items: {item!r} is not one of: {', '.join(NAMES)}")
        if set(self.metrics) - {"proposal_fast"} and len(self.proposal_nums) < 3:
            raise UserError(
                f"val_evaluator.proposal_nums: COCO's summary reads three detection limits, got {self.proposal_nums}"
            )
        self._gt: Any = None  # the backend's index over the ground truth, built once
        self.tables: list[str] = []  # the last scoring's 12-line tables, one per IoU type
        self.class_ap: dict[str, dict[str, float]] = {}  # ... and its AP per class and IoU type

    def compute_metrics(self, results: list) -> dict[str, float]:
        gts, preds = zip(*results, strict=True)
        scratch = tempfile.TemporaryDirectory() if self.outfile_prefix is None else None
        prefix = self.outfile_prefix or osp.join(scratch.name, "results")
        try:
            if self._coco_api is None:  # no ann_file: ground truth from the data samples, as CocoMetric
                with logs.chatter():
                    self._coco_api = COCO(self.gt_to_coco_json(gt_dicts=gts, outfile_prefix=prefix))
            if self.cat_ids is None:
                self.cat_ids = self._coco_api.get_cat_ids(cat_names=self.dataset_meta["classes"])
            if self.img_ids is None:
                self.img_ids = self._coco_api.get_img_ids()
            if self.format_only or self.outfile_prefix is not None:
                self.results2json(preds, prefix)  # mmdet's result files, where the config asks for them
            if self.format_only:
                print(f"results are saved in {osp.dirname(prefix)}")
                return {}
            return self._score(preds)
        finally:
            if scratch is not None:
                scratch.cleanup()

    def _score(self, preds: Sequence[dict[str, Any]]) -> dict[str, float]:
        scores: dict[str, float] = {}
        self.tables, self.class_ap = [], {}
        gt = self._coco_api if self.backend == "pycocotools" else self._backend_gt()
        names = {c["id"]: c["name"] for c in self._coco_api.loadCats(self.cat_ids)}
        converted: dict[str, list[dict] | None] = {}  # bbox and proposal score the same boxes
        for metric in self.metrics:
            if metric == "proposal_fast":  # mmdet's own recall over the boxes
                recall = self.fast_eval_recall(list(preds), self.proposal_nums, self.iou_thrs)
                scores.update({f"AR@{n}": float(recall[i]) for i, n in enumerate(self.proposal_nums)})
                continue
            iou_type = "bbox" if metric == "proposal" else metric
            if iou_type not in converted:
                converted[iou_type] = detections(preds, self.cat_ids, iou_type)
            if converted[iou_type] is None:
                raise UserError("val_evaluator.metric: 'segm' needs masks, and the model predicts none")
            evaluation = match(
                gt,
                converted[iou_type],
                iou_type,
                self.backend,
                cat_ids=self.cat_ids,
                img_ids=self.img_ids,
                max_dets=self.proposal_nums,
                iou_thrs=self.iou_thrs,
                use_cats=metric != "proposal",
                multiprocess=self.use_mp_eval,
            )
            stats = summary(evaluation)
            self.tables.append(table(stats, metric, evaluation.params))
            print(self.tables[-1])  # pycocotools' table, for logs.chatter (and --verbose) as before
            named = dict(zip(NAMES, stats, strict=True))
            if metric == "proposal":
                scores.update({item: round(named[item], 3) for item in self.metric_items or PROPOSAL_ITEMS})
                continue
            scores.update({f"{metric}_{item}": round(named[item], 3) for item in self.metric_items or DETECTION_ITEMS})
            rounded = add_class_aps(evaluation, metric, names, scores, self.class_ap)
            if self.classwise:  # mmdet's keys, NaN and all (segm's overwrite bbox's, as in mmdet)
                scores.update({f"{names[cat]}_precision": ap for cat, ap in rounded.items()})
        return scores

    def fast_eval_recall(self, results: list[dict], proposal_nums: Sequence[int], iou_thrs: Any, logger=None):
        """'proposal_fast': mmdet's box recall (mmdet 3.3.0's own stacks per-image IoUs of unequal
        shapes into one array, which numpy 2 refuses)."""
        boxes = []
        for img_id in self.img_ids:
            anns = self._coco_api.load_anns(self._coco_api.get_ann_ids(img_ids=img_id))
            xywh = [a["bbox"] for a in anns if not a.get("ignore", False) and not a["iscrowd"]]
            boxes.append(np.array([[x, y, x + w, y + h] for x, y, w, h in xywh], dtype=np.float32).reshape(-1, 4))
        thrs = np.asarray(iou_thrs, dtype=np.float64).reshape(-1)
        return box_recall(boxes, [r["bboxes"] for r in results], list(proposal_nums), thrs).mean(axis=1)

    def _backend_gt(self) -> Any:
        if self._gt is None or self._gt.dataset is not self._coco_api.dataset:
            self._gt = ground_truth(self._coco_api.dataset, self.backend)
        return self._gt


def detections(preds: Sequence[dict[str, Any]], cat_ids: Sequence[int], iou_type: str) -> list[dict] | None:
    """CocoMetric's per-image results as COCO detections of ``iou_type`` (segm: None without masks).

    The values are those of mmdet's ``results2json`` after its JSON round trip (float32 made Python
    floats, boxes as x, y, w, h); masks carry no box, as CocoMetric drops it before scoring segm.
    """
    segm = iou_type == "segm"
    if segm and preds and "masks" not in preds[0]:
        return None
    cats = np.asarray(cat_ids)
    found: list[dict] = []
    for idx, pred in enumerate(preds):
        image = pred.get("img_id", idx)
        labels = cats[np.asarray(pred["labels"], dtype=np.int64)].tolist()
        if segm:
            scores = np.asarray(pred.get("mask_scores", pred["scores"])).astype(np.float64).tolist()
            for rle, s, c in zip(pred["masks"], scores, labels, strict=True):
                counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
                found.append(
                    {"image_id": image, "score": s, "category_id": c, "segmentation": {**rle, "counts": counts}}
                )
            continue
        xyxy = np.asarray(pred["bboxes"]).astype(np.float64).reshape(-1, 4)
        xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1).tolist()
        scores = np.asarray(pred["scores"]).astype(np.float64).tolist()
        found += [
            {"image_id": image, "bbox": b, "score": s, "category_id": c}
            for b, s, c in zip(xywh, scores, labels, strict=True)
        ]
    return found


def box_recall(gts: list[np.ndarray], proposals: list[np.ndarray], nums: list[int], thrs: np.ndarray) -> np.ndarray:
    """Recall [len(nums), len(thrs)] of the first ``n`` proposals per image, each ground-truth box
    matched greedily to one proposal (highest IoU first), as mmdet's ``eval_recalls``."""
    from mmdet.evaluation.functional import bbox_overlaps

    best = np.zeros((len(nums), sum(len(g) for g in gts)), dtype=np.float32)  # each box's matched IoU
    start = 0
    for gt, found in zip(gts, proposals, strict=True):
        found = np.asarray(found)[:, :4]
        found = found[: nums[-1]]  # the last number, not the largest, as mmdet
        all_ious = bbox_overlaps(gt, found) if len(gt) else np.zeros((0, len(found)), np.float32)
        for k, n in enumerate(nums):
            ious = all_ious[:, :n].copy()
            for j in range(len(gt) if ious.size else 0):
                g, p = np.unravel_index(np.argmax(ious), ious.shape)
                best[k, start + j] = ious[g, p]
                ious[g, :], ious[:, p] = -1, -1
        start += len(gt)
    return (best[:, :, None] >= thrs[None, None, :]).sum(axis=1) / max(best.shape[1], 1)
