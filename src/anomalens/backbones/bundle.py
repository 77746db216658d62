"""Weight bundles for machines without internet.

``pack`` turns a folder of weight files into one tar with a ``MANIFEST.json`` (file names, sizes,
sha256); ``unpack`` checks every file against the manifest and places it in the cache folder,
where ``resolve_weights`` finds it (by catalogue name, hf-hub id or URL as laid out by
``anomalens weights download``, or by bare file name).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, cast

from anomalens.backbones.weights import sha256_file
from anomalens.fileio import current_umask

__all__ = ["BundleError", "pack_weights", "unpack_weights"]

MANIFEST = "MANIFEST.json"


class BundleError(ValueError):
    """A bundle is malformed, tampered with or unsafe."""


def pack_weights(folder: str | Path, out: str | Path) -> Path:
    """Pack every file under ``folder`` into the tar ``out`` with a manifest."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FileNotFoundError(f"weights folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    if not files:
        raise ValueError(f"weights folder {folder} holds no file to pack")
    manifest = {
        "format": "anomalens-weights-bundle/1",
        "files": [
            {
                "path": p.relative_to(folder).as_posix(),
                "size": p.stat().st_size,
                "sha256": sha256_file(p),
            }
            for p in files
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            data = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for p in files:
                # the file's content, also when ``p`` is a link (e.g. a Hugging Face snapshot)
                with open(p, "rb") as f:
                    info = tar.gettarinfo(arcname=p.relative_to(folder).as_posix(), fileobj=f)
                    tar.addfile(info, f)
        os.chmod(tmp, 0o666 & ~current_umask())  # not mkstemp's 0600
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _safe_member(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise BundleError(f"unsafe path in bundle: {name!r}")
    return p


def _copy_capped(src: BinaryIO, dest: Path, size: int, name: str) -> str:
    """Copy at most ``size`` bytes in 1 MiB chunks; returns the sha256 of what was copied."""
    h = hashlib.sha256()
    written = 0
    with open(dest, "wb") as dst:
        while chunk := src.read(min(1 << 20, size - written + 1)):
            written += len(chunk)
            if written > size:
                raise BundleError(
                    f"bundle member {name!r} is longer than its declared {size} bytes"
                )
            h.update(chunk)
            dst.write(chunk)
    if written != size:
        raise BundleError(f"bundle member {name!r} holds {written} bytes, not {size}")
    return h.hexdigest()


def unpack_weights(bundle: str | Path, dest: str | Path) -> list[Path]:
    """Verify and extract a bundle into ``dest`` (normally the cache folder).

    Raises:
        BundleError: missing manifest, unsafe member path, link member, size/sha256 mismatch.
    """
    bundle, dest = Path(bundle), Path(dest)
    if not bundle.is_file():
        raise FileNotFoundError(f"bundle {bundle} does not exist")
    written: list[Path] = []
    with tarfile.open(bundle, "r") as tar:
        try:
            manifest = json.load(tar.extractfile(MANIFEST))  # type: ignore[arg-type]
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise BundleError(
                f"{bundle} is not an anomalens weights bundle (no valid {MANIFEST})"
            ) from exc
        entries = {e["path"]: e for e in manifest.get("files", [])}
        with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.exists() else None) as td:
            staged = []
            for m in tar.getmembers():
                if m.name == MANIFEST:
                    continue
                rel = _safe_member(m.name)
                if not m.isfile():
                    raise BundleError(f"bundle member {m.name!r} is not a regular file")
                if m.name not in entries:
                    raise BundleError(f"bundle member {m.name!r} is not in the manifest")
                e = entries[m.name]
                size = e.get("size")
                if not isinstance(size, int) or size < 0 or m.size != size:
                    # checked before a byte is written: a member cannot fill the disk
                    raise BundleError(
                        f"bundle member {m.name!r} is {m.size} bytes but its manifest says {size!r}"
                    )
                tmp = Path(td) / rel
                tmp.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src:  # type: ignore[union-attr]
                    digest = _copy_capped(cast(BinaryIO, src), tmp, size, m.name)
                if digest != e.get("sha256"):
                    raise BundleError(
                        f"bundle member {m.name!r} does not match its manifest checksum"
                    )
                staged.append((tmp, dest / rel))
            missing = set(entries) - {str(PurePosixPath(t.relative_to(td))) for t, _ in staged}
            if missing:
                raise BundleError(f"bundle lacks files listed in its manifest: {sorted(missing)}")
            for tmp, final in staged:
                final.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(tmp, final)
                written.append(final)
    return written
