"""Read and write ``meta.json`` index files (the AnomalyCLIP / AdaptCLIP / MuSc format).

Format (paths relative to the folder holding ``meta.json``, 4-space indentation)::

    {"train": {"<cls_name>": [{"img_path": "bottle/train/good/000.png", "mask_path": "",
                                "cls_name": "bottle", "specie_name": "good", "anomaly": 0}]},
     "test":  {"<cls_name>": [{"img_path": "bottle/test/broken_large/000.png",
                                "mask_path": "bottle/ground_truth/broken_large/000_mask.png",
                                "cls_name": "bottle", "specie_name": "broken_large", "anomaly": 1}]}}

``mask_path`` is ``""`` for normal images; ``anomaly`` is 0 or 1. Extra keys (AdaptCLIP's
``view_id``) are ignored when reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from anomalens.types import Sample

__all__ = ["META_NAME", "MetaIndex", "read_meta_json", "write_meta_json"]

META_NAME = "meta.json"
#: split -> class name -> samples.
MetaIndex = dict[str, dict[str, list[Sample]]]


def _meta_file(path_or_root: str | Path) -> Path:
    p = Path(path_or_root)
    return p / META_NAME if p.is_dir() else p


def read_meta_json(path_or_root: str | Path, check_files: bool = True) -> MetaIndex:
    """Read a ``meta.json`` into ``{split: {cls_name: [Sample, ...]}}``.

    Args:
        path_or_root: the ``meta.json`` file or the dataset root that holds it.
        check_files: raise if a listed image or mask does not exist.

    Returns:
        Samples with absolute-or-root-relative paths joined onto the file's folder; ``train``
        and ``test`` keys are always present (possibly empty: a loader that needs reference
        images must refuse an empty ``train`` rather than fall back to ``test``).

    Raises:
        FileNotFoundError: no ``meta.json`` or a listed file is missing.
        ValueError: malformed JSON or entries (the message names the file and the entry).
    """
    path = _meta_file(path_or_root)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; expected a meta.json with "
            '{"train": {cls: [entries]}, "test": {cls: [entries]}}'
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be an object with 'train' and 'test' keys")
    unknown = sorted(set(data) - {"train", "test"})
    if unknown:
        raise ValueError(f"{path}: unknown split(s) {unknown}; expected 'train' and 'test'")
    root = path.parent
    out: MetaIndex = {"train": {}, "test": {}}
    for split, classes in data.items():
        if not isinstance(classes, dict):
            raise ValueError(f"{path}: {split!r} must map class names to lists of entries")
        for cls, entries in classes.items():
            out[split][cls] = [
                _entry_to_sample(e, root, split, cls, f"{path} [{split}][{cls}][{i}]", check_files)
                for i, e in enumerate(entries)
            ]
    return out


def _entry_to_sample(
    entry: Any, root: Path, split: str, cls: str, where: str, check_files: bool
) -> Sample:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: entry must be an object, got {type(entry).__name__}")
    missing = [k for k in ("img_path", "anomaly") if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    anomaly = entry["anomaly"]
    if anomaly not in (0, 1) or isinstance(anomaly, bool):
        raise ValueError(f"{where}: 'anomaly' must be 0 or 1, got {anomaly!r}")
    image = root / entry["img_path"]
    mask = root / entry["mask_path"] if entry.get("mask_path") else None
    if anomaly == 1 and mask is None:
        raise ValueError(f"{where}: anomalous image {entry['img_path']} has an empty mask_path")
    if check_files:
        for p in (image, mask):
            if p is not None and not p.is_file():
                raise FileNotFoundError(f"{where}: {p} does not exist")
    return Sample(
        image_path=image,
        label=int(anomaly),
        mask_path=mask,
        category=str(entry.get("cls_name", cls)),
        defect_type=str(entry.get("specie_name", "")),
        split=split,
    )


def _rel(path: Path, root: Path) -> str:
    try:
        rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
    except ValueError as exc:  # different drive on Windows
        raise ValueError(f"{path} cannot be written relative to {root}") from exc
    if rel.parts and rel.parts[0] == "..":
        raise ValueError(
            f"{path} lies outside the dataset root {root}; meta.json paths are relative"
        )
    return rel.as_posix()


def write_meta_json(root: str | Path, index: MetaIndex, path: str | Path | None = None) -> Path:
    """Write ``index`` as ``<root>/meta.json`` (or ``path``) in the official format.

    Args:
        root: dataset root; every image and mask must lie under it.
        index: ``{split: {cls_name: [Sample, ...]}}`` with splits ``train``/``test``; both
            keys are written even when absent from ``index``.
        path: output file (default ``<root>/meta.json``).

    Returns:
        The written file.

    Raises:
        ValueError: a label other than 0/1, an anomalous sample without mask, or a path
            outside ``root``.
    """
    root = Path(root)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {"train": {}, "test": {}}
    for split, classes in index.items():
        if split not in out:
            raise ValueError(f"unknown split {split!r}; meta.json holds 'train' and 'test'")
        for cls, samples in classes.items():
            rows = []
            for s in samples:
                if s.label not in (0, 1):
                    raise ValueError(
                        f"{s.image_path}: label {s.label} cannot be written (0/1 only)"
                    )
                if s.label == 1 and s.mask_path is None:
                    raise ValueError(f"{s.image_path}: anomalous sample without mask_path")
                rows.append(
                    {
                        "img_path": _rel(s.image_path, root),
                        "mask_path": _rel(s.mask_path, root)
                        if s.label == 1 and s.mask_path
                        else "",
                        "cls_name": s.category or cls,
                        "specie_name": s.defect_type,
                        "anomaly": int(s.label),
                    }
                )
            out[split][cls] = rows
    target = Path(path) if path is not None else root / META_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=4)
    return target
