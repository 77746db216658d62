"""Seeded synthetic defect generator: determinism, exact masks, MVTec layout."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from anomalens.data.io import load_image, load_mask
from anomalens.data.meta import read_meta_json
from anomalens.data.mvtec import make_mvtec_index
from anomalens.data.registry import list_categories
from anomalens.data.synthetic import (
    SYNTHETIC_CATEGORIES,
    SYNTHETIC_DEFECTS,
    generate_synthetic_dataset,
    list_synthetic_categories,
    render_synthetic_sample,
)

SMALL = {"n_train": 2, "n_test_good": 1, "n_test_defect": 6, "image_size": 64}


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_catalogue() -> None:
    cats = list_synthetic_categories()
    assert cats == sorted(SYNTHETIC_CATEGORIES) and len(cats) >= 4
    kinds = {SYNTHETIC_CATEGORIES[c].kind for c in cats}
    assert kinds == {"texture", "object"}
    for c in cats:
        spec = SYNTHETIC_CATEGORIES[c]
        assert set(spec.defects) <= set(SYNTHETIC_DEFECTS)
        assert ("missing" in spec.defects) == (spec.kind == "object")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("syn") / "a", seed=5, **SMALL)


def test_layout_readable_by_mvtec_reader(small_dataset: Path) -> None:
    root = small_dataset
    assert list_categories("mvtec", root) == list_synthetic_categories()
    for c in list_synthetic_categories():
        train = make_mvtec_index(root, c, "train")
        test = make_mvtec_index(root, c, "test")
        assert len(train) == 2 and all(s.label == 0 for s in train)
        counts = Counter(s.defect_type for s in test)
        assert counts["good"] == 1 and sum(counts.values()) == 7
        # defective images cycle through the category's defect types
        assert set(counts) - {"good"} == set(SYNTHETIC_CATEGORIES[c].defects[:6])
        for s in test:
            img = load_image(s.image_path)
            assert img.shape == (64, 64, 3)
            mask = load_mask(s.mask_path, (64, 64)) if s.mask_path else np.zeros((64, 64), bool)
            assert mask.any() == (s.label == 1), s.image_path  # non-empty exactly for defects
    meta = read_meta_json(root)
    assert meta["test"]["washer"] == make_mvtec_index(root, "washer", "test")


def test_masks_are_strict_0_255(small_dataset: Path) -> None:
    from PIL import Image

    for p in small_dataset.rglob("*_mask.png"):
        arr = np.asarray(Image.open(p))
        assert arr.ndim == 2 and set(np.unique(arr)) <= {0, 255}


def test_determinism(tmp_path: Path, small_dataset: Path) -> None:
    again = generate_synthetic_dataset(tmp_path / "b", seed=5, **SMALL)
    assert _digest(again) == _digest(small_dataset)
    other = generate_synthetic_dataset(tmp_path / "c", seed=6, **SMALL)
    da, dc = _digest(small_dataset), _digest(other)
    assert da.keys() == dc.keys()
    images = [k for k in da if k.endswith(".png") and "ground_truth" not in k]
    assert all(da[k] != dc[k] for k in images)


def test_category_independent_of_others(tmp_path: Path, small_dataset: Path) -> None:
    one = generate_synthetic_dataset(tmp_path / "one", categories=["grain"], seed=5, **SMALL)
    d1 = _digest(one / "grain")
    assert d1 == _digest(small_dataset / "grain")


@pytest.mark.parametrize("category", list_synthetic_categories())
def test_defects_exact_footprint(category: str) -> None:
    """Every defect changes its mask pixels visibly and no pixel outside the mask."""
    for i, defect in enumerate(SYNTHETIC_CATEGORIES[category].defects):
        smp = render_synthetic_sample(category, [11, i], defect, image_size=128)
        diff = np.abs(smp.image.astype(int) - smp.clean.astype(int)).max(axis=2)
        assert smp.mask.any()
        assert (diff[~smp.mask] == 0).all(), f"{defect}: pixels changed outside the mask"
        assert (diff[smp.mask] > 0).all(), f"{defect}: unchanged pixels inside the mask"
        assert diff[smp.mask].mean() >= 8, f"{defect} on {category} is barely visible"
        assert smp.mask.mean() < 0.05, f"{defect} on {category} covers too much"
        # the clean rendering is the normal image of the same seed
        normal = render_synthetic_sample(category, [11, i], None, image_size=128)
        np.testing.assert_array_equal(normal.image, smp.clean)
        assert not normal.mask.any() and normal.defect == "good"


def test_images_vary_between_seeds() -> None:
    a = render_synthetic_sample("washer", 1).image.astype(int)
    b = render_synthetic_sample("washer", 2).image.astype(int)
    assert np.abs(a - b).mean() > 2


def test_bad_arguments(tmp_path: Path, small_dataset: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic category 'marble'; available: grain"):
        generate_synthetic_dataset(tmp_path, categories=["marble"])
    with pytest.raises(ValueError, match="has no defect 'missing'"):
        render_synthetic_sample("woven", 0, "missing")
    foreign = tmp_path / "real" / "screw"
    (foreign / "train" / "good").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by the synthetic generator"):
        generate_synthetic_dataset(foreign.parent, categories=["screw"], **SMALL)
    assert foreign.is_dir()  # a folder the generator did not write is never deleted
    generate_synthetic_dataset(foreign.parent, categories=["screw"], overwrite=True, **SMALL)
    assert len(make_mvtec_index(foreign.parent, "screw", "test")) == 7
    out = generate_synthetic_dataset(
        tmp_path / "o",
        categories=["grain"],
        n_train=1,
        n_test_good=1,
        n_test_defect=1,
        image_size=32,
    )
    generate_synthetic_dataset(  # re-run into its own output: replaced without overwrite=True
        out, categories=["grain"], n_train=1, n_test_good=0, n_test_defect=0, image_size=32
    )
    left = sorted(p.name for p in (out / "grain").iterdir())
    assert left == [".anomalens_synthetic.json", "train"]  # stale files removed
    assert read_meta_json(out)["test"] == {}


#: sha256 over (relative path, bytes) of every file of ``generate_synthetic_dataset(root,
#: seed=5, **SMALL)``, computed before ``defect_scale``/``defect_types`` were added: the
#: defaults must keep writing exactly the same files.
DEFAULT_OUTPUT_SHA256 = "ae537a20d4a46dafd660e81ee062dcf8723ec3a4b6ae5e0d3186df857df6327b"


def test_default_output_bytes_unchanged(small_dataset: Path) -> None:
    h = hashlib.sha256()
    for p in sorted(small_dataset.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(small_dataset)).encode())
            h.update(p.read_bytes())
    assert h.hexdigest() == DEFAULT_OUTPUT_SHA256


@pytest.mark.parametrize("category", ["tile", "screw"])
def test_defect_scale_makes_defects_larger(category: str) -> None:
    for defect in ("stain", "spot", "hole", "scratch", "crack"):
        areas = np.zeros(2)
        for i in range(4):  # mean area over a few images: thin lines may leave the image
            small = render_synthetic_sample(category, [4, i], defect, image_size=64)
            large = render_synthetic_sample(category, [4, i], defect, 64, defect_scale=4.0)
            areas += small.mask.sum(), large.mask.sum()
            np.testing.assert_array_equal(large.clean, small.clean)  # only the defect changes
            diff = np.abs(large.image.astype(int) - large.clean.astype(int)).max(axis=2)
            assert (diff[~large.mask] == 0).all() and (diff[large.mask] > 0).all()
        assert areas[1] >= 2 * areas[0], (defect, areas)
    same = render_synthetic_sample(category, [4, 0], "stain", 64, defect_scale=1.0)
    np.testing.assert_array_equal(
        same.image, render_synthetic_sample(category, [4, 0], "stain", 64).image
    )
    with pytest.raises(ValueError, match="defect_scale must be a positive number"):
        render_synthetic_sample(category, 0, "stain", 64, defect_scale=0.0)


def test_defect_types_restrict_the_defects(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(
        tmp_path / "r", ["woven", "screw"], defect_types=["stain", "hole"], defect_scale=3.0,
        **SMALL,
    )  # fmt: skip
    for c in ("woven", "screw"):
        counts = Counter(s.defect_type for s in make_mvtec_index(root, c, "test"))
        assert counts == {"good": 1, "stain": 3, "hole": 3}
        assert sorted(p.name for p in (root / c / "ground_truth").iterdir()) == ["hole", "stain"]
    # the same seed and scale give the same stain images without the restriction
    full = generate_synthetic_dataset(tmp_path / "f", ["woven"], defect_scale=3.0, **SMALL)
    a, b = (root / "woven" / "test" / "stain" / "000.png"), (full / "woven" / "test" / "stain")
    assert a.read_bytes() == (b / "000.png").read_bytes()
    objects = generate_synthetic_dataset(
        tmp_path / "o", ["washer"], defect_types="missing", **SMALL
    )
    assert {s.defect_type for s in make_mvtec_index(objects, "washer", "test")} == {
        "good",
        "missing",
    }
    with pytest.raises(ValueError, match="unknown defect type 'dent'"):
        generate_synthetic_dataset(tmp_path / "x", ["woven"], defect_types=["dent"], **SMALL)
    with pytest.raises(ValueError, match="category 'woven' has none of these defect types"):
        generate_synthetic_dataset(tmp_path / "y", ["woven"], defect_types=["missing"], **SMALL)
    with pytest.raises(ValueError, match="defect_scale must be a positive number"):
        generate_synthetic_dataset(tmp_path / "z", ["woven"], defect_scale=-1.0, **SMALL)
