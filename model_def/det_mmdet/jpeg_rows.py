"""Decoding part of a JPEG (a band of its rows and of its columns), the pixels ``cv2.imdecode`` gives
there, and few others.

YOLOX's warp reads part of its mosaic, so of a mosaic piece it often needs only some of the rows and
columns (``yolox_fast``). libjpeg-turbo decodes rows top to bottom and can skip rows at either end
(``jpeg_skip_scanlines``; after the last row wanted it stops), and its pixels do not depend on where
it stops or starts: each row's samples come from the same inverse DCT, upsampling and colour
conversion as in a whole decode. Of columns it decodes whole MCUs from a cut on an MCU's edge
(``jpeg_crop_scanline``; it still reads every MCU's coefficients, but transforms and converts only
those): there the column next to each cut differs from the whole decode (chroma upsampling reads
the neighbour beyond the cut), so :func:`columns_decoded` cuts one column further out on each side.
``tests/test_jpeg_rows.py`` checks bands and regions against OpenCV's decode at every subsampling.

This module is an adapter over TurboJPEG 3's C API (``tj3Init``, ``tj3DecompressHeader``, ``tj3Get``,
``tj3SetCroppingRegion``, ``tj3Decompress8``; documented in libjpeg-turbo's
``turbojpeg.h``), called through ctypes: no Python package binds the cropping region. The library is
the one the ``turbojpeg`` wheel (requirements.txt) ships, or else a system ``libturbojpeg`` of version
3 or later. Without one, :func:`available` is false and callers decode whole images with OpenCV.

Only what OpenCV decodes the same way is decoded here: baseline or progressive 8-bit YCbCr JPEGs,
without an Exif orientation to apply (the caller checks that: ``yolox_fast.jpeg_header``). For
anything else, or any error or warning of the decoder (a damaged stream among them), :func:`decode`
returns None and the caller decodes as mmdet does, failures and all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
from typing import Any

import numpy as np

# From turbojpeg.h (libjpeg-turbo 3.0): tj3Init's kind, tj3Get's parameters, the colour space and pixel format.
TJINIT_DECOMPRESS = 1
TJPARAM_SUBSAMP, TJPARAM_JPEGWIDTH, TJPARAM_JPEGHEIGHT, TJPARAM_PRECISION, TJPARAM_COLORSPACE = 4, 5, 6, 7, 8
TJPARAM_LOSSLESS = 15
TJCS_YCBCR = 1
TJPF_BGR = 1
# tjMCUWidth by TJSAMP_*: 4:4:4, 4:2:2, 4:2:0, grayscale, 4:4:0, 4:1:1, 4:4:1 (a cropping region starts on a multiple)
MCU_WIDTH = {0: 8, 1: 16, 2: 16, 3: 8, 4: 8, 5: 32, 6: 8}


class Region(ctypes.Structure):
    """turbojpeg.h's ``tjregion``: x, y, w, h."""

    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


def library_paths() -> list[str]:
    """Where to look for libturbojpeg 3: the copy in the ``turbojpeg`` wheel, then the system's."""
    paths = []
    try:
        files = importlib.metadata.files("turbojpeg") or []
    except importlib.metadata.PackageNotFoundError:  # not installed: the system's, or none
        files = []
    paths += [str(f.locate()) for f in files if f.name.startswith("libturbojpeg") and ".so" in f.name]
    system = ctypes.util.find_library("turbojpeg")
    return paths + ([system] if system else [])


