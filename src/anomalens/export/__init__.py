"""Export a fitted detector as one graph (ONNX, OpenVINO, TorchScript) with ``metadata.json``.

Usage::

    from anomalens.export import export_detector
    export_detector(det, "model_onnx/", format="onnx", threshold=thr)

Run the result without PyTorch with :mod:`anomalens.inference`.
"""

from anomalens.export.exporter import (
    EXPORT_FORMATS,
    METADATA_FILE,
    METADATA_VERSION,
    export_detector,
)
from anomalens.export.graphs import EXPORTABLE_METHODS, ExportError, build_graph

__all__ = [
    "EXPORTABLE_METHODS",
    "EXPORT_FORMATS",
    "METADATA_FILE",
    "METADATA_VERSION",
    "ExportError",
    "build_graph",
    "export_detector",
]
