"""Image geometry around any detector: aspect-preserving resize, region of interest, tiling.

Every method works on S x S inputs. By default an image is *squashed* to S x S (its aspect ratio
is lost); :class:`ImageViews` describes other ways to turn one image into the view(s) a method
scores, and :func:`with_views` wraps any :class:`~anomalens.detectors.base.Detector` so that

* ``fit`` learns from the same views of the normal images (all tiles of all shots),
* ``predict`` scores the views of every image in one call of the wrapped detector (tiles of a
  batch are scored as one batch), and maps the results back to the full image.

Views:

* ``resize="letterbox"``: the view is scaled to fit S x S with its aspect ratio kept and padded
  (centred, ``pad_value``) to a square; the padded part of the map is dropped.
* ``roi=(x, y, w, h)``: only that rectangle (image pixels) is scored; outside it the map holds
  the smallest value inside it, so nothing outside is ever flagged.
* ``tile=SIZE, tile_overlap=F``: the image (or ROI) is cut into SIZE x SIZE tiles (image pixels)
  overlapping by the fraction F, the last tile of a row / column aligned to the edge; the maps
  are stitched by averaging where tiles overlap.

Output: a map of (M, M) values covering the whole image (stretched to it, as every map is: the
pipeline resizes maps to each image's size), ``M = map_size`` (default S, or 2 S with tiling).
Image score: with one view (no tiling) the method's own image score; with tiles the maximum of
the stitched map (taken at image resolution, before it is resized to M x M).

Usage::

    det = with_views(create_detector("patchcore", weights="w.safetensors"),
                     ImageViews(resize="letterbox", tile=256, tile_overlap=0.25))
    det.fit(normal_images)
    pred = det.predict(images)   # image_score (B,), anomaly_map (B, M, M) over each full image
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from anomalens.data.io import ImageLike, as_rgb_array
from anomalens.detectors.base import Detector
from anomalens.types import Prediction

__all__ = [
    "RESIZE_MODES",
    "ImageViews",
    "ViewedDetector",
    "letterbox",
    "parse_roi",
    "tile_boxes",
    "with_views",
]

#: How a view is brought to S x S.
RESIZE_MODES = ("squash", "letterbox")
#: Largest side of the canvas maps are stitched on (image pixels above it are subsampled).
_MAX_CANVAS = 2048


@dataclass(frozen=True)
class ImageViews:
    """How an image becomes the view(s) a detector scores (see the module docstring).

    Attributes:
        resize: ``"squash"`` (S x S, aspect ratio lost; the default) or ``"letterbox"``
            (aspect ratio kept, padded).
        roi: (x, y, w, h) rectangle in image pixels, or None for the whole image.
        tile: tile side in image pixels, or None for no tiling.
        tile_overlap: overlap of neighbouring tiles as a fraction of ``tile``, in [0, 1).
        pad_value: grey level (0..255) of the letterbox padding.
        map_size: side M of the returned maps (None: S, or 2 S with tiling).
    """

    resize: str = "squash"
    roi: tuple[int, int, int, int] | None = None
    tile: int | None = None
    tile_overlap: float = 0.25
    pad_value: int = 0
    map_size: int | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(
                f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}"
            )
        if self.roi is not None:
            roi = tuple(int(v) for v in self.roi)
            if len(roi) != 4 or roi[0] < 0 or roi[1] < 0 or roi[2] < 1 or roi[3] < 1:
                raise ValueError(
                    f"roi must be x,y,w,h with x, y >= 0 and w, h >= 1 (image pixels), got "
                    f"{self.roi!r}"
                )
            object.__setattr__(self, "roi", roi)
        if self.tile is not None and int(self.tile) < 8:
            raise ValueError(f"tile must be >= 8 pixels, got {self.tile}")
        if not 0.0 <= float(self.tile_overlap) < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {self.tile_overlap}")
        if not 0 <= int(self.pad_value) <= 255:
            raise ValueError(f"pad_value must be in 0..255, got {self.pad_value}")
        if self.map_size is not None and int(self.map_size) < 1:
            raise ValueError(f"map_size must be >= 1, got {self.map_size}")

    @property
    def is_identity(self) -> bool:
        """True when the views are the plain squash of the whole image (nothing to wrap)."""
        return self.resize == "squash" and self.roi is None and self.tile is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (config(), run.json, model files)."""
        d = asdict(self)
        d["roi"] = list(self.roi) if self.roi is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageViews:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown view setting(s) {', '.join(bad)}; known: {sorted(known)}")
        d = dict(d)
        if d.get("roi") is not None:
            d["roi"] = tuple(d["roi"])
        return cls(**d)


