"""How fast the command line answers: ``--help``, argument errors, the first status line.

Each case runs ``python -m anomalens ...`` in a fresh process ``--repeat`` times and prints
the median wall time (the target is under 1 s for help and argument errors, and a status line
within 1 s of starting a long command). The status-line case starts ``predict`` on an empty
folder and measures the time until its first line on stderr (the run then stops with an error).
Also printed: the modules ``import anomalens.cli.main`` + ``build_parser()`` import, as
``python -X importtime`` counts them (the ten slowest, cumulative microseconds).

Usage:
    python benchmarks/cli_startup.py [--repeat 5]

One flat JSON row per case is printed. Timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def wall(argv: list[str]) -> float:
    """Seconds until ``python -m anomalens ARGV`` exits."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anomalens", *argv], capture_output=True, env=_env())
    return time.perf_counter() - t0


def first_stderr_line(argv: list[str]) -> tuple[float, str]:
    """Seconds until ``python -m anomalens ARGV`` writes its first line on stderr, and the line."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "anomalens", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    dt = time.perf_counter() - t0
    proc.kill()
    proc.wait()
    return dt, line.strip()


def slowest_imports(n: int = 10) -> list[tuple[str, int]]:
    """The ``n`` slowest imports (cumulative µs) of importing the CLI and building its parser."""
    code = "from anomalens.cli.main import build_parser; build_parser()"
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=_env()
    )
    rows = []
    for line in res.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cum, name = (x.strip() for x in line.split(":", 1)[1].split("|"))
            rows.append((name, int(cum)))
    return sorted(rows, key=lambda r: -r[1])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs per case (median printed)")
    a = ap.parse_args()
    cases = {
        "anomalens --help": ["--help"],
        "anomalens predict --help": ["predict", "--help"],
        "argument error (predict without --out)": ["predict"],
        "anomalens list datasets (imports the readers)": ["list", "datasets"],
    }
    for name, argv in cases.items():
        times = [wall(argv) for _ in range(a.repeat)]
        print(json.dumps({"case": name, "median_s": round(statistics.median(times), 3),
                          "min_s": round(min(times), 3), "runs": a.repeat}))  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        argv = ["predict", "--method", "patchcore", "--images", d, "--out", f"{d}/o"]
        runs = [first_stderr_line(argv) for _ in range(a.repeat)]
    times = [t for t, _ in runs]
    print(json.dumps({"case": "predict: first status line", "median_s":
                      round(statistics.median(times), 3), "min_s": round(min(times), 3),
                      "runs": a.repeat, "line": runs[0][1]}))  # fmt: skip
    heavy = [
        m
        for m in ("torch", "numpy", "PIL", "open_clip")
        if any(n == m for n, _ in slowest_imports(1000))
    ]
    print(json.dumps({"case": "import anomalens.cli.main + build_parser()",
                      "heavy_modules_imported": heavy,
                      "slowest_imports_us": slowest_imports()}))  # fmt: skip


if __name__ == "__main__":
    main()
