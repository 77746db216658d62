"""Fuzz: a few hundred generated hostile or broken image files through ``load_image``.

Every file must either load as an (H, W, 3) uint8 array or raise ``ImageReadError`` naming it;
any other exception is a crash. Decoded-size bombs must be refused from the header.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from _bad_images import KINDS, write_bad_images
from anomalens.data.io import ImageReadError, load_image


def test_every_bad_file_loads_or_gives_the_clear_error(tmp_path: Path) -> None:
    files = write_bad_images(tmp_path / "fuzz", 300, seed=14)
    outcome: Counter[tuple[str, str]] = Counter()
    crashes = []
    for path, kind in files:
        for working_size in (None, 32):
            try:
                arr = load_image(path, working_size=working_size)
            except ImageReadError as exc:
                assert exc.path == str(path) and path.name in str(exc)
                outcome[(kind, "error")] += 1
            except Exception as exc:  # anything else is a crash of the loader
                crashes.append(f"{path.name}: {type(exc).__name__}: {exc}")
            else:
                assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8
                assert min(arr.shape[:2]) >= 1
                outcome[(kind, "ok")] += 1
    assert crashes == []
    assert sum(outcome.values()) == 2 * len(files)
    for kind in ("png_decoded_size_bomb", "jpeg_huge_header", "png_zero_size", "bmp_huge_header"):
        assert outcome[(kind, "ok")] == 0, kind  # never decoded
        assert outcome[(kind, "error")] > 0, kind
    for kind in ("valid", "png_large_but_allowed", "odd_modes"):
        assert outcome[(kind, "error")] == 0, kind
    assert set(KINDS) == {k for k, _ in outcome}
