"""AnomalyCLIP parity with the official code, on the recorded fixtures.

The fixture folder (``shared/fixtures/anomalyclip_parity``; override with
``ANOMALENS_ANOMALYCLIP_PARITY_DIR``) holds a tiny random CLIP in the OpenAI key layout, a random
prompt learner in the official checkpoint format, three 518 px queries and every intermediate
tensor the official code computed, with a per-tensor tolerance (``tolerance.json``).

Two levels:

* scoring-level: recorded tensors (global embeddings, text features, patch probabilities,
  per-layer maps) are fed to our pure functions (logits, maps, sums, Gaussian);
* end-to-end: ``AnomalyCLIP`` runs from the PNGs on ``ClipBackbone.from_openai_state_dict`` with
  the official checkpoint loaded through ``checkpoint_filter_fn``, in both official modes
  (``--features_list 24`` and ``6 12 18 24``), and every recorded tensor is compared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens.detectors._anomalyclip_checkpoint import (
    checkpoint_filter_fn,
    config_from_state_dict,
    load_prompt_checkpoint,
)
from anomalens.detectors._anomalyclip_modules import (
    anomaly_map_from_probs,
    placeholder_prompts,
)
from anomalens.scoring.maps import gaussian_smooth
from anomalens.scoring.similarity import image_logits

pytestmark = pytest.mark.shared

_DEFAULT_DIR = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "anomalyclip_parity"
)
FIXTURE_DIR = Path(os.environ.get("ANOMALENS_ANOMALYCLIP_PARITY_DIR", _DEFAULT_DIR))
LAYERS = (6, 12, 18, 24)
MODES = {"features_24": (24,), "features_6_12_18_24": LAYERS}
SIZE = 518


@pytest.fixture(scope="module")
def fx() -> dict[str, Any]:
    """Recorded tensors and tolerances."""
    if not (FIXTURE_DIR / "expected.safetensors").is_file():
        pytest.skip(
            f"AnomalyCLIP parity fixtures not found in {FIXTURE_DIR} "
            "(set ANOMALENS_ANOMALYCLIP_PARITY_DIR to the anomalyclip_parity folder)"
        )
    from safetensors.torch import load_file

    expected = load_file(str(FIXTURE_DIR / "expected.safetensors"))
    tol = json.loads((FIXTURE_DIR / "tolerance.json").read_text())["tensors"]
    return {"E": expected, "tol": tol, "grid": expected["check/grid_index"].long()}


def check(fx: dict[str, Any], name: str, ours: torch.Tensor) -> None:
    """Assert ``|ours - expected[name]| <= atol[name]`` with a readable failure message."""
    exp = fx["E"][name]
    atol = float(fx["tol"][name]["atol"])
    ours = ours.detach().to(exp.dtype).cpu()
    assert tuple(ours.shape) == tuple(exp.shape), f"{name}: shape {ours.shape} != {exp.shape}"
    diff = float((ours.double() - exp.double()).abs().max())
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > atol {atol:.3g}"


def sampled(fx: dict[str, Any], maps: torch.Tensor) -> torch.Tensor:
    """(..., 518, 518) -> (..., 75, 75) on the fixture's sample grid."""
    g = fx["grid"]
    return maps[..., g, :][..., :, g]


