"""Export -> run: every exportable method's ONNX graph gives the PyTorch scores and maps.

Detectors are built small (as in test_detector_contract.py): random ResNet-18 features at 64 px,
the tiny random CLIP. Query images differ from the shots (a shot scored against itself sits at a
distance of 0, where the float rounding of two implementations differs most).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalens import create_detector
from anomalens.detectors.base import Detector
from anomalens.thresholds import Threshold

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'anomalens[onnx]'")
pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'anomalens[onnx]'")

from anomalens.export import ExportError, build_graph, export_detector
from anomalens.inference import MetadataError, OnnxInferencer, read_metadata

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*untrained.*:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
ATOL = 1e-4


def _tiny_clip():
    from anomalens.backbones.tiny import make_tiny_clip

    return make_tiny_clip(seed=0, image_size=64)


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
}
#: (method, fit with shots?) -- every exportable method, zero- and few-shot where both exist
CASES = [
    ("patchcore", True),
    ("mvg", True),
    ("winclip", False),
    ("winclip", True),
    ("adaptclip", False),
    ("adaptclip", True),
    ("anomalyclip", False),
]


def _images(n: int, seed: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(60, 200, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize(("method", "few_shot"), CASES)
def test_onnx_export_matches_pytorch(tmp_path: Path, method: str, few_shot: bool) -> None:
    torch.manual_seed(0)
    det = BUILDERS[method]()
    det.fit(_images(2, seed=1) if few_shot else None)
    # odd sizes: the inferencer squash-resizes them exactly as the detector does
    queries = _images(3, seed=2, size=det.image_size) + _images(2, seed=3, size=77)
    ref = det.predict(queries)
    # between the 2nd and 3rd largest scores: some images on each side, none on the line
    top = ref.image_score.sort(descending=True).values
    thr = float(top[1] + top[2]) / 2
    out = export_detector(det, tmp_path / "m", format="onnx", threshold=thr)

    meta = read_metadata(out)
    assert meta["method"] == method and meta["image_size"] == det.image_size
    assert meta["input"]["shape"] == ["N", det.image_size, det.image_size, 3]
    assert meta["threshold"]["value"] == thr and meta["settings"]["method"] == method
    assert meta["export_check_max_abs_diff"] <= ATOL
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.onnx"]

    inf = OnnxInferencer(out, num_threads=1)
    for batch_size in (1, 5):  # dynamic batch axis
        res = inf.predict(queries, batch_size=batch_size)
        np.testing.assert_allclose(res.image_score, ref.image_score.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(res.anomaly_map, ref.anomaly_map.numpy(), atol=ATOL, rtol=0)
    ref_decisions = ["anomalous" if s > thr else "normal" for s in ref.image_score.tolist()]
    assert res.decisions == ref_decisions


@pytest.mark.parametrize(("method", "few_shot"), [c for c in CASES if c[0] != "winclip"])
def test_openvino_export_compiles_with_a_dynamic_batch(
    tmp_path: Path, method: str, few_shot: bool
) -> None:
    """OpenVINO's own graph passes run at compile time (one crashed on AdaptCLIP's few-shot
    graph with a dynamic batch); the compiled model matches PyTorch at batch 1 and 3."""
    pytest.importorskip(
        "openvino", reason="needs the openvino extra: pip install 'anomalens[openvino]'"
    )
    from anomalens.inference import OpenVinoInferencer

    torch.manual_seed(0)
    det = BUILDERS[method]()
    det.fit(_images(2, seed=1) if few_shot else None)
    queries = _images(3, seed=2, size=det.image_size)
    ref = det.predict(queries)
    out = export_detector(det, tmp_path / "m", format="openvino")
    inf = OpenVinoInferencer(out, num_threads=1)
    for batch_size in (1, 3):
        res = inf.predict(queries, batch_size=batch_size)
        np.testing.assert_allclose(res.image_score, ref.image_score.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(res.anomaly_map, ref.anomaly_map.numpy(), atol=ATOL, rtol=0)


def test_uint8_input_is_exactly_the_detectors_preprocessing() -> None:
    """The graph normalises the resized uint8 batch with the same float32 operations as
    ``to_batch``: bit-identical input to the backbone."""
    det = BUILDERS["patchcore"]()
    det.fit(_images(1, seed=1))
    graph = build_graph(det)
    images = _images(2, seed=4, size=64) + _images(1, seed=5, size=90)
    from anomalens.export.exporter import _as_uint8_batch

    batch = _as_uint8_batch(images, 64, det.extractor.preset.interpolation)
    ours = graph.normalize(torch.from_numpy(batch))
    assert torch.equal(ours, det.extractor.preprocess(images, 64))


def test_musc_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    det = create_detector("musc", backbone="resnet18", weights="random", image_size=64)
    with pytest.raises(ExportError, match="against each other"):
        export_detector(det, tmp_path / "musc")
    assert list(tmp_path.iterdir()) == []


def test_unfitted_few_shot_and_bad_options_are_refused(tmp_path: Path) -> None:
    det = BUILDERS["patchcore"]()
    with pytest.raises(ExportError, match="not fitted"):
        export_detector(det, tmp_path / "a")
    det.fit(_images(1, seed=1))
    with pytest.raises(ExportError, match="format"):
        export_detector(det, tmp_path / "a", format="tflite")
    with pytest.raises(ExportError, match="onnx"):
        export_detector(det, tmp_path / "a", format="torchscript", quantize="int8")
    with pytest.raises(ValueError, match="finite"):
        export_detector(det, tmp_path / "a", threshold=float("nan"))
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite_and_failure_leaves_it_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    det = BUILDERS["patchcore"]()
    det.fit(_images(1, seed=1))
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_detector(det, out)

    from anomalens.export import exporter

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(exporter, "_export_onnx", broken)
    with pytest.raises(RuntimeError, match="crashed"):
        export_detector(det, out, overwrite=True)
    # the old folder is untouched and no temporary folder is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (out / "keep.txt").read_text() == "old"


def test_metadata_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="not a folder"):
        read_metadata(tmp_path / "absent")
    with pytest.raises(MetadataError, match=r"metadata\.json is missing"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(MetadataError, match="not valid JSON"):
        read_metadata(tmp_path)
    meta = {
        "format": "anomalens-export",
        "format_version": 99,
        "method": "patchcore",
        "runtime": "onnx",
        "model_file": "model.onnx",
        "image_size": 64,
        "input": {"name": "images"},
    }
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(MetadataError, match="newer than this anomalens"):
        read_metadata(tmp_path)
    meta["format_version"] = 1
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(MetadataError, match=r"model\.onnx is missing"):
        read_metadata(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07truncated")
    with pytest.raises(MetadataError, match="corrupt or truncated"):
        OnnxInferencer(tmp_path)


def test_threshold_object_is_stored_with_how_it_was_set(tmp_path: Path) -> None:
    det = BUILDERS["patchcore"]()
    det.fit(_images(1, seed=1))
    thr = Threshold(2.5, 3.0, "leave-one-out", {"percentile": 100}, (0.0, 5.0))
    out = export_detector(det, tmp_path / "m", threshold=thr)
    inf = OnnxInferencer(out)
    assert inf.threshold == thr.to_dict()
    assert inf.pixel_threshold == 3.0 and inf.decide(2.6) == "anomalous"
    assert inf.decide(2.5) == "normal"


def test_cli_export_fits_sets_the_threshold_and_refuses_musc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from anomalens.cli.main import main

    good = tmp_path / "good"
    good.mkdir()
    for i, im in enumerate(_images(3, seed=1)):
        Image.fromarray(im).save(good / f"{i}.png")
    common = ["--backbone", "resnet18", "--weights", "random", "--image-size", "64"]
    rc = main(
        [
            "export",
            "--method",
            "patchcore",
            *common,
            "--normal",
            str(good),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    meta = read_metadata(tmp_path / "m")
    assert meta["threshold"]["method"] == "leave-one-out" and meta["settings"]["num_shots"] == 3
    assert main(["export", "--method", "musc", *common, "--out", str(tmp_path / "x")]) == 1
    assert "cannot be exported as one graph" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
