"""Mask R-CNN's masks through det_mmdet's LoadAnnotations / Resize / RandomFlip against mmdet 3.3.0's.

``FastLoadAnnotations`` and the sparse bitmap rescale and flip (det_mmdet.mask_fast, behind
``FastResize`` and ``FastRandomFlip``) are compared with mmdet's transforms and ``BitmapMasks.rescale``
/ ``flip`` from one seed on equal inputs: polygons of one and several parts, invalid ones, crowd RLE
uncompressed and compressed, empty images, and drawn masks (empty, full, touching every border, values
other than 1, strided views), at the sizes Mask R-CNN's ``Resize(scale=(1333, 800))`` makes and odd
ones; every mask, box, label and flag equal bit for bit, rescaled and mirrored masks C-contiguous uint8.
"""

from __future__ import annotations

import copy
import json

import cv2
import numpy as np
import pytest
import torch
from mmdet.datasets.transforms import LoadAnnotations
from mmdet.datasets.transforms import transforms as T
from mmdet.structures.mask import BitmapMasks
from mmengine.registry import init_default_scope
from pycocotools import mask as mask_utils

from det_mmdet import fast_transforms as F
from det_mmdet import mask_fast
from det_mmdet.mask_fast import FastLoadAnnotations
from det_mmdet.shapes import make_split
from test_fast_transforms import assert_same, coco_cfg, compare, pair, samples, seeded

SEEDS = range(40)


# ---- inputs ----------------------------------------------------------------------------------


def polygon(rng: np.random.Generator, h: int, w: int) -> list[float]:
    """A star-shaped polygon, sometimes reaching past the image (clipped by the rasteriser)."""
    cx, cy = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
    r = rng.uniform(0.02, 0.6) * min(h, w)
    angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 12))))
    radii = r * rng.uniform(0.3, 1.0, len(angles))
    return [
        round(float(v), 2) for a, d in zip(angles, radii, strict=True) for v in (cx + d * np.cos(a), cy + d * np.sin(a))
    ]


def crowd_rle(rng: np.random.Generator, h: int, w: int, compressed: bool) -> dict:
    """A crowd region as COCO stores it: uncompressed counts (a list) or pycocotools' compressed string."""
    bits = np.zeros((h, w), dtype=np.uint8, order="F")
    for _ in range(int(rng.integers(0, 4))):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        bits[y : y + int(rng.integers(1, h)), x : x + int(rng.integers(1, w))] = 1
    rle = mask_utils.encode(bits)
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode() if rng.random() < 0.5 else rle["counts"]}
    flat, counts, value, run = bits.reshape(-1, order="F"), [], 0, 0
    for bit in flat:  # runs of zeros and ones, zeros first, column by column
        if bit != value:
            counts.append(run)
            value, run = bit, 0
        run += 1
    counts.append(run)
    return {"size": [h, w], "counts": counts}


def mask_annotation(rng: np.random.Generator, h: int, w: int):
    kind = rng.choice(
        ["polygon", "parts", "invalid", "some_invalid", "rle", "compressed", "edge"],
        p=[0.4, 0.15, 0.1, 0.1, 0.1, 0.05, 0.1],
    )
    if kind == "polygon":
        return [polygon(rng, h, w)]
    if kind == "parts":
        return [polygon(rng, h, w) for _ in range(int(rng.integers(2, 4)))]
    if kind == "invalid":  # fewer than 3 points / an odd length: mmdet ignores the instance, fakes a mask
        return [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]
    if kind == "some_invalid":
        return [[5.0, 5.0, 9.0], polygon(rng, h, w)]
    if kind == "edge":  # the whole image, or a sliver on its last row / column
        return [
            rng.choice(
                [[0, 0, w, 0, w, h, 0, h], [0, h - 1, w, h - 1, w, h, 0, h], [w - 1, 0, w, 0, w, h, w - 1, h]]
            ).tolist()
        ]
    return crowd_rle(rng, h, w, compressed=kind == "compressed")


