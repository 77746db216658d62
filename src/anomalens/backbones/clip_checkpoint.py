"""CLIP checkpoints: reading files, the OpenAI key layout, strict loading, weightless builds.

* :func:`load_state_dict_file` reads safetensors, ``torch.save`` files (``weights_only=True`` by
  default) and OpenAI's TorchScript archives (through :mod:`anomalens.backbones.torchscript`,
  no TorchScript code runs) into a plain state dict;
* :func:`openai_clip_config` infers the architecture of an OpenAI-layout ViT CLIP from its shapes;
* :func:`load_clip_state_dict` loads a state dict strictly into an ``open_clip.CLIP``;
* :func:`build_open_clip` builds an open_clip architecture without weights, seeded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP
from torch import nn

from anomalens.backbones.torchscript import is_torchscript_archive, read_torchscript_state_dict

__all__ = [
    "OPENAI_JIT_ONLY_KEYS",
    "build_open_clip",
    "load_clip_state_dict",
    "load_state_dict_file",
    "openai_clip_config",
]

#: Scalars stored in OpenAI's TorchScript ``state_dict()`` that are not parameters.
OPENAI_JIT_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


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


def load_clip_state_dict(model: CLIP, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load an open_clip/OpenAI-layout state dict into ``model`` (float values cast).

    Args:
        model: the open_clip model (modified in place).
        state_dict: ``{key: tensor}`` (not modified); OpenAI's JIT-only scalars are ignored and a
            0-d ``logit_scale`` is reshaped to the model's.
        source: where the weights come from, for the error message.

    Raises:
        RuntimeError: missing, unexpected or mis-shaped keys (the message names ``source``).
    """
    sd = dict(state_dict)
    for key in OPENAI_JIT_ONLY_KEYS:
        sd.pop(key, None)
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"weights {source} do not fit the CLIP architecture: {exc}") from exc


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's "initialized randomly" warning (weights are loaded right after)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def build_open_clip(model_name: str, seed: int, **model_kwargs: object) -> nn.Module:
    """``open_clip.create_model(model_name)`` without weights, seeded, on the CPU in float32.

    The global RNG state is restored afterwards; open_clip's "initialized randomly" warning is
    silenced for the call.
    """
    root = logging.getLogger()
    quiet = _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return open_clip.create_model(model_name, pretrained=None, **model_kwargs)
    finally:
        root.removeFilter(quiet)
