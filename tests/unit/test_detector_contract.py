"""One contract, checked on every registered built-in detector (as timm's test_models does).

Each method is built small (tiny random CLIP, random ResNet-18 features at 64 px) through
``create_detector``; a new built-in method must add a builder here, or this test fails.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch

from anomalens.data.io import ImageReadError
from anomalens.detectors.base import Detector, NotFittedError
from anomalens.registry import _DETECTOR_MODULES, create_detector, list_detectors
from anomalens.types import LearningType

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*untrained.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:MuSc got only:UserWarning"),
]


def _tiny_clip(size: int = 64):
    from anomalens.backbones.tiny import make_tiny_clip

    return make_tiny_clip(seed=0, image_size=size)


BUILDERS: dict[str, Callable[[], Detector]] = {
    "patchcore": lambda: create_detector(
        "patchcore", backbone="resnet18", weights="random", image_size=64
    ),
    "mvg": lambda: create_detector("mvg", backbone="resnet18", weights="random", image_size=64),
    "winclip": lambda: create_detector("winclip", backbone=_tiny_clip(), scales=(2,)),
    "adaptclip": lambda: create_detector(
        "adaptclip", backbone=_tiny_clip(), sigma=1.0, untrained=True
    ),
    "anomalyclip": lambda: create_detector(
        "anomalyclip", backbone=_tiny_clip(), sigma=1.0, untrained=True
    ),
    "refdiff": lambda: create_detector("refdiff", image_size=64, sigma=2.0),
    "metauas": lambda: create_detector("metauas", image_size=64, batch_size=4),
    "musc": lambda: create_detector(
        "musc", backbone="resnet18", weights="random", image_size=64, progress=False
    ),
}


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = rng.integers(90, 140, size=(64, 64, 3), dtype=np.uint8)
        out.append(im)
    return out


BUILTIN = sorted({m.rsplit(".", 1)[1] for m in _DETECTOR_MODULES})


def test_every_builtin_method_has_a_contract_builder() -> None:
    registered = set(list_detectors())
    assert set(BUILTIN) <= registered
    missing = sorted(set(BUILTIN) - set(BUILDERS))
    assert not missing, f"add a small builder for {missing} to BUILDERS"


@pytest.fixture(scope="module", params=BUILTIN)
def detector_and_name(request: pytest.FixtureRequest) -> tuple[str, Detector]:
    torch.manual_seed(0)
    return request.param, BUILDERS[request.param]()


def _fit(det: Detector, category: str | None = None) -> Detector:
    shots = _images(2, seed=1) if det.uses_normal_images else None
    return det.fit(shots, category=category)


def test_class_facts_are_consistent(detector_and_name: tuple[str, Detector]) -> None:
    name, det = detector_and_name
    cls = type(det)
    assert cls.name == name
    assert isinstance(cls.learning_type, LearningType)
    assert cls.min_batch >= 1
    if cls.needs_normal_images():
        assert cls.uses_normal_images and not cls.can_score_alone()
    if cls.scores_whole_batch:
        assert cls.min_batch >= 2
    assert cls.backbone_kind in ("cnn", "clip", None)


def test_fit_predict_shapes_dtypes_and_determinism(
    detector_and_name: tuple[str, Detector],
) -> None:
    _, det = detector_and_name
    _fit(det)
    n = max(det.min_batch, 3)
    images = _images(n, seed=2)
    a = det.predict_batches(images, batch_size=2)
    b = det.predict_batches(images, batch_size=2)
    s = det.image_size
    assert a.image_score.shape == (n,) and a.anomaly_map.shape == (n, s, s)
    assert a.image_score.dtype == torch.float32 and a.anomaly_map.dtype == torch.float32
    assert torch.isfinite(a.image_score).all() and torch.isfinite(a.anomaly_map).all()
    assert torch.equal(a.image_score, b.image_score) and torch.equal(a.anomaly_map, b.anomaly_map)
    # one call of the whole batch gives what the detector's own batching gives
    whole = det.predict(images)
    if det.scores_whole_batch:
        assert torch.equal(whole.image_score, a.image_score)
    else:
        assert torch.allclose(whole.image_score, a.image_score, atol=1e-5)


def test_config_round_trips_and_records_the_category(
    detector_and_name: tuple[str, Detector],
) -> None:
    _, det = detector_and_name
    _fit(det, category="metal_nut")
    cfg = det.config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["method"] == det.name and cfg["category"] == "metal_nut"
    assert cfg["num_shots"] == (2 if det.uses_normal_images else 0)
    _fit(det)
    assert det.config()["category"] is None
    with pytest.raises(ValueError, match="category"):
        _fit(det, category="  ")


def test_batch_sizes_and_bad_input(detector_and_name: tuple[str, Detector]) -> None:
    _, det = detector_and_name
    _fit(det)
    with pytest.raises(ValueError, match="no image"):
        det.predict([])
    if det.min_batch == 1:
        assert det.predict(_images(1)).image_score.shape == (1,)
    else:
        with pytest.raises(ValueError, match=f"at least {det.min_batch}"):
            det.predict(_images(1))
    bad = np.zeros((64, 64, 5), dtype=np.uint8)  # five channels: not an image
    with pytest.raises((ValueError, ImageReadError)):
        det.predict([bad] * max(det.min_batch, 1))
    with pytest.raises(ValueError, match="group labels"):
        det.predict(_images(max(det.min_batch, 2)), groups=["a"])


def test_few_shot_methods_say_which_call_is_missing(
    detector_and_name: tuple[str, Detector],
) -> None:
    name, _ = detector_and_name
    det = BUILDERS[name]()
    if det.needs_normal_images():
        with pytest.raises(NotFittedError, match="fit"):
            det.predict(_images(1))
        with pytest.raises(ValueError, match="few-shot"):
            det.fit(None)
    else:
        pred = det.predict(_images(max(det.min_batch, 1)))  # fits itself zero-shot
        assert det.is_fitted and len(pred) == max(det.min_batch, 1)


def test_zero_shot_methods_ignore_normal_images_with_a_warning(
    detector_and_name: tuple[str, Detector],
) -> None:
    _, det = detector_and_name
    if det.uses_normal_images:
        pytest.skip("the method uses normal images")
    with pytest.warns(UserWarning, match="ignored"):
        det.fit(_images(2))
    assert det.num_shots == 0


@pytest.mark.parametrize("name", BUILTIN)
def test_unknown_options_are_refused_naming_the_accepted_ones(name: str) -> None:
    with pytest.raises(ValueError, match=r"Accepted: .*batch_size"):
        create_detector(name, no_such_option=1)


@pytest.mark.gpu
def test_cuda_results_match_the_cpu() -> None:
    cpu = create_detector("patchcore", backbone="resnet18", weights="random", image_size=64)
    gpu = create_detector(
        "patchcore", backbone="resnet18", weights="random", image_size=64, device="cuda"
    )
    shots, images = _images(2, seed=1), _images(3, seed=2)
    a = cpu.fit(shots).predict(images)
    b = gpu.fit(shots).predict(images)
    assert torch.allclose(a.anomaly_map, b.anomaly_map, atol=1e-3)
