"""Uploaded images: decoded by content (never by file name), hashed, sanitised names."""

from __future__ import annotations

import hashlib
import io
import unicodedata
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from anomalens.data.io import MAX_PIXELS, as_rgb_array
from anomalens.service.errors import ServiceError

__all__ = ["DecodedImage", "clean_file_name", "decode_image"]


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


def clean_file_name(name: str | None) -> str:
    """A display name: last path component, no control characters, at most 200 characters."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    return name[:200] or "upload"


def decode_image(data: bytes, file_name: str | None) -> DecodedImage:
    """Decode uploaded bytes with Pillow (format found from the content).

    Raises:
        ServiceError: 400 ``bad_image`` with the reason (empty, not an image, truncated,
            too many pixels, unconvertible mode).
    """
    shown = clean_file_name(file_name)

    def reject(reason: str) -> ServiceError:
        return ServiceError(400, "bad_image", f"{shown}: {reason}")

    if not data:
        raise reject("the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise reject(f"{w}x{h} pixels exceeds the limit of {MAX_PIXELS} pixels")
            if w < 1 or h < 1:
                raise reject("the image has no pixels")
            img.load()  # decode now: truncated data fails here
            array = as_rgb_array(img)
    except ServiceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise reject("decompression bomb refused") from None
    except Image.UnidentifiedImageError:
        raise reject("not a recognised image format (PNG, JPEG, BMP, TIFF, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise reject(f"corrupt or truncated image ({exc})") from None
    return DecodedImage(shown, hashlib.sha256(data).hexdigest(), array)
