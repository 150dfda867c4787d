"""LVIS scoring: mmdet's LVISMetric, through hotcoco's LVIS evaluation instead of the lvis package.

mmdet's LVISMetric scores through lvis-api (the ``lvis`` package, not installed here): pure Python,
slow at LVIS size (20k images, up to 300 detections each), and its PyPI release (0.5.3) fails under
numpy 2 (``np.float``). :class:`FastLVISMetric` is LVISMetric (settings, ``process``, result files,
metric names, rounding) scored by hotcoco's federated evaluation, which gives lvis-api's numbers
(``tests/test_coco_backends.py`` compares them with mmdet's LVISMetric on an LVIS-format set with
rare, common and frequent categories). What LVISMetric hands lvis-api is kept: at most 300
detections per image (the highest scores), all images of the annotation file, and for segm each
detection's area is its box's (mmdet's segm results carry the box, and lvis-api then takes its area).

As lvis-api does, LVIS scoring needs the annotation file (``ann_file``): it holds the categories'
frequencies and each image's negative and not-exhaustive categories. Two deliberate differences from
LVISMetric: a validation without any detection reports AP 0 instead of nothing, and ``proposal_fast``
works under numpy 2 (mmdet's recall stacks per-image arrays of unequal shapes).
"""

from __future__ import annotations

import os.path as osp
from collections.abc import Sequence
from typing import Any

import numpy as np
from mmdet.evaluation.metrics import CocoMetric, LVISMetric
from mmengine.fileio import get_local_path

from det_mmdet import coco, logs
from det_mmdet.errors import UserError

NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR@300", "ARs@300", "ARm@300", "ARl@300")
DETECTION_ITEMS = NAMES[:9]  # what LVISMetric reports for bbox and segm unless metric_items says otherwise
PROPOSAL_ITEMS = NAMES[9:]  # ... and for 'proposal' (lvis-api's own limit: 300, whatever proposal_nums says)
MAX_DETS = 300  # lvis-api's LVISResults: the highest-scoring 300 detections of each image


class FastLVISMetric(LVISMetric):
    """mmdet's LVISMetric, scored through hotcoco (LVISMetric's own needs the lvis package)."""

    def __init__(
        self,
        ann_file: str | None = None,
        metric: str | list[str] = "bbox",
        classwise: bool = False,
        proposal_nums: Sequence[int] = (100, 300, 1000),
        iou_thrs: Any = None,
        metric_items: Sequence[str] | None = None,
        format_only: bool = False,
        outfile_prefix: str | None = None,
        collect_device: str = "cpu",
        prefix: str | None = None,
        file_client_args: dict | None = None,
        backend_args: dict | None = None,
    ) -> None:
        # LVISMetric's __init__ refuses to run without the lvis package; CocoMetric's sets the same fields.
        CocoMetric.__init__(
            self,
            metric=metric,
            classwise=classwise,
            proposal_nums=proposal_nums,
            iou_thrs=iou_thrs,
            metric_items=metric_items,
            format_only=format_only,
            outfile_prefix=outfile_prefix,
            file_client_args=file_client_args,
            backend_args=backend_args,
            collect_device=collect_device,
            prefix=prefix,
        )
        for item in self.metric_items or ():
            if item not in NAMES:
                raise UserError(f"val_evaluator.metric_items: {item!r} is not one of: {', '.join(NAMES)}")
        if ann_file is None:
            raise UserError(
                "val_evaluator (LVISMetric): ann_file is required; LVIS scoring reads the categories' "
                "frequencies and each image's negative and not-exhaustive categories from it"
            )
        from hotcoco import COCO

        with get_local_path(ann_file, backend_args=backend_args) as local_path, logs.chatter():
            self._lvis_api = COCO(local_path)
        self.tables: list[str] = []  # the last scoring's summaries, one per metric

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """LVISMetric's ``process``; masks are kept (and encoded) only where segm is scored."""
        if "segm" not in self.metrics:
            data_samples = [coco.without_masks(sample) for sample in data_samples]
        super().process(data_batch, data_samples)

    def compute_metrics(self, results: list) -> dict[str, float]:
        _, preds = zip(*results, strict=True)
        if self.cat_ids is None:
            self.cat_ids = self._lvis_api.get_cat_ids()
        if self.img_ids is None:
            self.img_ids = self._lvis_api.get_img_ids()
        if self.outfile_prefix is not None:  # mmdet's result files, where the config asks for them
            self.results2json(preds, self.outfile_prefix)
        if self.format_only:
            print(f"results are saved in {osp.dirname(self.outfile_prefix)}")
            return {}
        scores: dict[str, float] = {}
        self.tables = []
        for metric in self.metrics:
            if metric == "proposal_fast":  # LVISMetric's recall over every ground-truth box
                recall = self.fast_eval_recall(list(preds), self.proposal_nums, self.iou_thrs)
                scores.update({f"AR@{n}": float(recall[i]) for i, n in enumerate(self.proposal_nums)})
                continue
            scores.update(self._score(preds, metric))
        return scores

    def _score(self, preds: Sequence[dict], metric: str) -> dict[str, float]:
        """One metric's numbers, by LVISMetric's names and rounding."""
        from hotcoco import LVISeval

        iou_type = "bbox" if metric == "proposal" else metric
        found = coco.detections(preds, self.cat_ids, iou_type)
        if found is None:
            raise UserError("val_evaluator.metric: 'segm' needs masks, and the model predicts none")
        coco.check_images(self._lvis_api, found)
        with logs.chatter():
            results = self._lvis_api.load_res(found.rows(), segmentation=found.masks)
            evaluation = LVISeval(self._lvis_api, results.cap_detections_per_image(MAX_DETS), iou_type)
            evaluation.run()
        numbers = {k: float(v) for k, v in evaluation.get_results().items()}
        self.tables.append(f"{metric} (LVIS):\n" + " | ".join(f"{k} {numbers[k]:.3f}" for k in NAMES))
        print(self.tables[-1])
        if metric == "proposal":  # lvis-api's detection limit, and its category-aware matching, as in LVISMetric
            return {k: float(f"{numbers[k]:.3f}") for k in self.metric_items or PROPOSAL_ITEMS}
        scores = {f"{metric}_{k}": float(f"{numbers[k]:.3f}") for k in self.metric_items or DETECTION_ITEMS}
        if self.classwise:
            precision = np.asarray(evaluation.eval["precision"])[..., 0, 0]  # all areas, the one limit
            for idx, cat in enumerate(self.cat_ids):
                name = self._lvis_api.load_cats([cat])[0]["name"]
                valid = precision[:, :, idx][precision[:, :, idx] > -1]
                scores[f"{name}_precision"] = round(float(np.mean(valid)) if valid.size else float("nan"), 3)
        return scores

    def fast_eval_recall(self, results: list[dict], proposal_nums: Sequence[int], iou_thrs: Any, logger=None):
        """'proposal_fast': LVISMetric's box recall (every ground-truth box counts), without mmdet's
        stacking of unequal per-image arrays that numpy 2 refuses."""
        boxes = []
        for img_id in self.img_ids:
            xywh = [a["bbox"] for a in self._lvis_api.load_anns(self._lvis_api.get_ann_ids(img_ids=[img_id]))]
            boxes.append(np.array([[x, y, x + w, y + h] for x, y, w, h in xywh], dtype=np.float32).reshape(-1, 4))
        thrs = np.asarray(iou_thrs, dtype=np.float64).reshape(-1)
        return coco.box_recall(boxes, [r["bboxes"] for r in results], list(proposal_nums), thrs).mean(axis=1)
