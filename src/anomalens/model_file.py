"""Fitted detectors as files: ``Detector.save(path)`` and ``load_detector(path)``.

A model is one folder (or one ``.anomalens`` zip of the same two files):

* ``model.safetensors``: the fitted state (memory banks, Gaussian statistics, cached text
  features, prompt memories, adapter weights; ``state.*``) and, with ``embed_weights=True``,
  the backbone's own weights (``backbone.*``). No pickle: loading reads tensors, never code.
* ``model.json``: the method, the options it was built with (``init_options``), every setting
  of ``config()``, the backbone (name, weight source, sha256 of its tensors), the image size,
  the decision threshold and how it was set, the number of shots, the category, the
  anomalens / torch versions and the format version.

Backbone weights are referenced by their source (resolved offline-first by
``anomalens.backbones.weights.resolve_weights`` when the detector is rebuilt) and checked by
the sha256 of the rebuilt backbone's tensors, or embedded for a self-contained file.

Folders written by ``anomalens export`` hold ``metadata.json`` instead of ``model.json``;
:func:`model_kind` tells them apart (extend :data:`MODEL_KINDS` for new kinds).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from anomalens.detectors.base import Detector

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_JSON",
    "MODEL_KINDS",
    "MODEL_TENSORS",
    "ZIP_SUFFIX",
    "ModelFileError",
    "SavedModel",
    "backbone_sha256",
    "load_detector",
    "load_model",
    "model_kind",
    "read_model_info",
    "save_detector",
]

FORMAT = "anomalens-model"
#: Version of the model file layout; a reader refuses files of a newer version.
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
MODEL_TENSORS = "model.safetensors"
ZIP_SUFFIX = ".anomalens"
#: Options whose content the saved state carries (adapter / prompt checkpoints): not needed,
#: and not read, when a model is loaded.
STATE_OPTIONS = ("checkpoint",)
_REQUIRED_KEYS = (
    "format",
    "format_version",
    "method",
    "init_options",
    "config",
    "image_size",
    "num_shots",
    "category",
    "threshold",
    "backbone",
    "tensors",
    "tensors_sha256",
    "versions",
)
_OPTIONAL_KEYS = ("created", "note", "views")
_BACKBONE_KEYS = {"kind", "name", "weights", "sha256", "embedded", "option", "architecture"}
_UPGRADE = "pip install -U anomalens"
#: largest expansion accepted for a deflated member of a .anomalens zip
_MAX_RATIO = 100


class ModelFileError(ValueError):
    """A model file cannot be written or read; the message names the file and what to do."""


@dataclass
class SavedModel:
    """A loaded model file.

    Attributes:
        detector: the fitted detector, ready for ``predict``.
        threshold: the decision threshold saved with it, as ``Threshold.to_dict()`` gives it
            (value, pixel_value, method, details, vis_range); None: none saved (batch
            methods set it from each scored batch).
        path: the file or folder it was read from.
        info: the parsed ``model.json``.
    """

    detector: Detector
    threshold: dict[str, Any] | None
    path: Path
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- folder kinds
def _is_anomalens_model(path: Path) -> bool:
    if path.is_dir():
        return (path / MODEL_JSON).is_file()
    # a damaged .anomalens file is still one: loading it then says what is wrong with it
    return path.is_file() and (path.suffix == ZIP_SUFFIX or zipfile.is_zipfile(path))


def _is_export(path: Path) -> bool:
    return path.is_dir() and (path / "metadata.json").is_file()


#: Kinds of model folder, checked in order by :func:`model_kind`: name -> test. The export
#: module registers its own kinds here (e.g. ``"onnx"``) with a better test than ``export``.
MODEL_KINDS: dict[str, Callable[[Path], bool]] = {
    "anomalens": _is_anomalens_model,
    "export": _is_export,
}


def model_kind(path: str | os.PathLike[str]) -> str:
    """What a ``--model`` path holds: ``"anomalens"`` (this module) or an exported kind.

    Raises:
        ModelFileError: the path does not exist or holds no known model.
    """
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"model {p}: no such file or folder")
    for kind, test in MODEL_KINDS.items():
        if test(p):
            return kind
    raise ModelFileError(
        f"model {p}: not a model. A model folder holds {MODEL_JSON} + {MODEL_TENSORS} "
        f"(`anomalens fit ... --out DIR`), a model file is a {ZIP_SUFFIX} zip of them, an "
        "exported folder holds metadata.json (`anomalens export`)"
    )


# ----------------------------------------------------------------------------- backbones
def _backbone_of(detector: Detector) -> nn.Module | None:
    """The detector's frozen backbone module (CNN extractor or ClipBackbone), if any."""
    for attr in ("backbone", "extractor"):
        obj = getattr(detector, attr, None)
        if isinstance(obj, nn.Module):
            return obj
    ext = getattr(detector, "extractor", None)  # MuSc wraps its backbone in an extractor
    for attr in ("backbone", "model"):
        obj = getattr(ext, attr, None)
        if isinstance(obj, nn.Module):
            return obj
    return None


