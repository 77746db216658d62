"""Parity of the CLIP backbone with the official AdaptCLIP code (tiny random CLIP fixture).

The fixture folder (``../shared/fixtures/adaptclip_parity``, or ``$ANOMALENS_PARITY_DIR``) holds a
tiny CLIP in OpenAI key layout (float16 storage, run in float32 as the official code does), the
input PNGs, and tensors recorded from the official code: preprocessing, the 518-px positional
embedding, V-V-stream patch tokens of blocks 6/12/18/24 (rows, 768x4 checksums, norms), global
embeddings, and text embeddings. Tolerances come from the fixture's ``tolerance.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens.backbones.clip import ClipBackbone, load_state_dict_file

pytestmark = pytest.mark.shared

LAYERS = (6, 12, 18, 24)
VV_START = 6  # official DPAM_replace(20) on 24 blocks: blocks 6..24 run the dual path


def _fixture_dir() -> Path:
    env = os.environ.get("ANOMALENS_PARITY_DIR")
    repo = Path(__file__).resolve().parents[2]
    path = Path(env) if env else repo / ".." / "shared" / "fixtures" / "adaptclip_parity"
    if not (path / "expected.safetensors").is_file():
        pytest.skip(
            f"AdaptCLIP parity fixture not found at {path} (set ANOMALENS_PARITY_DIR or put the "
            "team's shared/ folder beside the checkout)"
        )
    return path


@pytest.fixture(scope="module")
def fx() -> dict[str, object]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _fixture_dir()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with safe_open(str(path / "expected.safetensors"), "pt") as f:
        meta = f.metadata()
    tol = json.loads((path / "tolerance.json").read_text())
    bb = ClipBackbone.from_openai_state_dict(
        load_state_dict_file(path / "clip_tiny_openai.safetensors"), image_size=518
    )
    yield {
        "dir": path,
        "exp": load_file(str(path / "expected.safetensors")),
        "meta": meta,
        "tol": tol.get("tensors", tol),
        "bb": bb,
    }
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def queries(fx: dict) -> torch.Tensor:
    names = json.loads(fx["meta"]["queries"])
    return fx["bb"].preprocess([fx["dir"] / "inputs" / f"{n}.png" for n in names])


@pytest.fixture(scope="module")
def query_features(fx: dict, queries: torch.Tensor):
    return fx["bb"].encode_image(queries, layers=LAYERS, vv_start=VV_START)


def _check(fx: dict, key: str, got: torch.Tensor) -> None:
    exp = fx["exp"][key]
    atol = fx["tol"][key]["atol"]
    assert got.shape == exp.shape, f"{key}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
    diff = (got.float() - exp.float()).abs().max().item()
    assert diff <= atol, f"{key}: max abs diff {diff:.3g} > atol {atol:.3g}"


def _proj4(fx: dict, t: torch.Tensor) -> torch.Tensor:
    """Checksum as recorded: tokens @ R, computed in float64 from float32."""
    return (t.double() @ fx["exp"]["check/random_projection_768x4"].double()).float()


def test_expected_keys_present(fx: dict) -> None:
    keys = set(fx["exp"])
    needed = {"preprocess/lut", "clip/visual_positional_embedding_518", "image/global_embedding"}
    needed |= {
        f"image/patch_tokens_l{layer}_{kind}"
        for layer in LAYERS
        for kind in ("rows", "proj4", "norm")
    }
    needed |= {f"prompt_image/patch_tokens_l{layer}_proj4" for layer in LAYERS}
    assert needed <= keys, f"missing in expected.safetensors: {sorted(needed - keys)}"


def test_architecture_inferred(fx: dict) -> None:
    bb = fx["bb"]
    assert (bb.num_layers, bb.vision_width, bb.patch_size, bb.embed_dim) == (24, 64, 14, 768)
    assert (bb.text_width, bb.num_text_layers, bb.grid_size) == (64, 3, (37, 37))
    assert bb.describe()["quick_gelu"] is True


def test_positional_embedding_518(fx: dict) -> None:
    pos = fx["bb"].model.visual.positional_embedding.detach()
    _check(fx, "clip/visual_positional_embedding_518", pos)


def test_preprocessing(fx: dict, queries: torch.Tensor) -> None:
    exp = fx["exp"]
    lut = exp["preprocess/lut"]
    names = json.loads(fx["meta"]["queries"])
    png = np.stack(
        [np.asarray(Image.open(fx["dir"] / "inputs" / f"{n}.png").convert("RGB")) for n in names]
    )
    png_t = torch.from_numpy(png.copy()).long()
    expected = torch.stack([lut[c][png_t[..., c]] for c in range(3)], dim=1)
    torch.testing.assert_close(queries, expected, atol=fx["tol"]["preprocess/lut"]["atol"], rtol=0)
    # the non-square image checks the PIL bicubic squash resize
    x = fx["bb"].preprocess([fx["dir"] / "inputs" / "resize_check_600x420.png"])[0]
    grid = exp["check/grid_index"].long()
    _check(fx, "preprocess/resize_check_sampled", x[:, grid][:, :, grid])
    stats = torch.stack(
        [
            torch.stack([c.mean(), c.std(unbiased=False), c.min(), c.max()])
            for c in x.double().reshape(3, -1)
        ]
    )
    _check(fx, "preprocess/resize_check_stats", stats)


@pytest.mark.parametrize("layer", LAYERS)
def test_vv_patch_tokens(fx: dict, query_features, layer: int) -> None:
    tokens = query_features.patch_tokens[LAYERS.index(layer)]  # (3, 1370, 768)
    rows = fx["exp"]["check/token_rows"].long()
    _check(fx, f"image/patch_tokens_l{layer}_rows", tokens[:, rows])
    _check(fx, f"image/patch_tokens_l{layer}_proj4", _proj4(fx, tokens))
    _check(fx, f"image/patch_tokens_l{layer}_norm", tokens.double().norm(dim=-1).float())


def test_global_embedding(fx: dict, query_features) -> None:
    _check(fx, "image/global_embedding", query_features.global_embedding)


def test_prompt_images(fx: dict) -> None:
    bb = fx["bb"]
    names = json.loads(fx["meta"]["prompts"])
    x = bb.preprocess([fx["dir"] / "inputs" / f"{n}.png" for n in names])
    f = bb.encode_image(x, layers=LAYERS, vv_start=VV_START, batch_size=1)
    _check(fx, "prompt_image/global_embedding", f.global_embedding)
    for layer, tokens in zip(LAYERS, f.patch_tokens):
        _check(fx, f"prompt_image/patch_tokens_l{layer}_proj4", _proj4(fx, tokens))


def test_static_text_embeddings(fx: dict) -> None:
    bb, exp = fx["bb"], fx["exp"]
    anchors = []
    for kind in ("normal", "abnormal"):
        sentences = json.loads(fx["meta"][f"static_{kind}_sentences"])
        ids = bb.tokenize(sentences)
        torch.testing.assert_close(ids, exp[f"text/static_token_ids_{kind}"].long(), atol=0, rtol=0)
        emb = bb.encode_text(ids)
        _check(fx, f"text/static_sentence_embeddings_{kind}_first4", emb[:4])
        _check(fx, f"text/static_sentence_embeddings_{kind}_proj4", _proj4(fx, emb))
        anchors.append(emb.mean(dim=0))
    _check(fx, "text/va_static_anchors", torch.stack(anchors))


def test_learnable_prompt_text_embeddings(fx: dict) -> None:
    bb, exp = fx["bb"], fx["exp"]
    ids = exp["text/ta_token_ids"].long()
    torch.testing.assert_close(ids[0], bb.tokenize(["X X X X X X X X X X X X."])[0], atol=0, rtol=0)
    emb = exp["text/ta_prompt_embeddings"]
    # SOS and the suffix rows are this CLIP's own token embeddings
    own = bb.token_embedding(ids)
    torch.testing.assert_close(emb[:, :1], own[:, :1], atol=0, rtol=0)
    torch.testing.assert_close(emb[:, 13:], own[:, 13:], atol=0, rtol=0)
    _check(fx, "text/ta_text_embeddings", bb.encode_text_from_embeddings(emb, ids))
