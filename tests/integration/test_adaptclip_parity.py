"""AdaptCLIP parity with the official code, on the recorded fixtures.

The fixture folder (``shared/fixtures/adaptclip_parity``, override with ``ANOMALENS_PARITY_DIR``)
holds a tiny random CLIP, random adapters in the official checkpoint format, input PNGs and every
intermediate tensor the official code computed, with a per-tensor tolerance (``tolerance.json``).

Two levels:

* head-level: the recorded encoder / text outputs are fed to our adapters and fusion functions,
  and each head's logits and maps, align maps, fused and smoothed maps and scores are compared;
* end-to-end: ``AdaptCLIP`` runs from the PNGs on ``ClipBackbone`` (skipped while the backbone is
  not available) and every recorded tensor it can reproduce is compared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalens.detectors._adaptclip_checkpoint import (
    config_from_state_dict,
    load_adapter_checkpoint,
)
from anomalens.detectors._adaptclip_modules import (
    AdaptCLIPAdapters,
    fuse_few_shot,
    fuse_zero_shot,
    patch_probability_maps,
)
from anomalens.scoring.aggregate import harmonic_mean
from anomalens.scoring.maps import upsample
from anomalens.scoring.similarity import image_logits

pytestmark = pytest.mark.shared

_DEFAULT_DIR = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "adaptclip_parity"
)
FIXTURE_DIR = Path(os.environ.get("ANOMALENS_PARITY_DIR", _DEFAULT_DIR))
MODES = {"one_shot": 1, "two_shot": 2}


@pytest.fixture(scope="module")
def fx() -> dict[str, object]:
    """Recorded tensors, tolerances and the official adapters loaded into our modules."""
    if not (FIXTURE_DIR / "expected.safetensors").is_file():
        pytest.skip(
            f"AdaptCLIP parity fixtures not found in {FIXTURE_DIR} "
            "(set ANOMALENS_PARITY_DIR to the adaptclip_parity folder)"
        )
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    expected = load_file(str(FIXTURE_DIR / "expected.safetensors"))
    tol = json.loads((FIXTURE_DIR / "tolerance.json").read_text())["tensors"]
    sd, _ = load_adapter_checkpoint(FIXTURE_DIR / "adapters_official.pt")
    adapters = AdaptCLIPAdapters(config_from_state_dict(sd))
    adapters.load_state_dict(sd, strict=True)
    adapters.eval()
    return {"E": expected, "tol": tol, "adapters": adapters}


def check(fx: dict[str, object], name: str, actual: torch.Tensor) -> float:
    """Assert ``|actual - expected[name]| <= atol[name]``; return the max difference."""
    expected = fx["E"][name]  # type: ignore[index]
    atol = fx["tol"][name]["atol"]  # type: ignore[index]
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    diff = (actual.double() - expected.double()).abs().max().item()
    if os.environ.get("ANOMALENS_PARITY_REPORT"):
        print(
            f"PARITY {name} max_abs_diff={diff:.3g} atol={atol:.3g} ratio={diff / max(atol, 1e-30):.3f}"
        )
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > atol {atol:.3g}"
    return diff


def sampled(fx: dict[str, object], maps: torch.Tensor) -> torch.Tensor:
    """Restrict (..., 518, 518) maps to the recorded 75 x 75 grid."""
    g = fx["E"]["check/grid_index"].long()  # type: ignore[index]
    return maps[..., g, :][..., :, g]


def stats(maps: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> (..., 4): mean, population std, min, max in float64."""
    m = maps.double().flatten(-2)
    return torch.stack(
        [m.mean(-1), m.std(-1, correction=0), m.amin(-1), m.amax(-1)], dim=-1
    ).float()


# ======================================================================= head-level parity
def test_textual_prompt_embeddings(fx: dict[str, object]) -> None:
    ta = fx["adapters"].textual  # type: ignore[attr-defined]
    check(fx, "text/ta_prompt_embeddings", ta.prompt_embeddings().detach())
    assert torch.equal(ta.token_ids, fx["E"]["text/ta_token_ids"].long())  # type: ignore[index]


