"""Fixtures of the service tests: a synthetic washer dataset and a ready-made profile."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from _service_helpers import BASE_URL, CLIENT_HEADERS, DETECTOR_FORM, Upload, as_files

from anomalens.data.synthetic import generate_synthetic_dataset

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

_NEEDS_SERVE = "service tests need the serve extra: pip install 'anomalens[serve]'"


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def washer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Upload]]:
    """Uploads of a synthetic category: 6 normal shots, 2 good and 2 defective test images."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(
        root,
        categories=["washer"],
        n_train=6,
        n_test_good=2,
        n_test_defect=2,
        image_size=96,
        seed=0,
    )
    cat = root / "washer"

    def read(paths: list[Path]) -> list[Upload]:
        return [(p.name, p.read_bytes()) for p in sorted(paths)]

    return {
        "normal": read(list((cat / "train" / "good").glob("*.png"))),
        "good": read(list((cat / "test" / "good").glob("*.png"))),
        "defect": read([p for p in (cat / "test").rglob("*.png") if p.parent.name != "good"]),
    }


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Factory of TestClients on a data folder (default ``tmp_path/data``); closed at teardown."""
    pytest.importorskip("fastapi", reason=_NEEDS_SERVE)
    pytest.importorskip("sqlalchemy", reason=_NEEDS_SERVE)
    from fastapi.testclient import TestClient

    from anomalens.service import ServiceSettings, create_app

    clients: list[TestClient] = []

    def make(data_dir: Path | None = None, **settings: object) -> TestClient:
        s = ServiceSettings(data_dir=data_dir or tmp_path / "data", **settings)  # type: ignore[arg-type]
        client = TestClient(create_app(s), base_url=BASE_URL, headers=CLIENT_HEADERS)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture(scope="session")
def profile_template(
    tmp_path_factory: pytest.TempPathFactory, washer: dict[str, list[Upload]]
) -> tuple[Path, dict]:
    """A data folder holding the profile ``washer`` (leave-one-out threshold), made once."""
    pytest.importorskip("fastapi", reason=_NEEDS_SERVE)
    from fastapi.testclient import TestClient

    from anomalens.service import ServiceSettings, create_app

    data = tmp_path_factory.mktemp("template") / "data"
    app = create_app(ServiceSettings(data_dir=data))
    with TestClient(app, base_url=BASE_URL, headers=CLIENT_HEADERS) as client:
        r = client.post(
            "/api/profiles",
            data={"name": "washer", **DETECTOR_FORM},
            files=as_files(washer["normal"]),
        )
        assert r.status_code == 201, r.text
        profile = r.json()
    return data / "profiles", profile


@pytest.fixture
def seeded_dir(tmp_path: Path, profile_template: tuple[Path, dict]) -> Path:
    """A fresh data folder holding a copy of the ``washer`` profile."""
    data = tmp_path / "data"
    shutil.copytree(profile_template[0], data / "profiles")
    return data


@pytest.fixture
def screenshot_dir() -> Path | None:
    d = os.environ.get("ANOMALENS_SCREENSHOT_DIR")
    return Path(d) if d else None
