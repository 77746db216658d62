"""anomalens: universal visual anomaly detection from zero or a few normal images."""

from anomalens.registry import (
    create_detector,
    get_detector_class,
    list_detectors,
    register_detector,
)

__version__ = "0.1.0"

#: Names loaded on first use (name -> module): these modules import torch, and
#: ``anomalens.inference`` (running exported models) must import without it.
_LAZY = {
    "LearningType": "anomalens.types",
    "Prediction": "anomalens.types",
    "Sample": "anomalens.types",
    "load_detector": "anomalens.model_file",
    "load_model": "anomalens.model_file",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'anomalens' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


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
