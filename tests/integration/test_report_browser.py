"""The review page in headless Chromium: relocatable, viewer, keyboard, threshold slider."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.pipeline import run_predict
from anomalens.registry import create_detector

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.browser


def _write(folder: Path, name: str, arr: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(folder / name)
    return folder / name


def test_review_page_works_after_the_run_folder_is_moved(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (Debian package 'chromium')")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no browser download needed)"
    )
    base = np.full((60, 80, 3), 120, np.uint8)
    normal = [
        _write(tmp_path / "normal", f"n{i}.png", np.full_like(base, v))
        for i, v in enumerate((118, 120, 122))
    ]
    images = []
    for i in range(6):
        im = base.copy()
        if i % 2:
            im[10 + i : 25 + i, 20:35] = 200 + 10 * i
        images.append(_write(tmp_path / "in", f"img {i}.png", im))
    run_predict(
        lambda: create_detector("toy"),
        images,
        tmp_path / "run",
        normal_paths=normal,
        progress=False,
    )
    moved = tmp_path / "elsewhere" / "run-copy"
    shutil.copytree(tmp_path / "run", moved)  # the input images stay behind: links break

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu"],
            headless=True,
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            external: list[str] = []
            page.on(
                "request",
                lambda r: (
                    external.append(r.url) if not r.url.startswith(("file:", "data:")) else None
                ),
            )
            for folder in (tmp_path / "run", moved):
                page.goto((folder / "report.html").as_uri())
                page.wait_for_selector(".card")
                # every thumbnail shows a picture: the input image, or the overlay where the
                # moved folder's link to the input no longer resolves
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.t-image')].every("
                    "i => i.complete && i.naturalWidth === 80)",
                    timeout=10_000,
                )
            assert page.locator(".card").count() == 6
            run_anomalous = page.locator(".card.anomalous").count()
            assert run_anomalous == 3

            # the slider re-judges in the page: everything above the minimum score
            page.fill("#thr-number", "-1")
            page.press("#thr-number", "Enter")
            assert page.locator(".card.anomalous").count() == 6
            assert "6 anomalous, 0 normal" in page.text_content("#counts")
            assert page.locator(".card.changed").count() == 3
            page.select_option("#filter", "changed")
            assert page.locator(".card").count() == 3
            page.select_option("#filter", "all")
            page.click("#thr-reset")
            assert page.locator(".card.anomalous").count() == 3

            # filter by decision and score
            page.select_option("#filter", "normal")
            assert page.locator(".card").count() == 3
            page.select_option("#filter", "all")
            page.fill("#smin", "0.3")
            page.dispatch_event("#smin", "input")
            assert 0 < page.locator(".card").count() <= 3

            page.fill("#smin", "")
            page.dispatch_event("#smin", "input")
            page.click(".card >> nth=0")
            assert page.is_visible("#viewer")
            first = page.text_content("#vinfo")
            assert first.startswith("1 / 6")
            page.keyboard.press("ArrowRight")
            assert page.text_content("#vinfo").startswith("2 / 6")
            page.keyboard.press("ArrowLeft")
            assert page.text_content("#vinfo") == first
            page.wait_for_function("() => document.querySelector('#v-image').naturalWidth === 80")
            before = page.eval_on_selector("#layers", "e => e.style.transform")
            page.keyboard.press("+")
            assert page.eval_on_selector("#layers", "e => e.style.transform") != before
            page.fill("#vopacity", "20")
            page.dispatch_event("#vopacity", "input")
            assert page.eval_on_selector("#v-heat", "e => e.style.opacity") == "0.2"
            assert page.is_visible("#v-region")  # the worst image is anomalous: outlined
            assert page.eval_on_selector("#colorbar", "e => e.naturalWidth") > 0
            page.keyboard.press("Escape")
            assert not page.is_visible("#viewer")
            assert "threshold" in page.text_content("#settings")
        finally:
            browser.close()
    assert problems == [] and external == []
