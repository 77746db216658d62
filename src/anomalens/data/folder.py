"""Generic user folders: normal reference images, query images and optional masks.

Labelling rule for query images (first rule that applies):

1. **Sub-folder names.** Images in a sub-folder of ``query_dir`` named ``good``, ``ok`` or
   ``normal`` are normal (0); in one named ``bad``, ``ko``, ``anomaly``, ``anomalous``,
   ``defect`` or ``defective`` anomalous (1). When a ``good``/``ok``/``normal`` sub-folder
   exists, every other sub-folder is a defect type (1), as in an MVTec ``test/`` folder.
2. **Masks.** If ``mask_dir`` is given, an image whose mask has a non-zero pixel is anomalous
   (1) and an image with an all-zero mask or no mask is normal (0).
3. Otherwise the label is unknown (-1).

A mask is found in ``mask_dir`` (searched recursively) by the image stem plus ``mask_suffix``
(``x.jpg`` -> ``x_mask.<any image extension>``), or failing that by the bare stem; a mask in
the sub-folder of the same name as the image's is preferred. A normal-named image with a
non-empty mask is a contradiction and raises.
"""

from __future__ import annotations

from pathlib import Path

from anomalens.data.io import list_images, load_mask
from anomalens.types import Sample

__all__ = ["ANOMALOUS_FOLDER_NAMES", "NORMAL_FOLDER_NAMES", "make_folder_index"]

NORMAL_FOLDER_NAMES: tuple[str, ...] = ("good", "ok", "normal")
ANOMALOUS_FOLDER_NAMES: tuple[str, ...] = (
    "bad",
    "ko",
    "anomaly",
    "anomalous",
    "defect",
    "defective",
)
FOLDER_LAYOUT = (
    "<query_dir>/*.png (or <query_dir>/{good,bad,<defect>}/*.png), optional "
    "<normal_dir>/*.png and <mask_dir>/<stem><mask_suffix>.png"
)


def list_images_or_raise(folder: Path, what: str, recursive: bool) -> list[Path]:
    """Images of ``folder`` (``list_images``); raise naming ``what`` if it has none."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder} does not exist or is not a folder")
    files = list_images(folder, recursive=recursive)
    if not files:
        others = [p.name for p in folder.iterdir() if not p.name.startswith(".")][:5]
        extra = f" (it holds only: {', '.join(others)})" if others else " (it is empty)"
        raise ValueError(
            f"no image file in {what} {folder}{extra}; expected layout: {FOLDER_LAYOUT}"
        )
    return files


def _mask_lookup(mask_dir: Path) -> tuple[dict[tuple[str, str], Path], dict[str, list[Path]]]:
    """(sub-folder, stem) -> mask and stem -> masks, for every image file under ``mask_dir``."""
    by_sub: dict[tuple[str, str], Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for p in list_images(mask_dir, recursive=True):
        sub = p.parent.relative_to(mask_dir).as_posix()
        by_sub[(sub, p.stem)] = p
        by_stem.setdefault(p.stem, []).append(p)
    return by_sub, by_stem


def _find_mask(
    img: Path,
    sub: str,
    suffix: str,
    by_sub: dict[tuple[str, str], Path],
    by_stem: dict[str, list[Path]],
) -> Path | None:
    for stem in dict.fromkeys((img.stem + suffix, img.stem)):
        if (sub, stem) in by_sub:
            return by_sub[(sub, stem)]
        hits = by_stem.get(stem, [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ValueError(
                f"ambiguous mask for {img}: {', '.join(map(str, hits))}; put masks in a "
                f"sub-folder named like the image's ({sub!r})"
            )
    return None


def _folder_label(sub: str, subs: list[str]) -> int:
    """Label implied by the sub-folder name ``sub`` (rule 1), -1 if none."""
    name = sub.split("/")[0].lower()
    if not name or name == ".":
        return -1
    if name in NORMAL_FOLDER_NAMES:
        return 0
    if name in ANOMALOUS_FOLDER_NAMES:
        return 1
    if any(s.lower() in NORMAL_FOLDER_NAMES for s in subs):
        return 1
    return -1


def make_folder_index(
    query_dir: str | Path,
    normal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    mask_suffix: str = "_mask",
    category: str = "",
) -> list[Sample]:
    """Index user folders: normal references (split ``train``) then queries (split ``test``).

    Args:
        query_dir: images to score; searched recursively (sub-folders may carry labels).
        normal_dir: optional defect-free reference images (label 0), searched recursively.
        mask_dir: optional ground-truth masks (see the module docstring for pairing).
        mask_suffix: suffix of a mask's stem after the image stem.
        category: category name stored in every sample.

    Returns:
        Normal samples (``split="train"``, label 0) followed by query samples
        (``split="test"``, label from the rule in the module docstring).

    Raises:
        FileNotFoundError: a given folder does not exist.
        ValueError: a folder has no image, ambiguous or contradictory masks.
    """
    query_dir = Path(query_dir)
    samples: list[Sample] = []
    if normal_dir is not None:
        for img in list_images_or_raise(Path(normal_dir), "normal folder", recursive=True):
            samples.append(Sample(img, 0, None, category, "good", "train"))
    queries = list_images_or_raise(query_dir, "query folder", recursive=True)
    by_sub: dict[tuple[str, str], Path] = {}
    by_stem: dict[str, list[Path]] = {}
    if mask_dir is not None:
        mask_dir = Path(mask_dir)
        if not mask_dir.is_dir():
            raise FileNotFoundError(f"mask folder {mask_dir} does not exist or is not a folder")
        by_sub, by_stem = _mask_lookup(mask_dir)
    subs = sorted(
        {q.parent.relative_to(query_dir).parts[0] for q in queries if q.parent != query_dir}
    )
    for img in queries:
        sub = img.parent.relative_to(query_dir).as_posix()
        label = _folder_label(sub, subs)
        mask = None
        if mask_dir is not None:
            mask = _find_mask(img, sub, mask_suffix, by_sub, by_stem)
            has_defect = mask is not None and bool(load_mask(mask).any())
            if label == 0 and has_defect:
                raise ValueError(
                    f"{img} lies in a normal folder ({sub!r}) but its mask {mask} marks a defect"
                )
            if label == -1:
                label = int(has_defect)
        defect = "" if sub == "." else sub.split("/")[0]
        samples.append(Sample(img, label, mask, category, defect, "test"))
    return samples
