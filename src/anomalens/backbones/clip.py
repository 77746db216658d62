"""CLIP backbone on open_clip: per-layer patch tokens, the V-V attention path, text encoding.

:class:`ClipBackbone` wraps an ``open_clip.CLIP`` model (ViT image tower) and runs an explicit
forward over its modules (no hooks), so that it can

* take patch tokens after chosen blocks (copies, never views of a tensor that is updated later);
* run the V-V ("DPAM" / CLIP-surgery) dual path from a chosen block on;
* run the vision tower at an input size other than the pretrained one, with the positional
  embedding resized as the AdaptCLIP / AnomalyCLIP / MuSc reference code does (bilinear,
  ``align_corners=False``, no antialias, CLS row kept);
* encode text from token ids, from spliced learnable prompt embeddings, with deep prompts;
* encode WinCLIP windows as token-dropped sequences.

Block numbers in this module are **1-indexed** (block 1 is the first transformer block), as in
the method papers: ``layers=(6, 12, 18, 24)`` taps the outputs of blocks 6, 12, 18 and 24.

See ``docs/clip_backbone.md`` for the contract and the presets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import (
    QuickGELU,
    ResidualAttentionBlock,
    VisionTransformer,
    text_global_pool,
)
from torch import nn

from anomalens.backbones.clip_presets import ClipPreset, get_clip_preset
from anomalens.backbones.torchscript import is_torchscript_archive, read_torchscript_state_dict
from anomalens.backbones.weights import WeightNotAvailableError, is_offline, resolve_weights
from anomalens.data.io import ImageLike
from anomalens.data.transforms import CLIP_MEAN, CLIP_STD, to_batch

__all__ = [
    "OPENAI_JIT_ONLY_KEYS",
    "ClipBackbone",
    "ClipImageFeatures",
    "ClipImageTokens",
    "Precision",
    "build_clip_backbone",
    "check_taps",
    "load_state_dict_file",
    "openai_clip_config",
    "resize_positional_embedding",
    "vv_dual_block",
]


Precision = Literal["fp32", "fp16", "bf16"]
_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
#: Scalars stored in OpenAI's TorchScript ``state_dict()`` that are not parameters.
OPENAI_JIT_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


# --------------------------------------------------------------------------------------------
# Output records
# --------------------------------------------------------------------------------------------


@dataclass
class ClipImageFeatures:
    """Projected image features of one batch.

    Attributes:
        patch_tokens: one (B, 1+N, D) tensor per requested layer, in the order of ``layers``:
            ``LN_post(tokens) @ proj``; row 0 is the CLS token (consumers drop it). Taken from
            the V-V stream for layers >= ``vv_start``.
        global_embedding: (B, D): original-stream CLS after the last block ``@ proj``, with or
            without ``LN_post`` (``global_ln_post``).
        grid_size: (h, w) patch grid; N = h * w, row-major.
        layers: the 1-indexed block numbers of ``patch_tokens``.
    """

    patch_tokens: list[torch.Tensor]
    global_embedding: torch.Tensor
    grid_size: tuple[int, int]
    layers: tuple[int, ...]


@dataclass
class ClipImageTokens:
    """Unprojected residual-stream tokens of one batch (width W of the vision tower).

    Attributes:
        tokens: one (B, 1+N, W) tensor per requested layer (the V-V stream for layers >=
            ``vv_start``), before ``LN_post`` and projection.
        final: (B, 1+N, W) original stream after the last block.
        grid_size: (h, w) patch grid.
        layers: the 1-indexed block numbers of ``tokens``.
    """

    tokens: list[torch.Tensor]
    final: torch.Tensor
    grid_size: tuple[int, int]
    layers: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Pure tensor functions
# --------------------------------------------------------------------------------------------


def resize_positional_embedding(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize a ViT positional embedding to a new patch grid, as the CLIP anomaly references do.

    The CLS row is kept; the other rows are reshaped to the old grid and resized with bilinear
    interpolation (``align_corners=False``, no antialias), computed in float32.

    Args:
        pos_embed: (1 + h0*w0, W) embedding, CLS row first, grid rows row-major.
        old_grid: (h0, w0).
        new_grid: (h, w).

    Returns:
        (1 + h*w, W) tensor with the dtype and device of ``pos_embed``.
    """
    h0, w0 = old_grid
    if pos_embed.shape[0] != 1 + h0 * w0:
        raise ValueError(
            f"positional embedding has {pos_embed.shape[0]} rows, expected 1 + {h0}*{w0}"
        )
    if tuple(new_grid) == (h0, w0):
        return pos_embed.clone()
    cls_row, grid = pos_embed[:1], pos_embed[1:]
    width = pos_embed.shape[1]
    g = grid.float().reshape(1, h0, w0, width).permute(0, 3, 1, 2)
    g = F.interpolate(
        g, size=tuple(new_grid), mode="bilinear", align_corners=False, antialias=False
    )
    g = g.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], width).to(pos_embed.dtype)
    return torch.cat([cls_row, g], dim=0)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, W) -> (B, H, L, W/H)."""
    b, n, w = x.shape
    return x.reshape(b, n, heads, w // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> (B, L, H*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def vv_dual_block(
    block: ResidualAttentionBlock, o: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One transformer block of the V-V dual path (clip_backbone.md section 4).

    With ``h = LN1(o)`` and the block's fused in-projection ``[Q, K, V] = h W_in^T + b_in``:
    ``Y_o = OutProj(softmax(Q K^T s) V)``, ``Y_v = OutProj(softmax(V V^T s) V)`` per head with
    ``s = d^-1/2``; then ``o <- o + ls_1(Y_o); o <- o + ls_2(MLP(LN2 o))`` (an ordinary block) and
    ``v <- v + ls_1(Y_v)`` (no MLP). ``Y_v`` is computed from ``LN1(o)``, never from ``v``.

    Args:
        block: an open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` inside).
        o: (B, L, W) original stream.
        v: (B, L, W) V-V stream.

    Returns:
        The new ``(o, v)``, both (B, L, W); the inputs are not modified.
    """
    attn = block.attn
    heads = attn.num_heads
    h = block.ln_1(o)
    q, k, val = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, val = (_split_heads(t, heads) for t in (q, k, val))
    b = o.shape[0]
    # one attention call for both paths: queries (Q | V), keys (K | V), values (V | V)
    y = F.scaled_dot_product_attention(
        torch.cat([q, val]), torch.cat([k, val]), torch.cat([val, val])
    )
    y = F.linear(_merge_heads(y), attn.out_proj.weight, attn.out_proj.bias)
    y_o, y_v = y[:b], y[b:]
    o = o + block.ls_1(y_o)
    o = o + block.ls_2(block.mlp(block.ln_2(o)))
    v = v + block.ls_1(y_v)
    return o, v