def loaded(rng: np.random.Generator, h: int, w: int, n: int) -> dict:
    """A sample as ``CocoDataset`` gives it to ``LoadAnnotations``."""
    instances = []
    for _ in range(n):
        x, y = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
        box = [x, y, min(w, x + rng.uniform(1, w)), min(h, y + rng.uniform(1, h))]
        mask = mask_annotation(rng, h, w)
        instances.append(
            {
                "bbox": box,
                "bbox_label": int(rng.integers(0, 5)),
                "ignore_flag": int(isinstance(mask, dict)),
                "mask": mask,
            }
        )
    return {"img_path": "x.jpg", "ori_shape": (h, w), "img_shape": (h, w), "instances": instances}


def sparse_masks(rng: np.random.Generator, h: int, w: int, n: int, values=(1,)) -> BitmapMasks:
    """Mostly-zero masks: boxes and scattered pixels, some touching the borders, some empty, some full."""
    bits = np.zeros((n, h, w), dtype=np.uint8)
    for mask in bits:
        kind = rng.integers(0, 6)
        if kind == 0:
            continue  # empty
        if kind == 1:
            mask[:] = 1  # full
            continue
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1 = h if kind == 2 else int(rng.integers(y0 + 1, h + 1))
        x1 = w if kind == 3 else int(rng.integers(x0 + 1, w + 1))
        mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.7
        mask[int(rng.integers(0, h)), 0 if kind == 4 else w - 1] = 1  # a lone pixel on the first / last column
    bits *= rng.choice(np.array(values, dtype=np.uint8), (n, 1, 1))
    return BitmapMasks(bits, h, w)


def assert_row_major_uint8(masks: BitmapMasks) -> None:
    assert masks.masks.dtype == np.uint8 and masks.masks.flags.c_contiguous


# ---- LoadAnnotations -------------------------------------------------------------------------


def compared(slow, fast, inputs: dict, seed: int) -> tuple:
    """``compare``, and both outputs (ours too)."""
    theirs = compare(slow, fast, inputs, seed)
    return theirs, seeded(seed, fast, copy.deepcopy(inputs))[0]


def layout(a: np.ndarray) -> list[int]:
    """The strides of the axes longer than 1 (a length-1 axis's stride is arbitrary)."""
    return [s for s, n in zip(a.strides, a.shape, strict=True) if n > 1]


@pytest.mark.parametrize(
    "params",
    [
        dict(with_bbox=True, with_mask=True),
        dict(with_bbox=False, with_mask=True),
        dict(with_bbox=True, with_mask=True, box_type=None),
        dict(with_bbox=True, with_mask=True, poly2mask=False),  # mmdet's code (polygon masks)
        dict(with_bbox=True),  # YOLOX's and RTMDet's: boxes only
    ],
)
def test_load_annotations_equals_mmdet(params):
    slow, fast = pair(LoadAnnotations, FastLoadAnnotations, **params)
    rng = np.random.default_rng(11)
    for seed in SEEDS:
        h, w = (int(v) for v in rng.integers(8, 70, 2))
        theirs, ours = compared(slow, fast, loaded(rng, h, w, int(rng.integers(0, 7)) if seed % 8 else 0), seed)
        if isinstance(theirs.get("gt_masks"), BitmapMasks):  # the same layout too (column-major bitmaps)
            assert layout(ours["gt_masks"].masks) == layout(theirs["gt_masks"].masks)


