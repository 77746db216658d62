"""HTTP API of the inspection service (FastAPI TestClient, SQLite store)."""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "fastapi", reason="service tests need the serve extra: pip install 'anomalens[serve]'"
)
pytest.importorskip(
    "sqlalchemy", reason="service tests need the serve extra: pip install 'anomalens[serve]'"
)
from _service_helpers import DETECTOR_FORM, TOKEN, Upload, as_files
from fastapi.testclient import TestClient
from PIL import Image

from anomalens.service.uploads import clean_file_name


def _inspect(client: TestClient, uploads: list[Upload], profile: str = "washer") -> dict:
    r = client.post(f"/api/profiles/{profile}/inspect", files=as_files(uploads))
    assert r.status_code == 200, r.text
    return r.json()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- profiles
def test_profile_crud(make_client: Callable[..., TestClient], washer: dict) -> None:
    client = make_client()
    assert client.get("/api/profiles").json() == []
    methods = {m["name"]: m["learning_type"] for m in client.get("/api/methods").json()}
    assert methods["patchcore"] == "few_shot"

    r = client.post(
        "/api/profiles",
        data={"name": "fixed-one", **DETECTOR_FORM, "threshold_mode": "fixed", "threshold": "2.5"},
        files=as_files(washer["normal"][:2] + washer["normal"][:1]),  # one duplicate
    )
    assert r.status_code == 201, r.text
    p = r.json()
    assert p["num_normals"] == 2  # duplicates are stored once
    assert p["threshold"]["method"] == "fixed" and p["threshold"]["value"] == 2.5
    assert p["options"] == {"backbone": "resnet18", "weights": "random", "image_size": 64}

    assert [q["name"] for q in client.get("/api/profiles").json()] == ["fixed-one"]
    assert client.get("/api/profiles/fixed-one").json()["uid"] == p["uid"]

    r = client.post(
        "/api/profiles",
        data={"name": "fixed-one", **DETECTOR_FORM, "threshold_mode": "fixed", "threshold": "1"},
        files=as_files(washer["normal"][:1]),
    )
    assert r.status_code == 409 and r.json()["error"] == "exists"

    assert client.delete("/api/profiles/fixed-one").status_code == 200
    assert client.get("/api/profiles").json() == []
    r = client.get("/api/profiles/fixed-one")
    assert r.status_code == 404 and "fixed-one" in r.json()["message"]
    assert client.delete("/api/profiles/fixed-one").status_code == 404


@pytest.mark.parametrize(
    ("form", "n_files", "code", "text"),
    [
        ({"name": "Bad Name!"}, 2, "bad_name", "profile name"),
        ({"name": "trailing-newline\n"}, 2, "bad_name", "profile name"),
        ({"name": "x", "method": "nope"}, 2, "unknown_method", "Available"),
        ({"name": "x", "options": '{"colour": 1}'}, 2, "bad_option", "colour"),
        ({"name": "x", "options": "[1"}, 2, "bad_option", "JSON"),
        ({"name": "x"}, 1, "needs_normals", "at least 2"),
        ({"name": "x"}, 0, "needs_normals", "few-shot"),
        ({"name": "x", "threshold_mode": "fixed"}, 2, "bad_threshold", "value"),
        (
            {"name": "x", "weights": "no-such-weights-file.safetensors"},
            2,
            "bad_detector",
            "cannot build",
        ),
        ({"name": "x", "weights": "/etc/passwd"}, 2, "bad_option", "not a path or URL"),
        ({"name": "x", "weights": "https://example.invalid/w.pth"}, 2, "bad_option", "weight name"),
        ({"name": "x", "weights": "hf-hub:org/repo"}, 2, "bad_option", "weight name"),
        ({"name": "x", "weights": "../../secret.pth"}, 2, "bad_option", "weight name"),
        ({"name": "x", "options": '{"checkpoint": "/tmp/x.pth"}'}, 2, "bad_option", "checkpoint"),
    ],
)
def test_profile_create_rejects_bad_requests(
    make_client: Callable[..., TestClient],
    washer: dict,
    form: dict,
    n_files: int,
    code: str,
    text: str,
) -> None:
    client = make_client()
    r = client.post(
        "/api/profiles",
        data={**DETECTOR_FORM, **form},
        files=as_files(washer["normal"][:n_files]) or None,
    )
    assert r.status_code in (409, 422), r.text
    assert r.json()["error"] == code and text in r.json()["message"]
    assert client.get("/api/profiles").json() == []
    assert not any((client.app.state.data_dir / "profiles").iterdir())  # nothing half-made


def test_profile_create_is_all_or_nothing_on_a_corrupt_image(
    make_client: Callable[..., TestClient], washer: dict
) -> None:
    client = make_client()
    uploads = [*washer["normal"][:3], ("broken.png", washer["normal"][3][1][:200])]
    r = client.post("/api/profiles", data={"name": "w", **DETECTOR_FORM}, files=as_files(uploads))
    assert r.status_code == 400
    assert r.json()["error"] == "bad_image" and "broken.png" in r.json()["message"]
    assert client.get("/api/profiles").json() == []


