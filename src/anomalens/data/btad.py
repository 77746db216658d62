"""BTAD (BeanTech Anomaly Detection, "btech" in anomalib) reader.

Layout::

    <root>/<01|02|03>/train/ok/*.{bmp,png}
    <root>/<01|02|03>/test/ok/*.{bmp,png}
    <root>/<01|02|03>/test/ko/*.{bmp,png}
    <root>/<01|02|03>/ground_truth/ko/*.{png,bmp}

Extensions are mixed in the release: an image and its mask are paired by stem, ignoring the
extension (``0001.bmp`` <-> ``0001.png``; a ``0001_mask.*`` mask is accepted too).
"""

from __future__ import annotations

from pathlib import Path

from anomalens.data.mvtec import make_mvtec_like_index
from anomalens.types import Sample

__all__ = ["BTAD_CATEGORIES", "make_btad_index"]

#: The 3 BTAD products (documentation; readers discover categories from disk).
BTAD_CATEGORIES: tuple[str, ...] = ("01", "02", "03")

BTAD_LAYOUT = (
    "<root>/<01|02|03>/train/ok/*.{bmp,png}, <root>/<product>/test/{ok,ko}/*.{bmp,png}, "
    "<root>/<product>/ground_truth/ko/<stem>.{png,bmp}"
)


def make_btad_index(root: str | Path, category: str | None, split: str) -> list[Sample]:
    """Index one split of a BTAD product (``train`` or ``test``).

    Args:
        root: dataset root (often ``BTech_Dataset_transformed``) or one product folder.
        category: product name (``01``, ``02``, ``03``).
        split: ``train`` or ``test``.

    Returns:
        Samples with label 1 iff the folder is not ``ok`` (i.e. ``ko``); masks paired by stem.
    """
    return make_mvtec_like_index(
        root,
        category,
        split,
        normal_names=("ok",),
        dataset="BTAD",
        layout=BTAD_LAYOUT,
        mask_suffixes=("", "_mask"),
    )