def test_load_annotations_boxes_of_every_kind_of_number_as_mmdet():
    """numpy rounds each number of the annotation to float32 as torch does: ints, floats between two
    float32 values, large, negative; a sample without instances; ignore flags."""
    slow, fast = pair(LoadAnnotations, FastLoadAnnotations, with_bbox=True)
    rng = np.random.default_rng(14)
    boxes = [[0, 0, 10, 10], [1.1, 2.2, 3.3, 4.4], [1e-8, 0.1, 16777217, 2.0**30 + 1], [-3.5, -0.0, 7, 1 / 3]]
    boxes += [list(rng.uniform(-1e4, 1e4, 4)) for _ in range(20)]
    instances = [dict(bbox=b, bbox_label=i % 3, ignore_flag=i % 4 == 0) for i, b in enumerate(boxes)]
    for chosen in (instances, instances[:1], []):
        ours = compare(slow, fast, dict(img_shape=(9, 9), instances=chosen), 0)
        assert ours["gt_bboxes"].tensor.dtype == torch.float32 and ours["gt_bboxes"].tensor.shape == (len(chosen), 4)


def test_load_annotations_of_mask_rcnn_sized_images():
    slow, fast = pair(LoadAnnotations, FastLoadAnnotations, with_bbox=True, with_mask=True)
    rng = np.random.default_rng(12)
    for seed, (h, w) in enumerate([(480, 640), (640, 480), (427, 640)]):
        compare(slow, fast, loaded(rng, h, w, 12), seed)


def test_load_annotations_rle_of_another_size_as_mmdet():
    """An RLE whose size is not the image's cannot go into one decode call: mmdet's code, mmdet's failure."""
    slow, fast = pair(LoadAnnotations, FastLoadAnnotations, with_mask=True)
    rng = np.random.default_rng(13)
    results = loaded(rng, 20, 30, 2)
    results["instances"][1]["mask"] = crowd_rle(rng, 21, 30, compressed=False)
    assert compare(slow, fast, results, 0).startswith("raised")
    results["instances"] = results["instances"][1:]  # only masks of another size: mmdet's BitmapMasks of them
    assert compare(slow, fast, results, 0).startswith("raised")


def compressed(counts: list[int], h: int, w: int) -> bytes:
    """pycocotools' compressed string of these run lengths (it compresses them without decoding)."""
    return mask_utils.frPyObjects({"counts": counts, "size": [h, w]}, h, w)["counts"]


def test_run_lengths_read_as_pycocotools_writes_them():
    """Every length a number can have (1-6 characters), runs that shrink (a negative difference, its sign
    on the last character), zero-length runs, one run; several strings at once, str or bytes."""
    rng = np.random.default_rng(18)
    cases = [[7], [0, 7], [3, 0, 0, 4], [5, 100, 3, 2, 50], [2**28, 1, 2**28 - 5, 3]]
    cases += [list(rng.integers(0, 10 ** int(rng.integers(1, 9)), int(rng.integers(1, 40)))) for _ in range(60)]
    strings = [compressed([int(c) for c in counts], sum(counts), 1) for counts in cases]
    strings = [s.decode() if i % 2 else s for i, s in enumerate(strings)]
    runs, per_string = mask_fast.run_lengths(strings)
    assert per_string.tolist() == [len(c) for c in cases]
    assert runs.tolist() == [int(c) for counts in cases for c in counts]
    assert max(len(s) for s in strings) > 5 * max(len(c) for c in cases)  # long numbers were in it


def test_decoded_equals_pycocotools_and_declines_what_it_reads_otherwise():
    rng = np.random.default_rng(19)
    for h, w in [(480, 640), (1, 1), (7, 3), (33, 65)]:
        bits = sparse_masks(rng, h, w, 6).masks
        rles = mask_utils.encode(np.asfortranarray(bits.transpose(1, 2, 0)))
        rles += [mask_utils.merge(mask_utils.frPyObjects([polygon(rng, h, w)], h, w)) for _ in range(3)]
        expected = mask_utils.decode(rles).transpose(2, 0, 1)
        ours = mask_fast.decoded(rles, h, w)
        assert ours.dtype == np.uint8 and layout(ours) == layout(expected) and np.array_equal(ours, expected)
    fills = {"size": [4, 3], "counts": compressed([5, 7], 4, 3)}
    assert np.array_equal(mask_fast.decoded([fills], 4, 3), mask_utils.decode([fills]).transpose(2, 0, 1))
    declined = [
        compressed([5, 6], 4, 3),  # runs short of the image: pycocotools leaves bytes unwritten
        compressed([5, 8], 4, 3),  # past it: pycocotools fails
        b"",
        b"5\x7f2",  # a character outside 48-111
        b"5o",  # the last number cut off (0x20 set on the last character)
        b"oooooo0",  # a number of 7 characters
    ]
    for counts in declined:
        assert mask_fast.decoded([fills, {"size": [4, 3], "counts": counts}], 4, 3) is None, counts


