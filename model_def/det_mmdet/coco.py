"""COCO scoring for validation and ``det-mmdet evaluate``: mmdet's CocoMetric, matched in Rust or C++.

mmdet's CocoMetric matches detections to ground truth through pycocotools, in Python: at COCO-val
size (5,000 images, 500k detections) that is most of a minute per IoU type, and on a cluster every
slot waits while the chief scores. :class:`FastCocoMetric` is CocoMetric (same ``process``, result
files, ``format_only``, ``classwise``, ``metric_items``, proposal recall, metric names, rounding)
whose matching runs in hotcoco's COCOeval (Rust; precision and recall arrays bit-identical to
pycocotools'); ``backend="faster-coco-eval"`` (C++) and ``backend="pycocotools"`` stay selectable.

The path around the matching is kept short as well: detections go to hotcoco as arrays (one
``[image, x, y, w, h, score, category]`` row each, masks as the RLEs ``process`` made), not as one
dict per detection or a JSON file; ground truth taken from the data samples is converted once, in
memory; and what ``process`` keeps, which the chief gathers from every slot, holds no masks unless
segm is scored and no ground-truth instances an earlier validation already sent.

The summary numbers are computed here from the accumulated precision/recall arrays by pycocotools'
rules, whichever backend matched: faster-coco-eval's own summary reads other ``maxDets`` (with mmdet's
``proposal_nums=(100, 300, 1000)`` its AP is at 1000 detections, pycocotools' at exactly 100), and
hotcoco keeps ``maxDets`` in the order given where pycocotools sorts them (so they are sorted here
first). Two further differences from mmdet's CocoMetric, both deliberate: a validation without any
detection reports AP 0 (-1 where a class has no ground truth) instead of nothing, and every class's
AP is reported as ``bbox_AP_<class>`` / ``segm_AP_<class>`` so that Determined's web UI can plot it.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import json
import os.path as osp
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mmdet.datasets.api_wrappers import COCO
from mmdet.evaluation.metrics import CocoMetric, LVISMetric
from mmengine import fileio

from det_mmdet import logs
from det_mmdet.errors import UserError

BACKENDS = ("hotcoco", "faster-coco-eval", "pycocotools")
DEFAULT_BACKEND = BACKENDS[0]

# CocoMetric's names for pycocotools' 12 summary numbers, in pycocotools' order.
NAMES = (
    "mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
    "AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000",
)  # fmt: skip
DETECTION_ITEMS = NAMES[:6]  # what CocoMetric reports for bbox and segm unless metric_items says otherwise
PROPOSAL_ITEMS = NAMES[6:]  # ... and for 'proposal'


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a while (back on after, if it was on).

    Reading a COCO file makes hundreds of thousands of small dicts and lists and no cycles among
    them; the collector's passes over them cost more than the parse (results files) or a third of
    it (an annotation file read by pycocotools).
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def check_backend(value: Any, where: str = "data.coco_backend") -> str:
    if value not in BACKENDS:
        raise UserError(f"{where}: {value!r} is not one of: {', '.join(BACKENDS)}")
    return value


def with_backend(evaluator_cfg: Any, backend: str) -> Any:
    """An evaluator config whose ``CocoMetric`` entries score through ``backend`` and whose ``LVISMetric``
    entries through hotcoco (:mod:`det_mmdet.lvis`); others unchanged."""
    check_backend(backend)
    if isinstance(evaluator_cfg, (list, tuple)):
        return [with_backend(each, backend) for each in evaluator_cfg]
    kind = evaluator_cfg.get("type") if isinstance(evaluator_cfg, dict) else None
    if kind in ("CocoMetric", "mmdet.CocoMetric", CocoMetric):
        return {**evaluator_cfg, "type": FastCocoMetric, "backend": backend}
    if kind in ("LVISMetric", "mmdet.LVISMetric", LVISMetric):
        from det_mmdet.lvis import FastLVISMetric

        return {**evaluator_cfg, "type": FastLVISMetric}
    return evaluator_cfg


def safe_name(name: str) -> str:
    """A class name as part of a Determined metric name: letters, digits and underscores."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", str(name)).strip("_") or "class"


