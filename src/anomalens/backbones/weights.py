"""The one place where every weight file of anomalens is resolved.

A weight source is one of:

* a local file path (``/models/mobilenet_v2.safetensors``, ``~/ckpt.pth``);
* an ``http(s)://`` (or ``file://``) URL, downloaded once into the cache folder;
* an ``hf-hub:ORG/REPO/FILE`` id (``hf-hub:ORG/REPO`` alone means ``open_clip_model.safetensors``),
  fetched with ``huggingface_hub`` into the cache;
* a name from the catalogue (``anomalens weights list``): a short alias that maps to one of the above.

Offline mode (``ANOMALENS_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``) never
touches the network: a source that is not on disk and not cached fails with an error that names
the file, the cache folder and the command that fetches it on a connected machine.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from anomalens.backbones.weight_spec import WeightSpec
from anomalens.fileio import current_umask

__all__ = [
    "WeightNotAvailableError",
    "WeightSpec",
    "cache_dir",
    "is_offline",
    "names_in_cache_only",
    "read_checkpoint",
    "read_safetensors",
    "resolve_weights",
    "sha256_file",
]


class WeightNotAvailableError(FileNotFoundError):
    """A weight file is neither on disk nor in the cache and cannot be fetched."""


#: When set (``names_in_cache_only``), a weight source that is not a catalogue name, URL or
#: hf-hub id must be a bare file name, and it is looked up in the cache folder only.
_CACHE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "anomalens_weights_cache_only", default=False
)


@contextlib.contextmanager
def names_in_cache_only() -> Iterator[None]:
    """Within this block (this thread), weight *names* resolve in the cache folder only: never
    in the working directory, never a path. The service builds client-configured detectors so.
    """
    token = _CACHE_ONLY.set(True)
    try:
        yield
    finally:
        _CACHE_ONLY.reset(token)


def _cache_only_file(src: str, cache_path: Path) -> Path:
    if Path(src).name != src or src in ("", ".", ".."):
        raise WeightNotAvailableError(
            f"weights {src!r} must be a file name in the weight cache, not a path"
        )
    cached = cache_path / src
    if not cached.is_file():
        raise WeightNotAvailableError(
            f"weights file {src!r} is not in the weight cache (ANOMALENS_CACHE); put it there "
            "with `anomalens weights unpack`, or use a name from `anomalens weights list`"
        )
    return cached


def is_offline() -> bool:
    """True when any of the usual offline switches is set."""
    for var in ("ANOMALENS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def cache_dir() -> Path:
    """Cache folder: ``$ANOMALENS_CACHE`` or ``$XDG_CACHE_HOME/anomalens`` (``~/.cache/anomalens``)."""
    env = os.environ.get("ANOMALENS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "anomalens"


def sha256_file(path: Path) -> str:
    """Hex sha256 digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _not_available(what: str, cached: Path, reason: str) -> WeightNotAvailableError:
    return WeightNotAvailableError(
        f"weights {what!r} are not available: {reason}. Looked for {cached} "
        f"(cache folder {cached.parent}, set ANOMALENS_CACHE to change it). On a machine with "
        f"internet run `anomalens weights download {what} --to DIR`, copy DIR here (or "
        "`anomalens weights pack DIR --out bundle.tar` / `anomalens weights unpack bundle.tar`), "
        "or pass a local file path instead."
    )