def backbone_sha256(module: nn.Module) -> str:
    """sha256 of a module's tensors as loaded: names, dtypes, shapes and bytes, sorted by name.

    Independent of the file format the weights came from, so a ``.pth`` and a
    ``.safetensors`` copy of the same weights give the same digest.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype!s}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _architecture(module: nn.Module) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(kind, description, tensors) that rebuild ``module`` without its weight file.

    Raises:
        ValueError: the architecture cannot be rebuilt from a description.
    """
    from anomalens.backbones.clip import ClipBackbone
    from anomalens.backbones.cnn import CNNFeatureExtractor
    from anomalens.backbones.presets import CNN_PRESETS

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    if isinstance(module, CNNFeatureExtractor):
        p = module.preset
        if p.name not in CNN_PRESETS:
            raise ValueError(
                f"CNN backbone {p.name!r} is not a built-in preset: its architecture cannot be "
                "rebuilt from a model file"
            )
        arch = {"preset": p.name, "layers": list(module.layers), "tf_padding": p.tf_padding}
        return "cnn", arch, tensors
    if isinstance(module, ClipBackbone):
        import open_clip

        from anomalens.backbones.tiny import TINY_CLIP_NAME

        name = module.model_name
        if name != TINY_CLIP_NAME and open_clip.get_model_config(name) is None:
            raise ValueError(
                f"CLIP backbone {name!r} is not an open_clip architecture (e.g. built from a raw "
                "OpenAI state dict): its architecture cannot be rebuilt from a model file; "
                "build it with ClipBackbone.create / from_preset"
            )
        d = module.describe()
        arch = {
            "model_name": name,
            "pretrained": d["pretrained"],
            "image_size": int(module.image_size),
            "precision": str(module.precision),
            "quick_gelu": bool(d["quick_gelu"]),
            "mean": list(module.mean),
            "std": list(module.std),
            "interpolation": module.interpolation,
            "native_grid": list(module._native_grid),
        }
        tensors["__native_pos_embed__"] = module._native_pos_embed.detach().cpu().clone()
        return "clip", arch, tensors
    raise ValueError(
        f"backbone of type {type(module).__name__} cannot be rebuilt from a model file "
        "(supported: CNN presets and open_clip CLIP backbones)"
    )


def _rebuild_backbone(
    kind: str, arch: Mapping[str, Any], tensors: dict[str, torch.Tensor], device: str
) -> nn.Module:
    """Rebuild an embedded backbone from its description and tensors (no weight file read)."""
    if kind == "cnn":
        from anomalens.backbones.cnn import create_cnn_backbone

        module = create_cnn_backbone(
            arch["preset"],
            weights="random",
            layers=list(arch["layers"]),
            tf_padding=bool(arch["tf_padding"]),
        )
        module.load_state_dict(tensors, strict=True)
        return module.to(device)
    if kind == "clip":
        from anomalens.backbones.clip import ClipBackbone

        native_pos = tensors.pop("__native_pos_embed__")
        fresh = ClipBackbone.create(
            arch["model_name"],
            pretrained=None,
            image_size=None,
            force_quick_gelu=bool(arch["quick_gelu"]),
            precision="fp32",
        )
        model = fresh.model
        visual = model.visual
        grid = tuple(int(g) for g in arch["native_grid"])
        visual.positional_embedding = nn.Parameter(native_pos.float(), requires_grad=False)
        patch = int(fresh.patch_size)
        visual.grid_size = grid
        visual.image_size = (grid[0] * patch, grid[1] * patch)
        clip = ClipBackbone(
            model,
            image_size=int(arch["image_size"]),
            precision=arch["precision"],
            device=device,
            mean=arch["mean"],
            std=arch["std"],
            interpolation=arch["interpolation"],
            model_name=arch["model_name"],
            pretrained=arch["pretrained"],
        )
        clip.load_state_dict(tensors, strict=True)
        return clip
    raise ValueError(f"unknown embedded backbone kind {kind!r}")


