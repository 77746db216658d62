"""Frozen torchvision CNNs as multi-layer feature extractors (PatchCore, MVG).

``create_cnn_backbone("mobilenet_v2_tf", weights="../shared/weights/....safetensors")`` builds
the architecture of a preset (``anomalens.backbones.presets``), loads weights through
``load_cnn_state_dict`` (the one place that turns a ``weights`` argument into tensors), optionally
switches the stride-2 convolutions to TensorFlow "SAME" padding, and returns a
``CNNFeatureExtractor`` that maps (B, 3, H, W) images to a list of (B, C_l, h_l, w_l) maps
(``extractor(x)``) or to patch tokens (``extractor.extract(x)``, the
:class:`~anomalens.backbones.protocol.PatchFeatureExtractor` contract).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from anomalens.backbones.presets import CNNPreset, get_cnn_preset
from anomalens.backbones.protocol import PatchFeatures, maps_to_patch_features
from anomalens.backbones.weights import resolve_weights
from anomalens.data.io import ImageLike
from anomalens.data.transforms import to_batch

__all__ = [
    "PRESET_METADATA_KEY",
    "RANDOM_WEIGHTS",
    "CNNFeatureExtractor",
    "TFSameConv2d",
    "apply_tf_padding",
    "check_weights_preset",
    "cnn_extractor",
    "create_cnn_backbone",
    "load_cnn_state_dict",
    "preset_metadata",
    "read_state_dict",
    "weights_preprocessing",
]

#: ``weights`` value that keeps a seeded random initialisation (for tests only: the features
#: of an untrained network carry no useful information about anomalies).
RANDOM_WEIGHTS = "random"
_ENUM_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
#: safetensors metadata key naming the preset (preprocessing) a weight file expects; written into
#: the files anomalens writes (``preset_metadata``) and checked on load.
PRESET_METADATA_KEY = "anomalens_preset"
#: Weight files known without metadata of ours: sha256 -> (size in bytes, preset they expect).
_KNOWN_WEIGHTS: dict[str, tuple[int, str]] = {
    # ../shared/weights/mobilenet_v2_imagenet_int8dequant.safetensors (TFLite-derived, [-1, 1])
    "66bbbb4a01d98f92fe9c2e5e20d234bb243c3a3f7033c0a8d47d55acae794555": (
        14_187_728,
        "mobilenet_v2_tf",
    ),
}
_MINUS_ONE_ONE = re.compile(r"\[\s*-\s*1(\.0*)?\s*,\s*1(\.0*)?\s*\]")


def preset_metadata(preset: CNNPreset) -> dict[str, str]:
    """safetensors metadata recording the preprocessing a weight file expects.

    Returns:
        ``{"anomalens_preset": name, "anomalens_mean": ..., "anomalens_std": ...}``.
    """
    return {
        PRESET_METADATA_KEY: preset.name,
        "anomalens_mean": ",".join(f"{v:.8g}" for v in preset.mean),
        "anomalens_std": ",".join(f"{v:.8g}" for v in preset.std),
    }


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_preprocessing(path: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """What input scaling a weight file expects, when the file says so or is a known one.

    Reads only the safetensors header (metadata), and hashes the file only when its size is
    that of a known file.

    Returns:
        (preset name or None, ``"[-1,1]"`` when the metadata says inputs are scaled to [-1, 1],
        else None).
    """
    p = Path(path)
    preset: str | None = None
    scaling: str | None = None
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # unreadable header: read_state_dict reports it with the file name
            meta = {}
        preset = meta.get(PRESET_METADATA_KEY) or None
        if _MINUS_ONE_ONE.search(meta.get("preprocessing", "")):
            scaling = "[-1,1]"
    if preset is None:
        try:
            size = p.stat().st_size
        except OSError:
            return None, scaling
        if any(size == n for n, _ in _KNOWN_WEIGHTS.values()):
            known = _KNOWN_WEIGHTS.get(_file_sha256(p))
            preset = known[1] if known else None
    return preset, scaling


def check_weights_preset(preset: CNNPreset, path: str | os.PathLike[str]) -> str | None:
    """Warn when a weight file expects other preprocessing than ``preset`` gives it.

    A file that names its preset (``anomalens_preset`` metadata, or a known file by sha256)
    with another mean/std, or whose metadata says inputs are scaled to [-1, 1] while the
    preset normalises otherwise, gets a ``UserWarning`` naming the preset to use.

    Returns:
        The warning text, or None when nothing is wrong or nothing is known.
    """
    expected, scaling = weights_preprocessing(path)
    msg: str | None = None
    if expected is not None and expected != preset.name:
        try:
            other = get_cnn_preset(expected)
        except (KeyError, ValueError):
            other = None
        if other is None or (other.mean, other.std) != (preset.mean, preset.std):
            msg = (
                f"weights {os.fspath(path)} were made for backbone preset {expected!r}, but "
                f"{preset.name!r} feeds them inputs normalised with mean {preset.mean} and "
                f"std {preset.std}: features will be wrong. Use --backbone {expected}"
            )
    elif (
        expected is None
        and scaling == "[-1,1]"
        and (preset.mean != (0.5, 0.5, 0.5) or preset.std != (0.5, 0.5, 0.5))
    ):
        msg = (
            f"weights {os.fspath(path)} expect inputs scaled to [-1, 1] (their metadata says "
            f"so), but backbone preset {preset.name!r} normalises with mean {preset.mean} and "
            f"std {preset.std}: features will be wrong. Use a [-1, 1] preset "
            "(e.g. --backbone mobilenet_v2_tf)"
        )
    if msg is not None:
        warnings.warn(msg, UserWarning, stacklevel=3)
    return msg


class TFSameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed from the input size at run time.

    For a stride-2 3x3 convolution on an even-sized input, TF pads 0 pixels top/left and 1
    bottom/right, where PyTorch's ``padding=1`` pads 1 on every side; the two outputs are then
    shifted by one input pixel. Parameter names are those of ``nn.Conv2d`` (state dicts load
    unchanged).
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> TFSameConv2d:
        """Same weights and settings as ``conv``, with SAME padding instead of its own."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("TF SAME padding needs a zero-padded Conv2d with integer padding")
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=0,
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        return new

    def _same_pad(self, size: int, axis: int) -> tuple[int, int]:
        k = (self.kernel_size[axis] - 1) * self.dilation[axis] + 1
        s = self.stride[axis]
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._same_pad(int(x.shape[-2]), 0)
        left, right = self._same_pad(int(x.shape[-1]), 1)
        return super().forward(F.pad(x, (left, right, top, bottom)))