def metric_names(classes: Sequence[str]) -> list[str]:
    """``safe_name`` of each class, numbered where two would otherwise report under one name."""
    names = [safe_name(c) for c in classes]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


# ---- the backends ------------------------------------------------------------------------------------


def _api(backend: str) -> tuple[type, type]:
    """(COCO, COCOeval) of a backend."""
    if backend == "pycocotools":
        from mmdet.datasets.api_wrappers import COCO, COCOeval  # pycocotools', as CocoMetric uses them

        return COCO, COCOeval
    if backend == "hotcoco":
        from hotcoco import COCO, COCOeval

        return COCO, COCOeval
    from faster_coco_eval import COCO, COCOeval_faster

    return COCO, COCOeval_faster


def ground_truth(dataset: dict[str, Any], backend: str) -> Any:
    """A backend's COCO index over a loaded annotation dict (hotcoco: its own copy; others: shared)."""
    coco_cls, _ = _api(backend)
    with logs.chatter():
        if backend == "hotcoco":
            return coco_cls(dataset)
        coco = coco_cls()
        coco.dataset = dataset
        coco.createIndex()
    return coco


@dataclass
class Detections:
    """One IoU type's detections as columns, as CocoMetric's ``results2json`` would write them.

    ``boxes`` are x, y, w, h (float64 of the model's float32, as after mmdet's JSON round trip; segm
    is matched by mask alone, and a COCO segm result's area is its mask's); ``masks`` are the RLEs of
    CocoMetric's ``process`` (``counts`` as bytes), passed on unchanged.
    """

    image_ids: np.ndarray  # [N] int64
    category_ids: np.ndarray  # [N] int64
    boxes: np.ndarray  # [N, 4] float64
    scores: np.ndarray  # [N] float64
    masks: list[dict] | None = None  # segm only

    def __len__(self) -> int:
        return len(self.scores)

    def rows(self) -> np.ndarray:
        """The [N, 7] ``image, x, y, w, h, score, category`` array that ``loadRes`` reads."""
        columns = [self.image_ids[:, None], self.boxes, self.scores[:, None], self.category_ids[:, None]]
        return np.concatenate(columns, axis=1, dtype=np.float64)

    def dicts(self) -> list[dict[str, Any]]:
        """The same detections as COCO result dicts (faster-coco-eval and pycocotools read these)."""
        keys = {"image_id": self.image_ids.tolist(), "score": self.scores.tolist()}
        keys["category_id"] = self.category_ids.tolist()
        if self.masks is None:
            keys["bbox"] = self.boxes.tolist()
        else:
            keys["segmentation"] = [
                {"size": m["size"], "counts": m["counts"].decode() if isinstance(m["counts"], bytes) else m["counts"]}
                for m in self.masks
            ]
        return [dict(zip(keys, values, strict=True)) for values in zip(*keys.values(), strict=True)]


def detections(preds: Sequence[dict[str, Any]], cat_ids: Sequence[int], iou_type: str) -> Detections | None:
    """CocoMetric's per-image results as detections of ``iou_type`` (segm: None without masks).

    The values are those of mmdet's ``results2json`` after its JSON round trip (float32 made float64,
    boxes as x, y, w, h, segm scored by ``mask_scores`` where the model gives them).
    """
    segm = iou_type == "segm"
    if segm and preds and "masks" not in preds[0]:
        return None
    images, labels, boxes, scores, masks = [], [], [], [], []
    for idx, pred in enumerate(preds):
        images.append(np.full(len(pred["scores"]), pred.get("img_id", idx), dtype=np.int64))
        labels.append(np.asarray(pred["labels"], dtype=np.int64).reshape(-1))
        scores.append(np.asarray(pred.get("mask_scores", pred["scores"]) if segm else pred["scores"]).reshape(-1))
        boxes.append(np.asarray(pred["bboxes"]).reshape(-1, 4))
        if segm:
            masks += pred["masks"]
    xyxy = _joined(boxes, np.float64, width=4)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    category_ids = np.asarray(cat_ids, dtype=np.int64)[_joined(labels, np.int64)]
    return Detections(
        _joined(images, np.int64), category_ids, xywh, _joined(scores, np.float64), masks if segm else None
    )


