"""Geometric alignment of an image to its reference, before a reference-based comparison.

Methods (OpenCV, the optional extra ``anomalens[align]``; no hand-written optimiser):

* ``none``: the image is used as it is (the reference is resized to the image when the sizes
  differ).
* ``ecc``: enhanced correlation coefficient maximisation (``cv2.findTransformECC``) with a
  Euclidean motion (shift + rotation): for parts placed under a fixed camera with small jitter.
* ``homography``: ORB key points, brute-force Hamming matching, RANSAC homography
  (``cv2.findHomography``): for larger viewpoint changes of planar parts (boards, labels).

The aligned image lives in the reference's frame; :func:`map_to_image` brings an anomaly map
computed there back onto the original image, so overlays and masks are drawn on what was
inspected. When an alignment fails (too few matches, ECC not converging) the identity is used and
``Alignment.ok`` is False with the reason, so a batch goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ALIGN_METHODS", "Alignment", "align_to_reference", "map_to_image"]

ALIGN_METHODS = ("none", "ecc", "homography")


@dataclass
class Alignment:
    """An image brought into its reference's frame.

    Attributes:
        aligned: (H, W, 3) uint8 image in the reference's frame (reference size).
        reference: (H, W, 3) uint8 reference (resized to the image when the sizes differed and
            no alignment was asked).
        matrix: (3, 3) homography from image coordinates to reference coordinates.
        method: the alignment method.
        ok: False when the alignment failed and the identity was used.
        details: what happened (reference resized, ECC correlation, inlier count, reason).
    """

    aligned: np.ndarray
    reference: np.ndarray
    matrix: np.ndarray
    method: str
    ok: bool = True
    details: dict[str, Any] = field(default_factory=dict)


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise ImportError(
            "alignment needs OpenCV: pip install 'anomalens[align]' (opencv-python-headless)"
        ) from None
    return cv2


def _grey(image: np.ndarray) -> np.ndarray:
    return (image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(
        np.float32
    )


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def align_to_reference(image: np.ndarray, reference: np.ndarray, method: str = "none") -> Alignment:
    """Bring ``image`` into the frame of ``reference``.

    Args:
        image: (H, W, 3) uint8.
        reference: (H', W', 3) uint8 normal reference of the same part.
        method: one of ``ALIGN_METHODS``.

    Raises:
        ValueError: an unknown method.
        ImportError: ``ecc`` / ``homography`` without OpenCV (names the extra).
    """
    if method not in ALIGN_METHODS:
        raise ValueError(
            f"unknown alignment {method!r}; expected one of {', '.join(ALIGN_METHODS)}"
        )
    h, w = image.shape[:2]
    details: dict[str, Any] = {}
    if method == "none":
        if reference.shape[:2] != (h, w):
            details["reference_resized_from"] = list(reference.shape[:2])
            reference = _resize(reference, h, w)
        return Alignment(image, reference, np.eye(3), method, True, details)
    cv2 = _cv2()
    rh, rw = reference.shape[:2]
    if (rh, rw) != (h, w):
        details["sizes"] = {"image": [h, w], "reference": [rh, rw]}
    # image coordinates scaled onto the reference frame first; the method refines from there
    scale = np.diag([rw / w, rh / h, 1.0])
    img_s = _resize(image, rh, rw) if (rh, rw) != (h, w) else image
    g_img, g_ref = _grey(img_s), _grey(reference)
    matrix = np.eye(3)
    ok, reason = True, ""
    if method == "ecc":
        warp = np.eye(2, 3, dtype=np.float32)
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-5)
        try:
            cc, warp = cv2.findTransformECC(
                g_ref, g_img, warp, cv2.MOTION_EUCLIDEAN, criteria, None, 5
            )
            details["ecc_correlation"] = float(cc)
            # warp maps reference coordinates to image coordinates: invert it
            matrix = np.linalg.inv(np.vstack([warp.astype(np.float64), [0, 0, 1]]))
        except cv2.error as exc:
            ok, reason = False, f"ECC did not converge ({str(exc).strip().splitlines()[-1]})"
    else:
        orb = cv2.ORB_create(2000)
        k1, d1 = orb.detectAndCompute(g_img.astype(np.uint8), None)
        k2, d2 = orb.detectAndCompute(g_ref.astype(np.uint8), None)
        if d1 is None or d2 is None or len(k1) < 8 or len(k2) < 8:
            ok, reason = False, "too few key points for a homography"
        else:
            matches = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(d1, d2)
            if len(matches) < 8:
                ok, reason = False, f"only {len(matches)} key-point matches"
            else:
                src = np.array([k1[m.queryIdx].pt for m in matches], dtype=np.float32)
                dst = np.array([k2[m.trainIdx].pt for m in matches], dtype=np.float32)
                hom, inl = cv2.findHomography(src, dst, cv2.RANSAC, 3.0)
                if hom is None:
                    ok, reason = False, "RANSAC found no homography"
                else:
                    matrix = hom.astype(np.float64)
                    details["inliers"] = int(inl.sum())
    if not ok:
        details["reason"] = reason
    full = matrix @ scale
    aligned = cv2.warpPerspective(
        image, full, (rw, rh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    return Alignment(aligned, reference, full, method, ok, details)


def map_to_image(
    anomaly_map: np.ndarray, alignment: Alignment, shape: tuple[int, int]
) -> np.ndarray:
    """An anomaly map in the reference's frame, warped back onto the original image.

    Args:
        anomaly_map: (H', W') float map at the reference's size.
        alignment: from :func:`align_to_reference`.
        shape: (H, W) of the original image.

    Returns:
        (H, W) float32 map in the image's frame.
    """
    h, w = shape
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if alignment.method == "none" or np.allclose(alignment.matrix, np.eye(3)):
        if amap.shape == (h, w):
            return amap
        from anomalens.viz.overlay import resize_map

        return resize_map(amap, h, w)
    cv2 = _cv2()
    return cv2.warpPerspective(
        amap,
        alignment.matrix,
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
