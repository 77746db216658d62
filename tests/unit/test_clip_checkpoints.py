"""One checkpoint layout for AdaptCLIP adapters and AnomalyCLIP prompts; old files still load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from anomalens.detectors._adaptclip_checkpoint import (
    load_adapter_checkpoint,
    save_adapter_checkpoint,
)
from anomalens.detectors._adaptclip_modules import AdaptCLIPAdapters, AdapterConfig
from anomalens.detectors._anomalyclip_checkpoint import (
    load_prompt_checkpoint,
    save_prompt_checkpoint,
)
from anomalens.detectors._anomalyclip_modules import AnomalyCLIPPromptLearner, PromptConfig
from anomalens.detectors._checkpoint import LAYOUT_VERSION, parse_metadata

ADAPTER_CFG = AdapterConfig(embed_dim=32, text_width=16, n_ctx=4, mid_dim=8, num_layers=2)
PROMPT_CFG = PromptConfig(text_width=8, n_ctx=4, depth=3, t_n_ctx=2)


def _adapters() -> AdaptCLIPAdapters:
    torch.manual_seed(0)
    return AdaptCLIPAdapters(ADAPTER_CFG)


def _prompts() -> AnomalyCLIPPromptLearner:
    torch.manual_seed(0)
    return AnomalyCLIPPromptLearner(PROMPT_CFG)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_both_methods_write_the_same_layout(tmp_path: Path) -> None:
    adapters, prompts = _adapters(), _prompts()
    extra = {"backbone": "tiny", "epoch": 3, "settings": {"lr": 0.01, "layers": [2, 4]}}
    a = save_adapter_checkpoint(
        tmp_path / "a.safetensors", adapters.state_dict(), ADAPTER_CFG, extra
    )
    p = save_prompt_checkpoint(tmp_path / "p.safetensors", prompts.state_dict(), PROMPT_CFG, extra)
    meta_a, meta_p = _metadata(a), _metadata(p)
    assert meta_a.keys() == meta_p.keys() == {"format", "layout", "kind", "config", "extra"}
    assert meta_a["layout"] == meta_p["layout"] == LAYOUT_VERSION
    assert json.loads(meta_a["extra"]) == json.loads(meta_p["extra"]) == extra
    sd_a, info_a = load_adapter_checkpoint(a)
    sd_p, info_p = load_prompt_checkpoint(p)
    assert _equal(sd_a, adapters.state_dict()) and _equal(sd_p, prompts.state_dict())
    assert info_a.kind == "adaptclip.adapters" and info_a.config == ADAPTER_CFG.to_dict()
    assert info_p.kind == "anomalyclip.prompts" and info_p.config == PROMPT_CFG.to_dict()
    assert info_a.extra == info_p.extra == extra
    # integer buffers keep their dtype (BatchNorm counters, token ids)
    assert sd_a["textual.token_ids"].dtype == torch.long
    # a file of the other method is refused by name, before any key mapping
    with pytest.raises(ValueError, match=r"p\.safetensors.*anomalyclip\.prompts"):
        load_adapter_checkpoint(p)
    with pytest.raises(ValueError, match=r"a\.safetensors.*adaptclip\.adapters"):
        load_prompt_checkpoint(a)


def test_layout_1_files_still_load(tmp_path: Path) -> None:
    """The metadata the two methods wrote before the shared layout, byte for byte as then."""
    adapters, prompts = _adapters(), _prompts()
    old_a = tmp_path / "old_adapters.safetensors"
    save_file(
        {k: v.contiguous() for k, v in adapters.state_dict().items()},
        str(old_a),
        metadata={
            "format": "anomalens.adaptclip.adapters",
            "config": json.dumps(ADAPTER_CFG.to_dict()),
            "backbone": "adaptclip-vitl14-336@518",
            "source": "untrained",
        },
    )
    old_p = tmp_path / "old_prompts.safetensors"
    save_file(
        {k: v.float().contiguous() for k, v in prompts.state_dict().items()},
        str(old_p),
        metadata={
            "format": "anomalens-anomalyclip-v1",
            **{k: str(v) for k, v in PROMPT_CFG.to_dict().items()},
            "extra": json.dumps({"backbone": "tiny", "epoch": 15}, sort_keys=True),
        },
    )
    sd_a, info_a = load_adapter_checkpoint(old_a)
    assert _equal(sd_a, adapters.state_dict())
    assert (info_a.kind, info_a.layout) == ("adaptclip.adapters", "1") and info_a.ours
    assert info_a.config == ADAPTER_CFG.to_dict()
    assert info_a.extra == {"backbone": "adaptclip-vitl14-336@518", "source": "untrained"}
    sd_p, info_p = load_prompt_checkpoint(old_p)
    assert _equal(sd_p, prompts.state_dict())
    assert (info_p.kind, info_p.layout) == ("anomalyclip.prompts", "1")
    assert info_p.config == PROMPT_CFG.to_dict()
    assert info_p.extra == {"backbone": "tiny", "epoch": 15}


def test_foreign_and_broken_metadata() -> None:
    official = parse_metadata({"format": "flattened official AdaptCLIP checkpoint"})
    assert not official.ours and official.layout is None and official.config == {}
    assert not parse_metadata({}).ours
    with pytest.raises(ValueError, match="metadata"):
        parse_metadata({"format": "anomalens", "kind": "adaptclip.adapters", "config": "{"})


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = _prompts()
    path = save_prompt_checkpoint(tmp_path / "p.safetensors", prompts.state_dict(), PROMPT_CFG)
    before = path.read_bytes()
    with torch.no_grad():
        prompts.ctx_normal.add_(1.0)

    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt("simulated interruption before the rename")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_prompt_checkpoint(path, prompts.state_dict(), PROMPT_CFG)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left
