"""Shared constants and helpers of the service tests (imported by basename, like the others)."""

from __future__ import annotations

#: Detector settings of the tests: seeded random CNN features, small images (fast on one core).
DETECTOR_FORM = {
    "method": "patchcore",
    "backbone": "resnet18",
    "weights": "random",
    "image_size": "64",
}
Upload = tuple[str, bytes]
#: The test clients talk to the server as its own page does: a loopback Host, the client header.
BASE_URL = "http://127.0.0.1:8000"
CLIENT_HEADERS = {"X-Anomalens-Client": "1"}
#: A token that passes the strength rule.
TOKEN = "s3cret-token-0123456789"


def as_files(uploads: list[Upload]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``files`` fields of uploads."""
    return [("files", (name, data, "application/octet-stream")) for name, data in uploads]
