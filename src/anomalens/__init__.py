"""anomalens: universal visual anomaly detection from zero or a few normal images."""

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
