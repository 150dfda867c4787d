"""What a pipeline knows of its pad: YOLOX's mosaic and warp tell the step after them that the image is
one colour outside a rectangle, so that ``YOLOXHSVRandomAug`` converts only inside it.

After YOLOX-tiny's ``Mosaic`` and ``RandomAffine`` (scale 0.5-1.5) a third of the 640x640 image, on
average, lies outside the warped mosaic's pictures: pad (114) that the warp fills or reads from the
canvas, and bilinear weights (summing to one) keep exactly 114. The colour shift is one function of a
pixel's value, so those pixels all come out as one colour: the HSV round trip (1.3 ms a sample) runs
on the rectangle around the pictures and on one row of pad, whose result is copied outside.

A :class:`Note` goes from one transform to the next that runs, through :class:`FastMultiImageMixDataset`
(which runs YOLOX's pipeline): it opens the hand-over before each transform (:func:`hand_over`), takes
what the transform left (:func:`taken`) and hands it to the next one only. A note names the image
object it is about: a transform given another array (a copy, a new image) finds none. Outside that
wrapper nothing is kept or handed on.

OpenCV converts HSV back to BGR in runs of SIMD lanes (16, 32 or 64 pixels by the CPU) and the rest
of a row one pixel at a time, truncating where the lanes round: some pixels differ by one level
between the two. A rectangle converted apart starts on a whole run from the row's start and ends on
one or at the row's end (:func:`converted_columns`), so every pixel goes through the code it goes
through in the whole row; the run length is measured once per process (:func:`hsv_run`). BGR to HSV
is integer arithmetic, the same in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Note:
    """``img`` is ``value`` (three uint8 channels) outside ``rect`` (x1, y1, x2, y2; ends excluded; maybe
    empty). ``warp_reads_only``: only where the warp that follows reads it (yolox_fast's canvas made
    only there); elsewhere it holds nothing set."""

    img: np.ndarray
    rect: tuple[int, int, int, int]
    value: tuple[int, int, int]
    warp_reads_only: bool = False


SKIPPED = {"hsv_pixels": 0, "warp_rows": 0}  # pixels not converted, warped rows filled instead

_given: Note | None = None  # the note for the transform now running
_left: Note | None = None  # what it leaves for the next
_open = False  # whether a wrapper is handing notes over


def hand_over(note: Note | None) -> None:
    """The wrapper, before a transform runs: ``note`` (what the previous one left) is its to read."""
    global _given, _left, _open
    _given, _left, _open = note, None, True


def taken() -> Note | None:
    """The wrapper, after a transform ran: what it left for the next one; the hand-over closes."""
    global _given, _left, _open
    note, _given, _left, _open = _left, None, None, False
    return note


def note_for(img: object) -> Note | None:
    """The note handed to the running transform about ``img`` (this very array), if any."""
    return _given if _given is not None and _given.img is img else None


def leave(img: np.ndarray, rect: tuple[int, int, int, int], value: tuple[int, int, int], **kw: bool) -> None:
    """Tell the next transform that ``img`` is ``value`` outside ``rect`` (only while a wrapper listens)."""
    global _left
    if _open:
        _left = Note(img, rect, value, **kw)


def warped_rect(
    matrix: np.ndarray, rect: tuple[int, int, int, int], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Where in a ``cv2.warpPerspective`` output of ``size`` (w, h) by ``matrix`` (affine: last row 0, 0, 1)
    a pixel can read any source pixel of ``rect``: outside it every bilinear neighbour lies outside
    ``rect``. A source position within one pixel (the neighbours) and a sixteenth (OpenCV's 1/32 pixel
    rounding) of ``rect``, mapped forward, and a pixel more on each side for the floating point."""
    x1, y1, x2, y2 = rect
    width, height = size
    if x1 >= x2 or y1 >= y2:
        return 0, 0, 0, 0
    near = np.array(
        [[x1 - 1.0625, y1 - 1.0625], [x2 + 0.0625, y1 - 1.0625], [x1 - 1.0625, y2 + 0.0625], [x2 + 0.0625, y2 + 0.0625]]
    )
    moved = near @ np.asarray(matrix, dtype=np.float64)[:2, :2].T + np.asarray(matrix, dtype=np.float64)[:2, 2]
    (left, top), (right, bottom) = moved.min(axis=0), moved.max(axis=0)
    out = (
        max(math.floor(left) - 1, 0),
        max(math.floor(top) - 1, 0),
        min(math.ceil(right) + 2, width),
        min(math.ceil(bottom) + 2, height),
    )
    return out if out[0] < out[2] and out[1] < out[3] else (0, 0, 0, 0)


def converted_columns(x1: int, x2: int, width: int) -> tuple[int, int] | None:
    """Columns ``x1``-``x2`` of a row of ``width`` widened to whole SIMD runs of OpenCV's HSV to BGR
    conversion from the row's start (the end may be the row's end); None where the run is not known."""
    run = hsv_run()
    if run is None:
        return None
    start, end = x1 // run * run, -(-x2 // run) * run
    return start, min(end, width)


_RUN: list[int | None] = []


def hsv_run() -> int | None:
    """How many pixels OpenCV's 8-bit HSV to BGR conversion takes at a time in SIMD lanes here: rows of
    one pixel value that the lanes and the one-pixel code convert differently, from 1 to 256 pixels
    long, each converted apart; None where the pattern is not ``width - width % run`` lane pixels."""
    if not _RUN:
        _RUN.append(measured_run())
    return _RUN[0]


PROBE = np.array([0, 1, 1], dtype=np.uint8)  # hue 0, saturation 1, value 1: lanes truncate, one pixel rounds


def measured_run() -> int | None:
    alone = cv2.cvtColor(PROBE.reshape(1, 1, 3), cv2.COLOR_HSV2BGR)[0, 0]
    lanes = [
        (cv2.cvtColor(np.tile(PROBE, (1, w, 1)), cv2.COLOR_HSV2BGR)[0] != alone).any(axis=1) for w in range(1, 257)
    ]
    run = next((len(laned) for laned in lanes if laned.any()), None)
    if run is None:
        return None
    for laned in lanes:  # the first whole runs of a row in lanes, the rest alone
        if not np.array_equal(laned, np.arange(len(laned)) < len(laned) - len(laned) % run):
            return None
    return run


def fill_outside(img: np.ndarray, region: tuple[int, int, int, int], row: np.ndarray) -> None:
    """Every row of ``img`` (contiguous, h x w x c) outside ``region`` (y1, y2, x1, x2) set to ``row`` (1 x w
    x c): whole rows above and below, the row's ends beside (flat copies: numpy broadcasts a pixel slowly)."""
    y1, y2, x1, x2 = region
    height, width, channels = img.shape
    flat, line = img.reshape(height, width * channels), row.reshape(1, width * channels)
    flat[:y1] = line
    flat[y2:] = line
    flat[y1:y2, : x1 * channels] = line[:, : x1 * channels]
    flat[y1:y2, x2 * channels :] = line[:, x2 * channels :]
