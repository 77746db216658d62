"""Robust image and mask reading.

Handles greyscale, RGBA, palette, 16-bit and EXIF-rotated files; limits decompression bombs;
every failure is an ``ImageReadError`` that names the file and the reason.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageLike",
    "ImageReadError",
    "as_rgb_array",
    "list_images",
    "load_image",
    "load_mask",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Largest accepted image, in pixels (default 100 MP; override with ANOMALENS_MAX_PIXELS).
MAX_PIXELS = int(os.environ.get("ANOMALENS_MAX_PIXELS", 100_000_000))

ImageLike = np.ndarray | Image.Image | str | Path


class ImageReadError(ValueError):
    """An image or mask could not be read; ``path`` names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def _open(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file does not exist")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageReadError(
                    path,
                    f"{w}x{h} = {w * h} pixels exceeds the limit of {MAX_PIXELS} "
                    "(set ANOMALENS_MAX_PIXELS to raise it)",
                )
            img.load()  # force decoding now: truncated files fail here
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(path, f"decompression bomb refused ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageReadError(path, "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image ({exc})") from exc
    return img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any integer/float array to uint8 (16-bit images are scaled by their dtype range)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype) if arr.dtype != np.int32 else None
        hi = 65535 if info is None else info.max
        if info is None and arr.max() <= 255:
            hi = 255
        return np.clip(arr.astype(np.float64) * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8)
    # float in [0, 1]
    return np.clip(arr.astype(np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        arr = _to_uint8(arr.astype(np.uint16) if mode != "I" else arr.astype(np.int32))
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return np.repeat(_to_uint8(arr)[..., None], 3, axis=2)
    if mode in ("RGBA", "LA") or (mode == "P" and "transparency" in img.info):
        # composite on white so that transparent areas do not become black "defects"
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array.

    Raises:
        ImageReadError: missing, empty, corrupt, truncated, unsupported or too large file.
    """
    img = _open(path)
    try:
        return np.ascontiguousarray(_pil_to_rgb(img))
    except (OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot convert to RGB ({exc})") from exc


def load_mask(path: str | Path | None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as an (H, W) bool array (any value > 0 is anomalous).

    Args:
        path: mask file, or None for an all-normal mask (then ``shape`` is required).
        shape: expected (H, W); a mask of another size raises ``ImageReadError``.
    """
    if path is None:
        if shape is None:
            raise ValueError("load_mask(None) needs a shape")
        return np.zeros(shape, dtype=bool)
    img = ImageOps.exif_transpose(_open(path))
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    mask = arr > 0
    if shape is not None and mask.shape != tuple(shape):
        raise ImageReadError(
            path,
            f"mask size {mask.shape[1]}x{mask.shape[0]} (WxH) does not match the image "
            f"size {shape[1]}x{shape[0]}",
        )
    return mask


def as_rgb_array(image: ImageLike) -> np.ndarray:
    """Turn a path, PIL image or array into an (H, W, 3) uint8 RGB array."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(_pil_to_rgb(image))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image array, got shape {arr.shape}")
    return np.ascontiguousarray(_to_uint8(arr))


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Entries of ``folder`` named like images (by extension), sorted. Errors name the folder.

    Entries are listed by name only: a dangling link, a folder or a FIFO named ``x.png`` is
    listed too, so that the caller reports it instead of losing it silently.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    it: Iterable[Path] = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(
        p for p in it if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    return files
