"""anomalens.backbones: frozen feature extractors, their presets and weights.

What users import from here (loaded on first use, so that importing a light submodule such as
``anomalens.backbones.weights`` does not import torchvision or open_clip):

* :func:`build_backbone` (``factory``): a CNN extractor or a CLIP backbone from a preset name;
* :class:`PatchFeatureExtractor` and :class:`PatchFeatures` (``protocol``): the contract of a
  detector's patch-feature source.

See ``docs/backbones.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalens.backbones.factory import build_backbone
    from anomalens.backbones.protocol import PatchFeatureExtractor, PatchFeatures

__all__ = ["PatchFeatureExtractor", "PatchFeatures", "build_backbone"]

_LAZY = {
    "build_backbone": "anomalens.backbones.factory",
    "PatchFeatureExtractor": "anomalens.backbones.protocol",
    "PatchFeatures": "anomalens.backbones.protocol",
}


def __getattr__(name: str) -> Any:
    """Import the public names on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'anomalens.backbones' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
