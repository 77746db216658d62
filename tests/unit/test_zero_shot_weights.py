"""Zero-shot that works or says why at once: official checkpoints in the catalogue, git blob
checks, fast failure without network, no silent random adapters / prompts."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.backbones import weights as W
from anomalens.backbones.catalogue import WEIGHTS, checkpoint_names, default_checkpoint
from anomalens.backbones.weight_spec import WeightSpec
from anomalens.backbones.weights import (
    WeightNotAvailableError,
    check_weight_file,
    git_blob_sha1_file,
    resolve_weights,
)

PAYLOAD = b"anomalens test checkpoint\x00\x01\x02" * 100


def _blob(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("ANOMALENS_CACHE", str(folder))
    for var in ("ANOMALENS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return folder


def _with_spec(monkeypatch: pytest.MonkeyPatch, spec: WeightSpec) -> None:
    """Make ``spec`` a catalogue entry for this test."""
    monkeypatch.setattr(W, "_catalogue", lambda: {w.name: w for w in (*WEIGHTS, spec)})


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local http.server on 127.0.0.1 serving ``tmp_path / "srv"``."""
    root = tmp_path / "srv"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ catalogue
def test_official_checkpoints_are_in_the_catalogue() -> None:
    by_name = {w.name: w for w in WEIGHTS}
    assert checkpoint_names("adaptclip") == ["adaptclip-mvtec", "adaptclip-visa"]
    assert checkpoint_names("anomalyclip") == ["anomalyclip-mvtec", "anomalyclip-visa"]
    assert by_name["adaptclip-visa"].source == (
        "hf-hub:csgaobb/AdaptCLIP/12_4_128_train_on_visa_3adapters_batch8/epoch_15.pth"
    )
    mv, visa = by_name["anomalyclip-mvtec"], by_name["anomalyclip-visa"]
    assert mv.source.endswith("zqhang/AnomalyCLIP/main/checkpoints/9_12_4_multiscale/epoch_15.pth")
    assert mv.git_blob_sha1 == "c90f1d9d92d158b436a8fc193f984d4cec8b1fc8"
    assert visa.source.endswith("checkpoints/9_12_4_multiscale_visa/epoch_15.pth")
    assert visa.git_blob_sha1 == "72adc786e031b49ea288ba5f815f0d38cf158708"
    assert len({w.filename for w in WEIGHTS}) == len(WEIGHTS)  # no two share a cache file


def test_default_checkpoint_is_trained_on_the_other_family() -> None:
    assert default_checkpoint("adaptclip") == "adaptclip-mvtec"  # your own images
    assert default_checkpoint("adaptclip", "visa") == "adaptclip-mvtec"
    assert default_checkpoint("adaptclip", "MVTec") == "adaptclip-visa"
    assert default_checkpoint("anomalyclip", "mvtec") == "anomalyclip-visa"
    assert default_checkpoint("anomalyclip") == "anomalyclip-mvtec"
    assert default_checkpoint("patchcore") is None


