"""Issue 14 faults of the service, each as a regression test: decoded-size budgets, cross-site
requests, durable jobs and idempotency, non-finite thresholds and the small ones."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip(
    "fastapi", reason="service tests need the serve extra: pip install 'anomalens[serve]'"
)
pytest.importorskip(
    "sqlalchemy", reason="service tests need the serve extra: pip install 'anomalens[serve]'"
)
from _service_helpers import DETECTOR_FORM, TOKEN, as_files
from fastapi.testclient import TestClient
from PIL import Image

from _bad_images import png_bytes_of_size
from anomalens.service import jobs as jobs_module
from anomalens.service.settings import ServiceSettings
from anomalens.service.uploads import PixelGate

MakeClient = Callable[..., TestClient]


def _wait_job(client: TestClient, job_id: str, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    job = client.get(f"/api/jobs/{job_id}").json()
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.get(f"/api/jobs/{job_id}").json()
    return job


# ----------------------------------------------------------------------------- decoded size
def test_small_upload_with_huge_decoded_size_is_refused(
    make_client: MakeClient, seeded_dir: Path, washer: dict
) -> None:
    client = make_client(seeded_dir)
    bomb = png_bytes_of_size(8000, 8000)  # ~80 KB, 64 MP: passed every limit before
    assert len(bomb) < 200_000
    r = client.post(
        "/api/profiles/washer/inspect",
        files=as_files([("bomb.png", bomb), washer["good"][0]]),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 1
    assert body["errors"][0]["file_name"] == "bomb.png"
    assert "8000x8000" in body["errors"][0]["message"]
    assert "decoded pixels exceeds" in body["errors"][0]["message"]


def test_request_pixel_budget_and_reduce_on_decode(
    make_client: MakeClient, seeded_dir: Path, washer: dict
) -> None:
    client = make_client(seeded_dir, max_request_pixels=2 * 96 * 96, working_size=32)
    # three 96 x 96 images reduce to 32 x 32 each: within the budget of two full ones
    r = client.post(
        "/api/profiles/washer/inspect", files=as_files(washer["good"] + washer["defect"][:1])
    )
    assert r.status_code == 200, r.text
    rec = r.json()["results"][0]
    img = Image.open(io.BytesIO(client.get(rec["links"]["image"]).content))
    assert img.size == (32, 32)  # stored at the working size
    big = png_bytes_of_size(2000, 2000)  # 4 MP, reduced by 62 to 33 x 33 = 1089 pixels
    client2 = make_client(seeded_dir, max_request_pixels=1000, working_size=32)
    r = client2.post("/api/profiles/washer/inspect", files=as_files([("big.png", big)]))
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "too_many_pixels" and "ANOMALENS_MAX_REQUEST_PIXELS" in r.text
    assert client2.get("/api/results").json()["total"] == 3  # nothing of the refused request


def test_pixel_gate_bounds_pixels_in_flight() -> None:
    gate = PixelGate(100)
    peak = 0
    lock = threading.Lock()

    def use(n: int) -> None:
        nonlocal peak
        with gate.hold(n):
            with lock:
                peak = max(peak, gate.in_use)
            time.sleep(0.01)

    threads = [threading.Thread(target=use, args=(40,)) for _ in range(10)]
    threads.append(threading.Thread(target=use, args=(250,)))  # alone, a large one passes
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert gate.in_use == 0
    assert peak <= 250 and all(not t.is_alive() for t in threads)
    assert 40 <= peak


# ----------------------------------------------------------------------------- cross-site
def test_host_header_must_name_this_server(make_client: MakeClient, seeded_dir: Path) -> None:
    client = make_client(seeded_dir)
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "10.0.0.7"):
        assert client.get("/api/profiles", headers={"Host": host}).status_code == 200, host
    r = client.get("/api/profiles", headers={"Host": "rebind.attacker.example"})
    assert r.status_code == 400 and r.json()["error"] == "bad_host"
    assert client.get("/", headers={"Host": "rebind.attacker.example:8000"}).status_code == 400
    other = make_client(seeded_dir, allowed_hosts=("inspect.factory.lan",))
    assert (
        other.get("/api/profiles", headers={"Host": "inspect.factory.lan:8000"}).status_code == 200
    )


def test_cross_origin_requests_are_refused(
    make_client: MakeClient, seeded_dir: Path, washer: dict
) -> None:
    client = make_client(seeded_dir)
    files = as_files(washer["good"][:1])
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ):
        r = client.post("/api/profiles/washer/inspect", files=files, headers=headers)
        assert r.status_code == 403 and r.json()["error"] == "cross_site", headers
    form = {"name": "planted", **DETECTOR_FORM}
    r = client.post(
        "/api/profiles", data=form, files=files, headers={"Origin": "http://evil.example"}
    )
    assert r.status_code == 403
    assert client.get("/api/results").json()["total"] == 0
    assert [p["name"] for p in client.get("/api/profiles").json()] == ["washer"]
    same = {"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/api/profiles/washer/inspect", files=files, headers=same).status_code == 200
    # behind a proxy that rewrites Host, the public name must be listed to count as this server
    proxied = {"Origin": "https://inspect.example"}
    assert (
        client.post("/api/profiles/washer/inspect", files=files, headers=proxied).status_code == 403
    )
    listed = make_client(seeded_dir, allowed_hosts=("inspect.example",))
    assert (
        listed.post("/api/profiles/washer/inspect", files=files, headers=proxied).status_code == 200
    )


def test_api_needs_the_client_header_or_token(make_client: MakeClient, seeded_dir: Path) -> None:
    client = make_client(seeded_dir)
    bare = {"X-Anomalens-Client": ""}  # what a plain cross-site form or <img> sends: nothing
    r = client.get("/api/results", headers=bare)
    assert r.status_code == 403 and "X-Anomalens-Client" in r.json()["message"]
    assert client.get("/api/health", headers=bare).status_code == 200
    tok = make_client(seeded_dir, token=TOKEN)
    auth = {"X-Anomalens-Client": "", "Authorization": f"Bearer {TOKEN}"}
    assert tok.get("/api/results", headers=auth).status_code == 200


# ----------------------------------------------------------------------------- durable jobs
def test_jobs_survive_a_restart_without_duplicates(
    make_client: MakeClient, seeded_dir: Path, washer: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads = washer["good"] + washer["defect"]
    with monkeypatch.context() as m:  # a server that accepts jobs and dies before running them
        m.setattr(jobs_module.JobManager, "start", lambda self, job_id: None)
        first = make_client(seeded_dir)
        job = first.post(
            "/api/profiles/washer/jobs", files=as_files(uploads), headers={"Idempotency-Key": "k1"}
        ).json()
        assert job["status"] == "queued" and job["total"] == 4
        # one image was inspected and recorded, but the crash came before its item was marked
        from anomalens.service.uploads import decode_image

        im = decode_image(uploads[0][1], uploads[0][0])
        first.app.state.engine.inspect(
            first.app.state.profiles.get("washer"), [im], job_id=job["id"]
        )
    second = make_client(seeded_dir)  # start-up resumes the stored job
    done = _wait_job(second, job["id"])
    assert done["status"] == "done" and done["done"] == 4, done
    assert [r["file_name"] for r in done["results"]] == [n for n, _ in uploads]
    assert second.get("/api/results").json()["total"] == 4  # the first result was not redone
    retry = second.post(
        "/api/profiles/washer/jobs", files=as_files(uploads), headers={"Idempotency-Key": "k1"}
    )
    assert retry.status_code == 202 and retry.json()["id"] == job["id"]
    assert second.get("/api/results").json()["total"] == 4  # the retry made nothing new
    assert [j["id"] for j in second.get("/api/jobs").json()] == [job["id"]]


def test_job_of_a_deleted_profile_fails_with_a_reason(
    make_client: MakeClient, seeded_dir: Path, washer: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        m.setattr(jobs_module.JobManager, "start", lambda self, job_id: None)
        first = make_client(seeded_dir)
        job = first.post("/api/profiles/washer/jobs", files=as_files(washer["good"])).json()
        assert first.delete("/api/profiles/washer").status_code == 200
    second = make_client(seeded_dir)
    done = _wait_job(second, job["id"])
    assert done["status"] == "failed" and "deleted" in done["message"]


# ----------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize(
    "form",
    [
        {"threshold_mode": "fixed", "threshold": "nan"},
        {"threshold_mode": "fixed", "threshold": "inf"},
        {"threshold_mode": "fixed", "threshold": "-Infinity"},
        {"margin": "inf"},
    ],
)
def test_non_finite_thresholds_are_refused(
    make_client: MakeClient, washer: dict, form: dict
) -> None:
    client = make_client()
    r = client.post(
        "/api/profiles",
        data={"name": "p", **DETECTOR_FORM, **form},
        files=as_files(washer["normal"][:3]),
    )
    assert r.status_code == 422, r.text
    assert client.get("/api/profiles").json() == []


def test_hand_edited_nan_threshold_gives_4xx_and_leaves_no_file(
    make_client: MakeClient, seeded_dir: Path, washer: dict
) -> None:
    pj = seeded_dir / "profiles" / "washer" / "profile.json"
    data = json.loads(pj.read_text())
    data["threshold"]["value"] = float("nan")
    pj.write_text(json.dumps(data))
    client = make_client(seeded_dir)
    r = client.post("/api/profiles/washer/inspect", files=as_files(washer["good"][:1]))
    assert r.status_code == 409 and r.json()["error"] == "bad_profile", r.text
    r = client.post("/api/profiles/washer/jobs", files=as_files(washer["good"][:1]))
    assert r.status_code == 409
    assert not (seeded_dir / "images").exists() and not (seeded_dir / "artifacts").exists()


# ----------------------------------------------------------------------------- small ones
def test_out_of_range_numbers_and_dates_are_4xx(make_client: MakeClient, seeded_dir: Path) -> None:
    client = make_client(seeded_dir)
    for params in (
        {"offset": str(2**63)},
        {"offset": str(10**30)},
        {"since": "0001-01-01T00:00:00+01:00"},
        {"until": "9999-12-31T23:59:59-01:00"},
        {"since": "0000-01-01"},
    ):
        r = client.get("/api/results", params=params)
        assert r.status_code == 422, (params, r.status_code, r.text)
    for url in ("/api/results/9223372036854775808", "/api/results/0", "/api/results/-1/mask.png"):
        assert client.get(url).status_code == 422, url
    assert client.get("/api/results/9223372036854775807").status_code == 404
    assert client.get("/api/jobs/" + "f" * 300).status_code == 404


def test_api_responses_are_not_stored_and_docs_need_the_token(
    make_client: MakeClient, seeded_dir: Path, washer: dict
) -> None:
    client = make_client(seeded_dir)
    rec = client.post("/api/profiles/washer/inspect", files=as_files(washer["good"][:1])).json()
    for url in (
        "/api/profiles",
        "/api/results",
        "/api/results.csv",
        rec["results"][0]["links"]["mask"],
    ):
        assert client.get(url).headers["cache-control"] == "no-store", url
    assert client.get("/openapi.json").status_code == 200  # open without a token
    tok = make_client(seeded_dir, token=TOKEN)
    for url in ("/docs", "/redoc", "/openapi.json"):
        assert tok.get(url).status_code == 404, url
    assert tok.get("/api/openapi.json").status_code == 401
    spec = tok.get("/api/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert spec.status_code == 200 and "/api/profiles" in spec.json()["paths"]


@pytest.mark.parametrize("token", [" " * 24, "a" * 30, "short-token", "tab\tin-the-token-0123"])
def test_weak_tokens_are_refused(token: str) -> None:
    with pytest.raises(ValueError, match="access token"):
        ServiceSettings(token=token).validated()
    ServiceSettings(token=TOKEN).validated()


def test_weights_only_from_the_cache_and_no_server_paths_in_messages(
    make_client: MakeClient,
    washer: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "private-cache-folder"
    cache.mkdir()
    work = tmp_path / "server-cwd"
    work.mkdir()
    (work / "resnet18-local.pth").write_bytes(b"not read")
    monkeypatch.setenv("ANOMALENS_CACHE", str(cache))
    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    monkeypatch.chdir(work)
    client = make_client()
    for weights in ("resnet18-local.pth", "not-there.pth"):
        form = {**DETECTOR_FORM, "weights": weights}
        r = client.post(
            "/api/profiles", data={"name": "w", **form}, files=as_files(washer["normal"][:3])
        )
        assert r.status_code == 422, r.text
        assert "not in the weight cache" in r.json()["message"]
        assert str(cache) not in r.text and str(tmp_path) not in r.text
    r = client.post(
        "/api/profiles",
        data={"name": "w", **DETECTOR_FORM, "weights": "/etc/passwd"},
        files=as_files(washer["normal"][:3]),
    )
    assert r.status_code == 422 and str(cache) not in r.text


def test_seconds_are_compute_and_queue_is_reported_apart(
    make_client: MakeClient, seeded_dir: Path, washer: dict
) -> None:
    client = make_client(seeded_dir)
    body = client.post("/api/profiles/washer/inspect", files=as_files(washer["good"])).json()
    for rec in body["results"]:
        assert rec["queue_seconds"] is not None and rec["queue_seconds"] >= 0
        assert (
            0 < rec["seconds"] and rec["seconds"] + rec["queue_seconds"] <= body["seconds"] + 0.05
        )
    csv_head = client.get("/api/results.csv").text.splitlines()[0]
    assert "queue_seconds" in csv_head


def test_inspect_retry_with_the_same_key_stores_nothing_new(
    make_client: MakeClient, seeded_dir: Path, washer: dict
) -> None:
    client = make_client(seeded_dir)
    files = as_files([*washer["defect"][:1], ("junk.png", b"junk")])
    first = client.post(
        "/api/profiles/washer/inspect", files=files, headers={"Idempotency-Key": "part-7"}
    )
    again = client.post(
        "/api/profiles/washer/inspect", files=files, headers={"Idempotency-Key": "part-7"}
    )
    assert first.status_code == again.status_code == 200
    assert [r["id"] for r in again.json()["results"]] == [r["id"] for r in first.json()["results"]]
    assert again.json()["errors"] == first.json()["errors"] != []
    assert client.get("/api/results").json()["total"] == 1
    other = client.post(
        "/api/profiles/washer/inspect", files=files, headers={"Idempotency-Key": "part-8"}
    )
    assert other.status_code == 200 and client.get("/api/results").json()["total"] == 2
    bad = client.post("/api/profiles/washer/inspect", files=files, headers={"Idempotency-Key": ""})
    assert bad.status_code == 422
