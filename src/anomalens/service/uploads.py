"""Uploaded images: decoded by content (never by file name), hashed, sanitised names.

Decoded size is bounded three ways before any pixel is decoded: per image (the header's width x
height against ``ANOMALENS_MAX_PIXELS``), per request (the pixels kept after reduction, summed
over the files) and across requests (a ``PixelGate`` lets only so many pixels be decoded at
the same time, so that many clients sending large images cannot add up).
"""

from __future__ import annotations

import hashlib
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from anomalens.data.io import ImageReadError, image_size, load_image_bytes
from anomalens.service.errors import ServiceError

__all__ = [
    "DecodedImage",
    "PixelGate",
    "clean_file_name",
    "decode_image",
    "kept_pixels",
    "peek_pixels",
]


@dataclass(frozen=True)
class DecodedImage:
    """An accepted upload.

    Attributes:
        file_name: the client's file name, cleaned, for display and records only (never a path).
        sha256: hex digest of the uploaded bytes (the storage key).
        array: (H, W, 3) uint8 RGB pixels.
    """

    file_name: str
    sha256: str
    array: np.ndarray


class PixelGate:
    """Bounds the pixels being decoded at the same time, over all request threads.

    A decode of ``n`` pixels waits while others hold the gate and ``n`` more would pass
    ``capacity``; alone, any image within the per-image limit goes through.

    Args:
        capacity: pixels decoded at once (header width x height).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._cond:
            while self.in_use > 0 and self.in_use + pixels > self.capacity:
                self._cond.wait()
            self.in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= pixels
                self._cond.notify_all()


def clean_file_name(name: str | None) -> str:
    """A display name: last path component, no control characters, at most 200 characters."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    return name[:200] or "upload"


def _reject(shown: str, exc: ImageReadError) -> ServiceError:
    return ServiceError(400, "bad_image", f"{shown}: {exc.reason}")


def kept_pixels(width: int, height: int, working_size: int | None) -> int:
    """Pixels of a ``width`` x ``height`` image after reduction towards ``working_size``."""
    if working_size is None:
        return width * height
    f = max(1, min(width, height) // working_size)
    return -(-width // f) * -(-height // f)


def peek_pixels(data: bytes, file_name: str | None) -> tuple[int, int]:
    """(width, height) of an upload from its header; nothing is decoded.

    Raises:
        ServiceError: 400 ``bad_image`` (empty, not an image, over ``ANOMALENS_MAX_PIXELS``).
    """
    shown = clean_file_name(file_name)
    try:
        return image_size(data, name=shown)
    except ImageReadError as exc:
        raise _reject(shown, exc) from None


def decode_image(
    data: bytes,
    file_name: str | None,
    *,
    working_size: int | None = None,
    gate: PixelGate | None = None,
) -> DecodedImage:
    """Decode uploaded bytes with Pillow (format found from the content).

    Args:
        data: the uploaded file.
        file_name: the client's name for it (display only).
        working_size: reduce while decoding, keeping both sides >= this many pixels.
        gate: the server's limit on pixels decoded at once.

    Raises:
        ServiceError: 400 ``bad_image`` with the reason (empty, not an image, truncated,
            too many pixels, unconvertible mode).
    """
    shown = clean_file_name(file_name)
    w, h = peek_pixels(data, file_name)
    try:
        if gate is None:
            array = load_image_bytes(data, shown, working_size=working_size)
        else:
            with gate.hold(w * h):
                array = load_image_bytes(data, shown, working_size=working_size)
    except ImageReadError as exc:
        raise _reject(shown, exc) from None
    return DecodedImage(shown, hashlib.sha256(data).hexdigest(), array)
