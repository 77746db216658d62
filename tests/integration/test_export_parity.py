"""AdaptCLIP and AnomalyCLIP exported (ONNX) from the parity fixtures' weights match the fixtures'
final maps and image scores (the official code's outputs) within their tolerance.

518 px inputs through the fixtures' tiny 24-block CLIP: about 2 minutes on 2 CPU cores, hence here
(slow) and not in tests/unit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'anomalens[onnx]'")
pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'anomalens[onnx]'")

from anomalens.export import export_detector
from anomalens.inference import OnnxInferencer

pytestmark = [pytest.mark.shared, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures"


def _fixture(name: str) -> tuple[Path, dict[str, torch.Tensor], dict[str, dict]]:
    folder = FIXTURES / name
    if not (folder / "expected.safetensors").is_file():
        pytest.skip(f"needs the parity fixtures in {folder.resolve()} (the team's ../shared)")
    from safetensors.torch import load_file

    expected = load_file(str(folder / "expected.safetensors"))
    tol = json.loads((folder / "tolerance.json").read_text())["tensors"]
    return folder, expected, tol


def _check(expected: dict, tol: dict, name: str, ours: np.ndarray) -> None:
    exp = expected[name].double().numpy()
    diff = float(np.abs(ours.astype(np.float64) - exp).max())
    assert diff <= tol[name]["atol"], f"{name}: max abs diff {diff:.3g} > {tol[name]['atol']:.3g}"


def _sampled(expected: dict, maps: np.ndarray) -> np.ndarray:
    g = expected["check/grid_index"].long().numpy()
    return maps[:, g][:, :, g]


@pytest.mark.parametrize("mode", ["zero_shot", "two_shot"])
def test_adaptclip_export_matches_the_official_final_maps(mode: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from anomalens.backbones.clip import ClipBackbone
    from anomalens.detectors.adaptclip import AdaptCLIP

    folder, expected, tol = _fixture("adaptclip_parity")
    backbone = ClipBackbone.from_openai_state_dict(
        load_file(str(folder / "clip_tiny_openai.safetensors")), image_size=518
    )
    det = AdaptCLIP(backbone, checkpoint=folder / "adapters_official.pt")
    prompts = [folder / "inputs" / f"prompt_{i}.png" for i in range(2)]
    det.fit(prompts if mode == "two_shot" else None)
    out = export_detector(det, tmp_path / "adaptclip")
    queries = [folder / "inputs" / f"query_{i}.png" for i in range(3)]
    res = OnnxInferencer(out, num_threads=1).predict(queries)
    _check(expected, tol, f"{mode}/pixel_smoothed_sampled", _sampled(expected, res.anomaly_map))
    _check(expected, tol, f"{mode}/image_score", res.image_score)


def test_anomalyclip_export_matches_the_official_final_maps(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from anomalens.backbones.clip import OPENAI_JIT_ONLY_KEYS, ClipBackbone
    from anomalens.detectors.anomalyclip import AnomalyCLIP

    folder, expected, tol = _fixture("anomalyclip_parity")
    sd = load_file(str(folder / "clip_tiny_openai.safetensors"))
    sd = {k: v.float() for k, v in sd.items() if k not in OPENAI_JIT_ONLY_KEYS}
    backbone = ClipBackbone.from_openai_state_dict(sd, image_size=518)
    det = AnomalyCLIP(backbone, checkpoint=folder / "prompt_learner_official.safetensors")
    out = export_detector(det, tmp_path / "anomalyclip")
    queries = [folder / "inputs" / f"query_{i}.png" for i in range(3)]
    res = OnnxInferencer(out, num_threads=1).predict(queries)
    _check(expected, tol, "features_24/smoothed_full", res.anomaly_map)
    _check(expected, tol, "image/score", res.image_score)
