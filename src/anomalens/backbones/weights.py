"""The one place where every weight file of anomalens is resolved.

A weight source is one of:

* a local file path (``/models/mobilenet_v2.safetensors``, ``~/ckpt.pth``);
* an ``http(s)://`` (or ``file://``) URL, downloaded once into the cache folder;
* an ``hf-hub:ORG/REPO/FILE`` id (``hf-hub:ORG/REPO`` alone means ``open_clip_model.safetensors``),
  fetched with ``huggingface_hub`` into the cache;
* a name from the catalogue (``anomalens weights list``): a short alias that maps to one of the above.

Offline mode (``ANOMALENS_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``) never
touches the network: a source that is not on disk and not cached fails with an error that names
the file, the cache folder and the command that fetches it on a connected machine. Without the
switch, the server is probed once (``ANOMALENS_CONNECT_TIMEOUT`` seconds, default 3) before any
download, so a machine without network fails as fast, with the same message, instead of
retrying for a minute.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import shutil
import socket
import tempfile
import threading
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
    "check_reachable",
    "check_weight_file",
    "connect_timeout",
    "git_blob_sha1_file",
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


def git_blob_sha1_file(path: Path) -> str:
    """Git blob id of a file: sha1 of ``b"blob <size>\\0"`` + content (``git hash-object``)."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest_mismatch(path: Path, spec: WeightSpec | None) -> str | None:
    """Why ``path`` does not match the digests ``spec`` pins (None: it matches or none pinned)."""
    if spec is None:
        return None
    if spec.sha256 is not None and sha256_file(path) != spec.sha256:
        return f"sha256 is not {spec.sha256}"
    if spec.git_blob_sha1 is not None:
        got = git_blob_sha1_file(path)
        if got != spec.git_blob_sha1:
            return f"git blob id is {got}, not {spec.git_blob_sha1}"
    return None


def connect_timeout() -> float:
    """Seconds to wait for a server before a download (``ANOMALENS_CONNECT_TIMEOUT``, default 3)."""
    raw = os.environ.get("ANOMALENS_CONNECT_TIMEOUT", "").strip()
    try:
        value = float(raw) if raw else 3.0
    except ValueError as exc:
        raise ValueError(
            f"ANOMALENS_CONNECT_TIMEOUT must be a number of seconds, got {raw!r}"
        ) from exc
    return max(value, 0.1)


def _download_host(source: str) -> str:
    """The URL whose server a download of ``source`` contacts first (hf-hub ids: the hub)."""
    if source.startswith("hf-hub:"):
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return source


def check_reachable(url: str, timeout: float | None = None) -> str | None:
    """Probe the server of ``url`` once (through the configured proxy, if any).

    The probe (name lookup + TCP connect) runs in a daemon thread joined with ``timeout``, so
    a hanging name lookup cannot hold the caller either.

    Args:
        url: an ``http(s)://`` URL (``file://`` and others are always reachable).
        timeout: seconds (default :func:`connect_timeout`).

    Returns:
        None when the server accepted a connection, else why not (one line).
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return None
    timeout = connect_timeout() if timeout is None else timeout
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        pp = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if pp.hostname:
            host, port = pp.hostname, pp.port or 80
    failure: list[str] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            failure.append(str(exc) or type(exc).__name__)

    thread = threading.Thread(target=probe, name="anomalens-reachability", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"no network: {host}:{port} did not answer within {timeout:g} s"
    if failure:
        return f"no network: cannot reach {host}:{port} ({failure[0]})"
    return None


def _not_available(what: str, cached: Path, reason: str) -> WeightNotAvailableError:
    return WeightNotAvailableError(
        f"weights {what!r} are not available: {reason}. Looked for {cached} "
        f"(cache folder {cached.parent}; set ANOMALENS_CACHE to change it). On a machine with "
        f"internet run `anomalens weights download {what}` (into its cache folder; `--to DIR` "
        "for another folder) and copy the file here, or use `anomalens weights pack DIR --out "
        "bundle.tar` there and `anomalens weights unpack bundle.tar` here; or pass a local file "
        "path instead."
    )


def check_weight_file(value: str | os.PathLike[str] | None, what: str) -> None:
    """Refuse at once a weight or checkpoint *file* that does not exist.

    Catalogue names, URLs, ``hf-hub:`` ids and bare words (open_clip tags such as ``openai``)
    are left to the resolver; a value that looks like a file (a folder part, ``~`` or a weight
    suffix) must exist, here or as a bare name in the cache folder.

    Raises:
        FileNotFoundError: names the option and the missing file.
    """
    if value is None or not isinstance(value, (str, os.PathLike)):
        return
    src = os.fspath(value)
    if src in _catalogue() or src.startswith(("hf-hub:", "http://", "https://", "file://")):
        return
    path = Path(src).expanduser()
    looks_like_file = (
        os.sep in src
        or "/" in src
        or src.startswith("~")
        or path.suffix.lower() in (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".npz")
    )
    if not looks_like_file or path.is_file():
        return
    if path.name == src and (cache_dir() / src).is_file():
        return
    reason = "is a folder, not a file" if path.is_dir() else "does not exist"
    raise FileNotFoundError(
        f"{what} {path} {reason} (also looked in the cache folder {cache_dir()}); pass an "
        "existing file, or a name from `anomalens weights list`"
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
    spec: WeightSpec | None = None
    name = src

    catalogue = _catalogue()
    if src in catalogue:
        spec = catalogue[src]
        src = spec.source
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
        wrong = _digest_mismatch(cached, spec)
        if wrong is not None:
            raise _not_available(name, cached, f"the cached file's {wrong} (delete it)")
        return cached
    if offline:
        raise _not_available(name, cached, "offline mode is on and the file is not cached")
    unreachable = check_reachable(_download_host(src))
    if unreachable is not None:
        raise _not_available(name, cached, f"it is not cached and {unreachable}")
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
    wrong = _digest_mismatch(cached, spec)
    if wrong is not None:
        cached.unlink()
        raise _not_available(name, cached, f"the downloaded file's {wrong}; it was deleted")
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
