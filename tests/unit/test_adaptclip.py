"""AdaptCLIP: adapters, pure scoring functions, checkpoint remapping and the detector API.

Runs offline on the tiny random CLIP (``make_tiny_clip``); parity with the official code is in
``test_adaptclip_parity.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalens.detectors._adaptclip_checkpoint import (
    checkpoint_filter_fn,
    config_from_state_dict,
    load_adapter_checkpoint,
    save_adapter_checkpoint,
)
from anomalens.detectors._adaptclip_modules import (
    AdaptCLIPAdapters,
    AdapterConfig,
    align_to_memory,
    fuse_few_shot,
    fuse_zero_shot,
    patch_probability_maps,
    pqa_image_vector,
)
from anomalens.prompts.adaptclip import placeholder_prompt, static_sentences
from anomalens.scoring.aggregate import harmonic_mean

torch.set_num_threads(1)


def official_state_dict(adapters: AdaptCLIPAdapters) -> dict[str, dict[str, torch.Tensor]]:
    """Our adapters written in the official ``epoch_15.pth`` layout (inverse of the remap)."""
    sd = adapters.state_dict()
    ta = {
        "ctx_pos": sd["textual.ctx_normal"][None, None],
        "ctx_neg": sd["textual.ctx_abnormal"][None, None],
        "token_prefix_pos": sd["textual.token_prefix"][0][None, None],
        "token_prefix_neg": sd["textual.token_prefix"][1][None, None],
        "token_suffix_pos": sd["textual.token_suffix"][0][None, None],
        "token_suffix_neg": sd["textual.token_suffix"][1][None, None],
        "tokenized_prompts_pos": sd["textual.token_ids"][0].int()[None, None],
        "tokenized_prompts_neg": sd["textual.token_ids"][1].int()[None, None],
    }
    va = {}
    for ours, official in (("global_adapter", "global_adapter"), ("local_adapter", "local_adater")):
        for name, idx in (("fc1", "0"), ("bn", "1"), ("fc2", "3")):
            for k, v in sd.items():
                if k.startswith(f"visual.{ours}.{name}."):
                    va[f"{official}.fc.{idx}.{k.split('.')[-1]}"] = v
    pq = {}
    for k, v in sd.items():
        if k.startswith("prompt_query.layer_norms."):
            _, _, layer, param = k.split(".")
            pq[f"sharebn.{layer}.{param}"] = v
    local = {"conv1": 0, "bn1": 1, "up1": 3, "conv2": 4, "bn2": 5, "up2": 7, "classifier": 8}
    glob = {"fc1": 0, "bn1": 1, "fc2": 3, "bn2": 4, "classifier": 6}
    for head, official, table in (
        ("local_head", "local_adapter", local),
        ("global_head", "global_adapter", glob),
    ):
        for k, v in sd.items():
            if k.startswith(f"prompt_query.{head}."):
                _, _, name, param = k.split(".")
                for copy in range(4):
                    pq[f"{official}.{copy}.{table[name]}.{param}"] = v
    return {"textual_learner": ta, "visual_learner": va, "pq_learner": pq}


def small_adapters(seed: int = 0) -> AdaptCLIPAdapters:
    torch.manual_seed(seed)
    cfg = AdapterConfig(embed_dim=32, text_width=16, n_ctx=4, mid_dim=8, num_layers=4)
    adapters = AdaptCLIPAdapters(cfg)
    with torch.no_grad():  # non-trivial BN statistics
        for m in adapters.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
        adapters.textual.token_prefix.normal_()
        adapters.textual.token_suffix.normal_()
        adapters.textual.token_ids.random_(0, 1000)
    return adapters.eval()


# ============================================================================== prompts
def test_static_sentences_match_the_official_counts() -> None:
    normal, abnormal = static_sentences()
    assert (len(normal), len(abnormal)) == (147, 84)
    assert normal[0] == "a cropped photo of the object."
    assert abnormal[21] == "a cropped photo of the object with flaw."
    assert normal.count("a jpeg corrupted photo of the object.") == 2
    assert placeholder_prompt(3) == "X X X."
    with pytest.raises(ValueError):
        placeholder_prompt(0)


# ====================================================================== pure functions
def test_parameter_counts_match_the_published_sizes() -> None:
    """ViT-L/14@336 sizes: TA 18,432 + VA 590,592 + PQA 1,154,242 = 1.76 M (spec section 8)."""
    counts = AdaptCLIPAdapters(AdapterConfig(embed_dim=768, text_width=768)).num_parameters()
    assert counts == {"textual": 18432, "visual": 590592, "prompt_query": 1154242}


def test_align_to_memory_matches_brute_force_and_shared_memory() -> None:
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(2, 5, 8, generator=g), dim=-1)
    mem = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    dist, nearest = align_to_memory(q, mem)
    brute = 1 - torch.einsum("bnd,md->bnm", q, mem)
    assert torch.allclose(dist, brute.min(-1).values)
    assert torch.equal(nearest, mem[brute.argmin(-1)])
    dist_b, nearest_b = align_to_memory(q, mem.expand(2, -1, -1))
    assert torch.allclose(dist, dist_b, atol=1e-6) and torch.equal(nearest, nearest_b)


@pytest.mark.parametrize("shared", [True, False])
def test_align_to_memory_chunked_equals_unchunked(
    shared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anomalens.detectors._adaptclip_modules as mod

    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(3, 50, 16, generator=g), dim=-1)
    mem = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    mem = mem if shared else torch.stack([mem, mem.flip(0), mem.roll(5, 0)])
    full_d, full_n = align_to_memory(q, mem, chunk_size=50)
    # same nearest patches; distances equal up to the BLAS kernel's summation order (1 ulp)
    for chunk in (1, 7, 49):
        d, n = align_to_memory(q, mem, chunk_size=chunk)
        torch.testing.assert_close(d, full_d, rtol=0, atol=1e-6)
        assert torch.equal(n, full_n), chunk
    # the default chunk follows the element budget: 3 * 40 * 4 entries -> chunks of 4 patches
    monkeypatch.setattr(mod, "ALIGN_CHUNK_ELEMENTS", 3 * 40 * 4)
    calls: list[tuple[int, ...]] = []
    real_min = torch.Tensor.min

    def spy(self: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(tuple(self.shape))
        return real_min(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "min", spy)
    d, n = align_to_memory(q, mem)
    monkeypatch.undo()
    assert calls[0] == (3, 4, 40) and len(calls) == 13
    torch.testing.assert_close(d, full_d, rtol=0, atol=1e-6)
    assert torch.equal(n, full_n)
    with pytest.raises(ValueError, match="chunk_size"):
        align_to_memory(q, mem, chunk_size=0)


def test_patch_probability_maps_layout() -> None:
    """Token t >= 1 is grid cell ((t-1) // w, (t-1) % w); channels sum to 1."""
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tokens = torch.zeros(1, 1 + 6, 2)
    tokens[..., 0] = 1.0
    tokens[0, 1 + 4, :] = torch.tensor([0.0, 1.0])  # cell (1, 1) of a 2 x 3 grid is abnormal
    probs = patch_probability_maps(tokens, text, (2, 3))
    assert probs.shape == (1, 2, 2, 3)
    assert torch.allclose(probs.sum(1), torch.ones(1, 2, 3))
    assert probs[0, 1].argmax() == 4 and probs[0, 1, 1, 1] > 0.99


def test_harmonic_mean_and_fusion_sanitise() -> None:
    x = torch.tensor([[1.0, 2.0], [4.0, 0.0]])
    assert torch.allclose(harmonic_mean(x, dim=1), torch.tensor([4 / 3, 0.0]))
    maps = torch.rand(2, 4, 16, 16)
    align = torch.rand(2, 4, 16, 16)
    align[0] = 0.0  # exact zeros: HM -> 0, never NaN in the outputs
    scores = torch.rand(2)
    out = fuse_few_shot(maps[:, 0], maps[:, 1], maps, align, scores, scores, torch.rand(2, 4))
    assert torch.isfinite(out["anomaly_map"]).all() and torch.isfinite(out["image_score"]).all()
    assert out["anomaly_map"][0].abs().max() == 0
    z = fuse_zero_shot(maps[:, 0], maps[:, 1], scores, scores, sigma=0.0)
    expected = (scores + scores + ((maps[:, 0] + maps[:, 1]) / 2).flatten(1).amax(1)) / 3
    assert torch.allclose(z["image_score"], expected)
    hm = fuse_few_shot(
        maps[:, 0],
        maps[:, 1],
        maps,
        align,
        scores,
        scores,
        scores[:, None].expand(2, 4),
        fusion="harmonic_mean",
    )
    assert torch.allclose(hm["image_avg3"], scores)  # HM of three equal values
    with pytest.raises(ValueError, match="fusion"):
        fuse_few_shot(
            maps[:, 0], maps[:, 1], maps, align, scores, scores, scores[:, None], fusion="max"
        )  # type: ignore[arg-type]


def test_pqa_eval_batches_layers_like_a_per_layer_loop() -> None:
    adapters = small_adapters()
    pqa = adapters.prompt_query
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randn(3, 1 + 12, 32, generator=g) for _ in range(4)]
    memory = [F.normalize(torch.randn(24, 32, generator=g), dim=-1) for _ in range(4)]
    with torch.no_grad():
        out = pqa(tokens, memory, (3, 4))
        pqa.train()
        for m in pqa.modules():  # train-mode code path with frozen (eval) BatchNorms
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        loop = pqa(tokens, memory, (3, 4))
    assert out["map_logits"].shape == (3, 4, 2, 12, 16)
    assert out["logits"].shape == (3, 4, 2) and out["align"].shape == (3, 4, 3, 4)
    for key in ("map_logits", "logits", "image_vector", "align"):
        assert torch.allclose(out[key], loop[key], atol=1e-5), key
    # the image vector is the mean + top-k mean of the per-layer BN output
    f = F.normalize(tokens[0][:, 1:], dim=-1)
    vec = pqa_image_vector(torch.randn(2, 5, 3, 3), topk=10)
    assert vec.shape == (2, 5) and f.shape == (3, 12, 32)


