"""Running exported models without PyTorch: a torch-blocked subprocess, result files equal to the
PyTorch path's, OpenVINO and TorchScript exports."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens import create_detector
from anomalens.thresholds import Threshold

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'anomalens[onnx]'")
pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'anomalens[onnx]'")

from anomalens.export import export_detector
from anomalens.inference import load_inferencer
from anomalens.inference._folder import heatmap_rgb, resize_map

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-4

_BLOCKED_RUN = textwrap.dedent(
    """
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())
    from anomalens.inference import load_inferencer, run_folder

    inf = load_inferencer(sys.argv[1], num_threads=1)
    rows = run_folder(inf, sys.argv[2], sys.argv[3], batch_size=2)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "matplotlib"))
    print("ROWS", len(rows), "IMPORTED", heavy)
    """
)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    torch.manual_seed(0)
    det = create_detector("patchcore", backbone="resnet18", weights="random", image_size=64)
    rng = np.random.default_rng(0)
    det.fit([rng.integers(60, 200, (64, 64, 3), dtype=np.uint8) for _ in range(2)])
    folder = tmp_path_factory.mktemp("incoming")
    for i, (h, w) in enumerate([(64, 64), (80, 100), (50, 70), (64, 64)]):
        im = rng.integers(60, 200, (h, w, 3), dtype=np.uint8)
        im[10:20, 10:25] = 255  # a bright "defect"
        Image.fromarray(im).save(folder / f"img_{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    paths = sorted(p for p in folder.iterdir() if p.name != "broken.png")
    ref = det.predict(paths)
    top = ref.image_score.sort(descending=True).values
    thr = Threshold(float(top[1] + top[2]) / 2, None, "fixed", vis_range=None)
    return {"det": det, "folder": folder, "paths": paths, "ref": ref, "thr": thr}


def test_exported_model_runs_end_to_end_with_torch_blocked(
    fitted: dict[str, object], tmp_path: Path
) -> None:
    from anomalens.results import judge_image, write_result_images

    model = export_detector(fitted["det"], tmp_path / "model", threshold=fitted["thr"])
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, str(model), str(fitted["folder"]), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROWS 4 IMPORTED []" in proc.stdout, proc.stdout

    rows = list(csv.DictReader((out / "results.csv").open()))
    jsonl = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in fitted["paths"]]
    assert [r["path"] for r in jsonl] == [r["path"] for r in rows]
    errors = list(csv.DictReader((out / "errors.csv").open()))
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.png")

    ref, thr = fitted["ref"], fitted["thr"]
    ref_scores, ref_maps = ref.to_numpy()
    mask_agree = []
    for row, path, score, amap in zip(jsonl, fitted["paths"], ref_scores, ref_maps):
        assert abs(row["score"] - float(score)) <= ATOL
        # the PyTorch path's decision, mask and overlay for the same image
        image = np.asarray(Image.open(path).convert("RGB"))
        judged = judge_image(image, amap, float(score), thr)
        assert row["decision"] == judged.decision
        write_result_images(
            tmp_path / "torch", {"overlay": "o.png", "mask": "m.png"}, image, judged, thr
        )
        ours_mask = np.asarray(Image.open(out / row["mask"])) > 0
        mask_agree.append(float((ours_mask == judged.mask).mean()))
        ours_overlay = np.asarray(Image.open(out / row["overlay"])).astype(int)
        theirs = np.asarray(Image.open(tmp_path / "torch" / "o.png")).astype(int)
        assert ours_overlay.shape == theirs.shape
        # colours may step by one table entry where the map differs in the 6th digit
        assert (np.abs(ours_overlay - theirs).max(axis=2) <= 8).mean() >= 0.999
    assert min(mask_agree) >= 0.999, mask_agree


def test_heatmap_and_resize_equal_the_pytorch_path() -> None:
    from anomalens.viz.overlay import heatmap_rgb as mpl_heatmap
    from anomalens.viz.overlay import resize_map as torch_resize

    values = np.concatenate([np.linspace(0, 1, 4097), [0.0, 1.0, 0.5]]).reshape(1, -1)
    assert np.array_equal(heatmap_rgb(values), mpl_heatmap(values))
    amap = np.random.default_rng(0).random((28, 28)).astype(np.float32)
    for h, w in [(64, 64), (97, 41), (20, 300)]:
        np.testing.assert_allclose(resize_map(amap, h, w), torch_resize(amap, h, w), atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated in torch 2.14
def test_openvino_and_torchscript_exports_match(fitted: dict[str, object], tmp_path: Path) -> None:
    pytest.importorskip(
        "openvino", reason="needs the openvino extra: pip install 'anomalens[openvino]'"
    )
    det, ref = fitted["det"], fitted["ref"]
    ov_dir = export_detector(det, tmp_path / "ov", format="openvino", threshold=fitted["thr"])
    assert sorted(p.name for p in ov_dir.iterdir()) == ["metadata.json", "model.bin", "model.xml"]
    res = load_inferencer(ov_dir, num_threads=1).predict(fitted["paths"], batch_size=3)
    np.testing.assert_allclose(res.image_score, ref.image_score.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(res.anomaly_map, ref.anomaly_map.numpy(), atol=ATOL, rtol=0)

    ts_dir = export_detector(det, tmp_path / "ts", format="torchscript")
    module = torch.jit.load(str(ts_dir / "model.pt"))
    inf_batch = load_inferencer(ov_dir).preprocess(fitted["paths"])
    score, amap = module(torch.from_numpy(inf_batch))
    torch.testing.assert_close(score, ref.image_score, atol=ATOL, rtol=0)
    torch.testing.assert_close(amap, ref.anomaly_map, atol=ATOL, rtol=0)


def test_predict_model_runs_an_exported_folder(
    fitted: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from anomalens.cli.main import main

    model = export_detector(fitted["det"], tmp_path / "model", threshold=fitted["thr"])
    argv = ["predict", "--model", str(model), "--images", str(fitted["folder"])]
    assert main([*argv, "--out", str(tmp_path / "r"), "-q"]) == 0
    assert "4 images scored with the exported model" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "r" / "results.csv").open()))
    scores = sorted(float(r["score"]) for r in rows)
    ref = sorted(float(s) for s in fitted["ref"].image_score)
    assert np.allclose(scores, ref, atol=1e-4)
    with pytest.raises(SystemExit, match=r"threshold is fixed in metadata\.json"):
        main([*argv, "--out", str(tmp_path / "r2"), "--threshold", "1"])