def test_va_and_ta_image_logits(fx: dict[str, object]) -> None:
    E, adapters = fx["E"], fx["adapters"]
    with torch.no_grad():
        g_adapted = adapters.visual.global_adapter(E["image/global_embedding"])  # type: ignore[index, attr-defined]
        check(fx, "va/adapted_global_embedding", g_adapted)
        va = image_logits(g_adapted, E["text/va_static_anchors"])  # type: ignore[index]
        ta = image_logits(E["image/global_embedding"], E["text/ta_text_embeddings"])  # type: ignore[index]
    check(fx, "va/image_logits", va)
    check(fx, "ta/image_logits", ta)
    check(fx, "va/image_score", va.softmax(-1)[:, 1])
    check(fx, "ta/image_score", ta.softmax(-1)[:, 1])


def test_va_local_adapter_and_maps_on_recorded_rows(fx: dict[str, object]) -> None:
    """Only 9 token rows of P_24 are recorded: adapt them and score them row by row."""
    E, adapters = fx["E"], fx["adapters"]
    rows = E["check/token_rows"].long()  # type: ignore[index]
    tokens = E["image/patch_tokens_l24_rows"]  # type: ignore[index]  # (3, 9, D)
    with torch.no_grad():
        adapted = adapters.visual.local_adapter(tokens)  # type: ignore[attr-defined]
    proj = (adapted.double() @ E["check/random_projection_768x4"].double()).float()  # type: ignore[index]
    expected_proj = E["va/adapted_patch_tokens_proj4"][:, rows]  # type: ignore[index]
    atol = fx["tol"]["va/adapted_patch_tokens_proj4"]["atol"]  # type: ignore[index]
    assert (proj - expected_proj).abs().max() <= atol
    # per-row probabilities vs the recorded 37 x 37 low-resolution maps (CLS row 0 skipped)
    cells = rows[rows > 0] - 1
    for name, toks, text in (
        ("va", adapted, E["text/va_static_anchors"]),  # type: ignore[index]
        ("ta", tokens, E["text/ta_text_embeddings"]),  # type: ignore[index]
    ):
        probs = patch_probability_maps(toks, text, (1, toks.shape[1] - 1))[..., 0, :]  # (3, 2, 8)
        low = E[f"{name}/map_lowres"].flatten(2)[:, :, cells]  # type: ignore[index]
        atol = fx["tol"][f"{name}/map_lowres"]["atol"]  # type: ignore[index]
        assert (probs - low).abs().max() <= atol, name


def test_map_upsampling(fx: dict[str, object]) -> None:
    E = fx["E"]
    for name in ("va", "ta"):
        full = upsample(E[f"{name}/map_lowres"], 518)  # type: ignore[index]
        check(fx, f"{name}/map_sampled", sampled(fx, full))
        check(fx, f"{name}/map_stats", stats(full))


def test_zero_shot_fusion(fx: dict[str, object]) -> None:
    E = fx["E"]
    va = upsample(E["va/map_lowres"], 518)[:, 1]  # type: ignore[index]
    ta = upsample(E["ta/map_lowres"], 518)[:, 1]  # type: ignore[index]
    out = fuse_zero_shot(va, ta, E["va/image_score"], E["ta/image_score"], sigma=4.0)  # type: ignore[index]
    check(fx, "zero_shot/pixel_fused_sampled", sampled(fx, out["fused"]))
    check(fx, "zero_shot/pixel_fused_stats", stats(out["fused"]))
    check(fx, "zero_shot/pixel_smoothed_sampled", sampled(fx, out["anomaly_map"]))
    check(fx, "zero_shot/pixel_smoothed_stats", stats(out["anomaly_map"]))
    check(fx, "zero_shot/pixel_max", out["map_max"])
    check(fx, "zero_shot/image_score", out["image_score"])


@pytest.mark.parametrize("mode", list(MODES))
def test_align_maps(fx: dict[str, object], mode: str) -> None:
    E = fx["E"]
    full = upsample(E[f"{mode}/align_lowres"], 518)  # type: ignore[index]
    check(fx, f"{mode}/align_sampled", sampled(fx, full))
    check(fx, f"{mode}/align_stats", stats(full))
    hm = harmonic_mean(full, dim=1)
    check(fx, f"{mode}/align_hm_sampled", sampled(fx, hm))
    check(fx, f"{mode}/align_hm_stats", stats(hm))