# ----------------------------------------------------------------------------- git blob id
def test_git_blob_sha1_matches_git_hash_object(tmp_path: Path) -> None:
    f = tmp_path / "w.pth"
    f.write_bytes(PAYLOAD)
    assert git_blob_sha1_file(f) == _blob(PAYLOAD)
    try:
        out = subprocess.run(
            ["git", "hash-object", str(f)], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not installed")
    assert git_blob_sha1_file(f) == out.stdout.strip()


def test_download_from_local_http_server_is_checked_by_git_blob(
    cache: Path, http_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, root = http_server
    (root / "epoch_15.pth").write_bytes(PAYLOAD)
    good = WeightSpec("t-good", f"{url}/epoch_15.pth", "t-good.pth", git_blob_sha1=_blob(PAYLOAD))
    _with_spec(monkeypatch, good)
    path = resolve_weights("t-good")
    assert path == cache / "t-good.pth" and path.read_bytes() == PAYLOAD
    bad = WeightSpec("t-bad", f"{url}/epoch_15.pth", "t-bad.pth", git_blob_sha1="0" * 40)
    _with_spec(monkeypatch, bad)
    with pytest.raises(WeightNotAvailableError, match=r"git blob id is [0-9a-f]{40}, not 0{40}"):
        resolve_weights("t-bad")
    assert not (cache / "t-bad.pth").exists()  # a wrong download is not kept


def test_cached_file_with_wrong_git_blob_is_refused(
    cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = tmp_path / "src.pth"
    src.write_bytes(PAYLOAD)
    spec = WeightSpec("t-file", src.as_uri(), "t-file.pth", git_blob_sha1=_blob(PAYLOAD))
    _with_spec(monkeypatch, spec)
    assert resolve_weights("t-file").read_bytes() == PAYLOAD  # file:// download
    (cache / "t-file.pth").write_bytes(PAYLOAD + b"tampered")
    with pytest.raises(WeightNotAvailableError, match="cached file's git blob id"):
        resolve_weights("t-file")


# ---------------------------------------------------------------------------- fail fast
def test_unreachable_server_fails_at_once_with_the_download_command(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = WeightSpec("t-net", f"http://127.0.0.1:{_closed_port()}/epoch_15.pth", "t-net.pth")
    _with_spec(monkeypatch, spec)
    t0 = time.perf_counter()
    with pytest.raises(WeightNotAvailableError) as info:
        resolve_weights("t-net")
    assert time.perf_counter() - t0 < 5.0
    msg = str(info.value)
    assert "no network" in msg and str(cache / "t-net.pth") in msg
    assert "`anomalens weights download t-net`" in msg


def test_probe_that_gets_no_answer_gives_up_after_the_timeout() -> None:
    # a listening socket whose backlog is full never completes a new connection on Linux;
    # whatever the platform does, the probe must come back within its timeout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        fillers = []
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(s.getsockname())
            fillers.append(c)
        t0 = time.perf_counter()
        W.check_reachable(f"http://127.0.0.1:{s.getsockname()[1]}/x", timeout=0.5)
        assert time.perf_counter() - t0 < 2.0
        for c in fillers:
            c.close()


def test_offline_catalogue_checkpoint_names_file_cache_and_command(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    with pytest.raises(WeightNotAvailableError) as info:
        resolve_weights("anomalyclip-visa")
    msg = str(info.value)
    assert "anomalyclip-train-on-visa-epoch_15.pth" in msg and str(cache) in msg
    assert "`anomalens weights download anomalyclip-visa`" in msg


def test_check_weight_file(tmp_path: Path, cache: Path) -> None:
    for ok in ("openai", "adaptclip-mvtec", "hf-hub:a/b/c.pth", "https://x.org/w.pth"):
        check_weight_file(ok, "--weights")
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    check_weight_file(str(f), "--weights")
    with pytest.raises(FileNotFoundError, match=r"--checkpoint .*nope\.pth does not exist"):
        check_weight_file(str(tmp_path / "nope.pth"), "--checkpoint")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        check_weight_file(str(tmp_path) + "/", "--weights")


# ------------------------------------------------------------------ no silent random weights
@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    from anomalens.backbones.tiny import make_tiny_clip

    return make_tiny_clip(seed=0, image_size=64)


@pytest.mark.parametrize("method", ["adaptclip", "anomalyclip"])
def test_no_checkpoint_is_refused_unless_untrained(tiny, method: str) -> None:  # type: ignore[no-untyped-def]
    from anomalens.registry import create_detector

    with pytest.raises(ValueError, match=r"--untrained"):
        create_detector(method, backbone=tiny)
    with pytest.raises(ValueError, match="not both"):
        create_detector(method, backbone=tiny, untrained=True, checkpoint="x.pth")
    with pytest.warns(UserWarning, match="untrained"):
        det = create_detector(method, backbone=tiny, untrained=True)
    cfg = det.config()
    assert cfg["untrained"] is True and "UNTRAINED" in cfg["warning"]


def test_checkpoint_of_another_method_or_missing_file_is_refused(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from anomalens.registry import create_detector

    with pytest.raises(ValueError, match="anomalyclip weights, not AdaptCLIP adapters"):
        create_detector("adaptclip", backbone=tiny, checkpoint="anomalyclip-mvtec")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth does not exist"):
        create_detector("anomalyclip", backbone=tiny, checkpoint=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("method", ["adaptclip", "anomalyclip"])
def test_default_is_the_official_checkpoint_from_the_cache(
    tiny, method: str, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Offline: the default checkpoint is taken from the cache, or the error names it."""
    from anomalens.detectors._clip_base import FrozenClipDetector
    from anomalens.registry import create_detector

    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    monkeypatch.setattr(FrozenClipDetector, "fits_official_checkpoints", lambda self: True)
    name = f"{method}-mvtec"
    with pytest.raises(WeightNotAvailableError, match=f"`anomalens weights download {name}`"):
        create_detector(method, backbone=tiny)
    # a checkpoint of the right sizes placed under the catalogue file name is picked up
    with pytest.warns(UserWarning):
        donor = create_detector(method, backbone=tiny, untrained=True, seed=3)
    # our stand-in is a safetensors file, not the official .pth: same entry, other file name
    spec = next(w for w in WEIGHTS if w.name == name)
    _with_spec(monkeypatch, dataclasses.replace(spec, filename=f"{name}.safetensors"))
    monkeypatch.setattr(W, "_digest_mismatch", lambda path, spec: None)
    donor.save_checkpoint(cache / f"{name}.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained detector does not warn
        det = create_detector(method, backbone=tiny)
    cfg = det.config()
    assert cfg["checkpoint_name"] == name and cfg["untrained"] is False and "warning" not in cfg
    images = [np.full((64, 64, 3), 100 + 20 * i, np.uint8) for i in range(2)]
    assert np.allclose(
        det.fit(None).predict(images).image_score.numpy(),
        donor.fit(None).predict(images).image_score.numpy(),
    )


# ------------------------------------------------------------------------------------ CLI
def _folder(tmp_path: Path, n: int = 3) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def test_cli_untrained_runs_are_marked_and_missing_files_fail_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from anomalens.cli.main import main

    images = _folder(tmp_path)
    base = ["predict", "--method", "anomalyclip", "--backbone", "anomalens-tiny-clip@64"]
    base += ["--images", str(images), "-q"]
    # no checkpoint, no --untrained: refused with the way out
    assert main([*base, "--out", str(tmp_path / "a")]) == 1
    assert "--untrained" in capsys.readouterr().err
    # a missing --checkpoint / --weights file: refused before anything is built
    for flag in ("--checkpoint", "--weights"):
        with pytest.raises(SystemExit, match=rf"{flag} .*gone\.pth does not exist"):
            main([*base, flag, str(tmp_path / "gone.pth"), "--out", str(tmp_path / "b")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main([*base, "--untrained", "--out", str(tmp_path / "c")]) == 0
    run = json.loads((tmp_path / "c" / "run.json").read_text())
    assert run["settings"]["detector"]["untrained"] is True
    assert "UNTRAINED" in run["settings"]["detector"]["warning"]
    assert "UNTRAINED AnomalyCLIP" in (tmp_path / "c" / "report.html").read_text()


class _Built(Exception):
    pass


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        ("adaptclip", {}, "adaptclip-visa"),  # MVTec AD: the VisA-trained checkpoint
        ("anomalyclip", {}, "anomalyclip-visa"),
        ("anomalyclip", {"checkpoint": "mine.pth"}, "mine.pth"),  # given: kept
        ("anomalyclip", {"untrained": True}, None),
        ("patchcore", {}, None),
    ],
)
def test_benchmark_on_mvtec_uses_the_checkpoint_trained_on_visa(
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    options: dict,
    expected: str | None,
) -> None:
    from anomalens.benchmark import runner

    seen: dict = {}

    def fake_create(name: str, **kwargs: object) -> None:
        seen.update(kwargs)
        raise _Built

    monkeypatch.setattr(runner, "create_detector", fake_create)
    cfg = runner.BenchmarkConfig(
        method=method,
        dataset="mvtec",
        root=str(synthetic_root),
        out=str(tmp_path / "bench"),
        method_kwargs=dict(options),
    )
    with pytest.raises(_Built):
        runner.run_benchmark(cfg, progress=False)
    assert seen.get("checkpoint") == expected
