"""VisA reader: the raw release (``split_csv/1cls.csv``) or the prepared MVTec-like layout.

Raw layout (as downloaded)::

    <root>/split_csv/1cls.csv                  # object,split,label,image,mask
    <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png   # NOT binary: any value != 0 is anomalous

Prepared layout (spot-diff ``prepare_data.py --split-type 1cls`` or anomalib ``visa_pytorch``),
read with the MVTec logic; ``<root>`` may also be the folder that holds ``1cls/`` or
``visa_pytorch/``::

    <root>/<object>/{train,test}/good/*.JPG, <root>/<object>/test/bad/*.JPG,
    <root>/<object>/ground_truth/bad/<stem>.png

Raw masks are binarised by ``anomalens.data.io.load_mask`` (``value > 0``), as the official
preparation does.
"""

from __future__ import annotations

import csv
from pathlib import Path

from anomalens.data.mvtec import check_split, find_category_dirs, make_mvtec_like_index
from anomalens.types import Sample

__all__ = ["VISA_CATEGORIES", "make_visa_index", "visa_categories"]

#: The 12 VisA objects (documentation; readers discover categories from disk / CSV).
VISA_CATEGORIES: tuple[str, ...] = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
CSV_NAME = Path("split_csv") / "1cls.csv"
CSV_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LAYOUT = (
    "raw: <root>/split_csv/1cls.csv with columns object,split,label,image,mask and the paths it "
    "lists; or prepared: <root>/<object>/{train,test}/good, <root>/<object>/test/bad, "
    "<root>/<object>/ground_truth/bad/<stem>.png"
)
_PREPARED_SUBDIRS = ("", "1cls", "visa_pytorch")


def _read_csv(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{csv_path} lacks column(s) {', '.join(missing)}; expected header "
                f"{','.join(CSV_COLUMNS)}"
            )
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def _prepared_root(root: Path) -> Path | None:
    for sub in _PREPARED_SUBDIRS:
        cand = root / sub if sub else root
        if find_category_dirs(cand):
            return cand
    return None


def visa_categories(root: str | Path) -> list[str]:
    """VisA objects present under ``root`` (from ``1cls.csv`` if present, else folders)."""
    root = Path(root)
    if (root / CSV_NAME).is_file():
        return sorted({r["object"] for r in _read_csv(root / CSV_NAME)})
    prepared = _prepared_root(root)
    return find_category_dirs(prepared) if prepared is not None else []


def make_visa_index(root: str | Path, category: str | None, split: str) -> list[Sample]:
    """Index one split of a VisA object.

    Args:
        root: raw VisA root (holding ``split_csv/1cls.csv``) or a prepared MVTec-like root.
        category: object name, e.g. ``pcb1``.
        split: ``train`` or ``test``.

    Returns:
        Samples in CSV order (raw) or folder order (prepared). Raw: ``defect_type`` is ``good``
        for normal rows and ``anomaly`` for anomalous rows (the CSV has no defect names).

    Raises:
        FileNotFoundError: no VisA layout under ``root``, or a listed file is missing.
        ValueError: unknown object (lists those present), bad CSV rows, empty split.
    """
    check_split(split)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"VisA root {root} does not exist; expected layout: {VISA_LAYOUT}")
    csv_path = root / CSV_NAME
    if not csv_path.is_file():
        prepared = _prepared_root(root)
        if prepared is None:
            raise FileNotFoundError(
                f"no VisA layout under {root}: neither {csv_path} nor MVTec-like object folders; "
                f"expected layout: {VISA_LAYOUT}"
            )
        return make_mvtec_like_index(
            prepared, category, split, dataset="VisA (prepared)", layout=VISA_LAYOUT
        )
    rows = _read_csv(csv_path)
    objects = sorted({r["object"] for r in rows})
    if category not in objects:
        raise ValueError(
            f"category {category!r} not in {csv_path}. Categories there: {', '.join(objects)}"
        )
    samples: list[Sample] = []
    for line, row in enumerate(rows, start=2):
        if row["object"] != category or row["split"] != split:
            continue
        where = f"{csv_path} line {line}"
        if row["label"] not in ("normal", "anomaly"):
            raise ValueError(f"{where}: label {row['label']!r} is not 'normal' or 'anomaly'")
        label = int(row["label"] == "anomaly")
        image = root / row["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image {image} does not exist")
        mask: Path | None = None
        if label:
            if not row["mask"]:
                raise ValueError(f"{where}: anomalous image {row['image']} has no mask path")
            mask = root / row["mask"]
            if not mask.is_file():
                raise FileNotFoundError(f"{where}: mask {mask} does not exist")
        samples.append(
            Sample(
                image_path=image,
                label=label,
                mask_path=mask,
                category=category,
                defect_type="anomaly" if label else "good",
                split=split,
            )
        )
    if not samples:
        raise ValueError(f"{csv_path} lists no {split} image for object {category!r}")
    return samples
