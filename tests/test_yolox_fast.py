"""det_mmdet.yolox_fast: YOLOX's mosaic partners that the warp never reads are not decoded, and the
built dataset yields mmdet's samples bit for bit (helpers from test_fast_transforms).
"""

from __future__ import annotations

import copy
import random

import cv2
import numpy as np
import pytest
from mmdet.datasets.transforms import transforms as T
from mmengine.registry import init_default_scope

from det_mmdet import fast_transforms as F
from det_mmdet import yolox_fast as Y
from det_mmdet.data import build_dataset
from test_fast_transforms import (
    AFTER_MIXUP,
    YOLOX_LIKE,
    assert_same,
    coco_cfg,
    compare,
    mirrored,
    pair,
    photo,
    sample,
    samples,
    tiny_coco,
)

__all__ = ["tiny_coco"]  # the fixture, shared with test_fast_transforms

# ---- mosaic partners the warp never reads ----------------------------------------------------


def encoded(img: np.ndarray, **pillow) -> bytes:
    """``img`` (BGR) as a JPEG written by Pillow, with ``pillow``'s save options (progressive, exif)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img[..., ::-1])).save(out, "JPEG", quality=90, **pillow)
    return out.getvalue()


def exif(orientation: int | None) -> bytes:
    """Exif data with an orientation (6: turn 90 degrees clockwise, 3: half round), or with none."""
    from PIL import Image

    data = Image.Exif()
    data[0x010F] = "camera"  # a maker: a directory with more than the orientation in it
    if orientation is not None:
        data[0x0112] = orientation
    return data.tobytes()


def test_jpeg_header_gives_the_decoded_size_and_its_turn_or_none():
    rng = np.random.default_rng(15)
    img = photo(rng, 37, 53)
    for data, orientation in (
        (cv2.imencode(".jpg", img)[1].tobytes(), 1),
        (cv2.imencode(".jpg", img[..., 0])[1].tobytes(), 1),  # grayscale: decoded as 3 channels, same size
        (encoded(img, progressive=True), 1),
        (encoded(img, optimize=True), 1),
        (encoded(img, exif=exif(None)), 1),
        (encoded(img, exif=exif(1)), 1),
        (encoded(img, exif=exif(3)), 3),  # turned half round: the same size
    ):
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert Y.jpeg_header(data) == (decoded.shape[:2], orientation) and decoded.shape[:2] == (37, 53)
    turned = encoded(img, exif=exif(6))
    assert cv2.imdecode(np.frombuffer(turned, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (53, 37)
    assert Y.jpeg_header(turned) == ((37, 53), 6)  # a quarter turn: part_read leaves it to OpenCV
    plain = cv2.imencode(".jpg", img)[1].tobytes()
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"
    xmp_first = plain[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + plain[2:]
    assert cv2.imdecode(np.frombuffer(xmp_first, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (37, 53)
    assert Y.jpeg_header(xmp_first) is None  # a first APP1 block that is not Exif: OpenCV would parse it as Exif
    assert Y.jpeg_header(cv2.imencode(".png", img)[1].tobytes()) is None
    assert Y.jpeg_header(cv2.imencode(".jpg", img)[1].tobytes()[:100]) is None  # cut before its frame header
    assert Y.jpeg_header(b"") is None


@pytest.fixture(scope="module")
def turned_coco(tiny_coco, tmp_path_factory):
    """tiny_coco with an image saved with an Exif orientation that turns it (its size unknown from the
    header), one turned half round (the same size: decoded whole, by OpenCV) and a grayscale one."""
    import shutil

    root = tmp_path_factory.mktemp("turned_coco")
    shutil.copytree(tiny_coco, root, dirs_exist_ok=True)
    first, second, third = sorted((root / "train").glob("*.jpg"))[:3]
    first.write_bytes(encoded(cv2.imread(str(first)), exif=exif(6)))
    second.write_bytes(encoded(cv2.imread(str(second)), exif=exif(3)))
    third.write_bytes(cv2.imencode(".jpg", cv2.imread(str(third), cv2.IMREAD_GRAYSCALE))[1].tobytes())
    return root


def at_scale(pipeline: list[dict], size: int) -> list[dict]:
    """``pipeline`` at the images' own size (the mosaic pastes them unresized), its borders to match."""
    for step in pipeline:
        if "img_scale" in step:
            step["img_scale"] = (size, size)
        if step["type"] == "RandomAffine":
            step["border"] = (-size // 2, -size // 2)
        if step["type"] == "Resize":
            step["scale"] = (size, size)
    return pipeline


def yolox_like(mosaic: dict | None = None, affine: dict | None = None) -> list[dict]:
    pipeline = [dict(step) for step in YOLOX_LIKE]
    pipeline[0].update(mosaic or {})
    pipeline[1].update(affine or {})
    return pipeline


@pytest.mark.parametrize(
    "variant",
    [
        "yolox_s",
        "yolox_tiny",
        "yolox_tiny_at_scale",
        "yolox_s_at_scale",
        "mosaic_sometimes",
        "centre_anywhere",
        "affine_skipped",
        "not_loading_only",
        "ignore_empty",
    ],
)
def test_partners_the_warp_never_reads_are_not_decoded_and_samples_stay_the_same(turned_coco, variant):
    init_default_scope("mmdet")
    loads = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)]
    pipeline = {
        "yolox_s": yolox_like(),
        "yolox_tiny": yolox_like(affine=dict(scaling_ratio_range=(0.5, 1.5))),
        "yolox_tiny_at_scale": at_scale(yolox_like(affine=dict(scaling_ratio_range=(0.5, 1.5))), 128),
        "yolox_s_at_scale": at_scale(yolox_like(), 128),
        "mosaic_sometimes": yolox_like(mosaic=dict(prob=0.5)),
        "centre_anywhere": yolox_like(mosaic=dict(center_ratio_range=(0.0, 2.0)), affine=dict(max_rotate_degree=60)),
        "affine_skipped": yolox_like(),
        "not_loading_only": yolox_like(),
        "ignore_empty": yolox_like(),  # an unreadable file makes mmdet's dataset draw another index
    }[variant]
    if variant == "not_loading_only":
        loads = [*loads, dict(type="RandomFlip", prob=0.5)]
    if variant == "ignore_empty":
        loads[0]["ignore_empty"] = True
    cfg = dict(type="MultiImageMixDataset", dataset=coco_cfg(turned_coco, loads), pipeline=pipeline)
    if variant == "affine_skipped":
        cfg["skip_type_keys"] = ["RandomAffine"]
    Y.SKIPPED.update(decodes=0, canvases=0, rows=0, columns=0)
    F.IN_PLACE["pastes"] = 0
    ours, fast_names = samples(cfg, True, count=36)
    skipped, parts, rows, columns = (Y.SKIPPED[k] for k in ("decodes", "canvases", "rows", "columns"))
    placed = F.IN_PLACE["pastes"]
    theirs, slow_names = samples(cfg, False, count=36)
    assert_same(theirs, ours, pixels=AFTER_MIXUP)
    assert {"FastMultiImageMixDataset", "FastMosaic"} <= set(fast_names)
    assert not any(n.startswith("Fast") for n in slow_names)  # data.fast_transforms: false gives mmdet's own
    if variant in ("affine_skipped", "not_loading_only", "ignore_empty"):
        assert skipped == parts == rows == columns == placed == 0
    elif variant.endswith("_at_scale"):  # pieces pasted as they are: only the part the warp reads decoded
        assert rows >= 36 * 128 // 4, rows  # a quarter of a main image's rows a sample, on average
        assert columns >= 36 * 128 // 4, columns  # and of its columns
        assert skipped >= 10, skipped
        assert placed >= 36, placed  # decoded where the mosaic pastes them: nothing to paste
    else:
        assert skipped >= 10, skipped  # a third of the 108 partners or so
        assert parts >= 5, parts  # mosaics made only where the warp reads


