"""Detectors: one file per method, all behind ``anomalens.detectors.base.Detector``."""

from anomalens.detectors.base import Detector, NotFittedError

__all__ = ["Detector", "NotFittedError"]
