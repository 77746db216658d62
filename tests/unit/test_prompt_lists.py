"""Prompt lists (the official MetaUAS ``oneprompt_seedN.json`` / ``test-train-top10pair``
files): reading, checking against the dataset, and ``benchmark --prompt-list`` (synthetic data,
random MetaUAS weights at 64 px, CPU)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import anomalens.benchmark.runner as runner
from anomalens.benchmark.runner import BenchmarkConfig, run_benchmark
from anomalens.cli.main import main
from anomalens.data.io import load_image
from anomalens.data.prompt_lists import (
    check_prompt_list,
    class_prompts,
    pair_queries,
    prompt_list_file,
    read_prompt_list,
)
from anomalens.data.registry import get_index
from anomalens.data.synthetic import generate_synthetic_dataset
from anomalens.detectors.metauas import MetaUAS

CATS = ("tile", "screw")
#: the MetaUAS parity fixture holds two list files in the official formats
PARITY_DIR = Path(
    os.environ.get(
        "ANOMALENS_METAUAS_PARITY_DIR",
        Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "metauas_parity",
    )
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two categories, 3 normal train images, 1 normal + 1 defective test image each."""
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("data"),
        categories=list(CATS),
        n_train=3,
        n_test_good=1,
        n_test_defect=1,
        image_size=48,
        write_meta=False,
    )


@pytest.fixture(scope="module")
def det() -> MetaUAS:
    with pytest.warns(UserWarning, match="random weights"):
        return MetaUAS(image_size=64, batch_size=4)


@pytest.fixture
def use_det(monkeypatch: pytest.MonkeyPatch, det: MetaUAS) -> MetaUAS:
    """The benchmark gets the module's detector instead of building one (saves seconds)."""
    monkeypatch.setattr(runner, "create_detector", lambda name, **kw: det)
    return det


def _write(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=4))
    return path


def _official(cat_to_file: dict[str, str]) -> dict[str, Any]:
    """The official one-prompt format: class -> {"filename", "label", "label_name", "clsname"}."""
    return {
        c: {"filename": f, "label": 0, "label_name": "good", "clsname": c}
        for c, f in cat_to_file.items()
    }


def _tests(root: Path, cats: tuple[str, ...] = CATS) -> dict[str, list]:
    return {c: get_index("mvtec", root, c, "test") for c in cats}


# ----------------------------------------------------------------------------- reading
def test_official_per_class_format_and_its_variants(tmp_path: Path) -> None:
    f = _write(tmp_path / "oneprompt_seed1.json", _official({"tile": "tile/train/good/001.png"}))
    pl = read_prompt_list(f)
    assert pl.kind == "per_class"
    assert dict(pl.entries) == {"tile": ("tile/train/good/001.png",)}
    assert pl.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert pl.record() == {"path": str(f), "sha256": pl.sha256, "kind": "per_class"}
    # a bare path, and a list of k prompts (in order)
    f2 = _write(
        tmp_path / "k.json",
        {
            "tile": "tile/train/good/000.png",
            "screw": ["screw/train/good/002.png", {"filename": "x.png"}],
        },
    )
    assert dict(read_prompt_list(f2).entries) == {
        "tile": ("tile/train/good/000.png",),
        "screw": ("screw/train/good/002.png", "x.png"),
    }


def test_official_per_query_format_json_lines_or_one_object(tmp_path: Path) -> None:
    lines = [
        json.dumps(
            {"tile/test/good/000.png": ["tile/train/good/002.png", "tile/train/good/0.png"]}
        ),
        "",
        json.dumps({"tile/test/scratch/000.png": ["tile/train/good/001.png"]}),
    ]
    f = _write(tmp_path / "test-train-top10pair-eb4.json", "\n".join(lines) + "\n")
    pl = read_prompt_list(f)
    assert pl.kind == "per_query"
    assert pl.entries["tile/test/good/000.png"] == (
        "tile/train/good/002.png",
        "tile/train/good/0.png",
    )
    one = _write(tmp_path / "one.json", {"a/test/x.PNG": "a/train/good/0.png"})
    assert dict(read_prompt_list(one).entries) == {"a/test/x.PNG": ("a/train/good/0.png",)}


