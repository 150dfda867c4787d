"""YOLOX's pipeline faster with the same outputs: of the mosaic's four images only the part the
affine warp reads is decoded (none of an image it never shows), the mosaic is made only where the
warp reads it, and the warp's boxes are moved in numpy (:class:`FastRandomAffine`).

YOLOX warps its 2x-sized mosaic with a random affine matrix that
scales about the canvas's top-left corner (scale 0.1-2 for YOLOX-s): when it zooms in, the warp
reads only the top-left part of the mosaic, and often no pixel of one to three of the other three
images. ``FastMultiImageMixDataset`` loads a ``FastMosaic``'s first image (:func:`first_sample`)
and its partners (:func:`partners`) here: the mosaic's choice of partners and the mosaic's and the
affine's random numbers are drawn ahead, on a copy of numpy's random state (the three transforms
draw from ``numpy.random`` and nothing draws in between), giving the part of the mosaic the warp
reads (the output's corners mapped back, a margin for the bilinear neighbours). Each image pasted
there unresized has only the rows and columns that part covers decoded (:mod:`jpeg_rows`,
libjpeg-turbo: the pixels OpenCV decodes, bit for bit); one pasted outside it has its annotations
loaded but not its pixels. Their boxes are the same (they need only the image's size, from the
JPEG's frame header); the pixels not decoded are never read. Only where the pipeline is exactly
``FastMosaic`` then ``RandomAffine`` (neither skipped), the inner dataset only loads (mmengine's
``BaseDataset``, ``LoadImageFromFile`` with defaults and ``LoadAnnotations`` for boxes), and
the image is a JPEG whose frame header gives its size (no Exif block, or one whose orientation
keeps the size: OpenCV turns images by it; parts are decoded apart only with no turn at all, and
only from 8-bit YCbCr JPEGs); anything else is decoded whole by OpenCV as before (from the bytes
already read for the header: each file is read once). A corrupt image, or a corrupt part of one,
that is never shown is not noticed, where mmdet's decode would fail on it. Where that part is under
half the mosaic, :func:`shown_canvas` has ``FastMosaic`` fill and paste only inside it (checked to
be the call foreseen: numpy's random state is where the look ahead left it after the mosaic's draws).
The parts of images pasted unresized (COCO's, at most 640 a side, into YOLOX's 640 mosaics) are
decoded straight into their places on the canvas, a :class:`Board` with room around it for the parts
of pieces that lie off it, so that the mosaic has nothing to paste (1.3 MB a YOLOX-tiny sample here).

The warp itself is ``cv2.warpAffine`` on the first two rows of ``RandomAffine``'s matrix (its last
row is exactly ``(0, 0, 1)``) where this OpenCV gives ``cv2.warpPerspective``'s pixels that way
(:func:`warp`; OpenCV 4.11 and later, checked once a process): 14% faster on a 640x640 warp here.

Measured alternatives, kept out because they cannot give mmdet's pixels or gain too little: MixUp's
float64 jitter resize goes through Intel IPP inside OpenCV (``cv2.ipp.useIPP()``), whose
coefficients are not OpenCV's documented ``(dx + 0.5) * scale - 0.5`` in float (values differ by up
to 6e-4 from that formula), so neither a window-only resize nor an 8-bit or float32 resize can
reproduce its truncated values; det-mmdet makes it in float32 within one level instead
(``crop_resize.TruncatedLater``). Pillow's decoder gives OpenCV's pixels at the same speed (1.1 ms a
640x480 JPEG here); ``simplejpeg`` decodes the same pixels as ``cv2.imdecode``, only 8% faster, and
ignores the Exif orientation that OpenCV applies. Decoding only the rows the warp reads through
Pillow: it stops early given a shorter tile, but then reports a broken stream, and its RGB output
costs a conversion (0.3 ms) that eats most of the gain.
"""

from __future__ import annotations

import ctypes
import inspect
import math
from dataclasses import dataclass
from typing import Any

