"""Inferencers for exported models: numpy + Pillow + onnxruntime / openvino, no torch.

Nothing here may import torch (``tests/unit/test_export_inference.py`` runs this module in a
subprocess where importing torch fails).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "InferenceResult",
    "Inferencer",
    "MetadataError",
    "OnnxInferencer",
    "OpenVinoInferencer",
    "load_inferencer",
    "read_metadata",
]

METADATA_FILE = "metadata.json"
METADATA_FORMAT = "anomalens-export"
#: Newest metadata format version this reader understands (anomalens.export writes it).
METADATA_VERSION = 1
_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
_REQUIRED = ("format", "format_version", "method", "runtime", "model_file", "image_size", "input")


class MetadataError(ValueError):
    """An exported model folder is missing, incomplete or from a newer anomalens."""


def _image_io() -> ModuleType:
    """``anomalens.data.io`` (numpy + Pillow only), loaded without ``anomalens.data``'s
    ``__init__`` (which imports the torch-based readers): the exported path reads images with
    exactly the code the PyTorch path uses."""
    name = "anomalens.data.io"
    if name in sys.modules:
        return sys.modules[name]
    alias = "anomalens.inference._image_io"
    if alias in sys.modules:
        return sys.modules[alias]
    path = Path(__file__).resolve().parents[1] / "data" / "io.py"
    spec = importlib.util.spec_from_file_location(alias, path)
    if spec is None or spec.loader is None:  # pragma: no cover - broken installation
        raise ImportError(f"cannot load the image reader {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def read_metadata(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``metadata.json`` of an exported model folder.

    Raises:
        MetadataError: no folder / metadata, invalid JSON, missing keys, another format, or a
            format version newer than this anomalens reads.
    """
    folder = Path(model_dir)
    path = folder / METADATA_FILE
    if not folder.is_dir():
        raise MetadataError(
            f"{folder} is not a folder: give the folder written by `anomalens export`"
        )
    if not path.is_file():
        raise MetadataError(f"{path} is missing: {folder} is not an exported anomalens model")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetadataError(f"{path} is not valid JSON ({exc}); export the model again") from exc
    if not isinstance(meta, dict):
        raise MetadataError(f"{path} must hold a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise MetadataError(f"{path} lacks {', '.join(missing)}; export the model again")
    if meta["format"] != METADATA_FORMAT:
        raise MetadataError(f"{path}: format {meta['format']!r} is not {METADATA_FORMAT!r}")
    version = meta["format_version"]
    if not isinstance(version, int) or version < 1:
        raise MetadataError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > METADATA_VERSION:
        raise MetadataError(
            f"{path} has format version {version}, newer than this anomalens reads "
            f"({METADATA_VERSION}): upgrade anomalens (pip install -U anomalens)"
        )
    model = folder / str(meta["model_file"])
    if not model.is_file():
        raise MetadataError(f"{model} is missing (named by {path}); export the model again")
    return meta


@dataclass
class InferenceResult:
    """Outputs of an exported model for N images.

    Attributes:
        image_score: (N,) float32, higher = more anomalous.
        anomaly_map: (N, S, S) float32 at the model's working size S.
        decisions: ``"anomalous"`` / ``"normal"`` per image at the saved threshold, or None
            when the model was exported without a threshold.
    """

    image_score: np.ndarray
    anomaly_map: np.ndarray
    decisions: list[str] | None


class Inferencer:
    """Base of the runtime-specific inferencers: metadata, preprocessing, batching, decisions.

    Args:
        model_dir: folder written by ``anomalens.export.export_detector``.
        num_threads: CPU threads of the runtime (None: the runtime's default).
    """

    runtime: str = ""

    def __init__(self, model_dir: str | os.PathLike[str], num_threads: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.metadata = read_metadata(self.model_dir)
        if self.metadata["runtime"] != self.runtime:
            raise MetadataError(
                f"{self.model_dir} holds a {self.metadata['runtime']} model, not {self.runtime}: "
                "use load_inferencer() to pick the right runtime"
            )
        self.model_path = self.model_dir / str(self.metadata["model_file"])
        self.image_size = int(self.metadata["image_size"])
        prep = self.metadata.get("preprocessing", {})
        self.interpolation = str(prep.get("interpolation", "bilinear"))
        if self.interpolation not in _PIL_FILTERS:
            raise MetadataError(
                f"{self.model_dir / METADATA_FILE}: unknown interpolation {self.interpolation!r}"
            )
        self.threshold: dict[str, Any] | None = self.metadata.get("threshold")
        self.input_name = str(self.metadata["input"].get("name", "images"))
        self._load(num_threads)

    @property
    def method(self) -> str:
        return str(self.metadata["method"])

    # ------------------------------------------------------------------ preprocessing
    def read_image(self, image: Any) -> np.ndarray:
        """An image (path, PIL image or array) as (H, W, 3) uint8 RGB, read as the PyTorch path
        reads it (``anomalens.data.io.as_rgb_array``)."""
        return _image_io().as_rgb_array(image)

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (S, S, 3) uint8 squash-resize with the model's PIL filter (the
        same call as ``anomalens.data.transforms.to_batch``)."""
        s = self.image_size
        if rgb.shape[:2] == (s, s):
            return rgb
        return np.asarray(Image.fromarray(rgb).resize((s, s), _PIL_FILTERS[self.interpolation]))

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """Images -> (N, S, S, 3) uint8, the graph's input."""
        out = np.empty((len(images), self.image_size, self.image_size, 3), dtype=np.uint8)
        for i, im in enumerate(images):
            out[i] = self.resize(self.read_image(im))
        return out

    # ------------------------------------------------------------------ running
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph on (N, S, S, 3) uint8 images.

        Returns:
            image_score (N,), anomaly_map (N, S, S), float32.
        """
        s = self.image_size
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (s, s, 3):
            raise ValueError(
                f"expected a (N, {s}, {s}, 3) uint8 batch, got {batch.shape} {batch.dtype}"
            )
        score, amap = self._run(np.ascontiguousarray(batch))
        return np.asarray(score, dtype=np.float32), np.asarray(amap, dtype=np.float32)

    def decide(self, score: float) -> str | None:
        """``anomalous`` / ``normal`` at the saved threshold (score > value), or None."""
        if self.threshold is None:
            return None
        return "anomalous" if float(score) > float(self.threshold["value"]) else "normal"

    @property
    def pixel_threshold(self) -> float | None:
        """The anomaly-map value above which a pixel is in the predicted mask, or None."""
        if self.threshold is None:
            return None
        pv = self.threshold.get("pixel_value")
        return float(self.threshold["value"] if pv is None else pv)

    def predict(self, images: Sequence[Any], batch_size: int = 8) -> InferenceResult:
        """Score images (paths, PIL images or arrays) in batches of ``batch_size``."""
        images = list(images)
        if not images:
            raise ValueError("predict() got no image")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        scores, maps = [], []
        for s in range(0, len(images), batch_size):
            sc, mp = self.run(self.preprocess(images[s : s + batch_size]))
            scores.append(sc)
            maps.append(mp)
        score = np.concatenate(scores)
        decisions = None if self.threshold is None else [str(self.decide(v)) for v in score]
        return InferenceResult(score, np.concatenate(maps), decisions)

    # ------------------------------------------------------------------ for subclasses
    def _load(self, num_threads: int | None) -> None:
        raise NotImplementedError

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


def _need(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is needed to run this model: pip install 'anomalens[{extra}]' ({exc})"
        ) from exc


class OnnxInferencer(Inferencer):
    """Run an ``onnx`` export with onnxruntime (CPU by default).

    Args:
        model_dir: the exported folder.
        num_threads: intra-op threads (None: onnxruntime's default).
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).
    """

    runtime = "onnx"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        num_threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        super().__init__(model_dir, num_threads)

    def _load(self, num_threads: int | None) -> None:
        ort = _need("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        if num_threads is not None:
            opts.intra_op_num_threads = int(num_threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(self.model_path), opts, providers=self.providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise MetadataError(
                f"cannot load {self.model_path}: {exc}; the file is corrupt or truncated, "
                "export the model again"
            ) from exc
        self._outputs = [o["name"] for o in self.metadata["outputs"]]

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, amap = self.session.run(self._outputs, {self.input_name: batch})
        return score, amap


class OpenVinoInferencer(Inferencer):
    """Run an ``openvino`` export (IR ``model.xml`` + ``model.bin``).

    The CPU plugin is asked for float32 inference (``INFERENCE_PRECISION_HINT=f32``): its
    default on CPUs with bf16 units is bfloat16, which moved PatchCore scores by ~0.2 in our
    check. Pass ``config`` to override.

    Args:
        model_dir: the exported folder.
        num_threads: inference threads (None: OpenVINO's default).
        device: OpenVINO device name (``CPU``, ``GPU``, ...).
        config: extra compile properties.
    """

    runtime = "openvino"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        num_threads: int | None = None,
        device: str = "CPU",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.device = device
        self.config = dict(config or {})
        super().__init__(model_dir, num_threads)

    def _load(self, num_threads: int | None) -> None:
        ov = _need("openvino", "openvino")
        cfg: dict[str, Any] = {}
        if self.device == "CPU":
            precision = "f16" if self.metadata.get("precision") == "fp16" else "f32"
            cfg["INFERENCE_PRECISION_HINT"] = precision
            if num_threads is not None:
                cfg["INFERENCE_NUM_THREADS"] = int(num_threads)
        cfg.update(self.config)
        try:
            self.compiled = ov.Core().compile_model(str(self.model_path), self.device, cfg)
        except Exception as exc:  # openvino raises RuntimeError subclasses
            raise MetadataError(
                f"cannot load {self.model_path}: {exc}; the file is corrupt or truncated, "
                "export the model again"
            ) from exc
        names = [o["name"] for o in self.metadata["outputs"]]
        self._outputs = [self.compiled.output(n) for n in names]

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = self.compiled({self.input_name: batch})
        return res[self._outputs[0]], res[self._outputs[1]]


def load_inferencer(model_dir: str | os.PathLike[str], **kwargs: Any) -> Inferencer:
    """The inferencer for an exported folder, chosen by its ``metadata.json`` runtime.

    Raises:
        MetadataError: not an exported folder, or a runtime without a torch-free inferencer
            (``torchscript`` exports run with ``torch.jit.load``).
    """
    meta = read_metadata(model_dir)
    classes: dict[str, type[Inferencer]] = {"onnx": OnnxInferencer, "openvino": OpenVinoInferencer}
    cls = classes.get(str(meta["runtime"]))
    if cls is None:
        raise MetadataError(
            f"{model_dir} holds a {meta['runtime']!r} model; inferencers exist for "
            f"{', '.join(classes)} (a torchscript export runs with torch.jit.load)"
        )
    return cls(model_dir, **kwargs)
