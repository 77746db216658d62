"""Unit tests of the CLIP backbone on the tiny random CLIP (fast, offline)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

from anomalens.backbones.clip import (
    ClipBackbone,
    load_state_dict_file,
    openai_clip_config,
    resize_positional_embedding,
)
from anomalens.backbones.clip_presets import get_clip_preset, list_clip_presets
from anomalens.backbones.tiny import TINY_CLIP_NAME, make_tiny_clip, randomise_clip_
from anomalens.backbones.weights import WeightNotAvailableError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bb() -> ClipBackbone:
    return make_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- references


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head softmax(q k^T / sqrt(d)) v with explicit loops; (L, W) inputs for one image."""
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
        outs.append(a @ v[:, sl])
    return torch.cat(outs, dim=-1)


def _reference_forward(
    model: CLIP, image: torch.Tensor, layers: tuple[int, ...], vv_start: int | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Direct per-image computation of spec section 4 from the raw weights (float64)."""
    vis = model.visual
    p = {k: v.detach().double() for k, v in vis.state_dict().items()}
    x = F.conv2d(image[None].double(), p["conv1.weight"], stride=vis.conv1.stride)[0]
    x = x.flatten(1).T
    x = torch.cat([p["class_embedding"][None], x]) + p["positional_embedding"]
    x = _ln_p(x, p, "ln_pre")
    o, v, taps = x, None, {}
    for i, blk in enumerate(vis.transformer.resblocks, start=1):
        pre = f"transformer.resblocks.{i - 1}."
        h = _ln_p(o, p, pre + "ln_1")
        qkv = h @ p[pre + "attn.in_proj_weight"].T + p[pre + "attn.in_proj_bias"]
        q, k, val = qkv.chunk(3, dim=-1)
        heads = blk.attn.num_heads

        def out_proj(y: torch.Tensor, pre: str = pre) -> torch.Tensor:
            return y @ p[pre + "attn.out_proj.weight"].T + p[pre + "attn.out_proj.bias"]

        y_o = out_proj(_attention(q, k, val, heads))
        if vv_start is not None and i >= vv_start:
            y_v = out_proj(_attention(val, val, val, heads))
            v = (o if v is None else v) + y_v
        o = o + y_o
        m = _ln_p(o, p, pre + "ln_2") @ p[pre + "mlp.c_fc.weight"].T + p[pre + "mlp.c_fc.bias"]
        m = m * torch.sigmoid(1.702 * m)  # QuickGELU
        o = o + m @ p[pre + "mlp.c_proj.weight"].T + p[pre + "mlp.c_proj.bias"]
        if i in layers:
            taps[i] = (v if v is not None else o).clone()
    proj = [_ln_p(taps[layer], p, "ln_post") @ p["proj"] for layer in layers]
    return proj, o[0] @ p["proj"]


def _ln_p(x: torch.Tensor, p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * p[name + ".weight"] + p[name + ".bias"]


# ----------------------------------------------------------------------------- shapes


def test_shapes_and_properties(bb: ClipBackbone, images: torch.Tensor) -> None:
    assert (bb.image_size, bb.grid_size, bb.patch_size) == (64, (8, 8), 8)
    assert (bb.embed_dim, bb.vision_width, bb.text_width) == (32, 64, 32)
    assert (bb.num_layers, bb.num_text_layers, bb.context_length) == (4, 3, 77)
    f = bb.encode_image(images, layers=(1, 3, 4), vv_start=2)
    assert f.layers == (1, 3, 4) and f.grid_size == (8, 8)
    assert [tuple(t.shape) for t in f.patch_tokens] == [(3, 65, 32)] * 3
    assert f.global_embedding.shape == (3, 32)
    assert all(t.dtype == torch.float32 for t in [*f.patch_tokens, f.global_embedding])
    tok = bb.encode_image_tokens(images, layers=(2,), vv_start=None)
    assert tok.tokens[0].shape == (3, 65, 64) and tok.final.shape == (3, 65, 64)
    assert bb.encode_text(["a", "b c"]).shape == (2, 32)
    assert bb.tokenize("a photo").shape == (1, 77)
    assert bb.token_embedding(bb.tokenize(["x", "y"])).shape == (2, 77, 32)
    idx = torch.tensor([[0, 1, 8, 9], [5, 6, 13, 14], [62, 63, 54, 55]])
    assert bb.encode_windows(images, idx).shape == (3, 3, 32)


def test_preprocess_squash_bicubic_and_normalise(bb: ClipBackbone) -> None:
    grey = np.full((30, 50), 128, dtype=np.uint8)  # greyscale, not square
    x = bb.preprocess([grey, np.zeros((64, 64, 3), np.uint8)])
    assert x.shape == (2, 3, 64, 64)
    mean = torch.tensor(bb.mean).view(3, 1, 1)
    std = torch.tensor(bb.std).view(3, 1, 1)
    torch.testing.assert_close(x[0], ((128 / 255 - mean) / std).expand(3, 64, 64))
    torch.testing.assert_close(x[1], ((0 - mean) / std).expand(3, 64, 64))
    # raw images are accepted by encode_image and give the same result as preprocessed ones
    f_raw = bb.encode_image([grey], layers=(4,))
    f_pre = bb.encode_image(x[:1], layers=(4,))
    torch.testing.assert_close(f_raw.global_embedding, f_pre.global_embedding)


# ----------------------------------------------------------------------------- V-V path


@pytest.mark.parametrize("vv_start", [None, 1, 3])
def test_vv_path_matches_direct_computation(
    bb: ClipBackbone, images: torch.Tensor, vv_start: int | None
) -> None:
    layers = (1, 2, 3, 4)
    f = bb.encode_image(images, layers=layers, vv_start=vv_start)
    for b in range(images.shape[0]):
        ref_tokens, ref_global = _reference_forward(bb.model, images[b], layers, vv_start)
        for got, ref in zip(f.patch_tokens, ref_tokens):
            torch.testing.assert_close(got[b].double(), ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(f.global_embedding[b].double(), ref_global, atol=2e-5, rtol=1e-5)


def test_vv_stream_differs_from_original_and_taps_are_copies(
    bb: ClipBackbone, images: torch.Tensor
) -> None:
    plain = bb.encode_image(images, layers=(2, 4), vv_start=None)
    vv = bb.encode_image(images, layers=(2, 4), vv_start=2)
    # the original stream (global) is unchanged by the side stream
    torch.testing.assert_close(vv.global_embedding, plain.global_embedding)
    assert (vv.patch_tokens[1] - plain.patch_tokens[1]).abs().max() > 1e-3
    # taps hold their own layer's value (AnomalyCLIP bug #18: every tap = final value)
    assert (vv.patch_tokens[0] - vv.patch_tokens[1]).abs().max() > 1e-3
    alone = bb.encode_image(images, layers=(2,), vv_start=2)
    torch.testing.assert_close(alone.patch_tokens[0], vv.patch_tokens[0])


def test_plain_global_with_ln_post_equals_open_clip_encode_image(
    bb: ClipBackbone, images: torch.Tensor
) -> None:
    f = bb.encode_image(images, layers=(4,), vv_start=None, global_ln_post=True)
    with torch.no_grad():
        ref = bb.model.encode_image(images)
    torch.testing.assert_close(f.global_embedding, ref, atol=1e-6, rtol=1e-6)
    # project_tokens on the unprojected final stream gives the same
    tok = bb.encode_image_tokens(images, layers=(4,))
    torch.testing.assert_close(bb.project_tokens(tok.final[:, 0]), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bb.project_tokens(tok.tokens[0]), f.patch_tokens[0])


def test_batching_gives_the_same_result(bb: ClipBackbone, images: torch.Tensor) -> None:
    full = bb.encode_image(images, layers=(2, 4), vv_start=2)
    chunked = bb.encode_image(images, layers=(2, 4), vv_start=2, batch_size=2)
    for a, b in zip(full.patch_tokens, chunked.patch_tokens):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.global_embedding, chunked.global_embedding)


# ----------------------------------------------------------------------------- positions


def test_resize_positional_embedding_bilinear_reference() -> None:
    # value = row-ramp in channel 0, column-ramp in channel 1: bilinear resampling of a linear
    # function with align_corners=False gives the (clamped) source coordinate itself.
    h0, w0, h1, w1 = 3, 4, 7, 5
    rows, cols = torch.meshgrid(torch.arange(float(h0)), torch.arange(float(w0)), indexing="ij")
    grid = torch.stack([rows, cols], -1).reshape(h0 * w0, 2)
    pos = torch.cat([torch.tensor([[42.0, -7.0]]), grid])
    out = resize_positional_embedding(pos, (h0, w0), (h1, w1))
    assert out.shape == (1 + h1 * w1, 2)
    torch.testing.assert_close(out[0], pos[0])

    def src(n_out: int, n_in: int) -> torch.Tensor:
        s = (torch.arange(float(n_out)) + 0.5) * (n_in / n_out) - 0.5
        return s.clamp(0, n_in - 1)

    exp_r = src(h1, h0)[:, None].expand(h1, w1).reshape(-1)
    exp_c = src(w1, w0)[None, :].expand(h1, w1).reshape(-1)
    torch.testing.assert_close(out[1:, 0], exp_r)
    torch.testing.assert_close(out[1:, 1], exp_c)
    torch.testing.assert_close(resize_positional_embedding(pos, (h0, w0), (h0, w0)), pos)


def test_set_image_size_updates_grid_and_matches_open_clip_forward() -> None:
    bb = make_tiny_clip(seed=3, image_size=96)
    assert bb.grid_size == (12, 12) and bb.image_size == 96
    assert tuple(bb.model.visual.grid_size) == (12, 12)
    assert tuple(bb.model.visual.image_size) == (96, 96)
    native = make_tiny_clip(seed=3)
    expected = resize_positional_embedding(
        native.model.visual.positional_embedding.detach(), (8, 8), (12, 12)
    )
    torch.testing.assert_close(bb.model.visual.positional_embedding.detach(), expected)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    f = bb.encode_image(x, layers=(4,), global_ln_post=True)
    assert f.patch_tokens[0].shape == (2, 145, 32)
    with torch.no_grad():
        torch.testing.assert_close(f.global_embedding, bb.model.encode_image(x))
    # resizing back restores the pretrained embedding exactly (no compounding)
    bb.set_image_size(64)
    torch.testing.assert_close(
        bb.model.visual.positional_embedding.detach(), native.model.visual.positional_embedding
    )
    with pytest.raises(ValueError, match="multiple of the patch size"):
        bb.set_image_size(60)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        bb.encode_image(x, layers=(4,))


# ----------------------------------------------------------------------------- windows


def test_encode_windows_full_window_equals_clip_and_single_tokens(
    bb: ClipBackbone, images: torch.Tensor
) -> None:
    n = bb.grid_size[0] * bb.grid_size[1]
    full = bb.encode_windows(images, torch.arange(n)[None])
    ref = bb.encode_image(images, layers=(4,), global_ln_post=True).global_embedding
    torch.testing.assert_close(full[:, 0], ref, atol=1e-5, rtol=1e-5)
    # a 2-token window equals running [CLS, tok_a, tok_b] (with their positions) by hand
    idx = torch.tensor([[9, 20], [0, 63]])
    win = bb.encode_windows(images, idx, max_sequences=2)
    vis = bb.model.visual
    with torch.no_grad():
        x = vis.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([vis.class_embedding.expand(3, 1, -1), x], 1) + vis.positional_embedding
        for m, (a, b) in enumerate(idx.tolist()):
            seq = vis.ln_pre(x[:, [0, 1 + a, 1 + b]])
            ref_m = vis.ln_post(vis.transformer(seq)[:, 0]) @ vis.proj
            torch.testing.assert_close(win[:, m], ref_m, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        bb.encode_windows(images, torch.tensor([[0, 64]]))


# ----------------------------------------------------------------------------- text


def test_encode_text_equals_open_clip(bb: ClipBackbone) -> None:
    texts = ["a photo of a damaged object.", "a flawless bottle", "x"]
    ids = bb.tokenize(texts)
    with torch.no_grad():
        ref = bb.model.encode_text(ids)
    torch.testing.assert_close(bb.encode_text(texts), ref)
    torch.testing.assert_close(bb.encode_text(ids, batch_size=2), ref)
    assert int(ids[0, 0]) == 49406 and int(ids.max()) == 49407


def test_prompt_embedding_path_equals_plain_text_and_is_differentiable(bb: ClipBackbone) -> None:
    ids = bb.tokenize(["X X X X object.", "X X X X damaged object."])
    emb = bb.token_embedding(ids)
    torch.testing.assert_close(bb.encode_text_from_embeddings(emb, ids), bb.encode_text(ids))
    # splice learnable context vectors at positions 1..4 and backpropagate into them
    ctx = torch.nn.Parameter(torch.randn(4, bb.text_width) * 0.02)
    spliced = torch.cat([emb[:, :1], ctx.expand(2, -1, -1), emb[:, 5:]], dim=1)
    out = bb.encode_text_from_embeddings(spliced, ids)
    out.square().sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in bb.parameters())


def test_deep_prompts_match_direct_loop(bb: ClipBackbone) -> None:
    ids = bb.tokenize(["X X X X X X object.", "X X X X X X damaged object."])
    emb = bb.token_embedding(ids)
    gen = torch.Generator().manual_seed(2)
    deep = [torch.randn(3, bb.text_width, generator=gen) * 0.1 for _ in range(2)]
    deep = [torch.nn.Parameter(d) for d in deep]
    got = bb.encode_text_from_embeddings(emb, ids, deep_prompts=deep)
    m = bb.model
    with torch.no_grad():
        x = emb + m.positional_embedding
        for i, blk in enumerate(m.transformer.resblocks, start=1):
            if i >= 2:
                x = x.clone()
                x[:, 1:4] = deep[i - 2].detach()
            x = blk(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        ref = x[torch.arange(2), ids.argmax(-1)] @ m.text_projection
    torch.testing.assert_close(got.detach(), ref, atol=1e-6, rtol=1e-6)
    assert (got.detach() - bb.encode_text(ids)).abs().max() > 1e-4
    got.sum().backward()
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in deep)
    with pytest.raises(ValueError, match="deep prompts"):
        bb.encode_text_from_embeddings(emb, ids, deep_prompts=[deep[0]] * 3)


# ----------------------------------------------------------------------------- weights


def _openai_like_clip(seed: int) -> CLIP:
    """Tiny CLIP with 64-wide heads, so that OpenAI's head rule (width // 64) holds."""
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=48,
        vision_cfg=CLIPVisionCfg(layers=2, width=128, patch_size=8, image_size=32, head_width=64),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
        quick_gelu=True,
    )
    randomise_clip_(model, seed)
    return model