def test_pq_context_switch() -> None:
    adapters = small_adapters()
    g = torch.Generator().manual_seed(2)
    tokens = [torch.randn(1, 1 + 4, 32, generator=g) for _ in range(4)]
    memory = [F.normalize(torch.randn(8, 32, generator=g), dim=-1) for _ in range(4)]
    with torch.no_grad():
        with_ctx = adapters.prompt_query(tokens, memory, (2, 2))["logits"]
        adapters.prompt_query.context = False
        without = adapters.prompt_query(tokens, memory, (2, 2))["logits"]
    assert not torch.allclose(with_ctx, without)


# ========================================================================== checkpoints
def test_checkpoint_filter_fn_roundtrip_nested_and_flat() -> None:
    adapters = small_adapters()
    official = official_state_dict(adapters)
    ours = checkpoint_filter_fn(official)
    ref = adapters.state_dict()
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    flat = {f"{learner}.{k}": v for learner, sd in official.items() for k, v in sd.items()}
    assert all(torch.equal(checkpoint_filter_fn(flat)[k], ref[k]) for k in ref)
    assert checkpoint_filter_fn(ref).keys() == ref.keys()  # our layout passes through
    assert config_from_state_dict(ours) == adapters.config


def test_checkpoint_filter_fn_errors() -> None:
    official = official_state_dict(small_adapters())
    bad = {k: dict(v) for k, v in official.items()}
    bad["pq_learner"]["local_adapter.2.8.bias"] = bad["pq_learner"]["local_adapter.2.8.bias"] + 1
    with pytest.raises(ValueError, match="shared"):
        checkpoint_filter_fn(bad)
    extra = {k: dict(v) for k, v in official.items()}
    extra["visual_learner"]["scale"] = torch.ones(1)
    with pytest.raises(KeyError, match="scale"):
        checkpoint_filter_fn(extra)
    with pytest.raises(KeyError, match="pq_learner"):
        checkpoint_filter_fn({k: v for k, v in official.items() if k != "pq_learner"})
    with pytest.raises(KeyError, match="not an official"):
        checkpoint_filter_fn({"model": torch.ones(1)})


