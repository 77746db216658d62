"""Registry from dataset names to index readers.

``list_datasets()``, ``list_categories(dataset, root)`` (discovered on disk),
``get_index(dataset, root, category, split)`` and ``build_index`` (every category and split, the
structure ``write_meta_json`` takes). Known category lists are kept as data, for documentation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from anomalens.data.btad import BTAD_CATEGORIES, make_btad_index
from anomalens.data.folder import list_images_or_raise, make_folder_index
from anomalens.data.meta import MetaIndex
from anomalens.data.mvtec import (
    MPDD_CATEGORIES,
    MVTEC_CATEGORIES,
    SPLITS,
    check_split,
    find_category_dirs,
    make_mpdd_index,
    make_mvtec_index,
)
from anomalens.data.pairs import make_pairs_index, pairs_categories
from anomalens.data.visa import VISA_CATEGORIES, make_visa_index, visa_categories
from anomalens.types import Sample

__all__ = [
    "KNOWN_CATEGORIES",
    "build_index",
    "get_index",
    "list_categories",
    "list_datasets",
    "make_folder_dataset_index",
]

IndexFn = Callable[[str | Path, str | None, str], list[Sample]]

#: Categories of the official releases (documentation only; readers look at the disk).
KNOWN_CATEGORIES: dict[str, tuple[str, ...]] = {
    "btad": BTAD_CATEGORIES,
    "folder": (),
    "mpdd": MPDD_CATEGORIES,
    "mvtec": MVTEC_CATEGORIES,
    "pairs": (),
    "visa": VISA_CATEGORIES,
}

_FOLDER_NAMES = {
    "train": ("normal", "train"),
    "test": ("query", "test"),
    "mask": ("masks", "ground_truth"),
}
FOLDER_DATASET_LAYOUT = (
    "<root>/<category>/normal/*.png (references, optional), <root>/<category>/query/*.png "
    "(or query/{good,bad}/...), <root>/<category>/masks/<stem>_mask.png (optional); "
    "train/, test/, ground_truth/ are accepted in place of normal/, query/, masks/"
)


def _first_dir(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_dir()), None)


def _is_folder_category(path: Path) -> bool:
    return path.is_dir() and any(
        (path / n).is_dir() for n in _FOLDER_NAMES["train"] + _FOLDER_NAMES["test"]
    )


def _folder_categories(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    names = sorted(
        p.name for p in root.iterdir() if not p.name.startswith(".") and _is_folder_category(p)
    )
    if not names and _is_folder_category(root):
        return [root.name]
    return names


def make_folder_dataset_index(root: str | Path, category: str | None, split: str) -> list[Sample]:
    """Index the ``folder`` dataset layout (see ``FOLDER_DATASET_LAYOUT``) via ``make_folder_index``.

    ``split="train"`` gives the normal references (``[]`` when the category has no
    ``normal/`` folder: zero-shot use), ``split="test"`` the labelled or unlabelled queries.
    """
    check_split(split)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"folder root {root} does not exist; expected layout: {FOLDER_DATASET_LAYOUT}"
        )
    if category and (root / category).is_dir():
        cat_dir, cat = root / category, category
    elif (not category or category == root.name) and _is_folder_category(root):
        cat_dir, cat = root, root.name
    else:
        found = _folder_categories(root)
        raise ValueError(
            f"category {category!r} not found under folder root {root}. Categories there: "
            f"{', '.join(found) if found else '(none: expected layout ' + FOLDER_DATASET_LAYOUT + ')'}"
        )
    normal = _first_dir(cat_dir, _FOLDER_NAMES["train"])
    if split == "train":
        if normal is None:
            return []
        return [
            Sample(p, 0, None, cat, "good", "train")
            for p in list_images_or_raise(normal, "normal folder", recursive=True)
        ]
    query = _first_dir(cat_dir, _FOLDER_NAMES["test"])
    if query is None:
        raise FileNotFoundError(
            f"{cat_dir} has no query/ (or test/) folder; expected layout: {FOLDER_DATASET_LAYOUT}"
        )
    masks = _first_dir(cat_dir, _FOLDER_NAMES["mask"])
    return make_folder_index(query, mask_dir=masks, category=cat)


_READERS: dict[str, IndexFn] = {
    "btad": make_btad_index,
    "folder": make_folder_dataset_index,
    "mpdd": make_mpdd_index,
    "mvtec": make_mvtec_index,
    "pairs": make_pairs_index,
    "visa": make_visa_index,
}


def list_datasets() -> list[str]:
    """Names of the supported dataset layouts, sorted."""
    return sorted(_READERS)


def _reader(dataset: str) -> IndexFn:
    key = dataset.lower()
    if key not in _READERS:
        raise ValueError(f"unknown dataset {dataset!r}. Available: {', '.join(list_datasets())}")
    return _READERS[key]


def list_categories(dataset: str, root: str | Path) -> list[str]:
    """Categories of ``dataset`` present under ``root`` (sorted; ``[]`` if none or no root)."""
    key = dataset.lower()
    _reader(key)
    root = Path(root)
    if key == "visa":
        return visa_categories(root)
    if key == "folder":
        return _folder_categories(root)
    if key == "pairs":
        return pairs_categories(root)
    return find_category_dirs(root)


def get_index(dataset: str, root: str | Path, category: str | None, split: str) -> list[Sample]:
    """Index one split (``train``/``test``) of one category of ``dataset`` under ``root``.

    Raises:
        ValueError: unknown dataset (lists the available ones), unknown category (lists the
            categories under ``root``), unknown split or empty split.
        FileNotFoundError: missing root or files, with the expected layout in the message.
    """
    return _reader(dataset)(root, category, split)


def build_index(
    dataset: str,
    root: str | Path,
    categories: Sequence[str] | None = None,
    splits: Sequence[str] = SPLITS,
) -> MetaIndex:
    """``{split: {category: [Sample, ...]}}`` for all (or the given) categories.

    Raises:
        ValueError: ``root`` holds no category of ``dataset``.
    """
    cats = list(categories) if categories is not None else list_categories(dataset, root)
    if not cats:
        raise ValueError(f"no {dataset} category found under {root}")
    return {s: {c: get_index(dataset, root, c, s) for c in cats} for s in splits}
