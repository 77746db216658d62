"""Seeded synthetic defect dataset in MVTec layout (the default data of the tests and the demo).

Categories are procedural textures (``woven``, ``grain``, ``tile``) and objects on a plain
background (``washer``, ``screw``), each image with its own random variation (phase, pose,
brightness, noise). Defects (``SYNTHETIC_DEFECTS``) are painted on top with an exact mask: a
pixel is in the mask iff the defect changed it (up to 8-bit rounding), and no pixel outside
the mask differs from the defect-free rendering of the same image.

Everything is vectorised numpy (plus PIL for antialiased polylines and polygons); the same
seed gives byte-identical PNG files.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from anomalens.data.meta import write_meta_json
from anomalens.data.mvtec import find_category_dirs, make_mvtec_index

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_DEFECTS",
    "SyntheticCategory",
    "SyntheticSample",
    "generate_synthetic_dataset",
    "list_synthetic_categories",
    "render_synthetic_sample",
]

#: Defect types and what they look like.
SYNTHETIC_DEFECTS: dict[str, str] = {
    "scratch": "thin dark or bright curved line",
    "spot": "small irregular dark or bright blob",
    "hole": "dark disc with a bright rim",
    "crack": "jagged dark line with a branch",
    "stain": "soft-edged tinted blob",
    "missing": "a piece of the object removed (objects only)",
}
_TEXTURE_DEFECTS = ("scratch", "spot", "hole", "crack", "stain")
_OBJECT_DEFECTS = (*_TEXTURE_DEFECTS, "missing")


@dataclass(frozen=True)
class SyntheticCategory:
    """A synthetic category: ``kind`` is ``texture`` or ``object``; ``defects`` its defect types."""

    name: str
    kind: str
    description: str
    defects: tuple[str, ...]


#: The synthetic categories, by name.
SYNTHETIC_CATEGORIES: dict[str, SyntheticCategory] = {
    c.name: c
    for c in (
        SyntheticCategory(
            "woven", "texture", "basket-weave fabric, random phase and angle", _TEXTURE_DEFECTS
        ),
        SyntheticCategory(
            "grain", "texture", "wood grain with warped rings and fibres", _TEXTURE_DEFECTS
        ),
        SyntheticCategory(
            "tile", "texture", "stone-like noise tiles with grout lines", _TEXTURE_DEFECTS
        ),
        SyntheticCategory(
            "washer", "object", "metal washer centred on a dark background", _OBJECT_DEFECTS
        ),
        SyntheticCategory(
            "screw", "object", "screw with head and thread on a light background", _OBJECT_DEFECTS
        ),
    )
}

#: Smallest defect footprint, in pixels at 256 px (scaled with the image area).
_MIN_DEFECT_PIXELS = 12
#: Blend weights below this are dropped, so the mask is exactly the changed footprint.
_ALPHA_FLOOR = 0.15
_SUPERSAMPLE = 4
#: File that marks a category folder as generated here (such folders are replaced on re-run).
_MARKER = ".anomalens_synthetic.json"


@dataclass
class SyntheticSample:
    """One rendered image.

    Attributes:
        image: (S, S, 3) uint8, with the defect if any.
        mask: (S, S) bool, the defect footprint (all False for a normal image).
        clean: (S, S, 3) uint8, the same image without the defect.
        defect: defect type, or ``"good"``.
    """

    image: np.ndarray
    mask: np.ndarray
    clean: np.ndarray
    defect: str


def list_synthetic_categories() -> list[str]:
    """Names of the synthetic categories, sorted."""
    return sorted(SYNTHETIC_CATEGORIES)


# --------------------------------------------------------------------------- noise helpers


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel-centre coordinates, each (S, S) float32."""
    ax = np.arange(size, dtype=np.float32)
    return np.meshgrid(ax, ax, indexing="ij")