def test_save_and_load_official_pth_and_safetensors(tmp_path: Path) -> None:
    adapters = small_adapters()
    pth = tmp_path / "epoch_15.pth"
    torch.save(official_state_dict(adapters), pth)
    sd, meta = load_adapter_checkpoint(pth)
    assert not meta.ours and meta.config == {}
    st = save_adapter_checkpoint(tmp_path / "a.safetensors", sd, config_from_state_dict(sd))
    sd2, meta2 = load_adapter_checkpoint(st)
    assert meta2.ours and meta2.config == adapters.config.to_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with pytest.raises(FileNotFoundError):
        load_adapter_checkpoint(tmp_path / "missing.pth")


# ============================================================================ detector
@pytest.fixture(scope="module")
def tiny_backbone():  # type: ignore[no-untyped-def]
    from anomalens.backbones.tiny import make_tiny_clip

    return make_tiny_clip(seed=0, image_size=64)


def images(n: int, seed: int, defect: bool = False) -> list[np.ndarray]:
    """Smooth textures (64 x 64 RGB); with ``defect`` a dark square in the upper left."""
    rng = np.random.default_rng(seed)
    base = np.linspace(60, 200, 64)[None, :, None] * np.ones((64, 1, 3))
    out = []
    for _ in range(n):
        img = base + rng.normal(0, 3, base.shape)
        if defect:
            img[8:24, 8:24] = 10
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def detector(tiny_backbone):  # type: ignore[no-untyped-def]
    from anomalens.detectors.adaptclip import AdaptCLIP

    with pytest.warns(UserWarning, match="untrained"):
        return AdaptCLIP(tiny_backbone, batch_size=2, sigma=1.0, untrained=True)