import cv2
import mmcv
import mmengine
import numpy as np
import torch
from mmdet.datasets.transforms import transforms as mmdet_transforms
from mmdet.registry import TRANSFORMS
from mmdet.structures.bbox import HorizontalBoxes, autocast_box_type

from det_mmdet import fast_transforms, jpeg_rows, pad_outside

AFFINE_ROW = np.array([0.0, 0.0, 1.0], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Mosaic partners the warp never reads


def first_sample(wrapper: Any, index: int, take: Any) -> dict:
    """``wrapper.dataset[index]``, the sample the wrapper's pipeline starts from. Where that pipeline
    starts with a ``FastMosaic`` the warp follows (see :func:`shown_region`), the sample goes to the
    mosaic's top-left corner and its image is decoded like a partner's: only the part the warp reads.
    That part is worked out after the mosaic's choice of partners (``get_indexes``: mmdet's draws from
    numpy's random state, made here on a copy of it) and kept for :func:`partners`, which uses it
    where numpy's random state is the one foreseen."""
    wrapper.__dict__.pop("shown_ahead", None)
    mosaic = next(iter(wrapper.pipeline), None)
    skipped = wrapper._skip_type_keys or ()
    affine = None if mosaic is None or wrapper.pipeline_types[0] in skipped else following_warp(wrapper, mosaic)
    mmdets = inspect.getattr_static(mmdet_transforms.Mosaic, "get_indexes")
    if affine is None or inspect.getattr_static(type(mosaic), "get_indexes") is not mmdets:
        return take(wrapper.dataset[index])
    state = saved_stream()
    try:
        mosaic.get_indexes(wrapper.dataset)  # three draws of numpy's randint, nothing else
        drawn, shown = numpy_stream(), drawn_region(mosaic, affine)
    finally:
        put_back(state)
    if shown is None or shown == "none":  # the whole image: warped itself, or not knowable ahead
        return take(wrapper.dataset[index])
    board = mosaic_board(mosaic, shown[4:6])
    wrapper.shown_ahead = (mosaic, drawn, shown, board)
    return partner(wrapper.dataset, mosaic, index, fast_transforms.MOSAIC_LOCATIONS[0], shown, board)


def partners(wrapper: Any, transform: Any, indexes: list[int], take: Any) -> list[dict]:
    """The samples ``transform`` (a mixing transform of ``wrapper``'s pipeline) mixes in: those of
    ``indexes`` loaded, of a ``FastMosaic``'s partners only the part the following warp reads."""
    ahead = wrapper.__dict__.pop("shown_ahead", None)
    if ahead is not None and ahead[0] is transform and same_stream(ahead[1], numpy_stream()):
        shown, board = ahead[2:]
    else:  # (the first piece, if placed, is pasted from where it lies)
        shown, board = shown_region(wrapper, transform), None
    transform.__dict__.pop("shown_hint", None)
    if shown is None:
        return [take(wrapper.dataset[index]) for index in indexes]
    if shown != "none":  # numpy's random state after the mosaic's draws, the part read, the pieces' board
        transform.shown_hint = (*shown[6:], board)
    return [partner(wrapper.dataset, transform, i, loc, shown, board) for i, loc in zip(indexes, LOCS, strict=True)]


LOCS = fast_transforms.MOSAIC_LOCATIONS[1:]  # where the three partners go


def partner(dataset: Any, mosaic: Any, index: int, loc: str, shown: Any, board: Board | None = None) -> dict:
    """``dataset[index]`` (its pipeline on its annotations), the image decoded from the bytes read for
    its frame header (not read twice) by :func:`piece_image`, where it can be into its place on
    ``board``."""
    results = dataset.get_data_info(index)
    load = dataset.pipeline.transforms[0]
    data = mmengine.fileio.get(results["img_path"], backend_args=load.backend_args)
    part = part_read(mosaic, loc, data, shown)
    out = None if board is None or part is None else board.place(mosaic, loc, shown[4:6], part[4:6])
    results["img"] = piece_image(data, results["img_path"], load, part, out)
    results["img_shape"] = results["ori_shape"] = results["img"].shape[:2]
    for t in dataset.pipeline.transforms[1:]:
        results = t(results)
    return results


def piece_image(
    data: bytes, path: str, load: Any, part: tuple[int, ...] | None, out: np.ndarray | None = None
) -> np.ndarray:
    """The image ``LoadImageFromFile`` decodes from ``data``, where of the image of ``part[4:]`` (height,
    width) only rows ``part[0]`` to ``part[1]`` and columns ``part[2]`` to ``part[3]`` are read later:
    those decoded (:mod:`jpeg_rows`), into ``out`` where given (its place on a :class:`Board`), the
    others left as they are (never read). ``part`` None: all of it, by OpenCV."""
    if part is not None:
        first, last, left, right, height, width = part
        if first >= last or left >= right:
            SKIPPED["decodes"] += 1
            return np.empty((height, width, 3), dtype=np.uint8) if out is None else out
        img = jpeg_rows.decode(data, (height, width), first, last, left, right, out=out)
        if img is not None:
            SKIPPED["rows"] += height - (last - first)
            SKIPPED["columns"] += width - (right - left)
            return img
    img = mmcv.imfrombytes(data, flag=load.color_type, backend=load.imdecode_backend)
    assert img is not None, f"failed to load image: {path}"  # LoadImageFromFile's check
    return img


SKIPPED = {"decodes": 0, "canvases": 0, "rows": 0, "columns": 0}  # pieces not decoded, mosaics in part, rows, columns


def part_read(mosaic: Any, loc: str, data: bytes, shown: Any) -> tuple[int, ...] | None:
    """(first row, last row, first column, last column, height, width): the part of the image of
    ``data`` that the warp reads once it is pasted at ``loc`` (ends excluded; empty: none); None where
    that is not known or it reads all of it."""
    header = jpeg_header(data)
    if header is None or not 1 <= header[1] <= 4:  # not known ahead: OpenCV's size
        return None
    (height, width), orientation = header
    if shown == "none":  # no mosaic: a partner is never read
        return 0, 0, 0, 0, height, width
    center, (out_w, out_h) = shown[4:6], mosaic.img_scale
    scale = min(out_h / height, out_w / width)
    size = (int(width * scale), int(height * scale))
    (x1, y1, x2, y2), (cut_x1, cut_y1, _, _) = mosaic._mosaic_combine(loc, center, size)
    if not (x1 < x2 and y1 < y2 and x1 < shown[2] and x2 > shown[0] and y1 < shown[3] and y2 > shown[1]):
        return 0, 0, 0, 0, height, width
    if size != (width, height) or orientation != 1:  # resized (neighbour pixels read) or turned: all of it
        return None
    top, bottom = max(y1, shown[1]) - y1 + cut_y1, min(y2, shown[3]) - y1 + cut_y1
    left, right = max(x1, shown[0]) - x1 + cut_x1, min(x2, shown[2]) - x1 + cut_x1
    return top, bottom, left, right, height, width


def shown_region(wrapper: Any, mosaic: Any) -> Any:
    """The mosaic's part (x1, y1, x2, y2, centre x, centre y, where numpy's random stream is after the
    mosaic's draws (:func:`numpy_stream`), the part again) that the next transform's warp reads,
    ``"none"`` where the mosaic will not be made, None where this cannot be worked out ahead."""
    affine = following_warp(wrapper, mosaic)
    if affine is None:
        return None
    state = saved_stream()
    try:
        return drawn_region(mosaic, affine)
    finally:
        put_back(state)


def following_warp(wrapper: Any, mosaic: Any) -> Any:
    """The ``RandomAffine`` right after ``mosaic`` (a ``FastMosaic`` of ``wrapper``'s pipeline, loading
    lazily, see :func:`lazy_loading`) where it is not skipped; else None."""
    steps = list(wrapper.pipeline)
    if type(mosaic) is not fast_transforms.FastMosaic or not lazy_loading(wrapper.dataset):
        return None
    at = next((i for i, t in enumerate(steps) if t is mosaic), None)
    if (
        at is None
        or at + 1 >= len(steps)
        or type(steps[at + 1]) not in (mmdet_transforms.RandomAffine, FastRandomAffine)
    ):
        return None
    skipped = wrapper._skip_type_keys or ()
    return None if wrapper.pipeline_types[at + 1] in skipped else steps[at + 1]


def drawn_region(mosaic: Any, affine: Any) -> Any:
    """:func:`shown_region` from the draws ``FastMosaic.transform`` and ``RandomAffine.transform`` make,
    in their order, made here on numpy's random state (the caller puts it back)."""
    width, height = mosaic.img_scale
    if np.random.uniform(0, 1) > mosaic.prob:
        return "none"
    center = (
        int(np.random.uniform(*mosaic.center_ratio_range) * width),
        int(np.random.uniform(*mosaic.center_ratio_range) * height),
    )
    drawn = numpy_stream()  # where FastMosaic will be after its draws
    out_h, out_w = int(height * 2) + affine.border[1] * 2, int(width * 2) + affine.border[0] * 2
    matrix = affine._get_random_homography_matrix(out_h, out_w)
    if isinstance(affine, FastRandomAffine):  # its draw, made: kept for it (FastRandomAffine.drawn_matrix)
        affine.foreseen = (drawn, numpy_stream(), (out_h, out_w), matrix)
    if out_h <= 0 or out_w <= 0 or not np.array_equal(matrix[2], AFFINE_ROW):
        return None
    region = read_region(matrix, out_w, out_h)
    return (*region, *center, drawn, region)


def read_region(matrix: np.ndarray, out_w: int, out_h: int, margin: int = 3) -> tuple[int, int, int, int]:
    """The source pixels (x1, y1, x2, y2; ends excluded) a bilinear warp by the affine ``matrix`` (last
    row 0, 0, 1) to ``out_w`` x ``out_h`` can read: the output's corners mapped back, widened by
    ``margin`` for the neighbours and OpenCV's rounding (1/32 pixel). In Python floats (a tenth of
    numpy's time on 3 x 3 arrays)."""
    (a, b, c), (d, e, f) = matrix[:2].tolist()
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det  # the inverse's 2 x 2 part
    corners = [(x - c, y - f) for x in (0, out_w - 1) for y in (0, out_h - 1)]
    xs = [ia * x + ib * y for x, y in corners]
    ys = [id_ * x + ie * y for x, y in corners]
    return (
        math.floor(min(xs)) - margin,
        math.floor(min(ys)) - margin,
        math.ceil(max(xs)) + margin + 1,
        math.ceil(max(ys)) + margin + 1,
    )


def lazy_loading(dataset: Any) -> bool:
    """Whether ``dataset[i]`` is mmengine's annotations through ``LoadImageFromFile`` (defaults: colour,
    OpenCV, no file client), then only ``LoadAnnotations`` (or its fast version) for boxes."""
    from mmcv.transforms import LoadImageFromFile
    from mmdet.datasets.transforms import LoadAnnotations

    if not fast_transforms.fresh_samples(dataset):
        return False
    first, *rest = dataset.pipeline.transforms
    plain = type(first) is LoadImageFromFile and first.file_client_args is None and not first.to_float32
    plain = plain and not first.ignore_empty  # (an unreadable file: mmdet's dataset draws another index)
    plain = plain and first.color_type == "color" and first.imdecode_backend == "cv2"
    annotations = (LoadAnnotations, fast_transforms.FAST.get(LoadAnnotations))
    return plain and all(type(t) in annotations and not (t.with_mask or t.with_seg) for t in rest)


def jpeg_header(data: bytes) -> tuple[tuple[int, int], int] | None:
    """((height, width), Exif orientation) of a JPEG, from its frame header and a first APP1 block
    (which OpenCV reads as Exif, to turn the image by its orientation; 1 where there is none); None
    where that is not certain: not a JPEG, or a first APP1 block that is not Exif it can read."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, size, orientation = 2, None, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: every header block has been seen
            return None if size is None else (size, orientation or 1)
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and orientation is None:
            orientation = exif_orientation(data[pos + 4 : pos + 2 + length])
            if orientation is None:
                return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and pos + 9 <= len(data):
            height, width = (
                int.from_bytes(data[pos + 5 : pos + 7], "big"),
                int.from_bytes(data[pos + 7 : pos + 9], "big"),
            )
            if not (height and width):
                return None
            size = (height, width)
        pos += 2 + length
    return None


def exif_orientation(block: bytes) -> int | None:
    """The orientation (first directory, tag 0x0112) of an APP1 block that is Exif: 1 where absent,
    None where the block is not Exif or the value is not one of Exif's eight."""
    tiff = block[6:]
    if block[:6] != b"Exif\x00\x00" or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "little" if tiff[:2] == b"II" else "big"
    start = int.from_bytes(tiff[4:8], order)
    if start + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[start : start + 2], order)
    for entry in range(start + 2, start + 2 + 12 * count, 12):
        if entry + 12 > len(tiff):
            return None
        if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
            kind, n = (
                int.from_bytes(tiff[entry + 2 : entry + 4], order),
                int.from_bytes(tiff[entry + 4 : entry + 8], order),
            )
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if (kind, n) == (3, 1) and 1 <= value <= 8 else None
    return 1


