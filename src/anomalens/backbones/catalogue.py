"""Named weights that ``anomalens weights download NAME`` knows how to fetch.

Each entry is data: a source (URL or ``hf-hub:`` id) and the file name in the cache folder.
"""

from __future__ import annotations

from anomalens.backbones.weight_spec import WeightSpec

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
    WeightSpec(
        name="resnet50",
        source="https://download.pytorch.org/models/resnet50-0676ba61.pth",
        filename="resnet50-0676ba61.pth",
        description="torchvision ResNet-50, ImageNet-1k (IMAGENET1K_V1)",
    ),
    WeightSpec(
        name="efficientnet_b0",
        source="https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth",
        filename="efficientnet_b0_rwightman-7f5810bc.pth",
        description="torchvision EfficientNet-B0, ImageNet-1k (IMAGENET1K_V1)",
    ),
    WeightSpec(
        name="efficientnet_b4",
        source="https://download.pytorch.org/models/efficientnet_b4_rwightman-23ab8bcd.pth",
        filename="efficientnet_b4_rwightman-23ab8bcd.pth",
        description="torchvision EfficientNet-B4, ImageNet-1k (IMAGENET1K_V1); MVG paper backbone",
    ),
    # CLIP, open_clip format on the Hugging Face hub. Use with ClipBackbone.create(...,
    # pretrained="<name>") or ClipBackbone.from_preset(..., pretrained="<name>").
    WeightSpec(
        name="clip-vit-l-14-336-openai",
        source="hf-hub:timm/vit_large_patch14_clip_336.openai/open_clip_model.safetensors",
        filename="clip-vit-l-14-336-openai.safetensors",
        description="OpenAI CLIP ViT-L/14@336 (open_clip ViT-L-14-336, QuickGELU); AdaptCLIP, "
        "AnomalyCLIP, MuSc",
    ),
    WeightSpec(
        name="clip-vit-b-16-plus-240-laion400m-e31",
        source="hf-hub:timm/vit_base_patch16_plus_clip_240.laion400m_e31/open_clip_model.safetensors",
        filename="clip-vit-b-16-plus-240-laion400m-e31.safetensors",
        description="open_clip ViT-B-16-plus-240, LAION-400M epoch 31; WinCLIP, AdaptCLIP light",
    ),
    # MetaUAS (NeurIPS 2024): the official checkpoints, plain torch state dicts. Hub repo and
    # file names as the official code expects them; not checked offline (no sha256 pinned).
    WeightSpec(
        name="metauas-256",
        source="hf-hub:csgaobb/MetaUAS/metauas-256.ckpt",
        filename="metauas-256.ckpt",
        description="MetaUAS official weights, 256 px (MVTec protocol); name not verified offline",
    ),
    WeightSpec(
        name="metauas-512",
        source="hf-hub:csgaobb/MetaUAS/metauas-512.ckpt",
        filename="metauas-512.ckpt",
        description="MetaUAS official weights, 512 px (VisA, GoodsAD); name not verified offline",
    ),
)
