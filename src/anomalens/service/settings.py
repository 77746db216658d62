"""Service settings: command-line values over environment variables over loopback defaults."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["LOOPBACK_HOSTS", "ServiceSettings", "UnsafeBindError", "is_loopback"]

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


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
        for name in ("max_files", "sync_batch_limit", "workers", "cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.token is not None and len(self.token) < 8:
            raise ValueError("the access token must be at least 8 characters long")
        return self

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
