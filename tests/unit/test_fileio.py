"""Atomic writes (``anomalens.fileio``): complete files with the user's umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from anomalens.fileio import atomic_save_png, atomic_write_text, current_umask


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save_png(tmp_path / "m.png", np.zeros((2, 2), bool))
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what an ordinary write gives
    finally:
        os.umask(old)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o666 & ~mask
    for name in ("a.txt", "m.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