def _joined(parts: list[np.ndarray], dtype: type, width: int | None = None) -> np.ndarray:
    """``parts`` end to end as ``dtype`` (empty: an empty array of the right shape)."""
    if not parts:
        return np.zeros((0,) if width is None else (0, width), dtype=dtype)
    return np.concatenate(parts).astype(dtype)


def match(
    gt: Any,
    found: Detections | list[dict[str, Any]],
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
    """A COCOeval of ``backend`` that has matched ``found`` to ``gt`` and accumulated the result.

    ``found``: :class:`Detections`, or COCO result dicts (a results file). No detections at all is
    a valid input (pycocotools' loadRes cannot read an empty list): the result then holds precision
    and recall 0 wherever there is ground truth.
    """
    coco_cls, evaluator_cls = _api(backend)
    check_images(gt, found)
    if multiprocess and backend == "pycocotools":
        from mmdet.datasets.api_wrappers import COCOevalMP as evaluator_cls
    extra = {"print_function": print} if backend == "faster-coco-eval" else {}  # into logs.chatter
    with logs.chatter():
        if backend == "hotcoco":
            results = hotcoco_results(gt, found)
        elif backend == "pycocotools" and len(found):  # CocoMetric's way, exactly (an empty list it cannot read)
            results = gt.loadRes(found if isinstance(found, list) else found.dicts())
        else:
            results = results_index(gt, coco_cls, found if isinstance(found, list) else found.dicts(), iou_type)
        evaluation = evaluator_cls(gt, results, iou_type, **extra)
        params = evaluation.params
        params.catIds = list(gt.getCatIds() if cat_ids is None else cat_ids)
        params.imgIds = list(gt.getImgIds() if img_ids is None else img_ids)
        params.maxDets = sorted(max_dets)  # pycocotools sorts them in evaluate(); hotcoco keeps the order
        if iou_thrs is not None:  # hotcoco takes a list of floats (the same values)
            params.iouThrs = [float(t) for t in np.atleast_1d(iou_thrs)] if backend == "hotcoco" else iou_thrs
        params.useCats = int(use_cats) if backend != "hotcoco" else bool(use_cats)
        evaluation.params = params  # hotcoco's params are read as copies; a no-op for the others
        evaluation.evaluate()
        evaluation.accumulate()
    return evaluation


def check_images(gt: Any, found: Detections | list[dict[str, Any]]) -> None:
    """Detections for an image the ground truth lacks are an error, with every backend."""
    found_ids = found.image_ids.tolist() if isinstance(found, Detections) else [d["image_id"] for d in found]
    unknown = set(found_ids) - set(gt.getImgIds())
    if unknown:
        raise UserError(
            f"COCO scoring: detections for image id {sorted(unknown, key=str)[0]}, which the annotations lack"
        )


def hotcoco_results(gt: Any, found: Detections | list[dict[str, Any]]) -> Any:
    """hotcoco's results index: from the arrays (segm: with each mask's own area, as ``loadRes``
    gives a result without a box), or from result dicts as ``loadRes`` reads them."""
    from hotcoco import mask as rle

    if isinstance(found, list):
        return gt.load_res(found) if found else gt.load_res(np.zeros((0, 7)))
    if found.masks is None:
        return gt.load_res(found.rows())
    results = gt.load_res(found.rows(), segmentation=found.masks)
    if len(found):
        areas = np.asarray(rle.area(found.masks), dtype=np.float64)
        results.update_anns(ids=np.arange(1, len(found) + 1), area=areas)
    return results


def results_index(gt: Any, coco_cls: type, detections: list[dict[str, Any]], iou_type: str) -> Any:
    """Detections as a COCO index, with what ``loadRes`` adds for scoring (ids from 1, ``iscrowd`` 0,
    the box's or for segm the mask's area) computed for all at once rather than one by one."""
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
        values = values[np.where(iou == np.asarray(params.iouThrs))[0]]  # exact, as pycocotools compares
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
    """mmdet's CocoMetric, scored through ``backend`` (hotcoco, faster-coco-eval or pycocotools)."""

    def __init__(self, *args: Any, backend: str = DEFAULT_BACKEND, **kwargs: Any) -> None:
        settings = inspect.signature(CocoMetric.__init__).bind(self, *args, **kwargs).arguments
        settings.pop("self")
        ann_file = settings.pop("ann_file", None)
        super().__init__(**settings)
        if ann_file is not None:  # read where it is first used: the slot that scores
            if not fileio.exists(ann_file, backend_args=self.backend_args):
                raise UserError(f"val_evaluator.ann_file: {ann_file} does not exist")
            self._coco_api = GroundTruthFile(ann_file, self.backend_args, settings.get("sort_categories", False))
        self.backend = check_backend(backend, "val_evaluator.backend")
        for item in self.metric_items or ():
            if item not in NAMES:
                raise UserError(f"val_evaluator.metric_items: {item!r} is not one of: {', '.join(NAMES)}")
        if set(self.metrics) - {"proposal_fast"} and len(self.proposal_nums) < 3:
            raise UserError(
                f"val_evaluator.proposal_nums: COCO's summary reads three detection limits, got {self.proposal_nums}"
            )
        self._gt: Any = None  # the backend's index over the ground truth, built once ...
        self._gt_source: Any = None  # ... from this annotation dict
        self._instances_kept: set[Any] = set()  # images whose ground-truth instances ``process`` has kept
        self.tables: list[str] = []  # the last scoring's 12-line tables, one per IoU type
        self.class_ap: dict[str, dict[str, float]] = {}  # ... and its AP per class and IoU type

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """CocoMetric's ``process``, keeping only what scoring reads (the chief gathers it from every
        slot): masks only where segm is scored (nor are they encoded otherwise), and an image's
        ground-truth instances (no ann_file) only the first time: they are converted once per run."""
        if "segm" not in self.metrics:
            data_samples = [without_masks(sample) for sample in data_samples]
        start = len(self.results)
        super().process(data_batch, data_samples)
        for gt, _ in self.results[start:]:
            if "anns" in gt and gt["img_id"] in self._instances_kept:
                del gt["anns"]
            elif "anns" in gt:
                self._instances_kept.add(gt["img_id"])

    def compute_metrics(self, results: list) -> dict[str, float]:
        gts, preds = zip(*results, strict=True)
        if self._coco_api is None:  # no ann_file: ground truth from the data samples, once per run
            converted = ground_truth_dict(gts, self.dataset_meta["classes"])
            if self.outfile_prefix is not None:  # CocoMetric's file of it, where the config asks for files
                Path(f"{self.outfile_prefix}.gt.json").write_text(json.dumps(converted))
            with logs.chatter():
                self._coco_api = COCO()
                self._coco_api.dataset = converted
                self._coco_api.createIndex()
        if self.cat_ids is None:
            self.cat_ids = self._coco_api.get_cat_ids(cat_names=self.dataset_meta["classes"])
        if self.img_ids is None:
            self.img_ids = self._coco_api.get_img_ids()
        if self.outfile_prefix is not None:  # mmdet's result files, where the config asks for them
            self.results2json(preds, self.outfile_prefix)  # (format_only requires an outfile_prefix)
        if self.format_only:
            print(f"results are saved in {osp.dirname(self.outfile_prefix)}")
            return {}
        return self._score(preds)

    def _score(self, preds: Sequence[dict[str, Any]]) -> dict[str, float]:
        scores: dict[str, float] = {}
        self.tables, self.class_ap = [], {}
        gt = self._coco_api if self.backend == "pycocotools" else self._backend_gt()
        names = {c["id"]: c["name"] for c in self._coco_api.loadCats(self.cat_ids)}
        converted: dict[str, Detections | None] = {}  # bbox and proposal score the same boxes
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
        source = self._coco_api.dataset
        if self._gt is None or self._gt_source is not source:
            self._gt, self._gt_source = ground_truth(source, self.backend), source
        return self._gt


class GroundTruthFile:
    """mmdet's ``COCO`` over a metric's ``ann_file``, read on first use (``CocoMetric.__init__`` reads it
    at once, in every slot).

    Only the chief scores. The other slots' metrics only ask whether there is an annotation file
    (``CocoMetric.process`` keeps each image's ground-truth instances when there is none), so they
    never read it: at COCO-val size that is a few hundred MB less in every other slot of a node.
    Every other attribute is the loaded ``COCO``'s, categories sorted where ``sort_categories`` asks.
    """

    def __init__(self, path: str, backend_args: dict | None, sort_categories: bool) -> None:
        self._path, self._backend_args, self._sort = path, backend_args, sort_categories
        self._coco: COCO | None = None

    def loaded(self) -> COCO:
        if self._coco is None:
            with fileio.get_local_path(self._path, backend_args=self._backend_args) as local, logs.chatter():
                with collector_paused():  # pycocotools' "loading annotations into memory..."
                    coco = COCO(local)
            if self._sort:  # as CocoMetric does (objects365's category lists are out of order)
                coco.cats = {i: coco.cats[i] for i in sorted(coco.cats)}
                coco.dataset["categories"] = sorted(coco.dataset["categories"], key=lambda c: c["id"])
            self._coco = coco
        return self._coco

    def __getattr__(self, name: str) -> Any:  # only for names this object does not have itself
        if name.startswith("__") or name in ("_coco", "_path", "_backend_args", "_sort"):
            raise AttributeError(name)  # copy and pickle probe dunders on a bare instance
        return getattr(self.loaded(), name)


def without_masks(sample: dict) -> dict:
    """A data sample (as mmengine's Evaluator hands it to ``process``) whose predictions carry no masks."""
    pred = sample.get("pred_instances")
    if not isinstance(pred, dict) or not {"masks", "mask_scores"} & set(pred):
        return sample
    return {**sample, "pred_instances": {k: v for k, v in pred.items() if k not in ("masks", "mask_scores")}}


def ground_truth_dict(gts: Sequence[dict], classes: Sequence[str]) -> dict[str, Any]:
    """CocoMetric's ``gt_to_coco_json`` in memory: the same COCO dict, without the file it writes and
    reads back (category ids are class indices, crowds are the ignored instances, areas the boxes')."""
    images, annotations = [], []
    for idx, gt in enumerate(gts):
        image_id = gt.get("img_id", idx)
        images.append({"id": image_id, "width": gt["width"], "height": gt["height"], "file_name": ""})
        for ann in gt["anns"]:
            x1, y1, x2, y2 = ann["bbox"]
            box = [x1, y1, x2 - x1, y2 - y1]
            entry = {"id": len(annotations) + 1, "image_id": image_id, "bbox": box}
            entry.update(iscrowd=ann.get("ignore_flag", 0), category_id=int(ann["bbox_label"]), area=box[2] * box[3])
            mask = ann.get("mask", None)
            if mask and isinstance(mask, dict) and isinstance(mask["counts"], bytes):
                entry["segmentation"] = {**mask, "counts": mask["counts"].decode()}
            elif mask:
                entry["segmentation"] = mask
            annotations.append(entry)
    made = f"Coco json file converted by mmdet CocoMetric (det-mmdet, in memory), {datetime.datetime.now()}"
    coco = {"info": {"description": made}, "images": images, "licenses": None}
    coco["categories"] = [{"id": i, "name": name} for i, name in enumerate(classes)]
    if annotations:
        coco["annotations"] = annotations
    return coco


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
