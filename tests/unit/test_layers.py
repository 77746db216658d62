"""The package's imports go one way: front ends -> application -> API -> detectors ->
building blocks -> foundation (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import anomalens

PKG = Path(anomalens.__file__).parent

#: layer of each top-level module or sub-package (higher imports lower, never the reverse)
LAYERS: dict[str, int] = {
    "types": 0,
    "fileio": 0,
    "data": 1,
    "backbones": 1,
    "scoring": 1,
    "metrics": 1,
    "viz": 1,
    "prompts": 1,
    "detectors": 2,
    "registry": 3,
    "model_file": 3,
    "geometry": 3,
    "__init__": 3,
    "thresholds": 4,
    "results": 4,
    "results_parquet": 4,
    "reference": 4,
    "pipeline": 4,
    "distributed": 4,
    "benchmark": 4,
    "training": 4,
    "demo": 4,
    "export": 4,
    "inference": 4,
    "service": 5,
    "cli": 5,
    "__main__": 5,
}
#: allowed upward imports: detectors register themselves with the registry's decorator, and
#: ``Detector.save`` writes through the model-file module
ALLOWED = {("detectors", "registry"), ("detectors", "model_file")}


def _top(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "anomalens":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
    return out


def test_every_module_has_a_layer() -> None:
    tops = {p.relative_to(PKG).parts[0].removesuffix(".py") for p in PKG.rglob("*.py")}
    assert tops <= set(LAYERS), f"give {sorted(tops - set(LAYERS))} a layer in LAYERS"


def test_imports_only_go_down() -> None:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        src = path.relative_to(PKG).parts[0].removesuffix(".py")
        for line, module in _imports(path):
            dst = _top(module)
            if dst is None or dst == src or (src, dst) in ALLOWED:
                continue
            if LAYERS[dst] > LAYERS[src]:
                bad.append(f"{path.relative_to(PKG)}:{line} ({src}) imports {module} ({dst})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_front_ends_import_no_private_module() -> None:
    bad = []
    for path in sorted((PKG / "service").rglob("*.py")) + sorted((PKG / "cli").rglob("*.py")):
        for line, module in _imports(path):
            parts = module.split(".")
            own = path.relative_to(PKG).parts[0]  # a package may use its own private modules
            if (
                parts[0] == "anomalens"
                and parts[1:2] != [own]
                and any(p.startswith("_") for p in parts[1:])
            ):
                bad.append(f"{path.relative_to(PKG)}:{line} imports {module}")
    assert not bad, "front ends import private modules:\n" + "\n".join(bad)