def shown_canvas(
    mosaic: Any, shape: tuple[int, ...], dtype: Any, pieces: list
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(A mosaic canvas made only where the next warp reads it, or None; the canvas of the pieces'
    :class:`Board`, or None). The first: the pieces' pixels pasted there (those decoded in place stay),
    the pad colour where none goes (the rest as it is; the warp never reads it), for a ``FastMosaic``
    whose :func:`partners` worked out that part for this very call (numpy's random state is where it
    was foreseen after the mosaic's draws) and where the part is under half the canvas. The second,
    for such a call, whatever the part's size."""
    hint = mosaic.__dict__.pop("shown_hint", None)
    if hint is None or len(shape) != 3 or not same_stream(hint[0], numpy_stream()):
        return None, None
    board = hint[2].canvas() if hint[2] is not None else None
    board = board if board is not None and board.shape == tuple(shape) and board.dtype == dtype else None
    x1, y1, x2, y2 = hint[1]
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, shape[1]), min(y2, shape[0])
    if max(x2 - x1, 0) * max(y2 - y1, 0) * 2 > shape[0] * shape[1]:
        return None, board
    canvas = np.empty(shape, dtype=dtype) if board is None else board
    fast_transforms.paste_inside(canvas[y1:y2, x1:x2], y1, x1, [piece[2:] for piece in pieces], mosaic.pad_val)
    SKIPPED["canvases"] += 1
    return canvas, board


@dataclass(frozen=True, eq=False)  # (an array inside: compared and hashed as the object it is)
class Board:
    """A mosaic canvas (``whole[top:top + shape[0], left:left + shape[1]]``) inside a larger array with
    room around it for the parts of the four pieces that lie off the canvas, so that each piece's whole
    image has a place in it (:meth:`place`) and is decoded there: ``FastMosaic`` then has nothing to
    paste (a piece's place is where it would paste it; the four places are the four quadrants around
    the centre, apart)."""

    whole: np.ndarray
    top: int
    left: int
    shape: tuple[int, int, int]

    def canvas(self) -> np.ndarray:
        return self.whole[self.top : self.top + self.shape[0], self.left : self.left + self.shape[1]]

    def place(self, mosaic: Any, loc: str, center: tuple[int, int], size: tuple[int, int]) -> np.ndarray | None:
        """Where on the board ``mosaic`` pastes an image of ``size`` (height, width) at ``loc``: the
        view of its whole image's place; None where the mosaic resizes it or it would not fit."""
        height, width = size
        out_w, out_h = mosaic.img_scale
        scale = min(out_h / height, out_w / width)
        if (int(width * scale), int(height * scale)) != (width, height):
            return None
        (x1, y1, _, _), (cut_x1, cut_y1, _, _) = mosaic._mosaic_combine(loc, center, (width, height))
        row, column = self.top + y1 - cut_y1, self.left + x1 - cut_x1  # the image's top-left corner
        if row < 0 or column < 0 or row + height > self.whole.shape[0] or column + width > self.whole.shape[1]:
            return None
        return self.whole[row : row + height, column : column + width]


def mosaic_board(mosaic: Any, center: tuple[int, int]) -> Board | None:
    """The :class:`Board` of a ``FastMosaic``'s uint8 colour canvas around ``center``, with room for pieces
    up to its ``img_scale`` (the size it scales each to at most); None for a centre off the canvas."""
    width, height = mosaic.img_scale
    shape = (int(height * 2), int(width * 2), 3)
    cx, cy = center
    if not (0 <= cx <= shape[1] and 0 <= cy <= shape[0]):
        return None
    top, left = math.ceil(max(height - cy, 0)), math.ceil(max(width - cx, 0))
    bottom, right = math.ceil(max(cy + height - shape[0], 0)), math.ceil(max(cx + width - shape[1], 0))
    whole = np.empty((shape[0] + top + bottom, shape[1] + left + right, 3), dtype=np.uint8)
    return Board(whole, top, left, shape)


def numpy_stream() -> bytes | None:
    """Where numpy's global random stream is, to tell later (:func:`same_stream`) whether the draws
    foreseen are still the next ones: MT19937's key and position, read where its ``ctypes`` interface
    points (1.5 us; ``get_state`` builds a new tuple: 50 us, and a sample needs several). The uniform
    and integer draws foreseen read nothing else (not the cached Gaussian). None (never the same) for
    another bit generator, or where that memory is not laid out as :data:`MT_LAYOUT_HOLDS` checked."""
    generator = np.random.get_bit_generator()
    if type(generator) is not np.random.MT19937 or not MT_LAYOUT_HOLDS:
        return None
    return ctypes.string_at(generator.ctypes.state_address, MT_STATE_BYTES)


def saved_stream() -> Any:
    """numpy's global random state before draws made ahead, for :func:`put_back`: MT19937's key and
    position (:func:`numpy_stream`, 1.5 us) where readable, else ``get_state()`` (a new tuple: 50 us).
    The draws made ahead (mmdet's ``Mosaic.get_indexes`` and ``RandomAffine``'s matrix, exactly those
    classes) are uniform and integer ones: they move nothing else, not the cached Gaussian."""
    stream = numpy_stream()
    return stream if stream is not None else np.random.get_state()


def put_back(state: Any) -> None:
    """numpy's global random state as :func:`saved_stream` saved it."""
    if isinstance(state, bytes):
        ctypes.memmove(np.random.get_bit_generator().ctypes.state_address, state, MT_STATE_BYTES)
    else:
        np.random.set_state(state)


def same_stream(a: bytes | None, b: bytes | None) -> bool:
    """Whether two :func:`numpy_stream` values are the same place in the same stream."""
    return a is not None and a == b


MT_STATE_BYTES = 4 * 625  # numpy's mt19937_state: uint32 key[624], then int pos


def mt_layout_holds() -> bool:
    """Whether an MT19937's state, read as :func:`numpy_stream` reads it, is the key and position its
    ``state`` property gives, on a fresh generator and after draws that move the position and renew the key."""
    probe = np.random.MT19937(20261204)
    for draws in (0, 5, 700):
        probe.random_raw(draws)
        state = probe.state["state"]
        raw = np.frombuffer(ctypes.string_at(probe.ctypes.state_address, MT_STATE_BYTES), dtype=np.uint32)
        if not (np.array_equal(raw[:624], state["key"]) and int(raw[624]) == state["pos"]):
            return False
    return True


MT_LAYOUT_HOLDS = mt_layout_holds()


# ---------------------------------------------------------------------------------------------
# The warp's boxes


@TRANSFORMS.register_module(name="FastRandomAffine", force=True)
class FastRandomAffine(mmdet_transforms.RandomAffine):
    """mmdet's ``RandomAffine``: the same draws and ``cv2.warpPerspective``'s pixels (:func:`warp`); the boxes
    projected, clipped and kept in numpy on float32 around torch's own ``matmul`` (on the tensor
    layout mmdet gives it: the one step whose bits depend on torch's kernel), without mmdet's box
    objects in between. Each other step is one IEEE operation (a division, a min or max, a clip, a
    comparison), the same in numpy. Boxes other than float32 ``HorizontalBoxes`` on the CPU, and
    samples with masks (which mmdet refuses after the warp), go through mmdet's code."""

    @autocast_box_type()
    def transform(self, results: dict) -> dict:
        boxes = results["gt_bboxes"]
        if not fast_transforms.plain_boxes(boxes) or "gt_masks" in results:
            return super().transform(results)
        img = results["img"]
        height, width = img.shape[0] + self.border[1] * 2, img.shape[1] + self.border[0] * 2
        matrix = self.drawn_matrix(height, width)
        note = pad_outside.note_for(img)
        if note is not None and height > 0 and width > 0 and self.pad_note_holds(note, matrix, img):
            rect = pad_outside.warped_rect(matrix, note.rect, (width, height))
            results["img"] = self.warped_above(img, matrix, (width, height), rect[3], note.value)
            pad_outside.leave(results["img"], rect, note.value)  # the pad read and the border: one colour
        else:
            results["img"] = warp(img, matrix, (width, height), self.border_val)
        results["img_shape"] = results["img"].shape[:2]
        if len(boxes):
            projected = projected_boxes(boxes.tensor.numpy(), matrix)
            if self.bbox_clip_border:
                fast_transforms.clip_boxes(projected, (height, width))
            inside = fast_transforms.boxes_inside(projected, (height, width))
            results["gt_bboxes"] = HorizontalBoxes(torch.from_numpy(projected[inside]), clone=False)
            results["gt_bboxes_labels"] = results["gt_bboxes_labels"][inside]
            results["gt_ignore_flags"] = results["gt_ignore_flags"][inside]
        return results

    def drawn_matrix(self, height: int, width: int) -> np.ndarray:
        """mmdet's ``_get_random_homography_matrix(height, width)``: the one the look-ahead drew
        (:func:`drawn_region`) where it drew this very draw (numpy's stream where it was then, the same
        size), the stream then moved on to where that draw left it; else drawn."""
        ahead = self.__dict__.pop("foreseen", None)
        if ahead is not None and ahead[2] == (height, width) and same_stream(ahead[0], numpy_stream()):
            put_back(ahead[1])
            return ahead[3]
        return self._get_random_homography_matrix(height, width)

    def warped_above(
        self, img: np.ndarray, matrix: np.ndarray, size: tuple[int, int], rows: int, pad: tuple[int, int, int]
    ) -> np.ndarray:
        """mmdet's ``cv2.warpPerspective`` output of ``size`` where only its first ``rows`` rows can differ
        from ``pad``: those warped (OpenCV maps each output row on its own, from its row number and the
        matrix: the same pixels at any output height), the rest filled."""
        width, height = size
        out = np.empty((height, width, 3), dtype=np.uint8)
        if rows > 0:
            warped = warp(img, matrix, (width, rows), self.border_val, dst=out[:rows])
            if warped.ctypes.data != out.ctypes.data:  # (OpenCV's binding made its own array)
                out[:rows] = warped
        out[rows:] = fast_transforms.filled((1, width, 3), np.array(pad, dtype=np.uint8))
        pad_outside.SKIPPED["warp_rows"] += height - max(rows, 0)
        return out

    def pad_note_holds(self, note: pad_outside.Note, matrix: np.ndarray, img: np.ndarray) -> bool:
        """Whether the warp of ``img`` is ``note.value`` outside the warped ``note.rect``: a 3-channel uint8
        image warped by an affine matrix with the pad's colour as its border."""
        values = self.border_val  # OpenCV's Scalar: one number would be (v, 0, 0, 0)
        listed = isinstance(values, (tuple, list)) and len(values) >= 3
        border = fast_transforms.uint8_pad(values[:3]) if listed else None
        return (
            fast_transforms.is_color_uint8(img)
            and border is not None
            and tuple(border.tolist()) == note.value
            and np.array_equal(matrix[2], AFFINE_ROW)
        )


def warp(img: np.ndarray, matrix: np.ndarray, size: tuple[int, int], border: Any, **dst: np.ndarray) -> np.ndarray:
    """mmdet's ``cv2.warpPerspective(img, matrix, dsize=size, borderValue=border)``: where ``matrix`` is
    affine (last row exactly 0, 0, 1) and this OpenCV's two warps agree (:func:`affine_warps_agree`),
    by ``cv2.warpAffine`` on its first two rows (14% faster here: no division per pixel)."""
    if np.array_equal(matrix[2], AFFINE_ROW) and affine_warps_agree():
        return cv2.warpAffine(img, matrix[:2], dsize=size, borderValue=border, **dst)
    return cv2.warpPerspective(img, matrix, dsize=size, borderValue=border, **dst)


_AGREE: list[bool] = []


def affine_warps_agree() -> bool:
    """Whether ``cv2.warpAffine`` gives ``cv2.warpPerspective``'s pixels for affine matrices, checked once
    a process on bilinear 8-bit colour warps of a random image (YOLOX-like matrices: rotation, scale,
    shear, fractional shifts, parts outside the source). OpenCV 4.11 and later map both in float32
    through the same kernels, the perspective one then divides by ``0 * x + 1``, exactly 1: the same
    bits. Earlier versions map them in different fixed-point arithmetic, and differ."""
    if not _AGREE:
        rng = np.random.default_rng(0)
        src = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
        agree = True
        for _ in range(24):
            angle, scale, shear = rng.uniform(-0.2, 0.2), rng.uniform(0.4, 2.0), rng.uniform(-0.05, 0.05)
            cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
            shift = rng.uniform(-40, 40, 2)
            matrix = np.array([[cos, -sin + shear, shift[0]], [sin, cos, shift[1]], [0, 0, 1]], dtype=np.float32)
            border = tuple(int(v) for v in rng.integers(0, 256, 3))
            perspective = cv2.warpPerspective(src, matrix, dsize=(120, 90), borderValue=border)
            agree &= np.array_equal(cv2.warpAffine(src, matrix[:2], dsize=(120, 90), borderValue=border), perspective)
        _AGREE.append(bool(agree))
    return _AGREE[0]


def projected_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``HorizontalBoxes.project_`` on an (N, 4) float32 array: the four corners (x, y, 1) through
    ``matrix`` (as float32, by torch as mmdet multiplies them), divided by their third coordinate,
    and the box around them."""
    x1, y1, x2, y2 = boxes.T
    one = np.ones_like(x1)
    corners = np.stack([x1, y1, one, x2, y1, one, x1, y2, one, x2, y2, one], axis=-1).reshape(-1, 4, 3)
    corners_t = torch.from_numpy(corners).transpose(-1, -2)  # (N, 3, 4): the strides of mmdet's operand
    moved = torch.matmul(torch.from_numpy(matrix.astype(np.float32)), corners_t).numpy()
    xy = moved[:, :2] / moved[:, 2:3]
    return np.concatenate([xy.min(axis=-1), xy.max(axis=-1)], axis=-1)


fast_transforms.register(mmdet_transforms.RandomAffine, FastRandomAffine)
