"""anomalens: universal visual anomaly detection from zero or a few normal images."""

from anomalens.registry import (
    create_detector,
    get_detector_class,
    list_detectors,
    register_detector,
)

__version__ = "0.1.0"

#: Names loaded on first use: ``anomalens.types`` imports torch, and ``anomalens.inference``
#: (running exported models) must import without it.
_LAZY_TYPES = ("LearningType", "Prediction", "Sample")


def __getattr__(name: str) -> object:
    if name in _LAZY_TYPES:
        from anomalens import types

        return getattr(types, name)
    raise AttributeError(f"module 'anomalens' has no attribute {name!r}")


__all__ = [
    "LearningType",
    "Prediction",
    "Sample",
    "__version__",
    "create_detector",
    "get_detector_class",
    "list_detectors",
    "register_detector",
]