def load_library() -> Any:
    """libturbojpeg with its argument types declared, or None where no version 3 is installed."""
    for path in library_paths():
        lib = ctypes.CDLL(path)  # a listed library that does not load is a broken install: fail loudly
        if hasattr(lib, "tj3SetCroppingRegion"):  # version 3 (version 2 has no tj3 functions)
            break
    else:
        return None
    handle, buf, size = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    lib.tj3Init.restype, lib.tj3Init.argtypes = handle, [ctypes.c_int]
    lib.tj3DecompressHeader.argtypes = [handle, buf, size]
    lib.tj3Get.argtypes = [handle, ctypes.c_int]
    lib.tj3SetCroppingRegion.argtypes = [handle, Region]
    lib.tj3Decompress8.argtypes = [handle, buf, size, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return lib


LIBRARY = load_library()
HANDLES: dict[int, Any] = {}  # one decompressor per process (loader workers are forked or spawned)


def available() -> bool:
    return LIBRARY is not None


def decompressor() -> Any:
    pid = os.getpid()
    if pid not in HANDLES:
        HANDLES.clear()  # a parent's handle, inherited by fork: leave it to the parent
        HANDLES[pid] = LIBRARY.tj3Init(TJINIT_DECOMPRESS)
        if not HANDLES[pid]:
            raise MemoryError("libturbojpeg: tj3Init gave no decompressor")
    return HANDLES[pid]


def decode(
    data: bytes,
    shape: tuple[int, int],
    first: int,
    last: int,
    left: int = 0,
    right: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray | None:
    """The (height, width, 3) BGR image of ``data`` with rows ``first`` to ``last`` and columns ``left``
    to ``right`` (ends excluded; all columns by default) as ``cv2.imdecode(..., IMREAD_COLOR)`` decodes
    them, the other pixels as decoded near the cut or as allocated (the caller never reads them: a zero
    fill would cost a pass over memory the heap hands back); None where this decoder cannot promise
    OpenCV's pixels (see the module docstring) or the image is not of ``shape``. Into ``out`` where
    given (a uint8 view of that shape whose rows may lie apart: a place on a larger canvas); only the
    rows decoded are written, and in them only columns of the image."""
    right = shape[1] if right is None else right
    if LIBRARY is None or not (0 <= first < last <= shape[0] and 0 <= left < right <= shape[1]):
        return None
    if out is not None and (out.shape != (*shape, 3) or out.dtype != np.uint8 or out.strides[1:] != (3, 1)):
        return None
    tj = decompressor()
    if LIBRARY.tj3DecompressHeader(tj, data, len(data)) != 0:
        return None
    header = [LIBRARY.tj3Get(tj, p) for p in (TJPARAM_JPEGHEIGHT, TJPARAM_JPEGWIDTH, TJPARAM_PRECISION)]
    plain = LIBRARY.tj3Get(tj, TJPARAM_COLORSPACE) == TJCS_YCBCR and LIBRARY.tj3Get(tj, TJPARAM_LOSSLESS) == 0
    if not plain or header != [shape[0], shape[1], 8]:
        return None
    height, width = shape
    x, end = columns_decoded(left, right, width, LIBRARY.tj3Get(tj, TJPARAM_SUBSAMP))
    if LIBRARY.tj3SetCroppingRegion(tj, Region(x, first, end - x, last - first)) != 0:
        return None
    img = np.empty((height, width, 3), dtype=np.uint8) if out is None else out
    band = img[first:last, x:end]
    if LIBRARY.tj3Decompress8(tj, data, len(data), band.ctypes.data, img.strides[0], TJPF_BGR) != 0:
        return None  # an error or a warning (a damaged stream): OpenCV decides, as for mmdet
    return img


def columns_decoded(left: int, right: int, width: int, subsampling: int) -> tuple[int, int]:
    """The columns (start, end) to have libjpeg-turbo decode so that ``left`` to ``right`` are OpenCV's:
    the start on an MCU's edge (TurboJPEG's rule) and one column short of ``left``, the end one past
    ``right``, and a whole MCU at least. The column next to a cut is upsampled from one chroma sample
    where the whole decode has two (the neighbour beyond the cut is not decoded); the next is not (its
    chroma samples both lie inside). A single chroma column (two pixels at 4:2:0) is upsampled
    otherwise still. The whole width where the subsampling is not one this knows."""
    mcu = MCU_WIDTH.get(subsampling)
    if mcu is None:
        return 0, width
    start = (max(left - 1, 0) // mcu) * mcu
    return start, min(max(right + 1, start + mcu), width)
