"""The CLIP backbone object: a frozen open_clip ViT CLIP with an explicit, tapped forward.

:class:`ClipBackbone` wraps an ``open_clip.CLIP`` model (ViT image tower) and runs an explicit
forward over its modules (no hooks), so that it can

* take patch tokens after chosen blocks (copies, never views of a tensor that is updated later);
* run the V-V ("DPAM" / CLIP-surgery) dual path from a chosen block on;
* run the vision tower at an input size other than the pretrained one, with the positional
  embedding resized as the reference code of the method does (``pos_embed_mode``: bilinear for
  AdaptCLIP / AnomalyCLIP, bicubic for MuSc; ``align_corners=False``, no antialias, CLS row kept);
* encode text from token ids, from spliced learnable prompt embeddings, with deep prompts;
* encode WinCLIP windows as token-dropped sequences.

The class holds the state (model, sizes, preprocessing, precision) and the public methods; the
computations live in :mod:`~anomalens.backbones.clip_vision` (tapped tower, V-V path, windows),
:mod:`~anomalens.backbones.clip_text` (text tower), :mod:`~anomalens.backbones.pos_embed`
(position resize), :mod:`~anomalens.backbones.clip_checkpoint` (files, OpenAI layout, strict
loading) and :mod:`~anomalens.backbones.clip_weights` (pretrained tags, offline first).

Block numbers are **1-indexed** (``layers=(6, 12, 18, 24)`` taps blocks 6, 12, 18 and 24).
See ``docs/clip_backbone.md`` for the contract and the presets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import QuickGELU
from torch import nn

from anomalens.backbones.clip_checkpoint import (
    build_open_clip,
    load_clip_state_dict,
    load_state_dict_file,
    openai_clip_config,
)
from anomalens.backbones.clip_configs import TINY_CLIP_NAME, register_tiny_clip
from anomalens.backbones.clip_presets import ClipPreset, get_clip_preset
from anomalens.backbones.clip_text import check_prompt_inputs, text_forward
from anomalens.backbones.clip_vision import (
    ClipImageFeatures,
    ClipImageTokens,
    check_supported_clip,
    check_vv_blocks,
    chunks,
    encode_window_sequences,
    run_tapped,
    tap_blocks,
)
from anomalens.backbones.clip_weights import resolve_clip_pretrained
from anomalens.backbones.pos_embed import (
    POS_EMBED_MODES,
    PosEmbedMode,
    resize_positional_embedding,
)
from anomalens.backbones.precision import Precision, precision_dtype, precision_name
from anomalens.data.io import ImageLike
from anomalens.data.transforms import CLIP_MEAN, CLIP_STD, to_batch

__all__ = ["ClipBackbone"]


def _first(v: int | Sequence[int]) -> int:
    return int(v if isinstance(v, int) else v[0])


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
        pos_embed_mode: interpolation of the positional-embedding resize (``"bilinear"`` or
            ``"bicubic"``).
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
        pos_embed_mode: PosEmbedMode = "bilinear",
    ) -> None:
        """Wrap an open_clip ``CLIP`` (fp32 on any device); it is modified in place.

        The model's positional embedding at wrapping time is taken as the pretrained one: every
        later :meth:`set_image_size` resizes from it.

        Args:
            model: ``open_clip.CLIP`` with a ``VisionTransformer`` image tower.
            image_size: input side S; None keeps the model's own size.
            precision: weight/activation dtype.
            device: target device.
            mean, std, interpolation: preprocessing (see :meth:`preprocess`).
            model_name, pretrained: recorded for :meth:`describe`.
            pos_embed_mode: positional-embedding resize (see
                :func:`~anomalens.backbones.pos_embed.resize_positional_embedding`).
        """
        super().__init__()
        check_supported_clip(model)
        dtype = precision_dtype(precision)
        if pos_embed_mode not in POS_EMBED_MODES:
            raise ValueError(
                f"pos_embed_mode must be one of {POS_EMBED_MODES}, got {pos_embed_mode!r}"
            )
        self.model = model.float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model_name = model_name
        self.pretrained = pretrained
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self.pos_embed_mode: PosEmbedMode = pos_embed_mode
        visual = self.model.visual
        # the pretrained positional embedding, float32 on the CPU: every resize starts from it
        self._native_pos_embed = visual.positional_embedding.detach().float().cpu().clone()
        self._native_grid: tuple[int, int] = tuple(visual.grid_size)
        self.model.to(device=torch.device(device), dtype=dtype)
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
        pos_embed_mode: PosEmbedMode = "bilinear",
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
            pos_embed_mode: positional-embedding resize (``"bilinear"`` or ``"bicubic"``).

        Raises:
            WeightNotAvailableError: weights not on disk/cached and offline (or download failed).
        """
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
            path, tag_cfg = resolve_clip_pretrained(model_name, pretrained, cache_dir)
        kwargs: dict[str, object] = {}
        if force_quick_gelu is not None:
            kwargs["quick_gelu"] = bool(force_quick_gelu)
        elif tag_cfg.get("quick_gelu"):
            kwargs["quick_gelu"] = True
        model = build_open_clip(model_name, 0 if seed is None else seed, **kwargs)
        if not isinstance(model, CLIP):
            raise ValueError(
                f"open_clip model {model_name!r} is a {type(model).__name__}; ClipBackbone "
                "supports open_clip.CLIP models with a ViT image tower"
            )
        if path is not None:
            load_clip_state_dict(
                model, load_state_dict_file(path, weights_only=weights_only), str(path)
            )
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
            pos_embed_mode=pos_embed_mode,
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
        pos_embed_mode: PosEmbedMode = "bilinear",
    ) -> ClipBackbone:
        """Build from a state dict in OpenAI's key layout (e.g. ``ViT-L-14-336px.pt``).

        The architecture is inferred from the shapes (:func:`openai_clip_config`); float16
        values are loaded into float32 parameters (exact); the TorchScript-only scalars are
        ignored; loading is strict.

        Args:
            state_dict: ``{key: tensor}`` (not modified).
            image_size: input side S; None keeps the checkpoint's size.
            quick_gelu: QuickGELU MLP activation (True for OpenAI weights).
            precision, device, mean, std, interpolation, pos_embed_mode: as in :meth:`create`.
        """
        cfg = openai_clip_config(state_dict)
        model = CLIP(
            embed_dim=cfg["embed_dim"],
            vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),  # type: ignore[arg-type]
            text_cfg=CLIPTextCfg(**cfg["text_cfg"]),  # type: ignore[arg-type]
            quick_gelu=quick_gelu,
        )
        load_clip_state_dict(model, state_dict, "openai state dict")
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
            pos_embed_mode=pos_embed_mode,
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
            **kwargs: ``mean``, ``std``, ``interpolation``, ``model_name``, ``pretrained``,
                ``pos_embed_mode``.
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
        return precision_name(self.dtype)

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
            "pos_embed_mode": self.pos_embed_mode,
        }

    def train(self, mode: bool = True) -> ClipBackbone:
        """The backbone is frozen: the wrapped model stays in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.model.eval()
        return self

    def set_image_size(self, image_size: int) -> None:
        """Resize the positional embedding for inputs of ``image_size`` x ``image_size``.

        Always resizes from the pretrained embedding (``pos_embed_mode`` interpolation,
        ``align_corners=False``, no antialias, CLS row kept); updates ``visual.grid_size`` and
        ``visual.image_size``.

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
        new = resize_positional_embedding(
            self._native_pos_embed, self._native_grid, grid, self.pos_embed_mode
        )
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
        """Raw images (preprocessed) or a (B, 3, S, S) tensor -> the model's device and dtype."""
        if not isinstance(x, torch.Tensor):
            x = self.preprocess(x, device=self.device)
        s = self.image_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (s, s):
            raise ValueError(
                f"expected images of shape (B, 3, {s}, {s}), got {tuple(x.shape)}; use "
                "preprocess() or set_image_size()"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def _check_layers(self, layers: Sequence[int], vv_start: int | None) -> tuple[int, ...]:
        out = tap_blocks(self.num_layers, layers, vv_start)
        if vv_start is not None:
            check_vv_blocks(self.model.visual, vv_start)
        return out

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
        for chunk in chunks(x, batch_size):
            taps, final = run_tapped(self.model.visual, chunk, layer_t, vv_start)
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
        for chunk in chunks(x, batch_size):
            taps, final = run_tapped(visual, chunk, layer_t, vv_start)
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
        return encode_window_sequences(self.model.visual, self._as_input(x), idx, max_sequences)

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
            text_forward(self.model, self.model.token_embedding(chunk), chunk, None, self.dtype)
            for chunk in chunks(ids, batch_size)
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
        check_prompt_inputs(
            prompt_embeddings,
            token_ids,
            deep_prompts,
            context_length=self.context_length,
            text_width=self.text_width,
            num_text_layers=self.num_text_layers,
        )
        x = prompt_embeddings.to(device=self.device, dtype=self.dtype)
        ids = token_ids.to(device=self.device, dtype=torch.long)
        return text_forward(self.model, x, ids, deep_prompts, self.dtype)