def _smooth_noise(
    rng: np.random.Generator, size: int, sigma: float | tuple[float, float]
) -> np.ndarray:
    """(S, S) float32 white noise blurred by a periodic Gaussian, zero mean and unit std.

    ``sigma`` is the Gaussian std in pixels, one value or (y, x). Filtering is done in the
    Fourier domain, so the cost does not depend on ``sigma``.
    """
    sy, sx = (float(sigma), float(sigma)) if isinstance(sigma, int | float) else sigma
    spec = np.fft.rfft2(rng.standard_normal((size, size)))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    spec *= np.exp(-2.0 * np.pi**2 * ((sy * fy) ** 2 + (sx * fx) ** 2))
    n = np.fft.irfft2(spec, s=(size, size))
    return ((n - n.mean()) / (n.std() + 1e-12)).astype(np.float32)


def _colour(rng: np.random.Generator, base: Sequence[float], jitter: float = 6.0) -> np.ndarray:
    """(3,) float32 colour: ``base`` plus a small per-image jitter (grey levels)."""
    return np.asarray(base, np.float32) + rng.uniform(-jitter, jitter, 3).astype(np.float32)


# --------------------------------------------------------------------------- categories
# A renderer returns (image (S,S,3) float32 in grey levels, coverage (S,S) in [0,1] of the
# region defects may touch, background (S,S,3) for "missing" or None).

Rendered = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _render_woven(rng: np.random.Generator, s: int) -> Rendered:
    y, x = _grid(s)
    th = np.deg2rad(rng.uniform(-3.0, 3.0))
    period = s / rng.uniform(13.0, 15.0)
    u = (x * np.cos(th) + y * np.sin(th)) / period + rng.uniform(0, 2)
    v = (-x * np.sin(th) + y * np.cos(th)) / period + rng.uniform(0, 2)
    parity = (np.floor(u) + np.floor(v)) % 2
    fu, fv = u - np.floor(u), v - np.floor(v)
    warp = np.sin(np.pi * fv) ** 0.7 * (0.8 + 0.2 * np.sin(np.pi * fu))
    weft = np.sin(np.pi * fu) ** 0.7 * (0.8 + 0.2 * np.sin(np.pi * fv))
    pattern = np.where(parity > 0, warp, weft)
    fibre = _smooth_noise(rng, s, (0.8, 0.8))
    low = _smooth_noise(rng, s, s / 6)
    level = 0.42 + 0.5 * pattern + 0.05 * fibre + 0.03 * low
    img = level[..., None] * _colour(rng, (175, 150, 120))
    return img, np.ones((s, s), np.float32), None


def _render_grain(rng: np.random.Generator, s: int) -> Rendered:
    y, x = _grid(s)
    th = np.deg2rad(rng.uniform(-4.0, 4.0))
    v = -x * np.sin(th) + y * np.cos(th)
    warp = 10.0 * _smooth_noise(rng, s, s / 5) + 2.0 * _smooth_noise(rng, s, s / 20)
    period = rng.uniform(9.0, 12.0) * s / 256
    rings = np.sin(2 * np.pi * (v + warp * s / 256) / period + rng.uniform(0, 2 * np.pi))
    fibre = _smooth_noise(rng, s, (0.6, 10.0))
    low = _smooth_noise(rng, s, s / 4)
    level = 0.68 + 0.1 * rings + 0.05 * fibre + 0.04 * low
    img = level[..., None] * _colour(rng, (205, 150, 95))
    return img, np.ones((s, s), np.float32), None


def _render_tile(rng: np.random.Generator, s: int) -> Rendered:
    y, x = _grid(s)
    stone = sum(
        w * _smooth_noise(rng, s, sig * s / 256) for w, sig in ((0.5, 12), (0.3, 5), (0.2, 2))
    )
    grit = _smooth_noise(rng, s, 0.7)
    tile = s / 2
    oy, ox = rng.uniform(0, tile, 2)
    dy = np.abs(((y + oy) % tile) - tile / 2)
    dx = np.abs(((x + ox) % tile) - tile / 2)
    half = tile / 2 - 2.0 * s / 256  # grout half-width 2 px at 256
    grout = np.clip(np.maximum(dy, dx) - half + 0.5, 0.0, 1.0)
    level = (0.62 + 0.08 * stone + 0.03 * grit) * (1 - grout) + (0.35 + 0.02 * grit) * grout
    img = level[..., None] * _colour(rng, (190, 185, 175))
    return img, np.ones((s, s), np.float32), None


