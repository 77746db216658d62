"""``anomalens serve``: run the inspection service with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["add_serve_parser", "run_serve"]

log = logging.getLogger(__name__)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` command to the CLI's subparsers (imports no web dependency)."""
    p = subparsers.add_parser(
        "serve",
        help="run the inspection web service and page",
        description="Serve the inspection API (/api, OpenAPI at /docs) and web page (/). "
        "Each option falls back to its ANOMALENS_* environment variable.",
    )
    p.add_argument("--host", help="interface to bind (ANOMALENS_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (ANOMALENS_PORT, default 8000)")
    p.add_argument(
        "--data-dir",
        help="profiles, images, overlays and the SQLite database (ANOMALENS_DATA_DIR, "
        "default ./anomalens-data)",
    )
    p.add_argument(
        "--token",
        help="access token required on every API call (ANOMALENS_TOKEN); mandatory when "
        "--host is not a loopback address (default: none, no token on localhost)",
    )
    p.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the results store, e.g. postgresql+psycopg://user:pw@host/db "
        "(ANOMALENS_DATABASE_URL, default SQLite in the data folder)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        help="largest request body in MiB (ANOMALENS_MAX_UPLOAD_MB, default 50)",
    )
    p.add_argument(
        "--workers", type=int, help="background job threads (ANOMALENS_WORKERS, default 2)"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="uvicorn's log level",
    )
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    """Start uvicorn with the settings of ``args`` and the environment; returns an exit code."""
    from anomalens.service.settings import ServiceSettings, UnsafeBindError

    try:
        settings = ServiceSettings.from_env(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            token=args.token,
            database_url=getattr(args, "database_url", None),
            max_upload_mb=getattr(args, "max_upload_mb", None),
            workers=getattr(args, "workers", None),
        )
        settings.check_bind()
    except UnsafeBindError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from anomalens.service import create_app, require_serve_extra

    try:
        require_serve_extra()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    if settings.torch_threads > 0:
        # the server process is ours: its thread count is set here, not by create_app (an
        # application embedding the app keeps its own setting)
        import torch

        torch.set_num_threads(settings.torch_threads)
    app = create_app(settings)
    print(
        f"anomalens service on http://{settings.host}:{settings.port}/ "
        f"(data: {settings.data_dir}, database: {app.state.store.backend}, "
        f"token: {'required' if settings.token else 'off'})",
        file=sys.stderr,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    return 0
