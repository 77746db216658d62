"""MetaUAS network: frozen EfficientNet-B4 encoder, feature alignment, UNet decoder, mask head.

Gao, "MetaUAS: Universal Anomaly Segmentation with One-Prompt Meta-Learning" (NeurIPS 2024).
Written from the method spec (``shared/methods/metauas.md``); parity with the official code is
checked on recorded fixtures (``tests/unit/test_metauas_parity.py``).

* encoder: timm ``tf_efficientnet_b4`` (TF "same" padding, BN eps 1e-3, SiLU), frozen and always
  in eval mode. Features f1 = stem output (48 ch, /2), f2..f5 = outputs of timm stages 1, 2, 4, 6
  (32, 56, 160, 448 ch at /4, /8, /16, /32); the encoder head is not built.
* alignment (FAM) on f5, f4, f3: one shared 1x1 conv projects query and prompt, the attention is
  ``softmax_p(Q_i . K_p)`` (no scaling), the aligned prompt is ``sum_p A_ip V_p`` with V the raw
  prompt feature; fused with the query feature (``cat``: query first).
* decoder: five UNet blocks (nearest x2 upsampling, SCSE attention before conv1 and after conv2
  of the four blocks with a skip), then a 1x1 conv head; the map is ``sigmoid(logits)`` at S x S.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ALIGNED_LEVELS",
    "DECODER_CHANNELS",
    "ENCODER_CHANNELS",
    "SCSE",
    "AlignmentType",
    "EfficientNetB4Encoder",
    "FeatureAlignment",
    "FusionPolicy",
    "MetaUASConfig",
    "MetaUASNet",
    "UNetDecoder",
    "fuse",
]

AlignmentType = Literal["sa", "ha", "na"]
FusionPolicy = Literal["cat", "add", "absdiff"]

#: Channels of f1..f5 (stem, then the ends of timm stages 1, 2, 4, 6).
ENCODER_CHANNELS = (48, 32, 56, 160, 448)
#: timm stage after which f2, f3, f4, f5 are taken.
_STAGE_TAPS = (1, 2, 4, 6)
#: Encoder levels that are aligned, deepest first (indices into f1..f5): f5, f4, f3.
ALIGNED_LEVELS = (4, 3, 2)
DECODER_CHANNELS = (256, 128, 64, 64, 48)


@dataclass(frozen=True)
class MetaUASConfig:
    """Architecture options (the released checkpoints use the defaults).

    Attributes:
        image_size: working size S (a multiple of 32; 256 or 512 for the released weights).
        alignment: ``"sa"`` soft alignment (official), ``"ha"`` hard (one-hot argmax of the
            attention) or ``"na"`` none (the raw prompt feature is fused).
        fusion: ``"cat"`` ``[query, aligned]`` (official), ``"add"`` or ``"absdiff"``.
    """

    image_size: int = 256
    alignment: AlignmentType = "sa"
    fusion: FusionPolicy = "cat"

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        if self.alignment not in ("sa", "ha", "na"):
            raise ValueError(f"alignment must be 'sa', 'ha' or 'na', got {self.alignment!r}")
        if self.fusion not in ("cat", "add", "absdiff"):
            raise ValueError(f"fusion must be 'cat', 'add' or 'absdiff', got {self.fusion!r}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# ========================================================================================= encoder
class EfficientNetB4Encoder(nn.Module):
    """timm ``tf_efficientnet_b4`` trunk returning the five MetaUAS feature levels.

    Built with random weights (the MetaUAS checkpoint holds every encoder tensor); frozen and
    kept in eval mode whatever ``train()`` is called with.
    """

    conv_stem: nn.Module
    bn1: nn.Module
    blocks: nn.Sequential

    def __init__(self) -> None:
        super().__init__()
        import timm

        net: Any = timm.create_model("tf_efficientnet_b4", pretrained=False, num_classes=0)
        self.conv_stem = net.conv_stem
        self.bn1 = net.bn1  # BatchNormAct2d: BN + SiLU
        self.blocks = net.blocks
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EfficientNetB4Encoder:
        """The encoder is frozen: BatchNorm always uses its running statistics."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images (B, 3, S, S) -> [f1 (B,48,S/2,S/2), f2 /4, f3 /8, f4 /16, f5 /32]."""
        x = self.bn1(self.conv_stem(x))
        feats = [x]
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in _STAGE_TAPS:
                feats.append(x)
        return feats