def test_the_official_list_files_of_the_parity_fixture_are_read() -> None:
    inputs = PARITY_DIR / "inputs"
    if not inputs.is_dir():
        pytest.skip(
            f"needs {inputs} (set ANOMALENS_METAUAS_PARITY_DIR to the metauas_parity folder)"
        )
    one = read_prompt_list(inputs / "oneprompt_seed1.json")
    assert one.kind == "per_class"
    assert dict(one.entries) == {"widget": ("prompt_0.png",), "fabric": ("prompt_1.png",)}
    top = read_prompt_list(inputs / "test-train-top2pair.json")
    assert top.kind == "per_query" and len(top.entries) == 5
    assert top.entries["query_0.png"] == ("prompt_2.png", "prompt_0.png")


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"tile": {"filename": "a.png"', "not valid JSON"),
        ('{"a/test/0.png": ["b.png"]}\n{"a/test/1.png": [', "line 2: not valid JSON"),
        ('["tile/train/good/000.png"]', "got a list"),
        ("  \n", "is empty"),
        ("{}", "lists nothing"),
        ('{"tile": {"name": "a.png"}}', '"filename"'),
        ('{"tile": {"filename": "a.png", "label": 1}}', "label 1"),
        ('{"tile": {"filename": "a.png", "clsname": "screw"}}', "names class 'screw'"),
        ('{"tile": 3}', "got a int"),
        ('{"tile": []}', "empty list"),
        ('{"tile": "a.png", "a/test/0.png": ["b.png"]}', "mixes"),
        ('{"a/test/0.png": []}', "non-empty list"),
        ('{"a/test/0.png": [7]}', "non-empty strings"),
        ('{"tile": "a.png", "tile": "b.png"}', "appears twice"),
        ('{"a/test/0.png": ["b.png"]}\n{"a/test/0.png": ["c.png"]}', "listed twice"),
        ('{"a/test/0.png": ["b.png"]}\n[1]', "line 2: expected a JSON object"),
    ],
)
def test_malformed_lists_are_refused_naming_the_file_and_problem(
    tmp_path: Path, content: str, problem: str
) -> None:
    f = _write(tmp_path / "list.json", content)
    with pytest.raises(ValueError, match=r"prompt list .*list\.json") as info:
        read_prompt_list(f)
    assert problem in str(info.value)


def test_a_missing_list_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"prompt list .*nope\.json"):
        read_prompt_list(tmp_path / "nope.json")


def test_seed_templates() -> None:
    assert prompt_list_file("l/oneprompt_seed{seed}.json", 7) == Path("l/oneprompt_seed7.json")
    assert prompt_list_file("l/top10.json", 7) == Path("l/top10.json")
    assert prompt_list_file("l/top10.json", None) == Path("l/top10.json")
    with pytest.raises(ValueError, match="no seed"):
        prompt_list_file("l/oneprompt_seed{seed}.json", None)