def test_numpy_stream_tells_whether_the_next_draws_are_the_ones_foreseen():
    assert Y.MT_LAYOUT_HOLDS  # the 1.5 us read, not a fallback, is what runs here
    np.random.seed(3)
    start, state = Y.numpy_stream(), np.random.get_state()
    assert Y.same_stream(start, Y.numpy_stream())
    generator = np.random.get_bit_generator()
    for draw in (
        lambda: np.random.uniform(0, 1),
        lambda: np.random.randint(0, 10, 3),
        lambda: np.random.standard_normal(),
        lambda: generator.random_raw(624),  # the same position, the key renewed
        lambda: np.random.seed(4),  # another seed
    ):
        draw()
        assert not Y.same_stream(start, Y.numpy_stream())
        np.random.set_state(state)
        assert Y.same_stream(start, Y.numpy_stream())
    np.random.uniform(0, 1)
    moved = Y.numpy_stream()
    np.random.set_state(state)
    np.random.uniform(0, 1)
    assert Y.same_stream(moved, Y.numpy_stream())  # the same draws from the same place: the same stream
    np.random.set_bit_generator(np.random.PCG64(3))
    try:  # another generator: never the same (the look-ahead is redone, mosaics made whole)
        assert Y.numpy_stream() is None and not Y.same_stream(None, None)
    finally:
        np.random.set_bit_generator(generator)