# ----------------------------------------------------------------------------- save
def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _jsonable_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Options with path-like values as strings, tuples as lists; the names that are not JSON."""
    out: dict[str, Any] = {}
    bad = []
    for k, v in options.items():
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        elif isinstance(v, torch.device):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        if _json_ok(v):
            out[k] = v
        else:
            bad.append(k)
    return out, bad


def _weights_source(options: Mapping[str, Any]) -> str | None:
    for key in ("weights", "pretrained"):
        if options.get(key) is not None:
            return str(options[key])
    return None


def save_detector(
    detector: Detector,
    path: str | os.PathLike[str],
    *,
    threshold: Any = None,
    embed_weights: bool = False,
    overwrite: bool = True,
) -> Path:
    """Write a fitted detector as a model folder, or a zip when ``path`` ends in ``.anomalens``.

    Args:
        detector: a fitted detector (``fit`` called; ``fit(None)`` for zero-shot methods).
        path: output folder, or ``NAME.anomalens`` for one zip file.
        threshold: the decision threshold to store with it and how it was set: an
            ``anomalens.thresholds.Threshold`` or its ``to_dict()``.
        embed_weights: store the backbone's weights in the file (self-contained); otherwise
            they are referenced by source and checksum and resolved when loading.
        overwrite: replace an existing model at ``path`` (never anything else).

    Returns:
        The path written. Nothing is left half-written: files go to a temporary sibling
        first and are renamed into place.

    Raises:
        ModelFileError: the detector is not fitted, was not built by ``create_detector``, has
            options that cannot be stored (a ready backbone object without ``embed_weights``),
            or ``path`` holds something that is not a model.
    """
    from safetensors.torch import save as st_save

    import anomalens

    out = Path(path)
    # a detector scoring views (anomalens.geometry): the wrapped one is saved, the views beside it
    views = getattr(detector, "views", None)
    if views is not None and hasattr(detector, "inner"):
        detector.inner.num_shots, detector.inner.category = detector.num_shots, detector.category
        detector = detector.inner
    name = detector.name
    if not detector.is_fitted:
        raise ModelFileError(
            f"cannot save {name} to {out}: the detector is not fitted; call fit() first "
            "(fit(None) for zero-shot methods)"
        )
    if detector.init_options is None:
        raise ModelFileError(
            f"cannot save {name} to {out}: it was not built by anomalens.create_detector, so "
            "the options that rebuild it are unknown; build it with create_detector(...)"
        )
    options, not_json = _jsonable_options(detector.init_options)
    module = _backbone_of(detector)
    if not_json and not (embed_weights and not_json == ["backbone"] and module is not None):
        raise ModelFileError(
            f"cannot save {name} to {out}: option(s) {', '.join(not_json)} are Python objects, "
            "not settings. A ready backbone object is stored by embedding its weights "
            "(embed_weights=True, --embed-weights); other objects cannot be stored"
        )
    tensors: dict[str, torch.Tensor] = {}
    state = detector._state_tensors()
    for k, v in state.items():
        tensors[f"state.{k}"] = v.detach().cpu().contiguous().clone()
    backbone: dict[str, Any] = {
        "kind": detector.backbone_kind,
        "name": None,
        "weights": _weights_source(options),
        "sha256": None,
        "embedded": False,
        "option": None,
        "architecture": None,
    }
    if module is not None:
        backbone["sha256"] = backbone_sha256(module)
        describe = getattr(module, "describe", None)
        if callable(describe):
            d = describe()
            backbone["name"] = d.get("backbone") or d.get("model_name")
    if embed_weights:
        if module is None:
            raise ModelFileError(f"cannot embed weights of {name}: it has no backbone module")
        try:
            kind, arch, bb_tensors = _architecture(module)
        except ValueError as exc:
            raise ModelFileError(f"cannot save {name} to {out}: {exc}") from exc
        for k, v in bb_tensors.items():
            tensors[f"backbone.{k}"] = v
        backbone.update(embedded=True, option="backbone", architecture=arch, kind=kind)
        options.pop("backbone", None)
    metadata = {"format": FORMAT}
    if embed_weights:
        from anomalens.backbones.cnn import preset_metadata
        from anomalens.backbones.presets import CNNPreset

        preset = getattr(module, "preset", None)
        if isinstance(preset, CNNPreset):  # the preprocessing the embedded CNN weights expect
            metadata.update(preset_metadata(preset))
    payload = st_save(tensors, metadata=metadata)
    cfg = detector.config()
    if not _json_ok(cfg):
        cfg = json.loads(json.dumps(cfg, default=str))
    info: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": name,
        "init_options": options,
        "config": cfg,
        "image_size": int(detector.image_size),
        "num_shots": int(detector.num_shots),
        "category": detector.category,
        "threshold": _threshold_dict(out, threshold),
        "backbone": backbone,
        "tensors": {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in tensors.items()
        },
        "tensors_sha256": hashlib.sha256(payload).hexdigest(),
        "versions": {"anomalens": anomalens.__version__, "torch": torch.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if views is not None:
        info["views"] = views.to_dict()
    if not state:
        info["note"] = (
            f"{name} has no fitted state: this file stores its settings only; scores are "
            "computed from each scored batch"
        )
    text = json.dumps(info, indent=2, allow_nan=False) + "\n"
    _write_atomic(out, text.encode("utf-8"), payload, overwrite)
    return out


def _threshold_dict(out: Path, threshold: Any) -> dict[str, Any] | None:
    if threshold is None:
        return None
    d = dict(threshold.to_dict() if hasattr(threshold, "to_dict") else threshold)
    try:
        value = float(d["value"])
        method = str(d["method"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(
            f"cannot save the threshold with {out}: expected a Threshold or a dict with "
            f"'value' and 'method', got {threshold!r}"
        ) from exc
    vis = d.get("vis_range")
    return {
        "value": value,
        "pixel_value": None if d.get("pixel_value") is None else float(d["pixel_value"]),
        "method": method,
        "details": json.loads(json.dumps(d.get("details") or {}, default=str)),
        "vis_range": None if vis is None else [float(vis[0]), float(vis[1])],
    }


def _write_atomic(out: Path, info: bytes, payload: bytes, overwrite: bool) -> None:
    """Write the two files as a folder or a zip: a temporary sibling renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        if not overwrite:
            raise ModelFileError(f"model {out} already exists; remove it or choose another path")
        if out.is_file() and out.suffix != ZIP_SUFFIX:
            raise ModelFileError(
                f"cannot write the model to {out}: a file of that name exists; give a folder "
                f"or a {ZIP_SUFFIX} file name"
            )
        if out.is_dir() and not (out / MODEL_JSON).is_file() and any(out.iterdir()):
            raise ModelFileError(
                f"cannot write the model to {out}: the folder exists and is not a model folder "
                f"(no {MODEL_JSON}); choose an empty or new folder"
            )
    if out.suffix == ZIP_SUFFIX:
        if out.is_dir():
            raise ModelFileError(f"cannot write the model file {out}: it is a folder")
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
                z.writestr(MODEL_JSON, info)
                z.writestr(MODEL_TENSORS, payload)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    tmp_dir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old: Path | None = None
    try:
        for fname, data in ((MODEL_TENSORS, payload), (MODEL_JSON, info)):
            with open(tmp_dir / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp_dir.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)
        raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- load