def test_registry_and_config(detector) -> None:  # type: ignore[no-untyped-def]
    from anomalens.registry import get_detector_class, list_detectors
    from anomalens.types import LearningType

    assert "adaptclip" in list_detectors()
    assert get_detector_class("adaptclip") is type(detector)
    assert detector.learning_type is LearningType.ZERO_OR_FEW_SHOT
    cfg = detector.config()
    assert cfg["adapters"] == "untrained" and cfg["layers"] == [1, 2, 3, 4]
    assert cfg["adapter_embed_dim"] == 32 and cfg["adapter_text_width"] == 32


def test_default_layers_follow_the_official_settings() -> None:
    from anomalens.detectors.adaptclip import default_layers, default_vv_start

    assert default_layers(24) == (6, 12, 18, 24) and default_vv_start(24) == 6
    assert default_layers(12) == (3, 6, 9, 12) and default_vv_start(12) == 4


def test_zero_shot_and_k_shot_predict(detector) -> None:  # type: ignore[no-untyped-def]
    queries = images(2, 1) + images(1, 2, defect=True)
    detector.fit(None)
    zs = detector.predict(queries)
    assert zs.anomaly_map.shape == (3, 64, 64) and zs.image_score.shape == (3,)
    assert set(zs.extras) == {"va_score", "ta_score"}
    normals = images(3, 3)
    detector.fit(normals)
    assert detector.num_shots == 3
    assert detector._memory[0].shape == (3 * 64, 32)  # k x N patches per layer
    ks = detector.predict(queries + normals[:1])
    assert set(ks.extras) == {"va_score", "ta_score", "pq_score"}
    assert torch.isfinite(ks.anomaly_map).all() and torch.isfinite(ks.image_score).all()
    # an image of the memory aligns exactly (distances ~1e-7, float32 rounding): the harmonic
    # mean with the ~0 align map gives a ~0 map and score
    assert ks.anomaly_map[3].max() < 1e-2 and ks.image_score[3] < 1e-2
    assert ks.image_score[2] > 10 * ks.image_score[3]
    # batch size does not change the result
    detector.batch_size = 4
    again = detector.predict(queries + normals[:1])
    detector.batch_size = 2
    assert torch.allclose(again.anomaly_map, ks.anomaly_map, atol=1e-5)
    assert torch.allclose(again.image_score, ks.image_score, atol=1e-6)