def stats(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, 4): min, max, mean, population std of each full map (float64)."""
    m = maps.double().flatten(1)
    return torch.stack(
        [m.min(1).values, m.max(1).values, m.mean(1), m.std(1, unbiased=False)], dim=1
    )


# ------------------------------------------------------------------------------ checkpoint


def test_checkpoint_filter_fn_official_pth_and_safetensors_agree(fx: dict[str, Any]) -> None:
    raw = torch.load(FIXTURE_DIR / "prompt_learner_official.pth", weights_only=True)
    ours = checkpoint_filter_fn(raw)
    assert sorted(ours) == ["ctx_abnormal", "ctx_normal"] + [f"deep_prompts.{j}" for j in range(8)]
    inner = raw["prompt_learner"]
    assert torch.equal(ours["ctx_normal"], inner["ctx_pos"][0, 0])
    assert torch.equal(ours["ctx_abnormal"], inner["ctx_neg"][0, 0])
    assert torch.equal(ours["deep_prompts.7"], inner["compound_prompts_text.7"])
    from_st, _ = load_prompt_checkpoint(FIXTURE_DIR / "prompt_learner_official.safetensors")
    from_pth, _ = load_prompt_checkpoint(FIXTURE_DIR / "prompt_learner_official.pth")
    assert all(torch.equal(from_st[k], from_pth[k]) for k in ours)
    cfg = config_from_state_dict(ours)
    assert (cfg.text_width, cfg.n_ctx, cfg.depth, cfg.t_n_ctx) == (64, 12, 9, 4)


# ------------------------------------------------------------------- scoring from recordings


def test_image_logits_probs_and_score_from_recorded_embeddings(fx: dict[str, Any]) -> None:
    E = fx["E"]
    logits = image_logits(E["image/global_embedding"], E["text/text_features_raw"])
    check(fx, "image/logits", logits)
    check(fx, "image/probs", logits.softmax(-1))
    check(fx, "image/score", logits.softmax(-1)[:, 1])


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_maps_from_recorded_patch_probs(fx: dict[str, Any], layer: int) -> None:
    from anomalens.detectors._anomalyclip_modules import similarity_maps

    probs = fx["E"][f"layer{layer}/patch_text_probs"]
    full = anomaly_map_from_probs(similarity_maps(probs, (37, 37), SIZE))
    check(fx, f"layer{layer}/anomaly_map_sampled", sampled(fx, full))
    check(fx, f"layer{layer}/anomaly_map_stats", stats(full))


def test_sum_and_gaussian_from_recorded_patch_probs(fx: dict[str, Any]) -> None:
    from anomalens.detectors._anomalyclip_modules import similarity_maps

    for mode, layers in MODES.items():
        total = sum(
            anomaly_map_from_probs(
                similarity_maps(fx["E"][f"layer{i}/patch_text_probs"], (37, 37), SIZE)
            )
            for i in layers
        )
        smooth = gaussian_smooth(total, 4.0)
        check(fx, f"{mode}/sum_sampled", sampled(fx, total))
        check(fx, f"{mode}/sum_stats", stats(total))
        check(fx, f"{mode}/smoothed_sampled", sampled(fx, smooth))
        check(fx, f"{mode}/smoothed_stats", stats(smooth))
        if f"{mode}/smoothed_full" in fx["E"]:
            check(fx, f"{mode}/smoothed_full", smooth)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def run(fx: dict[str, Any]) -> dict[str, Any]:
    """Our detector on the tiny CLIP with the official prompts, one pass over the 3 queries."""
    from safetensors.torch import load_file

    from anomalens.backbones.clip import OPENAI_JIT_ONLY_KEYS, ClipBackbone
    from anomalens.detectors.anomalyclip import AnomalyCLIP, encode_prompts

    sd = load_file(str(FIXTURE_DIR / "clip_tiny_openai.safetensors"))
    sd = {k: v.float() for k, v in sd.items() if k not in OPENAI_JIT_ONLY_KEYS}
    backbone = ClipBackbone.from_openai_state_dict(sd, image_size=SIZE)
    det = AnomalyCLIP(
        backbone,
        checkpoint=FIXTURE_DIR / "prompt_learner_official.pth",
        layers=LAYERS,
        batch_size=3,
    )
    paths = [FIXTURE_DIR / "inputs" / f"query_{i}.png" for i in range(3)]
    x = backbone.preprocess(paths)
    block_out: list[torch.Tensor] = []
    hooks = [
        blk.register_forward_hook(lambda _m, _i, o: block_out.append(o.detach().clone()))
        for blk in backbone.model.transformer.resblocks
    ]
    try:
        with torch.no_grad():
            text_raw = encode_prompts(backbone, det.prompt_learner)
    finally:
        for h in hooks:
            h.remove()
    feats = det.encode(x)
    out = det.score_features(feats)
    return {
        "det": det,
        "backbone": backbone,
        "x": x,
        "text_raw": text_raw,
        "blocks": torch.stack(block_out),
        "feats": feats,
        "out": out,
        "paths": paths,
    }


def test_preprocessing(fx: dict[str, Any], run: dict[str, Any]) -> None:
    E, backbone = fx["E"], run["backbone"]
    # a 518 x 518 image whose first row holds the values 0..255 (no resize at 518)
    ramp = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    ramp[0, :256] = np.arange(256, dtype=np.uint8)[:, None]
    lut = backbone.preprocess([ramp])[0, :, 0, :256]
    check(fx, "preprocess/lut", lut)
    resized = backbone.preprocess([FIXTURE_DIR / "inputs" / "resize_check_600x420.png"])[0]
    check(fx, "preprocess/resize_check_sampled", sampled(fx, resized))
    check(fx, "preprocess/resize_check_stats", stats(resized))
    check(fx, "image/input_sampled", sampled(fx, run["x"]))
    check(fx, "image/input_channel_sums", run["x"].double().sum(dim=(2, 3)))
    pngs = [np.asarray(Image.open(p).convert("RGB")) for p in run["paths"]]
    from_lut = torch.stack(
        [
            torch.stack(
                [
                    E["preprocess/lut"][c][torch.from_numpy(a[..., c].copy()).long()]
                    for c in range(3)
                ]
            )
            for a in pngs
        ]
    )
    assert torch.equal(from_lut, run["x"])


def test_positional_embedding(fx: dict[str, Any], run: dict[str, Any]) -> None:
    check(
        fx,
        "clip/visual_positional_embedding_518",
        run["backbone"].model.visual.positional_embedding,
    )


def test_text_side(fx: dict[str, Any], run: dict[str, Any]) -> None:
    E, det = fx["E"], run["det"]
    learner = det.prompt_learner
    ids = learner.token_ids
    assert torch.equal(ids.long(), E["text/tokenized_prompts"].long())
    assert run["backbone"].tokenize(list(placeholder_prompts(12))).equal(ids.cpu())
    check(fx, "text/prompt_embeddings", learner.prompt_embeddings())
    check(fx, "text/deep_prompts_as_inserted", torch.stack(learner.deep_prompt_list()))
    # the template buffers we rebuild from the backbone equal the ones stored in the checkpoint
    official = load_file_any(FIXTURE_DIR / "prompt_learner_official.safetensors")
    assert torch.equal(learner.token_prefix[0], official["token_prefix_pos"][0, 0])
    assert torch.equal(learner.token_suffix[1], official["token_suffix_neg"][0, 0, : 77 - 13])
    check(fx, "text/block_outputs", run["blocks"])
    check(fx, "text/text_features_raw", run["text_raw"])
    t = run["text_raw"]
    check(fx, "text/text_features", t / t.norm(dim=-1, keepdim=True))


def load_file_any(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_image_side(fx: dict[str, Any], run: dict[str, Any]) -> None:
    E, feats, out = fx["E"], run["feats"], run["out"]
    check(fx, "image/global_embedding", feats.global_embedding)
    check(fx, "image/logits", out["logits"])
    check(fx, "image/probs", out["logits"].softmax(-1))
    check(fx, "image/score", out["image_score"])
    rows = E["check/row_index"].long()
    proj = E["check/random_projection_768x4"]
    for k, layer in enumerate(LAYERS):
        tokens = feats.patch_tokens[k]
        check(fx, f"layer{layer}/patch_tokens_rows", tokens[:, rows])
        check(fx, f"layer{layer}/patch_tokens_proj4", tokens @ proj)
        check(fx, f"layer{layer}/patch_tokens_norm", tokens.norm(dim=-1))
        check(fx, f"layer{layer}/patch_text_probs", out["layer_probs"][k])
        check(fx, f"layer{layer}/anomaly_map_sampled", sampled(fx, out["layer_maps"][k]))
        check(fx, f"layer{layer}/anomaly_map_stats", stats(out["layer_maps"][k]))
    mode = "features_6_12_18_24"
    check(fx, f"{mode}/sum_sampled", sampled(fx, out["map_sum"]))
    check(fx, f"{mode}/sum_stats", stats(out["map_sum"]))
    check(fx, f"{mode}/smoothed_sampled", sampled(fx, out["anomaly_map"]))
    check(fx, f"{mode}/smoothed_stats", stats(out["anomaly_map"]))


def test_detector_predict_single_layer_mode(fx: dict[str, Any], run: dict[str, Any]) -> None:
    """The public ``predict`` with the default layers (24 only, as test.sh) gives the final maps."""
    from anomalens.detectors.anomalyclip import AnomalyCLIP

    det = AnomalyCLIP(
        run["backbone"], checkpoint=FIXTURE_DIR / "prompt_learner_official.safetensors"
    )
    assert det.layers == (24,) and det.vv_start == 6
    pred = det.predict(run["paths"])
    check(fx, "image/score", pred.image_score)
    check(fx, "features_24/smoothed_full", pred.anomaly_map)
    check(fx, "features_24/smoothed_sampled", sampled(fx, pred.anomaly_map))
    check(fx, "features_24/smoothed_stats", stats(pred.anomaly_map))


def test_without_fp16_rounding_the_logits_leave_tolerance(
    fx: dict[str, Any], run: dict[str, Any]
) -> None:
    """Sensitivity: skipping the official float16 rounding of the deep prompts is detected."""
    from anomalens.detectors.anomalyclip import encode_prompts

    learner = run["det"].prompt_learner
    learner.fp16_deep_prompts = False
    try:
        with torch.no_grad():
            text = encode_prompts(run["backbone"], learner)
    finally:
        learner.fp16_deep_prompts = True
    logits = image_logits(run["feats"].global_embedding, text)
    diff = float((logits - fx["E"]["image/logits"]).abs().max())
    assert diff > fx["tol"]["image/logits"]["atol"]
