"""Scale out on Ray: ``anomalens predict --engine ray`` over a cluster.

Needs the ``ray`` extra (``pip install "anomalens[ray]"``). See docs/scale.md.
"""

from __future__ import annotations

from anomalens.distributed.ray_predict import (
    RayOptions,
    read_manifest,
    require_ray,
    run_predict_ray,
)

__all__ = ["RayOptions", "read_manifest", "require_ray", "run_predict_ray"]
