"""The command line answers --help and argument errors without importing torch, and a long
command prints what it loads before the first slow import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

#: modules that take seconds to import and must wait until a command needs them
HEAVY = ("torch", "torchvision", "numpy", "PIL", "open_clip", "fastapi", "matplotlib")


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )


_CHECK = """
import sys
from anomalens.cli.main import build_parser, main
build_parser()
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["predict", "--help"],
        ["fit", "--help"],
        ["benchmark", "--help"],
        ["train", "--help"],
        ["serve", "--help"],
        ["weights", "--help"],
        ["predict"],  # argument error: --out missing
        ["benchmark", "--method", "patchcore", "--dataset", "nope", "--root", ".", "--out", "o"],
        ["--version"],
    ],
)
def test_help_and_argument_errors_import_no_torch(argv):
    res = _python(_CHECK.format(heavy=HEAVY), *argv)
    assert res.returncode == 0, res.stderr
    assert "HEAVY:\n" in res.stdout or res.stdout.rstrip().endswith("HEAVY:"), res.stdout
    if argv == ["predict"]:
        assert "the following arguments are required: --out" in res.stderr
    if "nope" in argv:
        assert "invalid choice: 'nope'" in res.stderr


def test_import_anomalens_is_lazy_but_complete():
    res = _python(
        "import sys, anomalens\n"
        "assert 'torch' not in sys.modules, 'import anomalens pulled torch'\n"
        "assert callable(anomalens.create_detector)\n"
        "assert anomalens.Prediction.__name__ == 'Prediction' and 'torch' in sys.modules\n"
        "from anomalens import LearningType, load_detector\n"
        "assert set(anomalens.__all__) <= set(dir(anomalens))\n"
        "try:\n    anomalens.no_such_name\nexcept AttributeError as e:\n    print(e)\n"
    )
    assert res.returncode == 0, res.stderr
    assert "has no attribute 'no_such_name'" in res.stdout


_ORDER = """
import sys
from importlib.abc import MetaPathFinder

class Tell(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("TORCH-IMPORT", file=sys.stderr, flush=True)
            raise SystemExit(0)  # what follows is not under test: stop here
        return None

sys.meta_path.insert(0, Tell())
from anomalens.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
"""


@pytest.mark.parametrize(
    "argv, line",
    [
        (["predict", "--method", "patchcore", "--images", "{d}", "--out", "{d}/o"],
         "anomalens predict: loading PyTorch and the patchcore detector"),
        (["predict", "--model", "{d}/missing", "--images", "{d}", "--out", "{d}/o"],
         "anomalens predict: loading PyTorch and the model"),
        (["fit", "--method", "mvg", "--normal", "{d}", "--out", "{d}/m"],
         "anomalens fit: loading PyTorch and the mvg detector"),
        (["benchmark", "--method", "patchcore", "--dataset", "mvtec", "--root", "{d}",
          "--out", "{d}/b"], "anomalens benchmark: loading PyTorch"),
        (["train", "adaptclip", "--dataset", "mvtec", "--root", "{d}", "--out", "{d}/t"],
         "anomalens train: loading PyTorch"),
        (["demo", "--out", "{d}/demo", "--seed", "0"], "anomalens demo: loading PyTorch"),
        (["serve", "--data-dir", "{d}/data", "--port", "8765"],
         "anomalens serve: starting the inspection service"),
    ],
)  # fmt: skip
def test_long_commands_say_what_they_load_before_importing_torch(tmp_path, argv, line):
    """The status line comes before torch's import: what the user sees within the first second.

    The run stops at the first torch import; only the order of the two lines is checked.
    """
    if argv[0] == "serve":
        pytest.importorskip("fastapi", reason="serve needs the [serve] extra")
    res = _python(_ORDER, *(a.format(d=tmp_path) for a in argv))
    err = res.stderr
    assert line in err, err
    assert "TORCH-IMPORT" in err, err
    assert err.index(line) < err.index("TORCH-IMPORT"), err


def test_quiet_commands_print_no_status_line(tmp_path):
    res = _python(
        _ORDER, "predict", "--method", "patchcore", "--images", str(tmp_path), "--out",
        str(tmp_path / "o"), "-q",
    )  # fmt: skip
    assert "loading PyTorch" not in res.stderr
