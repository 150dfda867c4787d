"""mmdet evaluators (CocoMetric, ...) over a validation set sharded across slots.

Each slot runs ``metric.process`` on its own batches in ``evaluate_batch``; the per-image results
are gathered to the chief alone (Determined's ``DistributedContext.gather``: its reducers' own
allgather would copy every slot's results to every slot, only to be dropped there), deduplicated by
image id, put back in dataset order and scored once on the chief with ``metric.compute_metrics``
(mmdet's CocoMetric through :mod:`det_mmdet.coco`). (An mmengine ``Evaluator`` gathering on its own
would hang: Determined runs full-dataset evaluation on the chief alone.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from determined import pytorch

from det_mmdet import logs
from det_mmdet.coco import class_table
from det_mmdet.errors import UserError


def _image_id(result: Any) -> Any:
    """The image id inside one metric result (CocoMetric stores ``(gt, pred)`` pairs)."""
    for part in result if isinstance(result, (tuple, list)) else (result,):
        if isinstance(part, dict) and "img_id" in part:
            return part["img_id"]
    return None


class EvaluatorReducer(pytorch.MetricReducer):
    """Collects results of every metric of an mmengine ``Evaluator`` and scores them once."""

    def __init__(
        self,
        evaluator,
        is_chief: bool,
        count_fields: str = "num_classes",
        gather: Callable[[Any], list[Any] | None] | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.is_chief = is_chief
        self.gather = gather  # every slot's results -> a list on the chief, None elsewhere
        self.gathered: list[Any] | None = None
        self.count_fields = count_fields  # the model config's class-count fields, for the error above
        self.last_table = ""  # the last validation's COCO table, printed once at the end of training
        self.names: dict[str, str] = {}  # reported key -> mmengine's name (the metric's prefix: coco/bbox_mAP)
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

    def per_slot_reduce(self) -> list[list[Any]] | None:
        if self.gather is None:
            return self.results
        # Every slot calls this at once; the results travel to the chief only, and nothing rides on
        # the reducers' allgather that follows.
        self.gathered = self.gather(self.results)
        return None

    def cross_slot_reduce(self, per_slot: list[Any]) -> dict[str, float]:
        if not self.is_chief:
            return {}
        if self.gathered is not None:
            per_slot, self.gathered = self.gathered, None
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
            tables = list(getattr(metric, "tables", None) or [logs.coco_table(printed.getvalue())])
            if getattr(metric, "class_ap", None):
                tables.append("AP per class:\n" + class_table(metric.class_ap))
            self.last_table = "\n".join(filter(None, [self.last_table, *tables]))
            for key, value in scores.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    # pycocotools writes -1 for "no ground truth of this size"; NaN means the same.
                    metrics[key] = -1.0 if math.isnan(value) else float(value)
                    self.names[key] = f"{metric.prefix}/{key}" if getattr(metric, "prefix", None) else key
        return metrics
