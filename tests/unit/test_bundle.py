"""Weight resolver and offline bundles: the whole download/pack/unpack cycle on small files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from anomalens.backbones.bundle import BundleError, pack_weights, unpack_weights
from anomalens.backbones.weights import WeightNotAvailableError, resolve_weights


def test_pack_unpack_cycle_and_resolution(tmp_path, monkeypatch):
    src = tmp_path / "weights"
    (src / "sub").mkdir(parents=True)
    (src / "a.safetensors").write_bytes(b"A" * 100)
    (src / "sub" / "b.pth").write_bytes(b"B" * 50)
    bundle = pack_weights(src, tmp_path / "bundle.tar")
    cache = tmp_path / "cache"
    files = unpack_weights(bundle, cache)
    assert sorted(p.relative_to(cache).as_posix() for p in files) == ["a.safetensors", "sub/b.pth"]
    assert (cache / "a.safetensors").read_bytes() == b"A" * 100
    monkeypatch.setenv("ANOMALENS_CACHE", str(cache))
    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    # a bare file name is found in the cache; an absolute path is returned as is
    assert resolve_weights("a.safetensors") == cache / "a.safetensors"
    assert resolve_weights(src / "a.safetensors") == src / "a.safetensors"


def test_symlinked_weight_files_are_packed_as_their_content(tmp_path):
    # e.g. a Hugging Face cache snapshot, whose files are links into blobs/
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "0abc").write_bytes(b"W" * 20)
    src = tmp_path / "snapshot"
    src.mkdir()
    (src / "model.safetensors").symlink_to(tmp_path / "blobs" / "0abc")
    bundle = pack_weights(src, tmp_path / "b.tar")
    files = unpack_weights(bundle, tmp_path / "cache")
    assert [p.read_bytes() for p in files] == [b"W" * 20]


def test_tampered_or_unsafe_bundles_are_refused(tmp_path):
    src = tmp_path / "w"
    src.mkdir()
    (src / "x.bin").write_bytes(b"x" * 10)
    bundle = pack_weights(src, tmp_path / "b.tar")
    # rewrite the payload with other bytes but keep the manifest
    tampered = tmp_path / "t.tar"
    with tarfile.open(bundle) as tin, tarfile.open(tampered, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name == "x.bin":
                data = b"y" * 10
            tout.addfile(m, io.BytesIO(data))
    with pytest.raises(BundleError, match="checksum"):
        unpack_weights(tampered, tmp_path / "c1")
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        for name, data in (("MANIFEST.json", b'{"files": []}'), ("../escape.bin", b"z")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match="unsafe"):
        unpack_weights(evil, tmp_path / "c2")
    assert not (tmp_path / "escape.bin").exists()
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as t:
        t.add(src / "x.bin", arcname="x.bin")
    with pytest.raises(BundleError, match="not an anomalens weights bundle"):
        unpack_weights(plain, tmp_path / "c3")


@pytest.mark.parametrize(
    "source", ["resnet18", "hf-hub:org/repo/model.safetensors", "https://example.invalid/w.pth"]
)
def test_offline_and_uncached_names_the_file_cache_and_command(tmp_path, monkeypatch, source):
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    with pytest.raises(WeightNotAvailableError) as e:
        resolve_weights(source)
    msg = str(e.value)
    assert "offline" in msg and str(tmp_path / "empty-cache") in msg
    assert "anomalens weights download" in msg


def test_missing_local_file(tmp_path):
    with pytest.raises(WeightNotAvailableError, match="does not exist"):
        resolve_weights(tmp_path / "nope.safetensors")


def test_hf_offline_variable_is_honoured(tmp_path, monkeypatch):
    monkeypatch.delenv("ANOMALENS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path))
    with pytest.raises(WeightNotAvailableError, match="offline"):
        resolve_weights("hf-hub:a/b")
    Path(tmp_path / "hf" / "a--b").mkdir(parents=True)
    (tmp_path / "hf" / "a--b" / "open_clip_model.safetensors").write_bytes(b"w")
    assert resolve_weights("hf-hub:a/b").read_bytes() == b"w"


def test_download_pack_unpack_resolve_cycle_with_a_file_url(tmp_path, monkeypatch, capsys):
    """The offline-factory workflow end to end: download on the 'connected' machine, pack,
    unpack into another cache on the 'offline' machine, resolve offline by the same source."""
    from anomalens.cli.main import main

    src = tmp_path / "published" / "model.safetensors"
    src.parent.mkdir()
    src.write_bytes(b"weights-bytes")
    url = src.as_uri()
    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    assert (
        main(["weights", "download", url, "--to", str(tmp_path / "dl")]) == 0
    )  # download ignores offline
    assert main(["weights", "pack", str(tmp_path / "dl"), "--out", str(tmp_path / "b.tar")]) == 0
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "factory-cache"))
    with pytest.raises(WeightNotAvailableError):
        resolve_weights(url)  # offline and not yet cached on the factory machine
    assert main(["weights", "unpack", str(tmp_path / "b.tar")]) == 0
    got = resolve_weights(url)
    assert got.read_bytes() == b"weights-bytes" and str(tmp_path / "factory-cache") in str(got)


def test_hf_ids_cannot_escape_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"'\.\.'"):
        resolve_weights("hf-hub:org/repo/../../secret.bin")


def _bundle_with(tmp_path: Path, manifest_size: int, payload: bytes) -> Path:
    import hashlib
    import json

    manifest = {
        "format": "anomalens-weights-bundle/1",
        "files": [
            {"path": "w.bin", "size": manifest_size, "sha256": hashlib.sha256(payload).hexdigest()}
        ],
    }
    out = tmp_path / f"b{manifest_size}.tar"
    with tarfile.open(out, "w") as t:
        for name, data in (("MANIFEST.json", json.dumps(manifest).encode()), ("w.bin", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out


def test_unpack_checks_the_declared_size_before_writing(tmp_path, monkeypatch):
    import builtins

    bundle = _bundle_with(tmp_path, 10, b"z" * 3_000_000)
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, mode="r", *a, **kw):  # records every file opened for writing
        if "w" in mode:
            opened.append(str(file))
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy)
    with pytest.raises(BundleError, match=r"'w\.bin' is 3000000 bytes but its manifest says 10"):
        unpack_weights(bundle, tmp_path / "cache")
    monkeypatch.undo()
    assert not any(p.endswith("w.bin") for p in opened)  # refused before a byte was written
    assert not (tmp_path / "cache").exists()
    ok = _bundle_with(tmp_path, 5, b"12345")
    assert [p.read_bytes() for p in unpack_weights(ok, tmp_path / "cache")] == [b"12345"]


def test_corrupt_safetensors_name_the_file(tmp_path):
    from anomalens.backbones.clip import load_state_dict_file
    from anomalens.backbones.cnn import read_state_dict
    from anomalens.backbones.weights import read_checkpoint

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    for read in (
        lambda: read_checkpoint(bad, "AdaptCLIP checkpoint"),
        lambda: read_state_dict(bad),
        lambda: load_state_dict_file(bad),
    ):
        with pytest.raises(ValueError, match=r"broken\.safetensors: not a valid safetensors file"):
            read()


def test_names_in_cache_only_never_reads_the_working_directory(tmp_path, monkeypatch):
    from anomalens.backbones.weights import names_in_cache_only, read_checkpoint

    cache = tmp_path / "cache"
    cache.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "only-here.pth").write_bytes(b"x")
    (cache / "cached.pth").write_bytes(b"y")
    monkeypatch.chdir(work)
    monkeypatch.setenv("ANOMALENS_CACHE", str(cache))
    monkeypatch.setenv("ANOMALENS_OFFLINE", "1")
    assert resolve_weights("only-here.pth") == Path("only-here.pth")  # the CLI still may
    with names_in_cache_only():
        assert resolve_weights("cached.pth") == cache / "cached.pth"
        with pytest.raises(WeightNotAvailableError, match="not in the weight cache"):
            resolve_weights("only-here.pth")
        with pytest.raises(WeightNotAvailableError, match="not a path"):
            resolve_weights(str(work / "only-here.pth"))
        with pytest.raises(WeightNotAvailableError, match="not in the weight cache"):
            read_checkpoint("only-here.pth", "AdaptCLIP checkpoint")
    assert resolve_weights("cached.pth") == cache / "cached.pth"
