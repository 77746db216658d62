"""Named weights that ``anomalens weights download NAME`` knows how to fetch.

Each entry is data: a source (URL or ``hf-hub:`` id) and the file name in the cache folder.
"""

from __future__ import annotations

from anomalens.backbones.weights import WeightSpec

__all__ = ["WEIGHTS"]

WEIGHTS: tuple[WeightSpec, ...] = (
    WeightSpec(
        name="wide_resnet50_2",
        source="https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
        filename="wide_resnet50_2-95faca4d.pth",
        description="torchvision WideResNet-50-2, ImageNet-1k (IMAGENET1K_V1); PatchCore default",
    ),
    WeightSpec(
        name="resnet18",
        source="https://download.pytorch.org/models/resnet18-f37072fd.pth",
        filename="resnet18-f37072fd.pth",
        description="torchvision ResNet-18, ImageNet-1k (IMAGENET1K_V1)",
    ),
    WeightSpec(
        name="mobilenet_v2",
        source="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        filename="mobilenet_v2-b0353104.pth",
        description="torchvision MobileNetV2, ImageNet-1k (IMAGENET1K_V1)",
    ),
)