def test_save_load_checkpoint_roundtrip(detector, tiny_backbone, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from anomalens.detectors.adaptclip import AdaptCLIP

    queries = images(2, 5, defect=True)
    detector.fit(None)
    before = detector.predict(queries)
    path = detector.save_checkpoint(tmp_path / "adapters.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint means no "untrained" warning
        other = AdaptCLIP(tiny_backbone, checkpoint=path, seed=123, sigma=1.0)
    assert other.config()["adapters"] == "anomalens"
    after = other.predict(queries)
    assert torch.allclose(before.anomaly_map, after.anomaly_map, atol=1e-6)
    # an official-layout .pth of the same adapters loads to the same numbers
    pth = tmp_path / "epoch_15.pth"
    torch.save(official_state_dict(detector.adapters), pth)
    other.load_checkpoint(pth)
    assert other.config()["adapters"] == "official"
    assert torch.allclose(other.predict(queries).image_score, before.image_score, atol=1e-6)


def test_checkpoint_for_another_backbone_is_refused(tiny_backbone, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from anomalens.detectors.adaptclip import AdaptCLIP

    big = AdaptCLIPAdapters(AdapterConfig(embed_dim=64, text_width=32, n_ctx=12))
    path = save_adapter_checkpoint(tmp_path / "big.safetensors", big.state_dict(), big.config)
    with pytest.raises(ValueError, match="does not fit"):
        AdaptCLIP(tiny_backbone, checkpoint=path)


def test_untrained_adapters_are_seeded(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    from anomalens.detectors.adaptclip import AdaptCLIP

    with pytest.warns(UserWarning):
        a = AdaptCLIP(tiny_backbone, seed=7, untrained=True)
        b = AdaptCLIP(tiny_backbone, seed=7, untrained=True)
        c = AdaptCLIP(tiny_backbone, seed=8, untrained=True)
    sa, sb, sc = a.adapters.state_dict(), b.adapters.state_dict(), c.adapters.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["visual.local_adapter.fc1.weight"], sc["visual.local_adapter.fc1.weight"]
    )
    with pytest.raises(ValueError, match="layers"):
        AdaptCLIP(tiny_backbone, layers=(1, 9), untrained=True)


def test_config_reports_the_precision_the_given_backbone_runs_in() -> None:
    from anomalens.backbones.tiny import make_tiny_clip
    from anomalens.detectors.adaptclip import AdaptCLIP

    bb = make_tiny_clip(seed=0, image_size=64, precision="bf16")
    with pytest.warns(UserWarning, match="untrained"):
        det = AdaptCLIP(bb, untrained=True)  # precision option left at its default "fp32"
    assert det.config()["precision"] == "bf16"


def test_heads_are_a_typed_record_with_prompt_query_only_few_shot(detector) -> None:  # type: ignore[no-untyped-def]
    from anomalens.detectors._adaptclip_modules import AdaptCLIPHeads, adaptclip_heads

    feats = detector.encode(images(2, 5))
    tokens = [t.float() for t in feats.patch_tokens]
    args = (tokens, feats.global_embedding.float(), tuple(feats.grid_size), 64)
    text = (detector.static_text, detector.ta_text_embeddings())
    with torch.no_grad():
        zero = adaptclip_heads(detector.adapters, *args, *text)
        memory = [F.normalize(t[:, 1:], dim=-1).flatten(0, 1) for t in tokens]
        few = adaptclip_heads(detector.adapters, *args, *text, memory=memory)
    assert isinstance(zero, AdaptCLIPHeads) and zero.pq is None
    assert zero.va_logits.shape == (2, 2) and zero.ta_map.shape == (2, 2, 64, 64)
    assert zero.va_map_lowres.shape == (2, 2, *feats.grid_size)
    assert len(zero.to_dict()) == 6 and len(few.to_dict()) == 11
    assert few.pq is not None
    assert few.pq.logits.shape == (2, 4, 2) and few.pq.maps.shape == (2, 4, 2, 64, 64)
    assert few.pq.align.shape == (2, 4, 64, 64)
    # a query that is its own memory is at distance ~0 everywhere
    assert few.pq.align_lowres.abs().max() < 1e-5
    assert torch.equal(zero.va_map, few.va_map)  # VA / TA do not depend on the memory
