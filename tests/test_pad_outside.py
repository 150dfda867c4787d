"""det_mmdet.pad_outside: YOLOX's mosaic and warp tell the colour step where their pad is, the warp and
the HSV round trip skip it, and the samples stay mmdet's bit for bit (helpers from test_fast_transforms).
"""

from __future__ import annotations

import json
import random

import cv2
import numpy as np
import pytest
from mmdet.datasets.transforms import transforms as T
from mmdet.registry import TRANSFORMS
from mmengine.registry import init_default_scope

from det_mmdet import pad_outside as P
from det_mmdet import yolox_fast as Y
from det_mmdet.shapes import make_split
from test_fast_transforms import YOLOX_LIKE, assert_same, coco_cfg, every_colour, photo, samples
from test_yolox_fast import at_scale

PAD = (114, 114, 114)

# ---- OpenCV's conversions: which pixels go through which code ---------------------------------


def one_pixel_rows(img: np.ndarray) -> np.ndarray:
    """``img``'s pixels as a view of rows one pixel long (OpenCV converts each alone, outside its lanes)."""
    spaced = np.zeros((img.shape[0] * img.shape[1], 2, 3), dtype=np.uint8)
    spaced[:, 0] = img.reshape(-1, 3)
    return spaced[:, :1]


def test_bgr_to_hsv_is_the_same_in_lanes_and_alone():
    """The forward conversion is integer arithmetic: any columns of a row may be converted apart."""
    img = every_colour()
    lanes = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).reshape(-1, 3)
    assert np.array_equal(cv2.cvtColor(one_pixel_rows(img), cv2.COLOR_BGR2HSV).reshape(-1, 3), lanes)


def test_hsv_to_bgr_of_a_rectangle_on_whole_runs_equals_the_whole_image():
    """Where a rectangle starts and ends on runs of OpenCV's lanes (or at the row's end), every pixel
    comes out as in the whole image; one pixel off a run edge, pixels that the lanes truncate and the
    one-pixel code rounds come out otherwise."""
    run = P.hsv_run()
    if run is None:  # (then whole rows are converted: the same code for every pixel as mmdet's)
        pytest.skip("this OpenCV converts HSV to BGR without SIMD runs that differ from its one-pixel code")
    assert run in (4, 8, 16, 32, 64)  # 4 vectors of 1 to 16 floats a step
    rng = np.random.default_rng(20)
    for width in (640, 641, 97 + run, 3 * run):
        hsv = rng.integers(0, 256, (40, width, 3), dtype=np.uint8)
        hsv[..., 0] %= 180
        whole = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        for _ in range(12):
            x1, x2 = sorted(rng.integers(0, width + 1, 2))
            y1, y2 = sorted(rng.integers(0, 40, 2))
            left, right = P.converted_columns(int(x1), int(x2), width)
            assert left <= x1 and (right >= x2 or right == width) and left % run == 0
            part = cv2.cvtColor(np.ascontiguousarray(hsv[y1 : y2 + 1, left:right]), cv2.COLOR_HSV2BGR)
            assert np.array_equal(part, whole[y1 : y2 + 1, left:right]), (width, left, right)
    differs = np.tile(P.PROBE, (1, 2 * run, 1))  # all in lanes in a row of two runs
    assert not np.array_equal(
        cv2.cvtColor(differs[:, 1:], cv2.COLOR_HSV2BGR), cv2.cvtColor(differs, cv2.COLOR_HSV2BGR)[:, 1:]
    )


def test_the_measured_run_is_where_lanes_end():
    run = P.measured_run()
    assert run == P.hsv_run()
    if run is None:
        pytest.skip("this OpenCV converts HSV to BGR without SIMD runs that differ from its one-pixel code")
    row = np.tile(P.PROBE, (1, 3 * run + 5, 1))
    out = cv2.cvtColor(row, cv2.COLOR_HSV2BGR)[0]
    assert len({tuple(p) for p in out[: 3 * run]}) == 1 and not np.array_equal(out[0], out[-1])


# ---- the warp ----------------------------------------------------------------------------------


def yolox_matrices(count: int, seed: int, **params) -> list[np.ndarray]:
    """``RandomAffine``'s own matrices (YOLOX's 2x canvas of a 128 px scale warped to 128 px)."""
    transform = T.RandomAffine(border=(-64, -64), **params)
    random.seed(seed)
    np.random.seed(seed)
    return [transform._get_random_homography_matrix(128, 128) for _ in range(count)]


MATRIX_KINDS = [
    dict(scaling_ratio_range=(0.5, 1.5)),  # YOLOX-tiny
    dict(scaling_ratio_range=(0.1, 2)),  # YOLOX-s
    dict(scaling_ratio_range=(0.5, 1.5), max_rotate_degree=60, max_shear_degree=20, max_translate_ratio=0.4),
]


@pytest.mark.parametrize("params", MATRIX_KINDS)
def test_the_warp_is_pad_outside_the_warped_rect(params):
    """A canvas of pad with pictures in a rectangle, warped as mmdet warps it: every pixel outside
    ``warped_rect`` is the pad (the rectangle holds all the warp reads of the pictures)."""
    rng = np.random.default_rng(21)
    inside = 0.0
    for matrix in yolox_matrices(40, 22, **params):
        canvas = np.full((256, 256, 3), PAD, dtype=np.uint8)
        x1, x2 = sorted(rng.integers(0, 257, 2))
        y1, y2 = sorted(rng.integers(0, 257, 2))
        canvas[y1:y2, x1:x2] = photo(rng, 256, 256)[y1:y2, x1:x2]
        warped = cv2.warpPerspective(canvas, matrix, dsize=(128, 128), borderValue=PAD)
        left, top, right, bottom = P.warped_rect(matrix, (int(x1), int(y1), int(x2), int(y2)), (128, 128))
        outside = np.ones((128, 128), dtype=bool)
        outside[top:bottom, left:right] = False
        assert (warped[outside] == PAD).all()
        inside += (bottom - top) * (right - left) / 128**2
    assert inside < 0.8 * 40  # the rectangle leaves out a part of the image, on average