@pytest.mark.parametrize("mode", list(MODES))
def test_pqa_global_head_and_scores(fx: dict[str, object], mode: str) -> None:
    E, adapters = fx["E"], fx["adapters"]
    vec = E[f"{mode}/pqa_image_vector"]  # type: ignore[index]  # (3, 4, D)
    with torch.no_grad():
        logits = adapters.prompt_query.global_head(vec.flatten(0, 1)).reshape(3, 4, 2)  # type: ignore[attr-defined]
    check(fx, f"{mode}/pqa_image_logits", logits)
    check(fx, f"{mode}/pqa_image_score", logits.softmax(-1)[..., 1].mean(1))


@pytest.mark.parametrize("mode", list(MODES))
def test_few_shot_fusion_pointwise(fx: dict[str, object], mode: str) -> None:
    """Fusion before smoothing is pointwise, so it can be checked on the sampled grid."""
    E = fx["E"]
    va = E["va/map_sampled"][:, 1]  # type: ignore[index]
    ta = E["ta/map_sampled"][:, 1]  # type: ignore[index]
    pq = E[f"{mode}/pqa_map_abnormal_sampled"]  # type: ignore[index]
    check(fx, f"{mode}/pqa_map_mean_sampled", pq.mean(1))
    align = E[f"{mode}/align_sampled"]  # type: ignore[index]
    pq_scores = E[f"{mode}/pqa_image_logits"].softmax(-1)[..., 1]  # type: ignore[index]
    out = fuse_few_shot(
        va,
        ta,
        pq,
        align,
        E["va/image_score"],
        E["ta/image_score"],
        pq_scores,  # type: ignore[index]
        sigma=0.0,
    )
    check(fx, f"{mode}/pixel_avg3_sampled", out["avg3"])
    check(fx, f"{mode}/image_avg3", out["image_avg3"])
    check(fx, f"{mode}/pixel_fused_sampled", out["fused"])
    # final score = HM(image_avg3, max of the smoothed map)
    score = harmonic_mean(torch.stack([out["image_avg3"], E[f"{mode}/pixel_max"]]), dim=0)  # type: ignore[index]
    check(fx, f"{mode}/image_score", score)


# ========================================================================== end-to-end parity
LAYERS = (6, 12, 18, 24)
QUERIES = ("query_0", "query_1", "query_2")
PROMPTS = ("prompt_0", "prompt_1")


@pytest.fixture(scope="module")
def e2e(fx: dict[str, object]) -> dict[str, object]:
    """Run ``AdaptCLIP`` from the PNGs in zero-, one- and two-shot mode; keep every output."""
    try:
        from anomalens.backbones.clip import ClipBackbone
    except ImportError as exc:  # pragma: no cover - only while the backbone is being written
        pytest.skip(f"anomalens.backbones.clip is not available: {exc}")
    from safetensors.torch import load_file

    from anomalens.detectors.adaptclip import AdaptCLIP

    clip_sd = load_file(str(FIXTURE_DIR / "clip_tiny_openai.safetensors"))
    backbone = ClipBackbone.from_openai_state_dict(clip_sd, image_size=518)
    det = AdaptCLIP(backbone, checkpoint=FIXTURE_DIR / "adapters_official.pt", batch_size=8)
    queries = [FIXTURE_DIR / "inputs" / f"{q}.png" for q in QUERIES]
    prompts = [FIXTURE_DIR / "inputs" / f"{p}.png" for p in PROMPTS]
    with torch.no_grad():
        x = backbone.preprocess(queries)
        feats = det.encode(x)
        prompt_feats = det.encode(prompts)
        g_adapted, p_adapted = det.adapters.visual(feats.global_embedding, feats.patch_tokens[-1])
        out: dict[str, object] = {
            "det": det,
            "x": x,
            "feats": feats,
            "prompt_feats": prompt_feats,
            "ta_text": det.ta_text_embeddings(),
            "g_adapted": g_adapted,
            "p_adapted": p_adapted,
        }
        det.fit(None)
        out["zero_shot"] = det.score_features(feats)
        out["zero_shot_pred"] = det.predict(queries)  # the public path, from the PNGs
        for mode, k in MODES.items():
            det.fit(prompts[:k])
            out[mode] = det.score_features(feats)
    return out


