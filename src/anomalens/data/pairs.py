"""Image / reference pairs: each image inspected against its own normal reference.

Three sources, each giving :class:`~anomalens.types.Sample` records whose ``reference_path`` is
the image's own reference (golden sample, template, print proof):

* a pairs file (``read_pairs_csv``): CSV with the columns ``image,reference[,mask]``; relative
  paths are taken from the CSV's folder. Unknown columns and missing files are refused before
  any work, naming them.
* a reference folder (``pairs_from_reference_dir``): for each image, the reference with the same
  file name in the reference folder, else the only file there with the same stem (any image
  extension); ``good/001.png`` under ``--images`` looks for ``good/001.png`` under the reference
  folder first (same relative path), then for ``001.*`` at the top of it. An image without a
  reference keeps ``reference_path=None`` (the caller reports it and goes on).
* the DeepPCB layout (``make_pairs_index``, dataset name ``pairs``)::

      <root>/groupN/N/<id>_temp.jpg     the template (defect-free reference)
      <root>/groupN/N/<id>_test.jpg     the test image
      <root>/groupN/N_not/<id>.txt      one defect box per line: x1 y1 x2 y2 type

  Categories are the ``groupN`` folders. Boxes become masks with inclusive corners
  (``load_pair_mask``). There is no ``train`` split: every test image brings its reference.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anomalens.data.io import IMAGE_EXTENSIONS, list_images, load_mask
from anomalens.types import Sample

__all__ = [
    "PAIRS_LAYOUT",
    "load_pair_mask",
    "make_pairs_index",
    "pairs_categories",
    "pairs_from_reference_dir",
    "read_pairs_csv",
]

PAIRS_COLUMNS = ("image", "reference", "mask")
PAIRS_LAYOUT = (
    "<root>/groupN/N/<id>_test.jpg with its template <id>_temp.jpg, and boxes "
    "<root>/groupN/N_not/<id>.txt (x1 y1 x2 y2 type per line)"
)


def read_pairs_csv(path: str | Path) -> list[Sample]:
    """Pairs listed in a CSV file with the columns ``image,reference[,mask]``.

    Raises:
        ValueError: unknown or missing columns, an empty file, or files that do not exist
            (all named, before any work).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise FileNotFoundError(f"pairs file {path}: {exc.strerror or exc}") from None
    rows = list(csv.DictReader(text.splitlines()))
    header = [h.strip() for h in (csv.DictReader(text.splitlines()).fieldnames or [])]
    unknown = [h for h in header if h not in PAIRS_COLUMNS]
    if unknown or "image" not in header or "reference" not in header:
        raise ValueError(
            f"pairs file {path}: columns must be image,reference[,mask]; got "
            f"{','.join(header) or '(none)'}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    if not rows:
        raise ValueError(f"pairs file {path} lists no pair")
    base = path.parent
    samples, missing = [], []
    for i, row in enumerate(rows, start=2):
        vals = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        image, ref = vals.get("image", ""), vals.get("reference", "")
        if not image or not ref:
            raise ValueError(f"pairs file {path}, line {i}: image and reference are both needed")
        ip, rp = base / image, base / ref
        mp = base / vals["mask"] if vals.get("mask") else None
        missing += [f"line {i}: {p}" for p in (ip, rp, mp) if p is not None and not p.is_file()]
        samples.append(Sample(ip, -1 if mp is None else 1, mp, "", "", "test", reference_path=rp))
    if missing:
        shown = "; ".join(missing[:5]) + (
            f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(f"pairs file {path}: {len(missing)} file(s) not found: {shown}")
    return samples


def _reference_for(image: Path, images_root: Path, ref_root: Path) -> Path | None:
    try:
        rel = image.relative_to(images_root)
    except ValueError:
        rel = Path(image.name)
    same = ref_root / rel
    if same.is_file():
        return same
    top = ref_root / image.name
    if top.is_file():
        return top
    stems = [
        p
        for p in ref_root.iterdir()
        if p.stem == image.stem and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ]
    return stems[0] if len(stems) == 1 else None


def pairs_from_reference_dir(
    images: Sequence[Path], images_root: str | Path, reference_dir: str | Path
) -> list[Sample]:
    """Pair each image with its reference in ``reference_dir`` (rule in the module docstring).

    Raises:
        NotADirectoryError: ``reference_dir`` is not a folder.
    """
    ref_root = Path(reference_dir)
    if not ref_root.is_dir():
        raise NotADirectoryError(f"reference folder {ref_root} does not exist or is not a folder")
    root = Path(images_root)
    return [
        Sample(
            Path(p),
            -1,
            None,
            "",
            "",
            "test",
            reference_path=_reference_for(Path(p), root, ref_root),
        )
        for p in images
    ]


def load_pair_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask: a box file (``x1 y1 x2 y2 [type]`` per line, inclusive corners,
    painted) or a mask image (``load_mask``).

    Raises:
        ValueError: a malformed box line (names the file and line).
    """
    path = Path(path)
    if path.suffix.lower() != ".txt":
        return load_mask(path, shape=shape)
    mask = np.zeros(shape, dtype=bool)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        vals = line.replace(",", " ").split()
        if not vals:
            continue
        try:
            x1, y1, x2, y2 = (int(float(v)) for v in vals[:4])
        except ValueError:
            raise ValueError(
                f"{path}, line {n}: expected 'x1 y1 x2 y2 [type]', got {line!r}"
            ) from None
        mask[max(y1, 0) : y2 + 1, max(x1, 0) : x2 + 1] = True
    return mask


def pairs_categories(root: str | Path) -> list[str]:
    """The ``groupN`` folders of a DeepPCB-layout root that hold pairs, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("group") and (p / p.name[5:]).is_dir()
    )


def make_pairs_index(root: str | Path, category: str | None, split: str) -> list[Sample]:
    """Index one group of the DeepPCB layout (``PAIRS_LAYOUT``).

    ``split="train"`` is empty (each test image brings its own reference); ``split="test"``
    gives one Sample per ``*_test.jpg`` with ``reference_path`` its template and ``mask_path``
    its box file (label 1 when the file lists a box, else 0).

    Raises:
        ValueError: unknown group (lists the groups under ``root``) or a group without pairs.
    """
    root = Path(root)
    groups = pairs_categories(root)
    if category not in groups:
        raise ValueError(
            f"category {category!r} not found under {root}. Groups there: "
            f"{', '.join(groups) or '(none; expected layout ' + PAIRS_LAYOUT + ')'}"
        )
    if split == "train":
        return []
    if split != "test":
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    n = category[5:]
    img_dir, box_dir = root / category / n, root / category / f"{n}_not"
    samples = []
    for test in list_images(img_dir):
        if not test.stem.endswith("_test"):
            continue
        ident = test.stem[: -len("_test")]
        ref = next(
            (p for p in img_dir.glob(f"{ident}_temp.*") if p.suffix.lower() in IMAGE_EXTENSIONS),
            None,
        )
        boxes = box_dir / f"{ident}.txt"
        has_box = boxes.is_file() and boxes.read_text(encoding="utf-8").strip() != ""
        samples.append(
            Sample(
                test,
                1 if has_box else 0,
                boxes if boxes.is_file() else None,
                category,
                "defect" if has_box else "good",
                "test",
                reference_path=ref,
            )
        )
    if not samples:
        raise ValueError(f"{img_dir} holds no <id>_test image; expected layout {PAIRS_LAYOUT}")
    return samples