# ======================================================================================= alignment
class FeatureAlignment(nn.Module):
    """Feature alignment module (FAM) of one level.

    Args:
        channels: C of the level's feature.
        alignment: ``"sa"``, ``"ha"`` or ``"na"`` (see ``MetaUASConfig``).
    """

    def __init__(self, channels: int, alignment: AlignmentType = "sa") -> None:
        super().__init__()
        self.alignment = alignment
        self.proj = nn.Conv2d(channels, channels // 2, kernel_size=1)

    def attention(
        self, query: torch.Tensor, prompt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Soft attention of every query position over all prompt positions.

        Args:
            query: (B, C, h, w) query feature.
            prompt: (B, C, h', w') prompt feature.

        Returns:
            (Q (B, C/2, h, w), K (B, C/2, h', w'), A (B, h*w, h'*w')) with A softmaxed over the
            prompt positions; the logits are ``Q_i . K_p`` without scaling.
        """
        q = self.proj(query)
        k = self.proj(prompt)
        # unscaled logits reach the hundreds: in bf16/fp16 their rounding alone would move
        # the attention, so this product and the softmax always run in float32
        with torch.autocast(q.device.type, enabled=False):
            logits = torch.bmm(q.float().flatten(2).transpose(1, 2), k.float().flatten(2))
            attn = logits.softmax(dim=-1)
        return q, k, attn

    def forward(
        self,
        query: torch.Tensor,
        prompt: torch.Tensor,
        record: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Prompt feature aligned to the query: (B, C, h, w).

        ``record`` (optional) receives ``q``, ``k``, ``attn`` and ``aligned``.
        """
        if self.alignment == "na":
            if prompt.shape != query.shape:
                raise ValueError(
                    f"alignment 'na' needs prompt and query features of one shape, got "
                    f"{tuple(prompt.shape)} and {tuple(query.shape)}"
                )
            return prompt
        q, k, attn = self.attention(query, prompt)
        if self.alignment == "ha":
            attn = F.one_hot(attn.argmax(dim=-1), attn.shape[-1]).to(prompt.dtype)
        b, c, h, w = query.shape
        aligned = torch.bmm(prompt.flatten(2), attn.to(prompt.dtype).transpose(1, 2))
        aligned = aligned.view(b, c, h, w)
        if record is not None:
            record.update(q=q, k=k, attn=attn, aligned=aligned)
        return aligned


def fuse(query: torch.Tensor, aligned: torch.Tensor, policy: FusionPolicy) -> torch.Tensor:
    """Fuse a query feature (B, C, h, w) with its aligned prompt (B, C, h, w).

    Returns:
        ``cat``: (B, 2C, h, w), query first; ``add``: q + a; ``absdiff``: |q - a| (B, C, h, w).
    """
    if policy == "cat":
        return torch.cat([query, aligned], dim=1)
    if policy == "add":
        return query + aligned
    if policy == "absdiff":
        return (query - aligned).abs()
    raise ValueError(f"unknown fusion policy {policy!r}")


# ========================================================================================= decoder
class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze-excitation: ``x * cSE(x) + x * sSE(x)``.

    Args:
        channels: C.
        reduction: channel squeeze ratio (C -> C // reduction -> C).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.channel_reduce = nn.Conv2d(channels, channels // reduction, kernel_size=1)
        self.channel_expand = nn.Conv2d(channels // reduction, channels, kernel_size=1)
        self.spatial = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        channel = torch.sigmoid(self.channel_expand(F.relu(self.channel_reduce(pooled))))
        spatial = torch.sigmoid(self.spatial(x))
        return x * channel + x * spatial


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias, padding 1) + BatchNorm (eps 1e-5) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class DecoderBlock(nn.Module):
    """Nearest x2 upsampling, skip concatenation, SCSE, two ConvBNReLU, SCSE.

    The SCSEs exist only when the block has a skip (the last block has neither).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        width = in_channels + skip_channels
        self.attn_in = SCSE(width) if skip_channels else None
        self.conv1 = ConvBNReLU(width, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)
        self.attn_out = SCSE(out_channels) if skip_channels else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """(B, in, h, w) and skip (B, skip, 2h, 2w) or None -> (B, out, 2h, 2w)."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        if self.attn_in is not None:
            x = self.attn_in(x)
        x = self.conv2(self.conv1(x))
        if self.attn_out is not None:
            x = self.attn_out(x)
        return x


class UNetDecoder(nn.Module):
    """Five decoder blocks from the fused f5 up to S x S.

    Args:
        skip_channels: channels of the fused f4, fused f3, f2, f1 (then no skip).
        head_channels: channels of the fused f5.
    """

    def __init__(self, head_channels: int, skip_channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        ins = (head_channels, *DECODER_CHANNELS[:-1])
        skips = (*skip_channels, 0)
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, DECODER_CHANNELS)
        )

    def forward(
        self,
        head: torch.Tensor,
        skips: list[torch.Tensor],
        record: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Fused f5 (B, C5', S/32, S/32) and the four skips -> (B, 48, S, S)."""
        x = head
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
            if record is not None:
                record.append(x)
        return x


# ========================================================================================= network
class MetaUASNet(nn.Module):
    """The whole MetaUAS network; ``forward(query, prompt)`` gives change logits.

    Inputs are images in [0, 1] already resized to S x S; the ImageNet normalisation happens
    inside (as in the official model).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: MetaUASConfig | None = None) -> None:
        super().__init__()
        self.config = config or MetaUASConfig()
        self.encoder = EfficientNetB4Encoder()
        self.alignment = nn.ModuleList(
            FeatureAlignment(ENCODER_CHANNELS[lvl], self.config.alignment) for lvl in ALIGNED_LEVELS
        )
        widen = 2 if self.config.fusion == "cat" else 1
        c = ENCODER_CHANNELS
        self.decoder = UNetDecoder(c[4] * widen, (c[3] * widen, c[2] * widen, c[1], c[0]))
        self.head = nn.Conv2d(DECODER_CHANNELS[-1], 1, kernel_size=1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> ImageNet-normalised."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> [f1..f5] (see ``EfficientNetB4Encoder``)."""
        return self.encoder(self.normalize(images))

    def decode(
        self,
        query_feats: list[torch.Tensor],
        prompt_feats: list[torch.Tensor],
        record: dict[str, object] | None = None,
    ) -> torch.Tensor:
        """Change logits (B, 1, S, S) from encoded queries and their prompts (same B).

        ``record`` (optional) receives ``align`` (one dict per aligned level, deepest first,
        see ``FeatureAlignment.forward``) and ``decoder`` (the five block outputs).
        """
        if len(prompt_feats[-1]) != len(query_feats[-1]):
            raise ValueError(
                f"{len(query_feats[-1])} queries but {len(prompt_feats[-1])} prompts: "
                "pair every query with one prompt"
            )
        fused: dict[int, torch.Tensor] = {}
        align_rec: list[dict[str, torch.Tensor]] = []
        for module, lvl in zip(self.alignment, ALIGNED_LEVELS):
            rec: dict[str, torch.Tensor] | None = {} if record is not None else None
            aligned = module(query_feats[lvl], prompt_feats[lvl], rec)
            fused[lvl] = fuse(query_feats[lvl], aligned, self.config.fusion)
            if rec is not None:
                align_rec.append(rec)
        skips = [fused[3], fused[2], query_feats[1], query_feats[0]]
        dec_rec: list[torch.Tensor] | None = [] if record is not None else None
        x = self.decoder(fused[4], skips, dec_rec)
        if record is not None:
            record["align"] = align_rec
            record["decoder"] = dec_rec
        return self.head(x)

    def forward(self, query: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Query and prompt images (B, 3, S, S) in [0, 1] -> change logits (B, 1, S, S)."""
        with torch.no_grad():
            q = self.encode(query)
            p = self.encode(prompt)
        return self.decode(q, p)
