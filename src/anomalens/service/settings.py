"""Service settings: command-line values over environment variables over loopback defaults."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "LOOPBACK_HOSTS",
    "MIN_TOKEN_LENGTH",
    "ServiceSettings",
    "UnsafeBindError",
    "check_token_strength",
    "is_loopback",
]

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
#: Shortest accepted access token (``openssl rand -hex 24`` gives 48 characters).
MIN_TOKEN_LENGTH = 16
_MIN_DISTINCT = 8


class UnsafeBindError(ValueError):
    """Raised when the service would listen beyond loopback without an access token."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_token_strength(token: str) -> None:
    """Refuse a guessable token: too short, containing white space, or too few distinct
    characters ("aaaaaaaaaaaaaaaa").

    Raises:
        ValueError: what is wrong (never the token itself) and how to make a good one.
    """
    how = "make one with `openssl rand -hex 24`"
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"the access token must be at least {MIN_TOKEN_LENGTH} characters long; {how}"
        )
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ValueError(f"the access token must not contain spaces or control characters; {how}")
    if len(set(token)) < _MIN_DISTINCT:
        raise ValueError(
            f"the access token must contain at least {_MIN_DISTINCT} different characters; {how}"
        )


def _env_hosts(env: Mapping[str, str], key: str) -> tuple[str, ...]:
    raw = env.get(key) or ""
    return tuple(h.strip().lower() for h in raw.split(",") if h.strip())


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def _env_float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not a number") from None


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the service needs to start.

    Attributes:
        host: interface to bind (default loopback).
        port: TCP port.
        data_dir: folder of profiles, stored images, overlays and the SQLite database.
        token: access token; required for every ``/api`` call when set, and required to bind
            beyond loopback.
        database_url: SQLAlchemy URL of the results store (default SQLite in ``data_dir``).
        max_upload_mb: largest accepted request body, in MiB.
        max_files: most images in one request.
        sync_batch_limit: most images inspected inside one ``/inspect`` request; larger
            batches go through ``/jobs``.
        workers: background job threads.
        cache_size: fitted detectors kept in memory (least recently used are dropped).
        torch_threads: intra-op threads of torch in the server (0 = torch default).
        allowed_hosts: extra names the ``Host`` header may carry (the bound address,
            ``localhost`` and loopback addresses are always allowed); ``*`` allows any (only
            behind a proxy that checks it).
        working_size: uploads are reduced while decoding so that both sides stay >= this
            many pixels (the stored image and its overlays are at that size).
        max_request_pixels: decoded pixels (after reduction) one request may bring in total.
        decode_pixels: pixels decoded at the same time over all requests.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=lambda: Path("anomalens-data"))
    token: str | None = None
    database_url: str | None = None
    max_upload_mb: float = 50.0
    max_files: int = 200
    sync_batch_limit: int = 16
    workers: int = 2
    cache_size: int = 4
    torch_threads: int = 0
    allowed_hosts: tuple[str, ...] = ()
    working_size: int = 2048
    max_request_pixels: int = 250_000_000
    decode_pixels: int = 50_000_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServiceSettings:
        """Settings from ``ANOMALENS_*`` variables; non-None ``overrides`` win (CLI flags)."""
        env = os.environ if env is None else env
        base = cls(
            host=env.get("ANOMALENS_HOST") or cls.host,
            port=_env_int(env, "ANOMALENS_PORT", cls.port),
            data_dir=Path(env.get("ANOMALENS_DATA_DIR") or "anomalens-data"),
            token=env.get("ANOMALENS_TOKEN") or None,
            database_url=env.get("ANOMALENS_DATABASE_URL") or None,
            max_upload_mb=_env_float(env, "ANOMALENS_MAX_UPLOAD_MB", cls.max_upload_mb),
            max_files=_env_int(env, "ANOMALENS_MAX_FILES", cls.max_files),
            sync_batch_limit=_env_int(env, "ANOMALENS_SYNC_BATCH_LIMIT", cls.sync_batch_limit),
            workers=_env_int(env, "ANOMALENS_WORKERS", cls.workers),
            cache_size=_env_int(env, "ANOMALENS_CACHE_SIZE", cls.cache_size),
            torch_threads=_env_int(env, "ANOMALENS_TORCH_THREADS", cls.torch_threads),
            allowed_hosts=_env_hosts(env, "ANOMALENS_ALLOWED_HOSTS"),
            working_size=_env_int(env, "ANOMALENS_WORKING_SIZE", cls.working_size),
            max_request_pixels=_env_int(
                env, "ANOMALENS_MAX_REQUEST_PIXELS", cls.max_request_pixels
            ),
            decode_pixels=_env_int(env, "ANOMALENS_DECODE_PIXELS", cls.decode_pixels),
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "data_dir" in given:
            given["data_dir"] = Path(given["data_dir"])
        return replace(base, **given).validated()

    def validated(self) -> ServiceSettings:
        """Check value ranges; raises ``ValueError`` naming the setting."""
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_upload_mb <= 0:
            raise ValueError(f"max upload size must be > 0 MiB, got {self.max_upload_mb}")
        for name in (
            "max_files",
            "sync_batch_limit",
            "workers",
            "cache_size",
            "max_request_pixels",
            "decode_pixels",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.working_size < 32:
            raise ValueError(f"working_size must be >= 32 pixels, got {self.working_size}")
        if self.token is not None:
            check_token_strength(self.token)
        return self

    def host_allowed(self, host_header: str) -> bool:
        """Whether a request's ``Host`` header names this server (DNS-rebinding defence).

        Allowed: IP addresses (a rebinding attack needs a host *name*), ``localhost``, the bound
        host name and ``allowed_hosts``; the port is ignored.
        """
        if "*" in self.allowed_hosts:
            return True
        name = host_header.strip().lower()
        if name.startswith("["):
            name = name[1:].split("]", 1)[0]
        elif name.count(":") == 1:
            name = name.split(":", 1)[0]
        name = name.rstrip(".")
        if not name:
            return False
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            pass
        return name in ("localhost", self.host.strip("[]").lower(), *self.allowed_hosts)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def resolved_database_url(self) -> str:
        """The configured URL, or SQLite at ``<data_dir>/results.sqlite3``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(Path(self.data_dir) / 'results.sqlite3').resolve()}"

    def check_bind(self) -> None:
        """Refuse a non-loopback bind without a token.

        Raises:
            UnsafeBindError: ``host`` is not loopback and no token is configured.
        """
        if not is_loopback(self.host) and not self.token:
            raise UnsafeBindError(
                f"refusing to listen on {self.host!r} without an access token: anyone on the "
                "network could create profiles and read results. Set --token or ANOMALENS_TOKEN "
                "(clients then send 'Authorization: Bearer <token>'), or bind to 127.0.0.1."
            )
