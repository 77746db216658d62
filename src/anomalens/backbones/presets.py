"""CNN backbone presets as data: architecture, default feature layers and preprocessing.

A preset says how to feed images to a pretrained CNN and which layers to read. Two presets may
share one torchvision architecture with different weights and preprocessing: ``mobilenet_v2``
(torchvision's own ImageNet weights, ImageNet mean/std, PyTorch padding) and ``mobilenet_v2_tf``
(weights converted from TensorFlow/Keras, such as the team's
``mobilenet_v2_imagenet_int8dequant.safetensors``: inputs scaled to [-1, 1] and TensorFlow
"SAME" padding on the stride-2 convolutions). Nothing is guessed from a weight file's name:
pick the preset that matches the file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from anomalens.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CNN_PRESETS", "CNNPreset", "get_cnn_preset", "list_cnn_presets"]


@dataclass(frozen=True)
class CNNPreset:
    """How to build, load and feed one CNN backbone.

    Attributes:
        name: preset name (``--backbone``).
        arch: torchvision model builder (``torchvision.models.get_model`` name).
        layers: default feature layers (module names), finest first.
        mean: per-channel mean of the input normalisation (RGB, on [0, 1] pixels).
        std: per-channel std of the input normalisation.
        input_size: native square input size of the pretrained weights.
        interpolation: resize filter (``bilinear`` / ``bicubic``).
        default_weights: what ``weights=None`` resolves: a catalogue name
            (``anomalens weights list``) or a bare file name looked up in the cache folder.
        tf_padding: wrap the stride-2 3x3 convolutions with TensorFlow "SAME" padding.
        description: one line for listings.
    """

    name: str
    arch: str
    layers: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    interpolation: str = "bilinear"
    default_weights: str | None = None
    tf_padding: bool = False
    description: str = ""

    def with_overrides(self, **changes: Any) -> CNNPreset:
        """Copy with some fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_TF_MEAN_STD = (0.5, 0.5, 0.5)

CNN_PRESETS: dict[str, CNNPreset] = {
    p.name: p
    for p in (
        CNNPreset(
            name="wide_resnet50_2",
            arch="wide_resnet50_2",
            layers=("layer2", "layer3"),
            default_weights="wide_resnet50_2",
            description="WideResNet-50-2, torchvision ImageNet weights; PatchCore paper default",
        ),
        CNNPreset(
            name="resnet18",
            arch="resnet18",
            layers=("layer2", "layer3"),
            default_weights="resnet18",
            description="ResNet-18, torchvision ImageNet weights (fast)",
        ),
        CNNPreset(
            name="resnet50",
            arch="resnet50",
            layers=("layer2", "layer3"),
            default_weights="resnet50",
            description="ResNet-50, torchvision ImageNet weights",
        ),
        CNNPreset(
            name="mobilenet_v2",
            arch="mobilenet_v2",
            layers=("features.6", "features.13"),
            default_weights="mobilenet_v2",
            description="MobileNetV2, torchvision ImageNet weights (ImageNet mean/std)",
        ),
        CNNPreset(
            name="mobilenet_v2_tf",
            arch="mobilenet_v2",
            layers=("features.6", "features.13"),
            mean=_TF_MEAN_STD,
            std=_TF_MEAN_STD,
            default_weights="mobilenet_v2_imagenet_int8dequant.safetensors",
            tf_padding=True,
            description=(
                "MobileNetV2 with TensorFlow-derived weights (e.g. ../shared/weights/"
                "mobilenet_v2_imagenet_int8dequant.safetensors): inputs x/127.5-1, TF SAME padding"
            ),
        ),
        CNNPreset(
            name="efficientnet_b0",
            arch="efficientnet_b0",
            layers=("features.3", "features.5"),
            interpolation="bicubic",
            default_weights="efficientnet_b0",
            description="EfficientNet-B0, torchvision ImageNet weights",
        ),
        CNNPreset(
            name="efficientnet_b4",
            arch="efficientnet_b4",
            layers=("features.3", "features.5"),
            input_size=380,
            interpolation="bicubic",
            default_weights="efficientnet_b4",
            description="EfficientNet-B4, torchvision ImageNet weights (Rippel et al. MVG backbone)",
        ),
    )
}


def list_cnn_presets() -> list[str]:
    """Names of the CNN presets, sorted."""
    return sorted(CNN_PRESETS)


def get_cnn_preset(name: str) -> CNNPreset:
    """Preset by name; an unknown name lists the available ones."""
    try:
        return CNN_PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown CNN backbone {name!r}. Available: {', '.join(list_cnn_presets())}"
        ) from None