# ------------------------------------------------------------------- against the dataset
def test_check_names_missing_categories_files_and_queries(root: Path, tmp_path: Path) -> None:
    f = _write(tmp_path / "one.json", _official({"tile": "tile/train/good/009.png"}))
    with pytest.raises(ValueError) as info:
        check_prompt_list(read_prompt_list(f), root, _tests(root))
    msg = str(info.value)
    assert str(f) in msg and "no entry for category screw" in msg
    assert "tile/train/good/009.png (tile)" in msg and "relative to the dataset root" in msg

    good = _write(tmp_path / "ok.json", _official({c: f"{c}/train/good/001.png" for c in CATS}))
    pl = read_prompt_list(good)
    check_prompt_list(pl, root, _tests(root))  # no error
    assert [s.image_path for s in class_prompts(pl, root, "tile")] == [
        root / "tile/train/good/001.png"
    ]

    lines = [
        {"tile/test/good/000.png": ["tile/train/good/404.png"]},
        {"tile/test/gone/000.png": ["tile/train/good/000.png"]},
    ]
    q = _write(tmp_path / "top.json", "\n".join(json.dumps(x) for x in lines))
    with pytest.raises(ValueError) as info:
        check_prompt_list(read_prompt_list(q), root, _tests(root, ("tile",)))
    msg = str(info.value)
    assert str(q) in msg
    assert "no prompt for 1 test image(s): tile/test/" in msg  # the defective one is unlisted
    assert "tile/train/good/404.png (prompt of 1 test image)" in msg
    assert "tile/test/gone/000.png (test image)" in msg
    with pytest.raises(ValueError, match="gives no prompt for 1 test image"):
        pair_queries(read_prompt_list(q), root, _tests(root)["tile"])


# ---------------------------------------------------------------------------- benchmark
def _cfg(root: Path, out: Path, prompt_list: str, **kw: Any) -> BenchmarkConfig:
    return BenchmarkConfig(
        method="metauas",
        dataset="mvtec",
        root=str(root),
        out=str(out),
        method_kwargs={"image_size": 64, "batch_size": 4},
        prompt_list=prompt_list,
        **kw,
    )


