"""det_mmdet.fast_transforms against mmdet 3.3.0's transforms: same inputs and random state, same outputs.

Every comparison runs mmdet's transform and ours from one seed (``random`` and ``numpy.random``) on
equal copies of one input, and asserts the outputs equal bit for bit (pixels, boxes, labels, flags,
masks, shapes) and that both consumed the same random draws.
"""

from __future__ import annotations

import copy
import json
import random

import cv2
import numpy as np
import pytest
import torch
from mmdet.datasets.transforms import transforms as T
from mmdet.structures.bbox import BaseBoxes, HorizontalBoxes
from mmdet.structures.mask import BitmapMasks, PolygonMasks
from mmengine.registry import init_default_scope

from det_mmdet import fast_transforms as F
from det_mmdet.data import build_dataset
from det_mmdet.errors import UserError
from det_mmdet.shapes import make_split

SEEDS = range(40)


# ---- inputs ----------------------------------------------------------------------------------


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour gradients plus noise and a few sharp rectangles: every resample path has work."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * rng.uniform(0.5, 3) + yy * rng.uniform(0.5, 3) + rng.uniform(0, 255)) % 256] * 3, -1)
    img = np.clip(base * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        img[y0 : y0 + rng.integers(2, h // 2), x0 : x0 + rng.integers(2, w // 2)] = rng.integers(0, 256, 3)
    return img


def sample(rng: np.random.Generator, h: int, w: int, n: int, masks: str | None = None, numpy_boxes=False) -> dict:
    """A loaded sample: image, boxes (some crowd / ignored), labels, and optionally masks."""
    x1, y1 = rng.uniform(0, w - 4, n), rng.uniform(0, h - 4, n)
    x2, y2 = np.minimum(x1 + rng.uniform(2, w / 2, n), w), np.minimum(y1 + rng.uniform(2, h / 2, n), h)
    boxes = np.stack([x1, y1, x2, y2], 1).astype(np.float32).reshape(-1, 4)
    out = {
        "img": photo(rng, h, w),
        "img_shape": (h, w),
        "ori_shape": (h, w),
        "img_path": f"img_{rng.integers(1 << 30)}.jpg",
        "gt_bboxes": boxes if numpy_boxes else HorizontalBoxes(boxes),
        "gt_bboxes_labels": rng.integers(0, 5, n).astype(np.int64),
        "gt_ignore_flags": rng.random(n) < 0.2,
    }
    out["instances"] = [
        {"bbox": [float(v) for v in box], "bbox_label": int(label), "ignore_flag": int(flag), "mask": [[1.0, 2.0]]}
        for box, label, flag in zip(boxes, out["gt_bboxes_labels"], out["gt_ignore_flags"], strict=True)
    ]
    if masks == "bitmap":
        bits = np.zeros((n, h, w), dtype=np.uint8)
        for i, (a, b, c, d) in enumerate(boxes.astype(int)):
            bits[i, b:d, a:c] = 1
        out["gt_masks"] = BitmapMasks(bits, h, w)
    elif masks == "polygon":
        polys = [[np.array([a, b, c, b, c, d, a, d], dtype=np.float64)] for a, b, c, d in boxes]
        out["gt_masks"] = PolygonMasks(polys, h, w)
    return out


# ---- comparison ------------------------------------------------------------------------------


# The pixels of MixUp's jitter resize (float32 on the part the crop keeps, against mmdet's float64
# through Intel IPP): at most this many levels apart on at most this share of the values.
MIXUP_LEVELS, MIXUP_SHARE = 1, 0.005
PIXEL_KEYS = ("['img']", "['inputs']")
# A whole pipeline's images after MixUp: YOLOXHSVRandomAug can widen a one-level difference (a near-grey
# pixel's hue moves), and into the pixel's other channels, but no other pixel differs.
AFTER_MIXUP = (255, 3 * MIXUP_SHARE)


def assert_same(a, b, where="results", pixels: tuple[int, float] | None = None):
    """Equal bit for bit; with ``pixels=(levels, share)`` images (``img``, ``inputs``) may differ by at
    most ``levels`` on at most ``share`` of their values (MixUp's jitter resize, see MIXUP_LEVELS)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]", pixels)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]", pixels)
    elif isinstance(a, (np.ndarray, torch.Tensor)) and pixels is not None and where.endswith(PIXEL_KEYS):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        apart = np.abs(a.astype(np.int64) - b.astype(np.int64))
        assert apart.max(initial=0) <= pixels[0], f"{where}: {apart.max()} levels apart"
        assert np.count_nonzero(apart) <= pixels[1] * max(a.size, 1), f"{where}: {np.count_nonzero(apart)} differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert np.array_equal(a, b), f"{where}: {np.count_nonzero(a != b)} values differ"
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, BaseBoxes):
        assert_same(a.tensor, b.tensor, f"{where}.tensor")
    elif isinstance(a, BitmapMasks):
        assert (a.height, a.width) == (b.height, b.width), where
        assert_same(a.masks, b.masks, f"{where}.masks")
    elif isinstance(a, PolygonMasks):
        assert (a.height, a.width) == (b.height, b.width), where
        assert_same(a.masks, b.masks, f"{where}.masks")
    elif hasattr(a, "to_dict") and hasattr(a, "all_items"):  # InstanceData / DetDataSample
        assert_same(dict(a.all_items()), dict(b.all_items()), where, pixels)
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def read_back(cached: dict) -> dict:
    """What the cached transforms read of a cached sample (all that ours cache)."""
    return {k: v for k, v in cached.items() if k in F.CACHED_KEYS}


def seeded(seed: int, fn, *args):
    random.seed(seed)
    np.random.seed(seed)
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001  (mmdet failing, e.g. OpenCV refusing an int64 canvas, must fail ours too)
        out = f"raised {type(e).__name__}"
    return out, (random.random(), np.random.random())  # equal only if both drew the same numbers


def compare(slow, fast, inputs: dict, seed: int, pixels: tuple[int, float] | None = None):
    a, draws_a = seeded(seed, slow, copy.deepcopy(inputs))
    b, draws_b = seeded(seed, fast, copy.deepcopy(inputs))
    assert_same(a, b, pixels=pixels)
    assert draws_a == draws_b, "a different number of random draws"
    return a


def pair(slow_cls, fast_cls, **params):
    slow, fast = slow_cls(**params), fast_cls(**params)
    assert type(fast).__mro__[1:].count(slow_cls) == 1 and repr(slow).split("(", 1)[1] == repr(fast).split("(", 1)[1]
    return slow, fast


# ---- MixUp / CachedMixUp ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        dict(img_scale=(64, 48), ratio_range=(0.5, 1.5), pad_val=114.0),
        dict(img_scale=(48, 64), ratio_range=(0.8, 1.6), pad_val=(114, 100, 90), flip_ratio=0.0),
        dict(img_scale=(64, 64), ratio_range=(1.0, 1.0), pad_val=0, bbox_clip_border=False, flip_ratio=1.0),
        dict(img_scale=(64, 48), ratio_range=(0.5, 1.5), pad_val=114.5),  # not a whole number: mmdet's code runs
    ],
)
def test_mixup_equals_mmdet(params):
    slow, fast = pair(T.MixUp, F.FastMixUp, **params)
    rng, mixed = np.random.default_rng(0), 0
    for seed in SEEDS:
        h, w = (int(v) for v in rng.integers(20, 90, 2))
        results = sample(rng, h, w, int(rng.integers(0, 5)), numpy_boxes=seed % 3 == 0)
        other = sample(rng, *(int(v) for v in rng.integers(20, 90, 2)), int(rng.integers(0, 4)))
        results["mix_results"] = [other]
        # a float pad value makes mmdet's canvas float64: its jitter resize is within MIXUP_LEVELS
        bounded = (MIXUP_LEVELS, MIXUP_SHARE) if isinstance(params["pad_val"], float) else None
        mixed += isinstance(compare(slow, fast, results, seed, bounded), dict)
    # with a 3-value pad_val mmdet's canvas is int64, which OpenCV will not resize: both fail alike
    assert mixed == len(SEEDS) or isinstance(params["pad_val"], tuple)


@pytest.mark.parametrize("masks", [None, "bitmap", "polygon"])
@pytest.mark.parametrize(
    "params",
    [
        dict(img_scale=(64, 64), ratio_range=(1.0, 1.0), max_cached_images=4, pad_val=(114, 114, 114)),
        dict(img_scale=(64, 48), ratio_range=(0.5, 1.5), max_cached_images=3, random_pop=False, prob=0.7),
        dict(img_scale=(64, 48), ratio_range=(0.5, 1.5), max_cached_images=5, float_images=True),  # mmdet's code
    ],
)
def test_cached_mixup_equals_mmdet(params, masks):
    params = dict(params)
    floats = params.pop("float_images", False)
    slow, fast = pair(T.CachedMixUp, F.FastCachedMixUp, **params)
    rng = np.random.default_rng(1)
    for seed in SEEDS:
        h, w = (int(v) for v in rng.integers(24, 80, 2))
        results = sample(rng, h, w, int(rng.integers(0, 4)), masks)
        if floats and seed % 2:
            results["img"] = results["img"].astype(np.float32)
        bounded = (MIXUP_LEVELS, MIXUP_SHARE) if isinstance(params.get("pad_val", 114.0), float) else None
        compare(slow, fast, results, seed, bounded)
        assert_same([read_back(r) for r in slow.results_cache], [read_back(r) for r in fast.results_cache], "cache")


def test_mixup_blend_is_the_uint8_half_sum():
    a, b = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    expected = (0.5 * a.astype(np.float32) + 0.5 * b.astype(np.float32)).astype(np.uint8)
    assert np.array_equal(F.half_sum(a, b), expected)


def test_mixup_skips_decoding_only_for_a_loading_pipeline(tiny_coco):
    """get_indexes reads box counts from the annotations, and falls back to decoding otherwise."""
    init_default_scope("mmdet")
    loads = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)]
    ds = build_dataset(coco_cfg(tiny_coco, loads), "d", {"fast_transforms": False})
    counts = F.loaded_box_counts(ds)
    assert counts is not None
    assert [counts(i) for i in range(len(ds))] == [len(ds[i]["gt_bboxes"]) for i in range(len(ds))]
    assert 0 in [counts(i) for i in range(len(ds))]  # the empty image is there, and MixUp skips it
    slow, fast = pair(T.MixUp, F.FastMixUp, max_iters=15)
    for seed in SEEDS:
        assert seeded(seed, slow.get_indexes, ds) == seeded(seed, fast.get_indexes, ds)
    flips = build_dataset(
        coco_cfg(tiny_coco, [*loads, dict(type="RandomFlip", prob=0.5)]), "d", {"fast_transforms": False}
    )
    assert F.loaded_box_counts(flips) is None


# ---- Mosaic / CachedMosaic -------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        dict(img_scale=(64, 48)),
        dict(img_scale=(48, 48), prob=0.6, center_ratio_range=(0.8, 1.2)),
        dict(img_scale=(32, 40), center_ratio_range=(0.0, 2.2), pad_val=(10, 20, 30)),  # centres off the canvas
    ],
)
def test_mosaic_equals_mmdet(params):
    slow, fast = pair(T.Mosaic, F.FastMosaic, **params)
    rng = np.random.default_rng(2)
    for seed in SEEDS:
        shapes = [(64, 48) if i % 2 else tuple(int(v) for v in rng.integers(20, 100, 2)) for i in range(4)]
        results = sample(rng, *shapes[0], int(rng.integers(0, 4)), numpy_boxes=seed % 4 == 0)
        results["mix_results"] = [sample(rng, h, w, int(rng.integers(0, 4))) for h, w in shapes[1:]]
        compare(slow, fast, results, seed)


@pytest.mark.parametrize("masks", [None, "bitmap", "polygon"])
@pytest.mark.parametrize(
    "params",
    [
        dict(img_scale=(64, 48), max_cached_images=6, pad_val=114.0),
        dict(img_scale=(40, 40), max_cached_images=5, random_pop=False, prob=0.6, bbox_clip_border=False),
    ],
)
def test_cached_mosaic_equals_mmdet(params, masks):
    slow, fast = pair(T.CachedMosaic, F.FastCachedMosaic, **params)
    rng = np.random.default_rng(3)
    for seed in SEEDS:
        h, w = (48, 64) if seed % 3 == 0 else tuple(int(v) for v in rng.integers(20, 90, 2))
        compare(slow, fast, sample(rng, h, w, int(rng.integers(0, 4)), masks), seed)
        assert_same([read_back(r) for r in slow.results_cache], [read_back(r) for r in fast.results_cache], "cache")


# ---- YOLOXHSVRandomAug -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [dict(), dict(hue_delta=90, saturation_delta=200, value_delta=200), dict(hue_delta=400, saturation_delta=600)],
)
def test_hsv_equals_mmdet(params):
    slow, fast = pair(T.YOLOXHSVRandomAug, F.FastYOLOXHSVRandomAug, **params)
    rng = np.random.default_rng(4)
    for seed in SEEDS:
        results = sample(rng, 32, 40, 2)
        if seed % 5 == 0:  # a cropped view, as RandomCrop leaves it: changed in place by both
            results["img"] = photo(rng, 50, 60)[3:35, 5:45]
        compare(slow, fast, results, seed)


def every_colour() -> np.ndarray:
    """A 4096x4096 BGR image holding each of the 2**24 8-bit colours once."""
    colours = np.arange(1 << 24, dtype=np.uint32)
    return np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)


def test_hsv_equals_mmdet_on_every_colour():
    """Every colour through mmdet's int16 shifts and ours, for draws that shift all three channels
    (hue both ways, saturation and value up and down)."""
    slow, fast = pair(T.YOLOXHSVRandomAug, F.FastYOLOXHSVRandomAug, hue_delta=5, saturation_delta=30, value_delta=30)
    img, signs = every_colour(), set()
    for seed in range(200):
        np.random.seed(seed)
        gains = slow._get_hsv_gains()
        if gains.all() and tuple(np.sign(gains)) not in signs:
            signs.add(tuple(np.sign(gains)))
            compare(slow, fast, {"img": img}, seed)
    assert len(signs) >= 4, signs


def test_hsv_shifts_are_mmdets_clip_for_every_level_and_gain():
    """Saturation and value: ``clip(x + g, 0, 255)`` for every level and int16 gain, whichever sign each has."""
    fast = F.FastYOLOXHSVRandomAug()
    sat, val = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    img = cv2.cvtColor(np.stack([np.full_like(sat, 30), sat, val], -1).astype(np.uint8), cv2.COLOR_HSV2BGR)
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)  # what the shifts are given
    assert all(len(np.unique(hsv[..., c])) == 256 for c in (1, 2))  # every saturation and value level
    for gain in [*range(-600, 601), -32767, 32767]:
        for gains in ([0, gain, gain], [0, gain, -gain], [0, 0, gain]):
            gains = np.array(gains, np.int16)
            fast._get_hsv_gains = lambda gains=gains: gains
            expected = hsv.astype(np.int16)
            expected[..., 1:] = np.clip(expected[..., 1:] + gains[1:], 0, 255)
            out = fast.transform({"img": img.copy()})["img"]
            assert np.array_equal(out, cv2.cvtColor(expected.astype(np.uint8), cv2.COLOR_HSV2BGR)), gains


def test_opencv_hue_is_at_most_179():
    """Why a zero hue gain may skip mmdet's ``(h + 0) % 180``: every 8-bit colour's hue is below 180."""
    assert cv2.cvtColor(every_colour(), cv2.COLOR_BGR2HSV)[..., 0].max() == 179


# ---- Resize / RandomFlip (bitmap masks) -------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        dict(scale=(64, 48), keep_ratio=True),  # YOLOX's: the image keeps its size
        dict(scale=(90, 60), keep_ratio=True),
        dict(scale=(50, 70), keep_ratio=False, clip_object_border=False),
    ],
)
def test_resize_boxes_equal_mmdets(params):
    """Boxes over the border (clipped or not), zeros of both signs, none at all; the same box object."""
    slow, fast = pair(T.Resize, F.FastResize, **params)
    rng = np.random.default_rng(16)
    for seed in range(12):
        results = sample(rng, 48, 64, int(rng.integers(0, 5)))
        boxes = results["gt_bboxes"].tensor
        boxes[:, 2:] += torch.from_numpy(rng.uniform(-5, 30, (len(boxes), 2)).astype(np.float32))
        boxes[: seed % 3, 0] = -0.0 if seed % 2 else -3.5
        a = compare(slow, fast, results, seed)["gt_bboxes"].tensor
        before = results["gt_bboxes"]
        b = fast(results)["gt_bboxes"]
        assert b is before  # the same object given new coordinates, as by mmdet's rescale_ and clip_
        assert torch.equal(a.view(torch.int32), b.tensor.view(torch.int32))  # every bit (zeros' signs too)


@pytest.mark.parametrize("masks", [None, "bitmap", "polygon"])
@pytest.mark.parametrize("params", [dict(scale=(90, 60), keep_ratio=True), dict(scale=(50, 70), keep_ratio=False)])
def test_resize_equals_mmdet(params, masks):
    slow, fast = pair(T.Resize, F.FastResize, **params)
    rng = np.random.default_rng(6)
    for seed in range(12):
        results = sample(rng, *(int(v) for v in rng.integers(20, 80, 2)), int(rng.integers(0, 4)), masks)
        compare(slow, fast, results, seed)


@pytest.mark.parametrize("masks", [None, "bitmap", "polygon"])
@pytest.mark.parametrize(
    "params",
    [dict(prob=0.5), dict(prob=[0.3, 0.3, 0.3], direction=["horizontal", "vertical", "diagonal"])],
)
def test_random_flip_equals_mmdet(params, masks):
    slow, fast = pair(T.RandomFlip, F.FastRandomFlip, **params)
    rng = np.random.default_rng(7)
    for seed in SEEDS:
        results = sample(rng, *(int(v) for v in rng.integers(20, 60, 2)), int(rng.integers(0, 4)), masks)
        compare(slow, fast, results, seed)


# ---- Pad / Resize on mirrored images ---------------------------------------------------------


def mirrored(rng, results: dict, seed: int) -> dict:
    """The image as RandomFlip leaves it every other time: a reversed view (rows, columns or both)."""
    rows, cols = [(1, -1), (-1, 1), (-1, -1), (1, 1)][seed % 4]
    if seed % 5 == 4:
        results["img"] = results["img"].astype(np.float32)
    elif seed % 7 == 6:
        results["img"] = results["img"][..., :1]  # one channel kept as an axis
    results["img"] = results["img"][::rows, ::cols]
    return results


@pytest.mark.parametrize("masks", [None, "bitmap", "polygon"])
@pytest.mark.parametrize(
    "params",
    [
        dict(size=(64, 64), pad_val=dict(img=(114, 114, 114))),
        dict(pad_to_square=True, pad_val=dict(img=(114.0, 114.0, 114.0))),
        dict(size_divisor=32, pad_val=7),
    ],
)
def test_pad_equals_mmdet(params, masks):
    slow, fast = pair(T.Pad, F.FastPad, **params)
    rng = np.random.default_rng(8)
    for seed in range(16):
        h, w = (64, 64) if seed % 3 == 0 else tuple(int(v) for v in rng.integers(20, 64, 2))
        results = mirrored(rng, sample(rng, h, w, int(rng.integers(0, 4)), masks), seed)
        compare(slow, fast, results, seed)
    already = sample(rng, 64, 64, 2, masks)  # already of the padded size: kept, not copied (same values)
    img = already["img"]
    assert fast(already)["img"] is img and already["pad_shape"] == (64, 64, 3)


@pytest.mark.parametrize("params", [dict(scale=(640, 640), keep_ratio=True), dict(scale=(50, 40), keep_ratio=True)])
def test_resize_equals_mmdet_on_mirrored_images(params):
    slow, fast = pair(T.Resize, F.FastResize, **params)
    rng = np.random.default_rng(9)
    for seed in range(12):
        size = (480, 640) if params["scale"][0] == 640 else tuple(int(v) for v in rng.integers(20, 80, 2))
        compare(slow, fast, mirrored(rng, sample(rng, *size, 2, "bitmap"), seed), seed)


# ---- PackDetInputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("masks", [None, "bitmap", "polygon"])
def test_pack_equals_mmdet(masks):
    from mmdet.datasets.transforms import PackDetInputs

    slow, fast = pair(PackDetInputs, F.FastPackDetInputs)
    rng = np.random.default_rng(5)
    for seed in range(16):
        results = sample(rng, 30, 44, int(rng.integers(0, 4)), masks)
        results.update(img_id=seed, scale_factor=(1.5, 1.5), flip=bool(seed % 2), flip_direction="horizontal")
        if seed % 4 == 1:  # not contiguous, mirrored as RandomFlip leaves it
            rows, cols = {1: (1, 1), 5: (1, -1), 9: (-1, 1), 13: (-1, -1)}[seed]
            results["img"] = photo(rng, 40, 50)[5:35, 3:47][::rows, ::cols]
        elif seed % 4 == 2:
            results["img"] = results["img"].astype(np.float32)[:: -1 if seed % 8 == 6 else 1]  # mirrored or not
        elif seed % 4 == 3:
            results["img"] = results["img"][..., 0]  # one channel, no channel axis: mmdet's code
            results.pop("gt_ignore_flags")
        out = compare(slow, fast, results, seed)
        assert out["inputs"].is_contiguous()


# ---- swapping, the knob, whole datasets ------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        dict(min_gt_bbox_wh=(1, 1), keep_empty=False),  # YOLOX's
        dict(min_gt_bbox_wh=(1, 1), keep_empty=True),
        dict(min_gt_bbox_wh=(0.1, 2.5)),  # not float32 values: compared as float32 by both
        dict(min_gt_bbox_wh=(0, 0), by_box=True, by_mask=True, min_gt_mask_area=4),  # by mask: mmdet's code
    ],
)
def test_filter_annotations_equals_mmdet(params):
    from mmdet.datasets.transforms import FilterAnnotations

    slow, fast = pair(FilterAnnotations, F.FastFilterAnnotations, **params)
    rng = np.random.default_rng(21)
    for seed in SEEDS:
        n = int(rng.integers(0, 9)) if seed % 5 else 0
        inputs = sample(rng, 40, 50, n, masks="bitmap")
        boxes = inputs["gt_bboxes"].tensor
        if n:  # widths and heights of every kind: none, negative, exactly the minimum, just above it
            boxes[: n // 2, 2] = boxes[: n // 2, 0] + torch.tensor([0.0, -1.0, 1.0, 2.5, 0.1, 1.0000001][: n // 2])
            if seed % 3 == 0:
                boxes[:, 3] = boxes[:, 1]  # nothing kept: None where keep_empty, else every key emptied
        compare(slow, fast, inputs, seed)


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    """12 drawn-shapes images (128 px, polygons), one crowd object, one image without objects."""
    root = tmp_path_factory.mktemp("tiny_coco")
    ann = make_split(root, "train", 12, seed=5)
    data = json.loads(ann.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 3]
    data["annotations"][0]["iscrowd"] = 1
    ann.write_text(json.dumps(data))
    return root


def coco_cfg(root, pipeline, **extra):
    return dict(
        type="CocoDataset",
        data_root=str(root) + "/",
        ann_file="annotations/train.json",
        data_prefix=dict(img="train/"),
        metainfo=dict(classes=("circle", "square", "triangle")),
        filter_cfg=dict(filter_empty_gt=False),
        pipeline=pipeline,
        **extra,
    )


LOAD = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True, with_mask=True)]
RTMDET_LIKE = [
    *LOAD,
    dict(type="CachedMosaic", img_scale=(64, 64), pad_val=114.0, max_cached_images=6),
    dict(type="RandomResize", scale=(128, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=(64, 64)),
    dict(type="YOLOXHSVRandomAug"),
    dict(type="RandomFlip", prob=0.5),
    dict(type="Pad", size=(64, 64), pad_val=dict(img=(114, 114, 114))),
    dict(type="CachedMixUp", img_scale=(64, 64), ratio_range=(1.0, 1.0), max_cached_images=4, pad_val=(114,) * 3),
    dict(type="PackDetInputs"),
]
YOLOX_LIKE = [
    dict(type="Mosaic", img_scale=(64, 64), pad_val=114.0),
    dict(type="RandomAffine", scaling_ratio_range=(0.1, 2), border=(-32, -32)),
    dict(type="MixUp", img_scale=(64, 64), ratio_range=(0.8, 1.6), pad_val=114.0),
    dict(type="YOLOXHSVRandomAug"),
    dict(type="RandomFlip", prob=0.5),
    dict(type="Resize", scale=(64, 64), keep_ratio=True),
    dict(type="Pad", pad_to_square=True, pad_val=dict(img=(114.0, 114.0, 114.0))),
    dict(type="FilterAnnotations", min_gt_bbox_wh=(1, 1), keep_empty=False),
    dict(type="PackDetInputs"),
]


def samples(dataset_cfg, fast: bool, count: int = 24) -> tuple[list, list]:
    dataset = build_dataset(dataset_cfg, "train_dataloader.dataset", {"fast_transforms": fast})
    names = [type(t).__name__ for t in [dataset, *F._transforms_of(dataset, include_datasets=True)]]
    random.seed(0)
    np.random.seed(0)
    return [dataset[i % len(dataset)] for i in range(count)], names


@pytest.mark.parametrize("kind", ["rtmdet", "yolox"])
def test_built_dataset_yields_the_same_samples_either_way(tiny_coco, kind):
    init_default_scope("mmdet")
    if kind == "rtmdet":
        cfg = coco_cfg(tiny_coco, RTMDET_LIKE)
    else:
        loads = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)]
        cfg = dict(type="MultiImageMixDataset", dataset=coco_cfg(tiny_coco, loads), pipeline=YOLOX_LIKE)
    saved = copy.deepcopy(cfg)
    ours, fast_names = samples(cfg, True)
    theirs, slow_names = samples(cfg, False)
    assert cfg == saved  # the config keeps mmdet's types
    assert_same(theirs, ours, pixels=AFTER_MIXUP if kind == "yolox" else None)
    swapped = {"rtmdet": {"FastCachedMosaic", "FastYOLOXHSVRandomAug", "FastCachedMixUp"}}
    swapped["yolox"] = {"FastMultiImageMixDataset", "FastMosaic", "FastMixUp", "FastYOLOXHSVRandomAug", "FastResize"}
    assert swapped[kind] <= set(fast_names) and not any(n.startswith("Fast") for n in slow_names)


class GivesUpOnce:
    """Records the boxes it is given; on its first call assigns none to the sample and gives up (returns
    None), then passes samples on: a retry must see the sample as it was."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    def __call__(self, results: dict) -> dict | None:
        self.calls.append(np.asarray(results["gt_bboxes"].tensor).copy())
        if len(self.calls) == 1:
            results["gt_bboxes"] = results["gt_bboxes"][:0]
            return None
        return results


@pytest.mark.parametrize("empty", [False, True])
def test_a_transform_that_gives_up_is_retried_on_the_sample_as_it_was(tiny_coco, empty):
    """FilterAnnotations is handed a new dict, not a deep copy: where it gives up (no box left, keep_empty)
    both wrappers fail alike; where it does not, the samples are the same and the next step sees them."""
    init_default_scope("mmdet")
    loads = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)]
    pipeline = [dict(step) for step in YOLOX_LIKE if step["type"] != "MixUp"]
    pipeline[-2] = dict(type="FilterAnnotations", min_gt_bbox_wh=(1000, 1000) if empty else (1, 1), keep_empty=True)
    cfg = dict(type="MultiImageMixDataset", dataset=coco_cfg(tiny_coco, loads), pipeline=pipeline, max_refetch=3)
    outcomes = []
    for fast in (False, True):
        dataset = build_dataset(cfg, "train_dataloader.dataset", {"fast_transforms": fast})
        random.seed(0)
        np.random.seed(0)
        try:
            outcomes.append([dataset[i] for i in range(6)])
        except RuntimeError as e:
            outcomes.append(f"raised {type(e).__name__}")
    if empty:
        assert outcomes == ["raised RuntimeError"] * 2
        return
    assert isinstance(outcomes[0], list)
    assert_same(*outcomes)
    # the retry sees the sample as it was before the first try
    dataset = build_dataset(cfg, "train_dataloader.dataset", {"fast_transforms": True})
    recorder = GivesUpOnce()
    F.GIVES_UP_FIRST.add(GivesUpOnce)
    try:
        dataset.pipeline.insert(2, recorder)
        dataset.pipeline_types.insert(2, "GivesUpOnce")
        dataset[0]
    finally:
        F.GIVES_UP_FIRST.discard(GivesUpOnce)
    assert len(recorder.calls) == 2 and len(recorder.calls[0]) and np.array_equal(*recorder.calls)


def test_yolox_mode_switch_still_skips_the_swapped_transforms(tiny_coco):
    """MultiImageMixDataset skips by config type (YOLOXModeSwitchHook): swapping must not hide them."""
    init_default_scope("mmdet")
    loads = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)]
    cfg = dict(type="MultiImageMixDataset", dataset=coco_cfg(tiny_coco, loads), pipeline=YOLOX_LIKE)
    dataset = build_dataset(cfg, "train_dataloader.dataset", {"fast_transforms": True})
    dataset.update_skip_type_keys(["Mosaic", "RandomAffine", "MixUp"])
    random.seed(0)
    np.random.seed(0)
    assert dataset[0]["inputs"].shape[1:] == (64, 64)  # Resize + Pad of one 128 px image, no mosaic


