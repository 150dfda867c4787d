"""det_mmdet.crop_resize against OpenCV and mmdet 3.3.0: RandomResize + RandomCrop made by the window, same outputs.

The window arithmetic is compared with ``cv2.resize`` itself (many sizes, up and down, halvings,
borders); the fused pair with mmcv's ``RandomResize`` and mmdet's ``RandomCrop`` from one seed on
equal inputs (pixels, boxes, labels, flags, masks, shapes, homography, random draws), as
tests/test_fast_transforms.py does for the other fast transforms.
"""

from __future__ import annotations

import copy
import random

import cv2
import numpy as np
import pytest
from mmcv.transforms import RandomResize
from mmengine.dataset import Compose
from mmengine.registry import init_default_scope

from det_mmdet import crop_resize as C
from det_mmdet import fast_transforms as F
from test_fast_transforms import (
    MIXUP_LEVELS,
    RTMDET_LIKE,
    assert_same,
    coco_cfg,
    compare,
    photo,
    sample,
    samples,
    tiny_coco,
)

__all__ = ["tiny_coco"]  # the module-scoped fixture, shared

SEEDS = range(30)


# ---- the window against OpenCV ---------------------------------------------------------------


def test_window_is_opencvs_resize_bit_for_bit():
    rng = np.random.default_rng(0)
    cv2.setNumThreads(1)
    for case in range(300):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        if case % 5 == 0:  # exact halvings (OpenCV takes its area path) and equal sizes
            width, height = (max(1, w // 2), max(1, h // 2)) if case % 10 == 0 else (w, h)
        else:
            width, height = (int(v) for v in rng.integers(1, 200, 2))
        img = photo(rng, h, w) if case % 2 and min(h, w) > 8 else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rows, cols = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        top, left = int(rng.integers(0, height - rows + 1)), int(rng.integers(0, width - cols + 1))
        expected = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)[
            top : top + rows, left : left + cols
        ]
        got = C.resized_window(img, (width, height), top, left, rows, cols)
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.array_equal(got, expected), f"{(h, w)} -> {(height, width)}: {np.count_nonzero(got != expected)}"


@pytest.mark.parametrize("size", [640, 641, 777, 1280, 1537, 1920, 2559, 2560])
def test_window_of_a_mosaic_as_rtmdet_resizes_it(size):
    """RTMDet's case: a 1280x1280 mosaic scaled 0.5x..2x, a 640x640 window (corners and middle)."""
    rng = np.random.default_rng(size)
    img = photo(rng, 1280, 1280)
    full = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    for top, left in ((0, 0), (size - 640, size - 640), ((size - 640) // 3, (size - 640) // 2)):
        got = C.resized_window(img, (size, size), top, left, 640, 640)
        assert np.array_equal(got, full[top : top + 640, left : left + 640])


def test_part_resize_is_opencvs_whole_resize_bit_for_bit():
    """OpenCV resizing only the top-left part that the first rows x cols read, at the whole image's scale."""
    rng = np.random.default_rng(3)
    cv2.setNumThreads(1)
    assert C.prefix_matches_opencv()
    parts = 0
    for case in range(300):
        h, w = (int(v) for v in rng.integers(2, 400, 2))
        if case % 5 == 0:  # exact halvings (OpenCV's area path) and equal sizes
            width, height = (max(1, w // 2), max(1, h // 2)) if case % 10 == 0 else (w, h)
        else:
            width, height = (max(1, int(v * rng.uniform(0.3, 2.5))) for v in (w, h))
        img = photo(rng, h, w) if case % 2 and min(h, w) > 8 else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rows, cols = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        full = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
        got = C.resized_prefix(img, (width, height), rows, cols)
        parts += got.shape != full.shape
        assert np.array_equal(got[:rows, :cols], full[:rows, :cols]), f"{(h, w)} -> {(height, width)}, {rows}x{cols}"
    assert parts > 200  # most cases resized a part only


@pytest.mark.parametrize("flip", [False, True])
def test_mixup_jitter_resize_is_within_one_level_of_mmdets(flip):
    """YOLOX's MixUp: a 640x640 canvas (a photo and the pad colour) jittered 0.8x..1.6x in float64 (mmdet)
    against float32 on the part the 640x640 crop reads (ours): at most one level apart, on few values."""
    rng = np.random.default_rng(7 + flip)
    apart = values = 0
    for _ in range(12):
        canvas = np.full((640, 640, 3), 114, np.uint8)
        h, w = (480, 640) if rng.random() < 0.7 else (640, 480)
        canvas[:h, :w] = photo(rng, h, w)
        size = (int(640 * rng.uniform(0.8, 1.6)),) * 2
        expected = cv2.resize(canvas.astype(np.float64), size).astype(np.uint8)  # mmdet's canvas, truncated
        top, left = (int(rng.integers(0, max(size[0] - 640, 0) + 1)) for _ in range(2))
        rows = cols = min(640, size[0])
        if flip:  # MixUpPixels._window slices the mirrored canvas's window out of the unmirrored one
            key = (slice(top, top + rows), slice(size[0] - left - cols, size[0] - left))
        else:
            key = (slice(top, top + rows), slice(left, left + cols))
        got = C.TruncatedLater(canvas, size)[key]
        assert got.dtype == np.uint8 and got.shape == expected[key].shape
        difference = np.abs(got.astype(np.int16) - expected[key])
        assert difference.max() <= MIXUP_LEVELS
        apart, values = apart + np.count_nonzero(difference), values + difference.size
    assert apart <= 0.001 * values, f"{apart} of {values} values one level apart"


def test_mosaic_later_slices_as_the_whole_canvas():
    """The pad colour where no piece goes, each piece's cut where it is pasted; any window of it."""
    rng = np.random.default_rng(4)
    pieces = []
    for pasted in ((0, 0, 30, 20), (30, 5, 64, 20), (2, 20, 30, 48), (30, 20, 60, 41)):
        x1, y1, x2, y2 = pasted
        img = rng.integers(0, 256, (y2 - y1 + 7, x2 - x1 + 3, 3), dtype=np.uint8)
        pieces.append((img, pasted, (3, 7, 3 + x2 - x1, 7 + y2 - y1)))
    later = C.MosaicLater((48, 64, 3), np.uint8, np.array([114, 100, 90], np.uint8), pieces)
    whole = np.empty((48, 64, 3), np.uint8)
    whole[:] = (114, 100, 90)
    for img, (x1, y1, x2, y2), (cx1, cy1, cx2, cy2) in pieces:
        whole[y1:y2, x1:x2] = img[cy1:cy2, cx1:cx2]
    assert np.array_equal(np.asarray(later), whole)
    for key in [(slice(0, 10), slice(5, 40)), slice(13, 31), (slice(40, 90), slice(-9, None)), (slice(5, 5),), 7]:
        assert_same(whole[key], later[key], f"later[{key}]")


def test_resized_later_slices_as_the_resized_image():
    rng = np.random.default_rng(1)
    img = photo(rng, 40, 30)
    later = C.ResizedLater(img, (70, 50))
    full = cv2.resize(img, (70, 50), interpolation=cv2.INTER_LINEAR)
    assert later.shape == full.shape and later.dtype == full.dtype
    for key in [
        (slice(3, 20), slice(5, 60), Ellipsis),  # RandomCrop's key
        (slice(0, 50), slice(0, 70)),
        (slice(10, 200), slice(-20, None)),  # clamped as numpy clamps
        (slice(5, 5), slice(0, 10)),  # empty
        (slice(0, 40, 2), slice(None)),  # not a window: the whole image, then numpy
        5,
    ]:
        assert_same(full[key], later[key], f"later[{key}]")
    assert np.array_equal(np.asarray(later), full)


# ---- the fused pair against mmdet's ----------------------------------------------------------


class Holder:
    """A dataset-like node with a pipeline, as ``swap`` walks them."""

    def __init__(self, steps: list) -> None:
        self.pipeline = Compose(steps)


def pipelines(resize: dict, crop: dict, after: list | None = None) -> tuple[Compose, Compose]:
    init_default_scope("mmdet")
    steps = [dict(type="RandomResize", **resize), dict(type="RandomCrop", **crop), *(after or [])]
    slow, fast = Holder(copy.deepcopy(steps)), Holder(copy.deepcopy(steps))
    F.swap(fast, True)
    assert type(slow.pipeline.transforms[0]) is RandomResize
    assert type(fast.pipeline.transforms[0]) is C.FastRandomResize
    return slow.pipeline, fast.pipeline


@pytest.mark.parametrize("masks", [None, "bitmap", "polygon"])
@pytest.mark.parametrize(
    "resize, crop",
    [
        (dict(scale=(96, 96), ratio_range=(0.5, 2.0), keep_ratio=True), dict(crop_size=(48, 48))),
        (dict(scale=(80, 60), ratio_range=(0.1, 2.0), keep_ratio=True), dict(crop_size=(40, 32))),
        (dict(scale=[(40, 30), (120, 90)], keep_ratio=False), dict(crop_size=(36, 44), allow_negative_crop=True)),
        (dict(scale=(64, 64), ratio_range=(0.5, 1.5), keep_ratio=True),
         dict(crop_size=(0.3, 0.7), crop_type="relative_range")),
        (dict(scale=(64, 64), ratio_range=(0.8, 1.2), keep_ratio=True, clip_object_border=False),
         dict(crop_size=(20, 50), crop_type="absolute_range", bbox_clip_border=False, recompute_bbox=True)),
    ],
)  # fmt: skip
def test_resize_then_crop_equals_mmdet(resize, crop, masks, monkeypatch):
    monkeypatch.setattr(C, "NUMPY_FROM_AREA_RATIO", 0.0)  # every window by numpy (small images would go to OpenCV)
    slow, fast = pipelines(resize, crop)
    rng, kept = np.random.default_rng(2), 0
    for seed in SEEDS:
        h, w = (int(v) for v in rng.integers(20, 100, 2))
        results = sample(rng, h, w, int(rng.integers(0, 6)), masks, numpy_boxes=seed % 4 == 0)
        results["gt_seg_map"] = rng.integers(0, 5, (h, w)).astype(np.uint8)
        out = compare(slow, fast, results, seed)
        assert not isinstance(out, str), out  # neither raised
        kept += out is not None
    assert kept >= len(SEEDS) // 3  # crops that keep a box (the rest: both give None alike)


def test_this_opencv_is_emulated_exactly():
    """The once-per-process check passes with the pinned OpenCV (else every image is resized whole)."""
    C.window_matches_opencv.cache_clear()
    assert C.window_matches_opencv() is True


@pytest.mark.parametrize("ratio, checked", [(0.0, True), (np.inf, True), (0.0, False)])
def test_both_ways_to_the_window_give_mmdets_pixels(monkeypatch, ratio, checked):
    """The window by numpy (ratio 0) and OpenCV's whole resize then the window (ratio inf, or an
    OpenCV whose arithmetic the check found different)."""
    monkeypatch.setattr(C, "NUMPY_FROM_AREA_RATIO", ratio)
    monkeypatch.setattr(C, "window_matches_opencv", lambda: checked)
    slow, fast = pipelines(dict(scale=(128, 128), ratio_range=(0.5, 2.0), keep_ratio=True), dict(crop_size=(64, 64)))
    rng = np.random.default_rng(3)
    for seed in SEEDS:
        compare(slow, fast, sample(rng, 128, 128, int(rng.integers(1, 5))), seed)


def test_other_images_and_settings_run_mmdets_code():
    """Grey or float images, Pillow, other interpolations: mmdet's resize of the whole image."""
    rng = np.random.default_rng(4)
    for resize in (
        dict(scale=(64, 64), ratio_range=(0.5, 2.0), keep_ratio=True, interpolation="nearest"),
        dict(scale=(64, 64), ratio_range=(0.5, 2.0), keep_ratio=True, backend="pillow"),
        dict(scale=(64, 64), ratio_range=(0.5, 2.0), keep_ratio=True),
    ):
        slow, fast = pipelines(resize, dict(crop_size=(32, 32)))
        for seed in SEEDS:
            results = sample(rng, 50, 60, 3)
            if seed % 3 == 0:
                results["img"] = results["img"].astype(np.float32)
            elif seed % 3 == 1 and "backend" not in resize:
                results["img"] = np.ascontiguousarray(results["img"][..., 0])
            compare(slow, fast, results, seed)


def test_an_empty_size_fails_as_mmdets_does():
    slow, fast = pipelines(dict(scale=(4, 4), ratio_range=(0.1, 0.1), keep_ratio=True), dict(crop_size=(2, 2)))
    results = sample(np.random.default_rng(6), 60, 60, 2)
    assert compare(slow, fast, results, 0) == "raised error"  # cv2.error: OpenCV refuses an empty size


def test_only_a_resize_right_before_a_crop_is_fused():
    init_default_scope("mmdet")
    resize = dict(type="RandomResize", scale=(64, 64), ratio_range=(0.5, 2.0), keep_ratio=True)
    crop, flip = dict(type="RandomCrop", crop_size=(32, 32)), dict(type="RandomFlip", prob=0.5)
    node = Holder([resize, flip, crop, copy.deepcopy(resize)])
    F.swap(node, True)
    assert [type(t) for t in node.pipeline.transforms][::3] == [RandomResize, RandomResize]
    off = Holder([resize, crop])
    F.swap(off, False)  # data.fast_transforms: false
    assert type(off.pipeline.transforms[0]) is RandomResize
    choice = Holder([dict(type="RandomChoice", transforms=[[resize], [crop]])])  # alternatives, not a sequence
    F.swap(choice, True)
    assert type(choice.pipeline.transforms[0].transforms[0].transforms[0]) is RandomResize
    nested = Holder([dict(type="RandomApply", transforms=[resize, crop], prob=1.0)])
    F.swap(nested, True)
    assert type(nested.pipeline.transforms[0].transforms.transforms[0]) is C.FastRandomResize


def test_pipeline_switch_hook_gets_the_fused_pair():
    from mmdet.engine.hooks import PipelineSwitchHook

    resize = dict(type="RandomResize", scale=(64, 64), ratio_range=(0.1, 2.0), keep_ratio=True)
    pipeline = [resize, dict(type="mmdet.RandomCrop", crop_size=(32, 32)), resize, dict(type="YOLOXHSVRandomAug")]
    hook = PipelineSwitchHook(switch_epoch=1, switch_pipeline=pipeline)
    F.swap_hooks([hook], True)
    assert [cfg["type"] for cfg in hook.switch_pipeline] == [
        C.FastRandomResize,
        "mmdet.RandomCrop",
        "RandomResize",  # a lone one stays mmdet's
        F.FastYOLOXHSVRandomAug,
    ]
    assert pipeline[0]["type"] == "RandomResize"  # the config keeps mmdet's types
    init_default_scope("mmdet")
    slow, fast = Compose(copy.deepcopy(pipeline[:2])), Compose(hook.switch_pipeline[:2])
    rng = np.random.default_rng(5)
    for seed in SEEDS:
        compare(slow, fast, sample(rng, 48, 64, 3), seed)


# ---- a built dataset -------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, C.NUMPY_FROM_AREA_RATIO])
def test_rtmdet_like_dataset_yields_the_same_samples_either_way(tiny_coco, monkeypatch, ratio):
    """Mosaic -> RandomResize -> RandomCrop -> ... -> PackDetInputs, built as the trial builds it
    (every window by numpy, or as the cost rule chooses)."""
    monkeypatch.setattr(C, "NUMPY_FROM_AREA_RATIO", ratio)
    made = []  # the parts of the mosaic canvases made: (rows, columns, the canvas's rows x columns)
    whole_slice = C.MosaicLater.__getitem__

    def made_where_read(self, key):
        out = whole_slice(self, key)
        made.append(out.shape[0] * out.shape[1] / (self.shape[0] * self.shape[1]))
        return out

    monkeypatch.setattr(C.MosaicLater, "__getitem__", made_where_read)
    init_default_scope("mmdet")
    steps = [dict(cfg, crop_size=(96, 96)) if cfg["type"] == "RandomCrop" else cfg for cfg in RTMDET_LIKE]
    cfg = coco_cfg(tiny_coco, steps)
    ours, fast_names = samples(cfg, True, count=30)
    theirs, slow_names = samples(cfg, False, count=30)
    assert "FastRandomResize" in fast_names and "FastRandomResize" not in slow_names
    assert_same(theirs, ours)
    assert len(made) > 10 and min(made) < 0.5  # canvases made later, some only in part
    random.seed(0)  # (the module's seeds left as found)
    np.random.seed(0)


def test_fused_dataset_pickles_for_loader_workers(tiny_coco):
    """Loader workers started by spawn/forkserver get the dataset pickled: the fused class travels."""
    import pickle

    from det_mmdet.data import build_dataset

    init_default_scope("mmdet")
    dataset = build_dataset(coco_cfg(tiny_coco, RTMDET_LIKE), "train_dataloader.dataset", {"fast_transforms": True})
    copied = pickle.loads(pickle.dumps(dataset))
    assert type(copied.pipeline.transforms[3]) is C.FastRandomResize
    firsts = []
    for ds in (dataset, copied):
        random.seed(3)
        np.random.seed(3)
        firsts.append([ds[i] for i in range(4)])
    assert_same(*firsts)
    pickle.loads(pickle.dumps(dataset))  # with its deferring Resize made


# ---- the bench script ------------------------------------------------------------------------


def test_crop_resize_bench_runs_and_checks_the_pixels():
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "bench/crop_resize.py", "--calls", "1", "--repeats", "1", "--points", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "x" in line]
    assert [r[0].strip() for r in rows] == [
        "mosaic 1280x1280",
        "mosaic 1280x1280",
        "mosaic: mean over ratios",
        "stage2 640x480",
        "stage2 640x480",
        "stage2: mean over ratios",
    ]
    assert rows[1][2].strip() == "2560x2560" and rows[4][2].strip() == "1280x960"  # 2x of each
    assert all(float(r[-1].strip().rstrip("x")) > 0 for r in rows)
    bad = subprocess.run([*cmd, "--cases", "mosaic,tiles"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == "error: --cases: unknown tiles (choose from mosaic, stage2)"