def test_openai_state_dict_loads_like_native(tmp_path: Path) -> None:
    native = _openai_like_clip(seed=11)
    # OpenAI files: float16 storage plus the TorchScript-only scalars
    sd = {k: v.detach().half() for k, v in native.state_dict().items()}
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77))
    sd["vocab_size"] = torch.tensor(49408)
    save_file(sd, str(tmp_path / "openai_like.safetensors"))
    loaded = load_state_dict_file(tmp_path / "openai_like.safetensors")
    assert "input_resolution" not in loaded
    cfg = openai_clip_config(loaded)
    assert cfg["vision_cfg"]["layers"] == 2 and cfg["text_cfg"]["heads"] == 1  # type: ignore[index]

    bb_openai = ClipBackbone.from_openai_state_dict(loaded, image_size=48)
    native.load_state_dict({k: v.float() for k, v in loaded.items()})  # same fp16-rounded values
    bb_native = ClipBackbone.from_open_clip(native, image_size=48)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    a = bb_openai.encode_image(x, layers=(1, 2), vv_start=2)
    b = bb_native.encode_image(x, layers=(1, 2), vv_start=2)
    for ta, tb in zip(a.patch_tokens, b.patch_tokens):
        torch.testing.assert_close(ta, tb, atol=0, rtol=0)
    torch.testing.assert_close(a.global_embedding, b.global_embedding, atol=0, rtol=0)
    ids = bb_native.tokenize(["a photo of a thing"])
    torch.testing.assert_close(bb_openai.encode_text(ids), bb_native.encode_text(ids))


