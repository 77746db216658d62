"""Hostile-input probe of ``anomalens predict`` (issue 14): >= 1,000 bad files in one folder.

Writes a folder of generated files of the kinds in ``tests/_bad_images.py`` (truncated, bit
flips, decoded-size bombs, huge headers, zero sizes, garbage, odd modes, valid ones) plus,
unless ``--no-names``, the file-system cases of issue 14 item 2 (non-UTF-8 name, 230+ byte
stem, symlink out of the folder, symlink loop, dangling link, FIFO, folder named like an
image, unreadable file). Then runs ``anomalens predict`` (PatchCore on the shared MobileNetV2,
preset ``mobilenet_v2_tf``) once as a child process and prints one flat row:

    files, results, error_rows, unaccounted, duplicated, exit_code, crashed, seconds,
    peak_rss_mib (the child's maximum resident set size, from getrusage)

Targets: 0 crashes, every file accounted for exactly once (a result or an errors.csv row),
peak below 1.5 GB. Usage:

    OMP_NUM_THREADS=1 python benchmarks/fuzz_predict.py --files 1000 --work /tmp/fuzz
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from _bad_images import write_bad_images  # noqa: E402
from anomalens.pipeline import display_path  # noqa: E402

WEIGHTS = REPO / ".." / "shared" / "weights" / "mobilenet_v2_imagenet_int8dequant.safetensors"


def _name_attacks(folder: Path, outside: Path) -> list[str]:
    """File-system cases of issue 14 item 2; returns the names made (as os.fsdecode gives)."""
    from PIL import Image

    made = []
    ok = outside / "outside.png"
    Image.new("RGB", (40, 40), (90, 90, 90)).save(ok)

    def add(name: bytes | str, make: object) -> None:
        path = os.path.join(os.fsencode(folder), os.fsencode(name))
        try:
            make(path)  # type: ignore[operator]
        except OSError as exc:
            print(f"# could not make {name!r}: {exc}", file=sys.stderr)
            return
        made.append(os.fsdecode(os.fsencode(name)))

    png = ok.read_bytes()
    add(b"latin1-\xe9t\xe9.png", lambda p: Path(os.fsdecode(p)).write_bytes(png))
    add("s" * 240 + ".png", lambda p: Path(os.fsdecode(p)).write_bytes(png))
    add("link-outside.png", lambda p: os.symlink(ok, p))
    add("loop-a.png", lambda p: os.symlink(os.fsdecode(p), p))
    add("dangling.png", lambda p: os.symlink(outside / "gone.png", p))
    add("fifo.png", lambda p: os.mkfifo(p))
    add("folder.png", lambda p: os.mkdir(p))

    def unreadable(p: bytes) -> None:
        Path(os.fsdecode(p)).write_bytes(png)
        os.chmod(p, 0)

    add("no-permission.png", unreadable)
    return made


def _normals(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224]
    for i in range(3):
        grating = 128 + 60 * np.sin((xx + yy + 3 * i) / 6.0)
        img = np.clip(grating[..., None] + rng.normal(0, 8, (224, 224, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"good{i}.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1000, help="generated files (default 1000)")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomalens-fuzz-predict"))
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--no-names", action="store_true", help="leave out the file-name cases")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    if not args.weights.is_file():
        print(f"needs the shared MobileNetV2 weights at {args.weights}", file=sys.stderr)
        return 2
    if args.work.exists():
        shutil.rmtree(args.work, ignore_errors=True)
    images, normal, out, outside = (args.work / n for n in ("images", "normal", "out", "outside"))
    outside.mkdir(parents=True)
    files = [p.name for p, _ in write_bad_images(images, args.files, seed=args.seed)]
    if not args.no_names:
        files += _name_attacks(images, outside)
    _normals(normal)
    cmd = [
        sys.executable,
        "-m",
        "anomalens",
        "predict",
        "--method",
        "patchcore",
        "--backbone",
        "mobilenet_v2_tf",
        "--weights",
        str(args.weights.resolve()),
        "--tf-padding",
        "--normal",
        str(normal),
        "--images",
        str(images),
        "--out",
        str(out),
        "-q",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    names: list[str] = []
    results = errors = 0
    for csv_name in ("results.csv", "errors.csv"):
        path = out / csv_name
        if path.is_file():
            with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
                rows = list(csv.DictReader(f))
            names += [Path(r["path"]).name for r in rows]
            if csv_name == "results.csv":
                results = len(rows)
            else:
                errors = len(rows)
    # predict shows names that are not UTF-8 with their bytes escaped (display_path): compare so
    wanted = {display_path(n) for n in files}
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    crashed = proc.returncode != 0 or "Traceback (most recent call last)" in proc.stderr
    row = {
        "files": len(files),
        "results": results,
        "error_rows": errors,
        "unaccounted": len(wanted - set(seen)),
        "duplicated": sum(1 for n, c in seen.items() if c > 1),
        "exit_code": proc.returncode,
        "crashed": crashed,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(peak_mib, 1),
    }
    print(json.dumps(row))
    if crashed:
        print("--- stderr (last 2000 characters) ---", file=sys.stderr)
        print(proc.stderr[-2000:], file=sys.stderr)
    missing = sorted(wanted - set(seen))
    if missing:
        print(f"# not accounted for ({len(missing)}): {missing[:10]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
