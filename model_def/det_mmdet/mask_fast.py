"""Mask R-CNN's instance masks loaded, rescaled and mirrored with less copying, with the same outputs as mmdet 3.3.0's.

Mask R-CNN's pipeline (``LoadAnnotations(with_mask=True)``, ``Resize``, ``RandomFlip``) turns every
instance's polygons into a full-image uint8 bitmap and then rescales (OpenCV's nearest resize) and
mirrors each whole bitmap: for 640x480 photos and ``scale=(1333, 800)`` that is 0.85 MB a mask,
nearly all zeros. What differs here:

    FastLoadAnnotations  the same pycocotools calls on the same annotations (mmdet's own
                         ``_process_masks`` keeps the same polygons and sets the same ignore flags),
                         but all of a sample's bitmaps decoded by one ``decode`` call into one
                         column-major array, used as it is: mmdet decodes each into an array of its
                         own and ``BitmapMasks`` copies them all into a stack (of the same layout)
    rescale, flip        (``fast_transforms.rescaled_bitmaps`` / ``flipped_bitmaps``, behind
                         ``FastResize`` and ``FastRandomFlip``, call :func:`rescaled` and
                         :func:`flipped`): one new array for all of a sample's masks. A rescale fills
                         an array of zeros only where the mask's nonzero box (``cv2.boundingRect``)
                         goes: the rows and columns whose source pixel lies in the box, gathered by
                         the source indices of OpenCV's own nearest resize (read from OpenCV,
                         :func:`nearest_index`). A flip of row-major masks (a rescale's) has OpenCV
                         mirror each whole mask straight into its place (one pass over it; finding
                         the box costs more than the flip); of others, the box only

Values, dtype (uint8) and shapes are mmdet's; rescaled and mirrored masks are C-contiguous, loaded
ones column-major as mmdet's (their boxes are read through the transpose, which OpenCV takes
without a copy). Where the outputs could differ (``poly2mask=False``; an RLE whose ``size`` is not
the image's; masks that are not uint8 or not of the size their ``BitmapMasks`` says) mmdet's code
or the per-mask OpenCV calls run instead.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch
from mmdet.datasets.transforms import loading as mmdet_loading
from mmdet.registry import TRANSFORMS
from mmdet.structures.bbox import HorizontalBoxes, get_box_type
from mmdet.structures.mask import BitmapMasks
from pycocotools import mask as mask_utils

from det_mmdet import fast_transforms


@TRANSFORMS.register_module(name="FastLoadAnnotations", force=True)
class FastLoadAnnotations(mmdet_loading.LoadAnnotations):
    """mmdet's ``LoadAnnotations``; a sample's bitmaps decoded by one pycocotools call (module docstring),
    its boxes made float32 by numpy where mmdet has torch read the nested list (the same rounding of
    each number to float32; the same ``HorizontalBoxes``)."""

    def _load_bboxes(self, results: dict) -> None:
        if self.box_type is None or get_box_type(self.box_type)[1] is not HorizontalBoxes:
            return super()._load_bboxes(results)
        instances = results.get("instances", [])
        boxes = np.array([instance["bbox"] for instance in instances], dtype=np.float32).reshape(-1, 4)
        results["gt_bboxes"] = HorizontalBoxes(torch.from_numpy(boxes), clone=False)
        results["gt_ignore_flags"] = np.array([instance["ignore_flag"] for instance in instances], dtype=bool)
        return None

    def _load_masks(self, results: dict) -> None:
        if not self.poly2mask:
            return super()._load_masks(results)
        h, w = results["ori_shape"]
        rles = [to_rle(ann, h, w) for ann in self._process_masks(results)]
        if rles and all(list(rle.get("size", ())) == [h, w] for rle in rles):
            # pycocotools' (h, w, n) column-major array, seen as (n, h, w): the layout of mmdet's stack
            results["gt_masks"] = fast_transforms.bitmap_masks(mask_utils.decode(rles).transpose(2, 0, 1), h, w)
        else:  # none, or sizes one decode call cannot take: mmdet's per-mask decode and stack (and its failure)
            results["gt_masks"] = BitmapMasks([mask_utils.decode(rle) for rle in rles], h, w)
        return None


def to_rle(mask_ann: list | dict, h: int, w: int) -> dict:
    """The RLE that mmdet's ``_poly2mask`` decodes: polygons merged, uncompressed RLE compressed."""
    if isinstance(mask_ann, list):
        return mask_utils.merge(mask_utils.frPyObjects(mask_ann, h, w))
    if isinstance(mask_ann["counts"], list):
        return mask_utils.frPyObjects(mask_ann, h, w)
    return mask_ann