def test_create_from_local_file_and_tiny_name(tmp_path: Path) -> None:
    ref = make_tiny_clip(seed=4)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, str(path))
    bb = ClipBackbone.create(TINY_CLIP_NAME, pretrained=str(path), image_size=64)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        bb.encode_image(x, layers=(3,), vv_start=2).patch_tokens[0],
        ref.encode_image(x, layers=(3,), vv_start=2).patch_tokens[0],
    )
    # random init is seeded; force_quick_gelu=False switches the activation
    r1 = ClipBackbone.create(TINY_CLIP_NAME, pretrained=None, seed=1, image_size=None)
    r2 = ClipBackbone.create(TINY_CLIP_NAME, pretrained=None, seed=1, image_size=None)
    torch.testing.assert_close(r1.encode_text(["a"]), r2.encode_text(["a"]))
    assert r1.describe()["quick_gelu"] is True
    g = ClipBackbone.create(TINY_CLIP_NAME, None, image_size=64, force_quick_gelu=False)
    assert g.describe()["quick_gelu"] is False
    with pytest.raises(WeightNotAvailableError):
        ClipBackbone.create(TINY_CLIP_NAME, pretrained=str(tmp_path / "missing.pt"))


def test_offline_tag_fails_clearly_without_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "anomalens"))

    def no_download(*args: object, **kwargs: object) -> str:
        raise AssertionError("open_clip download attempted while offline")

    monkeypatch.setattr(open_clip, "download_pretrained", no_download)
    with pytest.raises(WeightNotAvailableError, match=r"ViT-B-32.*openai.*offline"):
        ClipBackbone.create("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipBackbone.create("no-such-model", pretrained=None)


def test_presets() -> None:
    names = list_clip_presets()
    for name in ("adaptclip-vitl14-336@518", "vitb16plus-240@512", "winclip-vitb16plus-240@240"):
        assert name in names
    p = get_clip_preset("adaptclip-vitl14-336@518")
    assert (p.model_name, p.pretrained, p.image_size, p.quick_gelu) == (
        "ViT-L-14-336",
        "openai",
        518,
        True,
    )
    assert get_clip_preset("vitb16plus-240@512").pretrained == "laion400m_e31"
    with pytest.raises(KeyError, match="Available"):
        get_clip_preset("nope")
    bb = ClipBackbone.from_preset("anomalens-tiny-clip@64", image_size=32)
    assert bb.grid_size == (4, 4) and bb.interpolation == "bicubic"


# ----------------------------------------------------------------------------- precision, hooks


@pytest.mark.parametrize(("precision", "tol"), [("bf16", 0.03), ("fp16", 0.005)])
def test_reduced_precision_close_to_fp32(images: torch.Tensor, precision: str, tol: float) -> None:
    ref = make_tiny_clip(seed=0).encode_image(images, layers=(2, 4), vv_start=2)
    low_bb = make_tiny_clip(seed=0, precision=precision)  # type: ignore[arg-type]
    assert low_bb.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    low = low_bb.encode_image(images, layers=(2, 4), vv_start=2)
    for a, b in zip(
        [*low.patch_tokens, low.global_embedding], [*ref.patch_tokens, ref.global_embedding]
    ):
        assert a.dtype == torch.float32
        rel = (a - b).norm() / b.norm()
        assert rel < tol, f"{precision}: relative error {rel:.4f}"
    t_low = low_bb.encode_text(["a photo of a damaged object."])
    t_ref = make_tiny_clip(seed=0).encode_text(["a photo of a damaged object."])
    assert (t_low - t_ref).norm() / t_ref.norm() < tol


def test_no_hooks_left(bb: ClipBackbone, images: torch.Tensor) -> None:
    bb.encode_image(images, layers=(1, 4), vv_start=2)
    bb.encode_windows(images, torch.tensor([[0, 1]]))
    bb.encode_text(["a"])
    for mod in bb.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
        assert not mod._backward_hooks
    bb.train()
    assert not bb.model.training


def test_layer_errors(bb: ClipBackbone, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"numbered 1\.\.4"):
        bb.encode_image(images, layers=(0,))
    with pytest.raises(ValueError, match="vv_start"):
        bb.encode_image(images, layers=(4,), vv_start=5)


@pytest.mark.parametrize("route", ["hf_hub", "url"])
def test_offline_tag_uses_cached_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    ref = make_tiny_clip(seed=6)
    sd = {k: v.contiguous() for k, v in ref.model.state_dict().items()}
    if route == "hf_hub":  # as `anomalens weights download` stores an hf-hub file
        cfg = {"hf_hub": "someorg/tiny-clip/", "quick_gelu": True}
        target = (
            tmp_path / "anomalens" / "hf" / "someorg--tiny-clip" / "open_clip_model.safetensors"
        )
    else:  # open_clip's URL cache folder (cache_dir)
        cfg = {"url": "https://example.invalid/w/tiny-clip.safetensors", "quick_gelu": True}
        target = tmp_path / "oc" / "tiny-clip.safetensors"
    target.parent.mkdir(parents=True)
    save_file(sd, str(target))
    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "anomalens"))
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda m, t: cfg if t == "faketag" else {})

    def no_download(*args: object, **kwargs: object) -> str:
        raise AssertionError("open_clip download attempted while offline")

    monkeypatch.setattr(open_clip, "download_pretrained", no_download)
    bb = ClipBackbone.create(
        TINY_CLIP_NAME, "faketag", image_size=64, cache_dir=str(tmp_path / "oc")
    )
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        bb.encode_image(x, layers=(4,)).global_embedding,
        ref.encode_image(x, layers=(4,)).global_embedding,
    )


