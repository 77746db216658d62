"""Exports on real data (../shared): PatchCore and MVG on magnetic_tile with the shared
MobileNetV2 give the PyTorch scores, maps and decisions (the parity-fixture exports of AdaptCLIP /
AnomalyCLIP, slower, are in tests/integration/test_export_parity.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _fewshot_helpers import (
    MAGNETIC_TILE,
    MOBILENET_TF,
    magnetic_tile_references,
    magnetic_tile_test_set,
    require_shared,
)

from anomalens import create_detector

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'anomalens[onnx]'")
pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'anomalens[onnx]'")

from anomalens.export import export_detector
from anomalens.inference import OnnxInferencer

pytestmark = [pytest.mark.shared, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
ATOL = 1e-4


@pytest.mark.parametrize("method", ["patchcore", "mvg"])
def test_magnetic_tile_export_matches_pytorch(method: str, tmp_path: Path) -> None:
    require_shared(MOBILENET_TF, MAGNETIC_TILE)
    det = create_detector(method, backbone="mobilenet_v2_tf", weights=MOBILENET_TF)
    det.fit(magnetic_tile_references(2, seed=0))
    images, _ = magnetic_tile_test_set(n_good=1, n_per_defect=1, seed=0)  # 4 real images
    ref = det.predict(images)
    top = ref.image_score.sort(descending=True).values
    thr = float(top[1] + top[2]) / 2
    out = export_detector(det, tmp_path / method, threshold=thr)
    res = OnnxInferencer(out, num_threads=1).predict(images, batch_size=4)
    np.testing.assert_allclose(res.image_score, ref.image_score.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(res.anomaly_map, ref.anomaly_map.numpy(), atol=ATOL, rtol=0)
    assert res.decisions == ["anomalous" if s > thr else "normal" for s in ref.image_score]
