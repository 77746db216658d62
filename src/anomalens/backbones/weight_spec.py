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
        git_blob_sha1: expected git blob id of the file (``sha1(b"blob <size>\\0" + content)``,
            what ``git hash-object`` prints): the digest a repository that commits the file
            publishes; checked after download when given.
        method: for method checkpoints, the detector that loads them (``"adaptclip"``).
        trained_on: for method checkpoints, the dataset family they were trained on
            (``"mvtec"``, ``"visa"``); None for backbone weights.
    """

    name: str
    source: str
    filename: str
    sha256: str | None = None
    description: str = ""
    git_blob_sha1: str | None = None
    method: str | None = None
    trained_on: str | None = None