def test_put_back_gives_the_draws_set_state_gives():
    """The stream saved ahead and put back (MT19937's key and position written back) draws as after
    ``set_state``: the same uniform, integer and Gaussian numbers (a cached Gaussian kept: the draws made
    ahead draw none), also across a renewed key; another bit generator goes through ``get_state``."""
    generator = np.random.get_bit_generator()
    try:
        for kind in ("mt19937", "pcg64"):
            draws = []
            for ours in (False, True):
                if kind == "mt19937":
                    np.random.set_bit_generator(generator)
                    np.random.seed(5)
                else:
                    np.random.set_bit_generator(np.random.PCG64(5))
                np.random.standard_normal()  # one Gaussian left cached
                saved = Y.saved_stream() if ours else np.random.get_state()
                assert not ours or isinstance(saved, bytes) == (kind == "mt19937")
                [np.random.randint(0, 1000) for _ in range(3)]  # the draws made ahead
                np.random.uniform(size=700)  # past the end of the key: renewed
                Y.put_back(saved) if ours else np.random.set_state(saved)
                draws.append((np.random.standard_normal(), np.random.uniform(size=5), np.random.randint(0, 99, 4)))
            assert all(np.array_equal(a, b) for a, b in zip(*draws, strict=True)), kind
    finally:
        np.random.set_bit_generator(generator)


def test_partners_redo_the_look_ahead_where_numpy_drew_in_between(turned_coco):
    init_default_scope("mmdet")
    loads = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)]
    cfg = dict(type="MultiImageMixDataset", dataset=coco_cfg(turned_coco, loads), pipeline=yolox_like())
    wrapper = build_dataset(cfg, "train_dataloader.dataset", {"fast_transforms": True})
    mosaic = wrapper.pipeline[0]
    for disturbed in (False, True):
        np.random.seed(5)
        Y.first_sample(wrapper, 0, lambda sample: sample)
        foreseen = wrapper.shown_ahead[2]
        if disturbed:
            np.random.uniform(0, 1)  # a draw the look-ahead did not foresee
        indexes = mosaic.get_indexes(wrapper.dataset)
        now = Y.shown_region(wrapper, mosaic)
        Y.partners(wrapper, mosaic, indexes, lambda sample: sample)
        assert mosaic.shown_hint[1] == now[7]
        assert (now[:6] != foreseen[:6]) == disturbed  # (the draws did move: the check is what redid it)


