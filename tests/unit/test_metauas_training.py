"""``anomalens train metauas`` and ``train_metauas``: outputs, loss log, resume, errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from anomalens.cli.main import main
from anomalens.data.mvtec import make_mvtec_index
from anomalens.detectors.metauas import MetaUAS
from anomalens.training.metauas import jitter_prompt, random_region, train_metauas


def _normals(root: Path) -> list[Path]:
    cats = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [s.image_path for c in cats for s in make_mvtec_index(root, c, "train")]


def test_cli_train_writes_checkpoint_log_and_resumes(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    base = ["train", "metauas", "--dataset", "mvtec", "--root", str(synthetic_root)]
    base += ["--image-size", "64", "--batch-size", "4", "--out", str(out), "-q"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main([*base, "--epochs", "1"]) == 0
    run = tmp_path / "m.safetensors.run"
    rows = [json.loads(x) for x in (run / "loss_log.jsonl").read_text().splitlines()]
    n_images = len(_normals(synthetic_root))
    assert len(rows) == n_images // 4 and all(r["epoch"] == 1 for r in rows)
    assert json.loads((run / "train_state.json").read_text())["epoch"] == 1
    det = MetaUAS(out)
    assert det.image_size == 64 and det.config()["weights"] == "anomalens"
    # a second run with more epochs resumes after epoch 1 (log kept, one more epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main([*base, "--epochs", "2"]) == 0
    rows2 = [json.loads(x) for x in (run / "loss_log.jsonl").read_text().splitlines()]
    assert rows2[: len(rows)] == rows and {r["epoch"] for r in rows2} == {1, 2}
    assert (run / "epoch_002.safetensors").is_file()


def test_resumed_run_equals_an_uninterrupted_one(synthetic_root: Path, tmp_path: Path) -> None:
    images = _normals(synthetic_root)[:6]
    kw = {"image_size": 64, "batch_size": 3, "lr": 1e-3, "seed": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        whole = train_metauas(images, tmp_path / "a", epochs=2, **kw)
        train_metauas(images, tmp_path / "b", epochs=1, **kw)
        resumed = train_metauas(images, tmp_path / "b", epochs=2, **kw)
    assert resumed.resumed_from == 1 and resumed.epochs == 2
    assert resumed.epoch_losses == pytest.approx(whole.epoch_losses, rel=1e-4)
    a = MetaUAS(whole.checkpoint).net.state_dict()
    b = MetaUAS(resumed.checkpoint).net.state_dict()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4


def test_encoder_weights_are_not_trained(synthetic_root: Path, tmp_path: Path) -> None:
    images = _normals(synthetic_root)[:4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        before = dict(MetaUAS(image_size=64, seed=0).net.named_parameters())
        res = train_metauas(images, tmp_path / "r", image_size=64, epochs=1, batch_size=2)
    after = MetaUAS(res.checkpoint).net
    for name, p in after.named_parameters():
        if name.startswith("encoder."):
            assert torch.equal(p, before[name]), name
    assert not torch.equal(before["head.weight"], after.head.weight)
    # the random encoder's BatchNorm statistics were set from the images (not 0 / 1)
    assert not torch.equal(
        after.encoder.bn1.running_var, torch.ones_like(after.encoder.bn1.running_var)
    )


def test_bad_training_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2 normal images"):
        train_metauas([tmp_path / "a.png"], tmp_path / "o", image_size=64)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        train_metauas([tmp_path / "a.png"] * 2, tmp_path / "o", batch_size=1)
    with pytest.raises(ValueError, match="2 images but 1 group"):
        train_metauas([tmp_path / "a.png"] * 2, tmp_path / "o", groups=["x"])


def test_regions_and_prompt_jitter() -> None:
    gen = torch.Generator().manual_seed(0)
    areas = [float(random_region(gen, 64).float().mean()) for _ in range(20)]
    assert min(areas) > 0 and max(areas) < 0.3
    a = torch.rand(3, 32, 32)
    p = jitter_prompt(a, gen)
    assert p.shape == a.shape and 0 <= float(p.min()) and float(p.max()) <= 1
    assert not torch.equal(p, a)
