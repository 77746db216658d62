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


def as_files(uploads: list[Upload]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``files`` fields of uploads."""
    return [("files", (name, data, "application/octet-stream")) for name, data in uploads]
