"""CNN backbones: presets, weight resolution, TF SAME padding, feature shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from _fewshot_helpers import MAGNETIC_TILE, MOBILENET_TF, require_shared

from anomalens.backbones.cnn import (
    TFSameConv2d,
    apply_tf_padding,
    create_cnn_backbone,
    read_state_dict,
)
from anomalens.backbones.presets import get_cnn_preset, list_cnn_presets
from anomalens.backbones.weights import WeightNotAvailableError
from anomalens.data.io import load_image

# preset -> expected (channels, stride) of the default layers
EXPECTED = {
    "resnet18": [(128, 8), (256, 16)],
    "resnet50": [(512, 8), (1024, 16)],
    "wide_resnet50_2": [(512, 8), (1024, 16)],
    "mobilenet_v2": [(32, 8), (96, 16)],
    "mobilenet_v2_tf": [(32, 8), (96, 16)],
    "efficientnet_b0": [(40, 8), (112, 16)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_feature_shapes_random_weights(name: str) -> None:
    net = create_cnn_backbone(name, weights="random")
    feats = net(torch.zeros(2, 3, 64, 64))
    assert [(f.shape[0], f.shape[1]) for f in feats] == [(2, c) for c, _ in EXPECTED[name]]
    assert [64 // f.shape[-1] for f in feats] == [s for _, s in EXPECTED[name]]
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training, "the extractor must stay in eval mode"


def test_unknown_preset_and_layer_list_names() -> None:
    with pytest.raises(KeyError, match=r"Available: .*mobilenet_v2_tf"):
        get_cnn_preset("vgg_unknown")
    with pytest.raises(ValueError, match="unknown layer"):
        create_cnn_backbone("resnet18", weights="random", layers=["layer9"])
    assert "wide_resnet50_2" in list_cnn_presets()


def test_random_init_is_seeded_and_custom_layers() -> None:
    a = create_cnn_backbone("resnet18", weights="random", layers=["layer1", "layer4"], seed=1)
    b = create_cnn_backbone("resnet18", weights="random", layers=["layer1", "layer4"], seed=1)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fa, fb = a(x), b(x)
    assert [f.shape[1] for f in fa] == [64, 512]
    torch.testing.assert_close(fa[1], fb[1])


def test_local_pth_file_and_wrong_architecture(tmp_path: object) -> None:
    torch.manual_seed(3)
    model = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"  # type: ignore[operator]
    torch.save({"state_dict": model.state_dict()}, path)
    net = create_cnn_backbone("resnet18", weights=str(path))
    x = torch.rand(1, 3, 64, 64)
    ref = torchvision.models.feature_extraction.create_feature_extractor(
        model.eval(), {"layer3": "out"}
    )(x)["out"]
    torch.testing.assert_close(net(x)[1], ref)
    with pytest.raises(ValueError, match="do not fit the mobilenet_v2 architecture"):
        create_cnn_backbone("mobilenet_v2", weights=str(path))


def test_offline_without_weights_names_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path))
    with pytest.raises(WeightNotAvailableError, match=r"resnet18-f37072fd\.pth"):
        create_cnn_backbone("resnet18")
    with pytest.raises(WeightNotAvailableError, match=r"mobilenet_v2-b0353104\.pth"):
        create_cnn_backbone("mobilenet_v2", weights="IMAGENET1K_V1")
    with pytest.raises(WeightNotAvailableError, match="mobilenet_v2_imagenet_int8dequant"):
        create_cnn_backbone("mobilenet_v2_tf")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        create_cnn_backbone("mobilenet_v2", weights="IMAGENET1K_V9")
    with pytest.raises(WeightNotAvailableError, match=r"no_such\.pth"):
        create_cnn_backbone("resnet18", weights=str(tmp_path / "no_such.pth"))  # type: ignore[operator]


# ----------------------------------------------------------------------------- TF padding


def test_tf_same_conv_equals_shifted_torch_conv() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    tf = TFSameConv2d.from_conv(conv)
    assert tf.weight is conv.weight
    x = torch.randn(2, 3, 16, 16)
    # even size: TF pads (0 top/left, 1 bottom/right); away from the top/left border this is
    # torch's conv on the image shifted by one pixel
    torch.testing.assert_close(tf(x)[..., 1:, 1:], conv(x[..., 1:, 1:])[..., 1:, 1:])
    assert tf(x).shape == conv(x).shape
    torch.testing.assert_close(tf(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, 2))
    # odd size: TF pads 1 on both sides, exactly like torch
    y = torch.randn(1, 3, 15, 15)
    torch.testing.assert_close(tf(y), conv(y))


def test_tf_padding_on_mobilenet_v2() -> None:
    model = torchvision.models.mobilenet_v2().eval()
    keys = list(model.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model.features(x)
        names = apply_tf_padding(model)
        out = model.features(x)
    assert names == [
        "features.0.0",
        "features.2.conv.1.0",
        "features.4.conv.1.0",
        "features.7.conv.1.0",
        "features.14.conv.1.0",
    ]
    assert list(model.state_dict()) == keys, "TF padding must keep the state-dict keys"
    assert out.shape == ref.shape == (1, 1280, 7, 7)
    assert not torch.allclose(out, ref)
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 200, 200)).shape == (1, 1280, 7, 7)


def test_preset_tf_padding_switch() -> None:
    on = create_cnn_backbone("mobilenet_v2_tf", weights="random")
    off = create_cnn_backbone("mobilenet_v2_tf", weights="random", tf_padding=False)
    assert on.preset.tf_padding and not off.preset.tf_padding
    assert on.preset.mean == (0.5, 0.5, 0.5) == on.preset.std
    assert any(isinstance(m, TFSameConv2d) for m in on.modules())
    assert not any(isinstance(m, TFSameConv2d) for m in off.modules())


@pytest.mark.shared
def test_shared_mobilenet_v2_safetensors_on_a_real_image() -> None:
    require_shared(MOBILENET_TF, MAGNETIC_TILE)
    sd = read_state_dict(MOBILENET_TF)
    assert len(sd) == 314
    net = create_cnn_backbone("mobilenet_v2_tf", weights=MOBILENET_TF)  # a Path works too
    img = load_image(sorted((MAGNETIC_TILE / "train" / "good").iterdir())[0])
    x = net.preprocess([img], 224)
    assert -1.0 - 1e-6 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-6  # x / 127.5 - 1
    feats = net(x)
    assert [tuple(f.shape) for f in feats] == [(1, 32, 28, 28), (1, 96, 14, 14)]
    for f in feats:
        assert torch.isfinite(f).all()
        assert float(f.std()) > 1e-3
    # the pretrained weights separate textures: a tile is closer to another tile than to noise
    other = load_image(sorted((MAGNETIC_TILE / "train" / "good").iterdir())[1])
    noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    g = [net(net.preprocess([im], 224))[1].mean((2, 3)) for im in (img, other, noise)]
    assert torch.dist(g[0], g[1]) < torch.dist(g[0], g[2])
