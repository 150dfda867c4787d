"""Faster versions of mmdet 3.3.0's heaviest training transforms, with the same outputs.

Each class here subclasses mmdet's transform of the same name: same parameters, same ``__init__``,
same random draws (the ``numpy.random`` calls of mmdet's module, in the same order, some through
mmdet's own ``get_indexes`` and ``_get_hsv_gains``), and outputs equal bit for bit. What differs:

    MixUp, CachedMixUp   canvases and the blend in uint8 (mmdet fills float64 canvases with
                         ``np.ones * pad_val`` and blends in float32; ``trunc(0.5 a + 0.5 b)`` is
                         ``(a + b) >> 1`` exactly), only the crop window is built, no deep copy of the
                         mixed-in sample; MixUp learns which samples have boxes from the annotations
                         instead of decoding an image (when the inner pipeline only loads). The jitter
                         resize of a float64 canvas is made in float32 on the part the crop keeps:
                         within one level of mmdet's (``crop_resize.TruncatedLater``), the one
                         exception to equal bits
    Mosaic, CachedMosaic no deep copies of the four samples (boxes are cloned, images only read), no
                         resize of an image already at its mosaic size (OpenCV copies those), the
                         canvas filled only where no image goes, and made only where the next step
                         reads it (YOLOX's warp: ``yolox_fast``, whose pieces are decoded in their
                         places on the canvas; RTMDet's crop: ``crop_resize``)
    the cached ones      cache copies of what they read back (image, boxes, labels, flags, masks),
                         not of the whole sample (mmdet's caches hold every polygon of ``instances``)
    YOLOXHSVRandomAug    the hue/saturation/value shifts by lookup tables instead of int16 arrays,
                         only for the channels whose gain is not zero; right after YOLOX's warp,
                         the round trip only around the mosaic's pictures, the pad's colour copied
                         outside (``pad_outside``)
    RandomAffine         the warp's boxes moved in numpy around torch's own matrix product
                         (``yolox_fast.FastRandomAffine``); rows below the mosaic's pictures filled
                         with the pad instead of warped; ``cv2.warpAffine`` where it gives mmdet's
                         ``cv2.warpPerspective`` pixels (OpenCV 4.11 and later, checked once)
    PackDetInputs        the image made channels-first by ``cv2.split`` instead of torch's permute (a
                         mirrored view split from the array it views, each plane mirrored back in place)
    Resize, RandomFlip   bitmap masks resized / mirrored into one array (``BitmapMasks`` copies every
                         result twice, once more in its ``__init__``); uint8 ones only where their
                         nonzero boxes go (``mask_fast``, which also has ``LoadAnnotations``)
    Pad, Resize          an image that ``RandomFlip`` left as a reversed view is copied back by
                         ``cv2.flip`` first: OpenCV's binding would copy it through numpy, 30x slower

``MultiImageMixDataset`` (YOLOX's wrapper) deep-copies the whole sample before every transform;
:class:`FastMultiImageMixDataset` copies only where a copy can make a difference.

``FilterAnnotations`` in that wrapper is handed a new dict of the sample rather than a deep copy: it
gives up (returns None) before it changes anything, and otherwise only assigns keys.

Where the fast path cannot promise equal outputs (not 3-channel uint8 images, a pad value that is
not a whole number in 0..255) the transform runs mmdet's code unchanged, decided before any draw.

``swap(dataset, True)`` turns the transforms of a built dataset into these, in place (the instance's
class changes; its parameters stay), so that wrappers that look transforms up by their config type
(``MultiImageMixDataset``'s ``skip_type_keys``) behave as before. ``swap_hooks`` does the same for
the pipelines that ``PipelineSwitchHook`` builds later. The trial applies both unless the
experiment sets ``data.fast_transforms: false``.
"""

from __future__ import annotations

import collections.abc
import copy
import functools
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import cv2
import mmcv
import numpy as np
import torch
from mmdet.datasets import MultiImageMixDataset
from mmdet.datasets.transforms import formatting as mmdet_formatting
from mmdet.datasets.transforms import loading as mmdet_loading
from mmdet.datasets.transforms import transforms as mmdet_transforms
from mmdet.registry import TRANSFORMS
from mmdet.structures.bbox import BaseBoxes, HorizontalBoxes, autocast_box_type
from mmdet.structures.mask import BitmapMasks

from det_mmdet import pad_outside
from det_mmdet.errors import UserError

KNOB = "data.fast_transforms"
MOSAIC_LOCATIONS = ("top_left", "top_right", "bottom_left", "bottom_right")


def check_enabled(value: Any, where: str = KNOB) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}: {value!r} is not true or false")
    return value


# ---------------------------------------------------------------------------------------------
# Helpers


def copy_results(results: dict) -> dict:
    """What ``copy.deepcopy(results)`` gives, without deepcopy's bookkeeping for arrays, boxes and plain data."""
    return {key: copy_value(value) for key, value in results.items()}


