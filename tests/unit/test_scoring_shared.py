"""The scoring pieces shared by WinCLIP, AdaptCLIP, AnomalyCLIP and MuSc: one home each."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anomalens.scoring.aggregate import harmonic_mean
from anomalens.scoring.maps import upsample
from anomalens.scoring.similarity import DEFAULT_TEMPERATURE, image_logits


def test_harmonic_mean_tensor_and_sequence_agree_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 5, 4, 4, generator=g) + 0.01
    by_dim = harmonic_mean(x, dim=1)
    by_seq = harmonic_mean(list(x.unbind(1)))
    assert torch.equal(by_dim, by_seq)
    expected = 5 / (1 / x.double()).sum(dim=1)
    assert torch.allclose(by_dim.double(), expected, rtol=1e-6)


def test_harmonic_mean_broadcasts_a_sequence() -> None:
    a = torch.tensor([[1.0, 2.0]])
    b = torch.tensor([[4.0]])  # (1, 1) broadcast against (1, 2)
    assert torch.allclose(harmonic_mean([a, b]), torch.tensor([[1.6, 8 / 3]]))


def test_harmonic_mean_edge_cases_give_zero() -> None:
    # one policy for every caller: a zero term gives the limit 0; NaN / inf results give 0
    x = torch.tensor([[1.0, 0.0], [float("nan"), 2.0], [-1.0, 1.0], [float("inf"), 1.0]])
    out = harmonic_mean(x, dim=1)
    assert out[0] == 0.0  # zero term
    assert out[1] == 0.0  # NaN term
    assert out[2] == 0.0  # 1/-1 + 1/1 = 0 -> 2 / 0 = inf -> 0
    assert out[3].item() == pytest.approx(2.0)  # an infinite term contributes 1/inf = 0
    assert torch.isfinite(out).all()


def test_harmonic_mean_dtypes_and_errors() -> None:
    half = torch.tensor([1.0, 3.0], dtype=torch.float16)
    assert harmonic_mean(half).dtype == torch.float32
    assert harmonic_mean(half.double()).dtype == torch.float64
    assert harmonic_mean(torch.tensor([1.0, 3.0])).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="at least one"):
        harmonic_mean([])
    with pytest.raises(ValueError, match="at least one"):
        harmonic_mean(torch.zeros(2, 0), dim=1)


def test_upsample_channels_and_align_corners() -> None:
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(2, 3, 4, 5, generator=g)
    out = upsample(maps, (8, 10))
    assert out.shape == (2, 3, 8, 10)
    ref = F.interpolate(maps, size=(8, 10), mode="bilinear", align_corners=False)
    assert torch.equal(out, ref)
    # each channel is resized alone: the (B, h, w) form gives the same values per channel
    assert torch.equal(out[:, 1], upsample(maps[:, 1], (8, 10)))
    corners = upsample(maps[:, 0].double(), 13, align_corners=True)
    assert corners.dtype == torch.float64 and corners.shape == (2, 13, 13)
    # align_corners=True keeps the corner values exactly
    assert torch.equal(corners[:, 0, 0], maps[:, 0, 0, 0].double())
    assert torch.equal(corners[:, -1, -1], maps[:, 0, -1, -1].double())
    assert not torch.allclose(corners.float(), upsample(maps[:, 0], 13))
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        upsample(torch.zeros(4, 4), 8)


def test_image_logits_are_cosines_over_the_temperature() -> None:
    g = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logits = image_logits(g, text)
    assert DEFAULT_TEMPERATURE == 0.07
    expected = torch.tensor([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)]]) / 0.07
    assert torch.allclose(logits, expected)
    assert torch.allclose(image_logits(g, text, temperature=1.0), expected * 0.07)
    g.requires_grad_(True)
    image_logits(g, text)[:, 1].sum().backward()
    assert g.grad is not None and torch.isfinite(g.grad).all()