def test_seed_template_reads_each_seeds_list_and_fits_exactly_its_prompt(
    root: Path, tmp_path: Path, use_det: MetaUAS, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = {1: "001", 3: "002"}  # seed -> train image listed for both categories
    for seed, stem in listed.items():
        _write(
            tmp_path / f"lists/oneprompt_seed{seed}.json",
            _official({c: f"{c}/train/good/{stem}.png" for c in CATS}),
        )
    fitted: list[list[np.ndarray]] = []
    real_fit = use_det.fit
    monkeypatch.setattr(
        use_det, "fit", lambda imgs, **kw: fitted.append(imgs) or real_fit(imgs, **kw)
    )
    template = str(tmp_path / "lists/oneprompt_seed{seed}.json")
    out = tmp_path / "bench"
    rows = run_benchmark(_cfg(root, out, template, seeds=[1, 3]), progress=False)

    assert sorted((r["category"], r["seed"]) for r in rows) == sorted(
        (c, s) for c in CATS for s in (1, 3)
    )
    for r in rows:
        want = root / r["category"] / "train/good" / f"{listed[r['seed']]}.png"
        assert r["k"] == 1 and r["shots"] == [str(want)]
        f = tmp_path / f"lists/oneprompt_seed{r['seed']}.json"
        assert r["prompt_list"] == str(f)
        assert r["prompt_list_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert r["prompt_list_kind"] == "per_class"
        assert r["detector"]["prompt_index"] == 0  # one prompt: the seeded draw has no choice
        assert (out / "jobs" / r["category"] / f"k1_seed{r['seed']}.json").is_file()
    # the detector was fitted on exactly the listed images, never on a drawn one
    drawn = {s.image_path for c in CATS for s in get_index("mvtec", root, c, "train")}
    listed_files = {root / c / "train/good" / f"{x}.png" for c in CATS for x in listed.values()}
    assert listed_files < drawn
    pixels = {p: load_image(p) for p in listed_files}
    for imgs in fitted:
        assert imgs is not None and len(imgs) == 1
        assert any(np.array_equal(imgs[0], px) for px in pixels.values())
    # recorded: config.json, results.csv, results.md
    assert json.loads((out / "config.json").read_text())["prompt_list"] == template
    with open(out / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert {(t["seed"], t["prompt_list"], t["prompt_list_sha256"]) for t in table} == {
        (str(r["seed"]), r["prompt_list"], r["prompt_list_sha256"]) for r in rows
    }
    md = (out / "results.md").read_text()
    assert "Prompts read from prompt lists" in md and rows[0]["prompt_list_sha256"] in md


def test_each_cell_fits_its_own_listed_prompt(
    root: Path, tmp_path: Path, use_det: MetaUAS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per category a different image: the last fit of each cell is the category's prompt."""
    f = _write(
        tmp_path / "one.json",
        _official({"tile": "tile/train/good/002.png", "screw": "screw/train/good/000.png"}),
    )
    calls: list[tuple[str, np.ndarray]] = []
    real_fit = use_det.fit

    def spy(imgs: list[np.ndarray], **kw: Any) -> MetaUAS:
        calls.append((kw.get("category", ""), imgs[0]))
        return real_fit(imgs, **kw)

    monkeypatch.setattr(use_det, "fit", spy)
    rows = run_benchmark(_cfg(root, tmp_path / "b", str(f)), progress=False)
    assert {(r["category"], r["seed"], r["k"]) for r in rows} == {(c, None, 1) for c in CATS}
    last = {cat: img for cat, img in calls}
    assert np.array_equal(last["tile"], load_image(root / "tile/train/good/002.png"))
    assert np.array_equal(last["screw"], load_image(root / "screw/train/good/000.png"))
    assert (tmp_path / "b/jobs/tile/k1_list.json").is_file()  # one fixed file: one run


def test_per_query_list_pairs_each_test_image_with_its_listed_prompt(
    root: Path, tmp_path: Path, use_det: MetaUAS, monkeypatch: pytest.MonkeyPatch
) -> None:
    tests = get_index("mvtec", root, "tile", "test")
    prompt_of = {s.image_path: root / f"tile/train/good/00{i}.png" for i, s in enumerate(tests)}
    lines = [
        json.dumps({p.relative_to(root).as_posix(): [ref.relative_to(root).as_posix(), "x.png"]})
        for p, ref in prompt_of.items()
    ]
    f = _write(tmp_path / "test-train-top10pair-eb4.json", "\n".join(lines) + "\n")
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real = use_det.predict_pairs

    def spy(images: list[np.ndarray], references: list[np.ndarray]) -> Any:
        seen.extend(zip(images, references))
        return real(images, references)

    monkeypatch.setattr(use_det, "predict_pairs", spy)
    out = tmp_path / "star"
    rows = run_benchmark(_cfg(root, out, str(f), categories=["tile"]), progress=False)
    (row,) = rows
    assert row["prompt_list_kind"] == "per_query" and row["k"] == 1 and row["shots"] == []
    assert row["num_test_images"] == len(tests) == len(seen)
    for s in tests:
        im = load_image(s.image_path)
        (ref,) = [r for q, r in seen if np.array_equal(q, im)]
        assert np.array_equal(ref, load_image(prompt_of[s.image_path]))
    with open(out / row["scores_file"], newline="") as fh:
        scores = list(csv.DictReader(fh))
    assert {r["path"]: r["prompt"] for r in scores} == {
        str(q): str(p) for q, p in prompt_of.items()
    }


def test_missing_entries_fail_before_any_work(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_detector(*a: Any, **kw: Any) -> None:
        raise AssertionError("a detector was built before the lists were checked")

    monkeypatch.setattr(runner, "create_detector", no_detector)
    f = _write(tmp_path / "one.json", _official({c: f"{c}/train/good/404.png" for c in CATS}))
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"one\.json: 2 listed image\(s\) do not exist"):
        run_benchmark(_cfg(root, out, str(f)), progress=False)
    assert not out.exists()
    # a seed without its file: the seeds that have one are named
    _write(
        tmp_path / "l/oneprompt_seed1.json", _official({c: f"{c}/train/good/000.png" for c in CATS})
    )
    with pytest.raises(FileNotFoundError, match=r"oneprompt_seed10\.json .*pass --seeds 1"):
        run_benchmark(
            _cfg(root, out, str(tmp_path / "l/oneprompt_seed{seed}.json"), seeds=[1, 10]),
            progress=False,
        )
    assert not out.exists()


def test_refused_where_a_list_cannot_apply(root: Path, tmp_path: Path) -> None:
    one = _write(tmp_path / "one.json", _official({c: f"{c}/train/good/000.png" for c in CATS}))
    top = _write(
        tmp_path / "top.json", json.dumps({"tile/test/good/000.png": ["tile/train/good/0.png"]})
    )
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match="musc takes no normal images"):
        run_benchmark(
            BenchmarkConfig("musc", "mvtec", str(root), out, prompt_list=str(one)), progress=False
        )
    with pytest.raises(ValueError, match=r"per-query prompt list .*patchcore has no predict_pairs"):
        run_benchmark(
            BenchmarkConfig("patchcore", "mvtec", str(root), out, prompt_list=str(top)),
            progress=False,
        )


def test_a_rerun_with_a_changed_list_is_refused(
    root: Path, tmp_path: Path, use_det: MetaUAS
) -> None:
    f = _write(tmp_path / "one.json", _official({c: f"{c}/train/good/000.png" for c in CATS}))
    cfg = _cfg(root, tmp_path / "b", str(f), categories=["tile"])
    first = run_benchmark(cfg, progress=False)
    again = run_benchmark(cfg, progress=False)  # resumed: read back, nothing recomputed
    assert [r["fit_seconds"] for r in again] == [r["fit_seconds"] for r in first]
    _write(f, _official({c: f"{c}/train/good/001.png" for c in CATS}))  # same name, new prompts
    with pytest.raises(ValueError, match="sha256"):
        run_benchmark(cfg, progress=False)


def test_cli_records_the_list_in_run_json_and_refuses_shots(
    root: Path, tmp_path: Path, use_det: MetaUAS, capsys: pytest.CaptureFixture[str]
) -> None:
    f = _write(tmp_path / "one.json", _official({"tile": "tile/train/good/001.png"}))
    out = tmp_path / "cli"
    base = ["benchmark", "--method", "metauas", "--dataset", "mvtec", "--root", str(root)]
    base += ["--categories", "tile", "--prompt-list", str(f), "--out", str(out), "-q"]
    with pytest.raises(SystemExit, match="--shots and --prompt-list exclude each other"):
        main([*base, "--shots", "1"])
    assert main(base) == 0
    run = json.loads((out / "run.json").read_text())
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    assert run["prompt_lists"] == [
        {"path": str(f), "sha256": sha, "kind": "per_class", "seed": None}
    ]
    assert sha in capsys.readouterr().out  # results.md, printed at the end


def test_cells_run_elsewhere_read_the_list_themselves(
    root: Path, tmp_path: Path, det: MetaUAS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Ray task body (``_cell``) gets the settings as a dict and reads the list itself."""
    import anomalens.registry
    from anomalens.distributed.ray_benchmark import _cell

    monkeypatch.setattr(anomalens.registry, "create_detector", lambda name, **kw: det)
    monkeypatch.setattr(runner, "create_detector", lambda name, **kw: det)
    f = _write(tmp_path / "one.json", _official({"tile": "tile/train/good/002.png"}))
    cells: list[tuple] = []

    def elsewhere(cfg: BenchmarkConfig, pending: list[tuple]) -> None:
        cells.extend(pending)
        for c in pending:
            _cell(asdict(cfg), *c)

    cfg = _cfg(root, tmp_path / "r", str(f), categories=["tile"])
    (row,) = run_benchmark(cfg, progress=False, run_cells=elsewhere)
    assert cells == [("tile", 1, None)]
    assert row["shots"] == [str(root / "tile/train/good/002.png")]
    assert row["prompt_list_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