def test_check_taps_validates_layers_and_vv_start() -> None:
    from anomalens.backbones.clip import check_taps

    assert check_taps(24, [6, 12, 18, 24], 6) == ((6, 12, 18, 24), 6)
    with pytest.raises(ValueError, match="layers"):
        check_taps(12, (6, 13), 4)
    with pytest.raises(ValueError, match="vv_start"):
        check_taps(12, (12,), 0)


def test_build_clip_backbone_refuses_a_precision_a_ready_backbone_does_not_have(
    bb: ClipBackbone,
) -> None:
    from anomalens.backbones.clip import build_clip_backbone

    assert bb.precision == "fp32"
    same, _ = build_clip_backbone(bb)  # None keeps the backbone's own
    assert same is bb and build_clip_backbone(bb, precision="fp32")[0] is bb
    with pytest.raises(ValueError, match="precision='bf16' differs"):
        build_clip_backbone(bb, precision="bf16")


def test_preprocess_on_a_device_equals_the_cpu_result(bb: ClipBackbone) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (40, 90, 3))]
    ims[1] = ims[1].astype(np.uint8)
    ref = bb.preprocess(ims)
    assert ref.device.type == "cpu" and ref.is_contiguous()
    manual = torch.from_numpy(ims[0]).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(bb.mean).view(3, 1, 1)
    std = torch.tensor(bb.std).view(3, 1, 1)
    assert torch.equal(ref[0], (manual - mean) / std)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        assert torch.equal(bb.preprocess(ims, device=dev).cpu(), ref)