def _read_files(path: Path) -> tuple[bytes, bytes]:
    """(model.json bytes, model.safetensors bytes) of a folder or a zip."""
    if not path.exists():
        raise ModelFileError(f"model {path}: no such file or folder")
    if path.is_dir():
        if not (path / MODEL_JSON).is_file():
            hint = (
                " (it holds metadata.json: an exported model, run it with the exported "
                "model's inferencer)"
                if _is_export(path)
                else ""
            )
            raise ModelFileError(
                f"model folder {path} has no {MODEL_JSON}{hint}; write models with "
                "`anomalens fit` or Detector.save()"
            )
        if not (path / MODEL_TENSORS).is_file():
            raise ModelFileError(
                f"model folder {path} has no {MODEL_TENSORS}: the model is incomplete; "
                "save it again"
            )
        return (path / MODEL_JSON).read_bytes(), (path / MODEL_TENSORS).read_bytes()
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            missing = [n for n in (MODEL_JSON, MODEL_TENSORS) if n not in names]
            if missing:
                raise ModelFileError(
                    f"model file {path} lacks {', '.join(missing)}: not an anomalens model "
                    "or an incomplete one; save it again"
                )
            for name in (MODEL_JSON, MODEL_TENSORS):
                zi = z.getinfo(name)
                # a model is stored uncompressed; a re-zipped one may be deflated, but a
                # tiny member that claims to expand enormously is refused (zip bomb)
                if zi.file_size > _MAX_RATIO * zi.compress_size + (1 << 20):
                    raise ModelFileError(
                        f"model file {path}: {name} claims {zi.file_size} bytes from "
                        f"{zi.compress_size} compressed; not an anomalens model file"
                    )
            return z.read(MODEL_JSON), z.read(MODEL_TENSORS)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
        raise ModelFileError(
            f"model file {path} is corrupt or truncated ({exc}); copy it again or save it again"
        ) from exc


