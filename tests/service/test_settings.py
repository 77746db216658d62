"""Service settings, the bind safety rule and the ``serve`` command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from anomalens.service.cli import add_serve_parser, run_serve
from anomalens.service.settings import ServiceSettings, UnsafeBindError, is_loopback


def test_env_then_overrides(tmp_path: Path) -> None:
    env = {
        "ANOMALENS_HOST": "0.0.0.0",
        "ANOMALENS_PORT": "9001",
        "ANOMALENS_DATA_DIR": str(tmp_path),
        "ANOMALENS_TOKEN": "tok-1234567890abcdef",
        "ANOMALENS_DATABASE_URL": "postgresql+psycopg://u:p@h/db",
        "ANOMALENS_MAX_UPLOAD_MB": "2.5",
    }
    s = ServiceSettings.from_env(env)
    assert (s.host, s.port, s.data_dir, s.token) == (
        "0.0.0.0",
        9001,
        tmp_path,
        "tok-1234567890abcdef",
    )
    assert s.max_upload_bytes == int(2.5 * 1024 * 1024)
    assert s.resolved_database_url == "postgresql+psycopg://u:p@h/db"
    s2 = ServiceSettings.from_env(env, host="127.0.0.1", port=None, data_dir=str(tmp_path / "x"))
    assert (s2.host, s2.port, s2.data_dir) == ("127.0.0.1", 9001, tmp_path / "x")
    d = ServiceSettings.from_env({})
    assert d.host == "127.0.0.1" and d.token is None
    assert d.resolved_database_url.startswith("sqlite:///") and d.resolved_database_url.endswith(
        "results.sqlite3"
    )


@pytest.mark.parametrize(
    ("env", "text"),
    [
        ({"ANOMALENS_PORT": "http"}, "ANOMALENS_PORT"),
        ({"ANOMALENS_PORT": "70000"}, "port"),
        ({"ANOMALENS_MAX_UPLOAD_MB": "0"}, "upload"),
        ({"ANOMALENS_TOKEN": "short"}, "token"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], text: str) -> None:
    with pytest.raises(ValueError, match=text):
        ServiceSettings.from_env(env)


@pytest.mark.parametrize(
    ("host", "loop"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.4", False),
        ("::", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


def test_non_loopback_needs_token() -> None:
    with pytest.raises(UnsafeBindError, match="ANOMALENS_TOKEN"):
        ServiceSettings(host="0.0.0.0").check_bind()
    ServiceSettings(host="0.0.0.0", token="long-enough-token-0123").check_bind()
    ServiceSettings(host="127.0.0.1").check_bind()


def test_serve_refuses_open_bind(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for key in ("ANOMALENS_TOKEN", "ANOMALENS_HOST"):
        monkeypatch.delenv(key, raising=False)
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["serve", "--host", "0.0.0.0", "--port", "8123", "--data-dir", str(tmp_path)]
    )
    assert args.func is run_serve
    assert run_serve(args) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on '0.0.0.0' without an access token" in err
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
