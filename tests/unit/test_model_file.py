"""Model files: save -> load gives bit-identical scores and maps for every method; format
errors are clear and nothing is written half-way."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_detector_contract import BUILDERS, _images

from anomalens import load_detector
from anomalens.detectors.base import Detector
from anomalens.model_file import (
    FORMAT_VERSION,
    MODEL_JSON,
    MODEL_TENSORS,
    ModelFileError,
    load_model,
    model_kind,
)
from anomalens.registry import create_detector

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*untrained.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:MuSc got only:UserWarning"),
]

#: (method, few-shot?) cases: every method, zero- and few-shot where the method has both
CASES = [
    ("patchcore", True),
    ("mvg", True),
    ("winclip", False),
    ("winclip", True),
    ("adaptclip", False),
    ("adaptclip", True),
    ("anomalyclip", False),
    ("musc", False),
]


def _fitted(name: str, shots: bool) -> Detector:
    torch.manual_seed(0)
    det = BUILDERS[name]()
    return det.fit(_images(2, seed=1) if shots else None, category="metal_nut")


def _same(a: Detector, b: Detector, n: int = 3) -> None:
    images = _images(max(n, a.min_batch), seed=5)
    pa = a.predict(images)
    pb = b.predict(images)
    assert torch.equal(pa.image_score, pb.image_score)
    assert torch.equal(pa.anomaly_map, pb.anomaly_map)


@pytest.mark.parametrize(("name", "shots"), CASES)
def test_embedded_round_trip_is_bit_identical(name: str, shots: bool, tmp_path: Path) -> None:
    det = _fitted(name, shots)
    out = det.save(tmp_path / "model", embed_weights=True)
    info = json.loads((out / MODEL_JSON).read_text())
    assert info["method"] == name and info["format_version"] == FORMAT_VERSION
    assert info["backbone"]["embedded"] and info["category"] == "metal_nut"
    assert info["num_shots"] == (2 if shots else 0)
    if name == "musc":
        assert not any(k.startswith("state.") for k in info["tensors"])
        assert "settings only" in info["note"]
    loaded = load_detector(out)
    assert type(loaded) is type(det) and loaded.is_fitted
    assert loaded.category == "metal_nut" and loaded.num_shots == det.num_shots
    _same(det, loaded)


@pytest.mark.parametrize("name", ["patchcore", "mvg", "musc"])
def test_referenced_weights_round_trip_as_zip(name: str, tmp_path: Path) -> None:
    det = _fitted(name, det_shots := name != "musc")
    path = det.save(tmp_path / "m.anomalens", threshold={"value": 1.5, "method": "fixed"})
    assert zipfile.is_zipfile(path) and model_kind(path) == "anomalens"
    saved = load_model(path)
    assert saved.info["backbone"]["embedded"] is False
    assert saved.info["backbone"]["sha256"] and det_shots == (det.num_shots == 2)
    assert saved.threshold is not None and saved.threshold["value"] == 1.5
    assert saved.detector.config() == det.config()
    _same(det, saved.detector)


def test_state_tensors_hold_the_fitted_state(tmp_path: Path) -> None:
    det = _fitted("patchcore", True)
    info = json.loads((det.save(tmp_path / "m") / MODEL_JSON).read_text())
    bank = info["tensors"]["state.memory_bank"]
    assert bank["shape"] == list(det.memory_bank.shape) and bank["dtype"] == "float32"
    mvg = _fitted("mvg", True)
    info = json.loads((mvg.save(tmp_path / "g") / MODEL_JSON).read_text())
    assert info["tensors"]["state.whitening.0"]["dtype"] == "float64"


def test_a_ready_backbone_object_needs_embedded_weights(tmp_path: Path) -> None:
    det = _fitted("winclip", False)  # built with a ready tiny ClipBackbone
    with pytest.raises(ModelFileError, match="embed_weights=True"):
        det.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_unfitted_or_hand_built_detectors_are_refused(tmp_path: Path) -> None:
    det = BUILDERS["patchcore"]()
    with pytest.raises(ModelFileError, match="not fitted"):
        det.save(tmp_path / "m")
    from anomalens.backbones.factory import build_backbone
    from anomalens.detectors.patchcore import PatchCore

    raw = PatchCore(backbone=build_backbone("cnn", "resnet18", weights="random"), image_size=64)
    raw.fit(_images(1))
    with pytest.raises(ModelFileError, match="create_detector"):
        raw.save(tmp_path / "m")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    det = _fitted("patchcore", True)
    return det.save(tmp_path_factory.mktemp("saved") / "model")


def _copy(saved: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def _edit_json(folder: Path, change) -> None:
    info = json.loads((folder / MODEL_JSON).read_text())
    change(info)
    (folder / MODEL_JSON).write_text(json.dumps(info))


def test_newer_and_unsupported_format_versions(saved: Path, tmp_path: Path) -> None:
    m = _copy(saved, tmp_path)
    _edit_json(m, lambda i: i.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match=r"newer anomalens.*upgrade") as e:
        load_detector(m)
    assert str(m) in str(e.value)
    _edit_json(m, lambda i: i.update(format_version=0))
    with pytest.raises(ModelFileError, match="unsupported format version"):
        load_detector(m)


def test_unknown_and_missing_keys(saved: Path, tmp_path: Path) -> None:
    m = _copy(saved, tmp_path)
    _edit_json(m, lambda i: i.update(surprise=1))
    with pytest.raises(ModelFileError, match=r"unknown key.*surprise"):
        load_detector(m)
    _edit_json(m, lambda i: (i.pop("surprise"), i.pop("init_options")))
    with pytest.raises(ModelFileError, match=r"lacks key.*init_options"):
        load_detector(m)


def test_corrupt_truncated_and_mismatched_tensors(saved: Path, tmp_path: Path) -> None:
    m = _copy(saved, tmp_path)
    data = (m / MODEL_TENSORS).read_bytes()
    (m / MODEL_TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt, truncated"):
        load_detector(m)
    (m / MODEL_TENSORS).write_bytes(data)
    (m / MODEL_JSON).write_text((m / MODEL_JSON).read_text()[:100])
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_detector(m)


def test_missing_tensor_and_shape_mismatch(saved: Path, tmp_path: Path) -> None:
    import hashlib

    from safetensors.torch import load, save

    m = _copy(saved, tmp_path)
    tensors = load((m / MODEL_TENSORS).read_bytes())

    def rewrite(t: dict[str, torch.Tensor]) -> None:
        payload = save(t)
        (m / MODEL_TENSORS).write_bytes(payload)
        _edit_json(m, lambda i: i.update(tensors_sha256=hashlib.sha256(payload).hexdigest()))

    rewrite({k: v for k, v in tensors.items() if k != "state.memory_bank"})
    with pytest.raises(ModelFileError, match=r"state.memory_bank.*missing"):
        load_detector(m)
    rewrite({**tensors, "state.memory_bank": tensors["state.memory_bank"][:, :5].contiguous()})
    with pytest.raises(ModelFileError, match="mismatched shapes"):
        load_detector(m)


def test_referenced_weights_with_another_checksum(saved: Path, tmp_path: Path) -> None:
    m = _copy(saved, tmp_path)
    # the recorded checksum of the weights differs from the rebuilt backbone's
    _edit_json(m, lambda i: i["backbone"].update(sha256="0" * 64))
    with pytest.raises(ModelFileError, match=r"other weights.*--embed-weights"):
        load_detector(m)


def test_corrupt_zip_and_not_a_model(tmp_path: Path) -> None:
    det = _fitted("patchcore", True)
    z = det.save(tmp_path / "m.anomalens")
    z.write_bytes(z.read_bytes()[:-200])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_detector(z)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match=f"no {MODEL_JSON}"):
        load_detector(tmp_path / "empty")
    exported = tmp_path / "exp"
    exported.mkdir()
    (exported / "metadata.json").write_text("{}")
    assert model_kind(exported) == "export"
    with pytest.raises(ModelFileError, match="exported"):
        load_detector(exported)


def test_saving_never_leaves_a_half_written_model(tmp_path: Path, monkeypatch) -> None:
    det = _fitted("patchcore", True)
    out = det.save(tmp_path / "model")
    before = (out / MODEL_JSON).read_text()
    import anomalens.model_file as mf

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mf.os, "fsync", boom)
    det2 = _fitted("patchcore", True)
    det2.fit(_images(3, seed=9))
    with pytest.raises(OSError, match="disk full"):
        det2.save(out)
    assert (out / MODEL_JSON).read_text() == before  # the old model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    monkeypatch.undo()
    with pytest.raises(ModelFileError, match="not a model folder"):
        det.save(tmp_path / "other")


def test_loading_overrides_the_device_and_keeps_options(saved: Path) -> None:
    det = load_detector(saved, device="cpu")
    assert det.device == torch.device("cpu")
    assert det.init_options is not None and det.init_options["backbone"] == "resnet18"
    again = create_detector("patchcore", **det.init_options)
    assert again.config()["backbone"] == det.config()["backbone"]
    assert np.isfinite(det.predict(_images(1)).image_score.numpy()).all()


def test_referenced_clip_weights_round_trip_from_options(tmp_path: Path) -> None:
    # built from settings only (seeded random tiny CLIP): nothing embedded, rebuilt on load
    det = create_detector(
        "winclip", model_name="anomalens-tiny-clip", pretrained=None, image_size=64, scales=(2,)
    )
    det.fit(_images(2, seed=1), category="screw")
    info = load_model(det.save(tmp_path / "m")).info
    assert info["backbone"]["embedded"] is False and info["config"]["class_name"] == "screw"
    _same(det, load_detector(tmp_path / "m"))


def test_a_backbone_that_cannot_be_rebuilt_is_named(tmp_path: Path) -> None:
    det = _fitted("winclip", False)
    det.backbone.model_name = "hand-made-clip"
    with pytest.raises(ModelFileError, match="cannot be rebuilt"):
        det.save(tmp_path / "m", embed_weights=True)
    assert not (tmp_path / "m").exists()


@pytest.mark.shared
def test_shared_mobilenet_round_trip_and_a_real_checksum_mismatch(tmp_path: Path) -> None:
    import shutil

    from _fewshot_helpers import MAGNETIC_TILE, MOBILENET_TF, require_shared

    require_shared(MOBILENET_TF, MAGNETIC_TILE)
    good = sorted((MAGNETIC_TILE / "train" / "good").iterdir())[:2]
    test = sorted((MAGNETIC_TILE / "test" / "crack").glob("*.*"))[:2]
    det = create_detector("patchcore", backbone="mobilenet_v2_tf", weights=str(MOBILENET_TF))
    det.fit(good)
    out = det.save(tmp_path / "model")
    loaded = load_detector(out)
    pa, pb = det.predict(test), loaded.predict(test)
    assert torch.equal(pa.image_score, pb.image_score)
    assert torch.equal(pa.anomaly_map, pb.anomaly_map)
    # the same file name with other contents: the model refuses it
    from safetensors.torch import load_file, save_file

    other = tmp_path / "w" / MOBILENET_TF.name
    other.parent.mkdir()
    state = load_file(MOBILENET_TF)
    # a weight the features use (the classifier is not part of the extractor, nor its hash)
    key = sorted(k for k, v in state.items() if k.startswith("features.0") and v.ndim == 4)[0]
    state[key] = state[key] + 1e-3
    save_file(state, other)
    info = json.loads((out / MODEL_JSON).read_text())
    info["init_options"]["weights"] = str(other)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    (moved / MODEL_JSON).write_text(json.dumps(info))
    with pytest.raises(ModelFileError, match="other weights"):
        load_detector(moved)


def test_musc_on_a_ready_clip_round_trips_embedded(tmp_path: Path) -> None:
    from test_detector_contract import _tiny_clip

    det = create_detector("musc", backbone=_tiny_clip(), image_size=64, layers=(2, 4))
    det.fit(None)
    loaded = load_detector(det.save(tmp_path / "m.anomalens", embed_weights=True))
    _same(det, loaded, n=4)


def test_a_zip_bomb_is_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.anomalens"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(MODEL_JSON, "{}")
        z.writestr(MODEL_TENSORS, b"\0" * (8 << 20))
    with pytest.raises(ModelFileError, match="claims"):
        load_detector(bomb)
