"""mmdet evaluators (CocoMetric, ...) over a validation set sharded across slots.

Each slot runs ``metric.process`` on its own batches in ``evaluate_batch``; the per-image results
are gathered through a Determined ``MetricReducer``, deduplicated by image id, put back in dataset
order and scored once on the chief with ``metric.compute_metrics``. (An mmengine ``Evaluator``
gathering on its own would hang: Determined runs full-dataset evaluation on the chief alone.)
"""

from __future__ import annotations

import math
from typing import Any

from determined import pytorch

from det_mmdet import logs
from det_mmdet.errors import UserError


def _image_id(result: Any) -> Any:
    """The image id inside one metric result (CocoMetric stores ``(gt, pred)`` pairs)."""
    for part in result if isinstance(result, (tuple, list)) else (result,):
        if isinstance(part, dict) and "img_id" in part:
            return part["img_id"]
    return None


class EvaluatorReducer(pytorch.MetricReducer):
    """Collects results of every metric of an mmengine ``Evaluator`` and scores them once."""

    def __init__(self, evaluator, is_chief: bool, count_fields: str = "num_classes") -> None:
        self.evaluator = evaluator
        self.is_chief = is_chief
        self.count_fields = count_fields  # the model config's class-count fields, for the error above
        self.last_table = ""  # the last validation's COCO table, printed once at the end of training
        self.reset()

    def reset(self) -> None:
        self.results: list[list[Any]] = [[] for _ in self.evaluator.metrics]

    def update(self, data_batch: dict[str, Any], outputs: list[Any]) -> None:
        self._check_labels(outputs)
        self.evaluator.process(data_samples=outputs, data_batch=data_batch)
        for store, metric in zip(self.results, self.evaluator.metrics, strict=True):
            store.extend(metric.results)
            metric.results.clear()

    def _check_labels(self, outputs: list[Any]) -> None:
        """A predicted class the data set does not have would end in an IndexError inside the metric."""
        classes = (self.evaluator.dataset_meta or {}).get("classes") or ()
        for sample in outputs:
            labels = getattr(getattr(sample, "pred_instances", None), "labels", None)
            if classes and labels is not None and labels.numel() and int(labels.max()) >= len(classes):
                raise UserError(
                    f"validation: the model predicted class index {int(labels.max())} but the data set has "
                    f"{len(classes)} classes; set the model's class counts ({self.count_fields}) to {len(classes)}"
                )

    def per_slot_reduce(self) -> list[list[Any]]:
        return self.results

    def cross_slot_reduce(self, per_slot: list[list[list[Any]]]) -> dict[str, float]:
        if not self.is_chief:
            return {}
        metrics: dict[str, float] = {}
        self.last_table = ""
        for i, metric in enumerate(self.evaluator.metrics):
            keyed: dict[Any, Any] = {}
            unkeyed: list[Any] = []
            for slot in per_slot:
                for result in slot[i]:
                    key = _image_id(result)
                    if key is None:
                        unkeyed.append(result)
                    else:
                        keyed.setdefault(key, result)  # an image seen twice (loader padding) counts once
            ordered = [keyed[k] for k in sorted(keyed)] + unkeyed
            metrics["val_images"] = float(len(ordered))
            with logs.chatter() as printed:  # pycocotools' progress lines and its table, mmengine's INFO
                scores = dict(metric.compute_metrics(ordered))
            self.last_table = "\n".join(filter(None, [self.last_table, logs.coco_table(printed.getvalue())]))
            scores.update({k: v for k, v in without_detections(metric, ordered).items() if k not in scores})
            for key, value in scores.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    # pycocotools writes -1 for "no ground truth of this size"; NaN means the same.
                    metrics[key] = -1.0 if math.isnan(value) else float(value)
        return metrics


# CocoMetric's summary items and the object areas each covers (pycocotools' ranges).
AREAS = {"mAP": (0, 1e10), "mAP_50": (0, 1e10), "mAP_75": (0, 1e10)}
AREAS.update({"mAP_s": (0, 32**2), "mAP_m": (32**2, 96**2), "mAP_l": (96**2, 1e10)})


def without_detections(metric: Any, results: list[Any]) -> dict[str, float]:
    """The COCO scores of a validation in which the model detected nothing at all.

    mmdet's CocoMetric then logs "The testing results of the whole dataset is empty" and reports no
    score, and a validation without the searcher's metric ends a trial on a cluster. The honest
    scores are AP 0 where ground truth exists and -1 where none does (as pycocotools reports it).
    """
    if type(metric).__name__ != "CocoMetric" or any(_detections(r) for r in results):
        return {}
    coco = getattr(metric, "_coco_api", None)  # the ground truth CocoMetric loaded (mmdet keeps no public handle)
    if coco is None:
        return {}
    images, classes = set(metric.img_ids or coco.get_img_ids()), set(metric.cat_ids or coco.get_cat_ids())
    areas = [
        float(a.get("area", 0))
        for a in coco.dataset.get("annotations", [])
        if not a.get("iscrowd") and a["image_id"] in images and a["category_id"] in classes
    ]
    scores = {}
    for kind in [m for m in metric.metrics if m in ("bbox", "segm")]:
        for item, (low, high) in AREAS.items():
            scores[f"{kind}_{item}"] = 0.0 if any(low <= a < high for a in areas) else -1.0
    return scores


def _detections(result: Any) -> int:
    for part in result if isinstance(result, (tuple, list)) else (result,):
        if isinstance(part, dict) and "labels" in part:
            return len(part["labels"])
    return 0
