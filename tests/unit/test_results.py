"""One score -> decision / mask / overlay path: normalised score, no region on normal images."""

from __future__ import annotations

import numpy as np
import pytest

from anomalens.results import judge_image, normalized_score, score_scale, write_result_images
from anomalens.thresholds import Threshold, fixed_threshold
from anomalens.viz.overlay import heat_rgba, outline, outline_rgba, overlay


def _thr(value: float = 2.0, lo: float = 1.0, hi: float = 2.0, pixel: float = 0.5) -> Threshold:
    return Threshold(
        value,
        pixel,
        "leave-one-out",
        {"normal_score_min": lo, "normal_score_max": hi},
        vis_range=(0.0, 1.0),
    )


def test_normalized_score_puts_the_threshold_at_one_half_and_agrees_with_the_decision():
    thr = _thr(value=2.0, lo=1.0, hi=2.0)
    assert normalized_score(2.0, thr) == 0.5
    assert normalized_score(2.25, thr) == pytest.approx(0.75)  # (2.25 - 2) / (2 - 1) + 0.5
    assert normalized_score(1.75, thr) == pytest.approx(0.25)
    assert normalized_score(100.0, thr) == 1.0 and normalized_score(-100.0, thr) == 0.0
    for s in np.linspace(0.0, 4.0, 41):
        n = normalized_score(float(s), thr)
        assert (n > 0.5) == (thr.decide(float(s)) == "anomalous")


def test_normalized_score_is_none_without_a_range_of_normal_scores():
    assert score_scale(fixed_threshold(0.3)) is None
    assert normalized_score(0.9, fixed_threshold(0.3)) is None
    assert normalized_score(1.0, _thr(lo=2.0, hi=2.0)) is None  # one normal score: no span
    default = fixed_threshold(0.5)
    default.method = "default"  # probability scores: the scale is [0, 1]
    assert normalized_score(0.7, default) == pytest.approx(0.7)


def test_no_region_is_drawn_on_an_image_judged_normal(tmp_path):
    image = np.full((20, 30, 3), 100, np.uint8)
    amap = np.zeros((8, 8), np.float32)
    amap[2:5, 2:5] = 1.0  # a region above the pixel threshold
    normal = judge_image(image, amap, score=1.5, thr=_thr(value=2.0))
    flagged = judge_image(image, amap, score=2.5, thr=_thr(value=2.0))
    assert normal.decision == "normal" and not normal.mask.any() and normal.region.any()
    assert flagged.decision == "anomalous" and (flagged.mask == flagged.region).all()
    assert flagged.mask.shape == (20, 30)
    targets = {"overlay": "o.png", "mask": "m.png", "heat_layer": "h.png", "region_layer": "r.png"}
    write_result_images(tmp_path, targets, image, normal, _thr())
    from PIL import Image

    assert not np.asarray(Image.open(tmp_path / "m.png")).any()
    assert Image.open(tmp_path / "h.png").mode == "RGBA"
    region = np.asarray(Image.open(tmp_path / "r.png"))
    assert region[..., 3].any()  # the page's outline layer keeps the region for its slider
    with pytest.raises(ValueError, match="unknown result image kind"):
        write_result_images(tmp_path, {"thumbnail": "t.png"}, image, normal, _thr())


def test_overlay_keeps_the_texture_where_the_map_is_low_and_outlines_the_mask():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    amap = np.zeros((40, 40), np.float32)
    amap[10:30, 10:30] = 1.0
    mask = amap > 0.5
    out = overlay(image, amap, vis_range=(0.0, 1.0), mask=mask)
    assert (out[:8, :8] == image[:8, :8]).all()  # value 0: the image untouched
    assert not (out[15:25, 15:25] == image[15:25, 15:25]).all()  # high: heat blended in
    edge = outline(mask)
    assert edge[10, 20] and not edge[20, 20] and (out[edge] == 255).all()
    assert (
        overlay(image, amap, vis_range=(0.0, 1.0), mask=np.zeros_like(mask))[:8, :8]
        == image[:8, :8]
    ).all()
    layer = heat_rgba(np.array([[0.0, 0.5, 1.0]]), max_alpha=1.0)
    assert layer[0, :, 3].tolist() == [0, 128, 255]
    assert not outline_rgba(np.zeros((5, 5), bool))[..., 3].any()


def test_review_page_escapes_names_and_embeds_no_script_breakout():
    from anomalens.viz.report_html import render_report

    evil = "a</script><script>alert(1)</script>.png"
    page = render_report(
        [{"path": evil, "name": evil, "score": 1.0, "decision": "anomalous", "image": evil}],
        title="<b>t</b>",
        settings=[("method", "<i>x</i>")],
        threshold=0.5,
    )
    assert "alert(1)</script>" not in page and "<b>t</b>" not in page and "<i>x</i>" not in page
    assert page.count("<script") == 2  # the data block and the page's own script
