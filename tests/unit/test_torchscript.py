"""Reading TorchScript archives (OpenAI's CLIP releases) without running TorchScript."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from anomalens.backbones.clip import load_state_dict_file
from anomalens.backbones.torchscript import is_torchscript_archive, read_torchscript_state_dict


class Block(nn.Module):
    """Like OpenAI's residual block: a plain tensor attribute (attn_mask) beside parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.attn_mask = torch.full((3, 3), float("-inf")).triu(1)  # not a parameter/buffer
        self.register_buffer("scale", torch.tensor([0.5, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(x)) * self.scale[0] + self.attn_mask.sum()


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.proj = nn.Parameter(torch.randn(4, 3).half())
        self.t = nn.Parameter(torch.randn(6, 5)[:, 1:4])  # a non-contiguous view
        self.input_resolution = nn.Parameter(torch.tensor(224), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x) @ self.proj.float() + self.t.sum()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ts") / "tower.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated: fine for a fixture
        torch.jit.script(Tower()).save(str(path))
    return path


def test_equals_torch_jit_load_state_dict(archive: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated; used here as the reference only
        ref = torch.jit.load(str(archive), map_location="cpu").state_dict()
    got = read_torchscript_state_dict(archive)
    assert set(got) == set(ref)
    assert "blocks.0.attn_mask" not in got and "blocks.1.scale" in got
    for key, value in ref.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_clip_file_reader_never_calls_torch_jit_load(
    archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert is_torchscript_archive(archive)
    expected = read_torchscript_state_dict(archive)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    sd = load_state_dict_file(archive)
    assert "input_resolution" not in sd  # OpenAI's JIT-only scalar is dropped
    assert set(sd) == set(expected) - {"input_resolution"}


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_asking_for_other_globals_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps(_Evil(), protocol=2))
        zf.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("evil/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n")
    with pytest.raises(ValueError, match=r"refusing to load (posix|os|nt)\.system"):
        read_torchscript_state_dict(path)
    with pytest.raises(ValueError, match="refusing"):
        load_state_dict_file(path)


def test_not_an_archive(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    assert not is_torchscript_archive(plain)
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        read_torchscript_state_dict(plain)
