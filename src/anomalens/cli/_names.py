"""Names the command line offers as choices, kept free of torch so ``--help`` starts at once.

Each tuple mirrors a registry that imports torch; ``tests/unit/test_cli_names.py`` checks that
they stay equal, so a name added to a registry and forgotten here fails the tests.
"""

from __future__ import annotations

__all__ = ["DATASETS", "METHODS", "SHOT_RULES"]

#: built-in detectors, as ``anomalens.registry.list_detectors()`` names them (mirrors
#: ``anomalens.registry._DETECTOR_MODULES``)
METHODS: tuple[str, ...] = (
    "adaptclip",
    "anomalyclip",
    "metauas",
    "musc",
    "mvg",
    "patchcore",
    "refdiff",
    "winclip",
)

#: dataset layouts of ``anomalens.data.registry.list_datasets()``
DATASETS: tuple[str, ...] = ("btad", "folder", "mpdd", "mvtec", "pairs", "visa")

#: reference draws of ``anomalens.data.sampling.SHOT_RULES`` (same order: the first is the default)
SHOT_RULES: tuple[str, ...] = ("without_replacement", "adaptclip", "first")
