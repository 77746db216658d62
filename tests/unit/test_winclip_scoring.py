"""WinCLIP pure parts: prompt ensemble, window sets, harmonic aggregation, similarity scores."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from anomalens.prompts.encode import encode_prompt_ensemble, winclip_text_prototypes
from anomalens.prompts.templates import (
    ANOMALIB_TEMPLATES,
    ANOMALOUS_STATES,
    NORMAL_STATES,
    PAPER_TEMPLATES,
    compositional_prompts,
    get_templates,
    object_name_from_category,
)
from anomalens.scoring.aggregate import (
    harmonic_mean,
    harmonic_window_aggregate,
    window_index_sets,
)
from anomalens.scoring.similarity import (
    cosine_similarity,
    nearest_cosine_distance,
    two_class_anomaly_probability,
)

# ----------------------------------------------------------------------------- prompts


def test_state_and_template_counts() -> None:
    assert len(NORMAL_STATES) == 7
    assert len(ANOMALOUS_STATES) == 4
    assert len(PAPER_TEMPLATES) == 22
    assert len(set(PAPER_TEMPLATES)) == 22
    assert len(ANOMALIB_TEMPLATES) == 21
    assert len(set(ANOMALIB_TEMPLATES)) == 20
    assert set(PAPER_TEMPLATES) - set(ANOMALIB_TEMPLATES) == {
        "a cropped photo of a {}.",
        "a jpeg corrupted photo of a {}.",
    }
    assert get_templates("paper22") is PAPER_TEMPLATES
    assert get_templates("anomalib21") is ANOMALIB_TEMPLATES
    with pytest.raises(ValueError, match="paper22"):
        get_templates("paper23")


@pytest.mark.parametrize(
    ("templates", "n_normal", "n_anom"), [("paper22", 154, 88), ("anomalib21", 147, 84)]
)
def test_compositional_prompt_counts(templates: str, n_normal: int, n_anom: int) -> None:
    tpl = get_templates(templates)
    normal = compositional_prompts("bottle", NORMAL_STATES, tpl)
    anomalous = compositional_prompts("bottle", ANOMALOUS_STATES, tpl)
    assert (len(normal), len(anomalous)) == (n_normal, n_anom)
    assert normal[0] == "a cropped photo of the bottle."
    assert anomalous[0] == "a cropped photo of the damaged bottle."
    assert anomalous[-1] == "a photo of a bottle with damage for anomaly detection."
    assert all("bottle" in p and "{" not in p for p in normal + anomalous)


def test_compositional_prompts_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="class_name"):
        compositional_prompts("  ", NORMAL_STATES, PAPER_TEMPLATES)
    with pytest.raises(ValueError, match="placeholder"):
        compositional_prompts("x", ("no slot",), PAPER_TEMPLATES)


def test_object_name_from_category() -> None:
    assert object_name_from_category("metal_nut") == "metal nut"
    assert object_name_from_category("pcb1") == "pcb1"
    assert object_name_from_category("") == "object"


class _TableEncoder:
    """Text encoder looking embeddings up in a dict; records batch sizes."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.calls: list[int] = []

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls.append(len(texts))
        return torch.tensor([self.table[t] for t in texts])


def test_prompt_ensemble_raw_vs_normalized_average() -> None:
    enc = _TableEncoder({"a": [2.0, 0.0], "b": [0.0, 1.0]})
    raw = encode_prompt_ensemble(enc, ["a", "b"], average="raw")
    # mean (1, 0.5) -> normalised (2, 1) / sqrt(5)
    torch.testing.assert_close(raw, torch.tensor([2.0, 1.0]) / math.sqrt(5.0))
    norm = encode_prompt_ensemble(enc, ["a", "b"], average="normalized", batch_size=1)
    torch.testing.assert_close(norm, torch.tensor([1.0, 1.0]) / math.sqrt(2.0))
    assert enc.calls == [2, 1, 1]


def test_winclip_text_prototypes_use_each_class_prompts() -> None:
    templates = ("a photo of a {}.",)
    normal = compositional_prompts("cup", NORMAL_STATES, templates)
    anomalous = compositional_prompts("cup", ANOMALOUS_STATES, templates)
    table = {p: [1.0, 0.0, 0.0] for p in normal} | {p: [0.0, 0.0, 3.0] for p in anomalous}
    table[normal[0]] = [1.0, 7.0, 0.0]  # mean of normal = (1, 1, 0)
    protos = winclip_text_prototypes(_TableEncoder(table), "cup", templates=templates)
    s = 1.0 / math.sqrt(2.0)
    torch.testing.assert_close(protos, torch.tensor([[s, s, 0.0], [0.0, 0.0, 1.0]]))


# ----------------------------------------------------------------------------- windows


def test_window_index_sets_small_grid_by_hand() -> None:
    sets = window_index_sets(3, 2)
    assert sets.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert window_index_sets((2, 3), 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5]]
    assert window_index_sets(3, 3).tolist() == [list(range(9))]


