"""MetaUAS parity with the official code, on the recorded fixtures.

The fixture folder (``shared/fixtures/metauas_parity``, override with
``ANOMALENS_METAUAS_PARITY_DIR``) holds random weights of the full network in the official
checkpoint format, input PNGs, the official list files, and every intermediate the official
code computed (preprocessing, encoder features, alignment, decoder blocks, logits, maps, scores),
with a per-tensor tolerance (``tolerance.json``). Names, sizes, pairs and prompt assignments are
read from the folder, never assumed.

Not compared: ``sS/MODE/metrics`` and ``sS/gt_mask_*`` (the official evaluator and its mask
resizing, which belong to a benchmark option, not to the detector).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalens.detectors._metauas_checkpoint import (
    checkpoint_filter_fn,
    load_metauas_checkpoint,
)
from anomalens.detectors._metauas_modules import MetaUASConfig, MetaUASNet

pytestmark = pytest.mark.shared

_DEFAULT_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "metauas_parity"
FIXTURE_DIR = Path(os.environ.get("ANOMALENS_METAUAS_PARITY_DIR", _DEFAULT_DIR))
MODES = {"oneprompt": "oneprompt_seed", "topk": "top"}


# ---------------------------------------------------------------- summaries (README definitions)
def grid(n: int, step: int) -> list[int]:
    idx = list(range(0, n, step))
    return idx + ([n - 1] if idx[-1] != n - 1 else [])


def stats(x: torch.Tensor) -> torch.Tensor:
    x = x.double().flatten()
    return torch.stack([x.mean(), x.std(unbiased=False), x.min(), x.max()]).float()


def chstats(x: torch.Tensor) -> torch.Tensor:
    x = x.double().flatten(1)
    return torch.stack(
        [x.mean(1), x.std(1, unbiased=False), x.min(1).values, x.max(1).values], 1
    ).float()


def proj4(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    p = torch.einsum("chw,cr->rhw", x.double(), r[: x.shape[0]].double())
    if x.shape[1] > 32:
        g = grid(x.shape[1], x.shape[1] // 32)
        p = p[:, g][:, :, g]
    return p.float()


# ------------------------------------------------------------------------------------- fixture
def _read_lists(inputs: Path) -> dict[str, dict[str, str]]:
    """Per mode: query file -> prompt file, from the official list files found in ``inputs``."""
    tests = [json.loads(line) for line in (inputs / "test.json").read_text().splitlines() if line]
    out: dict[str, dict[str, str]] = {}
    for mode, marker in MODES.items():
        files = sorted(p for p in inputs.glob("*.json") if marker in p.name)
        assert len(files) == 1, f"expected one {marker}*.json list in {inputs}, found {files}"
        text = files[0].read_text()
        if mode == "oneprompt":  # {class: {"filename": ...}}
            per_class = json.loads(text)
            out[mode] = {t["filename"]: per_class[t["clsname"]]["filename"] for t in tests}
        else:  # JSON lines {query: [ranked prompts]}; the first is used
            ranked: dict[str, list[str]] = {}
            for line in text.splitlines():
                if line.strip():
                    ranked.update(json.loads(line))
            out[mode] = {t["filename"]: ranked[t["filename"]][0] for t in tests}
    return out


@pytest.fixture(scope="module")
def fx() -> dict[str, object]:
    if not (FIXTURE_DIR / "expected.safetensors").is_file():
        pytest.skip(
            f"MetaUAS parity fixtures not found in {FIXTURE_DIR} "
            "(set ANOMALENS_METAUAS_PARITY_DIR to the metauas_parity folder)"
        )
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.set_num_threads(int(os.environ.get("ANOMALENS_TEST_THREADS", "1")))
    path = FIXTURE_DIR / "expected.safetensors"
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["info"])
    inputs = FIXTURE_DIR / "inputs"
    tests = [json.loads(line) for line in (inputs / "test.json").read_text().splitlines() if line]
    return {
        "E": load_file(str(path)),
        "tol": json.loads((FIXTURE_DIR / "tolerance.json").read_text())["tensors"],
        "info": info,
        "tests": tests,
        "lists": _read_lists(inputs),
        "checked": set(),
    }


def check(fx: dict[str, object], name: str, actual: torch.Tensor) -> float:
    """Assert ``|actual - expected[name]| <= atol[name]`` (integers exactly); return the diff."""
    expected = fx["E"][name]  # type: ignore[index]
    atol = fx["tol"][name]["atol"]  # type: ignore[index]
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    fx["checked"].add(name)  # type: ignore[attr-defined]
    if name.endswith("attn_argmax"):
        keep = expected >= 0
        assert torch.equal(actual.int()[keep], expected.int()[keep]), f"{name}: argmax differs"
        return 0.0
    diff = (actual.double() - expected.double()).abs().max().item()
    if os.environ.get("ANOMALENS_PARITY_REPORT"):
        print(
            f"PARITY {name} max_abs_diff={diff:.3g} atol={atol:.3g} ratio={diff / max(atol, 1e-30):.3f}"
        )
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > atol {atol:.3g}"
    return diff


def _sizes(fx: dict[str, object]) -> list[int]:
    return [int(s) for s in fx["info"]["sizes"]]  # type: ignore[index]


@pytest.fixture(scope="module", params=["s256", "s512"])
def run(request: pytest.FixtureRequest, fx: dict[str, object]) -> dict[str, object]:
    """Our network on every recorded image and pair at one size, with all intermediates."""
    from anomalens.detectors.metauas import load_images

    size = int(request.param[1:])
    if size not in _sizes(fx):
        pytest.skip(f"the fixture has no size {size}")
    sd, _ = load_metauas_checkpoint(FIXTURE_DIR / "metauas_official.ckpt")
    net = MetaUASNet(MetaUASConfig(size))
    net.load_state_dict(sd, strict=True)
    net.eval()
    inputs = FIXTURE_DIR / "inputs"
    images = sorted({p for lst in fx["lists"].values() for kv in lst.items() for p in kv})  # type: ignore[attr-defined]
    x = {name: load_images([inputs / name], size) for name in images}
    with torch.no_grad():
        feats = {name: net.encode(t) for name, t in x.items()}
        pairs: dict[str, dict[str, object]] = {}
        for lst in fx["lists"].values():  # type: ignore[attr-defined]
            for query, prompt in lst.items():
                key = f"{Path(query).stem}+{Path(prompt).stem}"
                if key in pairs:
                    continue
                rec: dict[str, object] = {}
                logits = net.decode(feats[query], feats[prompt], rec)[0, 0]
                pairs[key] = {"rec": rec, "logits": logits, "map": torch.sigmoid(logits)}
    return {"S": size, "net": net, "x": x, "feats": feats, "pairs": pairs}


# ---------------------------------------------------------------------------------------- tests
def test_official_checkpoint_loads_strictly() -> None:
    if not (FIXTURE_DIR / "metauas_official.ckpt").is_file():
        pytest.skip(f"no metauas_official.ckpt in {FIXTURE_DIR}")
    raw = torch.load(FIXTURE_DIR / "metauas_official.ckpt", map_location="cpu", weights_only=True)
    sd = checkpoint_filter_fn(raw)
    # every official tensor is used except the encoder head that is never run
    dropped = [k for k in raw if k.startswith(("encoder._conv_head.", "encoder._bn1."))]
    assert len(sd) == len(raw) - len(dropped) and dropped
    net = MetaUASNet()
    result = net.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours = net.state_dict()
    for key in ("encoder.blocks.2.0.conv_dw.weight", "head.weight", "alignment.0.proj.bias"):
        assert ours[key].shape == sd[key].shape
    assert torch.equal(
        ours["encoder.blocks.6.1.bn3.running_var"], raw["encoder._blocks.31._bn2.running_var"]
    )


def test_preprocess_and_model_input(fx: dict[str, object], run: dict[str, object]) -> None:
    s = run["S"]
    g = grid(s, s // 32)  # type: ignore[operator]
    for name, x in run["x"].items():  # type: ignore[attr-defined]
        stem = Path(name).stem
        check(fx, f"s{s}/preprocess/{stem}_sampled", x[0][:, g][:, :, g])
        check(fx, f"s{s}/preprocess/{stem}_stats", torch.stack([stats(c) for c in x[0]]))
        xn = run["net"].normalize(x)[0]  # type: ignore[attr-defined]
        check(fx, f"s{s}/model_input/{stem}_stats", torch.stack([stats(c) for c in xn]))


def test_encoder_features(fx: dict[str, object], run: dict[str, object]) -> None:
    s, r = run["S"], fx["E"]["check/random_projection_448x4"]  # type: ignore[index]
    for name, feats in run["feats"].items():  # type: ignore[attr-defined]
        for k, f in enumerate(feats, start=1):
            check(fx, f"s{s}/encoder/{Path(name).stem}/f{k}_chstats", chstats(f[0]))
            check(fx, f"s{s}/encoder/{Path(name).stem}/f{k}_proj4", proj4(f[0], r))


def test_alignment(fx: dict[str, object], run: dict[str, object]) -> None:
    s, r = run["S"], fx["E"]["check/random_projection_448x4"]  # type: ignore[index]
    for key, out in run["pairs"].items():  # type: ignore[attr-defined]
        for level, rec in enumerate(out["rec"]["align"]):
            pre = f"s{s}/pair/{key}/align{level}"
            _, _, h, w = rec["q"].shape
            a = rec["attn"][0].reshape(h, w, -1).double()
            check(fx, f"{pre}/q_chstats", chstats(rec["q"][0]))
            check(fx, f"{pre}/k_chstats", chstats(rec["k"][0]))
            check(fx, f"{pre}/attn_rowmax", a.max(-1).values.float())
            check(fx, f"{pre}/attn_argmax", a.argmax(-1))
            entropy = -(a * torch.log(a.clamp_min(1e-300))).sum(-1)
            check(fx, f"{pre}/attn_entropy", entropy.float())
            check(fx, f"{pre}/attn_rows", rec["attn"][0][[0, (h // 2) * w + w // 2, h * w - 1]])
            check(fx, f"{pre}/aligned_chstats", chstats(rec["aligned"][0]))
            check(fx, f"{pre}/aligned_proj4", proj4(rec["aligned"][0], r))


def test_decoder_logits_and_map(fx: dict[str, object], run: dict[str, object]) -> None:
    s, r = run["S"], fx["E"]["check/random_projection_448x4"]  # type: ignore[index]
    gm = fx["E"][f"check/grid_map_{s}"].long()  # type: ignore[index]
    for key, out in run["pairs"].items():  # type: ignore[attr-defined]
        pre = f"s{s}/pair/{key}"
        for j, block in enumerate(out["rec"]["decoder"]):
            check(fx, f"{pre}/decoder/block{j}_chstats", chstats(block[0]))
            check(fx, f"{pre}/decoder/block{j}_proj4", proj4(block[0], r))
        check(fx, f"{pre}/logits_sampled", out["logits"][gm][:, gm])
        check(fx, f"{pre}/logits_stats", stats(out["logits"]))
        check(fx, f"{pre}/map_sampled", out["map"][gm][:, gm])
        check(fx, f"{pre}/map_stats", stats(out["map"]))


@pytest.mark.parametrize("mode", list(MODES))
def test_detector_modes_and_scores(
    fx: dict[str, object], run: dict[str, object], mode: str
) -> None:
    """The public detector: one prompt per class (``fit`` + ``predict``) and explicit pairs
    (``predict_pairs``); raw max and the official class-wise score."""
    from anomalens.detectors.metauas import MetaUAS, joint_minmax_scores

    s = run["S"]
    det = MetaUAS(FIXTURE_DIR / "metauas_official.ckpt", image_size=s, batch_size=5)  # type: ignore[arg-type]
    assert det.image_size == s and det.config()["weights"] == "official"
    inputs = FIXTURE_DIR / "inputs"
    tests, pairing = fx["tests"], fx["lists"][mode]  # type: ignore[index]
    # prompt_index counts into every prompt file of the lists, in sorted order
    prompt_names = sorted({p for lst in fx["lists"].values() for p in lst.values()})  # type: ignore[attr-defined]
    gm = fx["E"][f"check/grid_map_{s}"].long()  # type: ignore[index]
    n = len(tests)  # type: ignore[arg-type]
    raw = torch.empty(n)
    score = torch.empty(n)
    index = torch.empty(n, dtype=torch.int32)
    maps: dict[int, torch.Tensor] = {}
    by_class: dict[str, list[int]] = {}
    for i, t in enumerate(tests):  # type: ignore[arg-type]
        by_class.setdefault(t["clsname"], []).append(i)
        index[i] = prompt_names.index(pairing[t["filename"]])
    check(fx, f"s{s}/{mode}/prompt_index", index)
    for rows in by_class.values():
        queries = [inputs / tests[i]["filename"] for i in rows]  # type: ignore[index]
        prompts = [inputs / pairing[tests[i]["filename"]] for i in rows]  # type: ignore[index]
        if mode == "oneprompt":  # one normal prompt per class: the few-shot path, k = 1
            assert len({p.name for p in prompts}) == 1
            pred = det.fit(prompts[:1]).predict(queries)
            assert pred.extras["prompt_index"].tolist() == [0] * len(rows)
        else:
            pred = det.predict_pairs(queries, prompts)
        for i, m in zip(rows, pred.anomaly_map):
            maps[i] = m
        raw[rows] = pred.image_score
        score[rows] = joint_minmax_scores(pred.anomaly_map)
    for i, t in enumerate(tests):  # type: ignore[arg-type]
        key = f"{Path(t['filename']).stem}+{Path(pairing[t['filename']]).stem}"
        check(fx, f"s{s}/pair/{key}/map_sampled", maps[i][gm][:, gm])
    check(fx, f"s{s}/{mode}/raw_max", raw)
    check(fx, f"s{s}/{mode}/image_score", score)


def test_every_model_tensor_was_compared(fx: dict[str, object], run: dict[str, object]) -> None:
    """Guard: every recorded tensor of this size except the evaluator's is compared (the tests
    above are run here again when a selection such as ``-k`` skipped them)."""
    s = run["S"]
    expected = {
        k
        for k in fx["E"]  # type: ignore[attr-defined]
        if k.startswith(f"s{s}/") and "/metrics" not in k and "/gt_mask" not in k
    }
    if expected - fx["checked"]:  # type: ignore[operator]
        test_preprocess_and_model_input(fx, run)
        test_encoder_features(fx, run)
        test_alignment(fx, run)
        test_decoder_logits_and_map(fx, run)
        for mode in MODES:
            test_detector_modes_and_scores(fx, run, mode)
    missing = sorted(expected - fx["checked"])  # type: ignore[operator]
    assert not missing, f"{len(missing)} recorded tensors were not compared, e.g. {missing[:5]}"


def test_own_safetensors_round_trip(tmp_path: Path) -> None:
    if not (FIXTURE_DIR / "metauas_official.ckpt").is_file():
        pytest.skip(f"no metauas_official.ckpt in {FIXTURE_DIR}")
    from anomalens.detectors.metauas import MetaUAS

    det = MetaUAS(FIXTURE_DIR / "metauas_official.ckpt", image_size=256)
    out = det.save_checkpoint(tmp_path / "m.safetensors")
    again = MetaUAS(out)
    assert again.image_size == 256 and again.config()["weights"] == "anomalens"
    a, b = det.net.state_dict(), again.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    img = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    ref = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    p1 = det.predict_pairs([img], [ref])
    p2 = again.predict_pairs([img], [ref])
    assert torch.equal(p1.anomaly_map, p2.anomaly_map)
