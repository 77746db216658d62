"""The benchmark gives each category's name to the detector (WinCLIP prompts name the object)."""

from __future__ import annotations

from pathlib import Path

from anomalens.benchmark.runner import BenchmarkConfig, run_benchmark
from anomalens.data.synthetic import generate_synthetic_dataset


def test_winclip_jobs_prompt_with_their_own_category_name(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(
        tmp_path / "data",
        categories=["screw", "tile"],
        n_train=1,
        n_test_good=1,
        n_test_defect=1,
        image_size=48,
    )
    cfg = BenchmarkConfig(
        method="winclip",
        dataset="mvtec",
        root=str(root),
        out=str(tmp_path / "bench"),
        shots=[0, 1],
        seeds=[0],
        method_kwargs={
            "model_name": "anomalens-tiny-clip",
            "pretrained": None,
            "image_size": 48,
            "scales": [2],
        },
    )
    rows = run_benchmark(cfg, progress=False)
    used = {(r["category"], r["k"]): r["detector"]["class_name"] for r in rows}
    assert used == {
        ("screw", 0): "screw",
        ("screw", 1): "screw",
        ("tile", 0): "tile",
        ("tile", 1): "tile",
    }
    assert all(r["detector"]["category"] == r["category"] for r in rows)
