"""COCO results files (``det-mmdet evaluate --results``) read straight into columns.

A COCO-val-sized results file (500k detections with RLE masks) is about 250 MB of JSON. Python's
``json`` turns it into half a million dicts in several seconds, and each dict then has to be taken
apart again for the evaluator. Here msgspec decodes the file into typed records (checked as it goes:
a wrong type or a missing key is one line naming the detection and the key; a segmentation must be
a compressed RLE, the only kind pycocotools' ``loadRes`` gives an area to), and the records become
the arrays that :class:`det_mmdet.coco.Detections` holds, which hotcoco reads without a dict per
detection. Keys other than those a COCO result has (``area``, ``id``, ``iscrowd``) are ignored, as
pycocotools' ``loadRes`` replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from det_mmdet.coco import Detections, collector_paused
from det_mmdet.errors import UserError


class RLE(msgspec.Struct, gc=False):
    """A compressed RLE mask, the only segmentation ``loadRes`` gives an area to."""

    size: tuple[int, int]
    counts: str


# Typed records without the cyclic collector's attention (``gc=False``): with half a million dicts
# the collector's passes take longer than the parse (2.5 s against 0.6 s at COCO-val size).
class Result(msgspec.Struct, gc=False):
    """One detection of a COCO results file."""

    image_id: int
    category_id: int
    score: float
    bbox: tuple[float, float, float, float] | None = None
    segmentation: RLE | None = None


_DECODER = msgspec.json.Decoder(list[Result])


@dataclass
class ResultsFile:
    """What a results file holds, ready to score: boxes where every detection has one, masks likewise."""

    bbox: Detections | None
    segm: Detections | None
    image_ids: np.ndarray  # [N] the image of each detection


def read(path: Path) -> ResultsFile:
    """The detections of ``path``; an unreadable file or a malformed detection is a one-line error."""
    if not path.is_file():
        raise UserError(f"--results {path} does not exist")
    try:
        found = _DECODER.decode(path.read_bytes())
    except msgspec.ValidationError as e:  # names the place: "... - at `$[12].bbox`"
        raise UserError(f"--results {path}: not a list of COCO detections ({e})") from None
    except msgspec.DecodeError as e:
        raise UserError(f"--results {path} is not valid JSON ({e})") from None
    if not found:
        raise UserError(f"--results {path}: expected a non-empty list of COCO detections")
    count = len(found)
    image_ids = np.fromiter((d.image_id for d in found), np.int64, count)
    category_ids = np.fromiter((d.category_id for d in found), np.int64, count)
    scores = np.fromiter((d.score for d in found), np.float64, count)
    boxes = [d.bbox for d in found]
    masks = [d.segmentation for d in found]
    has_box = [i for i, box in enumerate(boxes) if box is not None]
    has_mask = [i for i, mask in enumerate(masks) if mask is not None]
    if not has_box and not has_mask:
        raise UserError(f"--results {path}: no detection has a bbox or a segmentation")
    bbox = segm = None
    if len(has_box) == count:
        bbox = Detections(image_ids, category_ids, np.asarray(boxes, dtype=np.float64), scores)
    else:
        print(f"bbox not scored: detection {first_missing(boxes)} of {path} has no bbox")
    if len(has_mask) == count:
        with collector_paused():  # half a million new dicts, no cycles among them
            masks = [{"size": list(m.size), "counts": m.counts} for m in masks]
        no_boxes = np.zeros((count, 4), dtype=np.float64)  # segm is matched by mask alone
        segm = Detections(image_ids, category_ids, no_boxes, scores, masks)
    elif has_mask:  # a box-only file is the common case: no line for it
        print(f"segm not scored: detection {first_missing(masks)} of {path} has no segmentation")
    return ResultsFile(bbox, segm, image_ids)


def read_json(path: Path, flag: str) -> Any:
    """Any JSON file (the annotation file), parsed without the collector's passes over it."""
    try:
        with collector_paused():
            return msgspec.json.decode(path.read_bytes())
    except msgspec.DecodeError as e:
        raise UserError(f"{flag} {path} is not valid JSON ({e})") from None


def first_missing(values: list) -> int:
    return next(i for i, value in enumerate(values) if value is None)


def check_images(path: Path, ann: Path, image_ids: np.ndarray, known: list[int]) -> None:
    """Every detection's image must be one of the annotation file's."""
    unknown = np.setdiff1d(np.unique(image_ids), np.asarray(known, dtype=np.int64))
    if len(unknown):
        raise UserError(f"--results {path}: image_id {unknown[0]} is not in {ann} ({len(unknown)} unknown ids)")
