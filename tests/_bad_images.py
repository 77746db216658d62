"""Seeded generator of hostile and broken image files (the kinds of issue 14), for the fuzz test
and ``benchmarks/fuzz_predict.py``.

Every file is small on disk (at most a few hundred KB); some declare a decoded size of
gigapixels. ``write_bad_images(folder, n, seed)`` returns ``[(path, kind)]``.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["KINDS", "png_bytes_of_size", "write_bad_images"]


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes_of_size(
    width: int, height: int, *, rows: int | None = None, colour: int = 0
) -> bytes:
    """A greyscale 8-bit PNG declaring ``width`` x ``height``, compressed row by row.

    Args:
        width: declared width (may be huge).
        height: declared height.
        rows: how many rows of pixel data to actually store (default all: a valid file;
            fewer: a truncated one). Rows are zeros, so even 8000 x 8000 compresses to ~80 KB.
        colour: the grey value of every pixel.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    comp = zlib.compressobj(9)
    piece = bytes([colour]) * min(width, 1 << 20)
    parts = []
    for _ in range(height if rows is None else rows):
        parts.append(comp.compress(b"\x00"))  # filter type "none"
        for start in range(0, width, len(piece)):
            parts.append(comp.compress(piece[: min(len(piece), width - start)]))
    parts.append(comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


def _encode(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _valid(rng: np.random.Generator) -> tuple[bytes, str]:
    fmt, ext = [
        ("PNG", ".png"),
        ("JPEG", ".jpg"),
        ("BMP", ".bmp"),
        ("TIFF", ".tif"),
        ("WEBP", ".webp"),
    ][int(rng.integers(5))]
    h, w = (int(x) for x in rng.integers(1, 80, 2))
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return _encode(arr, fmt), ext


def _truncated(rng: np.random.Generator) -> tuple[bytes, str]:
    data, ext = _valid(rng)
    return data[: int(rng.integers(1, max(2, len(data) - 1)))], ext


def _flipped(rng: np.random.Generator) -> tuple[bytes, str]:
    data, ext = _valid(rng)
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 12))):
        buf[int(rng.integers(len(buf)))] = int(rng.integers(256))
    return bytes(buf), ext


def _png_bomb(rng: np.random.Generator) -> tuple[bytes, str]:
    w, h = [(8000, 8000), (20000, 20000), (65535, 65535), (1, 2**31 - 1), (2**31 - 1, 1)][
        int(rng.integers(5))
    ]
    rows = int(rng.integers(0, 4)) if w <= 65535 else 0
    return png_bytes_of_size(w, h, rows=rows), ".png"


def _png_bomb_under_limit(rng: np.random.Generator) -> tuple[bytes, str]:
    # a complete file of up to 2000 x 2000 that decodes (4 MP): loads, at a real cost
    side = int(rng.integers(500, 2001))
    return png_bytes_of_size(side, side, colour=int(rng.integers(256))), ".png"


def _jpeg_huge_header(rng: np.random.Generator) -> tuple[bytes, str]:
    data = bytearray(_encode(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "JPEG"))
    sof = data.find(b"\xff\xc0")
    h, w = int(rng.integers(30000, 65536)), int(rng.integers(30000, 65536))
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data), ".jpg"


def _zero_size_png(rng: np.random.Generator) -> tuple[bytes, str]:
    w, h = [(0, 10), (10, 0), (0, 0)][int(rng.integers(3))]
    return png_bytes_of_size(w, h, rows=0), ".png"


def _bmp_huge_header(rng: np.random.Generator) -> tuple[bytes, str]:
    data = bytearray(_encode(np.zeros((4, 4, 3), np.uint8), "BMP"))
    w = int(rng.integers(20000, 2**31 - 1))
    h = (
        -int(rng.integers(20000, 2**31 - 1))
        if rng.random() < 0.5
        else int(rng.integers(1, 2**31 - 1))
    )
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data), ".bmp"


def _garbage(rng: np.random.Generator) -> tuple[bytes, str]:
    choice = int(rng.integers(4))
    if choice == 0:
        return b"", ".png"
    if choice == 1:
        return rng.integers(0, 256, int(rng.integers(1, 4000)), dtype=np.uint8).tobytes(), ".jpg"
    if choice == 2:
        return b"<html><body>not an image</body></html>", ".png"
    return b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 200, dtype=np.uint8).tobytes(), ".png"


def _odd_modes(rng: np.random.Generator) -> tuple[bytes, str]:
    choice = int(rng.integers(6))
    if choice == 0:
        return _encode(rng.integers(0, 65536, (9, 7), dtype=np.uint16), "PNG"), ".png"
    if choice == 1:
        im = Image.new("P", (12, 5))
        buf = io.BytesIO()
        im.save(buf, format="PNG", transparency=0)
        return buf.getvalue(), ".png"
    if choice == 2:
        buf = io.BytesIO()
        Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(buf, format="JPEG")
        return buf.getvalue(), ".jpg"
    if choice == 3:
        buf = io.BytesIO()
        Image.fromarray(rng.random((6, 6)).astype(np.float32)).save(buf, format="TIFF")
        return buf.getvalue(), ".tif"
    if choice == 4:
        frames = [Image.new("L", (9, 9), int(v)) for v in rng.integers(0, 256, 3)]
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
        return buf.getvalue(), ".png"  # a GIF named .png
    buf = io.BytesIO()
    Image.new("1", (1, 300)).save(buf, format="PNG")
    return buf.getvalue(), ".png"


KINDS: dict[str, Callable[[np.random.Generator], tuple[bytes, str]]] = {
    "valid": _valid,
    "truncated": _truncated,
    "bit_flips": _flipped,
    "png_decoded_size_bomb": _png_bomb,
    "png_large_but_allowed": _png_bomb_under_limit,
    "jpeg_huge_header": _jpeg_huge_header,
    "png_zero_size": _zero_size_png,
    "bmp_huge_header": _bmp_huge_header,
    "garbage": _garbage,
    "odd_modes": _odd_modes,
}


def write_bad_images(
    folder: Path, n: int, seed: int = 0, kinds: tuple[str, ...] | None = None
) -> list[tuple[Path, str]]:
    """Write ``n`` files into ``folder``, kinds drawn in turn; returns (path, kind) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(kinds or KINDS)
    out = []
    for i in range(n):
        kind = names[i % len(names)]
        data, ext = KINDS[kind](rng)
        path = folder / f"{i:05d}_{kind}{ext}"
        path.write_bytes(data)
        out.append((path, kind))
    return out
