"""A faster version of mmdet 3.3.0's ``RandomAffine`` (YOLOX's pipeline), with the same outputs.

``FastRandomAffine`` subclasses mmdet's class: same parameters, the same random draws (mmdet's own
``_get_random_homography_matrix``), the same box arithmetic (mmdet's box methods, in mmdet's order).
What differs: the image is warped by ``cv2.warpAffine`` on the matrix's first two rows instead of
``cv2.warpPerspective``. mmdet's matrix is a product of rotation, scaling, shear and translation
matrices whose last rows are ``(0, 0, 1)``, so its own last row is exactly ``(0, 0, 1)`` (products
of 0s and 1s in float32), and the perspective divide is a division by 1. OpenCV's two warps then
give the same pixels, bit for bit, in the OpenCV installed here; :func:`affine_warp_matches` checks
that once per process on a probe image (zoom in, zoom out, rotation, shear, border), and where it
does not hold, or the matrix is not affine, or the image is not 8-bit, mmdet's call runs.

Measured alternatives, kept out because they cannot give mmdet's pixels or gain too little:
MixUp's float64 jitter resize goes through Intel IPP inside OpenCV (``cv2.ipp.useIPP()``), whose
coefficients are not OpenCV's documented ``(dx + 0.5) * scale - 0.5`` in float (values differ by
up to 6e-4 from that formula), so neither a window-only resize nor an 8-bit or float32 resize can
reproduce its truncated values; and ``simplejpeg`` decodes the same pixels as ``cv2.imdecode`` but
only 8% faster (and ignores EXIF orientation, which OpenCV applies).
"""

from __future__ import annotations

import functools
from typing import Any

import cv2
import numpy as np
from mmdet.datasets.transforms import transforms as mmdet_transforms
from mmdet.registry import TRANSFORMS
from mmdet.structures.bbox import autocast_box_type

from det_mmdet import fast_transforms
from det_mmdet.fast_transforms import unmirrored

AFFINE_ROW = np.array([0.0, 0.0, 1.0], dtype=np.float32)


@functools.cache
def affine_warp_matches() -> bool:
    """Whether ``cv2.warpAffine`` on the first two rows gives ``cv2.warpPerspective``'s pixels here.

    Probed once on an 8-bit colour image with matrices of the kinds ``RandomAffine`` draws (zoom in
    and out, rotation, shear, translation, parts mapped outside the source).
    """
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    img[20:60, 30:90] = (40, 200, 90)  # flat areas and sharp edges as well as noise
    for scale, degrees, shear, shift in ((1.7, 7.0, 1.5, -20.0), (0.3, -9.0, -2.0, 15.0), (1.0, 0.0, 0.0, 0.0)):
        radian, sx, sy = np.radians(degrees), np.tan(np.radians(shear)), np.tan(np.radians(-shear))
        rotate = np.array([[np.cos(radian), -np.sin(radian), 0], [np.sin(radian), np.cos(radian), 0], [0, 0, 1]])
        matrix = np.array([[1, sx, shift], [sy, 1, -shift], [0, 0, 1]]) @ rotate @ np.diag([scale, scale, 1])
        matrix = matrix.astype(np.float32)
        for size in ((128, 96), (64, 64)):
            wanted = cv2.warpPerspective(img, matrix, dsize=size, borderValue=(114, 114, 114))
            got = cv2.warpAffine(img, matrix[:2], dsize=size, borderValue=(114, 114, 114))
            if not np.array_equal(wanted, got):
                return False
    return True


def warped(img: np.ndarray, matrix: np.ndarray, size: tuple[int, int], border_val: Any) -> np.ndarray:
    """``cv2.warpPerspective(img, matrix, dsize=size, borderValue=border_val)``, by warpAffine where equal."""
    affine = matrix.shape == (3, 3) and np.array_equal(matrix[2], AFFINE_ROW)
    if affine and fast_transforms.is_color_uint8(img) and size[0] > 0 and size[1] > 0 and affine_warp_matches():
        return cv2.warpAffine(unmirrored(img), matrix[:2], dsize=size, borderValue=border_val)
    return cv2.warpPerspective(img, matrix, dsize=size, borderValue=border_val)


@TRANSFORMS.register_module(name="FastRandomAffine", force=True)
class FastRandomAffine(mmdet_transforms.RandomAffine):
    """mmdet's ``RandomAffine`` with the image warped by ``cv2.warpAffine`` (module docstring)."""

    @autocast_box_type()
    def transform(self, results: dict) -> dict:
        img = results["img"]
        height = img.shape[0] + self.border[1] * 2
        width = img.shape[1] + self.border[0] * 2
        matrix = self._get_random_homography_matrix(height, width)
        img = warped(img, matrix, (width, height), self.border_val)
        results["img"] = img
        results["img_shape"] = img.shape[:2]
        boxes = results["gt_bboxes"]
        if len(boxes):
            boxes.project_(matrix)
            if self.bbox_clip_border:
                boxes.clip_([height, width])
            keep = boxes.is_inside([height, width]).numpy()  # boxes wholly outside are dropped
            results["gt_bboxes"] = boxes[keep]
            results["gt_bboxes_labels"] = results["gt_bboxes_labels"][keep]
            results["gt_ignore_flags"] = results["gt_ignore_flags"][keep]
            if "gt_masks" in results:
                raise NotImplementedError("RandomAffine only supports bbox.")  # mmdet's refusal, word for word
        return results


fast_transforms.register(mmdet_transforms.RandomAffine, FastRandomAffine)