def test_window_index_sets_winclip_counts_and_stride() -> None:
    assert tuple(window_index_sets(15, 2).shape) == (196, 4)
    assert tuple(window_index_sets(15, 3).shape) == (169, 9)
    # stride 2 on 5 patches with k=2: starts 0, 2 and the border window 3
    s = window_index_sets(5, 2, stride=2)
    assert s.shape[0] == 9
    assert s[:, 0].tolist() == [0, 2, 3, 10, 12, 13, 15, 17, 18]
    assert torch.bincount(s.reshape(-1), minlength=25).min() >= 1  # every patch covered
    with pytest.raises(ValueError, match="scale"):
        window_index_sets(3, 4)


def test_harmonic_window_aggregate_by_hand() -> None:
    sets = window_index_sets(3, 2)
    scores = torch.tensor([[0.5, 0.25, 1.0, 0.2]])
    out = harmonic_window_aggregate(scores, sets, 9)
    # patch 1: windows 0,1 -> 2/(2+4); patch 4: all -> 4/(2+4+1+5); patch 5: 2/(4+5); patch 3: 2/(2+1)
    expected = torch.tensor([[0.5, 1 / 3, 0.25, 2 / 3, 1 / 3, 2 / 9, 1.0, 1 / 3, 0.2]])
    torch.testing.assert_close(out, expected)


def test_harmonic_window_aggregate_zero_score_and_batch() -> None:
    sets = window_index_sets(3, 2)
    scores = torch.tensor([[0.5, 0.25, 1.0, 0.2], [0.0, 1.0, 1.0, 1.0]])
    out = harmonic_window_aggregate(scores, sets, 9)
    assert torch.isfinite(out).all()
    # row 1: every patch covered by window 0 (patches 0, 1, 3, 4) gets 0, the others 1
    assert out[1].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(out[0, 4], torch.tensor(1 / 3))
    with pytest.raises(ValueError, match="index sets"):
        harmonic_window_aggregate(scores[:, :3], sets, 9)


def test_harmonic_window_aggregate_constant_is_fixed_point() -> None:
    sets = window_index_sets(15, 3)
    out = harmonic_window_aggregate(torch.full((2, sets.shape[0]), 0.3), sets, 225)
    torch.testing.assert_close(out, torch.full((2, 225), 0.3))


def test_harmonic_mean_broadcast_by_hand() -> None:
    a = torch.tensor([[2.0, 1.0]])
    b = torch.tensor([[4.0, 0.0]])
    c = torch.tensor([[4.0]])  # (B, 1) image-level term broadcast to patches
    out = harmonic_mean([a, b, c])
    # 3 / (1/2 + 1/4 + 1/4) = 3; a zero term gives 0
    torch.testing.assert_close(out, torch.tensor([[3.0, 0.0]]))
    with pytest.raises(ValueError):
        harmonic_mean([])


# ----------------------------------------------------------------------------- similarity


def test_cosine_similarity_by_hand() -> None:
    q = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    k = torch.tensor([[0.0, 2.0], [5.0, 0.0]])
    s = 1 / math.sqrt(2.0)
    torch.testing.assert_close(cosine_similarity(q, k), torch.tensor([[0.0, 1.0], [s, s]]))
    with pytest.raises(ValueError, match="feature sizes"):
        cosine_similarity(q, torch.ones(2, 3))


def test_two_class_probability_by_hand() -> None:
    protos = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # [normal, anomalous], any norm
    f = torch.tensor([[5.0, 0.0], [1.0, 1.0], [0.0, 0.1]])
    p = two_class_anomaly_probability(f, protos, temperature=1.0)
    e = math.e
    torch.testing.assert_close(p, torch.tensor([1 / (1 + e), 0.5, e / (1 + e)]))
    p007 = two_class_anomaly_probability(f[:1], protos)  # default tau = 0.07
    torch.testing.assert_close(p007, torch.tensor([1 / (1 + math.exp(1 / 0.07))]))
    # leading dims are kept
    assert tuple(two_class_anomaly_probability(torch.ones(2, 3, 2), protos).shape) == (2, 3)
    with pytest.raises(ValueError, match="normal, anomalous"):
        two_class_anomaly_probability(f, torch.ones(3, 2))


def test_nearest_cosine_distance_by_hand() -> None:
    memory = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    q = torch.tensor([[[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0], [-1.0, -1.0]]])  # (1, 4, 2)
    s = 1 / math.sqrt(2.0)
    expected = torch.tensor([[0.0, 0.5, (1 - s) / 2, (1 + s) / 2]])
    torch.testing.assert_close(nearest_cosine_distance(q, memory), expected)
    torch.testing.assert_close(nearest_cosine_distance(q, memory, chunk_size=1), expected)
    with pytest.raises(ValueError, match="non-empty"):
        nearest_cosine_distance(q, torch.zeros(0, 2))


def test_nearest_cosine_distance_is_position_free() -> None:
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(30, 8, generator=gen)
    q = memory[torch.tensor([29, 0, 7])][None]  # queries equal to rows anywhere in memory
    out = nearest_cosine_distance(q, memory, chunk_size=7)
    torch.testing.assert_close(out, torch.zeros(1, 3), atol=1e-6, rtol=0)