@pytest.mark.parametrize("params", MATRIX_KINDS)
def test_rows_warped_alone_equal_the_whole_warp(params):
    """``FastRandomAffine.warped_above``: the first rows warped into the output, the rest the pad, are
    mmdet's whole ``cv2.warpPerspective`` wherever the rows below are the pad."""
    rng = np.random.default_rng(23)
    affine = Y.FastRandomAffine(border=(-64, -64))
    for i, matrix in enumerate(yolox_matrices(30, 24, **params)):
        canvas = photo(rng, 256, 256)
        whole = cv2.warpPerspective(canvas, matrix, dsize=(128, 128), borderValue=PAD)
        rows = [0, 1, 127, 128, int(rng.integers(2, 127))][i % 5]
        whole[rows:] = PAD
        assert_same(whole, affine.warped_above(canvas, matrix, (128, 128), rows, PAD))


# ---- the hand-over -----------------------------------------------------------------------------


def test_a_note_is_kept_only_while_a_wrapper_hands_it_over():
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    P.leave(img, (0, 0, 1, 1), PAD)
    assert P.taken() is None  # no wrapper: nothing kept
    P.hand_over(None)
    P.leave(img, (0, 0, 1, 1), PAD)
    note = P.taken()
    assert note is not None and note.img is img and P.taken() is None
    P.hand_over(note)
    assert P.note_for(img) is note and P.note_for(img.copy()) is None  # this very array only
    P.taken()
    assert P.note_for(img) is None


@TRANSFORMS.register_module(force=True)
class PaintsThePad:
    """A user's transform that draws on the image in place (the same array) where the pad is."""

    def __call__(self, results: dict) -> dict:
        results["img"][:3, :3] = (1, 2, 3)
        return results


TINY_LIKE = [dict(step) for step in YOLOX_LIKE if step["type"] != "MixUp"]  # YOLOX-tiny's steps
TINY_LIKE[1]["scaling_ratio_range"] = (0.5, 1.5)


@pytest.fixture(scope="module")
def wide_coco(tmp_path_factory):
    """Drawn-shapes images 128 wide and 80 high (wider than high, as most of COCO's photos), so that a
    mosaic of them has pad above and below its pictures; annotations to match."""
    root = tmp_path_factory.mktemp("wide_coco")
    ann = make_split(root, "train", 12, seed=25)
    data = json.loads(ann.read_text())
    for image in data["images"]:
        path = str(root / "train" / image["file_name"])
        cv2.imwrite(path, cv2.resize(cv2.imread(path), (128, 80)), [cv2.IMWRITE_JPEG_QUALITY, 95])
        image["height"] = 80
    for a in data["annotations"]:
        a["bbox"][1::2] = [v * 80 / 128 for v in a["bbox"][1::2]]
        a["segmentation"] = [[v * 80 / 128 if i % 2 else v for i, v in enumerate(p)] for p in a["segmentation"]]
        a["area"] *= 80 / 128
    ann.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize(
    "variant", ["yolox_tiny", "yolox_s_scales", "painted_between", "hsv_twice", "mosaic_sometimes", "other_border"]
)
def test_yolox_tiny_samples_equal_mmdets_with_the_pad_skipped(wide_coco, variant):
    """YOLOX-tiny's pipeline (no MixUp: the pixels compared bit for bit) at the images' scale: the warp
    fills rows below the pictures and the colour step converts only around them; a note reaches the
    next transform only (not one after a transform between); a border other than the pad gives none."""
    init_default_scope("mmdet")
    pipeline = at_scale([dict(step) for step in TINY_LIKE], 128)
    if variant == "painted_between":  # (the wrapper hands a user's transform a copy)
        pipeline.insert(2, dict(type="PaintsThePad"))
    if variant == "hsv_twice":  # the second is given the first's image itself, changed: no note
        pipeline.insert(3, dict(type="YOLOXHSVRandomAug"))
    if variant == "yolox_s_scales":  # zoomed out further: pad below the pictures too
        pipeline[1]["scaling_ratio_range"] = (0.1, 2)
    if variant == "mosaic_sometimes":
        pipeline[0]["prob"] = 0.5
    if variant == "other_border":
        pipeline[1]["border_val"] = (114, 114, 115)
    loads = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)]
    cfg = dict(type="MultiImageMixDataset", dataset=coco_cfg(wide_coco, loads), pipeline=pipeline)
    P.SKIPPED.update(hsv_pixels=0, warp_rows=0)
    ours, _ = samples(cfg, True, count=36)
    skipped = dict(P.SKIPPED)
    theirs, _ = samples(cfg, False, count=36)
    assert_same(theirs, ours)
    if variant == "other_border":
        assert skipped == {"hsv_pixels": 0, "warp_rows": 0}
    elif variant == "painted_between":
        assert skipped["hsv_pixels"] == 0 and skipped["warp_rows"] > 0
    else:
        assert skipped["hsv_pixels"] >= 36 * 128**2 // 10, skipped  # a tenth of the pixels or more
        assert skipped["warp_rows"] >= (36 * 128 // 20 if variant == "yolox_s_scales" else 1), skipped
