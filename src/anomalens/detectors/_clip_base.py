"""Shared set-up of the detectors on a frozen, tapped CLIP (AdaptCLIP, AnomalyCLIP)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anomalens.data.io import ImageLike
from anomalens.detectors.base import Detector

if TYPE_CHECKING:
    from anomalens.backbones.clip import ClipBackbone

__all__ = ["FrozenClipDetector", "resolve_method_checkpoint", "untrained_marker"]

#: Sizes of the backbone the official checkpoints were trained on (OpenAI ViT-L/14@336):
#: vision blocks, vision width, joint embedding width, text width.
_OFFICIAL_SIZES = {"num_layers": 24, "vision_width": 1024, "embed_dim": 768, "text_width": 768}


def untrained_marker(method: str, what: str) -> str:
    """The note every output of an untrained run carries (config, run.json, report)."""
    return (
        f"UNTRAINED {method}: random {what} (untrained=True); scores are not meaningful, "
        "for tests and smoke runs only"
    )


def resolve_method_checkpoint(
    method: str, checkpoint: str | os.PathLike[str], what: str
) -> tuple[Path, str | None]:
    """Local file of a method checkpoint given as a file, catalogue name, URL or hf-hub id.

    Args:
        method: detector name; a catalogue name made for another method is refused.
        checkpoint: the ``checkpoint`` option.
        what: what the file holds, for messages ("AdaptCLIP adapters").

    Returns:
        (local file, catalogue name or None).

    Raises:
        FileNotFoundError: a local file that does not exist (names it).
        WeightNotAvailableError: a name or URL not cached and not fetchable now (names the
            file, the cache folder and the download command).
        ValueError: a catalogue name of another method's checkpoint.
    """
    from anomalens.backbones.catalogue import WEIGHTS, checkpoint_names
    from anomalens.backbones.weights import resolve_weights

    src = os.fspath(checkpoint)
    spec = next((w for w in WEIGHTS if w.name == src), None)
    if spec is not None and spec.method not in (None, method):
        names = ", ".join(checkpoint_names(method)) or "(none)"
        raise ValueError(
            f"checkpoint {src!r} holds {spec.method} weights, not {what}; {method} checkpoints "
            f"in the catalogue: {names}"
        )
    if spec is not None or src.startswith(("hf-hub:", "http://", "https://", "file://")):
        return resolve_weights(src), (src if spec is not None else None)
    path = Path(src).expanduser()
    if not path.is_file():
        names = ", ".join(checkpoint_names(method))
        raise FileNotFoundError(
            f"{what} checkpoint {path} "
            + ("is a folder, not a file" if path.is_dir() else "does not exist")
            + (f"; the catalogue names {names} are fetched and cached" if names else "")
        )
    return path, None


class FrozenClipDetector(Detector):
    """A :class:`Detector` whose image encoder is a frozen CLIP read at a few tapped blocks.

    Subclasses call :meth:`_init_clip` in their constructor, then use :meth:`encode`.
    """

    backbone: ClipBackbone
    backbone_name: str
    precision: str
    batch_size: int
    layers: tuple[int, ...]
    vv_start: int
    global_ln_post: bool

    def _init_clip(
        self,
        backbone: str | ClipBackbone,
        *,
        batch_size: int,
        layers: Sequence[int] | None,
        vv_start: int | None,
        default_layers: Callable[[int], Sequence[int]],
        default_vv_start: Callable[[int], int],
        global_ln_post: bool,
    ) -> None:
        """Build (or take) the backbone, freeze it and validate the taps.

        Args:
            backbone: CLIP preset name or a ready ``ClipBackbone``.
            batch_size: images per forward pass (>= 1).
            layers: 1-indexed tapped blocks (None: ``default_layers(depth)``).
            vv_start: first block of the V-V path (None: ``default_vv_start(depth)``).
            default_layers: the method's default taps for a tower depth.
            default_vv_start: the method's default V-V start for a tower depth.
            global_ln_post: apply ``ln_post`` to the global embedding.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from anomalens.backbones.clip import build_clip_backbone, check_taps

        # a preset name is built with the preset's own weights in fp32;
        # ``create_detector(..., weights=..., precision=...)`` builds other variants
        self.backbone, self.backbone_name = build_clip_backbone(backbone, device=self.device)
        self.backbone.eval().requires_grad_(False)
        # a ready ClipBackbone keeps its own dtype: record what actually runs
        self.precision = str(self.backbone.precision)
        self.batch_size = batch_size
        self.image_size = int(self.backbone.image_size)
        depth = int(self.backbone.num_layers)
        self.layers, self.vv_start = check_taps(
            depth,
            layers or default_layers(depth),
            vv_start if vv_start is not None else default_vv_start(depth),
        )
        self.global_ln_post = global_ln_post

    def fits_official_checkpoints(self) -> bool:
        """Whether the backbone has the sizes of the official checkpoints' (ViT-L/14@336)."""
        return all(int(getattr(self.backbone, k)) == v for k, v in _OFFICIAL_SIZES.items())

    def _pick_checkpoint(
        self, checkpoint: str | os.PathLike[str] | None, untrained: bool, what: str
    ) -> tuple[Path | None, str | None]:
        """The checkpoint to load: the given one, the official default, or none (untrained).

        Args:
            checkpoint: the ``checkpoint`` option (None: the catalogue default).
            untrained: the ``untrained`` option (random weights on purpose).
            what: what the checkpoint holds, for messages ("AdaptCLIP adapters").

        Returns:
            (local file, catalogue name) or (None, None) for an untrained detector.

        Raises:
            ValueError: both ``checkpoint`` and ``untrained``, or no default for this backbone.
            WeightNotAvailableError: the default is not cached and cannot be fetched now.
        """
        from anomalens.backbones.catalogue import default_checkpoint
        from anomalens.backbones.weights import WeightNotAvailableError

        if untrained:
            if checkpoint is not None:
                raise ValueError(
                    f"give either checkpoint= or untrained=True, not both ({self.name})"
                )
            return None, None
        if checkpoint is not None:
            return resolve_method_checkpoint(self.name, checkpoint, what)
        default = default_checkpoint(self.name)
        if default is None or not self.fits_official_checkpoints():
            raise ValueError(
                f"{self.name} needs trained {what}: backbone {self.backbone_name!r} has no "
                "official checkpoint (those are for OpenAI ViT-L/14@336). Pass --checkpoint "
                f"FILE (e.g. from `anomalens train {self.name}`), or --untrained "
                "(untrained=True) to run with random weights, for tests only"
            )
        try:
            return resolve_method_checkpoint(self.name, default, what)
        except WeightNotAvailableError as exc:
            raise WeightNotAvailableError(
                f"{exc} ({self.name} uses the official checkpoint {default!r} by default; "
                "--checkpoint FILE picks another, --untrained runs with random weights for "
                "tests only)"
            ) from exc

    def encode(self, images: Sequence[ImageLike] | torch.Tensor) -> Any:
        """Preprocess (unless given a (B, 3, S, S) tensor) and run the frozen image encoder.

        Returns:
            ``ClipImageFeatures``: ``patch_tokens`` per tapped layer (B, 1+N, D), the V-V
            stream, and ``global_embedding`` (B, D).
        """
        x = (
            images
            if isinstance(images, torch.Tensor)
            else self.backbone.preprocess(images, device=self.device)
        )
        with torch.no_grad():
            return self.backbone.encode_image(
                x.to(self.device),
                layers=self.layers,
                vv_start=self.vv_start,
                global_ln_post=self.global_ln_post,
            )