def apply_tf_padding(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Replace convolutions of ``model`` in place by ``TFSameConv2d``.

    Args:
        model: a torchvision network.
        names: module names to convert; default: every Conv2d with a stride > 1 and a kernel
            > 1 (for MobileNetV2: ``features.0.0`` and ``features.{2,4,7,14}.conv.1.0``).

    Returns:
        The converted module names.
    """
    modules = dict(model.named_modules())
    if names is None:
        names = [
            n
            for n, m in modules.items()
            if isinstance(m, nn.Conv2d)
            and not isinstance(m, TFSameConv2d)
            and max(m.stride) > 1
            and max(m.kernel_size) > 1
        ]
    for name in names:
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"tf_padding: {name!r} is not a Conv2d of the model")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, TFSameConv2d.from_conv(conv))
    return list(names)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file: ``.safetensors`` or a torch pickle read with ``weights_only=True``.

    A checkpoint that wraps its weights in ``{"state_dict": ...}`` or ``{"model": ...}`` is
    unwrapped, and a ``module.`` prefix (DataParallel) is removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from anomalens.backbones.weights import read_safetensors

        sd: object = read_safetensors(path, "checkpoint")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(sd, dict):
        for key in ("state_dict", "model"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_cnn_state_dict(
    preset: CNNPreset, weights: str | os.PathLike[str] | None
) -> dict[str, torch.Tensor] | None:
    """Turn a ``weights`` argument into a state dict (the one weight path of the CNN backbones).

    Args:
        preset: the backbone preset (its ``arch`` and ``default_weights``).
        weights: one of
            * ``None``: the preset's default, via ``resolve_weights`` (catalogue name or cached
              file; offline and uncached: ``WeightNotAvailableError`` naming the file);
            * a torchvision weight enum name of the architecture (``"IMAGENET1K_V1"``),
              downloaded once into the anomalens cache from the enum's URL;
            * a local file path (``.safetensors``, ``.pth``/``.pt``), URL, ``hf-hub:`` id or
              catalogue name (anything ``resolve_weights`` accepts);
            * ``"random"``: no weights, keep the seeded random initialisation (tests only).

    Returns:
        The state dict, or None for ``"random"``.
    """
    weights = os.fspath(weights) if weights is not None else None
    if weights == RANDOM_WEIGHTS:
        return None
    source: str
    if weights is None:
        if preset.default_weights is None:
            raise ValueError(
                f"backbone {preset.name!r} has no default weights: pass weights=PATH "
                "(or 'random' for tests)"
            )
        source = preset.default_weights
    elif _ENUM_NAME.match(weights) and not Path(weights).exists():
        enum_cls = torchvision.models.get_model_weights(preset.arch)
        try:
            source = enum_cls[weights].url
        except KeyError:
            raise ValueError(
                f"{weights!r} is not a torchvision weight of {preset.arch}. Available: "
                f"{', '.join(e.name for e in enum_cls)}"
            ) from None
    else:
        source = weights
    path = resolve_weights(source)
    check_weights_preset(preset, path)
    return read_state_dict(path)


class CNNFeatureExtractor(nn.Module):
    """A frozen CNN that returns the feature maps of named layers.

    The network is truncated after the last requested layer (torchvision FX feature
    extraction: no hooks), kept in eval mode (BatchNorm statistics frozen) and has no
    trainable parameter.

    Attributes:
        preset: preprocessing and defaults of the backbone.
        layers: module names of the returned maps, in the order returned.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        preset: CNNPreset,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if not layers:
            raise ValueError("at least one feature layer is needed")
        names = dict(model.named_modules())
        unknown = [layer for layer in layers if layer not in names or layer == ""]
        if unknown:
            top = sorted({n.split(".")[0] for n in names if n})
            raise ValueError(
                f"unknown layer(s) {unknown} for backbone {preset.name!r}; module names look "
                f"like {', '.join(top)} (e.g. 'layer2', 'features.6')"
            )
        self.preset = preset
        self.layers = tuple(layers)
        #: the weights it was built with, as given (None: the preset's default)
        self.weights = weights
        self.body = create_feature_extractor(
            model,
            return_nodes={layer: layer for layer in self.layers},
            tracer_kwargs={"leaf_modules": [TFSameConv2d]},
        )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> CNNFeatureExtractor:
        """Always stays in eval mode (frozen BatchNorm); ``mode`` is ignored."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the requested layers.

        Args:
            x: (B, 3, H, W) normalised images (see ``preprocess``).

        Returns:
            list of (B, C_l, h_l, w_l) maps, in the order of ``layers``.
        """
        out = self.body(x)
        return [out[layer] for layer in self.layers]

    @torch.no_grad()
    def extract(self, x: torch.Tensor) -> PatchFeatures:
        """The feature maps as patch tokens (the :class:`PatchFeatureExtractor` contract).

        Args:
            x: (B, 3, H, W) normalised images (see ``preprocess``).

        Returns:
            :class:`PatchFeatures`: per layer (B, h_l * w_l, C_l) tokens and (h_l, w_l) grids;
            embedding (B, C_last) = spatial mean of the last map.
        """
        return maps_to_patch_features(self(x))

    def preprocess(self, images: Sequence[ImageLike], size: int) -> torch.Tensor:
        """Resize (squash) to size x size and normalise with the preset's mean/std.

        Returns:
            (B, 3, size, size) float32 on the CPU.
        """
        p = self.preset
        return to_batch(images, size, p.mean, p.std, p.interpolation)

    def describe(self) -> dict[str, object]:
        """Backbone settings that determine the features (for results files)."""
        p = self.preset
        return {
            "backbone": p.name,
            "layers": list(self.layers),
            "tf_padding": p.tf_padding,
            "mean": list(p.mean),
            "std": list(p.std),
            "interpolation": p.interpolation,
        }

    def feature_info(self, size: int = 224) -> list[tuple[int, int]]:
        """(channels, stride) of each layer, measured with a zero image of ``size``."""
        dev = next(self.parameters()).device
        feats = self(torch.zeros(1, 3, size, size, device=dev))
        return [(int(f.shape[1]), round(size / f.shape[-1])) for f in feats]


