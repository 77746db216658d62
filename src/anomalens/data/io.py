"""Robust image and mask reading.

Handles greyscale, RGBA, palette, 16-bit and EXIF-rotated files; refuses images whose decoded
size exceeds a pixel budget *before* decoding them (the header is read first); can reduce large
images while decoding when the caller only needs a working size; every failure is an
``ImageReadError`` that names the file and the reason.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageLike",
    "ImageReadError",
    "as_rgb_array",
    "image_size",
    "list_images",
    "load_image",
    "load_image_bytes",
    "load_mask",
    "max_pixels",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Largest decoded image accepted by default, in pixels (width x height); the environment
#: variable ANOMALENS_MAX_PIXELS replaces it (higher or lower, also above Pillow's own limit).
DEFAULT_MAX_PIXELS = 50_000_000
#: Modes ``Image.reduce`` works on directly; others are reduced after conversion to RGB.
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr")

ImageLike = np.ndarray | Image.Image | str | Path


class ImageReadError(ValueError):
    """An image or mask could not be read; ``path`` names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def max_pixels() -> int:
    """The decoded-size budget of one image: ``$ANOMALENS_MAX_PIXELS`` or ``DEFAULT_MAX_PIXELS``.

    Raises:
        ValueError: the variable is set but not a positive integer.
    """
    raw = os.environ.get("ANOMALENS_MAX_PIXELS", "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"environment variable ANOMALENS_MAX_PIXELS={raw!r} must be a positive integer "
            "(pixels, width x height)"
        )
    return value


def _let_pillow_allow(limit: int) -> None:
    # Our header check enforces ``limit``; Pillow's own bomb check (89 MP, an error at twice
    # that) must not silently cap it lower, so raise Pillow's only when ours is higher.
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit


def _check_path(path: Path) -> None:
    if not path.exists():
        if path.is_symlink():
            raise ImageReadError(path, "symbolic link to nothing (dangling, or a loop)")
        raise ImageReadError(path, "file does not exist")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if not path.is_file():  # opening a FIFO would wait forever
        raise ImageReadError(path, "not a regular file (a FIFO, socket or device)")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty")


def _open_header(src: Path | BinaryIO, shown: str | Path, limit: int) -> Image.Image:
    """Open (header only) and check the decoded size against ``limit``."""
    _let_pillow_allow(limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(src)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(shown, f"decompression bomb refused ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageReadError(shown, "not a recognised image format") from exc
    except PermissionError as exc:
        raise ImageReadError(shown, "permission denied") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(shown, f"corrupt or truncated image ({exc})") from exc
    w, h = img.size
    if w < 1 or h < 1:
        img.close()
        raise ImageReadError(shown, f"the image has no pixels ({w}x{h})")
    if w * h > limit:
        img.close()
        raise ImageReadError(
            shown,
            f"{w}x{h} = {w * h} decoded pixels exceeds the limit of {limit} "
            "(set ANOMALENS_MAX_PIXELS to change it)",
        )
    return img


def _decode(img: Image.Image, shown: str | Path, working_size: int | None) -> Image.Image:
    """Decode the pixels, reduced while decoding when both sides stay >= ``working_size``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if working_size is not None and img.format == "JPEG":
                img.draft(None, (working_size, working_size))  # DCT scaling: 1/2, 1/4, 1/8
            img.load()  # force decoding now: truncated files fail here
            factor = _reduce_factor(img.size, working_size)
            if factor > 1 and img.mode in _REDUCIBLE:
                img = img.reduce(factor)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(shown, f"decompression bomb refused ({exc})") from exc
    except PermissionError as exc:
        raise ImageReadError(shown, "permission denied") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(shown, f"corrupt or truncated image ({exc})") from exc
    return img


def _reduce_factor(size: tuple[int, int], working_size: int | None) -> int:
    if working_size is None:
        return 1
    if working_size < 1:
        raise ValueError(f"working_size must be >= 1, got {working_size}")
    return max(1, min(size) // working_size)


def _open(path: str | Path, working_size: int | None = None) -> Image.Image:
    path = Path(path)
    _check_path(path)
    return _decode(_open_header(path, path, max_pixels()), path, working_size)


def image_size(source: str | Path | bytes, *, name: str | None = None) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels.

    Args:
        source: a file, or the bytes of one.
        name: the name errors show for ``bytes`` (default ``<bytes>``).

    Raises:
        ImageReadError: missing, empty, not an image, or over the pixel budget.
    """
    if isinstance(source, bytes):
        shown: str | Path = name or "<bytes>"
        if not source:
            raise ImageReadError(shown, "file is empty")
        src: Path | BinaryIO = io.BytesIO(source)
    else:
        src = shown = Path(source)
        _check_path(src)
    with _open_header(src, shown, max_pixels()) as img:
        return img.size


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


def _finish(img: Image.Image, shown: str | Path, working_size: int | None) -> np.ndarray:
    try:
        arr = _pil_to_rgb(img)
        factor = _reduce_factor(arr.shape[1::-1], working_size)
        if factor > 1:  # modes Image.reduce cannot take directly (palette, 1-bit, 16-bit)
            arr = np.asarray(Image.fromarray(arr).reduce(factor))
    except (OSError, ValueError) as exc:
        raise ImageReadError(shown, f"cannot convert to RGB ({exc})") from exc
    return np.ascontiguousarray(arr)


def load_image(path: str | Path, *, working_size: int | None = None) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array.

    The decoded size (width x height from the header) is checked against ``max_pixels()``
    before any pixel is decoded.

    Args:
        path: the image file.
        working_size: the side the caller will resize to; when given, a large image is reduced
            while decoding by an integer factor that keeps both sides >= ``working_size``
            (JPEG: DCT scaling, nothing larger is ever decoded; others: ``Image.reduce``).

    Raises:
        ImageReadError: missing, empty, corrupt, truncated, unsupported or too large file.
    """
    return _finish(_open(path, working_size), path, working_size)


def load_image_bytes(
    data: bytes,
    name: str,
    *,
    working_size: int | None = None,
    limit: int | None = None,
) -> np.ndarray:
    """Decode an image held in memory (an upload) as an (H, W, 3) uint8 RGB array.

    Args:
        data: the file's bytes (format found from the content).
        name: the file name errors show.
        working_size: as in ``load_image``.
        limit: decoded-pixel budget (default ``max_pixels()``).

    Raises:
        ImageReadError: empty, corrupt, truncated, unsupported or too large.
    """
    if not data:
        raise ImageReadError(name, "file is empty")
    img = _open_header(io.BytesIO(data), name, max_pixels() if limit is None else limit)
    return _finish(_decode(img, name, working_size), name, working_size)


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
