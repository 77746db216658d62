"""Errors the service turns into JSON responses ``{"error": code, "message": text}``."""

from __future__ import annotations

__all__ = ["ServiceError"]


class ServiceError(Exception):
    """A request that cannot be served, with its HTTP status and a message for the user.

    Args:
        status: HTTP status code (4xx for client errors).
        code: short machine-readable reason (``not_found``, ``bad_image``, ...).
        message: what went wrong and, where possible, what to do.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
