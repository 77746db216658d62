"""Registry from method names to detector classes (``create_detector``, ``list_detectors``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from anomalens.detectors.base import Detector

__all__ = ["create_detector", "get_detector_class", "list_detectors", "register_detector"]

_REGISTRY: dict[str, type[Detector]] = {}
T = TypeVar("T", bound="type[Detector]")

# Modules that register detectors on import. Imported lazily so that ``import anomalens``
# stays cheap; a module whose optional dependency is missing is skipped, not fatal.
_DETECTOR_MODULES = (
    "anomalens.detectors.patchcore",
    "anomalens.detectors.mvg",
    "anomalens.detectors.winclip",
    "anomalens.detectors.adaptclip",
    "anomalens.detectors.anomalyclip",
    "anomalens.detectors.musc",
    "anomalens.detectors.metauas",
)
_loaded = False


def register_detector(name: str) -> Callable[[T], T]:
    """Class decorator that registers a detector under ``name`` (lower case)."""

    def wrap(cls: T) -> T:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"detector name {key!r} is already registered by {_REGISTRY[key]!r}")
        _REGISTRY[key] = cls
        cls.name = key
        return cls

    return wrap


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _DETECTOR_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            # only a missing *module of ours* is tolerated (method not built yet / optional);
            # a missing third-party dependency inside an existing module is a real error.
            if exc.name != mod:
                raise


def list_detectors() -> list[str]:
    """Names of all registered detectors, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_detector_class(name: str) -> type[Detector]:
    """Class registered under ``name``; an unknown name lists the available ones."""
    _load_builtin()
    key = name.lower()
    if key not in _REGISTRY:
        raise KeyError(
            f"unknown detector {name!r}. Available: {', '.join(sorted(_REGISTRY)) or '(none)'}"
        )
    return _REGISTRY[key]


def create_detector(name: str, **kwargs: Any) -> Detector:
    """Build the detector registered under ``name`` with keyword options."""
    return get_detector_class(name)(**kwargs)