def proj4(fx: dict[str, object], tokens: torch.Tensor) -> torch.Tensor:
    r = fx["E"]["check/random_projection_768x4"].double()  # type: ignore[index]
    return (tokens.double() @ r).float()


def test_e2e_preprocess(fx: dict[str, object], e2e: dict[str, object]) -> None:
    lut = fx["E"]["preprocess/lut"]  # type: ignore[index]
    from PIL import Image

    for i, q in enumerate(QUERIES):
        png = torch.from_numpy(
            np.array(Image.open(FIXTURE_DIR / "inputs" / f"{q}.png").convert("RGB"))
        )
        ref = torch.stack([lut[c][png[..., c].long()] for c in range(3)])
        assert (e2e["x"][i] - ref).abs().max() <= fx["tol"]["preprocess/lut"]["atol"]  # type: ignore[index]


def test_e2e_text(fx: dict[str, object], e2e: dict[str, object]) -> None:
    det = e2e["det"]
    check(fx, "text/va_static_anchors", det.static_text)  # type: ignore[attr-defined]
    check(fx, "text/ta_text_embeddings", e2e["ta_text"])  # type: ignore[arg-type]
    from anomalens.prompts.adaptclip import static_sentences

    normal, abnormal = static_sentences()
    E = fx["E"]
    assert torch.equal(det.backbone.tokenize(normal), E["text/static_token_ids_normal"].long())  # type: ignore[attr-defined, index]
    assert torch.equal(det.backbone.tokenize(abnormal), E["text/static_token_ids_abnormal"].long())  # type: ignore[attr-defined, index]
    with torch.no_grad():
        emb_n = det.backbone.encode_text(normal)  # type: ignore[attr-defined]
        emb_a = det.backbone.encode_text(abnormal)  # type: ignore[attr-defined]
    check(fx, "text/static_sentence_embeddings_normal_proj4", proj4(fx, emb_n))
    check(fx, "text/static_sentence_embeddings_abnormal_proj4", proj4(fx, emb_a))
    check(fx, "text/static_sentence_embeddings_normal_first4", emb_n[:4])
    check(fx, "text/static_sentence_embeddings_abnormal_first4", emb_a[:4])


def test_e2e_image_tokens(fx: dict[str, object], e2e: dict[str, object]) -> None:
    feats, pfeats = e2e["feats"], e2e["prompt_feats"]
    rows = fx["E"]["check/token_rows"].long()  # type: ignore[index]
    assert tuple(feats.grid_size) == (37, 37)  # type: ignore[attr-defined]
    check(fx, "image/global_embedding", feats.global_embedding)  # type: ignore[attr-defined]
    check(fx, "prompt_image/global_embedding", pfeats.global_embedding)  # type: ignore[attr-defined]
    for layer, tokens, ptokens in zip(LAYERS, feats.patch_tokens, pfeats.patch_tokens):  # type: ignore[attr-defined]
        check(fx, f"image/patch_tokens_l{layer}_rows", tokens[:, rows])
        check(fx, f"image/patch_tokens_l{layer}_proj4", proj4(fx, tokens))
        check(fx, f"image/patch_tokens_l{layer}_norm", tokens.norm(dim=-1))
        check(fx, f"prompt_image/patch_tokens_l{layer}_proj4", proj4(fx, ptokens))


