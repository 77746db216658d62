"""Named weights that ``anomalens weights download NAME`` knows how to fetch.

Each entry is data: a source (URL or ``hf-hub:`` id) and the file name in the cache folder,
plus the digest a download is checked against where the publisher gives one.

The official trained AdaptCLIP adapters and AnomalyCLIP prompts are listed too (``method`` and
``trained_on`` set): :func:`default_checkpoint` picks the one trained on the other dataset family
than the images to inspect, as the papers' cross-dataset protocol does.
"""

from __future__ import annotations

from anomalens.backbones.weight_spec import WeightSpec

__all__ = ["WEIGHTS", "checkpoint_names", "default_checkpoint"]

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
    # Official trained checkpoints of the zero-shot CLIP methods (OpenAI ViT-L/14@336 backbone).
    # AdaptCLIP: the Hugging Face repository its official code points to (no digest published;
    # huggingface_hub checks the file against the hub's own sha256 while downloading).
    WeightSpec(
        name="adaptclip-mvtec",
        source="hf-hub:csgaobb/AdaptCLIP/12_4_128_train_on_mvtec_3adapters_batch8/epoch_15.pth",
        filename="adaptclip-train-on-mvtec-epoch_15.pth",
        description="official AdaptCLIP adapters trained on MVTec AD (use on VisA and others)",
        method="adaptclip",
        trained_on="mvtec",
    ),
    WeightSpec(
        name="adaptclip-visa",
        source="hf-hub:csgaobb/AdaptCLIP/12_4_128_train_on_visa_3adapters_batch8/epoch_15.pth",
        filename="adaptclip-train-on-visa-epoch_15.pth",
        description="official AdaptCLIP adapters trained on VisA (use on MVTec AD)",
        method="adaptclip",
        trained_on="visa",
    ),
    # AnomalyCLIP: committed in its GitHub repository; verified by the git blob id.
    WeightSpec(
        name="anomalyclip-mvtec",
        source="https://raw.githubusercontent.com/zqhang/AnomalyCLIP/main/checkpoints/"
        "9_12_4_multiscale/epoch_15.pth",
        filename="anomalyclip-train-on-mvtec-epoch_15.pth",
        description="official AnomalyCLIP prompts trained on MVTec AD (use on VisA and others)",
        git_blob_sha1="c90f1d9d92d158b436a8fc193f984d4cec8b1fc8",
        method="anomalyclip",
        trained_on="mvtec",
    ),
    WeightSpec(
        name="anomalyclip-visa",
        source="https://raw.githubusercontent.com/zqhang/AnomalyCLIP/main/checkpoints/"
        "9_12_4_multiscale_visa/epoch_15.pth",
        filename="anomalyclip-train-on-visa-epoch_15.pth",
        description="official AnomalyCLIP prompts trained on VisA (use on MVTec AD)",
        git_blob_sha1="72adc786e031b49ea288ba5f815f0d38cf158708",
        method="anomalyclip",
        trained_on="visa",
    ),
)


def checkpoint_names(method: str) -> list[str]:
    """Catalogue names of the official checkpoints of ``method`` (empty for other methods)."""
    return [w.name for w in WEIGHTS if w.method == method]


def default_checkpoint(method: str, dataset: str | None = None) -> str | None:
    """The official checkpoint of ``method`` trained on the other dataset family.

    The papers train on one family and test on the other: MVTec AD is inspected with the
    VisA-trained checkpoint, everything else (VisA, your own images) with the MVTec-trained one.

    Args:
        method: detector name (``"adaptclip"``, ``"anomalyclip"``).
        dataset: family of the images to inspect (``"mvtec"``, ``"visa"``...), None if unknown.

    Returns:
        A catalogue name, or None when the method has no official checkpoint.
    """
    want = "visa" if dataset is not None and dataset.lower() == "mvtec" else "mvtec"
    found = [w.name for w in WEIGHTS if w.method == method and w.trained_on == want]
    return found[0] if found else None
