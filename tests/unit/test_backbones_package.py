"""The backbones package: build_backbone, the PatchFeatureExtractor protocol, the one
positional-embedding resize, the re-exports of ``backbones.clip`` and the import graph."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import anomalens.backbones as backbones_pkg
from anomalens.backbones import PatchFeatureExtractor, PatchFeatures, build_backbone
from anomalens.backbones.clip import ClipBackbone, musc_clip_backbone
from anomalens.backbones.clip_presets import CLIP_PRESETS, get_clip_preset
from anomalens.backbones.cnn import CNNFeatureExtractor, create_cnn_backbone
from anomalens.backbones.patch_features import ClipPatchExtractor, CnnPatchExtractor
from anomalens.backbones.pos_embed import resize_positional_embedding
from anomalens.backbones.tiny import make_tiny_clip

BACKBONES_DIR = Path(backbones_pkg.__file__).parent


@pytest.fixture(scope="module")
def tiny() -> ClipBackbone:
    return make_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def cnn() -> CNNFeatureExtractor:
    return build_backbone("cnn", "mobilenet_v2", weights="random")


# ----------------------------------------------------------------------------- build_backbone


def test_build_cnn_from_a_preset_name(cnn: CNNFeatureExtractor) -> None:
    assert isinstance(cnn, CNNFeatureExtractor)
    assert cnn.preset.name == "mobilenet_v2" and cnn.layers == ("features.6", "features.13")
    ref = create_cnn_backbone("mobilenet_v2", weights="random")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for a, b in zip(cnn(x), ref(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_build_cnn_options_layers_and_tf_padding() -> None:
    net = build_backbone(
        "cnn", "resnet18", weights="random", layers=["layer1", "layer3"], tf_padding=True
    )
    assert net.layers == ("layer1", "layer3") and net.describe()["tf_padding"] is True
    maps = net(torch.zeros(2, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 16, 16), (256, 4, 4)]


def test_build_cnn_takes_a_built_extractor_as_is(cnn: CNNFeatureExtractor) -> None:
    assert build_backbone("cnn", cnn) is cnn
    with pytest.raises(ValueError, match="cannot change the built CNN extractor"):
        build_backbone("cnn", cnn, weights="random")
    with pytest.raises(ValueError, match="layers"):
        build_backbone("cnn", cnn, layers=["features.3"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": "fp16"}, "applies to CLIP backbones"),
        ({"image_size": 224}, "image_size= applies to CLIP backbones"),
        ({"precision": "fp8"}, "precision must be one of"),
    ],
)
def test_build_cnn_refuses_clip_only_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_backbone("cnn", "mobilenet_v2", weights="random", **kwargs)


def test_build_backbone_unknown_kind_and_names() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone kind 'vit'\. Available: cnn, clip"):
        build_backbone("vit", "x")  # type: ignore[call-overload]
    with pytest.raises(KeyError, match="Available"):
        build_backbone("cnn", "vgg_unknown", weights="random")
    with pytest.raises(KeyError, match=r"Available: .*anomalens-tiny-clip@64"):
        build_backbone("clip", "ViT-nope")


def test_build_clip_from_the_tiny_preset() -> None:
    bb = build_backbone("clip", "anomalens-tiny-clip@64")
    assert isinstance(bb, ClipBackbone)
    assert (bb.image_size, bb.grid_size, bb.precision) == (64, (8, 8), "fp32")
    assert bb.pretrained is None and bb.describe()["quick_gelu"] is True
    big = build_backbone("clip", "anomalens-tiny-clip@64", image_size=96, precision="bf16")
    assert (big.image_size, big.grid_size, big.precision) == (96, (12, 12), "bf16")


def test_build_clip_weights_are_open_clip_pretrained(tmp_path: Path) -> None:
    # a checkpoint of different (seeded) weights, named through `weights`
    src = make_tiny_clip(seed=7)
    path = tmp_path / "tiny7.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    bb = build_backbone("clip", "anomalens-tiny-clip@64", weights=path)
    assert bb.pretrained == str(path)
    for (name, a), b in zip(bb.model.state_dict().items(), src.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_build_clip_random_weights_replace_the_presets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tiny_clip(seed=7)
    path = tmp_path / "tiny7.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    preset = get_clip_preset("anomalens-tiny-clip@64").with_overrides(
        name="tiny-with-weights", pretrained=str(path)
    )
    monkeypatch.setitem(CLIP_PRESETS, preset.name, preset)
    with_weights = build_backbone("clip", preset.name)
    random = build_backbone("clip", preset.name, weights="random")
    assert with_weights.pretrained == str(path) and random.pretrained is None
    w = src.model.visual.proj
    torch.testing.assert_close(with_weights.model.visual.proj, w, rtol=0, atol=0)
    assert not torch.equal(random.model.visual.proj, w)


def test_build_clip_takes_a_built_backbone_and_refuses_changes(tiny: ClipBackbone) -> None:
    assert build_backbone("clip", tiny) is tiny
    assert build_backbone("clip", tiny, image_size=64, precision="fp32") is tiny
    with pytest.raises(ValueError, match="image_size=96 differs"):
        build_backbone("clip", tiny, image_size=96)
    with pytest.raises(ValueError, match="precision='fp16' differs"):
        build_backbone("clip", tiny, precision="fp16")
    with pytest.raises(ValueError, match="cannot be loaded into a ready ClipBackbone"):
        build_backbone("clip", tiny, weights="other.safetensors")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tf_padding": True}, "tf_padding= applies to CNN"), ({"layers": ["x"]}, "layers=")],
)
def test_build_clip_refuses_cnn_only_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_backbone("clip", "anomalens-tiny-clip@64", **kwargs)


def test_build_backbone_refuses_the_other_kinds_object(
    tiny: ClipBackbone, cnn: CNNFeatureExtractor
) -> None:
    with pytest.raises(ValueError, match="kind='cnn' was given a ClipBackbone"):
        build_backbone("cnn", tiny)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="kind='clip' was given a CNN extractor"):
        build_backbone("clip", cnn)  # type: ignore[call-overload]


# ----------------------------------------------------------------------------- protocol


def test_every_patch_feature_source_satisfies_the_protocol(
    tiny: ClipBackbone, cnn: CNNFeatureExtractor
) -> None:
    for source in (cnn, CnnPatchExtractor(cnn), ClipPatchExtractor(tiny, layers=(2, 4))):
        assert isinstance(source, PatchFeatureExtractor), type(source).__name__
    # ClipBackbone offers preprocess/describe but no extract: MuSc wraps it (ClipPatchExtractor)
    assert not isinstance(tiny, PatchFeatureExtractor)


def test_cnn_extract_is_the_maps_as_tokens(cnn: CNNFeatureExtractor) -> None:
    x = cnn.preprocess([torch.rand(48, 40, 3).mul(255).byte().numpy()] * 2, 64)
    maps = cnn(x)
    out = cnn.extract(x)
    assert isinstance(out, PatchFeatures)
    assert out.grids == [(8, 8), (4, 4)]
    for m, t in zip(maps, out.tokens):
        b, c, h, w = m.shape
        assert t.shape == (b, h * w, c)
        torch.testing.assert_close(t[:, 3 * w + 2], m[:, :, 3, 2], rtol=0, atol=0)
    torch.testing.assert_close(out.embedding, maps[-1].mean(dim=(2, 3)))
    adapted = CnnPatchExtractor(cnn).extract(x)
    for a, b in zip(adapted.tokens, out.tokens):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert CnnPatchExtractor(cnn).describe() == {
        "backbone": "mobilenet_v2",
        "backbone_layers": ["features.6", "features.13"],
        "tf_padding": False,
    }


def test_clip_patch_extractor_reads_raw_streams(tiny: ClipBackbone) -> None:
    ext = ClipPatchExtractor(tiny, layers=(2, 4))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = ext.extract(x)
    ref = tiny.encode_image_tokens(x, (2, 4))
    assert out.grids == [(8, 8), (8, 8)]
    for t, r in zip(out.tokens, ref.tokens):
        torch.testing.assert_close(t, r[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(
        out.embedding, tiny.encode_image(x, layers=(4,), global_ln_post=True).global_embedding
    )
    assert ext.describe()["backbone_layers"] == [2, 4]
    with pytest.raises(ValueError, match="image_size=96 differs"):
        ext.preprocess([], 96)
    with pytest.raises(ValueError, match="no default MuSc layers"):
        ClipPatchExtractor(tiny)  # 4 blocks: no official default


# ----------------------------------------------------------------------------- positions


def test_resize_positional_embedding_modes() -> None:
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(1 + 3 * 4, 5, generator=gen)
    for mode in ("bilinear", "bicubic"):
        out = resize_positional_embedding(pos, (3, 4), (6, 7), mode=mode)
        grid = pos[1:].reshape(1, 3, 4, 5).permute(0, 3, 1, 2)
        ref = F.interpolate(grid, size=(6, 7), mode=mode, align_corners=False)
        torch.testing.assert_close(out[0], pos[0], rtol=0, atol=0)
        torch.testing.assert_close(out[1:], ref[0].permute(1, 2, 0).reshape(42, 5))
    bil = resize_positional_embedding(pos, (3, 4), (6, 7))
    bic = resize_positional_embedding(pos, (3, 4), (6, 7), mode="bicubic")
    assert not torch.allclose(bil, bic)
    half = resize_positional_embedding(pos.half(), (3, 4), (6, 7), mode="bicubic")
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="mode must be one of"):
        resize_positional_embedding(pos, (3, 4), (6, 7), mode="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"1 \+ 4\*4 rows"):
        resize_positional_embedding(pos, (4, 4), (6, 7))


def test_musc_backbone_resizes_bicubic_from_the_native_embedding() -> None:
    native = make_tiny_clip(seed=2)
    pos0 = native.model.visual.positional_embedding.detach().clone()
    bb = musc_clip_backbone(make_tiny_clip(seed=2), 96)
    assert bb.pos_embed_mode == "bicubic" and bb.grid_size == (12, 12)
    assert bb.describe()["pos_embed_mode"] == "bicubic"
    expected = resize_positional_embedding(pos0, (8, 8), (12, 12), mode="bicubic")
    torch.testing.assert_close(bb.model.visual.positional_embedding.detach(), expected)
    bb.set_image_size(64)  # back to native: the pretrained embedding, no compounding
    torch.testing.assert_close(bb.model.visual.positional_embedding.detach(), pos0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        musc_clip_backbone(native, 100)
    with pytest.raises(ValueError, match="pos_embed_mode must be one of"):
        ClipBackbone.from_open_clip(native.model, pos_embed_mode="area")


# ----------------------------------------------------------------------------- package


def test_clip_module_keeps_its_public_names() -> None:
    import anomalens.backbones.clip as clip

    before_split = {
        "OPENAI_JIT_ONLY_KEYS",
        "ClipBackbone",
        "ClipImageFeatures",
        "ClipImageTokens",
        "Precision",
        "build_clip_backbone",
        "check_taps",
        "load_state_dict_file",
        "openai_clip_config",
        "resize_positional_embedding",
        "vv_dual_block",
    }
    assert before_split <= set(clip.__all__)
    assert all(hasattr(clip, name) for name in clip.__all__)


def test_package_exports_and_unknown_attribute() -> None:
    assert backbones_pkg.build_backbone is build_backbone
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = backbones_pkg.nope


def _backbone_imports(path: Path) -> set[str]:
    """anomalens.backbones modules imported anywhere in ``path`` (also inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["anomalens", "backbones"] and len(parts) >= 3:
                if (BACKBONES_DIR / f"{parts[2]}.py").is_file():
                    out.add(parts[2])
    return out


def test_no_import_loops_in_backbones() -> None:
    graph = {
        p.stem: _backbone_imports(p) - {p.stem}
        for p in BACKBONES_DIR.glob("*.py")
        if p.stem != "__init__"
    }
    assert {"catalogue", "weights", "clip", "tiny"} <= set(graph)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep] if dep in path else [node, dep]
                pytest.fail(f"import loop in anomalens.backbones: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
