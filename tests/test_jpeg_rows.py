"""det_mmdet.jpeg_rows: a band of a JPEG's rows (and columns) decoded by libjpeg-turbo equals that part
of OpenCV's decode, bit for bit (the rest is never read: left as allocated), for the JPEG kinds a data set holds;
whatever it cannot promise it refuses (None).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from det_mmdet import jpeg_rows
from test_fast_transforms import photo


def opencv(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def pillow(img: np.ndarray, mode: str = "RGB", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img[..., ::-1])).convert(mode).save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def test_the_library_is_there():
    # requirements.txt installs the turbojpeg wheel, whose libturbojpeg 3 this decodes with
    assert jpeg_rows.available(), jpeg_rows.library_paths()


def kinds(img: np.ndarray) -> dict[str, bytes]:
    """The same picture as JPEGs of the kinds OpenCV and Pillow write: each chroma subsampling,
    restart markers, progressive and optimised Huffman tables."""
    opencv_ = {
        f"opencv {name}": cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor])[1].tobytes()
        for name, factor in (
            ("4:2:0", cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420),
            ("4:2:2", cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422),
            ("4:4:4", cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444),
            ("4:4:0", cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440),
            ("4:1:1", cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411),
        )
    }
    return {
        **opencv_,
        "opencv restarts": cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_RST_INTERVAL, 3])[1].tobytes(),
        "pillow progressive": pillow(img, progressive=True),
        "pillow optimised 4:2:2": pillow(img, optimize=True, subsampling=1),
    }


@pytest.mark.parametrize("size", [(480, 640), (37, 53), (17, 16)])
def test_bands_equal_opencvs_rows(size):
    rng = np.random.default_rng(sum(size))
    img = photo(rng, *size)
    for kind, data in kinds(img).items():
        whole = opencv(data)
        height = whole.shape[0]
        bands = {(0, height), (0, 1), (height - 1, height), (0, height // 2), (height // 3, height - 2)}
        bands |= {tuple(sorted(rng.choice(np.arange(height + 1), 2, replace=False))) for _ in range(8)}
        for first, last in sorted(bands):
            if first >= last:
                continue
            decoded = jpeg_rows.decode(data, whole.shape[:2], first, last)
            assert decoded is not None, (kind, first, last)
            assert decoded.dtype == np.uint8 and decoded.shape == whole.shape, kind
            assert np.array_equal(decoded[first:last], whole[first:last]), (kind, first, last)


@pytest.mark.parametrize("size", [(480, 640), (37, 53), (17, 16)])
def test_regions_equal_opencvs_pixels(size):
    """Columns too: the columns next to libjpeg-turbo's cut are upsampled from one chroma sample, so it
    decodes one more on each side; every column from ``left`` to ``right`` is OpenCV's, at every
    subsampling, on and off the MCUs' edges, at the image's edges."""
    rng = np.random.default_rng(sum(size) + 1)
    img = photo(rng, *size)
    for kind, data in kinds(img).items():
        whole = opencv(data)
        height, width = whole.shape[:2]
        edges = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, width - 17, width - 16, width - 1, width]
        edges = sorted({e for e in edges if 0 <= e <= width} | set(rng.integers(0, width + 1, 6).tolist()))
        for left in edges:
            for right in (e for e in edges if e > left):
                first, last = sorted(rng.choice(np.arange(height + 1), 2, replace=False))
                decoded = jpeg_rows.decode(data, (height, width), int(first), int(last), left, right)
                assert decoded is not None, (kind, left, right)
                assert np.array_equal(decoded[first:last, left:right], whole[first:last, left:right]), (
                    kind,
                    first,
                    last,
                    left,
                    right,
                )


def test_a_region_decoded_into_a_place_on_a_larger_array_stays_inside_it():
    """``out``: a view of a larger array (rows apart, as a piece's place on a mosaic board). The region is
    OpenCV's; nothing outside the view is written, nor any row outside the band; a view of another
    shape, type or pixel layout is refused."""
    rng = np.random.default_rng(5)
    img = photo(rng, 45, 70)
    for kind, data in kinds(img).items():
        whole = opencv(data)
        for first, last, left, right in ((0, 45, 0, 70), (10, 30, 17, 40), (3, 4, 0, 1), (44, 45, 69, 70)):
            board = np.full((60, 100, 3), 7, dtype=np.uint8)
            place = board[6:51, 13:83]
            assert jpeg_rows.decode(data, (45, 70), first, last, left, right, out=place) is place, kind
            assert np.array_equal(place[first:last, left:right], whole[first:last, left:right]), kind
            outside = np.ones(board.shape[:2], dtype=bool)
            outside[6 + first : 6 + last, 13:83] = False
            assert (board[outside] == 7).all(), (kind, first, last, left, right)
    data = kinds(img)["opencv 4:2:0"]
    board = np.zeros((60, 200, 3), dtype=np.uint8)
    for wrong in (board[:45, :70][:, :, ::-1], board[:45, :140:2], board[:44, :70], board[:45, :70].astype(np.int16)):
        assert jpeg_rows.decode(data, (45, 70), 0, 45, out=wrong) is None


def test_what_it_cannot_promise_is_refused():
    img = photo(np.random.default_rng(3), 48, 64)
    plain = cv2.imencode(".jpg", img)[1].tobytes()
    assert jpeg_rows.decode(plain, (48, 64), 0, 48) is not None
    refused = {
        "grayscale (OpenCV expands it its own way)": (cv2.imencode(".jpg", img[..., 0])[1].tobytes(), (48, 64)),
        "CMYK (OpenCV converts it itself)": (pillow(img, "CMYK"), (48, 64)),
        "PNG": (cv2.imencode(".png", img)[1].tobytes(), (48, 64)),
        "cut short inside the band (a warning)": (plain[: len(plain) // 2], (48, 64)),
        "another size than the caller's": (plain, (64, 48)),
        "no bytes": (b"", (48, 64)),
    }
    for why, (data, shape) in refused.items():
        assert jpeg_rows.decode(data, shape, 0, shape[0]) is None, why
    for first, last in ((0, 0), (5, 5), (-1, 10), (10, 49)):  # empty, or outside the image
        assert jpeg_rows.decode(plain, (48, 64), first, last) is None, (first, last)
    for left, right in ((3, 3), (9, 2), (-1, 5), (60, 65)):
        assert jpeg_rows.decode(plain, (48, 64), 0, 48, left, right) is None, (left, right)


def test_a_damaged_stream_is_left_to_opencv():
    img = photo(np.random.default_rng(4), 64, 64)
    data = bytearray(cv2.imencode(".jpg", img)[1].tobytes())
    data[len(data) // 2 : len(data) // 2 + 40] = b"\xff\x00" * 20  # garbage in the entropy-coded data
    assert jpeg_rows.decode(bytes(data), (64, 64), 0, 64) is None
