"""MetaUAS detector: interface, prompt policies, scores, checkpoints and errors (random weights,
small images, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalens.detectors._metauas_checkpoint import checkpoint_filter_fn
from anomalens.detectors._metauas_modules import (
    FeatureAlignment,
    MetaUASConfig,
    MetaUASNet,
    fuse,
)
from anomalens.detectors.base import NotFittedError
from anomalens.detectors.metauas import (
    MetaUAS,
    joint_minmax_scores,
    load_images,
    retrieval_descriptors,
)
from anomalens.registry import create_detector, list_detectors

S = 64


def _images(n: int, seed: int, size: tuple[int, int] = (48, 56)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def det() -> MetaUAS:
    with pytest.warns(UserWarning, match="random weights"):
        return MetaUAS(image_size=S, batch_size=3, seed=0)


def test_registered_and_created_by_name() -> None:
    assert "metauas" in list_detectors()
    with pytest.warns(UserWarning):
        d = create_detector("metauas", image_size=S)
    assert isinstance(d, MetaUAS) and d.image_size == S


def test_predict_before_fit_names_the_call(det: MetaUAS) -> None:
    fresh = MetaUAS.__new__(MetaUAS)
    fresh.__dict__.update(det.__dict__)
    fresh._fitted = False
    with pytest.raises(NotFittedError, match="fit"):
        fresh.predict(_images(1, 0))
    with pytest.raises(ValueError, match="at least one normal image"):
        fresh.fit([])


def test_fit_predict_shapes_and_ranges(det: MetaUAS) -> None:
    det.fit(_images(3, 1))
    pred = det.predict(_images(5, 2))
    assert pred.image_score.shape == (5,) and pred.anomaly_map.shape == (5, S, S)
    assert pred.anomaly_map.dtype == torch.float32
    assert float(pred.anomaly_map.min()) >= 0.0 and float(pred.anomaly_map.max()) <= 1.0
    assert torch.equal(pred.image_score, pred.anomaly_map.flatten(1).amax(1))
    assert pred.extras["prompt_index"].shape == (5,)


def test_seed_policy_uses_one_drawn_prompt_for_every_query(det: MetaUAS) -> None:
    normals = _images(4, 3)
    det.fit(normals)
    idx = det.prompt_index
    assert idx is not None and 0 <= idx < 4
    queries = _images(3, 4)
    pred = det.predict(queries)
    assert pred.extras["prompt_index"].tolist() == [idx] * 3
    # the same as scoring each query against that prompt explicitly
    pairs = det.predict_pairs(queries, [normals[idx]] * 3)
    assert torch.allclose(pred.anomaly_map, pairs.anomaly_map, atol=1e-6)
    # the draw depends on the seed only: refitting gives the same prompt
    assert det.fit(normals).prompt_index == idx
    draws = set()
    for seed in range(8):
        other = MetaUAS.__new__(MetaUAS)
        other.__dict__.update(det.__dict__)
        other.seed = seed
        other.fit(normals)
        draws.add(other.prompt_index)
    assert len(draws) > 1, "the seed does not change the drawn prompt"


def test_best_policy_picks_the_most_similar_prompt() -> None:
    with pytest.warns(UserWarning):
        d = MetaUAS(image_size=S, prompt="best", batch_size=4)
    normals = _images(3, 5)
    d.fit(normals)
    # a query equal to normal 2 (plus faint noise) must retrieve normal 2; likewise 0
    noise = np.random.default_rng(6).integers(-3, 4, normals[0].shape)
    queries = [np.clip(normals[i].astype(int) + noise, 0, 255).astype(np.uint8) for i in (2, 0)]
    pred = d.predict(queries)
    assert pred.extras["prompt_index"].tolist() == [2, 0]
    assert (pred.extras["prompt_similarity"] > 0.9).all()
    refs = [normals[2], normals[0]]
    assert torch.allclose(pred.anomaly_map, d.predict_pairs(queries, refs).anomaly_map, atol=1e-6)


def test_scores_do_not_depend_on_other_images(det: MetaUAS) -> None:
    det.fit(_images(2, 7))
    queries = _images(4, 8)
    alone = torch.cat([det.predict([q]).image_score for q in queries])
    together = det.predict(queries).image_score
    assert torch.allclose(alone, together, atol=1e-6)


def test_deterministic_for_a_seed() -> None:
    normals, queries = _images(2, 9), _images(2, 10)
    outs = []
    for _ in range(2):
        with pytest.warns(UserWarning):
            d = MetaUAS(image_size=S, seed=3)
        outs.append(d.fit(normals).predict(queries).anomaly_map)
    assert torch.equal(outs[0], outs[1])
    with pytest.warns(UserWarning):
        other = MetaUAS(image_size=S, seed=4).fit(normals).predict(queries).anomaly_map
    assert not torch.equal(outs[0], other)


def test_class_minmax_option_is_the_official_joint_normalisation() -> None:
    with pytest.warns(UserWarning):
        d = MetaUAS(image_size=S, image_score="class_minmax")
    assert d.scores_whole_batch
    d.fit(_images(1, 11))
    pred = d.predict(_images(4, 12))
    m = pred.anomaly_map
    expected = ((m - m.min()) / (m.max() - m.min())).flatten(1).amax(1)
    assert torch.allclose(pred.image_score, expected, atol=1e-7)
    assert float(pred.image_score.max()) == pytest.approx(1.0)


def test_joint_minmax_scores_pure_function() -> None:
    maps = torch.tensor([[[0.2, 0.4]], [[0.6, 1.0]]])
    assert torch.allclose(joint_minmax_scores(maps), torch.tensor([0.25, 1.0]))
    assert torch.equal(joint_minmax_scores(torch.full((2, 3, 3), 0.5)), torch.zeros(2))
    with pytest.raises(ValueError, match="B, H, W"):
        joint_minmax_scores(torch.zeros(3, 3))


def test_predict_pairs_errors_and_other_sizes(det: MetaUAS) -> None:
    with pytest.raises(ValueError, match="2 images but 1 references"):
        det.predict_pairs(_images(2, 13), _images(1, 14))
    with pytest.raises(ValueError, match="no image"):
        det.predict_pairs([], [])
    # a reference of another size is squashed to S like the query
    pred = det.predict_pairs(_images(1, 15, (40, 90)), _images(1, 16, (70, 30)))
    assert pred.anomaly_map.shape == (1, S, S)


def test_missing_image_file_is_named(det: MetaUAS, tmp_path: Path) -> None:
    det.fit(_images(1, 17))
    with pytest.raises(ValueError, match=r"nope\.png"):
        det.predict([tmp_path / "nope.png"])


def test_bad_options_are_refused() -> None:
    for kwargs, match in (
        ({"prompt": "all"}, "prompt must be"),
        ({"image_score": "mean"}, "image_score must be"),
        ({"precision": "int8"}, "precision must be"),
        ({"precision": "fp16"}, "needs a GPU"),
        ({"image_size": 100}, "multiple of 32"),
        ({"alignment": "xx"}, "alignment must be"),
        ({"batch_size": 0}, "batch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            MetaUAS(**kwargs)  # type: ignore[arg-type]


def test_load_images_is_bilinear_align_corners() -> None:
    img = _images(1, 18, (5, 7))[0]
    x = load_images([img], 4)
    t = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    ref = torch.nn.functional.interpolate(t, (4, 4), mode="bilinear", align_corners=True)
    assert torch.equal(x, ref)
    # corners are kept exactly with align_corners=True
    assert torch.equal(x[0, :, 0, 0], t[0, :, 0, 0]) and torch.equal(
        x[0, :, -1, -1], t[0, :, -1, -1]
    )
    same = _images(1, 19, (4, 4))[0]
    assert torch.equal(load_images([same], 4)[0], torch.from_numpy(same).permute(2, 0, 1) / 255.0)


def test_alignment_is_unscaled_softmax_over_prompt_positions() -> None:
    torch.manual_seed(0)
    fam = FeatureAlignment(8)
    q, p = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 2, 2)
    rec: dict[str, torch.Tensor] = {}
    aligned = fam(q, p, rec)
    qq, kk = fam.proj(q).flatten(2), fam.proj(p).flatten(2)
    a = torch.einsum("bci,bcj->bij", qq, kk).softmax(-1)  # no 1/sqrt(d)
    assert torch.allclose(rec["attn"], a, atol=1e-6)
    assert torch.allclose(
        aligned.flatten(2), torch.einsum("bij,bcj->bci", a, p.flatten(2)), atol=1e-5
    )
    hard = FeatureAlignment(8, "ha")
    hard.load_state_dict(fam.state_dict())
    out = hard(q, p)
    best = a.argmax(-1)  # (2, 9): every query position takes one prompt vector
    expect = torch.stack([p.flatten(2)[b][:, best[b]] for b in range(2)])
    assert torch.allclose(out.flatten(2), expect)
    assert torch.equal(FeatureAlignment(8, "na")(q, q), q)
    assert fuse(q, q, "cat").shape[1] == 16 and torch.equal(
        fuse(q, q, "absdiff"), torch.zeros_like(q)
    )


@pytest.mark.parametrize("fusion", ["cat", "add", "absdiff"])
@pytest.mark.parametrize("alignment", ["sa", "ha", "na"])
def test_network_variants_run(alignment: str, fusion: str) -> None:
    net = MetaUASNet(MetaUASConfig(64, alignment, fusion)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 1, 64, 64) and torch.isfinite(out).all()


def test_encoder_stays_frozen_in_train_mode() -> None:
    net = MetaUASNet(MetaUASConfig(64)).train()
    assert not net.encoder.training and net.decoder.training
    assert not any(p.requires_grad for p in net.encoder.parameters())


def test_own_checkpoint_round_trip_and_settings(det: MetaUAS, tmp_path: Path) -> None:
    path = det.save_checkpoint(tmp_path / "w" / "m.safetensors")
    assert not list(path.parent.glob(".*tmp"))
    loaded = MetaUAS(path)
    assert loaded.image_size == S and loaded.config()["weights"] == "anomalens"
    sd, sd2 = det.net.state_dict(), loaded.net.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with pytest.raises(ValueError, match="fusion='cat', not 'add'"):
        MetaUAS(path, fusion="add")


def test_bad_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        MetaUAS(tmp_path / "missing.ckpt")
    bad = tmp_path / "other.ckpt"
    torch.save({"model.fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(KeyError, match=r"other\.ckpt.*not an official MetaUAS"):
        MetaUAS(bad)
    with pytest.raises(KeyError, match="non-tensor"):
        checkpoint_filter_fn({"epoch": 3})


def test_retrieval_descriptors_are_unit_vectors() -> None:
    d = retrieval_descriptors(torch.randn(3, 448, 2, 2))
    assert d.shape == (3, 448 * 4)
    assert torch.allclose(d.norm(dim=1), torch.ones(3))
