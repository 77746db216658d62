"""Exact, tie-aware evaluation metrics: image level and streaming category-level pixel level.

Metric keys used across the project: ``image_auroc``, ``image_ap``, ``image_aupr``,
``image_f1max``, ``pixel_auroc``, ``pixel_ap``, ``pixel_f1max``, ``pixel_aupro``.
"""

from anomalens.metrics._curves import UndefinedMetricWarning
from anomalens.metrics.image import (
    aupr_trapezoid,
    auroc,
    average_precision,
    f1_max,
    image_metrics,
)
from anomalens.metrics.pixel import PixelMetricAccumulator, aupro, label_regions, pixel_metrics

__all__ = [
    "PixelMetricAccumulator",
    "UndefinedMetricWarning",
    "aupr_trapezoid",
    "aupro",
    "auroc",
    "average_precision",
    "f1_max",
    "image_metrics",
    "label_regions",
    "pixel_metrics",
]