def test_e2e_va_ta_heads(fx: dict[str, object], e2e: dict[str, object]) -> None:
    out = e2e["zero_shot"]
    check(fx, "va/adapted_global_embedding", e2e["g_adapted"])  # type: ignore[arg-type]
    check(fx, "va/adapted_patch_tokens_proj4", proj4(fx, e2e["p_adapted"]))  # type: ignore[arg-type]
    for head in ("va", "ta"):
        check(fx, f"{head}/image_logits", out[f"{head}_logits"])  # type: ignore[index]
        check(fx, f"{head}/image_score", out[f"{head}_score"])  # type: ignore[index]
        check(fx, f"{head}/map_lowres", out[f"{head}_map_lowres"])  # type: ignore[index]
        check(fx, f"{head}/map_sampled", sampled(fx, out[f"{head}_map"]))  # type: ignore[index]
        check(fx, f"{head}/map_stats", stats(out[f"{head}_map"]))  # type: ignore[index]


def test_e2e_zero_shot(fx: dict[str, object], e2e: dict[str, object]) -> None:
    out, pred = e2e["zero_shot"], e2e["zero_shot_pred"]
    check(fx, "zero_shot/pixel_fused_sampled", sampled(fx, out["fused"]))  # type: ignore[index]
    check(fx, "zero_shot/pixel_fused_stats", stats(out["fused"]))  # type: ignore[index]
    check(fx, "zero_shot/pixel_max", out["map_max"])  # type: ignore[index]
    for maps, scores in (
        (out["anomaly_map"], out["image_score"]),
        (pred.anomaly_map, pred.image_score),
    ):  # type: ignore[index, attr-defined]
        check(fx, "zero_shot/pixel_smoothed_sampled", sampled(fx, maps))
        check(fx, "zero_shot/pixel_smoothed_stats", stats(maps))
        check(fx, "zero_shot/image_score", scores)


@pytest.mark.parametrize("mode", list(MODES))
def test_e2e_few_shot(fx: dict[str, object], e2e: dict[str, object], mode: str) -> None:
    out = e2e[mode]
    check(fx, f"{mode}/pqa_image_logits", out["pq_logits"])  # type: ignore[index]
    check(fx, f"{mode}/pqa_image_vector", out["pq_image_vector"])  # type: ignore[index]
    check(fx, f"{mode}/pqa_image_score", out["pq_score"])  # type: ignore[index]
    pq = out["pq_maps"]  # type: ignore[index]  # (B, L, 2, S, S)
    check(fx, f"{mode}/pqa_map_abnormal_sampled", sampled(fx, pq[:, :, 1]))
    check(fx, f"{mode}/pqa_map_stats", stats(pq))
    check(fx, f"{mode}/pqa_map_mean_sampled", sampled(fx, out["pq_map"]))  # type: ignore[index]
    check(fx, f"{mode}/align_lowres", out["align_lowres"])  # type: ignore[index]
    check(fx, f"{mode}/align_sampled", sampled(fx, out["align"]))  # type: ignore[index]
    check(fx, f"{mode}/align_stats", stats(out["align"]))  # type: ignore[index]
    check(fx, f"{mode}/align_hm_sampled", sampled(fx, out["align_hm"]))  # type: ignore[index]
    check(fx, f"{mode}/align_hm_stats", stats(out["align_hm"]))  # type: ignore[index]
    check(fx, f"{mode}/pixel_avg3_sampled", sampled(fx, out["avg3"]))  # type: ignore[index]
    check(fx, f"{mode}/image_avg3", out["image_avg3"])  # type: ignore[index]
    check(fx, f"{mode}/pixel_fused_sampled", sampled(fx, out["fused"]))  # type: ignore[index]
    check(fx, f"{mode}/pixel_fused_stats", stats(out["fused"]))  # type: ignore[index]
    check(fx, f"{mode}/pixel_max", out["map_max"])  # type: ignore[index]
    finals = [(out["anomaly_map"], out["image_score"])]  # type: ignore[index]
    if f"{mode}_pred" in e2e:
        finals.append((e2e[f"{mode}_pred"].anomaly_map, e2e[f"{mode}_pred"].image_score))  # type: ignore[attr-defined]
    for maps, scores in finals:
        check(fx, f"{mode}/pixel_smoothed_sampled", sampled(fx, maps))
        check(fx, f"{mode}/pixel_smoothed_stats", stats(maps))
        check(fx, f"{mode}/image_score", scores)