def parse_roi(text: str) -> tuple[int, int, int, int]:
    """``"x,y,w,h"`` (image pixels) as a tuple; a clear error for anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 4:
            raise ValueError
        x, y, w, h = (int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"roi must be four integers x,y,w,h (image pixels), got {text!r}"
        ) from None
    return x, y, w, h


def tile_boxes(length: int, tile: int, overlap: float) -> list[tuple[int, int]]:
    """(start, size) of tiles covering ``[0, length)``: stride ``tile * (1 - overlap)``.

    The last tile ends at ``length`` (it overlaps its neighbour more); a side shorter than
    ``tile`` gives one tile of that side.
    """
    if length <= tile:
        return [(0, length)]
    stride = max(1, round(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    starts = [min(i * stride, length - tile) for i in range(n)]
    return [(s, tile) for s in sorted(set(starts))]


def letterbox(
    image: np.ndarray, size: int, pad_value: int = 0
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Scale an image to fit ``size`` x ``size`` (aspect kept) and pad it, centred.

    Args:
        image: (H, W, 3) uint8.
        size: S.
        pad_value: grey level of the padding.

    Returns:
        The (S, S, 3) uint8 view and the content box (top, left, height, width) in it.
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = torch.tensor(image, dtype=torch.uint8).permute(2, 0, 1)  # a copy: inputs may be read-only
    t = TF.resize(t, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
    top, left = (size - nh) // 2, (size - nw) // 2
    t = TF.pad(t, [left, top, size - nw - left, size - nh - top], fill=int(pad_value))
    return t.permute(1, 2, 0).contiguous().numpy(), (top, left, nh, nw)


@dataclass
class _View:
    """One view of an image: its pixels, where it sits in the image, its content box."""

    pixels: np.ndarray  # (h, w, 3) uint8 as given to the detector
    box: tuple[int, int, int, int]  # (y, x, h, w) in image pixels
    content: tuple[int, int, int, int] | None  # (top, left, h, w) in the S x S view, letterbox


class ViewedDetector(Detector):
    """A detector scoring views of each image (letterbox, ROI, tiles); see :func:`with_views`.

    Its class facts (learning type, batch facts) are those of the wrapped detector's class:
    :func:`with_views` makes one subclass per wrapped class.
    """

    inner_class: type[Detector] | None = None

    def __init__(self, inner: Detector, views: ImageViews) -> None:
        super().__init__(device=inner.device)
        self.inner = inner
        self.views = views
        self.image_size = inner.image_size
        self._fitted = inner.is_fitted
        self.num_shots = inner.num_shots
        self.category = inner.category

    # ------------------------------------------------------------------ settings
    @property
    def init_options(self) -> dict[str, Any] | None:
        """The wrapped detector's options (model files store the views beside them)."""
        return self.inner.init_options

    @init_options.setter
    def init_options(self, value: dict[str, Any] | None) -> None:
        if "inner" in self.__dict__:
            self.inner.init_options = value

    @property
    def map_size(self) -> int:
        """Side M of the returned maps."""
        if self.views.map_size is not None:
            return int(self.views.map_size)
        return self.inner.image_size * (2 if self.views.tile is not None else 1)

    def config(self) -> dict[str, Any]:
        """The wrapped detector's settings plus ``views`` (the view settings)."""
        cfg = self.inner.config()
        cfg.update(num_shots=self.num_shots, category=self.category)
        cfg["views"] = self.views.to_dict()
        return cfg

    # ------------------------------------------------------------------ views
    def image_views(self, image: np.ndarray) -> list[_View]:
        """The views of one (H, W, 3) uint8 image, in scoring order.

        Raises:
            ValueError: the ROI lies outside the image.
        """
        h, w = image.shape[:2]
        y0, x0, rh, rw = 0, 0, h, w
        if self.views.roi is not None:
            x, y, bw, bh = self.views.roi
            if x >= w or y >= h:
                raise ValueError(f"roi {self.views.roi} (x,y,w,h) starts outside the {w}x{h} image")
            y0, x0, rh, rw = y, x, min(bh, h - y), min(bw, w - x)
        if self.views.tile is None:
            boxes = [(y0, x0, rh, rw)]
        else:
            t, ov = int(self.views.tile), float(self.views.tile_overlap)
            boxes = [
                (y0 + ys, x0 + xs, th, tw)
                for ys, th in tile_boxes(rh, t, ov)
                for xs, tw in tile_boxes(rw, t, ov)
            ]
        out = []
        for by, bx, bh, bw in boxes:
            crop = image[by : by + bh, bx : bx + bw]
            content = None
            if self.views.resize == "letterbox":
                crop, content = letterbox(crop, self.inner.image_size, self.views.pad_value)
            out.append(_View(np.ascontiguousarray(crop), (by, bx, bh, bw), content))
        return out

    def _stitch(
        self, shape: tuple[int, int], views: list[_View], maps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps of one image's views (V, s, s) -> (M, M) map over the whole image.

        Returns:
            The (M, M) map and the stitched canvas it was resized from (image pixels, long
            side at most 2048: the tiling score is its maximum).
        """
        h, w = shape
        f = min(1.0, _MAX_CANVAS / max(h, w))
        ch, cw = max(1, round(h * f)), max(1, round(w * f))
        acc = torch.zeros(ch, cw, dtype=torch.float32)
        cnt = torch.zeros(ch, cw, dtype=torch.float32)
        for view, m in zip(views, maps):
            m = m.float()
            if view.content is not None:
                s = self.inner.image_size
                r = m.shape[-1] / s
                top, left, nh, nw = view.content
                t0, l0 = math.floor(top * r), math.floor(left * r)
                t1 = max(t0 + 1, math.ceil((top + nh) * r))
                l1 = max(l0 + 1, math.ceil((left + nw) * r))
                m = m[t0:t1, l0:l1]
            by, bx, bh, bw = view.box
            y0, x0 = round(by * f), round(bx * f)
            y1, x1 = max(y0 + 1, round((by + bh) * f)), max(x0 + 1, round((bx + bw) * f))
            part = TF.resize(
                m[None],
                [y1 - y0, x1 - x0],
                interpolation=InterpolationMode.BILINEAR,
                antialias=False,
            )[0]
            acc[y0:y1, x0:x1] += part
            cnt[y0:y1, x0:x1] += 1.0
        covered = cnt > 0
        full = torch.empty_like(acc)
        full[covered] = acc[covered] / cnt[covered]
        # outside the ROI: the smallest value inside it (never above any threshold it passes)
        full[~covered] = full[covered].min() if covered.any() else 0.0
        m_out = self.map_size
        resized = TF.resize(
            full[None], [m_out, m_out], interpolation=InterpolationMode.BILINEAR, antialias=True
        )[0]
        return resized, full

    # ------------------------------------------------------------------ Detector hooks
    def _fit(self, normal_images: list[ImageLike]) -> None:
        pixels = [v.pixels for im in normal_images for v in self.image_views(as_rgb_array(im))]
        self.inner.fit(pixels or None, category=self.category)

    def _predict_grouped(self, images: list[ImageLike], groups: list[str] | None) -> Prediction:
        arrays = [as_rgb_array(im) for im in images]
        per_image = [self.image_views(a) for a in arrays]
        flat = [v.pixels for views in per_image for v in views]
        flat_groups = (
            None if groups is None else [g for g, views in zip(groups, per_image) for _ in views]
        )
        pred = self.inner.predict(flat, groups=flat_groups)
        scores, maps = [], []
        i = 0
        for a, views in zip(arrays, per_image):
            n = len(views)
            stitched, canvas = self._stitch(a.shape[:2], views, pred.anomaly_map[i : i + n])
            maps.append(stitched)
            if self.views.tile is None:
                scores.append(pred.image_score[i].float())
            else:  # the stitched map's maximum, before it is resized to M x M
                scores.append(canvas.max())
            i += n
        return Prediction(image_score=torch.stack(scores), anomaly_map=torch.stack(maps))

    def _predict(self, images: list[ImageLike]) -> Prediction:
        return self._predict_grouped(images, None)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return self.inner._state_tensors()

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        self.inner._load_state_tensors(tensors, config)


_CLASSES: dict[type[Detector], type[ViewedDetector]] = {}


def _viewed_class(cls: type[Detector]) -> type[ViewedDetector]:
    """A ViewedDetector subclass carrying ``cls``'s class facts (cached per class)."""
    if cls not in _CLASSES:
        facts = {
            k: getattr(cls, k)
            for k in (
                "name",
                "learning_type",
                "uses_normal_images",
                "scores_whole_batch",
                "min_batch",
                "uses_category",
                "backbone_kind",
                "default_threshold",
            )
        }
        _CLASSES[cls] = type(
            f"Viewed{cls.__name__}",
            (ViewedDetector,),
            {**facts, "inner_class": cls, "__doc__": ViewedDetector.__doc__},
        )
    return _CLASSES[cls]


def with_views(detector: Detector, views: ImageViews | None) -> Detector:
    """Wrap ``detector`` so that it scores ``views`` of each image (see the module docstring).

    Returns the detector itself when the views are the plain squash of the whole image, so
    the default path is unchanged. A detector already wrapped is re-wrapped around its inner
    detector (views do not nest).
    """
    if isinstance(detector, ViewedDetector):
        detector = detector.inner
    if views is None or views.is_identity:
        return detector
    return _viewed_class(type(detector))(detector, views)


def views_from_options(
    resize: str | None = None,
    roi: str | Sequence[int] | None = None,
    tile: int | None = None,
    tile_overlap: float | None = None,
) -> ImageViews:
    """ImageViews from command-line style values (None: the default of each setting).

    Raises:
        ValueError: a bad value, or ``tile_overlap`` without ``tile``.
    """
    if tile_overlap is not None and tile is None:
        raise ValueError("tile_overlap applies to tiles: give the tile size too (--tile SIZE)")
    kw: dict[str, Any] = {}
    if resize is not None:
        kw["resize"] = resize
    if roi is not None:
        kw["roi"] = parse_roi(roi) if isinstance(roi, str) else tuple(int(v) for v in roi)
    if tile is not None:
        kw["tile"] = int(tile)
    if tile_overlap is not None:
        kw["tile_overlap"] = float(tile_overlap)
    return ImageViews(**kw)
