"""Profiles keep their fitted model: a restart loads it instead of refitting; a profile can be
made from an uploaded model file (validated)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from _service_helpers import as_files

from anomalens.registry import create_detector
from anomalens.service.profiles import MODEL_FILE

if TYPE_CHECKING:
    from fastapi.testclient import TestClient


def _inspect(client: TestClient, name: str, uploads: list) -> dict:
    r = client.post(f"/api/profiles/{name}/inspect", files=as_files(uploads))
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def test_restart_loads_the_saved_model_without_refitting(
    make_client: Callable[..., TestClient], seeded_dir: Path, washer: dict, monkeypatch
) -> None:
    assert (seeded_dir / "profiles" / "washer" / MODEL_FILE).is_file()
    first = make_client(seeded_dir)
    before = _inspect(first, "washer", washer["defect"][:1])
    second = make_client(seeded_dir)
    engine = second.app.state.engine
    calls: list[int] = []
    real = engine.profiles.load_normals
    monkeypatch.setattr(
        engine.profiles, "load_normals", lambda p: calls.append(1) or real(p)
    )  # a refit would read the normal images
    after = _inspect(second, "washer", washer["defect"][:1])
    assert calls == [] and after["score"] == before["score"]


def test_a_broken_saved_model_falls_back_to_a_refit(
    make_client: Callable[..., TestClient], seeded_dir: Path, washer: dict
) -> None:
    (seeded_dir / "profiles" / "washer" / MODEL_FILE).write_bytes(b"not a zip")
    client = make_client(seeded_dir)
    assert _inspect(client, "washer", washer["defect"][:1])["verdict"] == "anomalous"


def _model_bytes(tmp_path: Path, washer: dict, **options: object) -> bytes:
    import io

    from PIL import Image

    det = create_detector(
        "patchcore", backbone="resnet18", weights="random", image_size=64, **options
    )
    normals = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for _, b in washer["normal"]]
    det.fit(normals)
    path = det.save(tmp_path / "m.anomalens", threshold={"value": 0.5, "method": "fixed"})
    return path.read_bytes()


def test_profile_from_an_uploaded_model(
    make_client: Callable[..., TestClient], tmp_path: Path, washer: dict
) -> None:
    client = make_client()
    data = _model_bytes(tmp_path, washer)
    r = client.post(
        "/api/profiles/import",
        data={"name": "from-model"},
        files={"model": ("m.anomalens", data, "application/zip")},
    )
    assert r.status_code == 201, r.text
    p = r.json()
    assert p["method"] == "patchcore" and p["num_normals"] == 0
    assert p["threshold"]["value"] == 0.5 and p["policy"]["mode"] == "model-file"
    result = _inspect(client, "from-model", washer["defect"][:1])
    assert result["threshold"] == 0.5
    # survives a restart: the model file is in the profile folder
    again = make_client(tmp_path / "data")
    assert _inspect(again, "from-model", washer["defect"][:1])["score"] == result["score"]


def test_uploaded_model_is_validated(
    make_client: Callable[..., TestClient], tmp_path: Path, washer: dict
) -> None:
    client = make_client()
    data = _model_bytes(tmp_path, washer)
    for bad, message in ((data[:-100], "corrupt or truncated"), (b"hello", "corrupt")):
        r = client.post(
            "/api/profiles/import",
            data={"name": "bad"},
            files={"model": ("m.anomalens", bad, "application/zip")},
        )
        assert r.status_code == 422 and message in r.text, r.text
        assert "the uploaded model" in r.text and str(tmp_path) not in r.text
    assert client.get("/api/profiles").json() == []
    profiles = tmp_path / "data" / "profiles"
    assert [p.name for p in profiles.iterdir()] == []  # nothing left behind


def test_uploaded_model_may_not_name_a_weight_path(
    make_client: Callable[..., TestClient], tmp_path: Path, washer: dict
) -> None:
    import io
    import json
    import zipfile

    data = _model_bytes(tmp_path, washer)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = json.loads(z.read("model.json"))
        tensors = z.read("model.safetensors")
    info["init_options"]["weights"] = "/etc/passwd"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.json", json.dumps(info))
        z.writestr("model.safetensors", tensors)
    r = make_client().post(
        "/api/profiles/import",
        data={"name": "evil"},
        files={"model": ("m.anomalens", buf.getvalue(), "application/zip")},
    )
    assert r.status_code == 422 and "not a path" in r.text, r.text


@pytest.mark.parametrize("name", ["../x", "UPPER"])
def test_import_checks_the_profile_name(
    make_client: Callable[..., TestClient], tmp_path: Path, washer: dict, name: str
) -> None:
    r = make_client().post(
        "/api/profiles/import",
        data={"name": name},
        files={"model": ("m.anomalens", _model_bytes(tmp_path, washer), "application/zip")},
    )
    assert r.status_code == 422