def rescaled(masks: np.ndarray, size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray | None:
    """OpenCV's nearest resize of each of ``masks`` (n, h, w) to ``new_size`` (h, w), in one new array."""
    (h, w), (new_h, new_w) = size, new_size
    ys, xs = nearest_index(h, new_h, 0), nearest_index(w, new_w, 1)
    if not sparse(masks, size) or ys is None or xs is None:
        return None
    out = np.zeros((len(masks), new_h, new_w), dtype=np.uint8)
    for mask, dst in zip(masks, out, strict=True):
        x, y, bw, bh = nonzero_box(mask)
        if bw and bh:  # the rows and columns whose source lies in the box: a range each (indices only grow)
            y0, y1 = np.searchsorted(ys, (y, y + bh))
            x0, x1 = np.searchsorted(xs, (x, x + bw))
            dst[y0:y1, x0:x1] = mask[y : y + bh, x : x + bw][:, xs[x0:x1] - x][ys[y0:y1] - y]
    return out


def flipped(masks: np.ndarray, size: tuple[int, int], code: int) -> np.ndarray | None:
    """``cv2.flip(mask, code)`` of each of ``masks`` (n, h, w), in one new array: row-major masks mirrored
    whole by OpenCV into it (seven 800x1067 masks: 0.3 ms, against 1.0 ms through their nonzero boxes,
    ``cv2.boundingRect`` being the slower pass), others (loaded ones are column-major) by their boxes."""
    if not sparse(masks, size):
        return None
    h, w = size
    if masks.flags.c_contiguous:
        out = np.empty(masks.shape, dtype=np.uint8)
        for mask, dst in zip(masks, out, strict=True):
            mirrored = cv2.flip(mask, code, dst=dst)
            if mirrored.ctypes.data != dst.ctypes.data:  # (OpenCV made its own)
                dst[...] = mirrored
        return out
    out = np.zeros(masks.shape, dtype=np.uint8)
    for mask, dst in zip(masks, out, strict=True):
        x, y, bw, bh = nonzero_box(mask)
        if bw and bh:
            top = h - y - bh if code in (0, -1) else y  # 0 mirrors rows, 1 columns, -1 both
            left = w - x - bw if code in (1, -1) else x
            dst[top : top + bh, left : left + bw] = cv2.flip(mask[y : y + bh, x : x + bw], code)
    return out


def sparse(masks: np.ndarray, size: tuple[int, int]) -> bool:
    """uint8 masks (n, h, w) of the size their ``BitmapMasks`` says: the box-wise copies apply."""
    return isinstance(masks, np.ndarray) and masks.dtype == np.uint8 and masks.shape[1:] == tuple(size)


def nonzero_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``cv2.boundingRect`` of a 2-D uint8 mask: x, y, width, height of its nonzero pixels (zeros if none).
    A column-major mask is read through its transpose (OpenCV would copy it first)."""
    if not mask.flags.c_contiguous and mask.T.flags.c_contiguous:
        y, x, h, w = cv2.boundingRect(mask.T)
        return x, y, w, h
    return cv2.boundingRect(mask)


@functools.lru_cache(maxsize=64)
def nearest_index(size: int, new_size: int, axis: int) -> np.ndarray | None:
    """The source index of each of ``new_size`` pixels along ``axis`` (0 rows, 1 columns) in OpenCV's
    nearest resize of uint8 images, read from OpenCV itself: one bit of the index at a time, through
    0/1 ramps of that bit. None where the indices do not only grow (then the caller resizes each mask)."""
    if size < 1 or new_size < 1:
        return None
    index = np.zeros(new_size, dtype=np.intp)
    for bit in range(size.bit_length()):
        ramp = ((np.arange(size) >> bit) & 1).astype(np.uint8)
        ramp, dsize = (ramp[:, None], (1, new_size)) if axis == 0 else (ramp[None, :], (new_size, 1))
        index |= cv2.resize(ramp, dsize, interpolation=cv2.INTER_NEAREST).reshape(-1).astype(np.intp) << bit
    if np.any(np.diff(index) < 0) or index.max() >= size:
        return None
    index.flags.writeable = False  # shared by every call with these sizes
    return index


fast_transforms.register(mmdet_loading.LoadAnnotations, FastLoadAnnotations)
