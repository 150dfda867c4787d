"""RandomResize followed by RandomCrop: only the crop window of the resized image is made, same pixels.

RTMDet's pipelines scale a whole 1280x1280 mosaic by up to 2x (``RandomResize``, OpenCV's 8-bit
bilinear resize) and then keep 640x640 of it (``RandomCrop``). Where a pipeline has exactly mmdet's
``RandomResize`` right before exactly mmdet's ``RandomCrop``, ``swap`` turns the first into
:class:`FastRandomResize`, which draws the scale as mmdet's does and runs mmdet's ``Resize`` for
everything but the image (boxes, masks, segmentation map, homography matrix, ``img_shape``,
``scale_factor``), leaving a :class:`ResizedLater` in ``results["img"]``: the resized image's shape,
nothing computed. mmdet's own ``RandomCrop`` then draws its offsets from that shape (same draws)
and slices it, which computes only what the window needs, bit for bit, in one of two ways:

- :func:`resized_prefix`: OpenCV resizes only the top-left part of the image that the window's
  outputs read, at the whole image's scale (given as ``fx``/``fy``, which OpenCV keeps), so every
  output position and weight is the whole resize's; checked once per process
  (:func:`prefix_matches_opencv`). On average about half of the whole resize.
- :func:`resized_window`: OpenCV's 8-bit bilinear arithmetic redone in numpy for the window alone
  (source positions ``(d + 0.5) * src / dst - 0.5`` in float32, 11-bit fixed-point weights, the
  horizontal pass in int32, the vertical pass as OpenCV's vector code does it); checked once per
  process too (:func:`window_matches_opencv`). numpy costs about 9x OpenCV per output pixel, so it is
  used only where that part would be over 9 windows big (a window far down and right at scale ~2).

Where a ``Mosaic`` / ``CachedMosaic`` comes right before such a pair, its canvas is a
:class:`MosaicLater` (the pad colour and the pasted pieces, made only where sliced), so only the part
of the mosaic that the window reads is ever filled and pasted.

MixUp's jitter resize is the same shape of work (resize a canvas, keep a crop of it) and uses the
same part-only resize (:class:`TruncatedLater`); there mmdet resizes in float64, which this OpenCV
sends through Intel IPP, whose values no cheaper resize reproduces: the part is resized in float32,
within one level of mmdet's on about 0.01% of the values (the one place det-mmdet's pixels are not
mmdet's bits; tests assert the bound).

Anything else (a lone ``RandomResize``, not 3-channel uint8 images, other interpolations or the
Pillow backend, a slice that is not a plain window) runs mmdet's code or resizes the whole image.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import cv2
import mmcv
import numpy as np
from mmcv.transforms import RandomResize
from mmdet.datasets.transforms import transforms as mmdet_transforms
from mmdet.registry import TRANSFORMS

from det_mmdet import fast_transforms

logger = logging.getLogger(__name__)
COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
ONE = np.float32(1 << COEF_BITS)
# numpy's window costs about as much as OpenCV resizing this many windows' worth of pixels (about 1.5x
# of a 1280 px mosaic, measured with bench/crop_resize.py); below it OpenCV's resize of the part is cheaper.
NUMPY_FROM_AREA_RATIO = 9.0


# ---------------------------------------------------------------------------------------------
# OpenCV's 8-bit bilinear resize, for a window of the output


def _positions(src: int, dst: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Source index (floor) and float32 fraction for outputs ``start .. start + count`` (OpenCV's ``fx``)."""
    scale = 1.0 / (dst / src)  # as OpenCV computes it: the inverse of its inv_scale, not src / dst
    f = ((np.arange(start, start + count) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f)
    f -= s
    return s.astype(np.int64), f


def _weights(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``saturate_cast<short>((1 - f) * 2048)`` and ``saturate_cast<short>(f * 2048)``."""
    return np.rint((np.float32(1) - f) * ONE).astype(np.int32), np.rint(f * ONE).astype(np.int32)


def column_taps(src: int, dst: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Columns and weights of the horizontal pass: outside the image both position and fraction clamp."""
    s, f = _positions(src, dst, start, count)
    outside = (s < 0) | (s >= src - 1)
    f[outside] = 0
    s = np.clip(s, 0, src - 1)
    w0, w1 = _weights(f)
    return s, np.minimum(s + 1, src - 1), w0, w1


def row_taps(src: int, dst: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows and weights of the vertical pass: the row indices clamp, the fractions do not."""
    s, f = _positions(src, dst, start, count)
    w0, w1 = _weights(f)
    return np.clip(s, 0, src - 1), np.clip(s + 1, 0, src - 1), w0, w1


def resized_window(img: np.ndarray, size: tuple[int, int], top: int, left: int, rows: int, cols: int) -> np.ndarray:
    """``cv2.resize(img, size, interpolation=INTER_LINEAR)[top:top+rows, left:left+cols]`` for uint8 HxWxC."""
    h, w, cn = img.shape
    width, height = size
    x0, x1, a0, a1 = column_taps(w, width, left, cols)
    y0, y1, b0, b1 = row_taps(h, height, top, rows)
    first, last = int(y0[0]), int(y1[-1]) + 1
    source = np.ascontiguousarray(img[first:last]).reshape(last - first, w * cn)
    channel = np.arange(cn)
    # horizontal pass on the rows the window reads: exact int32, then OpenCV's 4-bit drop to int16 range
    across = np.take(source, (x0[:, None] * cn + channel).ravel(), axis=1).astype(np.int32)
    across *= np.repeat(a0, cn)
    right = np.take(source, (x1[:, None] * cn + channel).ravel(), axis=1).astype(np.int32)
    right *= np.repeat(a1, cn)
    across += right
    across >>= 4
    # vertical pass: the high halves of the 16-bit products, summed, rounded by 2 bits, saturated
    out = np.take(across, y0 - first, axis=0)
    out *= b0[:, None]
    out >>= 16
    below = np.take(across, y1 - first, axis=0)
    below *= b1[:, None]
    below >>= 16
    out += below
    out += 2
    out >>= 2
    np.minimum(out, 255, out=out)
    return out.astype(np.uint8).reshape(rows, cols, cn)


def resized_prefix(img: np.ndarray, size: tuple[int, int], rows: int, cols: int) -> np.ndarray:
    """At least the first ``rows`` x ``cols`` of ``cv2.resize(img, size)``, bit for bit: OpenCV resizing
    only the top-left part of ``img`` those outputs read, at the whole image's scale.

    Given ``fx``/``fy`` instead of a size, OpenCV keeps them as its inverse scales, which equal the
    whole resize's (``width / w`` is the same division), so every output position, weight and vector
    step is the same; only outputs whose neighbours lie beyond the part would differ (clamped at its
    edge), and the part reaches two source pixels past the last output's. Where that is not certain
    (a build that differs, checked once per process by :func:`prefix_matches_opencv`) or no part is
    saved, the whole image is resized.
    """
    part = _resized_part(img, size, rows, cols) if prefix_matches_opencv() else None
    return cv2.resize(np.asarray(img), size, interpolation=cv2.INTER_LINEAR) if part is None else part


def part_read(src: tuple[int, ...], size: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    """(rows, columns) of the top-left part of a ``src``-shaped image that outputs ``[:rows, :cols]`` of
    its resize to ``size`` read: two source pixels past the last output's position."""
    last_x, _ = _positions(src[1], size[0], cols - 1, 1)
    last_y, _ = _positions(src[0], size[1], rows - 1, 1)
    return min(src[0], int(last_y[0]) + 3), min(src[1], int(last_x[0]) + 3)


def _resized_part(img: np.ndarray, size: tuple[int, int], rows: int, cols: int) -> np.ndarray | None:
    """OpenCV's resize of the top-left part that outputs ``[:rows, :cols]`` read; None where that is the
    whole image, or where OpenCV would copy the part (resized to its own size) instead of resizing it."""
    h, w = img.shape[:2]
    width, height = size
    part_h, part_w = part_read(img.shape, size, rows, cols)
    fx, fy = width / w, height / h
    out_w, out_h = round(part_w * fx), round(part_h * fy)  # OpenCV's output size (it rounds half to even too)
    if (part_w, part_h) == (w, h) or (out_w, out_h) == (part_w, part_h) or out_w < cols or out_h < rows:
        return None
    return cv2.resize(img[:part_h, :part_w], None, fx=fx, fy=fy, interpolation=cv2.INTER_LINEAR)


@functools.lru_cache(maxsize=1)
def prefix_matches_opencv() -> bool:
    """Whether :func:`_resized_part` gives OpenCV's whole-image bits (checked once per process on
    :data:`PROBES` and a halving; where it does not, whole images are resized)."""
    rng = np.random.default_rng(1)
    for (h, w), (width, height) in (*PROBES, ((96, 130), (65, 48))):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        full = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
        rows, cols = max(1, height * 2 // 3), max(1, width * 3 // 5)
        part = _resized_part(img, (width, height), rows, cols)
        if part is not None and not np.array_equal(part[:rows, :cols], full[:rows, :cols]):
            logger.warning("OpenCV %s resizes a part otherwise than the whole: whole images resized", cv2.__version__)
            return False
    return True


@functools.lru_cache(maxsize=1)
def window_matches_opencv() -> bool:
    """Whether :func:`resized_window` gives this OpenCV's bits (checked once per process on a few sizes).

    The arithmetic above is OpenCV 5's; another build (e.g. a 4.x whose vector code leaves a scalar
    tail, which rounds differently) may differ. Then the whole image is resized by OpenCV instead.
    """
    rng = np.random.default_rng(0)
    for (h, w), (width, height) in PROBES:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        full = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
        top, left = height // 5, width // 7
        window = resized_window(img, (width, height), top, left, height - top, width - left)
        if not np.array_equal(window, full[top:, left:]):
            logger.warning("OpenCV %s resizes otherwise than %s: whole images resized", cv2.__version__, __name__)
            return False
    return True


# (source (h, w), target (w, h)): up, down, halving, odd widths (vector tails), mixed directions
PROBES = (((37, 53), (91, 70)), ((64, 64), (32, 32)), ((50, 77), (29, 133)), ((96, 96), (203, 197)), ((31, 7), (5, 61)))


class MosaicLater:
    """The mosaic canvas that ``FastCachedMosaic`` / ``FastMosaic`` would make (the pad colour, each
    piece pasted), made only where sliced: what :class:`ResizedLater` reads of it for one window.

    Stands in ``results["img"]`` between a mosaic and a :class:`FastRandomResize` that defers its resize
    to a ``RandomCrop`` (:func:`link` marks such a mosaic); the pieces are only read.
    """

    ndim = 3

    def __init__(self, shape: tuple[int, int, int], dtype: Any, pad: Any, pieces: list) -> None:
        self.shape, self.dtype, self.pad, self.pieces = shape, np.dtype(dtype), pad, pieces

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[: self.shape[0], : self.shape[1]]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        window = _window(key if isinstance(key, tuple) else (key, slice(None)), self.shape)
        if window is None:
            return np.asarray(self)[key]
        (top, bottom), (left, right) = window
        out = np.empty((bottom - top, right - left, self.shape[2]), dtype=np.uint8)
        pad = self.pad[0] if self.pad.min() == self.pad.max() else self.pad  # one value: numpy fills it fastest
        fast_transforms.paste_inside(out, top, left, self.pieces, pad)
        return out


def deferred_mosaic(mosaic: Any, shape: tuple[int, ...], dtype: Any, pieces: list) -> MosaicLater | None:
    """A :class:`MosaicLater` for a mosaic that :func:`link` marked (uint8 colour pieces, a pad value that
    is a whole colour); else None (the canvas is made whole)."""
    pad = fast_transforms.uint8_pad(mosaic.pad_val)
    ok = mosaic.__dict__.get("canvas_later") and pad is not None and len(shape) == 3 and np.dtype(dtype) == np.uint8
    if not (ok and all(fast_transforms.is_color_uint8(piece[2]) for piece in pieces)):
        return None
    return MosaicLater(shape, dtype, pad, [piece[2:] for piece in pieces])  # (image, pasted, cut)


class ResizedLater:
    """The image ``cv2.resize(src, size)`` would give, made only where it is sliced.

    Stands in ``results["img"]`` between :class:`FastRandomResize` and ``RandomCrop``, which reads
    its ``shape`` and slices one window (``img[y1:y2, x1:x2, ...]``).
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, src: np.ndarray, size: tuple[int, int]) -> None:
        self.src, self.size = src, size
        self.shape = (size[1], size[0], src.shape[2])

    def full(self) -> np.ndarray:
        return cv2.resize(np.asarray(self.src), self.size, interpolation=cv2.INTER_LINEAR)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.full()
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        window = _window(key, self.shape)
        if window is None:
            return self.full()[key]
        (top, bottom), (left, right) = window
        rows, cols = bottom - top, right - left
        if rows <= 0 or cols <= 0:
            return self.full()[top:bottom, left:right]
        if bottom * right < NUMPY_FROM_AREA_RATIO * rows * cols or not window_matches_opencv():
            return resized_prefix(self.src, self.size, bottom, right)[top:bottom, left:right]
        return resized_window(self.src, self.size, top, left, rows, cols)


class TruncatedLater:
    """MixUp's jitter resize of a uint8 canvas (mmdet: in float64, values truncated to uint8 where pasted),
    made only where sliced: OpenCV resizes the top-left part that the slice reads, in float32.

    This is the one fused resample that does not give mmdet's bits: OpenCV sends mmdet's float64
    resize through Intel IPP, whose values no cheaper resize reproduces. Positions and scale are the
    whole resize's (as in :func:`resized_prefix`); float32 against float64 moves a value across a whole
    number, and so its truncation by one level, on about 0.01% of the values (bench/README.md;
    ``tests/test_crop_resize.py`` asserts at most one level on under 0.5%). Slices return uint8.
    """

    dtype = np.dtype(np.float64)
    ndim = 3

    def __init__(self, src: np.ndarray, size: tuple[int, int]) -> None:
        self.src, self.size = src, size
        self.shape = (size[1], size[0], src.shape[2])

    def __getitem__(self, key: Any) -> np.ndarray:
        window = _window(key, self.shape)
        if window is None:
            return self._resized(self.src)[key].astype(np.uint8)
        (top, bottom), (left, right) = window
        if bottom <= top or right <= left:
            return np.empty((max(bottom - top, 0), max(right - left, 0), self.shape[2]), np.uint8)
        part_h, part_w = part_read(self.src.shape, self.size, bottom, right)
        out = self._resized(self.src[:part_h, :part_w])
        if out.shape[0] < bottom or out.shape[1] < right:  # rounding left the part short: all of it
            out = self._resized(self.src)
        return out[top:bottom, left:right].astype(np.uint8)  # truncated, as mmdet's values pasted into uint8

    def _resized(self, part: np.ndarray) -> np.ndarray:
        fx, fy = self.size[0] / self.src.shape[1], self.size[1] / self.src.shape[0]
        return cv2.resize(part.astype(np.float32), None, fx=fx, fy=fy, interpolation=cv2.INTER_LINEAR)


def _window(key: Any, shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``((top, bottom), (left, right))`` for a key of two step-1 slices (and an optional ``...``)."""
    if not isinstance(key, tuple):
        return None
    if len(key) == 3 and key[2] is Ellipsis:
        key = key[:2]
    if len(key) != 2 or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
        return None
    (top, bottom, _), (left, right, _) = (k.indices(n) for k, n in zip(key, shape[:2], strict=True))
    return (top, max(top, bottom)), (left, max(left, right))


# ---------------------------------------------------------------------------------------------
# The transforms


class DeferringResize(mmdet_transforms.Resize):
    """mmdet's ``Resize`` whose image is a :class:`ResizedLater` (all else as mmdet's: boxes, masks, ...)."""

    def _resize_img(self, results: dict) -> None:
        img = results.get("img", None)
        if not (self._deferrable(img) and (isinstance(img, MosaicLater) or fast_transforms.is_color_uint8(img))):
            materialize(results)
            return super()._resize_img(results)
        h, w = img.shape[:2]
        if self.keep_ratio:  # mmcv.imrescale's size, then mmcv.imresize's
            size = mmcv.rescale_size((w, h), results["scale"])
        else:
            size = tuple(results["scale"])
        if not all(isinstance(v, int) and v > 0 for v in size):
            materialize(results)
            return super()._resize_img(results)  # OpenCV's own refusal, as mmdet meets it
        results["img"] = ResizedLater(img, (int(size[0]), int(size[1])))
        results["img_shape"] = (int(size[1]), int(size[0]))
        results["scale_factor"] = (size[0] / w, size[1] / h)
        results["keep_ratio"] = self.keep_ratio

    def _deferrable(self, img: Any) -> bool:
        backend = self.backend or mmcv.image.geometric.imread_backend
        made = isinstance(img, MosaicLater) or (isinstance(img, np.ndarray) and img.size > 0)
        return self.interpolation == "bilinear" and backend == "cv2" and made


def materialize(results: dict) -> None:
    """A :class:`MosaicLater` in ``results["img"]`` made whole, for code that needs the array."""
    if isinstance(results.get("img"), MosaicLater):
        results["img"] = np.asarray(results["img"])


@TRANSFORMS.register_module(name="FastRandomResize", force=True)
class FastRandomResize(RandomResize):
    """mmcv's ``RandomResize`` right before mmdet's ``RandomCrop``: the image resized where cropped (see above)."""

    def transform(self, results: dict) -> dict:
        resize = self.resize
        if type(resize) not in (mmdet_transforms.Resize, fast_transforms.FAST.get(mmdet_transforms.Resize)):
            materialize(results)
            return super().transform(results)
        results["scale"] = self._random_scale()
        resize.scale = results["scale"]
        deferring = self.__dict__.get("_deferring")
        if deferring is None:
            deferring = self._deferring = DeferringResize.__new__(DeferringResize)
        deferring.__dict__.update(resize.__dict__)
        return deferring(results)


# ---------------------------------------------------------------------------------------------
# Finding the pairs


def croppers() -> tuple[type, ...]:
    crop = mmdet_transforms.RandomCrop
    return tuple({crop, fast_transforms.FAST.get(crop, crop)})


def link(dataset: Any) -> None:
    """Each mmcv ``RandomResize`` right before a ``RandomCrop`` in a ``Compose`` becomes a :class:`FastRandomResize`."""
    mosaics = tuple(fast_transforms.FAST[cls] for cls in (mmdet_transforms.Mosaic, mmdet_transforms.CachedMosaic))
    for compose in _composes(dataset):
        steps = compose.transforms
        for before, first, second in zip([None, *steps], steps, steps[1:], strict=False):
            if type(first) is RandomResize and type(second) in croppers():
                first.__class__ = FastRandomResize
                if type(before) in mosaics:  # its canvas made only where the window reads it
                    before.canvas_later = True


def link_config(pipeline: list[Any]) -> list[Any]:
    """:func:`link` for a pipeline config (a list of dicts run in order, as ``PipelineSwitchHook``'s)."""
    names = [_type_name(cfg) for cfg in pipeline]
    crops = {cls.__name__ for cls in croppers()}
    out = list(pipeline)
    for i in range(len(out) - 1):
        if names[i] == "RandomResize" and names[i + 1] in crops:
            out[i] = {**out[i], "type": FastRandomResize}
    return out


def _type_name(cfg: Any) -> str | None:
    """A config's type name: ``"mmdet.RandomCrop"`` as ``"RandomCrop"``, a class (``swap_pipeline``'s) by name."""
    kind = cfg.get("type") if isinstance(cfg, dict) else None
    if isinstance(kind, type):
        return kind.__name__
    return kind.split(".")[-1] if isinstance(kind, str) else None


def _composes(dataset: Any) -> list[Any]:
    """Every ``Compose`` (mmengine's or mmcv's: transforms run one after another) reachable from ``dataset``."""
    from mmcv.transforms import Compose as McvCompose
    from mmengine.dataset import Compose as EngineCompose

    nodes = [dataset, *fast_transforms._transforms_of(dataset, include_datasets=True)]
    found: dict[int, Any] = {}
    for node in nodes:
        for value in (node, getattr(node, "pipeline", None), getattr(node, "transforms", None)):
            if isinstance(value, (McvCompose, EngineCompose)):
                found[id(value)] = value
    return list(found.values())


fast_transforms.LINKS.append(link)
fast_transforms.CONFIG_LINKS.append(link_config)
