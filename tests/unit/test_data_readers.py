"""Dataset readers, registry, meta.json and k-shot sampling on small layouts in tmp_path."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens.data.btad import make_btad_index
from anomalens.data.folder import make_folder_index
from anomalens.data.io import ImageReadError, load_image, load_mask
from anomalens.data.meta import read_meta_json, write_meta_json
from anomalens.data.mvtec import make_mpdd_index, make_mvtec_index
from anomalens.data.registry import (
    KNOWN_CATEGORIES,
    build_index,
    get_index,
    list_categories,
    list_datasets,
)
from anomalens.data.sampling import sample_shots
from anomalens.data.visa import make_visa_index
from anomalens.types import Sample

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
MAGNETIC = SHARED / "data" / "magnetic_tile"


def _img(path: Path, value: int = 128, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


def _mask(path: Path, values: tuple[int, ...] = (255,), size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size, np.uint8)
    m[2 : 2 + len(values), 3] = values
    Image.fromarray(m).save(path)
    return path


def _mvtec(root: Path, cat: str = "bottle", normal: str = "good") -> Path:
    for i in range(3):
        _img(root / cat / "train" / normal / f"{i:03d}.png")
    for i in range(2):
        _img(root / cat / "test" / normal / f"{i:03d}.png")
    for defect, n in (("broken", 2), ("crack", 1)):
        for i in range(n):
            _img(root / cat / "test" / defect / f"{i:03d}.png", 40)
            _mask(root / cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


# ---------------------------------------------------------------- MVTec / MPDD


def test_mvtec_index(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    train = make_mvtec_index(root, "bottle", "train")
    assert len(train) == 3 and all(s.label == 0 and s.mask_path is None for s in train)
    assert {s.split for s in train} == {"train"}
    test = make_mvtec_index(root, "bottle", "test")
    assert Counter(s.defect_type for s in test) == {"good": 2, "broken": 2, "crack": 1}
    for s in test:
        assert s.category == "bottle" and s.split == "test"
        if s.label:
            assert s.mask_path is not None and s.mask_path.stem == s.image_path.stem + "_mask"
            assert s.mask_path.parent.name == s.defect_type
        else:
            assert s.defect_type == "good" and s.mask_path is None
    # root may be the category folder itself
    assert make_mvtec_index(root / "bottle", None, "test") == test


def test_mvtec_pairs_by_stem_not_position(tmp_path: Path) -> None:
    root = tmp_path
    _img(root / "c" / "train" / "good" / "0.png")
    for stem in ("a", "b"):
        _img(root / "c" / "test" / "bad" / f"{stem}.png")
    _mask(root / "c" / "ground_truth" / "bad" / "b_mask.png")
    _mask(root / "c" / "ground_truth" / "bad" / "a_mask.bmp")  # other extension, sorts after
    _mask(root / "c" / "ground_truth" / "bad" / "zz_mask.png")  # orphan mask: ignored
    test = make_mvtec_index(root, "c", "test")
    assert {s.image_path.stem: s.mask_path.name for s in test if s.mask_path} == {
        "a": "a_mask.bmp",
        "b": "b_mask.png",
    }


def test_mvtec_missing_mask_raises(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    (root / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask for defective image .*crack.*000\.png"):
        make_mvtec_index(root, "bottle", "test")


def test_mvtec_unknown_category_lists_existing(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    _mvtec(root, "zipper")
    (root / "notes").mkdir()  # not a category: no train/ or test/
    with pytest.raises(ValueError, match=r"'cable' not found.*Categories there: bottle, zipper$"):
        make_mvtec_index(root, "cable", "test")
    with pytest.raises(ValueError, match="Categories there: bottle, zipper"):
        get_index("mvtec", root, "cable", "train")


def test_mvtec_empty_and_bad_layouts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*expected layout"):
        make_mvtec_index(tmp_path / "missing", "bottle", "train")
    empty = tmp_path / "empty"
    (empty / "bottle" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no image found in .*train.*expected layout"):
        make_mvtec_index(empty, "bottle", "train")
    with pytest.raises(FileNotFoundError, match="has no test/ folder"):
        make_mvtec_index(empty, "bottle", "test")
    # only a non-image file: still "no image"
    (empty / "bottle" / "train" / "good" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image found"):
        make_mvtec_index(empty, "bottle", "train")
    # images lying directly in the split folder get a hint
    _img(empty / "bottle" / "train" / "000.png")
    with pytest.raises(ValueError, match="lie directly in it"):
        make_mvtec_index(empty, "bottle", "train")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        make_mvtec_index(empty, "bottle", "val")


def test_mpdd_uses_mvtec_layout(tmp_path: Path) -> None:
    root = _mvtec(tmp_path, "bracket_black")
    assert len(make_mpdd_index(root, "bracket_black", "test")) == 5
    assert list_categories("mpdd", root) == ["bracket_black"]


def test_mask_of_wrong_size_is_reported(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    _mask(root / "bottle" / "ground_truth" / "crack" / "000_mask.png", size=(8, 9))
    s = next(s for s in make_mvtec_index(root, "bottle", "test") if s.defect_type == "crack")
    image = load_image(s.image_path)
    with pytest.raises(ImageReadError, match=r"000_mask\.png.*does not match"):
        load_mask(s.mask_path, image.shape[:2])


# ---------------------------------------------------------------- BTAD


def test_btad_mixed_extensions(tmp_path: Path) -> None:
    root = tmp_path / "BTech_Dataset_transformed"
    _img(root / "01" / "train" / "ok" / "0000.bmp")
    _img(root / "01" / "train" / "ok" / "0001.png")
    _img(root / "01" / "test" / "ok" / "0002.bmp")
    _img(root / "01" / "test" / "ko" / "0003.bmp")
    _img(root / "01" / "test" / "ko" / "0004.png")
    _mask(root / "01" / "ground_truth" / "ko" / "0003.png")
    _mask(root / "01" / "ground_truth" / "ko" / "0004.bmp")
    _mvtec(root, "03", normal="ok")
    assert list_categories("btad", root) == ["01", "03"]
    assert len(make_btad_index(root, "01", "train")) == 2
    test = make_btad_index(root, "01", "test")
    pairs = {s.image_path.name: (s.label, s.mask_path and s.mask_path.name) for s in test}
    assert pairs == {
        "0002.bmp": (0, None),
        "0003.bmp": (1, "0003.png"),
        "0004.png": (1, "0004.bmp"),
    }
    assert {s.defect_type for s in test} == {"ok", "ko"}
    with pytest.raises(ValueError, match="Categories there: 01, 03"):
        make_btad_index(root, "02", "test")


# ---------------------------------------------------------------- VisA


def _visa_raw(root: Path) -> Path:
    rows = [("object", "split", "label", "image", "mask")]
    for obj in ("candle", "pcb1"):
        for i in range(3):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _img(root / rel)
            rows.append((obj, "train" if i < 2 else "test", "normal", rel, ""))
        for i in range(2):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _img(root / rel, 30)
            _mask(root / mrel, values=(1, 2, 7))  # not binary, as in the release
            rows.append((obj, "test", "anomaly", rel, mrel))
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root


def test_visa_raw_csv(tmp_path: Path) -> None:
    root = _visa_raw(tmp_path / "VisA")
    assert list_categories("visa", root) == ["candle", "pcb1"]
    train = make_visa_index(root, "pcb1", "train")
    assert len(train) == 2 and all(s.label == 0 and s.split == "train" for s in train)
    test = make_visa_index(root, "pcb1", "test")
    assert [s.label for s in test] == [0, 1, 1]
    bad = test[1]
    assert bad.mask_path == root / "pcb1/Data/Masks/Anomaly/000.png"
    assert load_mask(bad.mask_path).sum() == 3  # values 1, 2, 7 all count as anomalous
    with pytest.raises(ValueError, match="Categories there: candle, pcb1"):
        make_visa_index(root, "pcb9", "test")


def test_visa_raw_errors(tmp_path: Path) -> None:
    root = _visa_raw(tmp_path / "VisA")
    (root / "pcb1/Data/Masks/Anomaly/001.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"1cls\.csv line \d+: mask .*001\.png does not exist"
    ):
        make_visa_index(root, "pcb1", "test")
    (root / "split_csv" / "1cls.csv").write_text("object,split,image\npcb1,train,x.JPG\n")
    with pytest.raises(ValueError, match=r"lacks column.*label"):
        make_visa_index(root, "pcb1", "train")
    with pytest.raises(FileNotFoundError, match="no VisA layout"):
        make_visa_index(tmp_path, "pcb1", "train")


def test_visa_prepared_layout(tmp_path: Path) -> None:
    root = tmp_path / "visa_out"
    prepared = root / "1cls"
    _img(prepared / "pcb1" / "train" / "good" / "0000.JPG")
    _img(prepared / "pcb1" / "test" / "good" / "0001.JPG")
    _img(prepared / "pcb1" / "test" / "bad" / "000.JPG")
    _mask(prepared / "pcb1" / "ground_truth" / "bad" / "000.png")  # same stem, no _mask
    for r in (root, prepared):
        assert list_categories("visa", r) == ["pcb1"]
        test = make_visa_index(r, "pcb1", "test")
        assert [(s.label, s.mask_path and s.mask_path.name) for s in test] == [
            (1, "000.png"),
            (0, None),
        ]


# ---------------------------------------------------------------- folder


def test_folder_unlabelled_queries(tmp_path: Path) -> None:
    _img(tmp_path / "ref" / "a.png")
    _img(tmp_path / "q" / "x.jpg")
    _img(tmp_path / "q" / "y.png")
    idx = make_folder_index(tmp_path / "q", normal_dir=tmp_path / "ref", category="part")
    assert [(s.image_path.name, s.label, s.split) for s in idx] == [
        ("a.png", 0, "train"),
        ("x.jpg", -1, "test"),
        ("y.png", -1, "test"),
    ]
    assert {s.category for s in idx} == {"part"}


def test_folder_labels_from_masks(tmp_path: Path) -> None:
    _img(tmp_path / "q" / "x.jpg")
    _img(tmp_path / "q" / "y.png")
    _img(tmp_path / "q" / "z.png")
    _mask(tmp_path / "m" / "x_mask.bmp")  # any extension
    _mask(tmp_path / "m" / "y_mask.png", values=(0,))  # all-zero mask: normal
    idx = make_folder_index(tmp_path / "q", mask_dir=tmp_path / "m")
    got = {s.image_path.name: (s.label, s.mask_path and s.mask_path.name) for s in idx}
    assert got == {"x.jpg": (1, "x_mask.bmp"), "y.png": (0, "y_mask.png"), "z.png": (0, None)}
    # custom suffix, bare stem accepted too
    _mask(tmp_path / "m2" / "x.png")
    idx = make_folder_index(tmp_path / "q", mask_dir=tmp_path / "m2", mask_suffix="_gt")
    assert [s.label for s in idx] == [1, 0, 0]


def test_folder_good_bad_subfolders(tmp_path: Path) -> None:
    q = tmp_path / "q"
    _img(q / "good" / "1.png")
    _img(q / "bad" / "2.png")
    _img(q / "scratch" / "3.png")  # another defect folder next to good/: anomalous
    _img(q / "4.png")  # loose image: unknown
    _mask(tmp_path / "gt" / "scratch" / "3_mask.png")
    _mask(tmp_path / "gt" / "other" / "3_mask.png")  # same stem elsewhere: sub-folder wins
    idx = make_folder_index(q, mask_dir=tmp_path / "gt")
    got = {s.image_path.name: (s.label, s.defect_type) for s in idx}
    assert got == {
        "1.png": (0, "good"),
        "2.png": (1, "bad"),
        "3.png": (1, "scratch"),
        "4.png": (0, ""),
    }
    assert next(s for s in idx if s.image_path.name == "3.png").mask_path.parent.name == "scratch"
    # without masks the loose image stays unknown
    assert {s.image_path.name: s.label for s in make_folder_index(q)}["4.png"] == -1
    # unknown sub-folder names without a good/ folder carry no label
    _img(tmp_path / "q2" / "batch1" / "5.png")
    assert make_folder_index(tmp_path / "q2")[0].label == -1


def test_folder_contradiction_and_empty(tmp_path: Path) -> None:
    _img(tmp_path / "q" / "good" / "1.png")
    _mask(tmp_path / "m" / "1_mask.png")
    with pytest.raises(ValueError, match=r"normal folder .* marks a defect"):
        make_folder_index(tmp_path / "q", mask_dir=tmp_path / "m")
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match=r"no image file in query folder .*e \(it is empty\)"):
        make_folder_index(tmp_path / "e")
    (tmp_path / "e" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds only: a\.txt"):
        make_folder_index(tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="normal folder"):
        make_folder_index(tmp_path / "q", normal_dir=tmp_path / "nope")


def test_folder_dataset_via_registry(tmp_path: Path) -> None:
    cat = tmp_path / "widget"
    _img(cat / "normal" / "r.png")
    _img(cat / "query" / "q1.png")
    _img(cat / "query" / "q2.png")
    _mask(cat / "masks" / "q2_mask.png")
    assert list_categories("folder", tmp_path) == ["widget"]
    assert [s.label for s in get_index("folder", tmp_path, "widget", "train")] == [0]
    assert [s.label for s in get_index("folder", tmp_path, "widget", "test")] == [0, 1]
    assert [s.label for s in get_index("folder", cat, None, "test")] == [0, 1]
    (tmp_path / "bare" / "query").mkdir(parents=True)
    _img(tmp_path / "bare" / "query" / "a.png")
    assert get_index("folder", tmp_path, "bare", "train") == []  # zero-shot: no references
    with pytest.raises(ValueError, match="Categories there: bare, widget"):
        get_index("folder", tmp_path, "gadget", "test")


# ---------------------------------------------------------------- registry


def test_registry_lists() -> None:
    assert list_datasets() == ["btad", "folder", "mpdd", "mvtec", "pairs", "visa"]
    assert len(KNOWN_CATEGORIES["mvtec"]) == 15 and len(KNOWN_CATEGORIES["visa"]) == 12
    assert KNOWN_CATEGORIES["btad"] == ("01", "02", "03") and len(KNOWN_CATEGORIES["mpdd"]) == 6
    with pytest.raises(ValueError, match=r"unknown dataset 'mvtech'\. Available: btad, folder"):
        get_index("mvtech", ".", "bottle", "test")
    with pytest.raises(ValueError, match="unknown dataset"):
        list_categories("nope", ".")


def test_list_categories_missing_root(tmp_path: Path) -> None:
    for ds in list_datasets():
        assert list_categories(ds, tmp_path / "missing") == []


# ---------------------------------------------------------------- meta.json


def test_meta_json_round_trip_and_format(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    _mvtec(root, "zipper")
    index = build_index("mvtec", root)
    path = write_meta_json(root, index)
    assert path == root / "meta.json"
    text = path.read_text()
    assert text.startswith('{\n    "train": {\n        "bottle": [\n            {\n')
    raw = json.loads(text)
    assert list(raw) == ["train", "test"] and list(raw["test"]) == ["bottle", "zipper"]
    bad = next(e for e in raw["test"]["bottle"] if e["anomaly"] == 1)
    assert list(bad) == ["img_path", "mask_path", "cls_name", "specie_name", "anomaly"]
    assert bad["img_path"] == "bottle/test/broken/000.png"
    assert bad["mask_path"] == "bottle/ground_truth/broken/000_mask.png"
    good = raw["train"]["bottle"][0]
    assert good == {
        "img_path": "bottle/train/good/000.png",
        "mask_path": "",
        "cls_name": "bottle",
        "specie_name": "good",
        "anomaly": 0,
    }
    back = read_meta_json(root)
    assert back == index
    assert read_meta_json(path) == index


def test_meta_json_official_example(tmp_path: Path) -> None:
    _img(tmp_path / "bottle/train/good/000.png")
    _img(tmp_path / "bottle/test/broken_large/000.png")
    _mask(tmp_path / "bottle/ground_truth/broken_large/000_mask.png")
    meta = {
        "train": {"bottle": [{"img_path": "bottle/train/good/000.png", "mask_path": "",
                              "cls_name": "bottle", "specie_name": "good", "anomaly": 0}]},
        "test": {"bottle": [{"img_path": "bottle/test/broken_large/000.png",
                             "mask_path": "bottle/ground_truth/broken_large/000_mask.png",
                             "cls_name": "bottle", "specie_name": "broken_large", "anomaly": 1,
                             "view_id": 0}]},
    }  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(meta, indent=4))
    idx = read_meta_json(tmp_path)
    assert idx["test"]["bottle"] == [
        Sample(
            tmp_path / "bottle/test/broken_large/000.png",
            1,
            tmp_path / "bottle/ground_truth/broken_large/000_mask.png",
            "bottle",
            "broken_large",
            "test",
        )
    ]
    assert idx["train"]["bottle"][0].label == 0 and idx["train"]["bottle"][0].mask_path is None


def test_meta_json_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"meta\.json does not exist"):
        read_meta_json(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_meta_json(tmp_path)
    (tmp_path / "meta.json").write_text(
        json.dumps({"test": {"c": [{"img_path": "x.png", "anomaly": 2}]}})
    )
    with pytest.raises(ValueError, match=r"\[test\]\[c\]\[0\]: 'anomaly' must be 0 or 1"):
        read_meta_json(tmp_path)
    (tmp_path / "meta.json").write_text(
        json.dumps({"test": {"c": [{"img_path": "x.png", "anomaly": 0}]}})
    )
    with pytest.raises(FileNotFoundError, match=r"x\.png does not exist"):
        read_meta_json(tmp_path)
    assert read_meta_json(tmp_path, check_files=False)["train"] == {}
    with pytest.raises(ValueError, match="label -1 cannot be written"):
        write_meta_json(tmp_path, {"test": {"c": [Sample(tmp_path / "x.png", -1)]}})
    with pytest.raises(ValueError, match="outside the dataset root"):
        write_meta_json(tmp_path / "sub", {"test": {"c": [Sample(tmp_path / "x.png", 0)]}})


# ---------------------------------------------------------------- sampling


def _pool(n: int) -> list[Sample]:
    return [Sample(Path(f"{i:03d}.png"), 0, split="train") for i in range(n)]


def test_sample_shots_without_replacement() -> None:
    pool = _pool(10)
    a = sample_shots(pool, 4, seed=3)
    assert a == sample_shots(pool, 4, seed=3)
    assert len({s.image_path for s in a}) == 4
    assert a != sample_shots(pool, 4, seed=4)
    assert sample_shots(pool, 0, seed=3) == []
    assert sorted(sample_shots(pool, 10, seed=1), key=lambda s: s.image_path) == pool
    assert sample_shots(pool, 2, seed=0, rule="first") == pool[:2]
    with pytest.raises(ValueError, match="cannot draw k=11 distinct"):
        sample_shots(pool, 11, seed=0)


def test_sample_shots_adaptclip_rule() -> None:
    pool = _pool(2)
    # values recorded with the official sampler (fixtures/adaptclip_parity/README.md)
    assert [s.image_path.name for s in sample_shots(pool, 1, 0, "adaptclip")] == ["000.png"]
    assert [s.image_path.name for s in sample_shots(pool, 2, 0, "adaptclip")] == [
        "000.png",
        "001.png",
    ]
    assert [s.image_path.name for s in sample_shots(pool, 2, 10, "adaptclip")] == [
        "001.png",
        "001.png",
    ]
    big = _pool(50)
    torch.manual_seed(20)
    expected = torch.randint(0, 50, (4,)).tolist()
    state = torch.get_rng_state()
    assert [int(s.image_path.stem) for s in sample_shots(big, 4, 20, "adaptclip")] == expected
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert len(sample_shots(pool, 5, 1, "adaptclip")) == 5  # with replacement: k > pool is fine


def test_sample_shots_refuses_bad_pools() -> None:
    with pytest.raises(ValueError, match="pool of normal training images is empty"):
        sample_shots([], 1, 0)
    with pytest.raises(ValueError, match="normal images only"):
        sample_shots([Sample(Path("a.png"), 1)], 1, 0)
    with pytest.raises(ValueError, match="unknown shot rule"):
        sample_shots(_pool(3), 1, 0, rule="random")
    with pytest.raises(ValueError, match="k must be >= 0"):
        sample_shots(_pool(3), -1, 0)


# ---------------------------------------------------------------- real data


@pytest.mark.shared
def test_magnetic_tile_counts_and_sizes() -> None:
    if not MAGNETIC.is_dir():
        pytest.skip(f"real data not found at {MAGNETIC} (needs ../shared/data/magnetic_tile)")
    assert list_categories("mvtec", MAGNETIC.parent) == ["magnetic_tile"]
    train = get_index("mvtec", MAGNETIC.parent, "magnetic_tile", "train")
    test = make_mvtec_index(MAGNETIC, None, "test")
    assert Counter(s.defect_type for s in train) == {"good": 200}
    assert Counter(s.defect_type for s in test) == {
        "good": 100,
        "blowhole": 115,
        "break": 85,
        "crack": 57,
    }
    sizes = set()
    for s in test:
        if s.label == 1:
            img = load_image(s.image_path)  # greyscale JPEG -> (H, W, 3)
            assert img.ndim == 3 and img.shape[2] == 3
            mask = load_mask(s.mask_path, img.shape[:2])  # raises if the sizes differ
            assert mask.any(), s.mask_path
            sizes.add(img.shape[:2])
    assert len(sizes) > 1  # varying sizes