def _copy_atomic(src: BinaryIO, dest: Path) -> None:
    """Copy a readable binary stream into ``dest`` via a temporary file + ``os.replace``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(src, f)
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # not mkstemp's 0600
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download_url(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as r:
        _copy_atomic(r, dest)


def _split_hf(source: str) -> tuple[str, str]:
    rest = source[len("hf-hub:") :].strip("/")
    parts = rest.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"hf-hub id must not contain empty, '.' or '..' parts, got {source!r}")
    if len(parts) < 2:
        raise ValueError(f"hf-hub id must be hf-hub:ORG/REPO[/FILE], got {source!r}")
    repo = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or "open_clip_model.safetensors"
    return repo, filename


def _catalogue() -> dict[str, WeightSpec]:
    from anomalens.backbones.catalogue import WEIGHTS

    return {w.name: w for w in WEIGHTS}


def resolve_weights(
    source: str | os.PathLike[str],
    *,
    cache: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
) -> Path:
    """Return a local path for ``source``, downloading into the cache when allowed.

    Args:
        source: local path, URL, ``hf-hub:`` id or catalogue name (see module doc).
        cache: cache folder (default ``cache_dir()``).
        offline: force offline (default: from the environment).

    Raises:
        WeightNotAvailableError: not on disk, not cached, and offline or the fetch failed.
    """
    offline = is_offline() if offline is None else offline
    cache_path = Path(cache).expanduser() if cache is not None else cache_dir()
    src = os.fspath(source)
    sha: str | None = None
    name = src

    catalogue = _catalogue()
    if src in catalogue:
        spec = catalogue[src]
        src, sha = spec.source, spec.sha256
        cached = cache_path / spec.filename
    elif src.startswith("hf-hub:"):
        repo, filename = _split_hf(src)
        cached = cache_path / "hf" / repo.replace("/", "--") / filename
    elif src.startswith(("http://", "https://", "file://")):
        fname = Path(urllib.parse.urlparse(src).path).name or "weights.bin"
        cached = cache_path / "url" / hashlib.sha1(src.encode()).hexdigest()[:12] / fname
    elif _CACHE_ONLY.get():
        return _cache_only_file(src, cache_path)
    else:
        path = Path(src).expanduser()
        if path.is_file():
            return path
        # a bare file name may already sit in the cache folder (e.g. after `weights unpack`)
        if path.name == src and (cache_path / src).is_file():
            return cache_path / src
        raise WeightNotAvailableError(
            f"weights file {path} does not exist (also looked in the cache folder {cache_path}). "
            "Pass the path of a downloaded checkpoint, or a name from `anomalens weights list`."
        )

    if cached.is_file():
        if sha is not None and sha256_file(cached) != sha:
            raise _not_available(name, cached, "the cached file has the wrong sha256 (delete it)")
        return cached
    if offline:
        raise _not_available(name, cached, "offline mode is on and the file is not cached")
    try:
        if src.startswith("hf-hub:"):
            try:
                from huggingface_hub import hf_hub_download
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise _not_available(name, cached, "huggingface_hub is not installed") from exc
            repo, filename = _split_hf(src)
            got = Path(hf_hub_download(repo, filename))
            with open(got, "rb") as f:
                _copy_atomic(f, cached)
        else:
            _download_url(src, cached)
    except WeightNotAvailableError:
        raise
    except Exception as exc:
        raise _not_available(name, cached, f"download failed ({exc})") from exc
    if sha is not None and sha256_file(cached) != sha:
        cached.unlink()
        raise _not_available(name, cached, "downloaded file has the wrong sha256")
    return cached


def read_safetensors(
    path: str | os.PathLike[str], what: str = "checkpoint", *, with_metadata: bool = False
) -> Any:
    """Read a ``.safetensors`` file on the CPU; a corrupt one raises an error naming it.

    Returns:
        ``{name: tensor}``, or ``(tensors, metadata)`` with ``with_metadata``.

    Raises:
        ValueError: the file is truncated, not safetensors, or unreadable (names the file).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"cannot read {what} {path}: not a valid safetensors file ({exc}); "
            "download or copy it again"
        ) from exc
    return (tensors, meta) if with_metadata else tensors


def read_checkpoint(path: str | os.PathLike[str], what: str) -> tuple[dict, dict[str, str]]:
    """Read a checkpoint file safely: ``.safetensors``, or a torch pickle with
    ``torch.load(weights_only=True)`` (tensors and plain containers only, no code).

    Args:
        path: the file.
        what: what the file should hold, for error messages (e.g. "AdaptCLIP checkpoint").

    Returns:
        (top-level mapping as stored, safetensors metadata or ``{}``), on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or its top level is not a mapping.
    """
    import torch

    if _CACHE_ONLY.get():
        path = _cache_only_file(os.fspath(path), cache_dir())
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path, what, with_metadata=True)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read {what} {path} with torch.load(weights_only=True): {exc}"
        ) from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what} {path} holds a {type(obj).__name__}, not a dict")
    return dict(obj), {}