def _background(rng: np.random.Generator, s: int, level: float) -> np.ndarray:
    y, x = _grid(s)
    g = rng.uniform(-0.04, 0.04, 2)
    ramp = 1 + g[0] * (y / s - 0.5) + g[1] * (x / s - 0.5)
    lv = level * ramp + 1.5 * rng.standard_normal((s, s)).astype(np.float32)
    return lv[..., None] * np.ones(3, np.float32)


def _render_washer(rng: np.random.Generator, s: int) -> Rendered:
    y, x = _grid(s)
    cy, cx = s / 2 + rng.uniform(-0.02, 0.02, 2) * s
    r_out = 0.36 * s * rng.uniform(0.98, 1.02)
    r_in = 0.15 * s * rng.uniform(0.97, 1.03)
    d = np.hypot(y - cy, x - cx)
    ang = np.arctan2(y - cy, x - cx)
    cov = np.clip(r_out - d + 0.5, 0, 1) * np.clip(d - r_in + 0.5, 0, 1)
    light = rng.uniform(0, 2 * np.pi)
    turning = np.sin(2 * np.pi * d / (3.0 * s / 256))
    bevel = np.exp(-(((d - r_out + 3 * s / 256) / (1.5 * s / 256)) ** 2))
    level = 150 + 35 * np.cos(ang - light) + 5 * turning + 45 * bevel
    level = level + 3 * _smooth_noise(rng, s, 1.0)
    metal = level[..., None] * (_colour(rng, (1.0, 1.0, 1.05), 0.02))
    bg = _background(rng, s, rng.uniform(45, 60))
    img = bg * (1 - cov[..., None]) + metal * cov[..., None]
    return img, cov.astype(np.float32), bg


def _sdf_box(u: np.ndarray, v: np.ndarray, hu: float, hv: float) -> np.ndarray:
    """Signed distance to an axis-aligned box of half sizes (hu, hv) centred at 0."""
    qu, qv = np.abs(u) - hu, np.abs(v) - hv
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return outside + np.minimum(np.maximum(qu, qv), 0)


def _render_screw(rng: np.random.Generator, s: int) -> Rendered:
    y, x = _grid(s)
    th = np.deg2rad(rng.uniform(-5.0, 5.0))
    cy, cx = s / 2 + rng.uniform(-0.02, 0.02, 2) * s
    u = (x - cx) * np.cos(th) + (y - cy) * np.sin(th)
    v = -(x - cx) * np.sin(th) + (y - cy) * np.cos(th)
    length, half_w = 0.56 * s, 0.055 * s * rng.uniform(0.97, 1.03)
    u0 = -length / 2
    # shaft with a tapered tip: half width shrinks over the last 12 % of the length
    taper = np.clip((length / 2 - u) / (0.12 * length), 0.15, 1.0)
    head_half = 0.06 * s
    shaft_start = u0 + head_half
    shaft_mid, shaft_half = (shaft_start + length / 2) / 2, (length / 2 - shaft_start) / 2
    shaft = _sdf_box(u - shaft_mid, v / taper, shaft_half, half_w)
    head = _sdf_box(u - u0, v, head_half, 2.0 * half_w)
    sdf = np.minimum(shaft, head)
    cov = np.clip(0.5 - sdf, 0, 1)
    pitch = 0.03 * s
    thread = 0.5 + 0.5 * np.sin(2 * np.pi * (u + 0.4 * v) / pitch + rng.uniform(0, 2 * np.pi))
    cyl = np.cos(np.clip(v / (2.0 * half_w), -1, 1) * np.pi / 2)
    in_head = head < shaft
    slot = (np.abs(u - u0) < 0.012 * s) & (np.abs(v) < 1.4 * half_w) & in_head
    level = np.where(in_head, 125 + 55 * cyl, 95 + 45 * cyl + 35 * thread)
    level = np.where(slot, 55.0, level) + 3 * _smooth_noise(rng, s, 1.0)
    metal = level[..., None] * _colour(rng, (1.0, 0.98, 0.93), 0.02)
    bg = _background(rng, s, rng.uniform(200, 215))
    img = bg * (1 - cov[..., None]) + metal * cov[..., None]
    return img, cov.astype(np.float32), bg