# ---- rescale / flip of bitmap masks ----------------------------------------------------------


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (30, 41), (1, 9), (200, 3)])
def test_nearest_index_is_opencvs(size):
    h, w = size
    rng = np.random.default_rng(h * w)
    img = rng.integers(0, 256, (h, w), dtype=np.uint8)
    for new_h, new_w in [(800, 1066), (600, 800), (h, w), (max(1, h // 3), max(1, w // 7)), (h * 2 + 1, w * 3 - 1)]:
        ys, xs = mask_fast.nearest_index(h, new_h, 0), mask_fast.nearest_index(w, new_w, 1)
        expected = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(img[np.ix_(ys, xs)], expected), (h, w, new_h, new_w)


@pytest.mark.parametrize("scale", [(1333, 800), 0.5, 1.0, 2.7, (64, 9)])
def test_rescaled_bitmaps_equal_mmdet(scale):
    rng = np.random.default_rng(14)
    for seed in range(12):
        h, w = [(480, 640), (640, 480)][seed % 2] if seed % 3 == 0 else tuple(int(v) for v in rng.integers(5, 90, 2))
        masks = sparse_masks(rng, h, w, int(rng.integers(0, 5)), values=(1, 255))
        ours = F.rescaled_bitmaps(masks, scale)
        assert_same(masks.rescale(scale), ours)
        assert_row_major_uint8(ours)
    strided = BitmapMasks(sparse_masks(rng, 40, 60, 4).masks[:, ::2, 1::3], 20, 20)  # a view: not contiguous
    assert_same(strided.rescale(1.7), F.rescaled_bitmaps(strided, 1.7))


@pytest.mark.parametrize("direction", ["horizontal", "vertical", "diagonal"])
def test_flipped_bitmaps_equal_mmdet(direction):
    rng = np.random.default_rng(15)
    for seed in range(20):
        h, w = (800, 1066) if seed == 0 else tuple(int(v) for v in rng.integers(1, 60, 2))
        masks = sparse_masks(rng, h, w, int(rng.integers(0, 5)), values=(1, 3))
        loaded_layout = np.asfortranarray(masks.masks.transpose(1, 2, 0)).transpose(2, 0, 1)  # LoadAnnotations'
        for arranged in (masks.masks, loaded_layout):  # mirrored whole by OpenCV; by their nonzero boxes
            same_masks = BitmapMasks(arranged, h, w)
            ours = F.flipped_bitmaps(same_masks, direction)
            assert_same(same_masks.flip(direction), ours)
            assert_row_major_uint8(ours)


def test_nonzero_box_of_any_layout():
    rng = np.random.default_rng(17)
    for _ in range(30):
        masks = sparse_masks(rng, *(int(v) for v in rng.integers(1, 50, 2)), 1).masks
        for mask in (masks[0], np.asfortranarray(masks[0]), masks[0][::-1], masks[0][:, ::2]):
            ys, xs = np.nonzero(mask)
            expected = (0, 0, 0, 0) if not len(ys) else (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)
            assert tuple(mask_fast.nonzero_box(mask)) == tuple(int(v) for v in expected)


def test_non_uint8_masks_take_the_plain_path():
    bits = np.zeros((2, 10, 12), dtype=np.int32)
    bits[0, 2:5, 3:9] = 7
    masks = BitmapMasks(bits, 10, 12)
    assert_same(masks.rescale(1.5), F.rescaled_bitmaps(masks, 1.5))
    assert_same(masks.flip("diagonal"), F.flipped_bitmaps(masks, "diagonal"))


@pytest.mark.parametrize("params", [dict(scale=(1333, 800), keep_ratio=True), dict(scale=(90, 40), keep_ratio=True)])
def test_resize_and_flip_of_loaded_masks_equal_mmdet(params):
    """LoadAnnotations (crowd RLE, invalid polygons, empty images), Resize, RandomFlip: each step mmdet's
    against ours from one seed (ours gets the column-major bitmaps LoadAnnotations makes)."""
    steps = [
        pair(LoadAnnotations, FastLoadAnnotations, with_bbox=True, with_mask=True),
        pair(T.Resize, F.FastResize, **params),
        pair(T.RandomFlip, F.FastRandomFlip, prob=[0.3, 0.3, 0.3], direction=["horizontal", "vertical", "diagonal"]),
    ]
    rng = np.random.default_rng(16)
    for seed in range(6 if params["scale"][0] == 1333 else 24):
        h, w = (480, 640) if seed % 2 else tuple(int(v) for v in rng.integers(10, 80, 2))
        results = loaded(rng, h, w, int(rng.integers(0, 6)))
        results["img"] = np.zeros((h, w, 3), dtype=np.uint8)
        for slow, fast in steps:
            results = compare(slow, fast, results, seed)
        assert_row_major_uint8(results["gt_masks"])


# ---- the built dataset -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def crowd_coco(tmp_path_factory):
    """12 drawn-shapes images (128 px): a crowd object with an uncompressed RLE, one with a compressed
    RLE, an object whose only polygon is invalid, one image without objects."""
    root = tmp_path_factory.mktemp("crowd_coco")
    ann = make_split(root, "train", 12, seed=7)
    data = json.loads(ann.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 3]
    rng = np.random.default_rng(0)
    for a, compressed in zip(data["annotations"][:2], (False, True), strict=True):
        rle = crowd_rle(rng, 128, 128, compressed)
        counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]  # JSON holds text
        a.update(iscrowd=1, segmentation={**rle, "counts": counts})
    data["annotations"][2]["segmentation"] = [[3.0, 4.0, 5.0, 6.0]]
    ann.write_text(json.dumps(data))
    return root


MASK_RCNN_LIKE = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="Resize", scale=(200, 150), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]


def test_mask_rcnn_like_dataset_yields_the_same_samples_either_way(crowd_coco):
    init_default_scope("mmdet")
    cfg = coco_cfg(crowd_coco, MASK_RCNN_LIKE)
    saved = copy.deepcopy(cfg)
    ours, fast_names = samples(cfg, True)
    theirs, slow_names = samples(cfg, False)
    assert cfg == saved
    assert_same(theirs, ours)
    assert {"FastLoadAnnotations", "FastResize", "FastRandomFlip", "FastPackDetInputs"} <= set(fast_names)
    assert not any(n.startswith("Fast") for n in slow_names)
    ignored = sum(len(s["data_samples"].ignored_instances) for s in ours)
    assert ignored >= 3 and any(len(s["data_samples"].gt_instances) == 0 for s in ours)  # crowd, invalid, empty


def test_mixup_still_reads_box_counts_with_the_fast_load_annotations(crowd_coco):
    """MixUp's ``get_indexes`` shortcut still recognises a loading pipeline once LoadAnnotations is swapped."""
    from det_mmdet.data import build_dataset

    init_default_scope("mmdet")
    loads = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)]
    dataset = build_dataset(coco_cfg(crowd_coco, loads), "d", {"fast_transforms": True})
    assert type(dataset.pipeline.transforms[1]) is FastLoadAnnotations
    counts = F.loaded_box_counts(dataset)
    assert counts is not None
    assert [counts(i) for i in range(len(dataset))] == [len(dataset[i]["gt_bboxes"]) for i in range(len(dataset))]
