"""anomalens: universal visual anomaly detection from zero or a few normal images.

The public names are imported on first use (PEP 562), so that ``import anomalens`` — and the
command line's ``--help`` — does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalens.model_file import load_detector, load_model
    from anomalens.registry import (
        create_detector,
        get_detector_class,
        list_detectors,
        register_detector,
    )
    from anomalens.types import LearningType, Prediction, Sample

__version__ = "0.1.0"

__all__ = [
    "LearningType",
    "Prediction",
    "Sample",
    "__version__",
    "create_detector",
    "get_detector_class",
    "list_detectors",
    "load_detector",
    "load_model",
    "register_detector",
]

#: public name -> module that defines it
_LAZY = {
    "load_detector": "anomalens.model_file",
    "load_model": "anomalens.model_file",
    "create_detector": "anomalens.registry",
    "get_detector_class": "anomalens.registry",
    "list_detectors": "anomalens.registry",
    "register_detector": "anomalens.registry",
    "LearningType": "anomalens.types",
    "Prediction": "anomalens.types",
    "Sample": "anomalens.types",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'anomalens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
