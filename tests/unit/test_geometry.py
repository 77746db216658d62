"""Image views around any detector: letterbox, ROI, tiling; maps in image coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalens import load_detector
from anomalens.detectors.base import Detector
from anomalens.geometry import (
    ImageViews,
    ViewedDetector,
    letterbox,
    parse_roi,
    tile_boxes,
    views_from_options,
    with_views,
)
from anomalens.registry import create_detector


def _toy() -> Detector:
    return create_detector("toy")


def _flat(h: int, w: int, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_tile_boxes_cover_the_side_with_the_last_tile_on_the_edge() -> None:
    assert tile_boxes(100, 40, 0.25) == [(0, 40), (30, 40), (60, 40)]
    assert tile_boxes(30, 40, 0.5) == [(0, 30)]
    boxes = tile_boxes(101, 40, 0.0)
    assert boxes[-1] == (61, 40) and boxes[0] == (0, 40)
    covered = np.zeros(101, bool)
    for s, n in boxes:
        covered[s : s + n] = True
    assert covered.all()


def test_letterbox_keeps_the_aspect_ratio_and_pads_centred() -> None:
    im = _flat(50, 100, 200)
    out, (top, left, nh, nw) = letterbox(im, 64, pad_value=7)
    assert out.shape == (64, 64, 3) and (nh, nw) == (32, 64) and (top, left) == (16, 0)
    assert (out[:16] == 7).all() and (out[48:] == 7).all()
    assert (out[16:48] == 200).all()


def test_settings_are_checked_and_round_trip() -> None:
    with pytest.raises(ValueError, match="resize"):
        ImageViews(resize="stretch")
    with pytest.raises(ValueError, match="roi"):
        ImageViews(roi=(0, 0, 0, 5))
    with pytest.raises(ValueError, match="tile_overlap"):
        ImageViews(tile=32, tile_overlap=1.0)
    with pytest.raises(ValueError, match="x,y,w,h"):
        parse_roi("1,2,3")
    v = views_from_options("letterbox", "1,2,30,40", 32, 0.5)
    assert v == ImageViews(resize="letterbox", roi=(1, 2, 30, 40), tile=32, tile_overlap=0.5)
    assert ImageViews.from_dict(v.to_dict()) == v
    with pytest.raises(ValueError, match="--tile SIZE"):
        views_from_options(tile_overlap=0.5)
    with pytest.raises(ValueError, match="unknown view setting"):
        ImageViews.from_dict({"zoom": 2})


def test_default_views_leave_the_detector_unwrapped() -> None:
    det = _toy()
    assert with_views(det, ImageViews()) is det
    assert with_views(det, None) is det
    wrapped = with_views(det, ImageViews(resize="letterbox"))
    assert isinstance(wrapped, ViewedDetector) and wrapped.inner is det
    # re-wrapping replaces the views instead of nesting them
    again = with_views(wrapped, ImageViews(tile=16))
    assert again.inner is det and again.views.tile == 16  # type: ignore[attr-defined]


def test_wrapper_has_the_class_facts_of_the_wrapped_method() -> None:
    det = with_views(_toy(), ImageViews(tile=16))
    assert det.name == "toy"
    assert det.learning_type is type(_toy()).learning_type
    assert det.needs_normal_images()
    assert det.config()["views"]["tile"] == 16 and det.config()["method"] == "toy"


def test_tiles_map_a_small_defect_back_to_its_place_in_the_image() -> None:
    """A bright 6x6 spot at (y=40, x=150) of a 64x256 image: the stitched map peaks there."""
    normal = [_flat(64, 256) for _ in range(2)]
    test = _flat(64, 256)
    test[40:46, 150:156] = 250
    det = with_views(_toy(), ImageViews(tile=64, tile_overlap=0.5, map_size=128))
    det.fit(normal)
    pred = det.predict([test])
    amap = pred.anomaly_map[0]
    assert amap.shape == (128, 128)
    iy, ix = divmod(int(amap.argmax()), amap.shape[1])
    # map rows / cols cover the image's 64 rows / 256 cols
    assert abs(iy * 64 / 128 - 43) <= 4 and abs(ix * 256 / 128 - 153) <= 6
    assert float(pred.image_score[0]) >= float(amap.max()) - 1e-6
    assert float(det.predict([_flat(64, 256)]).image_score[0]) < 1e-4


def test_squash_loses_the_spot_that_tiling_keeps() -> None:
    """On a long image, a 2-pixel line is averaged away at 32 x 32 but kept by 32 px tiles."""
    normal = [_flat(32, 512) for _ in range(2)]
    test = _flat(32, 512)
    test[:, 300:302] = 255
    plain = _toy().fit(normal).predict([test]).image_score[0]
    tiled = with_views(_toy(), ImageViews(tile=32, tile_overlap=0.0)).fit(normal)
    assert float(tiled.predict([test]).image_score[0]) > 3 * float(plain)


def test_roi_scores_only_inside_and_fills_outside_with_the_inner_minimum() -> None:
    normal = [_flat(64, 64) for _ in range(2)]
    test = _flat(64, 64)
    test[0:8, 0:8] = 255  # outside the ROI: ignored
    det = with_views(_toy(), ImageViews(roi=(16, 16, 32, 32), map_size=64)).fit(normal)
    pred = det.predict([test])
    assert float(pred.image_score[0]) < 1e-4
    test[30:34, 30:34] = 255  # inside
    amap = det.predict([test]).anomaly_map[0]
    assert float(amap.max()) > 0.1
    assert torch.allclose(amap[:8, :8], amap[16:48, 16:48].min().expand(8, 8), atol=1e-4)


def test_roi_outside_the_image_is_refused() -> None:
    det = with_views(_toy(), ImageViews(roi=(100, 0, 10, 10))).fit([_flat(128, 128)] * 2)
    with pytest.raises(ValueError, match=r"starts outside the 32x32 image"):
        det.predict([_flat(32, 32)])


def test_letterbox_map_covers_the_image_not_the_padding() -> None:
    """The right half of a 32x128 image is bright: in the map, exactly the right half is high."""
    normal = [_flat(32, 128) for _ in range(2)]
    test = _flat(32, 128)
    test[:, 64:] = 250
    det = with_views(_toy(), ImageViews(resize="letterbox", map_size=64)).fit(normal)
    amap = det.predict([test]).anomaly_map[0]
    assert float(amap[:, :28].max()) < 0.05 and float(amap[:, 36:].min()) > 0.4


def test_views_round_trip_through_a_model_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(90, 140, size=(48, 120, 3), dtype=np.uint8) for _ in range(3)]
    det = with_views(
        create_detector("patchcore", backbone="resnet18", weights="random", image_size=64),
        ImageViews(resize="letterbox", tile=48, tile_overlap=0.25),
    ).fit(images[:2])
    det.save(tmp_path / "m")
    loaded = load_detector(tmp_path / "m")
    assert isinstance(loaded, ViewedDetector)
    assert loaded.views == det.views and loaded.num_shots == 2  # type: ignore[attr-defined]
    a, b = det.predict(images[2:]), loaded.predict(images[2:])
    assert torch.equal(a.anomaly_map, b.anomaly_map)
    assert torch.equal(a.image_score, b.image_score)
