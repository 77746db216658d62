"""The record of one named weight in the catalogue (:mod:`anomalens.backbones.catalogue`).

A leaf module: the catalogue (data) and the resolver (:mod:`anomalens.backbones.weights`) both
import it, so neither imports the other in a loop.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WeightSpec"]


@dataclass(frozen=True)
class WeightSpec:
    """A named weight in the catalogue.

    Attributes:
        name: short alias (``anomalens weights download NAME``).
        source: URL or ``hf-hub:`` id.
        filename: file name in the cache folder.
        sha256: expected digest (checked after download when given).
        description: one line for ``anomalens weights list``.
    """

    name: str
    source: str
    filename: str
    sha256: str | None = None
    description: str = ""