_RENDERERS: dict[str, Callable[[np.random.Generator, int], Rendered]] = {
    "woven": _render_woven,
    "grain": _render_grain,
    "tile": _render_tile,
    "washer": _render_washer,
    "screw": _render_screw,
}


# --------------------------------------------------------------------------- defect shapes


def _raster(size: int, draw: Callable[[ImageDraw.ImageDraw, float], None]) -> np.ndarray:
    """(S, S) float32 coverage in [0, 1] of shapes drawn at 4x supersampling."""
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw(ImageDraw.Draw(canvas), float(ss))
    a = np.asarray(canvas, dtype=np.float32).reshape(size, ss, size, ss).mean(axis=(1, 3))
    return a / 255.0


def _polyline(points: np.ndarray, width: float) -> Callable[[ImageDraw.ImageDraw, float], None]:
    def draw(d: ImageDraw.ImageDraw, k: float) -> None:
        pts = [(float(px * k), float(py * k)) for py, px in points]
        w = max(1, round(width * k))
        d.line(pts, fill=255, width=w, joint="curve")
        r = w / 2
        for px, py in (pts[0], pts[-1]):
            d.ellipse((px - r, py - r, px + r, py + r), fill=255)

    return draw


def _blob_polygon(
    rng: np.random.Generator, cy: float, cx: float, r: float, rough: float
) -> np.ndarray:
    """(N, 2) (y, x) vertices of an irregular closed blob of mean radius r."""
    n = 32
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    harm = sum(
        rng.normal(0, rough / k) * np.cos(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    rad = r * np.clip(1 + harm, 0.5, 1.6)
    return np.stack([cy + rad * np.sin(ang), cx + rad * np.cos(ang)], axis=1)


def _polygon(points: np.ndarray) -> Callable[[ImageDraw.ImageDraw, float], None]:
    def draw(d: ImageDraw.ImageDraw, k: float) -> None:
        d.polygon([(float(px * k), float(py * k)) for py, px in points], fill=255)

    return draw


def _darker(img: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    return img * rng.uniform(lo, hi)


def _brighter(img: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    return img + (255.0 - img) * rng.uniform(lo, hi)


def _defect_layer(
    defect: str,
    rng: np.random.Generator,
    img: np.ndarray,
    cy: float,
    cx: float,
    bg: np.ndarray | None,
    cov: np.ndarray,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(alpha (S, S) in [0, 1], target (S, S, 3)) of one defect centred near (cy, cx).

    ``scale`` multiplies every length of the defect (radii, widths, steps).
    """
    s = img.shape[0]
    k = s / 256.0 * scale
    if defect == "scratch":
        length = rng.uniform(0.15, 0.3) * s * scale
        a = rng.uniform(0, np.pi)
        t = np.linspace(-0.5, 0.5, 24)[:, None]
        direction = np.array([np.sin(a), np.cos(a)])
        normal = np.array([np.cos(a), -np.sin(a)])
        bend = rng.uniform(-0.15, 0.15) * length
        pts = np.array([cy, cx]) + t * length * direction + (1 - 4 * t**2) * bend * normal
        alpha = _raster(s, _polyline(pts, rng.uniform(1.2, 2.2) * k)) * rng.uniform(0.75, 0.95)
        target = (
            _darker(img, rng, 0.4, 0.6) if rng.random() < 0.5 else _brighter(img, rng, 0.45, 0.65)
        )
    elif defect == "spot":
        poly = _blob_polygon(rng, cy, cx, rng.uniform(3.0, 6.5) * k, 0.25)
        alpha = ndimage.gaussian_filter(_raster(s, _polygon(poly)), 0.7 * k)
        target = (
            _darker(img, rng, 0.35, 0.55) if rng.random() < 0.6 else _brighter(img, rng, 0.45, 0.65)
        )
    elif defect == "hole":
        r = rng.uniform(4.0, 7.5) * k
        rim = 1.6 * k
        y, x = _grid(s)
        d = np.hypot(y + 0.5 - cy, x + 0.5 - cx)
        alpha = np.clip(r + rim - d + 0.5, 0, 1)
        inside = np.clip(r - d + 0.5, 0, 1)[..., None]
        dark = (
            np.full_like(img, rng.uniform(15, 35))
            + 4 * rng.standard_normal(img.shape[:2])[..., None]
        )
        target = inside * dark + (1 - inside) * _brighter(img, rng, 0.35, 0.5)
    elif defect == "crack":
        n = int(rng.integers(14, 22))
        steps = rng.uniform(2.5, 4.0, n) * k
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.45, n))
        pts = np.array([cy, cx]) + np.cumsum(
            np.stack([np.sin(heading), np.cos(heading)], 1) * steps[:, None], 0
        )
        pts = np.vstack([[cy, cx], pts]) - (pts[-1] - np.array([cy, cx])) / 2
        j = int(rng.integers(n // 3, 2 * n // 3))
        m = int(rng.integers(5, 9))
        bh = (
            heading[j]
            + rng.choice([-1, 1]) * rng.uniform(0.6, 1.1)
            + np.cumsum(rng.normal(0, 0.4, m))
        )
        branch = pts[j] + np.cumsum(np.stack([np.sin(bh), np.cos(bh)], 1) * 3.0 * k, 0)
        branch = np.vstack([pts[j], branch])
        w = rng.uniform(1.0, 1.6) * k
        main_a = _raster(s, _polyline(pts, w))
        branch_a = _raster(s, _polyline(branch, 0.8 * w))
        alpha = np.maximum(main_a, branch_a) * rng.uniform(0.8, 0.95)
        target = _darker(img, rng, 0.25, 0.45)
    elif defect == "stain":
        r = rng.uniform(10.0, 20.0) * k
        y, x = _grid(s)
        d2 = ((y + 0.5 - cy) ** 2 + (x + 0.5 - cx) ** 2) / r**2
        wobble = 1 + 0.35 * _smooth_noise(rng, s, r / 3)
        alpha = np.exp(-1.5 * (d2 * wobble.clip(0.4)) ** 1.5) * rng.uniform(0.6, 0.8)
        tints = ((0.55, 0.5, 0.45), (0.62, 0.74, 0.55), (0.62, 0.66, 0.85), (1.3, 1.25, 1.1))
        target = np.clip(img * np.asarray(tints[int(rng.integers(len(tints)))], np.float32), 0, 255)
    elif defect == "missing":
        if bg is None:
            raise ValueError("defect 'missing' needs an object category")
        r = rng.uniform(9.0, 15.0) * k
        y, x = _grid(s)
        cut = (np.hypot(y + 0.5 - cy, x + 0.5 - cx) < r).astype(np.float32)
        return cut * cov, bg
    else:
        raise ValueError(f"unknown defect {defect!r}; available: {', '.join(SYNTHETIC_DEFECTS)}")
    return alpha * cov, target


def _defect_centre(
    defect: str, rng: np.random.Generator, cov: np.ndarray, kind: str
) -> tuple[float, float]:
    s = cov.shape[0]
    if defect == "missing":
        cand = np.flatnonzero((cov > 0.3) & (cov < 0.7))
    elif kind == "object":
        inner = ndimage.binary_erosion(cov > 0.99, iterations=max(2, round(4 * s / 256)))
        cand = np.flatnonzero(inner)
    else:
        lo, hi = round(0.12 * s), round(0.88 * s)
        return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    if cand.size == 0:
        raise RuntimeError(f"no room for a {defect!r} defect on this object")
    i = int(cand[rng.integers(cand.size)])
    return float(i // s) + 0.5, float(i % s) + 0.5


def render_synthetic_sample(
    category: str,
    seed: int | Sequence[int],
    defect: str | None = None,
    image_size: int = 256,
    defect_scale: float = 1.0,
) -> SyntheticSample:
    """Render one image of ``category`` (with ``defect`` if given) from ``seed``.

    Args:
        category: one of ``list_synthetic_categories()``.
        seed: integer or sequence of integers (fed to ``numpy.random.default_rng``).
        defect: one of the category's defect types, or None/``"good"`` for a normal image.
        image_size: side S of the square image.
        defect_scale: multiplies every defect length (radius, width, length); 1.0 is the
            default look (sizes relative to the image), larger values make the defects bigger
            (e.g. 3-4 at 64 px so that a defect spans more than one 8 px ViT patch). The
            same seed gives the same image for any scale; only the defect changes.

    Returns:
        The image, its exact mask and the defect-free rendering (see ``SyntheticSample``).
    """
    if category not in SYNTHETIC_CATEGORIES:
        raise ValueError(
            f"unknown synthetic category {category!r}; available: {', '.join(list_synthetic_categories())}"
        )
    spec = SYNTHETIC_CATEGORIES[category]
    if defect == "good":
        defect = None
    if defect is not None and defect not in spec.defects:
        raise ValueError(
            f"category {category!r} has no defect {defect!r}; available: {', '.join(spec.defects)}"
        )
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if not (np.isfinite(defect_scale) and defect_scale > 0):
        raise ValueError(f"defect_scale must be a positive number, got {defect_scale}")
    rng = np.random.default_rng(seed)
    s = int(image_size)
    base, cov, bg = _RENDERERS[category](rng, s)
    gain = rng.uniform(0.96, 1.04)
    sensor = 2.0 * rng.standard_normal((s, s, 1)).astype(np.float32)
    base = base * gain + sensor
    if bg is not None:  # what a "missing" cut reveals: the same background, gain and noise
        bg = bg * gain + sensor
    clean = np.clip(np.rint(base), 0, 255).astype(np.uint8)
    if defect is None:
        return SyntheticSample(clean, np.zeros((s, s), bool), clean, "good")
    min_px = max(4, round(_MIN_DEFECT_PIXELS * (s / 256) ** 2))
    for _ in range(50):
        cy, cx = _defect_centre(defect, rng, cov, spec.kind)
        alpha, target = _defect_layer(defect, rng, base, cy, cx, bg, cov, defect_scale)
        alpha = np.where(alpha >= _ALPHA_FLOOR, alpha, 0.0).astype(np.float32)[..., None]
        out = np.clip(np.rint(base * (1 - alpha) + target * alpha), 0, 255).astype(np.uint8)
        mask = alpha[..., 0] > 0
        changed = (out != clean).any(axis=2)
        mask &= changed  # the footprint is what the defect really changed after rounding
        out = np.where(mask[..., None], out, clean)
        if mask.sum() >= min_px:
            return SyntheticSample(out, mask, clean, defect)
    raise RuntimeError(f"could not place a visible {defect!r} defect on {category!r}")


def _item_seed(seed: int, category: str, part: str, index: int) -> list[int]:
    return [int(seed), zlib.crc32(category.encode()), zlib.crc32(part.encode()), int(index)]


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _check_defect_types(
    categories: Sequence[str], defect_types: Sequence[str] | None, n_test_defect: int
) -> dict[str, tuple[str, ...]]:
    """The defect types to cycle through per category (all, or those in ``defect_types``)."""
    if defect_types is None:
        return {c: SYNTHETIC_CATEGORIES[c].defects for c in categories}
    if isinstance(defect_types, str):
        defect_types = [defect_types]
    unknown = [d for d in defect_types if d not in SYNTHETIC_DEFECTS]
    if unknown:
        raise ValueError(
            f"defect_types: unknown defect type {', '.join(map(repr, unknown))}; available: "
            f"{', '.join(SYNTHETIC_DEFECTS)}"
        )
    chosen = {
        c: tuple(d for d in SYNTHETIC_CATEGORIES[c].defects if d in defect_types)
        for c in categories
    }
    empty = [c for c, d in chosen.items() if not d]
    if empty and n_test_defect > 0:
        raise ValueError(
            f"defect_types {list(defect_types)}: category {', '.join(map(repr, empty))} has none "
            "of these defect types"
        )
    return chosen


def generate_synthetic_dataset(
    root: str | Path,
    categories: Sequence[str] | None = None,
    n_train: int = 20,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    image_size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    write_meta: bool = True,
    defect_scale: float = 1.0,
    defect_types: Sequence[str] | None = None,
) -> Path:
    """Write a synthetic dataset in MVTec layout under ``root`` and return ``root``.

    Layout: ``<root>/<category>/train/good/NNN.png``, ``test/good/NNN.png``,
    ``test/<defect>/NNN.png`` and ``ground_truth/<defect>/NNN_mask.png`` (L, 0/255); plus
    ``<root>/meta.json`` (official format) when ``write_meta``. Defective test images cycle
    through the category's defect types (``n_test_defect`` in total per category). Each image
    is drawn from its own generator seeded by (seed, category, folder, index), so a category's
    images do not depend on which other categories are generated.

    Args:
        root: output folder (created).
        categories: names from ``list_synthetic_categories()`` (default: all).
        n_train: normal training images per category.
        n_test_good: normal test images per category.
        n_test_defect: defective test images per category.
        image_size: side of the square images.
        seed: master seed; the same seed gives byte-identical files.
        overwrite: replace category folders that already exist. Without it, only folders
            this generator wrote (they hold a ``.anomalens_synthetic.json`` marker) are
            replaced; any other existing folder of the same name is an error.
        write_meta: also write ``<root>/meta.json``.
        defect_scale: multiplies every defect length (see ``render_synthetic_sample``).
        defect_types: keep only these defect types (names from ``SYNTHETIC_DEFECTS``);
            defective test images cycle through the category's types that are in this list.
            Default: all of the category's types.

    Raises:
        ValueError: unknown category or defect type, negative counts, a non-positive
            ``defect_scale``, or a category with none of ``defect_types`` while
            ``n_test_defect > 0``.
        FileExistsError: a category folder not written by this generator exists and
            ``overwrite`` is False.
    """
    root = Path(root)
    cats = list(categories) if categories is not None else list_synthetic_categories()
    unknown = [c for c in cats if c not in SYNTHETIC_CATEGORIES]
    if unknown:
        raise ValueError(
            f"unknown synthetic category {', '.join(map(repr, unknown))}; available: "
            f"{', '.join(list_synthetic_categories())}"
        )
    if min(n_train, n_test_good, n_test_defect) < 0:
        raise ValueError("image counts must be >= 0")
    if not (np.isfinite(defect_scale) and defect_scale > 0):
        raise ValueError(f"defect_scale must be a positive number, got {defect_scale}")
    chosen = _check_defect_types(cats, defect_types, n_test_defect)
    for c in cats:
        if (root / c).exists():
            if not (overwrite or (root / c / _MARKER).is_file()):
                raise FileExistsError(
                    f"{root / c} already exists and was not written by the synthetic generator; "
                    "pass overwrite=True to replace it"
                )
            shutil.rmtree(root / c)
    for c in cats:
        defects = chosen[c]
        plan: list[tuple[str, str, int, str | None]] = [
            ("train", "good", i, None) for i in range(n_train)
        ]
        plan += [("test", "good", i, None) for i in range(n_test_good)]
        counts: dict[str, int] = {}
        for i in range(n_test_defect):
            d = defects[i % len(defects)]
            plan.append(("test", d, counts.get(d, 0), d))
            counts[d] = counts.get(d, 0) + 1
        (root / c).mkdir(parents=True)
        settings = {"category": c, "image_size": image_size, "seed": seed, "n_train": n_train}
        settings |= {"n_test_good": n_test_good, "n_test_defect": n_test_defect}
        if defect_scale != 1.0:  # only non-default options, so default markers are unchanged
            settings["defect_scale"] = defect_scale
        if defect_types is not None:
            settings["defect_types"] = list(defects)
        (root / c / _MARKER).write_text(json.dumps(settings, indent=4) + "\n", encoding="utf-8")
        for split, folder, idx, defect in plan:
            smp = render_synthetic_sample(
                c, _item_seed(seed, c, f"{split}/{folder}", idx), defect, image_size, defect_scale
            )
            out = root / c / split / folder
            out.mkdir(parents=True, exist_ok=True)
            _save_png(smp.image, out / f"{idx:03d}.png")
            if defect is not None:
                gt = root / c / "ground_truth" / folder
                gt.mkdir(parents=True, exist_ok=True)
                _save_png(smp.mask.astype(np.uint8) * 255, gt / f"{idx:03d}_mask.png")
    if write_meta:
        present = [c for c in find_category_dirs(root) if c in SYNTHETIC_CATEGORIES]
        index = {
            split: {
                c: make_mvtec_index(root, c, split)
                for c in present
                if (root / c / split).is_dir() and any((root / c / split).iterdir())
            }
            for split in ("train", "test")
        }
        write_meta_json(root, index)
    return root