@pytest.mark.parametrize("disturbed", [False, True])
def test_the_warp_takes_the_matrix_the_look_ahead_drew_where_the_stream_is_the_same(monkeypatch, disturbed):
    """``FastRandomAffine.drawn_matrix``: after the look-ahead (``drawn_region``, numpy's state put back)
    and the mosaic's own draws, the warp's matrix is the one foreseen, not drawn again, and numpy's stream
    goes on from where mmdet's draw leaves it; after a draw nobody foresaw, it is drawn (mmdet's)."""
    mosaic = F.FastMosaic(img_scale=(640, 640))
    affine = Y.FastRandomAffine(scaling_ratio_range=(0.5, 1.5), border=(-320, -320))

    def mosaic_draws():  # FastMosaic's, in its order: whether to mix, then the centre
        np.random.uniform(0, 1)
        np.random.uniform(*mosaic.center_ratio_range)
        np.random.uniform(*mosaic.center_ratio_range)
        if disturbed:
            np.random.uniform(0, 1)

    np.random.seed(4)
    mosaic_draws()
    wanted = affine._get_random_homography_matrix(640, 640)
    after = np.random.random(3)
    np.random.seed(4)
    state = Y.saved_stream()
    assert Y.drawn_region(mosaic, affine) not in (None, "none")
    Y.put_back(state)
    mosaic_draws()
    drawn = []
    mmdets = affine._get_random_homography_matrix
    monkeypatch.setattr(affine, "_get_random_homography_matrix", lambda h, w: drawn.append(1) or mmdets(h, w))
    assert np.array_equal(affine.drawn_matrix(640, 640), wanted)
    assert np.array_equal(np.random.random(3), after)
    assert len(drawn) == disturbed


