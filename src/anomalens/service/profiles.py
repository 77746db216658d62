"""Inspection profiles on disk: method settings, normal images and the calibrated threshold.

Layout under ``<data_dir>/profiles``::

    <name>/profile.json            settings, threshold, list of normal images (sha256)
    <name>/normals/<sha256>.png    the normal images, re-encoded as PNG (content-addressed)
    <name>/model.anomalens         the fitted detector and its threshold (a model file)

A profile is created in a temporary folder and renamed into place in one step, so it exists
completely or not at all. The fitted detector is saved as a model file, so a restart loads it
instead of refitting (profiles made before model files, or whose model cannot be read, are
refitted from the stored normal images). A profile can also be made from an uploaded model
file (``create_from_model``).
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import os
import re
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from anomalens.data.io import load_image
from anomalens.detectors.base import Detector
from anomalens.fileio import atomic_save_png, atomic_write_json
from anomalens.registry import check_options, create_detector, get_detector_class
from anomalens.service.errors import ServiceError
from anomalens.service.uploads import DecodedImage
from anomalens.thresholds import Threshold, calibrate_leave_one_out, fixed_threshold

__all__ = ["PROFILE_NAME_PATTERN", "Profile", "ProfileStore", "ThresholdPolicy"]

log = logging.getLogger(__name__)
PROFILE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_NAME_RE = re.compile(PROFILE_NAME_PATTERN)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
THRESHOLD_MODES = ("leave-one-out", "fixed")
#: the fitted detector of a profile, in its folder
MODEL_FILE = "model.anomalens"


@dataclass(frozen=True)
class ThresholdPolicy:
    """How a profile sets its decision threshold.

    Attributes:
        mode: ``leave-one-out`` (from the normal images) or ``fixed``.
        value: the image threshold of ``fixed``.
        percentile: percentile of the held-out normal scores (leave-one-out; 100 = max).
        margin: multiplier applied to the calibrated value.
    """

    mode: str = "leave-one-out"
    value: float | None = None
    percentile: float = 100.0
    margin: float = 1.0

    def check(self) -> None:
        if self.mode not in THRESHOLD_MODES:
            raise ServiceError(
                422,
                "bad_threshold",
                f"threshold mode must be one of {THRESHOLD_MODES}, got {self.mode!r}",
            )
        if self.mode == "fixed" and self.value is None:
            raise ServiceError(
                422, "bad_threshold", "a fixed threshold needs a value ('threshold')"
            )
        for name, v in (("threshold", self.value), ("percentile", self.percentile)):
            if v is not None and not math.isfinite(v):
                raise ServiceError(422, "bad_threshold", f"{name} must be a finite number, got {v}")
        if not math.isfinite(self.margin):
            raise ServiceError(
                422, "bad_threshold", f"margin must be a finite number, got {self.margin}"
            )
        if not 0.0 <= self.percentile <= 100.0:
            raise ServiceError(
                422, "bad_threshold", f"percentile must be in [0, 100], got {self.percentile}"
            )
        if self.margin <= 0:
            raise ServiceError(422, "bad_threshold", f"margin must be > 0, got {self.margin}")


@dataclass
class Profile:
    """A stored inspection profile.

    Attributes:
        name: unique name (lower case letters, digits, ``-``, ``_``).
        uid: random id of this incarnation (a re-created name gets a new one).
        method: detector name from the registry.
        options: detector constructor options (backbone, weights, image_size, ...).
        learning_type: the method's learning type.
        normals: sha256 of the normal images (file ``normals/<sha>.png``).
        normal_names: the uploaded file names, for display.
        threshold: ``Threshold.to_dict()``.
        policy: the threshold policy it was made with.
        created_at: ISO time (UTC).
        category: optional object name given to ``fit`` (methods whose prompts name the
            object use it, e.g. WinCLIP; the others ignore it).
    """

    name: str
    uid: str
    method: str
    options: dict[str, Any]
    learning_type: str
    normals: list[str]
    normal_names: list[str]
    threshold: dict[str, Any]
    policy: dict[str, Any]
    created_at: str
    detector_config: dict[str, Any] = field(default_factory=dict)
    category: str | None = None

    def make_detector(self) -> Detector:
        """A new detector with the profile's options; weight names resolve in the cache only."""
        from anomalens.backbones.weights import names_in_cache_only

        with names_in_cache_only():
            return create_detector(self.method, **self.options)

    def threshold_obj(self) -> Threshold:
        """The stored threshold; a non-finite value (a hand-edited file) is refused.

        Raises:
            ServiceError: 409 ``bad_profile`` naming the profile and the value.
        """
        d = dict(self.threshold)
        for key in ("value", "pixel_value"):
            v = d.get(key)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ServiceError(
                    409,
                    "bad_profile",
                    f"profile {self.name!r} has a non-finite threshold {key}={v!r} in its "
                    "profile.json; delete and re-create the profile",
                )
        vr = d.get("vis_range")
        d["vis_range"] = tuple(vr) if vr is not None else None
        return Threshold(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Options that name weight files. Over the network they may only be *names* (a catalogue name,
#: an open_clip tag, ``random``, or a file name inside the server's weight cache): never a path,
#: URL or hf-hub id, so that a client cannot make the server read or fetch arbitrary locations.
WEIGHT_OPTIONS = ("weights", "checkpoint", "pretrained")
_WEIGHT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def _check_weight_names(options: dict[str, Any]) -> None:
    for key in WEIGHT_OPTIONS:
        value = options.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not _WEIGHT_NAME.fullmatch(value) or ".." in value:
            raise ServiceError(
                422,
                "bad_option",
                f"option {key!r} must be a weight name (catalogue name, open_clip tag, 'random', "
                "or a file name in the server's weight cache), not a path or URL; "
                f"got {value!r}",
            )


def check_method_options(method: str, options: dict[str, Any]) -> type[Detector]:
    """The detector class of ``method``; unknown names and options raise a 422 naming them."""
    _check_weight_names(options)
    try:
        cls = get_detector_class(method)
    except KeyError as exc:
        raise ServiceError(422, "unknown_method", str(exc.args[0])) from None
    try:
        check_options(method, options)
    except ValueError as exc:
        raise ServiceError(422, "bad_option", str(exc)) from None
    return cls


class ProfileStore:
    """Profiles in ``<root>``; creation and deletion are serialised by a lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._cleanup_leftovers()

    def _cleanup_leftovers(self) -> None:
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ reads
    def _dir(self, name: str) -> Path:
        if not _NAME_RE.fullmatch(name):
            raise ServiceError(
                422,
                "bad_name",
                f"profile name {name!r} is invalid: use 1-64 lower case letters, digits, '-' or '_' "
                "starting with a letter or digit",
            )
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self._dir(name) / "profile.json").is_file()

    def get(self, name: str) -> Profile:
        """The profile called ``name``; 404 when there is none."""
        path = self._dir(name) / "profile.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ServiceError(404, "not_found", f"no profile named {name!r}") from None
        return Profile(**data)

    def list(self) -> list[Profile]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and _NAME_RE.fullmatch(d.name) and (d / "profile.json").is_file():
                try:
                    out.append(self.get(d.name))
                except (ServiceError, ValueError, TypeError) as exc:
                    log.warning("skipping unreadable profile %s: %s", d, exc)
        return out

    def normal_paths(self, profile: Profile) -> builtins.list[Path]:
        d = self._dir(profile.name) / "normals"
        return [d / f"{sha}.png" for sha in profile.normals if _SHA_RE.fullmatch(sha)]

    def model_path(self, profile: Profile) -> Path | None:
        """The profile's saved model file, or None (older profiles: refit from the normals)."""
        p = self._dir(profile.name) / MODEL_FILE
        return p if p.is_file() else None

    def load_normals(self, profile: Profile) -> builtins.list[np.ndarray]:
        """The stored normal images as (H, W, 3) uint8 arrays."""
        return [load_image(p) for p in self.normal_paths(profile)]

    # ------------------------------------------------------------------ writes
    def create(
        self,
        name: str,
        method: str,
        options: dict[str, Any],
        images: Sequence[DecodedImage],
        policy: ThresholdPolicy,
        category: str | None = None,
    ) -> tuple[Profile, Detector]:
        """Fit, calibrate and store a new profile (all or nothing).

        Returns:
            the profile and its fitted detector (for the in-memory cache).

        Raises:
            ServiceError: 409 if the name exists; 422 for an unknown method or option, too few
                normal images for the method or the threshold policy, or a detector that cannot
                be built (e.g. weights not available offline).
        """
        target = self._dir(name)
        policy.check()
        cls = check_method_options(method, options)
        uniq: dict[str, DecodedImage] = {}
        for im in images:
            uniq.setdefault(im.sha256, im)
        shots = list(uniq.values())
        if category is not None and not category.strip():
            category = None
        if cls.needs_normal_images() and not shots:
            raise ServiceError(
                422,
                "needs_normals",
                f"{method} is a few-shot method: upload at least one normal image",
            )
        if policy.mode == "leave-one-out":
            need = max(cls.min_batch, 1 if not cls.uses_normal_images else 2)
            if len(shots) < need:
                raise ServiceError(
                    422,
                    "needs_normals",
                    f"a leave-one-out threshold needs at least {need} distinct normal image(s) "
                    f"(got {len(shots)}); upload more or choose a fixed threshold",
                )
        with self._lock:
            if self.exists(name):
                raise ServiceError(409, "exists", f"a profile named {name!r} already exists")

        def make() -> Detector:
            from anomalens.backbones.weights import names_in_cache_only

            try:
                with names_in_cache_only():
                    return create_detector(method, **options)
            except Exception as exc:  # any constructor failure is the user's settings
                raise ServiceError(422, "bad_detector", f"cannot build {method}: {exc}") from exc

        arrays = [im.array for im in shots]
        detector = make()
        use_shots = cls.uses_normal_images and bool(arrays)
        try:
            detector.fit(arrays if use_shots else None, category=category)
            if policy.mode == "fixed":
                thr = fixed_threshold(float(policy.value))  # type: ignore[arg-type]
            else:
                thr = calibrate_leave_one_out(
                    make,
                    arrays,
                    percentile=policy.percentile,
                    margin=policy.margin,
                    category=category,
                )
        except ServiceError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise ServiceError(422, "fit_failed", f"cannot fit {method}: {exc}") from exc
        if not all(math.isfinite(v) for v in (thr.value, thr.pixel_value) if v is not None):
            raise ServiceError(
                422,
                "bad_threshold",
                f"the calibrated threshold of {method} is not finite ({thr.value}); check the "
                "normal images and the method's options",
            )

        profile = Profile(
            name=name,
            uid=uuid.uuid4().hex,
            method=method,
            options=dict(options),
            learning_type=cls.learning_type.value,
            normals=[im.sha256 for im in shots],
            normal_names=[im.file_name for im in shots],
            threshold=thr.to_dict(),
            policy=asdict(policy),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            detector_config=detector.config(),
            category=category,
        )
        with self._lock:
            if self.exists(name):
                raise ServiceError(409, "exists", f"a profile named {name!r} already exists")
            tmp = self.root / f".tmp-{profile.uid}"
            try:
                for im in shots:
                    atomic_save_png(tmp / "normals" / f"{im.sha256}.png", im.array)
                _save_model(detector, tmp / MODEL_FILE, thr)
                atomic_write_json(tmp / "profile.json", profile.to_dict())
                os.rename(tmp, target)  # the commit point
                _fsync_dir(self.root)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return profile, detector

    def create_from_model(self, name: str, data: bytes) -> tuple[Profile, Detector]:
        """A profile from an uploaded model file (``anomalens fit --out NAME.anomalens``).

        The file is validated by loading it (format, checksums, tensors, backbone weights).
        Weight options of a model whose backbone is not embedded must be weight *names*, as
        for :meth:`create`.

        Raises:
            ServiceError: 409 if the name exists; 422 for a file that is not a valid model,
                a model without a threshold (and no method default), or weights not allowed.
        """
        from anomalens.model_file import ModelFileError, load_model, read_model_info

        target = self._dir(name)
        with self._lock:
            if self.exists(name):
                raise ServiceError(409, "exists", f"a profile named {name!r} already exists")
        uid = uuid.uuid4().hex
        tmp = self.root / f".tmp-{uid}"
        try:
            tmp.mkdir(parents=True)
            model = tmp / MODEL_FILE
            model.write_bytes(data)
            try:
                info = read_model_info(model)
                if not info["backbone"]["embedded"]:
                    _check_weight_names(
                        {k: v for k, v in info["init_options"].items() if k != "checkpoint"}
                    )
                saved = load_model(model)
            except ModelFileError as exc:
                raise ServiceError(
                    422, "bad_model", str(exc).replace(str(model), "the uploaded model")
                ) from None
            except (OSError, ValueError, RuntimeError) as exc:
                raise ServiceError(422, "bad_model", f"cannot load the model: {exc}") from None
            detector = saved.detector
            thr = saved.threshold
            if thr is None:
                if detector.default_threshold is None:
                    raise ServiceError(
                        422,
                        "bad_model",
                        "the model has no threshold; fit it with a threshold "
                        "(anomalens fit sets one unless the method scores whole batches)",
                    )
                thr = fixed_threshold(detector.default_threshold).to_dict()
            profile = Profile(
                name=name,
                uid=uid,
                method=detector.name,
                options=dict(info["init_options"]),
                learning_type=detector.learning_type.value,
                normals=[],
                normal_names=[],
                threshold=thr,
                policy={"mode": "model-file", "value": thr["value"]},
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                detector_config=detector.config(),
                category=detector.category,
            )
            atomic_write_json(tmp / "profile.json", profile.to_dict())
            with self._lock:
                if self.exists(name):
                    raise ServiceError(409, "exists", f"a profile named {name!r} already exists")
                os.rename(tmp, target)  # the commit point
                _fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return profile, detector

    def delete(self, name: str) -> Profile:
        """Remove a profile (its results stay in the history). 404 when there is none."""
        with self._lock:
            profile = self.get(name)
            trash = self.root / f".trash-{profile.uid}"
            os.rename(self._dir(name), trash)  # gone in one step
            shutil.rmtree(trash, ignore_errors=True)
        return profile


def _save_model(detector: Detector, path: Path, threshold: Threshold) -> None:
    """Save the fitted detector with the profile; a detector that cannot be saved (a custom
    method without model-file support) is refitted after a restart instead."""
    from anomalens.model_file import ModelFileError

    try:
        detector.save(path, threshold=threshold)
    except (ModelFileError, NotImplementedError) as exc:
        log.warning("profile model not saved, it will be refitted after a restart: %s", exc)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
