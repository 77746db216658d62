"""MVTec AD and MPDD readers (and the shared "MVTec-like" folder logic used by BTAD and VisA).

Layout::

    <root>/<category>/train/good/NNN.png
    <root>/<category>/test/good/NNN.png
    <root>/<category>/test/<defect_type>/NNN.png
    <root>/<category>/ground_truth/<defect_type>/NNN_mask.png

Images and masks are paired by file stem (``NNN`` <-> ``NNN_mask``, any image extension; a mask
with the image's own stem ``NNN`` is accepted too, as in the prepared VisA layout), never by
sorted position. A defective image without a mask is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anomalens.data.io import list_images
from anomalens.types import Sample

__all__ = [
    "MPDD_CATEGORIES",
    "MVTEC_CATEGORIES",
    "SPLITS",
    "make_mpdd_index",
    "make_mvtec_index",
]

#: The 15 MVTec AD categories (documentation; readers discover categories from disk).
MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
#: The 6 MPDD categories (MVTec layout).
MPDD_CATEGORIES: tuple[str, ...] = (
    "bracket_black",
    "bracket_brown",
    "bracket_white",
    "connector",
    "metal_plate",
    "tubes",
)
SPLITS: tuple[str, ...] = ("train", "test")

MVTEC_LAYOUT = (
    "<root>/<category>/train/good/*.png, <root>/<category>/test/{good,<defect>}/*.png, "
    "<root>/<category>/ground_truth/<defect>/<stem>_mask.png"
)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def _is_category_dir(path: Path) -> bool:
    """True if ``path`` holds a ``train`` or ``test`` folder (an MVTec-like category)."""
    return path.is_dir() and any((path / s).is_dir() for s in SPLITS)


def find_category_dirs(root: str | Path) -> list[str]:
    """Names of the MVTec-like categories under ``root`` (sub-folders with train/ or test/).

    If ``root`` is itself a category folder (it holds train/ or test/ and no category
    sub-folder), its own name is returned.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    names = sorted(
        p.name for p in root.iterdir() if not p.name.startswith(".") and _is_category_dir(p)
    )
    if not names and _is_category_dir(root):
        return [root.name]
    return names


def resolve_category_dir(
    root: str | Path, category: str | None, dataset: str, layout: str
) -> tuple[Path, str]:
    """Folder of ``category`` under ``root`` and the category name.

    ``root`` may be the dataset root (``<root>/<category>/train``) or one category folder itself
    (``category`` None, empty or equal to the folder's name).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: the category does not exist; the message lists those that do.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{dataset} root {root} does not exist or is not a folder; expected layout: {layout}"
        )
    if category and (root / category).is_dir():
        return root / category, category
    if (not category or category == root.name) and _is_category_dir(root):
        return root, root.name
    found = find_category_dirs(root)
    raise ValueError(
        f"category {category!r} not found under {dataset} root {root}. "
        f"Categories there: {', '.join(found) if found else '(none: expected layout ' + layout + ')'}"
    )


def index_masks(mask_dir: Path) -> dict[str, Path]:
    """Map file stem -> mask path for the image files of ``mask_dir`` (empty if it is absent)."""
    if not mask_dir.is_dir():
        return {}
    return {p.stem: p for p in list_images(mask_dir)}


def find_mask(
    stem: str, masks: dict[str, Path], suffixes: Sequence[str] = ("_mask", "")
) -> Path | None:
    """The mask of the image ``stem``: first ``stem + suffix`` found, any extension."""
    for suf in suffixes:
        hit = masks.get(stem + suf)
        if hit is not None:
            return hit
    return None


def make_mvtec_like_index(
    root: str | Path,
    category: str | None,
    split: str,
    *,
    normal_names: Sequence[str] = ("good",),
    dataset: str = "mvtec",
    layout: str = MVTEC_LAYOUT,
    mask_suffixes: Sequence[str] = ("_mask", ""),
) -> list[Sample]:
    """Index one split of an MVTec-like category (shared by MVTec, MPDD, BTAD, prepared VisA).

    Every sub-folder of ``<category>/<split>`` is a defect type; its images are normal (label 0)
    iff its name is in ``normal_names``. Anomalous images take their mask from
    ``<category>/ground_truth/<defect_type>/`` by stem (see ``mask_suffixes``).

    Returns:
        Samples sorted by defect folder then file name.

    Raises:
        FileNotFoundError: missing root, split folder or mask of a defective image.
        ValueError: unknown category or split, or no image in the split.
    """
    check_split(split)
    cat_dir, cat = resolve_category_dir(root, category, dataset, layout)
    split_dir = cat_dir / split
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"{dataset} category folder {cat_dir} has no {split}/ folder; expected layout: {layout}"
        )
    subdirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples: list[Sample] = []
    for sub in subdirs:
        defect = sub.name
        is_normal = defect in normal_names
        masks = {} if is_normal else index_masks(cat_dir / "ground_truth" / defect)
        for img in list_images(sub):
            mask: Path | None = None
            if not is_normal:
                mask = find_mask(img.stem, masks, mask_suffixes)
                if mask is None:
                    wanted = " or ".join(f"{img.stem}{s}.<ext>" for s in mask_suffixes)
                    raise FileNotFoundError(
                        f"no mask for defective image {img}: looked for {wanted} in "
                        f"{cat_dir / 'ground_truth' / defect}; expected layout: {layout}"
                    )
            samples.append(
                Sample(
                    image_path=img,
                    label=0 if is_normal else 1,
                    mask_path=mask,
                    category=cat,
                    defect_type=defect,
                    split=split,
                )
            )
    if not samples:
        loose = list_images(split_dir)
        hint = (
            f" ({len(loose)} image(s) lie directly in it; put them in a sub-folder such as "
            f"{split_dir / normal_names[0]})"
            if loose
            else ""
        )
        raise ValueError(f"no image found in {split_dir}{hint}; expected layout: {layout}")
    return samples


def make_mvtec_index(root: str | Path, category: str | None, split: str) -> list[Sample]:
    """Index one split of an MVTec AD category (``train`` or ``test``).

    Args:
        root: dataset root holding ``<category>/`` folders, or one category folder itself.
        category: category name (None/"" when ``root`` is the category folder).
        split: ``train`` or ``test``.

    Returns:
        Samples with label 1 iff the defect folder is not ``good``; anomalous samples carry
        their mask path (paired by stem, ``NNN`` <-> ``NNN_mask``).
    """
    return make_mvtec_like_index(root, category, split, dataset="MVTec AD")


def make_mpdd_index(root: str | Path, category: str | None, split: str) -> list[Sample]:
    """Index one split of an MPDD category (MVTec layout, see ``make_mvtec_index``)."""
    return make_mvtec_like_index(root, category, split, dataset="MPDD")