def test_pipeline_switch_hook_gets_the_fast_transforms():
    from mmdet.engine.hooks import PipelineSwitchHook

    pipeline = [dict(type="YOLOXHSVRandomAug"), dict(type="mmdet.Pad", size=(8, 8)), dict(type="RandomCrop")]
    hook = PipelineSwitchHook(switch_epoch=1, switch_pipeline=pipeline)
    F.swap_hooks([("custom_hooks[0]", hook)], True)
    assert hook.switch_pipeline == [
        dict(type=F.FastYOLOXHSVRandomAug),
        dict(type=F.FastPad, size=(8, 8)),
        dict(type="RandomCrop"),  # not one of ours
    ]
    assert pipeline[1] == dict(type="mmdet.Pad", size=(8, 8))  # the config keeps mmdet's types


def test_the_knob_must_be_a_boolean(tmp_path):
    from det_mmdet.config import build_config, experiment_from_dict

    exp = experiment_from_dict(
        {
            "hyperparameters": {"global_batch_size": 2, "config_file": "configs/shapes_faster_rcnn.py"},
            "data": {"fast_transforms": "yes"},
        }
    )
    with pytest.raises(UserError, match=r"^data.fast_transforms: 'yes' is not true or false$"):
        build_config(exp)


def test_swapped_dataset_pickles_for_loader_workers(tiny_coco):
    """Loader workers started by spawn/forkserver get the dataset pickled: the fast classes travel."""
    import pickle

    init_default_scope("mmdet")
    loads = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)]
    cfg = dict(type="MultiImageMixDataset", dataset=coco_cfg(tiny_coco, loads), pipeline=YOLOX_LIKE)
    dataset = build_dataset(cfg, "train_dataloader.dataset", {"fast_transforms": True})
    copied = pickle.loads(pickle.dumps(dataset))
    assert type(copied) is F.FastMultiImageMixDataset
    assert [type(t) for t in copied.pipeline] == [type(t) for t in dataset.pipeline]
    random.seed(3)
    np.random.seed(3)
    first = dataset[1]
    random.seed(3)
    np.random.seed(3)
    assert_same(first, copied[1])


