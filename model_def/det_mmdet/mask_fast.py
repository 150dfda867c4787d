"""Mask R-CNN's instance masks loaded, rescaled and mirrored with less copying, with the same outputs as mmdet 3.3.0's.

Mask R-CNN's pipeline (``LoadAnnotations(with_mask=True)``, ``Resize``, ``RandomFlip``) turns every
instance's polygons into a full-image uint8 bitmap and then rescales (OpenCV's nearest resize) and
mirrors each whole bitmap: for 640x480 photos and ``scale=(1333, 800)`` that is 0.85 MB a mask,
nearly all zeros. What differs here:

    FastLoadAnnotations  the same pycocotools calls make the same RLEs of the same annotations
                         (mmdet's own ``_process_masks`` keeps the same polygons and sets the same
                         ignore flags), but all of a sample's bitmaps are decoded at once into one
                         column-major array, used as it is: mmdet decodes each into an array of its
                         own and ``BitmapMasks`` copies them all into a stack (of the same layout).
                         The decode is numpy's (:func:`decoded`): the counts of all the strings read
                         at once, the bitmaps written as runs by one ``np.repeat``; pycocotools
                         writes each byte in a loop, seven times the time (4.1-4.5 against 0.6 ms
                         for seven star-shaped masks on a 640x480 image)
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
or the per-mask OpenCV calls run instead; where pycocotools would read an RLE string otherwise than
as its writer's runs laid end to end (:func:`decoded` says which), pycocotools decodes it.
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
    """mmdet's ``LoadAnnotations``; a sample's bitmaps decoded at once by numpy (module docstring),
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
            masks = decoded(rles, h, w)
            if masks is None:  # pycocotools' (h, w, n) column-major array seen as (n, h, w): mmdet's layout
                masks = mask_utils.decode(rles).transpose(2, 0, 1)
            results["gt_masks"] = fast_transforms.bitmap_masks(masks, h, w)
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


def decoded(rles: list[dict], h: int, w: int) -> np.ndarray | None:
    """pycocotools' ``decode`` of compressed RLEs of size (h, w), as its (n, h, w) column-major bitmaps, by
    numpy: a sample's counts read at once (:func:`run_lengths`), its bitmaps written by one ``np.repeat`` of
    alternating 0/1 runs (pycocotools writes each byte in a loop: 7x the time). None where pycocotools'
    result is not the runs laid end to end: strings it reads otherwise, or runs that do not fill the image
    (it then fails, or leaves bytes unwritten); the caller has pycocotools decode."""
    if h * w >= 2**32:  # (pycocotools keeps counts as 32-bit unsigned)
        return None
    read = run_lengths([rle["counts"] for rle in rles])
    if read is None:
        return None
    runs, per_mask = read
    firsts = np.cumsum(per_mask) - per_mask
    if runs.min() < 0 or np.any(np.add.reduceat(runs, firsts) != h * w):
        return None
    ones = ((np.arange(len(runs)) - np.repeat(firsts, per_mask)) & 1).astype(np.uint8)  # zeros first, each mask
    return np.repeat(ones, runs).reshape(len(rles), w, h).transpose(0, 2, 1)


def run_lengths(strings: list[bytes | str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The counts of COCO's compressed RLE strings as pycocotools' ``rleFrString`` reads them: 5 bits a
    character (ASCII 48-111) from the lowest up, 0x20 set where the number goes on, 0x10 of its last
    character its sign; from the fourth number on, each adds the number two before it. Returns all
    strings' counts end to end and how many each has; None for what it would read otherwise or outside
    C's defined arithmetic: an empty string, other characters, a number cut off, one of over 6 characters."""
    encoded = [s.encode() if isinstance(s, str) else s for s in strings]
    sizes = np.fromiter(map(len, encoded), dtype=np.intp, count=len(encoded))
    if not len(sizes) or sizes.min() == 0:
        return None
    chars = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    if chars.min() < 48 or chars.max() > 111:
        return None
    chars = chars - np.uint8(48)
    ends = np.flatnonzero(chars < 0x20)  # a number's last character
    if not len(ends):
        return None
    string_ends = np.cumsum(sizes) - 1
    numbers_so_far = np.searchsorted(ends, string_ends, side="right")
    if not np.array_equal(ends[numbers_so_far - 1], string_ends):  # a string ends inside a number
        return None
    lengths = np.diff(ends, prepend=-1)
    if lengths.max() > 6:
        return None
    digit = np.arange(len(chars)) - np.repeat(ends - lengths + 1, lengths)  # each character's place
    values = np.add.reduceat((chars & 0x1F).astype(np.int32) << (5 * digit).astype(np.int32), ends - lengths + 1)
    values = values.astype(np.int64) - ((chars[ends] >= 0x10).astype(np.int64) << (5 * lengths))
    per_string = np.diff(numbers_so_far, prepend=0)
    place = np.arange(len(values)) - np.repeat(numbers_so_far - per_string, per_string)
    for parity, chained in ((1, per_string // 2), (0, (per_string - 1) // 2)):  # the odd ones, the even from 2
        linked = (place & 1 == parity) & (place > 0)
        sums = np.cumsum(values[linked])
        before = np.concatenate(([0], sums))[np.cumsum(chained) - chained]
        values[linked] = sums - np.repeat(before, chained)
    return values, per_string


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
