"""Registry from method names to detector classes (``create_detector``, ``list_detectors``)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from anomalens.detectors.base import Detector

__all__ = [
    "check_options",
    "create_detector",
    "detector_options",
    "get_detector_class",
    "list_detectors",
    "register_detector",
]

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
    "anomalens.detectors.refdiff",
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
    """Import the built-in detector modules (each registers its class).

    A built-in module that cannot be imported is a broken installation: the error says which
    module and why, instead of the method silently missing from the registry.
    """
    global _loaded
    if _loaded:
        return
    for mod in _DETECTOR_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise ImportError(
                f"built-in detector module {mod} cannot be imported ({exc}); the anomalens "
                "installation is incomplete: reinstall it (pip install --force-reinstall anomalens)"
            ) from exc
    _loaded = True


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


#: The backbone's weights are called ``weights`` for every method (WinCLIP and MuSc, which build
#: their own CLIP, call them ``pretrained``, open_clip's word; that name is accepted as an alias).
_WEIGHT_ALIASES = ("weights", "pretrained")
#: Options that build the backbone, by kind. For a method whose constructor takes a built
#: backbone (it has no ``weights`` parameter), ``create_detector`` builds the backbone from
#: them with ``anomalens.backbones.build_backbone`` and passes the built object in.
BACKBONE_OPTIONS: dict[str, tuple[str, ...]] = {
    "cnn": ("weights", "layers", "tf_padding"),
    "clip": ("weights", "precision"),
}


def _constructor_params(cls: type[Detector]) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return params


def _factory_options(cls: type[Detector]) -> tuple[str, ...]:
    """Backbone options ``create_detector`` handles for ``cls`` (empty: it builds its own)."""
    params = _constructor_params(cls)
    if cls.backbone_kind is None or any(k in params for k in _WEIGHT_ALIASES):
        return ()
    return tuple(k for k in BACKBONE_OPTIONS[cls.backbone_kind] if k not in params)


def detector_options(name: str) -> list[str]:
    """The option names ``create_detector(name, ...)`` accepts (``weights`` for every method)."""
    cls = get_detector_class(name)
    params = _constructor_params(cls)
    names = [p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
    if "pretrained" in names and "weights" not in names:
        names[names.index("pretrained")] = "weights"
    extra = [k for k in _factory_options(cls) if k not in names]
    if extra:
        at = names.index("backbone") + 1 if "backbone" in names else 0
        names[at:at] = extra
    return names


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate detector options the same way for the CLI, the Python API and the service.

    ``weights`` names the backbone weights for every method; ``pretrained`` is accepted as
    its alias. Option names use ``_`` (``-`` is converted).

    Returns:
        The options with the weights under the name the method uses.

    Raises:
        KeyError: unknown method (the message lists the registered ones).
        ValueError: unknown option(s), or both ``weights`` and ``pretrained``; the message
            lists the accepted options.
    """
    cls = get_detector_class(name)
    params = _constructor_params(cls)
    accepted = set(params) | set(_factory_options(cls))
    opts = {str(k).strip().replace("-", "_"): v for k, v in options.items()}
    given = [k for k in _WEIGHT_ALIASES if k in opts]
    if len(given) > 1:
        raise ValueError(
            f"give the backbone weights once: 'weights' and 'pretrained' mean the same ({name})"
        )
    if given:
        target = next((k for k in _WEIGHT_ALIASES if k in accepted), None)
        if target is not None:
            opts[target] = opts.pop(given[0])
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        bad = sorted(k for k in opts if k not in accepted)
        if bad:
            raise ValueError(
                f"method {name!r} does not accept option(s) {', '.join(bad)}. "
                f"Accepted: {', '.join(detector_options(name))}"
            )
    return opts


def create_detector(name: str, **options: Any) -> Detector:
    """Build the detector registered under ``name``.

    The backbone is built here, once, from its preset name and the backbone options
    (``weights``, and ``layers`` / ``tf_padding`` for CNNs or ``precision`` for CLIP), and the
    built object is passed to the detector, whose constructor takes only its own options
    (as segment-anything's ``sam_model_registry`` does). WinCLIP and MuSc build their CLIP
    themselves (method-specific construction: WinCLIP's open_clip model names, MuSc's bicubic
    position resize and CNN taps).

    Args:
        name: method name (``list_detectors()``).
        **options: the method's options (``anomalens list methods``; ``weights`` names the
            backbone's weights for every method). Validated by :func:`check_options`.
    """
    cls = get_detector_class(name)
    opts = check_options(name, options)
    factory = _factory_options(cls)
    ctor = {k: v for k, v in opts.items() if k not in factory}
    if factory and (
        isinstance(ctor.get("backbone"), str)
        or "backbone" not in ctor
        or any(k in opts for k in factory)
    ):
        from anomalens.backbones.factory import build_backbone

        default = _constructor_params(cls)["backbone"].default
        build: Callable[..., Any] = build_backbone
        ctor["backbone"] = build(
            cls.backbone_kind,
            ctor.get("backbone", default),
            device=ctor.get("device", "cpu"),
            **{k: opts[k] for k in factory if k in opts},
        )
    detector = cls(**ctor)
    # what rebuilds this detector (model files): the options as given, backbone by name
    detector.init_options = dict(opts)
    return detector