def create_cnn_backbone(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    layers: Sequence[str] | None = None,
    tf_padding: bool | None = None,
    seed: int = 0,
) -> CNNFeatureExtractor:
    """Build a frozen feature extractor from a preset.

    Args:
        name: preset name (``anomalens.backbones.presets.list_cnn_presets()``).
        weights: see ``load_cnn_state_dict`` (None = the preset's default pretrained weights).
        layers: feature layers (default: the preset's).
        tf_padding: TensorFlow SAME padding on the stride-2 convs (default: the preset's;
            True for ``mobilenet_v2_tf``). Use it with weights converted from TensorFlow.
        seed: seed of the random initialisation (only matters for ``weights="random"``).

    Raises:
        WeightNotAvailableError: the weights are not on disk / cached and cannot be fetched.
        ValueError: unknown layer, or a checkpoint that does not fit the architecture.
    """
    preset = get_cnn_preset(name)
    state = load_cnn_state_dict(preset, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(preset.arch, weights=None)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"weights {os.fspath(weights) if weights else preset.default_weights!r} do not fit the {preset.arch} "
                f"architecture of backbone {name!r}: {str(exc)[:500]}"
            ) from exc
    use_tf = preset.tf_padding if tf_padding is None else tf_padding
    if use_tf:
        apply_tf_padding(model)
    preset = preset.with_overrides(tf_padding=use_tf, layers=tuple(layers) if layers else None)
    return CNNFeatureExtractor(
        model.eval(), preset.layers, preset, None if weights is None else os.fspath(weights)
    )


def cnn_extractor(
    backbone: str | CNNFeatureExtractor,
    *,
    weights: str | os.PathLike[str] | None = None,
    layers: Sequence[str] | None = None,
    tf_padding: bool | None = None,
    device: str | torch.device = "cpu",
) -> CNNFeatureExtractor:
    """A detector's CNN extractor: a ready one as given, else ``create_cnn_backbone(...)``,
    moved to ``device``."""
    if not isinstance(backbone, CNNFeatureExtractor):
        backbone = create_cnn_backbone(
            backbone, weights=weights, layers=layers, tf_padding=tf_padding
        )
    return backbone.to(device)
