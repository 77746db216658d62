"""Run exported models with numpy + Pillow + onnxruntime / openvino only (no PyTorch).

Usage::

    from anomalens.inference import OnnxInferencer, run_folder
    inf = OnnxInferencer("model_onnx/")           # folder written by `anomalens export`
    res = inf.predict(["a.png", "b.png"])         # image_score (N,), anomaly_map (N, S, S)
    run_folder(inf, "incoming/", "results/")      # results.csv / .jsonl, masks, overlays

Importing this package does not import torch.
"""

from anomalens.inference._core import (
    Inferencer,
    InferenceResult,
    MetadataError,
    OnnxInferencer,
    OpenVinoInferencer,
    load_inferencer,
    read_metadata,
)
from anomalens.inference._folder import run_folder

__all__ = [
    "InferenceResult",
    "Inferencer",
    "MetadataError",
    "OnnxInferencer",
    "OpenVinoInferencer",
    "load_inferencer",
    "read_metadata",
    "run_folder",
]