def test_the_warp_reads_nothing_outside_read_region():
    """Pixels outside ``read_region`` changed, the warped image stays the same (YOLOX-s sizes and matrices)."""
    rng = np.random.default_rng(16)
    mosaic = photo(rng, 1280, 1280)
    transform = T.RandomAffine(scaling_ratio_range=(0.1, 2), border=(-320, -320), max_rotate_degree=30)
    random.seed(1)
    np.random.seed(1)
    partial = 0
    for _ in range(16):
        matrix = transform._get_random_homography_matrix(640, 640)
        x1, y1, x2, y2 = Y.read_region(matrix, 640, 640)
        scribbled = 255 - mosaic
        scribbled[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = mosaic[max(y1, 0) : y2, max(x1, 0) : x2]
        wanted = cv2.warpPerspective(mosaic, matrix, dsize=(640, 640), borderValue=(114, 114, 114))  # mmdet's call
        assert_same(wanted, cv2.warpPerspective(scribbled, matrix, dsize=(640, 640), borderValue=(114, 114, 114)))
        partial += x2 < 1280 or y2 < 1280
    assert partial >= 4  # zoomed in: a part of the mosaic only


def test_warp_is_mmdets_warp_perspective_bit_for_bit():
    """``warp`` (``cv2.warpAffine`` where this OpenCV's two warps agree) gives the pixels of mmdet's
    ``cv2.warpPerspective`` call on YOLOX's matrices (scale 0.1-2, rotations, shears), whole outputs and
    their first rows into a given array; a matrix whose last row is not (0, 0, 1) is warped in perspective."""
    rng = np.random.default_rng(17)
    mosaic = photo(rng, 1280, 1280)
    transform = T.RandomAffine(scaling_ratio_range=(0.1, 2), border=(-320, -320), max_rotate_degree=30)
    random.seed(2)
    np.random.seed(2)
    for _ in range(12):
        matrix = transform._get_random_homography_matrix(640, 640)
        wanted = cv2.warpPerspective(mosaic, matrix, dsize=(640, 640), borderValue=(114, 114, 114))
        assert_same(wanted, Y.warp(mosaic, matrix, (640, 640), (114, 114, 114)))
        out = np.zeros((640, 640, 3), dtype=np.uint8)
        rows = int(rng.integers(1, 640))
        Y.warp(mosaic, matrix, (640, rows), (114, 114, 114), dst=out[:rows])
        assert_same(wanted[:rows], out[:rows])
    tilted = np.array([[1.0, 0.1, 3.5], [0.05, 0.9, -7.25], [1e-4, 2e-4, 1.0]], dtype=np.float32)
    wanted = cv2.warpPerspective(mosaic, tilted, dsize=(640, 640), borderValue=(114, 114, 114))
    assert_same(wanted, Y.warp(mosaic, tilted, (640, 640), (114, 114, 114)))


def test_the_warps_agree_on_this_opencv_and_warp_takes_the_affine_one(monkeypatch):
    """OpenCV 4.11 and later (requirements.txt allows 4.8): the check finds the two warps the same, and
    ``warp`` then warps affinely. (OpenCV 4.10's fixed-point warps differ: there the check is false and
    ``warp`` warps in perspective, as mmdet.)"""
    version = tuple(int(part) for part in cv2.__version__.split(".")[:2])
    assert Y.affine_warps_agree() == (version >= (4, 11))
    called, affine = [], cv2.warpAffine

    def counted(*args, **kwargs):
        called.append("affine")
        return affine(*args, **kwargs)

    monkeypatch.setattr(cv2, "warpAffine", counted)
    monkeypatch.setattr(Y, "_AGREE", [True])
    Y.warp(np.zeros((8, 8, 3), np.uint8), np.eye(3, dtype=np.float32), (8, 8), (0, 0, 0))
    assert called == ["affine"]
    monkeypatch.setattr(Y, "_AGREE", [False])
    assert Y.warp(np.ones((8, 8, 3), np.uint8), np.eye(3, dtype=np.float32), (8, 8), (0, 0, 0)).sum() == 192
    assert called == ["affine"]


@pytest.mark.parametrize("masks", [None, "bitmap", "polygon"])
def test_resize_of_an_image_already_at_its_size_equals_mmdet(masks):
    """YOLOX's Resize after RandomAffine: the image is kept (OpenCV would copy it), all else as mmdet's."""
    slow, fast = pair(T.Resize, F.FastResize, scale=(64, 64), keep_ratio=True)
    rng = np.random.default_rng(17)
    kept = 0
    for seed in range(16):
        h, w = [(64, 64), (48, 64), (64, 40), (30, 30)][seed % 4]  # the last one is resized
        results = mirrored(rng, sample(rng, h, w, int(rng.integers(0, 4)), masks), seed)
        kept += F.is_color_uint8(results["img"]) and F.at_size(results["img"], (64, 64))
        compare(slow, fast, results, seed)
    assert kept >= 6  # (float and one-channel images: mmdet's code)


# ---- RandomAffine's boxes in numpy -----------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        dict(scaling_ratio_range=(0.1, 2), border=(-32, -32), max_rotate_degree=30, max_shear_degree=10),
        dict(scaling_ratio_range=(0.5, 1.5), border=(-16, -8), bbox_clip_border=False),
        dict(max_translate_ratio=0.5, border_val=(0, 50, 255)),
    ],
)
def test_random_affine_equals_mmdet_bit_for_bit(params):
    """Same draws, pixels and boxes (every bit of every coordinate, zeros' signs included), labels and
    flags; empty and all-outside box sets, numpy boxes (mmdet's autocast) and one-channel images too."""
    slow, fast = pair(T.RandomAffine, Y.FastRandomAffine, **params)
    rng = np.random.default_rng(18)
    kept = emptied = 0
    for seed in range(60):
        results = sample(rng, 96, 128, [0, 1, 3, 12][seed % 4], numpy_boxes=seed % 5 == 0)
        if seed % 7 == 6:
            results["img"] = results["img"][..., 0]
        compare(slow, fast, results, seed)
        random.seed(seed)
        np.random.seed(seed)
        a, b = slow(copy.deepcopy(results)), None
        random.seed(seed)
        np.random.seed(seed)
        b = fast(copy.deepcopy(results))
        bits = [
            np.asarray(r["gt_bboxes"].tensor if hasattr(r["gt_bboxes"], "tensor") else r["gt_bboxes"]) for r in (a, b)
        ]
        assert bits[0].tobytes() == bits[1].tobytes()
        kept += len(bits[0])
        emptied += len(bits[0]) == 0 < len(results["gt_bboxes_labels"])
    assert kept >= 60 and emptied >= 1, (kept, emptied)


def test_random_affine_with_masks_fails_as_mmdets():
    slow, fast = pair(T.RandomAffine, Y.FastRandomAffine)
    results = sample(np.random.default_rng(19), 32, 32, 2, masks="bitmap")
    for transform in (slow, fast):
        with pytest.raises(NotImplementedError, match="only supports bbox"):
            transform(copy.deepcopy(results))