# ----------------------------------------------------------------------------- inspect
def test_inspect_good_and_defective(
    make_client: Callable[..., TestClient], seeded_dir: Path, washer: dict
) -> None:
    client = make_client(seeded_dir)
    good = _inspect(client, washer["good"])
    bad = _inspect(client, washer["defect"])
    assert [r["verdict"] for r in good["results"]] == ["normal", "normal"]
    assert [r["verdict"] for r in bad["results"]] == ["anomalous", "anomalous"]
    thr = good["results"][0]["threshold"]
    assert max(r["score"] for r in good["results"]) <= thr < min(r["score"] for r in bad["results"])
    rec = bad["results"][0]
    assert rec["file_name"] == washer["defect"][0][0]
    assert len(rec["sha256"]) == 64 and rec["seconds"] > 0
    for kind in ("image", "overlay", "heatmap", "mask"):
        r = client.get(rec["links"][kind])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        assert img.size == (96, 96)
    mask = np.asarray(Image.open(io.BytesIO(client.get(rec["links"]["mask"]).content)))
    assert mask.any()  # the defect is outlined
    assert client.get("/api/results/99999/overlay.png").status_code == 404
    assert client.get(f"/api/results/{rec['id']}/secret.png").status_code == 422


def test_batch_job_reports_progress_and_results(
    make_client: Callable[..., TestClient], seeded_dir: Path, washer: dict
) -> None:
    client = make_client(seeded_dir, sync_batch_limit=2)
    uploads = washer["good"] + washer["defect"] + [("junk.jpg", b"\xff\xd8\xffnot really")]
    r = client.post("/api/profiles/washer/inspect", files=as_files(uploads))
    assert r.status_code == 413 and "/jobs" in r.json()["message"]
    r = client.post("/api/profiles/washer/jobs", files=as_files(uploads))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["total"] == 4 and job["errors"][0]["file_name"] == "junk.jpg"
    deadline = time.monotonic() + 60
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.get(job["links"]["self"]).json()
    assert job["status"] == "done" and job["done"] == 4
    assert [r["verdict"] for r in job["results"]] == ["normal"] * 2 + ["anomalous"] * 2
    assert all(r["job_id"] == job["id"] for r in job["results"])
    assert client.get("/api/jobs").json()[0]["id"] == job["id"]
    assert client.get("/api/jobs/nope").status_code == 404


def test_restart_keeps_profiles(
    make_client: Callable[..., TestClient], seeded_dir: Path, washer: dict
) -> None:
    first = make_client(seeded_dir)
    before = _inspect(first, washer["defect"][:1])["results"][0]
    # a new app on the same folder: no cache, no upload of normal images
    second = make_client(seeded_dir)
    assert second.app.state.engine.cache.__len__() == 0
    assert [p["name"] for p in second.get("/api/profiles").json()] == ["washer"]
    after = _inspect(second, washer["defect"][:1])["results"][0]
    assert after["score"] == pytest.approx(before["score"], rel=1e-5)
    assert after["verdict"] == "anomalous"
    assert second.get("/api/results").json()["total"] == 2  # history survives too


# ----------------------------------------------------------------------------- history
def test_history_paging_filters_and_csv(
    make_client: Callable[..., TestClient], seeded_dir: Path, washer: dict
) -> None:
    client = make_client(seeded_dir)
    _inspect(client, washer["good"])
    _inspect(client, washer["defect"])
    _inspect(client, washer["good"][:1])
    page = client.get("/api/results", params={"limit": 2}).json()
    assert page["total"] == 5 and len(page["items"]) == 2
    ids = [it["id"] for it in page["items"]]
    page2 = client.get("/api/results", params={"limit": 2, "offset": 2}).json()
    page3 = client.get("/api/results", params={"limit": 2, "offset": 4}).json()
    all_ids = ids + [it["id"] for it in page2["items"]] + [it["id"] for it in page3["items"]]
    assert sorted(all_ids, reverse=True) == all_ids and len(set(all_ids)) == 5

    anom = client.get("/api/results", params={"verdict": "anomalous"}).json()
    assert anom["total"] == 2 and {it["verdict"] for it in anom["items"]} == {"anomalous"}
    assert client.get("/api/results", params={"profile": "other"}).json()["total"] == 0
    now = datetime.now(timezone.utc)
    since = (now - timedelta(minutes=5)).isoformat()
    assert client.get("/api/results", params={"since": since}).json()["total"] == 5
    assert client.get("/api/results", params={"until": since}).json()["total"] == 0
    assert client.get("/api/results", params={"verdict": "maybe"}).status_code == 422
    assert client.get("/api/results", params={"limit": 0}).json()["error"] == "invalid_request"

    r = client.get("/api/results.csv", params={"verdict": "normal"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 3 and {row["verdict"] for row in rows} == {"normal"}
    assert rows[0]["profile"] == "washer" and float(rows[0]["score"]) > 0


# ----------------------------------------------------------------------------- safety
@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.png", b"", "empty"),
        ("text.png", b"hello, I am not an image", "not a recognised image"),
        ("cut.png", None, "truncated"),
        ("../../etc/passwd", b"GIF89a garbage", "image"),
    ],
)
def test_bad_uploads_are_4xx_json(
    make_client: Callable[..., TestClient],
    seeded_dir: Path,
    washer: dict,
    name: str,
    data: bytes | None,
    reason: str,
) -> None:
    client = make_client(seeded_dir)
    if data is None:
        data = _png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[:-300]
    r = client.post("/api/profiles/washer/inspect", files=[("files", (name, data, "image/png"))])
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "bad_image" and reason in body["message"]
    assert "/etc" not in body["message"]  # the client's path is reduced to a name
    assert client.get("/api/results").json()["total"] == 0