def test_paste_inside_fills_only_what_no_piece_covers():
    """``paste_inside`` with a pad colour equals the pad everywhere, then the pieces pasted in order:
    overlapping, touching, outside and empty rectangles, any part of the canvas."""
    rng = np.random.default_rng(20)
    for _ in range(200):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        pieces = []
        for _ in range(int(rng.integers(0, 6))):
            x1, y1 = int(rng.integers(-10, w + 5)), int(rng.integers(-10, h + 5))
            x2, y2 = x1 + int(rng.integers(0, 30)), y1 + int(rng.integers(0, 30))
            img = rng.integers(0, 256, (y2 - y1 + 2, x2 - x1 + 1, 3), dtype=np.uint8)
            pieces.append((img, (x1, y1, x2, y2), (1, 2, 1 + x2 - x1, 2 + y2 - y1)))
        top, left = int(rng.integers(-5, h)), int(rng.integers(-5, w))
        out_h, out_w = int(rng.integers(0, h + 5)), int(rng.integers(0, w + 5))
        wanted = np.full((out_h, out_w, 3), 114, np.uint8)
        F.paste_inside(wanted, top, left, pieces)
        got = np.zeros((out_h, out_w, 3), np.uint8)  # what no piece covers must be filled, not left
        F.paste_inside(got, top, left, pieces, 114)
        assert_same(wanted, got)
