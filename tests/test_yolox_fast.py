"""det_mmdet.yolox_fast against mmdet 3.3.0's RandomAffine: same inputs and random state, same outputs.

Each comparison runs mmdet's transform and ours from one seed on equal copies of one input and
asserts the outputs equal bit for bit (pixels, boxes, labels, flags, shapes) and that both drew the
same random numbers (helpers from test_fast_transforms).
"""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
from mmdet.datasets.transforms import transforms as T
from mmengine.registry import init_default_scope

from det_mmdet import fast_transforms as F
from det_mmdet import yolox_fast as Y
from test_fast_transforms import YOLOX_LIKE, assert_same, coco_cfg, compare, pair, photo, sample, samples, tiny_coco

__all__ = ["tiny_coco"]  # the fixture, shared with test_fast_transforms

YOLOX_S = dict(scaling_ratio_range=(0.1, 2), border=(-32, -32))
YOLOX_TINY = dict(scaling_ratio_range=(0.5, 1.5), border=(-32, -32))


@pytest.mark.parametrize(
    "params",
    [
        YOLOX_S,
        YOLOX_TINY,
        dict(),  # mmdet's defaults: no border
        dict(max_rotate_degree=180, max_shear_degree=30, max_translate_ratio=0.5, border_val=(0, 10, 250)),
        dict(scaling_ratio_range=(0.1, 2), border=(-32, -32), bbox_clip_border=False),
    ],
)
def test_random_affine_equals_mmdet(params):
    slow, fast = pair(T.RandomAffine, F.FAST[T.RandomAffine], **params)
    assert type(fast) is Y.FastRandomAffine
    rng = np.random.default_rng(11)
    for seed in range(40):
        h, w = (128, 128) if seed % 3 == 0 else tuple(int(v) for v in rng.integers(70, 140, 2))
        results = sample(rng, h, w, int(rng.integers(0, 12)), numpy_boxes=seed % 4 == 1)
        if seed % 5 == 2:  # a mirrored view, as RandomFlip leaves it
            results["img"] = results["img"][:, ::-1]
        elif seed % 5 == 3:  # not 8-bit: mmdet's warp
            results["img"] = results["img"].astype(np.float32)
        elif seed % 10 == 4:  # one channel: mmdet's warp
            results["img"] = results["img"][..., 0]
        compare(slow, fast, results, seed)


def test_random_affine_refuses_masks_as_mmdet_does():
    slow, fast = pair(T.RandomAffine, Y.FastRandomAffine, **YOLOX_S)
    rng = np.random.default_rng(12)
    for seed in range(6):
        results = sample(rng, 96, 96, 3, masks="bitmap" if seed % 2 else "polygon")
        assert compare(slow, fast, results, seed) == "raised NotImplementedError"


def test_warp_affine_gives_warp_perspectives_pixels_for_yolox_matrices():
    """The fact the fast warp rests on, at YOLOX's sizes: a 1280x1280 mosaic warped to 640x640."""
    assert Y.affine_warp_matches()
    rng = np.random.default_rng(13)
    img = photo(rng, 1280, 1280)
    for params in (dict(YOLOX_S, border=(-320, -320)), dict(YOLOX_TINY, border=(-320, -320))):
        transform = T.RandomAffine(**params)
        random.seed(0)
        for _ in range(12):
            matrix = transform._get_random_homography_matrix(640, 640)
            assert matrix.dtype == np.float32 and np.array_equal(matrix[2], Y.AFFINE_ROW)
            wanted = cv2.warpPerspective(img, matrix, dsize=(640, 640), borderValue=(114, 114, 114))
            assert_same(wanted, Y.warped(img, matrix, (640, 640), (114, 114, 114)))


def test_a_perspective_matrix_is_warped_by_warp_perspective():
    img = photo(np.random.default_rng(14), 60, 80)
    matrix = np.array([[1.1, 0.1, -3.0], [0.05, 0.9, 4.0], [1e-3, -2e-3, 1.0]], dtype=np.float32)
    wanted = cv2.warpPerspective(img, matrix, dsize=(70, 50), borderValue=(114, 114, 114))
    assert_same(wanted, Y.warped(img, matrix, (70, 50), (114, 114, 114)))


def test_built_yolox_dataset_yields_the_same_samples_either_way(tiny_coco):
    init_default_scope("mmdet")
    loads = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)]
    cfg = dict(type="MultiImageMixDataset", dataset=coco_cfg(tiny_coco, loads), pipeline=YOLOX_LIKE)
    ours, fast_names = samples(cfg, True, count=16)
    theirs, slow_names = samples(cfg, False, count=16)
    assert_same(theirs, ours)
    assert "FastRandomAffine" in fast_names and "RandomAffine" in slow_names
    assert not any(n.startswith("Fast") for n in slow_names)  # data.fast_transforms: false gives mmdet's own
