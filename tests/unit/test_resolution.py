"""Issue 15 §1 end to end: view flags on predict / fit / model files, the pixel threshold of
masks in every path, and weight files used with the wrong preprocessing preset."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from anomalens.backbones.cnn import (
    PRESET_METADATA_KEY,
    check_weights_preset,
    create_cnn_backbone,
    weights_preprocessing,
)
from anomalens.backbones.presets import get_cnn_preset
from anomalens.cli.main import main
from anomalens.model_file import MODEL_JSON
from anomalens.pipeline import ThresholdSpec, fit_model, load_model_for_predict, run_predict
from anomalens.registry import create_detector
from anomalens.results import judge_image
from anomalens.thresholds import Threshold, calibrate_leave_one_out

REPO = Path(__file__).resolve().parents[2]
SHARED_MOBILENET = (REPO / ".." / "shared" / "weights").resolve() / (
    "mobilenet_v2_imagenet_int8dequant.safetensors"
)


def _write(folder: Path, name: str, arr: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(folder / name)
    return folder / name


@pytest.fixture
def wide(tmp_path: Path) -> tuple[Path, Path]:
    """Good 32x160 images and incoming ones, one with a thin bright line."""
    rng = np.random.default_rng(0)
    good, incoming = tmp_path / "good", tmp_path / "incoming"
    for i in range(3):
        _write(good, f"g{i}.png", rng.integers(100, 110, (32, 160, 3), dtype=np.uint8))
        _write(incoming, f"ok{i}.png", rng.integers(100, 110, (32, 160, 3), dtype=np.uint8))
    bad = rng.integers(100, 110, (32, 160, 3), dtype=np.uint8)
    bad[:, 100:102] = 255
    _write(incoming, "line.png", bad)
    return good, incoming


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


# ----------------------------------------------------------------------------- view flags
def test_predict_with_tiles_records_the_views_and_writes_full_size_masks(wide, tmp_path):
    good, incoming = wide
    out = tmp_path / "r"
    argv = ["predict", "--method", "toy", "--normal", str(good), "--images", str(incoming)]
    argv += ["--tile", "32", "--tile-overlap", "0.5", "--resize", "letterbox", "-q"]
    assert main([*argv, "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert '"tile": 32' in json.dumps(run) and '"letterbox"' in json.dumps(run)
    rows = _rows(out)
    assert rows["line.png"]["decision"] == "anomalous"
    assert all(rows[f"ok{i}.png"]["decision"] == "normal" for i in range(3))
    mask = np.asarray(Image.open(out / rows["line.png"]["mask"]))
    assert mask.shape == (32, 160)
    on_line = mask[:, 90:112].sum() / max(mask.sum(), 1)
    assert mask[:, 100:102].any() and on_line > 0.8  # the region sits on the line


def test_bad_view_flags_are_refused_with_the_reason(wide, tmp_path, capsys):
    good, incoming = wide
    base = ["predict", "--method", "toy", "--normal", str(good), "--images", str(incoming)]
    with pytest.raises(SystemExit, match="roi must be four integers"):
        main([*base, "--roi", "1,2,3", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"tile_overlap must be in \[0, 1\)"):
        main([*base, "--tile", "32", "--tile-overlap", "1.5", "--out", str(tmp_path / "b")])


def test_fit_with_views_then_predict_model_gives_the_fresh_run(wide, tmp_path):
    good, incoming = wide
    views = ["--tile", "32", "--roi", "0,0,150,32"]
    pc = ["--method", "patchcore", "--backbone", "resnet18", "--weights", "random"]
    pc += ["--image-size", "32"]
    model = tmp_path / "m"
    assert main(["fit", *pc, *views, "--normal", str(good), "--out", str(model)]) == 0
    info = json.loads((model / MODEL_JSON).read_text())
    assert info["views"]["tile"] == 32 and info["views"]["roi"] == [0, 0, 150, 32]
    a, b = tmp_path / "a", tmp_path / "b"
    assert (
        main(["predict", "--model", str(model), "--images", str(incoming), "-q", "--out", str(a)])
        == 0
    )
    argv = ["predict", *pc, *views, "--normal", str(good), "--images", str(incoming), "-q"]
    assert main([*argv, "--out", str(b)]) == 0
    ra, rb = _rows(a), _rows(b)
    assert {k: v["score"] for k, v in ra.items()} == {k: v["score"] for k, v in rb.items()}
    with pytest.raises(SystemExit, match="--tile cannot be used with --model"):
        main(
            [
                "predict",
                "--model",
                str(model),
                "--images",
                str(incoming),
                "--tile",
                "16",
                "--out",
                str(tmp_path / "c"),
            ]
        )


def test_benchmark_refuses_view_flags(tmp_path, capsys):
    # the benchmark has no view flags yet (benchmarks/resolution_magnetic_tile.py compares them)
    with pytest.raises(SystemExit, match="2"):
        main(
            [
                "benchmark",
                "--method",
                "toy",
                "--dataset",
                "mvtec",
                "--root",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--tile",
                "64",
            ]
        )
    assert "unrecognized arguments: --tile 64" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pixel threshold
def test_masks_use_the_pixel_threshold_and_stay_empty_on_normal_images() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    amap = np.array([[0.1, 0.3], [0.6, 0.9]], np.float32)
    thr = Threshold(value=0.8, pixel_value=0.25, method="leave-one-out")
    judged = judge_image(image, amap, 0.9, thr)
    assert judged.decision == "anomalous"
    assert judged.mask.sum() == (judged.anomaly_map > 0.25).sum()
    assert judged.mask.sum() > (judged.anomaly_map > 0.8).sum()  # not the image threshold
    normal = judge_image(image, amap, 0.5, thr)
    assert normal.decision == "normal" and not normal.mask.any() and normal.region.any()


def test_leave_one_out_sets_the_pixel_threshold_from_the_normal_maps() -> None:
    rng = np.random.default_rng(3)
    shots = [rng.integers(90, 140, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    thr = calibrate_leave_one_out(lambda: create_detector("toy"), shots)
    held_out = [
        create_detector("toy").fit(shots[:i] + shots[i + 1 :]).predict([shots[i]]) for i in range(3)
    ]
    pix = np.concatenate([p.anomaly_map.numpy().ravel() for p in held_out])
    assert thr.pixel_value == pytest.approx(float(np.percentile(pix, 99.9)))
    assert thr.pixel_value != thr.value


def test_a_fixed_image_threshold_keeps_the_models_pixel_threshold(wide, tmp_path):
    good, incoming = wide
    normals, images = sorted(good.iterdir()), sorted(incoming.iterdir())
    # a saved model keeps its pixel threshold when only the image threshold changes
    pc = lambda: create_detector(  # noqa: E731
        "patchcore", backbone="resnet18", weights="random", image_size=32
    )
    fitted = fit_model(pc, normals, tmp_path / "m")
    det, saved = load_model_for_predict(fitted.path)
    s = run_predict(
        None,
        images,
        tmp_path / "r2",
        detector=det,
        model_threshold=saved,
        threshold=ThresholdSpec(fixed=123.0),
        progress=False,
    )
    assert saved is not None and s.threshold.pixel_threshold == saved.pixel_value
    assert s.threshold.details["pixel_source"] == "model (leave-one-out)"
    user = run_predict(
        None,
        images,
        tmp_path / "r3",
        detector=det,
        model_threshold=saved,
        threshold=ThresholdSpec(fixed=123.0, pixel_fixed=7.0),
        progress=False,
    )
    assert user.threshold.pixel_threshold == 7.0


# ----------------------------------------------------------------------------- weight presets
def _mobilenet_file(path: Path, metadata: dict[str, str]) -> Path:
    import torchvision

    sd = torchvision.models.mobilenet_v2(weights=None).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def test_metadata_naming_another_preset_warns_and_the_right_one_is_silent(tmp_path):
    f = _mobilenet_file(tmp_path / "w.safetensors", {PRESET_METADATA_KEY: "mobilenet_v2_tf"})
    assert weights_preprocessing(f) == ("mobilenet_v2_tf", None)
    with pytest.warns(UserWarning, match="--backbone mobilenet_v2_tf"):
        create_cnn_backbone("mobilenet_v2", weights=f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_cnn_backbone("mobilenet_v2_tf", weights=f)


def test_metadata_saying_minus_one_to_one_warns_with_an_imagenet_preset(tmp_path):
    f = _mobilenet_file(
        tmp_path / "w.safetensors", {"preprocessing": "scale to [-1,1] as x/127.5 - 1"}
    )
    with pytest.warns(UserWarning, match=r"scaled to \[-1, 1\]"):
        msg = check_weights_preset(get_cnn_preset("mobilenet_v2"), f)
    assert msg is not None and "mobilenet_v2_tf" in msg
    assert check_weights_preset(get_cnn_preset("mobilenet_v2_tf"), f) is None
    plain = _mobilenet_file(tmp_path / "plain.safetensors", {})
    assert check_weights_preset(get_cnn_preset("mobilenet_v2"), plain) is None


def test_the_shared_tf_mobilenet_is_known_by_metadata_and_sha256(tmp_path):
    if not SHARED_MOBILENET.exists():
        pytest.skip(f"needs {SHARED_MOBILENET} (the team's shared/ folder beside the checkout)")
    assert weights_preprocessing(SHARED_MOBILENET) == ("mobilenet_v2_tf", "[-1,1]")
    with pytest.warns(UserWarning, match="made for backbone preset 'mobilenet_v2_tf'"):
        create_cnn_backbone("mobilenet_v2", weights=SHARED_MOBILENET)
    # the same bytes under another name, its metadata intact: still recognised
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(SHARED_MOBILENET.read_bytes())
    assert weights_preprocessing(copy)[0] == "mobilenet_v2_tf"


def test_model_files_with_embedded_cnn_weights_record_their_preset(tmp_path):
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    shots = [rng.integers(90, 140, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    det = create_detector("patchcore", backbone="resnet18", weights="random", image_size=32)
    det.fit(shots).save(tmp_path / "m", embed_weights=True)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta[PRESET_METADATA_KEY] == "resnet18"