def openai_clip_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Infer the architecture of a ViT CLIP state dict in the OpenAI key layout from its shapes.

    Vision and text heads are ``width // 64`` (as OpenAI's and open_clip's loaders assume).

    Returns:
        ``{"embed_dim": int, "vision_cfg": dict, "text_cfg": dict}`` for ``open_clip.model.CLIP``.

    Raises:
        ValueError: the state dict is not an OpenAI-layout ViT CLIP (e.g. a ResNet CLIP).
    """
    if "visual.proj" not in state_dict or "visual.conv1.weight" not in state_dict:
        raise ValueError(
            "state dict is not an OpenAI-layout ViT CLIP (keys 'visual.proj' and "
            "'visual.conv1.weight' missing); ResNet CLIP models are not supported"
        )
    vision_width, _, patch, _ = state_dict["visual.conv1.weight"].shape
    vision_layers = sum(
        1
        for k in state_dict
        if k.startswith("visual.transformer.resblocks.") and k.endswith(".attn.in_proj_weight")
    )
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state_dict["ln_final.weight"].shape[0]
    text_layers = len(
        {k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}
    )
    return {
        "embed_dim": int(state_dict["text_projection"].shape[1]),
        "vision_cfg": {
            "layers": vision_layers,
            "width": int(vision_width),
            "patch_size": int(patch),
            "image_size": int(patch * grid),
            "head_width": 64,
        },
        "text_cfg": {
            "context_length": int(state_dict["positional_embedding"].shape[0]),
            "vocab_size": int(state_dict["token_embedding.weight"].shape[0]),
            "width": int(text_width),
            "heads": max(1, int(text_width) // 64),
            "layers": text_layers,
        },
    }


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | os.PathLike[str], weights_only: bool = True) -> dict:
    """Read a CLIP checkpoint file into a plain state dict.

    Accepts safetensors, ``torch.save`` files (optionally ``{"state_dict": ...}``, ``module.``
    prefixes) and OpenAI's TorchScript archives. The TorchScript-only scalars
    (``OPENAI_JIT_ONLY_KEYS``) are dropped.

    Args:
        path: checkpoint file.
        weights_only: passed to ``torch.load`` for pickled files.

    Returns:
        ``{key: tensor}`` on the CPU, dtypes as stored.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from anomalens.backbones.weights import read_safetensors

        sd: dict = read_safetensors(path, "CLIP checkpoint")
    elif is_torchscript_archive(path):
        # OpenAI's releases: weights read without running TorchScript (see torchscript.py)
        sd = read_torchscript_state_dict(path)
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=weights_only)
        except Exception as exc:
            raise RuntimeError(
                f"cannot read CLIP checkpoint {path} with torch.load(weights_only={weights_only})"
                f": {exc}. If you trust the file, pass weights_only=False."
            ) from exc
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise RuntimeError(f"CLIP checkpoint {path} holds a {type(obj).__name__}, not a dict")
        sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    for key in OPENAI_JIT_ONLY_KEYS:
        sd.pop(key, None)
    return sd


