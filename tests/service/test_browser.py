"""End to end in headless Chromium: create a profile, inspect a defective and a good image."""

from __future__ import annotations

import base64
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "fastapi", reason="service tests need the serve extra: pip install 'anomalens[serve]'"
)
pytest.importorskip(
    "sqlalchemy", reason="service tests need the serve extra: pip install 'anomalens[serve]'"
)

from anomalens.service import ServiceSettings, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server_url(tmp_path: Path) -> Iterator[str]:
    """The service under uvicorn on a free loopback port, in a thread."""
    uvicorn = pytest.importorskip("uvicorn")
    port = _free_port()
    app = create_app(ServiceSettings(data_dir=tmp_path / "data", port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _drop_files(page: object, selector: str, uploads: list[tuple[str, bytes]]) -> None:
    """Dispatch a real ``drop`` event carrying files on ``selector`` (drag-and-drop path)."""
    payload = [{"name": n, "b64": base64.b64encode(d).decode()} for n, d in uploads]
    page.evaluate(  # type: ignore[attr-defined]
        """([selector, files]) => {
            const dt = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
                dt.items.add(new File([bytes], f.name, { type: "image/png" }));
            }
            const zone = document.querySelector(selector);
            zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""",
        [selector, payload],
    )


def test_page_creates_profile_and_shows_verdicts(
    server_url: str, washer: dict, tmp_path: Path, screenshot_dir: Path | None
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} not found (Debian package 'chromium'; .ci/service-deps.sh installs it)"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no browser download needed)"
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            console_errors: list[str] = []
            page.on(
                "console", lambda m: console_errors.append(m.text) if m.type == "error" else None
            )
            external: list[str] = []
            page.on(
                "request",
                lambda r: (
                    external.append(r.url)
                    if not r.url.startswith((server_url, "blob:", "data:"))
                    else None
                ),
            )
            page.goto(server_url + "/")
            page.wait_for_function(
                "() => document.querySelector('#status').textContent === 'ready'", timeout=20_000
            )

            page.fill("#profile-name", "washer")
            page.select_option("#method", "patchcore")
            page.fill("#backbone", "resnet18")
            page.fill("#weights", "random")
            page.fill("#image-size", "64")
            page.set_input_files(
                "#normal-input",
                [{"name": n, "mimeType": "image/png", "buffer": d} for n, d in washer["normal"]],
            )
            assert "6 image(s)" in page.text_content("#normal-list")
            page.click("#create-profile")
            page.wait_for_selector("#profiles-table tr[data-name=washer]", timeout=60_000)
            assert "created" in page.text_content("#status")

            _drop_files(page, "#inspect-drop", [washer["defect"][0], washer["good"][0]])
            page.wait_for_selector(".card[data-verdict=anomalous]", timeout=60_000)
            page.wait_for_selector(".card[data-verdict=normal]", timeout=10_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.card img.overlay')].every(i => i.complete && i.naturalWidth === 96)",
                timeout=10_000,
            )
            cards = page.query_selector_all(".card")
            names = {c.get_attribute("data-verdict"): c.text_content() for c in cards}
            assert washer["defect"][0][0] in names["anomalous"]
            assert washer["good"][0][0] in names["normal"]

            page.click(".card[data-verdict=anomalous]")
            page.wait_for_function(
                "() => ['image','heatmap','overlay','mask'].every(k => document.querySelector('#detail-' + k).naturalWidth > 0)",
                timeout=10_000,
            )
            assert "anomalous" in page.text_content("#detail-info")
            page.wait_for_function(
                "() => document.querySelectorAll('#history-table tbody tr').length === 2",
                timeout=10_000,
            )
            assert "1–2 of 2" in page.text_content("#page-info")

            shot = tmp_path / "service_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if screenshot_dir is not None:
                screenshot_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, screenshot_dir / shot.name)
            assert external == [], f"the page fetched outside the server: {external}"
            assert console_errors == []
        finally:
            browser.close()
