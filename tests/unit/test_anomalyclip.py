"""AnomalyCLIP: prompt learner, pure scoring / loss functions, checkpoints and the detector."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalens.backbones.clip import ClipBackbone
from anomalens.detectors._anomalyclip_checkpoint import (
    checkpoint_filter_fn,
    config_from_state_dict,
    load_prompt_checkpoint,
    save_prompt_checkpoint,
)
from anomalens.detectors._anomalyclip_modules import (
    AnomalyCLIPPromptLearner,
    PromptConfig,
    anomaly_map_from_probs,
    anomalyclip_scores,
    patch_text_probs,
    placeholder_prompts,
    similarity_maps,
)
from anomalens.scoring.similarity import image_logits
from anomalens.training.losses import anomalyclip_loss, dice_loss, focal_loss


@pytest.fixture(scope="module")
def tiny() -> ClipBackbone:
    from anomalens.backbones.tiny import make_tiny_clip

    return make_tiny_clip(seed=0, image_size=64)


def _detector(tiny: ClipBackbone, **kwargs: Any) -> Any:
    from anomalens.detectors.anomalyclip import AnomalyCLIP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return AnomalyCLIP(tiny, **{"untrained": "checkpoint" not in kwargs, **kwargs})


# ---------------------------------------------------------------------------- pure functions


def test_image_logits_are_cosines_over_temperature() -> None:
    g = torch.tensor([[3.0, 0.0], [0.0, -2.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    logits = image_logits(g, t, temperature=0.5)
    assert torch.allclose(logits, torch.tensor([[2.0, 0.0], [0.0, -2.0]]))


def test_patch_probs_maps_and_combination() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(2, 1 + 6, 5)
    text = torch.randn(2, 5)
    probs = patch_text_probs(tokens, text, 0.07)
    assert probs.shape == (2, 7, 2)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 7))
    maps = similarity_maps(probs, (2, 3), 12)
    assert maps.shape == (2, 2, 12, 12)
    ref = F.interpolate(
        probs[:, 1:].reshape(2, 2, 3, 2).permute(0, 3, 1, 2), size=(12, 12), mode="bilinear"
    )
    assert torch.allclose(maps, ref)
    # for two classes (S_a + 1 - S_n) / 2 equals S_a
    assert torch.allclose(anomaly_map_from_probs(maps), maps[:, 1], atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        similarity_maps(probs, (3, 3), 12)


def test_scores_sum_layers_and_image_score_ignores_the_map() -> None:
    torch.manual_seed(1)
    tokens = [torch.randn(3, 1 + 4, 8) for _ in range(2)]
    glob, text = torch.randn(3, 8), torch.randn(2, 8)
    out = anomalyclip_scores(tokens, glob, text, (2, 2), 16, sigma=0.0)
    assert torch.allclose(out["map_sum"], out["layer_maps"].sum(0))
    assert torch.equal(out["anomaly_map"], out["map_sum"])  # sigma 0: no smoothing
    assert torch.allclose(out["image_score"], image_logits(glob, text).softmax(-1)[:, 1])
    flipped = anomalyclip_scores([-t for t in tokens], glob, text, (2, 2), 16, sigma=0.0)
    assert torch.equal(flipped["image_score"], out["image_score"])
    assert not torch.allclose(flipped["map_sum"], out["map_sum"])
    smooth = anomalyclip_scores(tokens, glob, text, (2, 2), 16, sigma=2.0)["anomaly_map"]
    assert smooth.std() < out["anomaly_map"].std()


def test_focal_loss_matches_hand_formula() -> None:
    # channel 0 (normal) = [0.9, 0.2], channel 1 (abnormal) = [0.1, 0.8] over two pixels
    probs = torch.tensor([[0.9, 0.2], [0.1, 0.8]]).reshape(1, 2, 1, 2)
    target = torch.tensor([[[0, 0]]])
    eps = 1e-5
    pt0 = (1 - eps) * 0.9 + eps * 0.1 + eps
    pt1 = (1 - eps) * 0.2 + eps * 0.8 + eps
    expected = -((1 - pt0) ** 2 * math.log(pt0) + (1 - pt1) ** 2 * math.log(pt1)) / 2
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-5)


def test_dice_loss_per_image_mean() -> None:
    pred = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    gt = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    d0 = 1 - (2 * 1 + 1) / (1 + 1 + 1)
    d1 = 1 - (0 + 1) / (1 + 0 + 1)
    assert dice_loss(pred, gt).item() == pytest.approx((d0 + d1) / 2)


def test_anomalyclip_loss_terms_and_gradient() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 2, requires_grad=True)
    maps = torch.rand(2, 1, 4, 4)
    maps = torch.cat([1 - maps, maps], dim=1).requires_grad_(True)
    masks = (torch.rand(2, 4, 4) > 0.7).float()
    labels = torch.tensor([0, 1])
    out = anomalyclip_loss(logits, labels, [maps], masks, pixel_weight=4.0)
    pix = (
        focal_loss(maps, masks.long())
        + dice_loss(maps[:, 1], masks)
        + dice_loss(maps[:, 0], 1 - masks)
    )
    assert out["pixel_loss"].item() == pytest.approx(4 * pix.item(), rel=1e-6)
    assert out["image_loss"].item() == pytest.approx(F.cross_entropy(logits, labels).item())
    out["loss"].backward()
    assert logits.grad is not None and maps.grad is not None


# ----------------------------------------------------------------------------- prompt learner


def test_prompt_learner_layout_and_fp16_rounding() -> None:
    cfg = PromptConfig(text_width=8, n_ctx=3, depth=3, t_n_ctx=2)
    learner = AnomalyCLIPPromptLearner(cfg)
    assert sorted(learner.state_dict()) == [
        "ctx_abnormal",
        "ctx_normal",
        "deep_prompts.0",
        "deep_prompts.1",
    ]
    with pytest.raises(RuntimeError, match="set_template"):
        learner.prompt_embeddings()
    emb = torch.arange(2 * 10 * 8, dtype=torch.float32).reshape(2, 10, 8)
    ids = torch.arange(20).reshape(2, 10)
    learner.set_template(emb, ids)
    out, out_ids, deep = learner()
    assert out.shape == (2, 10, 8) and torch.equal(out_ids, ids)
    assert torch.equal(out[:, 0], emb[:, 0]) and torch.equal(out[:, 4:], emb[:, 4:])
    assert torch.equal(out[0, 1:4], learner.ctx_normal) and torch.equal(
        out[1, 1:4], learner.ctx_abnormal
    )
    assert all(torch.equal(d, p.half().float()) for d, p in zip(deep, learner.deep_prompts))
    learner.fp16_deep_prompts = False
    assert all(torch.equal(d, p) for d, p in zip(learner.deep_prompt_list(), learner.deep_prompts))
    with pytest.raises(ValueError, match="t_n_ctx"):
        PromptConfig(text_width=8, n_ctx=2, t_n_ctx=3)


def test_placeholder_prompts() -> None:
    normal, abnormal = placeholder_prompts(3)
    assert normal == "X X X object." and abnormal == "X X X damaged object."


# -------------------------------------------------------------------------------- checkpoints


def _official_like(cfg: PromptConfig) -> dict[str, torch.Tensor]:
    w, n, t = cfg.text_width, cfg.n_ctx, cfg.t_n_ctx
    sd = {
        "ctx_pos": torch.randn(1, 1, n, w),
        "ctx_neg": torch.randn(1, 1, n, w),
        "token_prefix_pos": torch.randn(1, 1, 1, w),
        "token_suffix_neg": torch.randn(1, 1, 77 - 1 - n, w),
        "tokenized_prompts_pos": torch.zeros(1, 1, 77, dtype=torch.int32),
    }
    for j in range(cfg.num_deep):
        sd[f"compound_prompts_text.{j}"] = torch.randn(t, w)
        sd[f"compound_prompt_projections.{j}.weight"] = torch.randn(896, w)
        sd[f"compound_prompt_projections.{j}.bias"] = torch.randn(896)
    return sd


def test_checkpoint_filter_fn_remaps_official_keys() -> None:
    cfg = PromptConfig(text_width=8, n_ctx=4, depth=3, t_n_ctx=2)
    sd = _official_like(cfg)
    ours = checkpoint_filter_fn({"prompt_learner": sd})
    assert sorted(ours) == ["ctx_abnormal", "ctx_normal", "deep_prompts.0", "deep_prompts.1"]
    assert torch.equal(ours["ctx_normal"], sd["ctx_pos"][0, 0])  # ctx_pos is the NORMAL context
    assert torch.equal(ours["ctx_abnormal"], sd["ctx_neg"][0, 0])
    assert config_from_state_dict(ours) == cfg
    assert checkpoint_filter_fn(ours).keys() == ours.keys()  # our layout passes through
    module_prefixed = {f"module.{k}": v for k, v in sd.items()}
    assert torch.equal(
        checkpoint_filter_fn(module_prefixed)["deep_prompts.1"], ours["deep_prompts.1"]
    )
    with pytest.raises(KeyError, match="unexpected"):
        checkpoint_filter_fn({**sd, "visual.proj": torch.zeros(1)})
    with pytest.raises(KeyError, match="ctx_pos"):
        checkpoint_filter_fn({"ctx_pos": sd["ctx_pos"]})


def test_save_load_roundtrip_and_official_pth(tmp_path: Path) -> None:
    cfg = PromptConfig(text_width=8, n_ctx=4, depth=2, t_n_ctx=2)
    learner = AnomalyCLIPPromptLearner(cfg)
    path = save_prompt_checkpoint(tmp_path / "p.safetensors", learner.state_dict(), cfg, {"a": 1})
    sd, meta = load_prompt_checkpoint(path)
    assert meta.kind == "anomalyclip.prompts" and meta.config["n_ctx"] == 4
    assert meta.extra == {"a": 1}
    assert all(torch.equal(sd[k], v) for k, v in learner.state_dict().items())
    pth = tmp_path / "epoch_15.pth"
    torch.save({"prompt_learner": _official_like(cfg)}, pth)
    sd2, meta2 = load_prompt_checkpoint(pth)
    assert not meta2.ours and config_from_state_dict(sd2) == cfg
    torch.save({"prompt_learner": {"ctx_pos": object()}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_prompt_checkpoint(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        load_prompt_checkpoint(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------- detector


def test_detector_predict_shapes_registry_and_config(tiny: ClipBackbone) -> None:
    from anomalens.registry import create_detector, list_detectors
    from anomalens.types import LearningType

    assert "anomalyclip" in list_detectors()
    with pytest.warns(UserWarning, match="untrained"):
        det = create_detector("anomalyclip", backbone=tiny, untrained=True)
    assert det.learning_type is LearningType.ZERO_SHOT
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (50 + 10 * i, 70, 3), dtype=np.uint8) for i in range(3)]
    pred = det.predict(images)  # zero-shot: no fit needed
    assert pred.image_score.shape == (3,) and pred.anomaly_map.shape == (3, 64, 64)
    assert torch.all((pred.image_score > 0) & (pred.image_score < 1))
    cfg = det.config()
    assert cfg["layers"] == [4] and cfg["prompt_depth"] == 3 and cfg["prompts"] == "untrained"
    # batching does not change results
    det.batch_size = 1
    again = det.predict(images)
    assert torch.allclose(again.image_score, pred.image_score, atol=1e-6)
    assert torch.allclose(again.anomaly_map, pred.anomaly_map, atol=1e-6)


def test_detector_checkpoint_roundtrip_and_mismatch(tiny: ClipBackbone, tmp_path: Path) -> None:
    det = _detector(tiny, seed=3, layers=(2, 4), return_extras=True)
    images = [np.full((64, 64, 3), v, dtype=np.uint8) for v in (30, 200)]
    before = det.predict(images)
    assert before.extras["layer_maps"].shape == (2, 2, 64, 64)
    path = det.save_checkpoint(tmp_path / "prompts.safetensors")
    other = _detector(tiny, seed=4, layers=(2, 4))
    assert not torch.allclose(other.predict(images).image_score, before.image_score)
    other.load_checkpoint(path)
    assert other.config()["prompts"] == "anomalens"
    after = other.predict(images)
    assert torch.allclose(after.image_score, before.image_score, atol=1e-6)
    assert torch.allclose(after.anomaly_map, before.anomaly_map, atol=1e-6)
    # official depth 9 needs 9 text blocks; the tiny CLIP has 3
    with pytest.raises(ValueError, match="text blocks"):
        _detector(tiny, depth=9)
    wide = PromptConfig(text_width=16, n_ctx=12, depth=3, t_n_ctx=4)
    save_prompt_checkpoint(
        tmp_path / "wide.safetensors", AnomalyCLIPPromptLearner(wide).state_dict(), wide
    )
    with pytest.raises(ValueError, match="does not fit"):
        other.load_checkpoint(tmp_path / "wide.safetensors")


def test_fit_with_images_warns_and_is_ignored(tiny: ClipBackbone) -> None:
    det = _detector(tiny)
    img = [np.zeros((64, 64, 3), dtype=np.uint8)]
    ref = det.predict(img).image_score
    with pytest.warns(UserWarning, match="ignored"):
        det.fit(img)
    assert torch.equal(det.predict(img).image_score, ref)


def test_prompt_gradients_reach_every_used_parameter(tiny: ClipBackbone) -> None:
    from anomalens.detectors.anomalyclip import build_prompt_learner, encode_prompts

    learner = build_prompt_learner(tiny, PromptConfig(text_width=tiny.text_width, depth=3))
    text = encode_prompts(tiny, learner)
    assert text.shape == (2, tiny.embed_dim)
    (text[1] - text[0]).pow(2).sum().backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_reports_the_precision_the_given_backbone_runs_in() -> None:
    from anomalens.backbones.tiny import make_tiny_clip
    from anomalens.detectors.anomalyclip import AnomalyCLIP

    bb = make_tiny_clip(seed=0, image_size=64, precision="bf16")
    with pytest.warns(UserWarning, match="untrained"):
        det = AnomalyCLIP(bb, untrained=True)  # precision option left at its default "fp32"
    assert det.config()["precision"] == "bf16"
