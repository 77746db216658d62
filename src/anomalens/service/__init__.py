"""HTTP inspection service: profiles, inspection, jobs, results history and a web page.

Needs the ``serve`` extra (``pip install anomalens[serve]``): FastAPI, uvicorn,
python-multipart and SQLAlchemy. ``create_app`` builds the ASGI application.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anomalens.service.settings import ServiceSettings, UnsafeBindError

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["ServiceSettings", "UnsafeBindError", "create_app", "require_serve_extra"]

_SERVE_MODULES = ("fastapi", "uvicorn", "multipart", "sqlalchemy")


def require_serve_extra() -> None:
    """Raise ``ImportError`` naming the extra when a service dependency is missing."""
    import importlib.util

    missing = [m for m in _SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"the inspection service needs {', '.join(missing)}: pip install 'anomalens[serve]'"
        )


def create_app(settings: ServiceSettings | None = None, **kwargs: Any) -> FastAPI:
    """Build the FastAPI app (see ``anomalens.service.app.create_app``)."""
    require_serve_extra()
    from anomalens.service.app import create_app as _create

    return _create(settings, **kwargs)
