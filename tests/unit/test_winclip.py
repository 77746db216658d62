"""WinCLIP / WinCLIP+ end to end on the tiny random CLIP (offline, CPU, a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalens import create_detector, list_detectors
from anomalens.backbones.clip import ClipBackbone
from anomalens.backbones.tiny import make_tiny_clip
from anomalens.backbones.weights import WeightNotAvailableError
from anomalens.detectors.winclip import WinCLIP
from anomalens.prompts.templates import ANOMALOUS_STATES, NORMAL_STATES, compositional_prompts
from anomalens.scoring.aggregate import harmonic_window_aggregate
from anomalens.scoring.similarity import two_class_anomaly_probability
from anomalens.types import LearningType


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    torch.set_num_threads(1)
    return make_tiny_clip(seed=0)


def _images(n: int, seed: int = 0, size: int = 64) -> list[np.ndarray]:
    """Smooth random colour images (low-frequency noise upsampled), uint8 (size, size, 3)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=gen)
    up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return [(im.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for im in up]


def _with_defect(image: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[8:24, 36:52] = (255, 0, 255)
    return out


def test_registered_and_learning_type() -> None:
    assert "winclip" in list_detectors()
    assert WinCLIP.learning_type is LearningType.ZERO_OR_FEW_SHOT


def test_zero_shot_shapes_and_determinism(backbone: ClipBackbone) -> None:
    det = create_detector("winclip", backbone=backbone, class_name="bottle")
    imgs = _images(3)
    p1 = det.predict(imgs)  # no fit: zero-shot
    assert det.is_fitted and det.num_shots == 0
    assert tuple(p1.image_score.shape) == (3,)
    assert tuple(p1.anomaly_map.shape) == (3, 64, 64)
    assert tuple(p1.extras["language_map"].shape) == (3, 8, 8)
    assert "visual_map" not in p1.extras
    assert torch.isfinite(p1.anomaly_map).all()
    assert ((p1.anomaly_map >= 0) & (p1.anomaly_map <= 1)).all()
    # zero-shot image score is the global-embedding probability, not the map max
    torch.testing.assert_close(p1.image_score, p1.extras["language_image_score"])
    p2 = det.predict(imgs)
    torch.testing.assert_close(p1.image_score, p2.image_score, rtol=0, atol=0)
    torch.testing.assert_close(p1.anomaly_map, p2.anomaly_map, rtol=0, atol=0)
    # batch composition does not change per-image results
    p_single = det.predict(imgs[1:2])
    torch.testing.assert_close(p_single.anomaly_map[0], p1.anomaly_map[1], atol=1e-5, rtol=1e-5)


def test_image_score_matches_open_clip_reference(backbone: ClipBackbone) -> None:
    """Independent path: open_clip's own encode_image / encode_text and Eq. 1 written out."""
    det = WinCLIP(backbone, class_name="metal_nut", templates="anomalib21")
    img = _images(1, seed=3)
    got = det.predict(img).image_score
    model = backbone.model
    with torch.no_grad():
        f = F.normalize(model.encode_image(backbone.preprocess(img)), dim=-1)
        protos = []
        for states in (NORMAL_STATES, ANOMALOUS_STATES):
            prompts = compositional_prompts("metal nut", states, det.templates)
            protos.append(
                F.normalize(model.encode_text(backbone.tokenize(prompts)).mean(0), dim=-1)
            )
        t = torch.stack(protos)
    logits = (f @ t.T) / 0.07
    expected = logits.softmax(dim=-1)[:, 1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_windows_are_local(backbone: ClipBackbone) -> None:
    """A change inside some patches leaves every window that does not cover them unchanged."""
    det = WinCLIP(backbone)
    img = _images(1, seed=1)[0]
    changed = img.copy()
    changed[:16, :16] = 0  # patches (0,0), (0,1), (1,0), (1,1) of the 8x8 grid
    feats = det.extract([img, changed])
    touched = {0, 1, 8, 9}
    for k, sets in det.index_sets.items():
        covers = torch.tensor([bool(touched & set(row.tolist())) for row in sets])
        a, b = feats.windows[k][0], feats.windows[k][1]
        torch.testing.assert_close(a[~covers], b[~covers], rtol=0, atol=1e-6)
        assert (a[covers] - b[covers]).abs().amax() > 1e-3


def test_one_shot_identical_reference_scores_lower(backbone: ClipBackbone) -> None:
    det = WinCLIP(backbone, class_name="object")
    ref = _images(1, seed=5)[0]
    det.fit([ref])
    assert det.num_shots == 1
    assert det.memory_sizes == {"patch": 64, "window_2": 49, "window_3": 36}
    pred = det.predict([ref, _with_defect(ref)])
    visual = pred.extras["visual_image_score"]
    assert visual[0] < 1e-5  # query identical to the reference: every feature is in memory
    assert visual[1] > visual[0] + 1e-3
    assert pred.extras["visual_map"][0].abs().amax() < 1e-5
    # WinCLIP+ image score: mean of language image score and max of the visual map
    expected = (pred.extras["language_image_score"] + visual) / 2
    torch.testing.assert_close(pred.image_score, expected)
    # the defect is where the visual map is highest (patch rows 1..2, columns 4..6)
    vmap = pred.extras["visual_map"][1]
    peak = divmod(int(vmap.argmax()), 8)
    assert 0 <= peak[0] <= 3 and 3 <= peak[1] <= 7, peak


def test_map_composition(backbone: ClipBackbone) -> None:
    """Language map = harmonic mean of the scale maps and the image score; WinCLIP+ map = mean of
    language and visual maps; the output map is their bilinear upsampling."""
    det = WinCLIP(backbone, scales=(2, 3))
    imgs = _images(2, seed=11)
    zero = det.predict(imgs)
    feats = det.extract(imgs)
    protos = det.text_prototypes
    s0 = two_class_anomaly_probability(feats.global_embedding, protos)
    m2, m3 = (
        harmonic_window_aggregate(
            two_class_anomaly_probability(feats.windows[k], protos), det.index_sets[k], 64
        )
        for k in (2, 3)
    )
    lang = 3.0 / (1.0 / m2 + 1.0 / m3 + 1.0 / s0[:, None])
    torch.testing.assert_close(zero.extras["language_map"].reshape(2, 64), lang)
    up = F.interpolate(lang.reshape(2, 1, 8, 8), size=(64, 64), mode="bilinear")[:, 0]
    torch.testing.assert_close(zero.anomaly_map, up)

    det.fit(_images(1, seed=12))
    few = det.predict(imgs)
    torch.testing.assert_close(few.extras["language_map"], zero.extras["language_map"])
    mixed = (few.extras["language_map"] + few.extras["visual_map"]) / 2
    up = F.interpolate(mixed[:, None], size=(64, 64), mode="bilinear")[:, 0]
    torch.testing.assert_close(few.anomaly_map, up)
    torch.testing.assert_close(
        few.extras["visual_image_score"], few.extras["visual_map"].amax((1, 2))
    )


def test_few_shot_memory_grows_and_refit_to_zero_shot(backbone: ClipBackbone) -> None:
    det = WinCLIP(backbone, batch_size=2)
    refs = _images(3, seed=7)
    det.fit(refs)
    assert det.memory_sizes == {"patch": 3 * 64, "window_2": 3 * 49, "window_3": 3 * 36}
    few = det.predict(refs[:1] + _images(1, seed=8))
    assert "visual_map" in few.extras
    assert few.extras["visual_image_score"][0] < 1e-5
    det.fit(None)
    assert det.memory_sizes == {} and det.num_shots == 0
    zero = det.predict(refs[:1])
    assert "visual_map" not in zero.extras


def test_class_name_changes_prototypes(backbone: ClipBackbone) -> None:
    det = WinCLIP(backbone, class_name="screw")
    screw = det.text_prototypes.clone()
    assert tuple(screw.shape) == (2, backbone.embed_dim)
    torch.testing.assert_close(screw.norm(dim=-1), torch.ones(2))
    det.set_class_name("metal_nut")
    assert det.class_name == "metal nut"
    assert not torch.allclose(det.text_prototypes, screw)
    det.set_class_name("screw")
    assert det.text_prototypes is det._prototypes["screw"]  # cached


def test_builds_backbone_from_options() -> None:
    det = WinCLIP(model_name="anomalens-tiny-clip", pretrained=None, image_size=48, scales=(2,))
    assert det.image_size == 48
    assert det.index_sets[2].shape == (25, 4)  # 6x6 grid: 5x5 windows of 2x2
    pred = det.predict(_images(2, size=48))
    assert tuple(pred.anomaly_map.shape) == (2, 48, 48)
    assert det.config()["backbone"]["model_name"] == "anomalens-tiny-clip"


def test_default_backbone_offline_error(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightNotAvailableError, match="ViT-B-16-plus-240"):
        WinCLIP(pretrained="laion400m_e31")


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("templates", "paper99", "templates"),
        ("patch_feature", "projected", "patch_feature"),
        ("temperature", 0.0, "temperature"),
        ("scales", (9,), "scale"),
        ("scales", (), "scales"),
    ],
)
def test_bad_options(backbone: ClipBackbone, option: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WinCLIP(backbone, **{option: value})