def _parse_info(path: Path, raw: bytes) -> dict[str, Any]:
    """Parse and check model.json: format, version, keys."""
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(
            f"{MODEL_JSON} of model {path} is not valid JSON ({exc}): the file is corrupt or "
            "truncated; save the model again"
        ) from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ModelFileError(
            f"{MODEL_JSON} of {path} is not an anomalens model file (format "
            f"{info.get('format') if isinstance(info, dict) else None!r}, expected {FORMAT!r})"
        )
    version = info.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(
            f"model {path}: unsupported format version {version!r} (this anomalens reads "
            f"versions 1..{FORMAT_VERSION}); save the model again with this anomalens"
        )
    if version > FORMAT_VERSION:
        written = (info.get("versions") or {}).get("anomalens", "?")
        import anomalens

        raise ModelFileError(
            f"model {path} was written by a newer anomalens ({written}, model format "
            f"{version}); this anomalens {anomalens.__version__} reads formats up to "
            f"{FORMAT_VERSION}: upgrade ({_UPGRADE}) or save the model with this version"
        )
    unknown = sorted(set(info) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        raise ModelFileError(
            f"{MODEL_JSON} of model {path} has unknown key(s) {', '.join(unknown)} for format "
            f"version {version}: the file was edited or written by another program; save "
            "the model again"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in info]
    if missing:
        raise ModelFileError(
            f"{MODEL_JSON} of model {path} lacks key(s) {', '.join(missing)}: incomplete or "
            "edited file; save the model again"
        )
    bb = info["backbone"]
    if not isinstance(bb, dict) or set(bb) - _BACKBONE_KEYS:
        raise ModelFileError(
            f"{MODEL_JSON} of model {path}: 'backbone' must be an object with keys "
            f"{', '.join(sorted(_BACKBONE_KEYS))}; save the model again"
        )
    return info


def read_model_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``model.json`` of a model folder or file, without building the detector.

    Raises:
        ModelFileError: as :func:`load_model` for the file and its ``model.json``.
    """
    p = Path(path)
    raw_info, _ = _read_files(p)
    return _parse_info(p, raw_info)


def _read_tensors(path: Path, info: dict[str, Any], payload: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    if hashlib.sha256(payload).hexdigest() != info["tensors_sha256"]:
        raise ModelFileError(
            f"{MODEL_TENSORS} of model {path} does not match the checksum in {MODEL_JSON}: "
            "the file is corrupt, truncated or from another model; copy or save it again"
        )
    try:
        tensors = st_load(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(
            f"{MODEL_TENSORS} of model {path} cannot be read ({exc}); save the model again"
        ) from exc
    expected = info["tensors"]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ModelFileError(
            f"model {path}: tensor(s) {', '.join(missing[:5])} listed in {MODEL_JSON} are "
            f"missing from {MODEL_TENSORS}; save the model again"
        )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ModelFileError(
            f"model {path}: {MODEL_TENSORS} holds tensor(s) {', '.join(extra[:5])} not listed "
            f"in {MODEL_JSON}; save the model again"
        )
    for key, spec in expected.items():
        t = tensors[key]
        if list(t.shape) != list(spec["shape"]) or str(t.dtype).removeprefix("torch.") != spec.get(
            "dtype"
        ):
            raise ModelFileError(
                f"model {path}: tensor {key} is {str(t.dtype).removeprefix('torch.')} "
                f"{list(t.shape)} but {MODEL_JSON} says {spec.get('dtype')} {spec['shape']} "
                "(mismatched shapes); save the model again"
            )
    return tensors


def _pick_device(saved: Any, device: str | torch.device | None) -> str:
    if device is not None:
        return str(device)
    want = str(saved or "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(
            f"the model was saved on {want}; no CUDA device here, loading it on the CPU",
            UserWarning,
            stacklevel=3,
        )
        return "cpu"
    return want


def load_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    verify_weights: bool = True,
) -> SavedModel:
    """Read a model folder or ``.anomalens`` file: the fitted detector and its threshold.

    Args:
        path: a folder written by :func:`save_detector` or a ``.anomalens`` zip.
        device: where to run it (default: the saved device, the CPU when it is missing).
        verify_weights: check that the rebuilt backbone's tensors have the saved sha256.

    Raises:
        ModelFileError: corrupt or truncated file, unknown keys, unsupported or newer format,
            missing tensors, mismatched shapes, backbone weights with another checksum; the
            message names the file and what to do.
        WeightNotAvailableError: referenced backbone weights are not on disk nor cached and
            cannot be fetched (offline); the message names the command that fetches them.
    """
    from anomalens.registry import (
        _constructor_params,
        _factory_options,
        check_options,
        create_detector,
        get_detector_class,
    )

    p = Path(path)
    raw_info, payload = _read_files(p)
    info = _parse_info(p, raw_info)
    tensors = _read_tensors(p, info, payload)
    method = info["method"]
    try:
        cls = get_detector_class(method)
    except KeyError as exc:
        raise ModelFileError(f"model {p}: {exc.args[0]}") from exc
    options = dict(info["init_options"])
    dev = _pick_device(options.get("device"), device)
    if "device" in options or device is not None:
        options["device"] = dev
    state_options = {k: options.pop(k) for k in STATE_OPTIONS if options.get(k) is not None}
    bb = info["backbone"]
    if bb["embedded"]:
        bb_tensors = {
            k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")
        }
        module = _rebuild_backbone(bb["kind"], bb["architecture"], bb_tensors, dev)
        options[bb["option"]] = cls._backbone_option(module)
    if bb["embedded"]:
        # the rebuilt module is the backbone: the options that would build one do not apply
        for key in _factory_options(cls):
            options.pop(key, None)
    try:
        opts = check_options(method, options)
        with warnings.catch_warnings():
            # adapters / prompts are untrained until the saved state is loaded below
            warnings.filterwarnings("ignore", message=".*untrained.*", category=UserWarning)
            # the saved state replaces the adapters / prompts: build without fetching any
            untrained = {"untrained": True} if "untrained" in _constructor_params(cls) else {}
            detector = create_detector(method, **{**opts, **untrained})
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"model {p}: the detector cannot be rebuilt: {exc}") from exc
    detector.init_options = {**opts, **state_options}
    if bb["embedded"]:
        detector.init_options[bb["option"]] = options[bb["option"]]
    rebuilt = _backbone_of(detector)
    if verify_weights and bb["sha256"] is not None and rebuilt is not None:
        got = backbone_sha256(rebuilt)
        if got != bb["sha256"]:
            raise ModelFileError(
                f"model {p}: the backbone weights {bb['weights'] or '(preset default)'} give "
                f"sha256 {got[:12]}... but the model was fitted with {bb['sha256'][:12]}...: "
                "they are other weights. Provide the weights the model was saved with, fit "
                "the model again with these weights, or save it with embedded weights "
                "(--embed-weights)"
            )
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    try:
        with torch.inference_mode():
            detector._load_state_tensors(state, info["config"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelFileError(
            f"model {p}: the saved state does not fit the rebuilt {method} detector ({exc}); "
            "save the model again"
        ) from exc
    detector.category = info["category"]
    detector.num_shots = int(info["num_shots"])
    detector._fitted = True
    thr = info["threshold"]
    if thr is not None and (not isinstance(thr, dict) or "value" not in thr or "method" not in thr):
        raise ModelFileError(
            f"{MODEL_JSON} of model {path}: 'threshold' must be null or an object with "
            "'value' and 'method'; save the model again"
        )
    if info.get("views") is not None:
        from anomalens.geometry import ImageViews, with_views

        try:
            views = ImageViews.from_dict(info["views"])
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{MODEL_JSON} of model {path}: 'views': {exc}") from exc
        detector = with_views(detector, views)
    return SavedModel(detector=detector, threshold=thr, path=p, info=info)


def load_detector(
    path: str | os.PathLike[str], *, device: str | torch.device | None = None
) -> Detector:
    """The fitted detector of a model folder or ``.anomalens`` file (see :func:`load_model`)."""
    return load_model(path, device=device).detector