def _cached_tag_file(tag_cfg: Mapping[str, str], cache_dir: str | None) -> Path | None:
    """Find the file of an open_clip pretrained tag in the local caches without any download."""
    hf_id = tag_cfg.get("hf_hub", "")
    if hf_id:
        repo, filename = os.path.split(hf_id)  # "org/repo/" -> ("org/repo", "")
        names = (
            [filename]
            if filename
            else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
        from anomalens.backbones.catalogue import WEIGHTS

        for name in names:
            hf_source = f"hf-hub:{repo}/{name}"
            # anomalens cache: catalogue entries of this file, then the plain hf-hub id
            aliases = [w.name for w in WEIGHTS if w.source == hf_source] + [hf_source]
            for alias in aliases:
                try:
                    return resolve_weights(alias, offline=True)
                except WeightNotAvailableError:
                    pass
            try:  # huggingface_hub's own cache
                from huggingface_hub import try_to_load_from_cache

                got = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
                if isinstance(got, str) and os.path.isfile(got):
                    return Path(got)
            except ImportError:
                pass
    url = tag_cfg.get("url", "")
    if url:
        root = Path(cache_dir).expanduser() if cache_dir else Path("~/.cache/clip").expanduser()
        target = root / os.path.basename(url)
        if target.is_file():
            return target
    return None


def _resolve_pretrained(
    model_name: str, pretrained: str, cache_dir: str | None
) -> tuple[Path, dict[str, object]]:
    """Local file for ``pretrained`` (open_clip tag, path, ``hf-hub:`` id, URL or catalogue name).

    Returns:
        (path, tag config); the tag config is empty when ``pretrained`` is not an open_clip tag.
    """
    tag_cfg: dict[str, object] = dict(open_clip.get_pretrained_cfg(model_name, pretrained) or {})
    if not tag_cfg:
        return resolve_weights(pretrained), tag_cfg
    cached = _cached_tag_file(tag_cfg, cache_dir)  # type: ignore[arg-type]
    if cached is not None:
        return cached, tag_cfg
    where = tag_cfg.get("hf_hub") or tag_cfg.get("url")
    if is_offline():
        raise WeightNotAvailableError(
            f"open_clip weights {model_name!r} / pretrained={pretrained!r} are not cached and "
            f"offline mode is on. Fetch them on a connected machine ({where}), e.g. "
            f"`python -c \"import open_clip; open_clip.create_model('{model_name}', "
            f"pretrained='{pretrained}')\"` and copy the Hugging Face / ~/.cache/clip cache here, "
            "or pass the checkpoint file path as pretrained=."
        )
    try:
        path = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as exc:
        raise WeightNotAvailableError(
            f"downloading open_clip weights {model_name!r} / pretrained={pretrained!r} from "
            f"{where} failed ({exc}); pass a local checkpoint file as pretrained= instead"
        ) from exc
    return Path(path), tag_cfg


def _load_into(model: CLIP, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load an open_clip/OpenAI-layout state dict into ``model`` (float values cast)."""
    sd = dict(state_dict)
    for key in OPENAI_JIT_ONLY_KEYS:
        sd.pop(key, None)
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"weights {source} do not fit the CLIP architecture: {exc}") from exc


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------


class ClipBackbone(nn.Module):
    """Frozen open_clip ViT CLIP with an explicit forward for anomaly-detection features.

    Build with :meth:`create`, :meth:`from_preset`, :meth:`from_openai_state_dict` or
    :meth:`from_open_clip`. All parameters are frozen and the module stays in eval mode. Image
    and text outputs are returned as float32 whatever ``precision`` the model runs in.

    Attributes:
        model: the wrapped ``open_clip.CLIP``.
        model_name: open_clip architecture name (or ``"openai-state-dict"``).
        pretrained: the weight source it was built from (None: random).
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``: dtype of the weights and activations.
        mean, std, interpolation: preprocessing of :meth:`preprocess`.
    """

    def __init__(
        self,
        model: CLIP,
        *,
        image_size: int | None = None,
        precision: Precision = "fp32",
        device: str | torch.device = "cpu",
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        interpolation: str = "bicubic",
        model_name: str = "",
        pretrained: str | None = None,
    ) -> None:
        """Wrap an open_clip ``CLIP`` (fp32 on any device); it is modified in place.

        Args:
            model: ``open_clip.CLIP`` with a ``VisionTransformer`` image tower.
            image_size: input side S; None keeps the model's own size.
            precision: weight/activation dtype.
            device: target device.
            mean, std, interpolation: preprocessing (see :meth:`preprocess`).
            model_name, pretrained: recorded for :meth:`describe`.
        """
        super().__init__()
        _check_supported(model)
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        self.model = model.float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model_name = model_name
        self.pretrained = pretrained
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        visual = self.model.visual
        # the pretrained positional embedding, float32 on the CPU: every resize starts from it
        self._native_pos_embed = visual.positional_embedding.detach().float().cpu().clone()
        self._native_grid: tuple[int, int] = tuple(visual.grid_size)  # type: ignore[assignment]
        self.model.to(device=torch.device(device), dtype=_DTYPES[precision])
        self.set_image_size(image_size if image_size is not None else _first(visual.image_size))

    # ---------------------------------------------------------------- constructors

    @classmethod
    def create(
        cls,
        model_name: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        image_size: int | None = 518,
        force_quick_gelu: bool | None = None,
        precision: Precision = "fp32",
        device: str | torch.device = "cpu",
        *,
        seed: int | None = None,
        cache_dir: str | None = None,
        weights_only: bool = True,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        interpolation: str = "bicubic",
    ) -> ClipBackbone:
        """Build an open_clip architecture with weights and resize it to ``image_size``.

        Args:
            model_name: open_clip architecture (``open_clip.list_models()``) or
                ``"anomalens-tiny-clip"``.
            pretrained: open_clip pretrained tag (``"openai"``, ``"laion400m_e31"``, ...; fetched
                by open_clip, never when offline), a local file, an ``hf-hub:ORG/REPO[/FILE]``
                id, URL or catalogue name (all through ``resolve_weights``), or None for random
                weights.
            image_size: input side S (multiple of the patch size); None keeps the native size.
            force_quick_gelu: True/False forces the MLP activation; None takes it from the
                pretrained tag (``quick_gelu``) or the model config.
            precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
            device: target device.
            seed: seed of the random initialisation (default 0) when ``pretrained`` is None.
            cache_dir: open_clip / Hugging Face cache folder for tags.
            weights_only: ``torch.load`` safety flag for pickled checkpoints.
            mean, std, interpolation: preprocessing.

        Raises:
            WeightNotAvailableError: weights not on disk/cached and offline (or download failed).
        """
        from anomalens.backbones.tiny import TINY_CLIP_NAME, register_tiny_clip

        if model_name == TINY_CLIP_NAME:
            register_tiny_clip()
        if open_clip.get_model_config(model_name) is None:
            raise ValueError(
                f"unknown open_clip model {model_name!r}. Available: "
                f"{', '.join(open_clip.list_models())}"
            )
        path: Path | None = None
        tag_cfg: dict[str, object] = {}
        if pretrained is not None:
            path, tag_cfg = _resolve_pretrained(model_name, pretrained, cache_dir)
        kwargs: dict[str, object] = {}
        if force_quick_gelu is not None:
            kwargs["quick_gelu"] = bool(force_quick_gelu)
        elif tag_cfg.get("quick_gelu"):
            kwargs["quick_gelu"] = True
        model = _build_open_clip(model_name, 0 if seed is None else seed, **kwargs)
        if not isinstance(model, CLIP):
            raise ValueError(
                f"open_clip model {model_name!r} is a {type(model).__name__}; ClipBackbone "
                "supports open_clip.CLIP models with a ViT image tower"
            )
        if path is not None:
            _load_into(model, load_state_dict_file(path, weights_only=weights_only), str(path))
        return cls(
            model,
            image_size=image_size,
            precision=precision,
            device=device,
            mean=mean,
            std=std,
            interpolation=interpolation,
            model_name=model_name,
            pretrained=pretrained,
        )

    @classmethod
    def from_preset(
        cls,
        name: str | ClipPreset,
        *,
        pretrained: str | None = None,
        image_size: int | None = None,
        precision: Precision = "fp32",
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
        weights_only: bool = True,
    ) -> ClipBackbone:
        """Build a preset from ``clip_presets`` (e.g. ``"adaptclip-vitl14-336@518"``).

        Args:
            name: preset name or object.
            pretrained: overrides the preset's weight source (e.g. a local checkpoint path).
            image_size: overrides the preset's input size.
            precision, device, cache_dir, weights_only: as in :meth:`create`.
        """
        preset = get_clip_preset(name) if isinstance(name, str) else name
        return cls.create(
            preset.model_name,
            pretrained=preset.pretrained if pretrained is None else pretrained,
            image_size=preset.image_size if image_size is None else image_size,
            force_quick_gelu=preset.quick_gelu,
            precision=precision,
            device=device,
            cache_dir=cache_dir,
            weights_only=weights_only,
            mean=preset.mean,
            std=preset.std,
            interpolation=preset.interpolation,
        )

    @classmethod
    def from_openai_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        image_size: int | None = None,
        quick_gelu: bool = True,
        precision: Precision = "fp32",
        device: str | torch.device = "cpu",
        *,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        interpolation: str = "bicubic",
    ) -> ClipBackbone:
        """Build from a state dict in OpenAI's key layout (e.g. ``ViT-L-14-336px.pt``).

        The architecture is inferred from the shapes (:func:`openai_clip_config`); float16
        values are loaded into float32 parameters (exact); the TorchScript-only scalars are
        ignored; loading is strict.

        Args:
            state_dict: ``{key: tensor}`` (not modified).
            image_size: input side S; None keeps the checkpoint's size.
            quick_gelu: QuickGELU MLP activation (True for OpenAI weights).
            precision, device, mean, std, interpolation: as in :meth:`create`.
        """
        cfg = openai_clip_config(state_dict)
        model = CLIP(
            embed_dim=cfg["embed_dim"],  # type: ignore[arg-type]
            vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),  # type: ignore[arg-type]
            text_cfg=CLIPTextCfg(**cfg["text_cfg"]),  # type: ignore[arg-type]
            quick_gelu=quick_gelu,
        )
        _load_into(model, state_dict, "openai state dict")
        return cls(
            model,
            image_size=image_size,
            precision=precision,
            device=device,
            mean=mean,
            std=std,
            interpolation=interpolation,
            model_name="openai-state-dict",
            pretrained="state_dict",
        )

    @classmethod
    def from_open_clip(
        cls,
        model: CLIP,
        image_size: int | None = None,
        precision: Precision = "fp32",
        device: str | torch.device = "cpu",
        **kwargs: object,
    ) -> ClipBackbone:
        """Wrap an already built ``open_clip.CLIP`` (modified in place: frozen, resized, cast).

        Args:
            model: the open_clip model.
            image_size, precision, device: as in :meth:`create`.
            **kwargs: ``mean``, ``std``, ``interpolation``, ``model_name``, ``pretrained``.
        """
        return cls(model, image_size=image_size, precision=precision, device=device, **kwargs)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- properties

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights and activations (follows ``.to(dtype)``)."""
        return self.model.visual.conv1.weight.dtype

    @property
    def precision(self) -> str:
        """``"fp32"``, ``"fp16"`` or ``"bf16"``: the name of :attr:`dtype`."""
        names = {v: k for k, v in _DTYPES.items()}
        return names.get(self.dtype, str(self.dtype).replace("torch.", ""))

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.model.visual.conv1.weight.device

    @property
    def image_size(self) -> int:
        """Input side S in pixels."""
        return _first(self.model.visual.image_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) patch grid at the current image size."""
        g = self.model.visual.grid_size
        return int(g[0]), int(g[1])

    @property
    def patch_size(self) -> int:
        """Patch side in pixels."""
        return _first(self.model.visual.patch_size)

    @property
    def embed_dim(self) -> int:
        """D: joint image-text embedding width."""
        return int(self.model.visual.proj.shape[1])

    @property
    def vision_width(self) -> int:
        """W: width of the vision transformer tokens."""
        return int(self.model.visual.conv1.out_channels)

    @property
    def text_width(self) -> int:
        """Width of the text transformer tokens (learnable prompt vectors have this width)."""
        return int(self.model.ln_final.weight.shape[0])

    @property
    def num_layers(self) -> int:
        """Number of vision transformer blocks."""
        return len(self.model.visual.transformer.resblocks)

    @property
    def num_text_layers(self) -> int:
        """Number of text transformer blocks."""
        return len(self.model.transformer.resblocks)

    @property
    def context_length(self) -> int:
        """Text context length (77 for CLIP)."""
        return int(self.model.positional_embedding.shape[0])

    def describe(self) -> dict[str, object]:
        """Settings for detector ``config()`` dicts and reports."""
        return {
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "image_size": self.image_size,
            "grid_size": list(self.grid_size),
            "precision": self.precision,
            "quick_gelu": isinstance(
                self.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU
            ),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    def train(self, mode: bool = True) -> ClipBackbone:
        """The backbone is frozen: the wrapped model stays in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.model.eval()
        return self

    def set_image_size(self, image_size: int) -> None:
        """Resize the positional embedding for inputs of ``image_size`` x ``image_size``.

        Always resizes from the pretrained embedding (bilinear, ``align_corners=False``, no
        antialias, CLS row kept); updates ``visual.grid_size`` and ``visual.image_size``.

        Raises:
            ValueError: ``image_size`` is not a positive multiple of the patch size.
        """
        patch = self.patch_size
        if image_size <= 0 or image_size % patch:
            raise ValueError(
                f"image_size={image_size} must be a positive multiple of the patch size {patch}"
            )
        grid = (image_size // patch, image_size // patch)
        visual = self.model.visual
        new = resize_positional_embedding(self._native_pos_embed, self._native_grid, grid)
        visual.positional_embedding = nn.Parameter(
            new.to(device=self.device, dtype=self.dtype), requires_grad=False
        )
        visual.grid_size = grid
        visual.image_size = (image_size, image_size)

    # ---------------------------------------------------------------- images

    def preprocess(
        self, images: Sequence[ImageLike], device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Squash-resize to S x S with PIL (bicubic by default) and normalise, as the references.

        Args:
            images: arrays (H, W, 3 | H, W uint8), PIL images or paths; greyscale is replicated.
            device: where to normalise (the batch travels as uint8); None = the CPU.

        Returns:
            (B, 3, S, S) float32 tensor: ``(x / 255 - mean) / std`` (same values on any device).
        """
        return to_batch(
            images, self.image_size, self.mean, self.std, self.interpolation, device=device
        )

    def _as_input(self, x: torch.Tensor | Sequence[ImageLike]) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = self.preprocess(x, device=self.device)
        s = self.image_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (s, s):
            raise ValueError(
                f"expected images of shape (B, 3, {s}, {s}), got {tuple(x.shape)}; use "
                "preprocess() or set_image_size()"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend CLS, add positions, ``ln_pre``: (B, 3, S, S) -> (B, 1+N, W)."""
        visual = self.model.visual
        x = visual.conv1(x).flatten(2).transpose(1, 2)
        cls_tok = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def _check_layers(self, layers: Sequence[int], vv_start: int | None) -> tuple[int, ...]:
        n = self.num_layers
        out = tuple(int(layer) for layer in layers)
        bad = [layer for layer in out if not 1 <= layer <= n]
        if bad:
            raise ValueError(f"layers {bad} out of range: blocks are numbered 1..{n}")
        if vv_start is not None:
            if not 1 <= vv_start <= n:
                raise ValueError(f"vv_start={vv_start} out of range: blocks are numbered 1..{n}")
            blocks = self.model.visual.transformer.resblocks[vv_start - 1 :]
            if not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
                raise ValueError("the V-V path needs open_clip ResidualAttentionBlock blocks")
        return out

    def _tokens_one(
        self, x: torch.Tensor, layers: tuple[int, ...], vv_start: int | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the tower on one chunk: taps (copies) and the final original stream."""
        o = self._embed(x)
        v: torch.Tensor | None = None
        taps: dict[int, torch.Tensor] = {}
        wanted = set(layers)
        last = self.num_layers
        for i, block in enumerate(self.model.visual.transformer.resblocks, start=1):
            if vv_start is not None and i >= vv_start:
                o, v = vv_dual_block(block, o, o if v is None else v)
            else:
                o = block(o)
            if i in wanted:
                taps[i] = (v if v is not None else o).clone()
            if i >= last:
                break
        return [taps[layer] for layer in layers], o

    @torch.no_grad()
    def encode_image_tokens(
        self,
        x: torch.Tensor | Sequence[ImageLike],
        layers: Sequence[int] = (6, 12, 18, 24),
        vv_start: int | None = None,
        *,
        batch_size: int | None = None,
    ) -> ClipImageTokens:
        """Unprojected residual-stream tokens after chosen blocks (MuSc-style features).

        Args:
            x: (B, 3, S, S) preprocessed images, or raw images (then :meth:`preprocess` is used).
            layers: 1-indexed blocks to tap.
            vv_start: first block of the V-V dual path (None: plain CLIP).
            batch_size: images per forward chunk (None: all at once).

        Returns:
            :class:`ClipImageTokens` with (B, 1+N, W) float32 tensors.
        """
        layer_t = self._check_layers(layers, vv_start)
        x = self._as_input(x)
        tokens: list[list[torch.Tensor]] = [[] for _ in layer_t]
        finals: list[torch.Tensor] = []
        for chunk in _chunks(x, batch_size):
            taps, final = self._tokens_one(chunk, layer_t, vv_start)
            for acc, t in zip(tokens, taps):
                acc.append(t.float())
            finals.append(final.float())
        return ClipImageTokens(
            tokens=[torch.cat(t) for t in tokens],
            final=torch.cat(finals),
            grid_size=self.grid_size,
            layers=layer_t,
        )

    def project_tokens(self, tokens: torch.Tensor, ln_post: bool = True) -> torch.Tensor:
        """``LN_post`` (optional) then ``@ proj``: (..., W) -> (..., D), float32."""
        visual = self.model.visual
        t = tokens.to(device=self.device, dtype=self.dtype)
        if ln_post:
            t = visual.ln_post(t)
        return (t @ visual.proj).float()

    @torch.no_grad()
    def encode_image(
        self,
        x: torch.Tensor | Sequence[ImageLike],
        layers: Sequence[int] = (6, 12, 18, 24),
        vv_start: int | None = None,
        global_ln_post: bool = False,
        *,
        batch_size: int | None = None,
    ) -> ClipImageFeatures:
        """Projected patch tokens of chosen blocks and the global image embedding.

        Args:
            x: (B, 3, S, S) preprocessed images, or raw images (then :meth:`preprocess` is used).
            layers: 1-indexed blocks to tap (AdaptCLIP (6, 12, 18, 24); AnomalyCLIP (24,)).
            vv_start: first block of the V-V dual path (ViT-L AdaptCLIP/AnomalyCLIP: 6; ViT-B:
                4); None runs plain CLIP.
            global_ln_post: apply ``LN_post`` to the CLS token before ``proj`` (standard CLIP
                ``encode_image``); the references use False.
            batch_size: images per forward chunk (None: all at once).

        Returns:
            :class:`ClipImageFeatures`: patch tokens (B, 1+N, D) per layer, global (B, D),
            float32.
        """
        layer_t = self._check_layers(layers, vv_start)
        x = self._as_input(x)
        visual = self.model.visual
        patch: list[list[torch.Tensor]] = [[] for _ in layer_t]
        glob: list[torch.Tensor] = []
        for chunk in _chunks(x, batch_size):
            taps, final = self._tokens_one(chunk, layer_t, vv_start)
            for acc, t in zip(patch, taps):
                acc.append((visual.ln_post(t) @ visual.proj).float())
            cls_tok = final[:, 0]
            if global_ln_post:
                cls_tok = visual.ln_post(cls_tok)
            glob.append((cls_tok @ visual.proj).float())
        return ClipImageFeatures(
            patch_tokens=[torch.cat(p) for p in patch],
            global_embedding=torch.cat(glob),
            grid_size=self.grid_size,
            layers=layer_t,
        )

    @torch.no_grad()
    def encode_windows(
        self,
        x: torch.Tensor | Sequence[ImageLike],
        index_sets: torch.Tensor,
        *,
        max_sequences: int = 4096,
    ) -> torch.Tensor:
        """WinCLIP window embeddings: CLS embedding of token-dropped sequences.

        For every image and window, the sequence ``[CLS] + patch tokens of the window`` (each
        token keeps the positional embedding of its grid position, after ``ln_pre``) runs
        through all blocks; the CLS output goes through ``LN_post`` and ``proj``.

        Args:
            x: (B, 3, S, S) preprocessed images, or raw images.
            index_sets: (M, n) long patch indices in [0, N), row-major over the grid.
            max_sequences: sequences (image x window) per forward chunk.

        Returns:
            (B, M, D) float32 window embeddings (not normalised).
        """
        idx = torch.as_tensor(index_sets, dtype=torch.long)
        if idx.ndim != 2 or idx.shape[1] == 0:
            raise ValueError(f"index_sets must be (M, n) with n >= 1, got {tuple(idx.shape)}")
        h, w = self.grid_size
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= h * w):
            raise ValueError(f"index_sets values must lie in [0, {h * w}) for a {h}x{w} grid")
        x = self._as_input(x)
        visual = self.model.visual
        emb = self._embed(x)  # (B, 1+N, W)
        b, _, width = emb.shape
        m, n = idx.shape
        win = emb[:, 1:][:, idx.to(emb.device)]  # (B, M, n, W)
        cls_tok = emb[:, :1].unsqueeze(1).expand(b, m, 1, width)
        seq = torch.cat([cls_tok, win], dim=2).reshape(b * m, 1 + n, width)
        outs: list[torch.Tensor] = []
        for chunk in _chunks(seq, max_sequences):
            for block in visual.transformer.resblocks:
                chunk = block(chunk)
            outs.append((visual.ln_post(chunk[:, 0]) @ visual.proj).float())
        return torch.cat(outs).reshape(b, m, -1)

    # ---------------------------------------------------------------- text

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """CLIP BPE token ids (SOT 49406, EOT 49407, zero padding).

        Returns:
            (T, context_length) long tensor on the CPU.
        """
        if isinstance(texts, str):
            texts = [texts]
        return open_clip.tokenize(list(texts), context_length=self.context_length)

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids (no positional embedding).

        Args:
            token_ids: (T, C) long.

        Returns:
            (T, C, W_text) float32 (for frozen prompt buffers: prefix / suffix).
        """
        ids = token_ids.to(device=self.device, dtype=torch.long)
        with torch.no_grad():
            return self.model.token_embedding(ids).float()

    @torch.no_grad()
    def encode_text(
        self, texts: Sequence[str] | torch.Tensor, *, batch_size: int | None = None
    ) -> torch.Tensor:
        """Text embeddings, equal to open_clip ``encode_text(normalize=False)``.

        Args:
            texts: strings, or (T, C) token ids.
            batch_size: prompts per forward chunk (None: all at once).

        Returns:
            (T, D) float32, not normalised.
        """
        ids = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        ids = ids.to(device=self.device, dtype=torch.long)
        outs = [
            self._text_forward(self.model.token_embedding(chunk), chunk, None)
            for chunk in _chunks(ids, batch_size)
        ]
        return torch.cat(outs)

    def encode_text_from_embeddings(
        self,
        prompt_embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Text embeddings from input embeddings (learnable prompts); gradients flow to them.

        Args:
            prompt_embeddings: (T, C, W_text) token embeddings before the positional embedding
                (e.g. ``[emb(SOS), learnable ctx, emb(suffix)]``).
            token_ids: (T, C) ids of the placeholder prompts: only their argmax (EOT) is used.
            deep_prompts: AnomalyCLIP deep prompts: tensor j (n_j, W_text) overwrites sequence
                positions 1..n_j of every prompt before text block j + 2 (1-indexed), i.e. for
                blocks 2 .. len + 1. AnomalyCLIP's official code rounds them to float16 first;
                do ``p.half().float()`` before passing them to reproduce it.

        Returns:
            (T, D) float32, not normalised.

        Raises:
            ValueError: wrong shapes, or more deep prompts than text blocks after the first.
        """
        t, c, w = prompt_embeddings.shape
        if c != self.context_length or w != self.text_width:
            raise ValueError(
                f"prompt_embeddings must be (T, {self.context_length}, {self.text_width}), "
                f"got {tuple(prompt_embeddings.shape)}"
            )
        if tuple(token_ids.shape) != (t, c):
            raise ValueError(
                f"token_ids must be ({t}, {c}) to match prompt_embeddings, got "
                f"{tuple(token_ids.shape)}"
            )
        if deep_prompts is not None:
            if len(deep_prompts) > self.num_text_layers - 1:
                raise ValueError(
                    f"{len(deep_prompts)} deep prompts but the text tower has only "
                    f"{self.num_text_layers} blocks (at most {self.num_text_layers - 1} allowed)"
                )
            for j, p in enumerate(deep_prompts):
                if p.ndim != 2 or p.shape[1] != w or not 1 <= p.shape[0] < c:
                    raise ValueError(
                        f"deep_prompts[{j}] must be (n, {w}) with 1 <= n < {c}, got "
                        f"{tuple(p.shape)}"
                    )
        x = prompt_embeddings.to(device=self.device, dtype=self.dtype)
        ids = token_ids.to(device=self.device, dtype=torch.long)
        return self._text_forward(x, ids, deep_prompts)

    def _text_forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None,
    ) -> torch.Tensor:
        """(T, C, W_text) embeddings -> (T, D) float32: positions, causal blocks, pool, proj."""
        m = self.model
        x = x.to(self.dtype) + m.positional_embedding.to(self.dtype)
        mask = m.attn_mask.to(device=x.device, dtype=x.dtype) if m.attn_mask is not None else None
        for i, block in enumerate(m.transformer.resblocks, start=1):
            if deep_prompts is not None and 2 <= i <= len(deep_prompts) + 1:
                p = deep_prompts[i - 2].to(device=x.device, dtype=x.dtype)
                n = p.shape[0]
                x = torch.cat(
                    [x[:, :1], p.unsqueeze(0).expand(x.shape[0], n, -1), x[:, 1 + n :]], 1
                )
            x = block(x, attn_mask=mask)
        x = m.ln_final(x)
        x = text_global_pool(x, token_ids, m.text_pool_type, eos_token_id=m.text_eos_id)
        proj = m.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x.float()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's "initialized randomly" warning (weights are loaded right after)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _build_open_clip(model_name: str, seed: int, **model_kwargs: object) -> nn.Module:
    """``open_clip.create_model(model_name)`` without weights, seeded, on the CPU in float32."""
    root = logging.getLogger()
    quiet = _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return open_clip.create_model(model_name, pretrained=None, **model_kwargs)
    finally:
        root.removeFilter(quiet)


def _first(v: int | Sequence[int]) -> int:
    return int(v if isinstance(v, int) else v[0])


def _chunks(x: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    if size is None or size >= x.shape[0]:
        return [x]
    if size <= 0:
        raise ValueError(f"batch size must be positive, got {size}")
    return list(torch.split(x, size))


def _check_supported(model: nn.Module) -> None:
    """Raise unless ``model`` is an open_clip CLIP with a plain CLS-pooled ViT image tower."""
    if not isinstance(model, CLIP):
        raise ValueError(f"ClipBackbone wraps open_clip.CLIP models, got {type(model).__name__}")
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"ClipBackbone needs a ViT image tower, got {type(visual).__name__} (ResNet/timm "
            "towers are not supported)"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError(
            "ClipBackbone needs CLS-token pooling (pool_type='tok', no attentional pooling, "
            "ln_post before pooling)"
        )
    if visual.proj is None:
        raise ValueError("ClipBackbone needs a vision projection (visual.proj)")


def build_clip_backbone(
    backbone: str | ClipBackbone,
    *,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: Precision | None = None,
) -> tuple[ClipBackbone, str]:
    """A detector's backbone from a preset name or a ready ``ClipBackbone``.

    Args:
        backbone: preset name (``clip_presets``) or an already built backbone (moved to ``device``).
        pretrained: weights overriding the preset's (None keeps the preset's).
        device: where the backbone runs.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``; None = fp32 for a preset name and the
            backbone's own for a ready one. A ready backbone is not converted: a precision
            different from its own is an error rather than silently ignored.

    Returns:
        (backbone, name to record in results).

    Raises:
        ValueError: ``precision`` differs from a ready backbone's.
    """
    if isinstance(backbone, ClipBackbone):
        if precision is not None and precision != backbone.precision:
            raise ValueError(
                f"precision={precision!r} differs from the given ClipBackbone's "
                f"{backbone.precision!r}; build the backbone with precision={precision!r} "
                "(ClipBackbone.create / from_preset) or leave precision unset"
            )
        return backbone.to(device), backbone.model_name or type(backbone).__name__
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a preset name or a ClipBackbone, got {type(backbone)}")
    overrides: dict[str, Any] = {"device": str(device), "precision": precision or "fp32"}
    if pretrained is not None:
        overrides["pretrained"] = pretrained
    return ClipBackbone.from_preset(backbone, **overrides), backbone


def check_taps(
    num_blocks: int, layers: Sequence[int], vv_start: int
) -> tuple[tuple[int, ...], int]:
    """Validate 1-indexed tap layers and the first V-V block against the tower's depth.

    Returns:
        (layers as a tuple of ints, vv_start as an int).
    """
    taps = tuple(int(i) for i in layers)
    if not taps or any(not 1 <= i <= num_blocks for i in taps):
        raise ValueError(f"layers {taps} must lie in 1..{num_blocks}")
    if not 1 <= int(vv_start) <= num_blocks:
        raise ValueError(f"vv_start={vv_start} must lie in 1..{num_blocks}")
    return taps, int(vv_start)
