"""Scale out on Ray: ``anomalens predict --engine ray`` (``--groups`` too) and ``anomalens
benchmark --engine ray``.

Needs the ``ray`` extra (``pip install "anomalens[ray]"``). See docs/scale.md.
"""

from __future__ import annotations

from anomalens.distributed.ray_benchmark import run_cells_on_ray
from anomalens.distributed.ray_groups import run_predict_groups_ray
from anomalens.distributed.ray_predict import (
    RayOptions,
    read_manifest,
    require_ray,
    run_predict_ray,
)

__all__ = [
    "RayOptions",
    "read_manifest",
    "require_ray",
    "run_cells_on_ray",
    "run_predict_groups_ray",
    "run_predict_ray",
]