def test_file_name_is_never_a_path(
    make_client: Callable[..., TestClient], seeded_dir: Path, washer: dict
) -> None:
    client = make_client(seeded_dir)
    rec = _inspect(client, [("../../evil.png", washer["good"][0][1])])["results"][0]
    assert rec["file_name"] == "evil.png"
    data_dir = client.app.state.data_dir
    assert not list(data_dir.rglob("evil*")) and not (data_dir.parent.parent / "evil.png").exists()
    assert (data_dir / "images" / rec["sha256"][:2] / f"{rec['sha256']}.png").is_file()


def test_clean_file_name() -> None:
    assert clean_file_name("C:\\x\\..\\a\x00b\x1b.png") == "ab.png"
    assert clean_file_name("../../") == "upload"
    assert clean_file_name(None) == "upload"
    assert len(clean_file_name("n" * 1000)) == 200


def test_upload_size_limit(make_client: Callable[..., TestClient], seeded_dir: Path) -> None:
    client = make_client(seeded_dir, max_upload_mb=0.05)
    big = _png(np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    r = client.post(
        "/api/profiles/washer/inspect", files=[("files", ("big.png", big, "image/png"))]
    )
    assert r.status_code == 413
    assert r.json()["error"] == "too_large" and "MiB" in r.json()["message"]

    def chunks():  # no Content-Length: the streamed body is counted
        yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        for _ in range(20):
            yield b"\0" * 8192

    r = client.post(
        "/api/profiles/washer/inspect",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert r.status_code == 413 and r.json()["error"] == "too_large"


def test_token_required(make_client: Callable[..., TestClient], seeded_dir: Path) -> None:
    client = make_client(seeded_dir, token=TOKEN)
    assert client.get("/api/health").json()["auth"] is True  # health is open
    r = client.get("/api/profiles")
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert (
        client.get("/api/profiles", headers={"Authorization": "Bearer wrong-token"}).status_code
        == 401
    )
    assert (
        client.get("/api/profiles", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    )
    assert client.get("/api/profiles", headers={"X-Token": TOKEN}).status_code == 200
    assert client.get("/api/results.csv").status_code == 401
    assert client.get("/").status_code == 200  # the page itself holds no data


def test_errors_openapi_and_page(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    r = client.get("/api/nothing-here")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = client.post("/api/profiles", data={"method": "patchcore"})
    assert r.status_code == 422 and "name" in r.json()["message"]
    spec = client.get("/openapi.json").json()
    assert "/api/profiles/{name}/inspect" in spec["paths"] and "/api/results.csv" in spec["paths"]
    page = client.get("/")
    assert (
        page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    )
    static = Path(__file__).resolve().parents[2] / "src" / "anomalens" / "service" / "static"
    for f in [static / "index.html", static / "app.js", static / "app.css"]:
        text = f.read_text()
        assert "http://" not in text and "https://" not in text, (
            f"{f.name} must not load from a CDN"
        )
        assert client.get(f"/static/{f.name}").status_code == 200 or f.name == "index.html"


@pytest.mark.skipif(
    not os.environ.get("ANOMALENS_TEST_POSTGRES_URL"),
    reason="ANOMALENS_TEST_POSTGRES_URL is not set (.ci/service-deps.sh starts a local PostgreSQL)",
)
def test_app_on_postgresql(
    make_client: Callable[..., TestClient], seeded_dir: Path, washer: dict
) -> None:
    pytest.importorskip("psycopg", reason="the PostgreSQL store needs psycopg[binary]")
    from anomalens.service.store import ResultStore

    url = os.environ["ANOMALENS_TEST_POSTGRES_URL"]
    ResultStore(url).drop_all()
    try:
        client = make_client(seeded_dir, database_url=url)
        assert client.get("/api/health").json()["database"] == "postgresql"
        _inspect(client, washer["defect"][:1] + washer["good"][:1])
        page = client.get("/api/results", params={"verdict": "anomalous"}).json()
        assert page["total"] == 1 and page["items"][0]["file_name"] == washer["defect"][0][0]
        assert len(client.get("/api/results.csv").text.strip().splitlines()) == 3
    finally:
        ResultStore(url).drop_all()