def copy_value(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if type(value) is list:  # e.g. ``instances``: dicts of lists of numbers
        return [copy_value(v) for v in value]
    if type(value) is dict:
        return {k: copy_value(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(copy_value(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.copy(order="K")
    if isinstance(value, (BaseBoxes, torch.Tensor)):
        return value.clone()
    return copy.deepcopy(value)


def uint8_pad(pad_val: Any) -> np.ndarray | None:
    """``pad_val`` as three uint8 channel values (read-only), or None where mmdet's canvas would hold
    other values. Worked out once per value (numbers, or a list or tuple of them): a sample asks often."""
    key = tuple(pad_val) if isinstance(pad_val, (list, tuple)) else pad_val
    try:
        return _uint8_pad(key)
    except TypeError:  # not hashable
        return _uint8_pad.__wrapped__(key)


@functools.lru_cache(maxsize=64)
def _uint8_pad(pad_val: Any) -> np.ndarray | None:
    try:
        values = np.broadcast_to(np.asarray(pad_val, dtype=np.float64), (3,))
    except (TypeError, ValueError):
        return None  # mmdet's own code will say what is wrong with it
    if not np.all((values == np.floor(values)) & (values >= 0) & (values <= 255)):
        return None
    out = values.astype(np.uint8)
    out.flags.writeable = False
    return out


def is_color_uint8(img: Any) -> bool:
    return isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def filled(shape: tuple[int, int, int], pad: np.ndarray) -> np.ndarray:
    """A uint8 image of ``shape`` in the colour ``pad`` (row by row: numpy broadcasts 3 values slowly)."""
    if pad.min() == pad.max():
        return np.full(shape, pad[0], dtype=np.uint8)
    out = np.empty(shape, dtype=np.uint8)
    out.reshape(shape[0], -1)[:] = np.tile(pad, shape[1])
    return out


def half_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``floor((a + b) / 2)`` on uint8 without widening: what mmdet's float blend truncates to."""
    out = np.bitwise_xor(a, b)
    out >>= 1
    out += np.bitwise_and(a, b)  # a + b = 2 (a & b) + (a ^ b)
    return out


def resized(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mmcv.imresize(img, size)``; an image already of that size is returned as is (OpenCV copies it)."""
    if size == (img.shape[1], img.shape[0]) and mmcv.image.geometric.imread_backend == "cv2":
        return img
    return mmcv.imresize(img, size)


# ---------------------------------------------------------------------------------------------
# MixUp and CachedMixUp


class MixUpPixels:
    """The pixel work and box bookkeeping that MixUp and CachedMixUp share (mmdet's steps 1-8)."""

    def _eligible(self, *images: Any) -> bool:
        return uint8_pad(self.pad_val) is not None and all(is_color_uint8(img) for img in images)

    def _jittered_canvas(self, retrieve_img: np.ndarray, jit_factor: float) -> tuple[np.ndarray, float]:
        """mmdet's steps 1-3: the image to mix in, resized into a padded canvas, the canvas resized by
        ``jit_factor``; with the scale from the image to the result."""
        pad = uint8_pad(self.pad_val)
        width, height = self.dynamic_scale
        scale_ratio = min(height / retrieve_img.shape[0], width / retrieve_img.shape[1])
        size = (int(retrieve_img.shape[1] * scale_ratio), int(retrieve_img.shape[0] * scale_ratio))
        small = resized(retrieve_img, size)
        if small.shape[:2] == (height, width):
            canvas = small  # only read from here on
        else:
            canvas = filled((height, width, 3), pad)
            canvas[: small.shape[0], : small.shape[1]] = small
        jittered_size = (int(width * jit_factor), int(height * jit_factor))
        if jittered_size != (width, height):
            # mmdet resizes its canvas in the canvas's own dtype (float64 or int64), values then truncated
            # to uint8 where they are pasted. A float64 canvas: in float32, only the part that the crop
            # keeps, within one level of mmdet's (crop_resize.TruncatedLater); else the same call.
            canvas_dtype = (np.ones(1, dtype=retrieve_img.dtype) * self.pad_val).dtype
            if canvas_dtype == np.float64 and mmcv.image.geometric.imread_backend == "cv2":
                return crop_resize.TruncatedLater(canvas, jittered_size), scale_ratio * jit_factor
            canvas = mmcv.imresize(canvas.astype(canvas_dtype), jittered_size)
        return canvas, scale_ratio * jit_factor

    def _window(self, canvas: np.ndarray, target: tuple[int, int], is_flip: bool) -> tuple[np.ndarray, int, int]:
        """mmdet's steps 4-5: the (mirrored) canvas padded to at least ``target`` and a random crop of
        that size, as uint8, with its offsets; only the crop is built."""
        pad = uint8_pad(self.pad_val)
        origin_h, origin_w = canvas.shape[:2]
        target_h, target_w = target
        padded_h, padded_w = max(origin_h, target_h), max(origin_w, target_w)
        x_offset, y_offset = 0, 0
        if padded_h > target_h:
            y_offset = np.random.randint(0, padded_h - target_h)
        if padded_w > target_w:
            x_offset = np.random.randint(0, padded_w - target_w)
        rows, cols = max(0, min(target_h, origin_h - y_offset)), max(0, min(target_w, origin_w - x_offset))
        if is_flip:  # the window of the mirrored canvas, mirrored by OpenCV (numpy is slow on reversed views)
            inside = canvas[y_offset : y_offset + rows, origin_w - x_offset - cols : origin_w - x_offset]
            inside = inside.astype(np.uint8, copy=False)  # float64 values truncate as mmdet's assignment does
            inside = cv2.flip(inside, 1) if inside.size else inside
        else:
            inside = canvas[y_offset : y_offset + rows, x_offset : x_offset + cols].astype(np.uint8, copy=False)
        if (rows, cols) == (target_h, target_w):
            return inside, x_offset, y_offset
        window = filled((target_h, target_w, 3), pad)
        window[:rows, :cols] = inside
        return window, x_offset, y_offset

    def _mix(self, results: dict, retrieve: dict, boxes: BaseBoxes, with_mask: bool) -> dict:
        """Mix ``retrieve`` (its boxes given as ``boxes``, changed in place) into ``results``."""
        jit_factor = np.random.uniform(*self.ratio_range)
        is_flip = np.random.uniform(0, 1) > self.flip_ratio
        canvas, scale_ratio = self._jittered_canvas(retrieve["img"], jit_factor)
        ori_img = results["img"]
        origin_h, origin_w = canvas.shape[:2]
        target_h, target_w = ori_img.shape[:2]
        window, x_offset, y_offset = self._window(canvas, (target_h, target_w), is_flip)
        window_at = (origin_h, origin_w, x_offset, y_offset, target_h, target_w)

        if with_mask:
            masks = retrieve["gt_masks"].rescale(scale_ratio)
            if is_flip:
                masks = masks.flip()
            masks = masks.translate(out_shape=(target_h, target_w), offset=-x_offset, direction="horizontal")
            masks = masks.translate(out_shape=(target_h, target_w), offset=-y_offset, direction="vertical")
        if plain_boxes(boxes) and plain_boxes(results["gt_bboxes"]):
            kept, inside = self._mixed_boxes_in_numpy(results["gt_bboxes"], boxes, scale_ratio, is_flip, window_at)
        else:
            boxes.rescale_([scale_ratio, scale_ratio])
            if self.bbox_clip_border:
                boxes.clip_([origin_h, origin_w])
            if is_flip:
                boxes.flip_([origin_h, origin_w], direction="horizontal")
            moved = boxes.clone()
            moved.translate_([-x_offset, -y_offset])
            if self.bbox_clip_border:
                moved.clip_([target_h, target_w])
            all_boxes = moved.cat((results["gt_bboxes"], moved), dim=0)
            inside = all_boxes.is_inside([target_h, target_w]).numpy()
            kept = all_boxes[inside]
        labels = np.concatenate((results["gt_bboxes_labels"], retrieve["gt_bboxes_labels"]), axis=0)
        flags = np.concatenate((results["gt_ignore_flags"], retrieve["gt_ignore_flags"]), axis=0)

        results["img"] = half_sum(ori_img, window)
        results["img_shape"] = (target_h, target_w)
        results["gt_bboxes"] = kept
        results["gt_bboxes_labels"] = labels[inside]
        results["gt_ignore_flags"] = flags[inside]
        if with_mask:
            results["gt_masks"] = masks.cat([results["gt_masks"], masks])[inside]
        return results

    def _mixed_boxes_in_numpy(
        self, own: HorizontalBoxes, boxes: HorizontalBoxes, scale: float, is_flip: bool, window_at: tuple
    ) -> tuple[HorizontalBoxes, np.ndarray]:
        """mmdet's box steps of the mix, each one float32 operation as in HorizontalBoxes, in numpy: the
        kept boxes and which were kept. ``boxes`` (the mixed-in ones) end rescaled, clipped and mirrored,
        as mmdet leaves them."""
        origin_h, origin_w, x_offset, y_offset, target_h, target_w = window_at
        mixed = boxes.tensor.numpy() * np.float32(scale)
        if self.bbox_clip_border:
            clip_boxes(mixed, (origin_h, origin_w))
        if is_flip:
            mixed[:, 0], mixed[:, 2] = origin_w - mixed[:, 2], origin_w - mixed[:, 0]
        boxes.tensor = torch.from_numpy(mixed)
        moved = mixed + np.array([-x_offset, -y_offset, -x_offset, -y_offset], dtype=np.float32)
        if self.bbox_clip_border:
            clip_boxes(moved, (target_h, target_w))
        every = np.concatenate((own.tensor.numpy(), moved), 0)
        inside = boxes_inside(every, (target_h, target_w))
        return HorizontalBoxes(torch.from_numpy(every[inside]), clone=False), inside


@TRANSFORMS.register_module(name="FastMixUp", force=True)
class FastMixUp(MixUpPixels, mmdet_transforms.MixUp):
    """mmdet's ``MixUp`` (module docstring)."""

    def get_indexes(self, dataset) -> int:
        # Not marked @cache_randomness again (that would add to mmdet's class's list of such methods);
        # MultiImageMixDataset, the only caller, caches nothing.
        boxes = loaded_box_counts(dataset)
        if boxes is None:
            return mmdet_transforms.MixUp.__dict__["get_indexes"].func(self, dataset)
        for _ in range(self.max_iters):
            index = np.random.randint(0, len(dataset))
            if boxes(index) != 0:
                break
        return index

    def transform(self, results: dict) -> dict:
        mix = results.get("mix_results")
        if not (mix and len(mix) == 1 and self._eligible(results["img"], mix[0]["img"])):
            return super().transform(results)
        return self._fast(results)

    @autocast_box_type()
    def _fast(self, results: dict) -> dict:
        mix = results["mix_results"]
        if mix[0]["gt_bboxes"].shape[0] == 0:
            return results
        # mmdet changes the mixed-in sample's boxes in place too (MultiImageMixDataset drops them after).
        return self._mix(results, mix[0], mix[0]["gt_bboxes"], with_mask=False)


@TRANSFORMS.register_module(name="FastCachedMixUp", force=True)
class FastCachedMixUp(MixUpPixels, mmdet_transforms.CachedMixUp):
    """mmdet's ``CachedMixUp`` (module docstring)."""

    def transform(self, results: dict) -> dict:
        if not self._eligible(results["img"], *(r["img"] for r in self.results_cache)):
            return super().transform(results)
        return self._fast(results)

    @autocast_box_type()
    def _fast(self, results: dict) -> dict:
        push(self, results)
        if len(self.results_cache) <= 1:
            return results
        if np.random.uniform(0, 1) > self.prob:
            return results
        retrieve = self.results_cache[self.get_indexes(self.results_cache)]
        if retrieve["gt_bboxes"].shape[0] == 0:
            return results
        return self._mix(results, retrieve, retrieve["gt_bboxes"].clone(), with_mask="gt_masks" in results)


# What the cached transforms read from a cached sample; mmdet caches a deep copy of everything
# (``instances`` with every polygon included), which nothing reads back.
CACHED_KEYS = ("img", "gt_bboxes", "gt_bboxes_labels", "gt_ignore_flags", "gt_masks")


def push(transform: Any, results: dict) -> None:
    """Cache a copy of what is read of ``results``; drop one entry (at random or the oldest) when over the limit."""
    cache = transform.results_cache
    cache.append(copy_results({k: results[k] for k in CACHED_KEYS if k in results}))
    if len(cache) > transform.max_cached_images:
        index = np.random.randint(0, len(cache) - 1) if transform.random_pop else 0
        cache.pop(index)


def loaded_box_counts(dataset) -> Any:
    """``index -> number of gt_bboxes`` read from the annotations, where the pipeline only loads.

    mmdet's MixUp decodes a whole sample just to see whether it has boxes; with a pipeline of
    ``LoadImageFromFile`` and ``LoadAnnotations(with_bbox=True)`` that number is the number of
    instances in the annotation. Anything else: None (decode as mmdet does).
    """
    from mmcv.transforms import LoadImageFromFile
    from mmdet.datasets.transforms import LoadAnnotations

    pipeline = getattr(dataset, "pipeline", None)
    transforms = getattr(pipeline, "transforms", None)
    if not transforms or not hasattr(dataset, "get_data_info"):
        return None
    for t in transforms:
        if type(t) is LoadImageFromFile and not t.ignore_empty:
            continue
        if type(t) in (LoadAnnotations, FAST.get(LoadAnnotations)) and t.with_bbox:
            continue
        return None
    if not any(type(t) in (LoadAnnotations, FAST.get(LoadAnnotations)) for t in transforms):
        return None
    return lambda index: len(dataset.get_data_info(index).get("instances", []))


# ---------------------------------------------------------------------------------------------
# Mosaic and CachedMosaic


class MosaicPixels:
    """The four-image mosaic that Mosaic and CachedMosaic share, without copying the samples."""

    def _mosaic(self, results: dict, others: list[dict], with_mask: bool) -> dict:
        img = results["img"]
        width, height = self.img_scale
        shape = (int(height * 2), int(width * 2), 3) if len(img.shape) == 3 else (int(height * 2), int(width * 2))
        center = (
            int(np.random.uniform(*self.center_ratio_range) * width),
            int(np.random.uniform(*self.center_ratio_range) * height),
        )
        pieces = []
        for loc, patch in zip(MOSAIC_LOCATIONS, [results, *others], strict=True):
            h_i, w_i = patch["img"].shape[:2]
            scale_i = min(height / h_i, width / w_i)
            img_i = resized(patch["img"], (int(w_i * scale_i), int(h_i * scale_i)))
            pieces.append((patch, scale_i, img_i, *self._mosaic_combine(loc, center, img_i.shape[:2][::-1])))
        canvas, board = yolox_fast.shown_canvas(self, shape, img.dtype, pieces)  # what the next warp reads
        shown = canvas is not None
        if canvas is None:  # made later, only where RandomCrop's window reads it
            canvas = crop_resize.deferred_mosaic(self, shape, img.dtype, pieces)
        pasted = canvas is not None
        if not pasted:
            canvas = mosaic_canvas(shape, self.pad_val, img.dtype, center, [piece[3] for piece in pieces], board)
        all_boxes, labels, flags, masks = [], [], [], []
        in_numpy = all(plain_boxes(piece[0]["gt_bboxes"]) for piece in pieces)
        for patch, scale_i, img_i, (x1_p, y1_p, x2_p, y2_p), (x1_c, y1_c, x2_c, y2_c) in pieces:
            if not pasted:
                paste(canvas[y1_p:y2_p, x1_p:x2_p], img_i[y1_c:y2_c, x1_c:x2_c])
            padw, padh = x1_p - x1_c, y1_p - y1_c
            if in_numpy:  # HorizontalBoxes' rescale_ and translate_, each one float32 operation, in numpy
                boxes = patch["gt_bboxes"].tensor.numpy() * np.float32(scale_i)
                boxes += np.array([padw, padh, padw, padh], dtype=np.float32)
            else:
                boxes = patch["gt_bboxes"].clone()
                boxes.rescale_([scale_i, scale_i])
                boxes.translate_([padw, padh])
            all_boxes.append(boxes)
            labels.append(patch["gt_bboxes_labels"])
            flags.append(patch["gt_ignore_flags"])
            if with_mask and patch.get("gt_masks", None) is not None:
                out_shape = (int(width * 2), int(height * 2))  # (w, h) where masks want (h, w): as mmdet does
                m = patch["gt_masks"].rescale(float(scale_i))
                m = m.translate(out_shape=out_shape, offset=padw, direction="horizontal")
                masks.append(m.translate(out_shape=out_shape, offset=padh, direction="vertical"))

        if in_numpy:
            boxes = np.concatenate(all_boxes, 0)
            if self.bbox_clip_border:
                clip_boxes(boxes, (2 * height, 2 * width))
            inside = boxes_inside(boxes, (2 * height, 2 * width))
            kept = HorizontalBoxes(torch.from_numpy(boxes[inside]), clone=False)
        else:
            boxes = all_boxes[0].cat(all_boxes, 0)
            if self.bbox_clip_border:
                boxes.clip_([2 * height, 2 * width])
            inside = boxes.is_inside([2 * height, 2 * width]).numpy()
            kept = boxes[inside]
        results["img"] = canvas
        results["img_shape"] = canvas.shape[:2]
        pad = uint8_pad(self.pad_val)
        if isinstance(canvas, np.ndarray) and is_color_uint8(canvas) and pad is not None:
            pasted_at = [piece[3] for piece in pieces if piece[3][0] < piece[3][2] and piece[3][1] < piece[3][3]]
            pad_outside.leave(canvas, outline(pasted_at), tuple(pad.tolist()), warp_reads_only=shown)
        results["gt_bboxes"] = kept
        results["gt_bboxes_labels"] = np.concatenate(labels, 0)[inside]
        results["gt_ignore_flags"] = np.concatenate(flags, 0)[inside]
        if with_mask:
            results["gt_masks"] = masks[0].cat(masks)[inside]
        return results


def outline(rects: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """The rectangle (x1, y1, x2, y2) around ``rects``; (0, 0, 0, 0) around none."""
    if not rects:
        return 0, 0, 0, 0
    return min(r[0] for r in rects), min(r[1] for r in rects), max(r[2] for r in rects), max(r[3] for r in rects)


def plain_boxes(boxes: Any) -> bool:
    """mmdet's ``HorizontalBoxes`` of float32 on the CPU: their arithmetic is redone in numpy, same bits."""
    return type(boxes) is HorizontalBoxes and boxes.tensor.dtype == torch.float32 and boxes.tensor.device.type == "cpu"


def clip_boxes(boxes: np.ndarray, img_shape: tuple[int, int]) -> None:
    """``HorizontalBoxes.clip_`` on an (N, 4) float32 array, in place."""
    np.clip(boxes[:, 0::2], 0, img_shape[1], out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, img_shape[0], out=boxes[:, 1::2])


def boxes_inside(boxes: np.ndarray, img_shape: tuple[int, int]) -> np.ndarray:
    """``HorizontalBoxes.is_inside`` (partly inside, no border) on an (N, 4) float32 array."""
    h, w = img_shape
    return (boxes[:, 0] < w) & (boxes[:, 1] < h) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)


def paste_inside(out: np.ndarray, top: int, left: int, pieces: Iterable[tuple], pad: Any = None) -> None:
    """Paste into ``out``, the part of a mosaic canvas whose top-left corner is at (``top``, ``left``),
    what falls inside it of each piece: ``(image, pasted (x1, y1, x2, y2), cut (x1, y1, x2, y2))``;
    with ``pad``, first fill the parts of ``out`` that no piece covers with it (as ``out[...] = pad``)."""
    bottom, right = top + out.shape[0], left + out.shape[1]
    pieces = list(pieces)
    if pad is not None:
        for x1, y1, x2, y2 in uncovered((left, top, right, bottom), [piece[1] for piece in pieces]):
            out[y1 - top : y2 - top, x1 - left : x2 - left] = pad
    for img, (px1, py1, px2, py2), (cx1, cy1, _, _) in pieces:
        x1, y1, x2, y2 = max(px1, left), max(py1, top), min(px2, right), min(py2, bottom)
        if x1 < x2 and y1 < y2:
            rows, cols = slice(cy1 + y1 - py1, cy1 + y2 - py1), slice(cx1 + x1 - px1, cx1 + x2 - px1)
            paste(out[y1 - top : y2 - top, x1 - left : x2 - left], img[rows, cols])


def paste(out: np.ndarray, img: np.ndarray) -> None:
    """``out[...] = img``, nothing where ``img`` is ``out`` (a mosaic piece decoded in its place)."""
    if out.__array_interface__["data"][0] == img.__array_interface__["data"][0] and out.strides == img.strides:
        IN_PLACE["pastes"] += 1
    else:
        out[...] = img


IN_PLACE = {"pastes": 0}  # pastes left out: the piece lay where it goes (yolox_fast.Board)


def uncovered(region: tuple[int, int, int, int], rects: Iterable[tuple]) -> list[tuple[int, int, int, int]]:
    """The part of ``region`` (x1, y1, x2, y2; ends excluded) that none of ``rects`` covers, as disjoint
    rectangles: the bands between the rectangles' top and bottom edges, each cut where rectangles span it."""
    x1, y1, x2, y2 = region
    inside = [(max(a, x1), max(b, y1), min(c, x2), min(d, y2)) for a, b, c, d in rects]
    inside = [r for r in inside if r[0] < r[2] and r[1] < r[3]]
    edges = sorted({y1, y2, *(r[1] for r in inside), *(r[3] for r in inside)})
    out = []
    for top, bottom in itertools.pairwise(edges):  # every rectangle spans a band whole or not at all
        left = x1
        for a, c in sorted((a, c) for a, b, c, d in inside if b <= top and d >= bottom):
            if a > left:
                out.append((left, top, a, bottom))
            left = max(left, c)
        if left < x2:
            out.append((left, top, x2, bottom))
    return out


def mosaic_canvas(
    shape: tuple[int, ...],
    pad_val: Any,
    dtype: Any,
    center: tuple[int, int],
    pastes: list,
    board: np.ndarray | None = None,
) -> np.ndarray:
    """mmdet's ``np.full(shape, pad_val)`` mosaic canvas, filled only where no image will be pasted
    (``board``, where given: a canvas some pieces were decoded into, in their places).

    The four images go into the four quadrants around ``center``, one each (``_mosaic_combine``);
    outside that arrangement (a centre off the canvas) the whole canvas is filled, as mmdet does
    (a new one: the board's pieces are pasted from it).
    """
    h, w = shape[:2]
    cx, cy = center
    quadrants = [(0, cy, 0, cx), (0, cy, cx, w), (cy, h, 0, cx), (cy, h, cx, w)]  # rows, columns
    inside = (
        0 <= cx <= w
        and 0 <= cy <= h
        and all(
            r0 <= y1 <= y2 <= r1 and c0 <= x1 <= x2 <= c1
            for (r0, r1, c0, c1), (x1, y1, x2, y2) in zip(quadrants, pastes, strict=True)
        )
    )
    if not inside:
        return np.full(shape, pad_val, dtype=dtype)
    canvas = np.empty(shape, dtype=dtype) if board is None else board
    for (r0, r1, c0, c1), (x1, y1, x2, y2) in zip(quadrants, pastes, strict=True):
        for top, bottom, left, right in ((r0, y1, c0, c1), (y2, r1, c0, c1), (y1, y2, c0, x1), (y1, y2, x2, c1)):
            if bottom > top and right > left:
                canvas[top:bottom, left:right] = pad_val
    return canvas


@TRANSFORMS.register_module(name="FastMosaic", force=True)
class FastMosaic(MosaicPixels, mmdet_transforms.Mosaic):
    """mmdet's ``Mosaic`` (module docstring)."""

    @autocast_box_type()
    def transform(self, results: dict) -> dict:
        if np.random.uniform(0, 1) > self.prob:
            return results
        assert "mix_results" in results
        return self._mosaic(results, results["mix_results"][:3], with_mask=False)


@TRANSFORMS.register_module(name="FastCachedMosaic", force=True)
class FastCachedMosaic(MosaicPixels, mmdet_transforms.CachedMosaic):
    """mmdet's ``CachedMosaic`` (module docstring)."""

    @autocast_box_type()
    def transform(self, results: dict) -> dict:
        push(self, results)
        if len(self.results_cache) <= 4:
            return results
        if np.random.uniform(0, 1) > self.prob:
            return results
        others = [self.results_cache[i] for i in self.get_indexes(self.results_cache)]
        return self._mosaic(results, others, with_mask="gt_masks" in results)


# ---------------------------------------------------------------------------------------------
# Colour


@TRANSFORMS.register_module(name="FastYOLOXHSVRandomAug", force=True)
class FastYOLOXHSVRandomAug(mmdet_transforms.YOLOXHSVRandomAug):
    """mmdet's ``YOLOXHSVRandomAug``: saturation and value shifted by OpenCV's saturating adds on the
    interleaved HSV image, the hue through a lookup table on its own plane, nothing for a zero gain.

    mmdet shifts all three channels in int16 arrays: ``clip(s + g, 0, 255)`` is OpenCV's saturating
    8-bit add of ``min(g, 255)`` for a gain above zero, its subtract of ``min(-g, 255)`` for one below
    (every level, every gain: ``tests/test_fast_transforms.py``), and ``(h + g) % 180`` a table of 256
    levels (so are saturation and value where a gain beyond ``NO_WRAP`` wraps mmdet's sum). A zero gain
    (half of them: mmdet multiplies the gains by ``randint(0, 2)``) changes nothing: OpenCV's 8-bit hue
    is at most 179, so ``h % 180`` is ``h``; ``clip(s + 0)`` is ``s``. The HSV round trip itself stays,
    as it changes the image.
    """

    LEVELS = np.arange(256, dtype=np.int16)
    NO_WRAP = 32767 - 255  # larger gains wrap around in mmdet's int16 sums: then tables, as for the hue

    def transform(self, results: dict) -> dict:
        img = results["img"]
        if not is_color_uint8(img):
            return super().transform(results)
        gains = self._get_hsv_gains()
        region = converted_region(img)
        if region is None:
            self._shift(img, gains)
        else:  # one colour outside the region (pad_outside): that colour's row shifted once, copied there
            y1, y2, x1, x2 = region
            row = np.empty((1, *img.shape[1:]), dtype=np.uint8)
            row[:] = pad_outside.note_for(img).value
            self._shift(row, gains)
            if y1 < y2 and x1 < x2:
                self._shift(img[y1:y2, x1:x2], gains)
            pad_outside.fill_outside(img, region, row)
            pad_outside.SKIPPED["hsv_pixels"] += img.shape[0] * img.shape[1] - (y2 - y1) * (x2 - x1)
        results["img"] = img
        return results

    def _shift(self, img: np.ndarray, gains: np.ndarray) -> None:
        """mmdet's HSV round trip and shifts on ``img`` (a view: rows of contiguous pixels), in place."""
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hue, *shifts = gains.tolist()  # Python ints: numpy's calls on three numbers cost more than the adds
        if max(abs(shift) for shift in shifts) > self.NO_WRAP:
            tabled = [channel for channel, gain in enumerate((hue, *shifts)) if gain]
        else:  # 8-bit scalars: OpenCV's vector path (others are 100x slower)
            up, down = [min(max(v, 0), 255) for v in shifts], [min(max(-v, 0), 255) for v in shifts]
            if any(up):
                cv2.add(hsv, (0, *up, 0), dst=hsv)
            if any(down):
                cv2.subtract(hsv, (0, *down, 0), dst=hsv)
            tabled = [0] if hue else []
        for channel in tabled:
            self._shift_by_table(hsv, channel, gains[channel])
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)  # in place, as mmdet's
        if out.ctypes.data != img.ctypes.data:  # (OpenCV's binding made its own array)
            img[...] = out

    def _shift_by_table(self, hsv: np.ndarray, channel: int, gain: np.int16) -> None:
        """mmdet's shift of one channel, ``(x + gain) % 180`` for the hue, else clipped, through a table."""
        shifted = self.LEVELS + gain  # int16, wrapping where mmdet's int16 sum wraps
        plane = cv2.extractChannel(hsv, channel)
        cv2.LUT(plane, (shifted % 180 if channel == 0 else np.clip(shifted, 0, 255)).astype(np.uint8), dst=plane)
        cv2.insertChannel(plane, hsv, channel)


def converted_region(img: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y1, y2, x1, x2): the part of ``img`` that YOLOXHSVRandomAug converts, where a note handed to it
    (:mod:`pad_outside`) says that the image is one colour outside a rectangle; None: all of it."""
    note = pad_outside.note_for(img)
    if note is None or note.warp_reads_only or not img.flags.c_contiguous:
        return None
    x1, y1, x2, y2 = note.rect
    columns = pad_outside.converted_columns(x1, x2, img.shape[1]) if x1 < x2 and y1 < y2 else (0, 0)
    x1, x2 = columns or (0, img.shape[1])  # whole rows where OpenCV's run is not known
    return y1, y2, x1, x2


# ---------------------------------------------------------------------------------------------
# Bitmap masks (Mask R-CNN's LoadAnnotations turns polygons into them)

FLIP_CODES = {"horizontal": 1, "vertical": 0, "diagonal": -1}
OPENCV_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64))


def bitmap_masks(masks: np.ndarray, height: int, width: int) -> BitmapMasks:
    """``BitmapMasks(masks, height, width)`` without the copy its ``__init__`` makes (``np.stack``)."""
    out = BitmapMasks.__new__(BitmapMasks)
    out.masks, out.height, out.width = masks, height, width
    return out


def plain_bitmaps(masks: Any) -> bool:
    return type(masks) is BitmapMasks and len(masks.masks) > 0 and mmcv.image.geometric.imread_backend == "cv2"


def rescaled_bitmaps(masks: BitmapMasks, scale: Any) -> BitmapMasks:
    """``masks.rescale(scale)``: the same OpenCV nearest resize of each mask, into one array (uint8
    masks by their nonzero boxes only, see ``mask_fast``)."""
    new_w, new_h = mmcv.rescale_size((masks.width, masks.height), scale)
    sparse = mask_fast.rescaled(masks.masks, (masks.height, masks.width), (new_h, new_w))
    if sparse is not None:
        return bitmap_masks(sparse, new_h, new_w)
    out = np.empty((len(masks.masks), new_h, new_w), dtype=masks.masks.dtype)
    for mask, dst in zip(masks.masks, out, strict=True):
        cv2.resize(mask, (new_w, new_h), dst=dst, interpolation=cv2.INTER_NEAREST)
    return bitmap_masks(out, new_h, new_w)


def flipped_bitmaps(masks: BitmapMasks, direction: str) -> BitmapMasks:
    """``masks.flip(direction)``, each mask mirrored by OpenCV into one array (uint8 masks by their
    nonzero boxes only, see ``mask_fast``)."""
    sparse = mask_fast.flipped(masks.masks, (masks.height, masks.width), FLIP_CODES[direction])
    if sparse is not None:
        return bitmap_masks(sparse, masks.height, masks.width)
    out = np.empty_like(masks.masks, order="C")
    for mask, dst in zip(masks.masks, out, strict=True):
        cv2.flip(mask, FLIP_CODES[direction], dst=dst)
    return bitmap_masks(out, masks.height, masks.width)


@TRANSFORMS.register_module(name="FastResize", force=True)
class FastResize(mmdet_transforms.Resize):
    """mmdet's ``Resize``; a mirrored image copied back first (see ``FastPad``), bitmap masks rescaled
    without the two copies ``BitmapMasks.rescale`` makes, float32 boxes rescaled and clipped in numpy."""

    def _resize_img(self, results: dict) -> None:
        img = results.get("img", None)
        if img is not None:
            results["img"] = img = unmirrored(img)
            if self.keep_ratio and self.backend == "cv2" and is_color_uint8(img) and at_size(img, results["scale"]):
                # YOLOX's 640x640 after RandomAffine: OpenCV would return a copy, the same values
                results.update(img_shape=img.shape[:2], scale_factor=(1.0, 1.0), keep_ratio=True)
                return
        super()._resize_img(results)

    def _resize_bboxes(self, results: dict) -> None:
        boxes = results.get("gt_bboxes", None)
        if not (plain_boxes(boxes) and boxes.tensor.dim() == 2):
            return super()._resize_bboxes(results)
        # HorizontalBoxes.rescale_ (a new product by the float32 factors) and clip_, in numpy; the same object
        scaled = boxes.tensor.numpy() * np.tile(np.array(results["scale_factor"], dtype=np.float32), 2)
        if self.clip_object_border:
            clip_boxes(scaled, results["img_shape"])
        boxes.tensor = torch.from_numpy(scaled)
        return None

    def _resize_masks(self, results: dict) -> None:
        masks = results.get("gt_masks", None)
        if self.keep_ratio and plain_bitmaps(masks):
            results["gt_masks"] = rescaled_bitmaps(masks, results["scale"])
        else:
            super()._resize_masks(results)


def at_size(img: np.ndarray, scale: Any) -> bool:
    """Whether ``mmcv.imrescale(img, scale)`` keeps ``img``'s size."""
    return tuple(mmcv.rescale_size(img.shape[1::-1], scale)) == img.shape[1::-1]


@TRANSFORMS.register_module(name="FastRandomFlip", force=True)
class FastRandomFlip(mmdet_transforms.RandomFlip):
    """mmdet's ``RandomFlip``; bitmap masks mirrored without the two copies ``BitmapMasks.flip`` makes."""

    @autocast_box_type()
    def _flip(self, results: dict) -> None:
        masks = results.get("gt_masks", None)
        if not (plain_bitmaps(masks) and results["flip_direction"] in FLIP_CODES):
            return super()._flip(results)
        results["gt_masks"] = None  # mmdet's _flip leaves None alone; the key keeps its place
        super()._flip(results)
        results["gt_masks"] = flipped_bitmaps(masks, results["flip_direction"])


# ---------------------------------------------------------------------------------------------
# Padding


@TRANSFORMS.register_module(name="FastPad", force=True)
class FastPad(mmdet_transforms.Pad):
    """mmdet's ``Pad``, on a mirrored image (``RandomFlip`` leaves a reversed view) copied back by OpenCV
    first, and an image already of the padded size kept as it is (OpenCV would copy it).

    OpenCV cannot read reversed numpy views, so its Python binding copies them through numpy's slow
    strided copy before every call: 5 ms for a 640x640 image, against 0.1 ms for ``cv2.flip``.
    """

    def _pad_img(self, results: dict) -> None:
        img = results["img"] = unmirrored(results["img"])
        if not (is_color_uint8(img) and img.flags.c_contiguous and self._padded_size(img) == img.shape[:2]):
            return super()._pad_img(results)
        results["pad_shape"] = img.shape  # the keys mmcv's Pad._pad_img sets, with the image's own size
        results["pad_fixed_size"] = self.size
        results["pad_size_divisor"] = self.size_divisor
        results["img_shape"] = img.shape[:2]

    def _padded_size(self, img: np.ndarray) -> tuple[int, int] | None:
        """(height, width) mmcv's ``Pad._pad_img`` pads ``img`` to."""
        size = (max(img.shape[:2]),) * 2 if self.pad_to_square else None
        if self.size_divisor is not None:
            h, w = size or img.shape[:2]
            return (-(-h // self.size_divisor) * self.size_divisor, -(-w // self.size_divisor) * self.size_divisor)
        return tuple(self.size[::-1]) if self.size is not None else size


# ---------------------------------------------------------------------------------------------
# Packing


@TRANSFORMS.register_module(name="FastPackDetInputs", force=True)
class FastPackDetInputs(mmdet_formatting.PackDetInputs):
    """mmdet's ``PackDetInputs``: the image made channels-first by OpenCV (torch's permute copies slowly)."""

    def transform(self, results: dict) -> dict:
        img = results.get("img")
        plain = isinstance(img, np.ndarray) and img.ndim == 3 and 1 <= img.shape[2] <= 4
        if not (plain and img.dtype in (np.uint8, np.float32) and "img" not in self.meta_keys):
            return super().transform(results)
        rest = {k: v for k, v in results.items() if k != "img"}
        if "gt_ignore_flags" in rest and plain_bitmaps(rest.get("gt_masks")):
            rest["gt_masks"] = IndexedOnce(rest["gt_masks"])  # mmdet only indexes them (valid / ignored)
        packed = super().transform(rest)
        return {"inputs": torch.from_numpy(channels_first(img)), **packed}


def channels_first(img: np.ndarray) -> np.ndarray:
    """``np.stack(cv2.split(img))``, OpenCV splitting the channels straight into the (c, h, w) array. A
    mirrored view (``RandomFlip``'s) is split from the array it views and each plane mirrored back in
    place: no mirrored copy of the whole image (one large block less to allocate and free a sample)."""
    code, view = mirrored_view(img)
    if code is None:
        view = unmirrored(img)
    out = np.empty((view.shape[2], *view.shape[:2]), dtype=view.dtype)
    planes = cv2.split(view, list(out))
    if not all(p.ctypes.data == o.ctypes.data for p, o in zip(planes, out, strict=True)):
        return np.stack(planes if code is None else [cv2.flip(p, code) for p in planes])  # (OpenCV made its own)
    for plane in out if code is not None else ():
        cv2.flip(plane, code, dst=plane)  # in place: OpenCV swaps mirrored pairs
    return out


def mirrored_view(img: Any) -> tuple[int | None, Any]:
    """For a mirrored view of an array (as ``mmcv.imflip`` returns) that OpenCV can take un-mirrored:
    ``cv2.flip``'s code and the view with positive strides; else (None, None)."""
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0:
        return None, None
    code = {(True, False): 0, (False, True): 1, (True, True): -1}.get((img.strides[0] < 0, img.strides[1] < 0))
    if code is None or img.dtype not in OPENCV_DTYPES or (img.ndim == 3 and (img.strides[2] < 0 or img.shape[2] < 3)):
        return None, None  # (OpenCV returns one channel without its axis; numpy's copy then)
    return code, img[:: -1 if code in (0, -1) else 1, :: -1 if code in (1, -1) else 1]


def unmirrored(img: Any) -> Any:
    """``img`` with positive strides: a mirrored view (as ``mmcv.imflip`` returns) copied back by OpenCV."""
    code, view = mirrored_view(img)
    return img if code is None else cv2.flip(view, code)


class IndexedOnce(BitmapMasks):
    """Bitmap masks whose ``masks[index]`` is a plain ``BitmapMasks`` holding one copy (mmdet's holds two),
    or none when the index takes every mask in order (the sample is packed: nothing else reads them)."""

    def __init__(self, masks: BitmapMasks) -> None:
        self.masks, self.height, self.width = masks.masks, masks.height, masks.width

    def __getitem__(self, index) -> BitmapMasks:
        n = len(self.masks)
        every = isinstance(index, np.ndarray) and index.shape == (n,) and np.array_equal(index, np.arange(n))
        if every and self.masks.flags.c_contiguous:
            return bitmap_masks(self.masks, self.height, self.width)
        return bitmap_masks(self.masks[index].reshape(-1, self.height, self.width), self.height, self.width)


@TRANSFORMS.register_module(name="FastFilterAnnotations", force=True)
class FastFilterAnnotations(mmdet_loading.FilterAnnotations):
    """mmdet's ``FilterAnnotations`` by box size: float32 ``HorizontalBoxes``' widths and heights
    (one float32 subtraction each, as torch makes them) compared and kept in numpy, without mmdet's box
    objects in between. Filtering by mask area, or other boxes, go through mmdet's code."""

    def transform(self, results: dict) -> dict | None:
        boxes = results.get("gt_bboxes")
        if self.by_mask or not self.by_box or not (plain_boxes(boxes) and boxes.tensor.dim() == 2):
            return super().transform(results)
        array = boxes.tensor.numpy()
        if array.shape[0] == 0:
            return results
        min_w, min_h = self.min_gt_bbox_wh
        keep = ((array[:, 2] - array[:, 0]) > min_w) & ((array[:, 3] - array[:, 1]) > min_h)
        if not keep.any() and self.keep_empty:
            return None
        results["gt_bboxes"] = HorizontalBoxes(torch.from_numpy(array[keep]), clone=False)
        for key in ("gt_bboxes_labels", "gt_masks", "gt_ignore_flags"):
            if key in results:
                results[key] = results[key][keep]
        return results


# ---------------------------------------------------------------------------------------------
# The mixing dataset wrapper


class FastMultiImageMixDataset(MultiImageMixDataset):
    """mmdet's ``MultiImageMixDataset``, without copies nothing can tell from the originals.

    mmdet deep-copies every sample it loads (the one to transform and the others to mix in, with
    ``instances`` and every polygon) and the whole sample again before every transform, so that a
    transform that gives up (returns None) is retried on the sample as it was. Here a sample that
    mmengine's own ``BaseDataset`` has just made from its annotations is used as it is (nothing else
    holds it), and the copy before a transform is made (by :func:`copy_value`, the same values) only
    for transforms that can give up: not for those of :data:`NEVER_NONE`, whose results replace
    the sample they were given, and only of the dict for those of :data:`GIVES_UP_FIRST`.
    """

    def __getitem__(self, idx):
        take = (lambda sample: sample) if fresh_samples(self.dataset) else copy_value
        results = yolox_fast.first_sample(self, idx, take)  # a mosaic's first piece: only the part read
        note = None
        for transform, transform_type in zip(self.pipeline, self.pipeline_types, strict=True):
            if self._skip_type_keys is not None and transform_type in self._skip_type_keys:
                continue
            if hasattr(transform, "get_indexes"):
                for _ in range(self.max_refetch):
                    indexes = transform.get_indexes(self.dataset)
                    if not isinstance(indexes, collections.abc.Sequence):
                        indexes = [indexes]
                    mix_results = yolox_fast.partners(self, transform, indexes, take)  # only the parts read
                    if None not in mix_results:
                        results["mix_results"] = mix_results
                        break
                else:
                    raise RuntimeError(f"{transform_type}: the inner dataset's pipeline returned None every time")
            kind = type(transform)
            given = (lambda r: r) if kind in NEVER_NONE else dict if kind in GIVES_UP_FIRST else copy_value
            for _ in range(self.max_refetch):
                pad_outside.hand_over(note)
                try:
                    updated = transform(given(results))
                finally:
                    note = pad_outside.taken()  # what it knows of its image's pad, for the next transform only
                if updated is not None:
                    results = updated
                    break
            else:
                raise RuntimeError(f"{transform_type} returned None every time ({self.max_refetch} tries)")
            results.pop("mix_results", None)
        return results


def fresh_samples(dataset) -> bool:
    """Whether ``dataset[i]`` is a new dict of new objects each time: mmengine's ``BaseDataset`` reading
    (a copy of) its annotations and only loading (see :func:`loaded_box_counts`)."""
    from mmengine.dataset import BaseDataset

    kind = type(dataset)
    same = all(
        getattr(kind, m, None) is getattr(BaseDataset, m) for m in ("__getitem__", "prepare_data", "get_data_info")
    )
    return same and loaded_box_counts(dataset) is not None


# ---------------------------------------------------------------------------------------------
# Swapping them in


FAST: dict[type, type] = {
    mmdet_transforms.MixUp: FastMixUp,
    mmdet_transforms.CachedMixUp: FastCachedMixUp,
    mmdet_transforms.Mosaic: FastMosaic,
    mmdet_transforms.CachedMosaic: FastCachedMosaic,
    mmdet_transforms.YOLOXHSVRandomAug: FastYOLOXHSVRandomAug,
    mmdet_formatting.PackDetInputs: FastPackDetInputs,
    mmdet_transforms.Resize: FastResize,
    mmdet_transforms.RandomFlip: FastRandomFlip,
    mmdet_transforms.Pad: FastPad,
    mmdet_loading.FilterAnnotations: FastFilterAnnotations,
}
FAST_DATASETS: dict[type, type] = {MultiImageMixDataset: FastMultiImageMixDataset}
# Transforms that always return their results (never None, so never retried by the wrapper).
NEVER_NONE = set(
    {
        *FAST.values(),
        mmdet_transforms.RandomAffine,
        mmdet_transforms.Mosaic,
        mmdet_transforms.MixUp,
        mmdet_transforms.YOLOXHSVRandomAug,
        mmdet_transforms.RandomFlip,
        mmdet_transforms.Resize,
        mmdet_transforms.Pad,
        mmdet_formatting.PackDetInputs,
    }
)
# Transforms that give up (return None) before changing anything and otherwise only assign keys of the
# sample they are given: a new dict of the same values keeps the sample as it was for a retry.
GIVES_UP_FIRST = {mmdet_loading.FilterAnnotations, FastFilterAnnotations}
FAST_BY_NAME = {cls.__name__: fast for cls, fast in FAST.items()}
# Fusers of neighbouring transforms, run after ``swap`` (given the dataset) and ``swap_pipeline`` (given
# the config list, returning it); the modules imported at the end add theirs.
LINKS: list[Any] = []
CONFIG_LINKS: list[Any] = []


def register(mmdet_cls: type, fast_cls: type, never_none: bool = True) -> None:
    """Add a fast transform kept in a module of its own (see the imports at the end of this file)."""
    FAST[mmdet_cls] = fast_cls
    FAST_BY_NAME[mmdet_cls.__name__] = fast_cls
    if never_none:
        NEVER_NONE.update({mmdet_cls, fast_cls})


def swap(dataset: Any, enabled: bool) -> list[str]:
    """Turn the mmdet transforms of a built dataset (and its wrapped datasets) into the fast ones.

    Only objects of exactly mmdet's classes change (a user's subclass keeps its own code); a
    ``MultiImageMixDataset`` becomes :class:`FastMultiImageMixDataset`. Returns the new class names.
    """
    if not check_enabled(enabled):
        return []
    swapped = []
    for node in [dataset, *_transforms_of(dataset, include_datasets=True)]:
        fast = FAST.get(type(node)) or FAST_DATASETS.get(type(node))
        if fast is not None:
            node.__class__ = fast
            swapped.append(fast.__name__)
    for link in LINKS:
        link(dataset)
    return swapped


def swap_pipeline(pipeline: Iterable[Any]) -> list[Any]:
    """A pipeline config (list of dicts) with mmdet's types replaced by the fast classes."""
    out = []
    for cfg in pipeline:
        kind = cfg.get("type") if isinstance(cfg, dict) else None
        name = kind.split(".")[-1] if isinstance(kind, str) else None
        out.append({**cfg, "type": FAST_BY_NAME[name]} if name in FAST_BY_NAME else cfg)
    for link in CONFIG_LINKS:
        out = link(out)
    return out


def swap_hooks(hooks: Iterable[Any], enabled: bool) -> None:
    """Pipelines that hooks build later (``PipelineSwitchHook.switch_pipeline``) get the fast types too."""
    if not check_enabled(enabled):
        return
    for hook in hooks:
        hook = hook[-1] if isinstance(hook, tuple) else hook
        if isinstance(getattr(hook, "switch_pipeline", None), (list, tuple)):
            hook.switch_pipeline = swap_pipeline(hook.switch_pipeline)


def _transforms_of(node: Any, seen: set[int] | None = None, include_datasets: bool = False) -> Iterator[Any]:
    """Every transform object reachable from a dataset: its pipeline, wrapped datasets, nested transforms."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    for attr in ("pipeline", "transforms"):
        value = getattr(node, attr, None)
        if isinstance(value, (list, tuple)):
            for t in value:
                yield t
                yield from _transforms_of(t, seen, include_datasets)
        elif value is not None and not isinstance(value, (str, dict)):
            yield from _transforms_of(value, seen, include_datasets)
    for attr in ("dataset", "datasets"):
        value = getattr(node, attr, None)
        for child in value if isinstance(value, (list, tuple)) else [value] if value is not None else []:
            if include_datasets:
                yield child
            yield from _transforms_of(child, seen, include_datasets)


# Modules with more fast transforms call ``register`` when imported; they come last because they
# use the helpers above.
from det_mmdet import crop_resize  # noqa: E402,F401,I001  (one line per module: each added on its own)
from det_mmdet import yolox_fast  # noqa: E402,F401,I001
from det_mmdet import mask_fast  # noqa: E402,F401,I001
