"""Benchmark tables: one flat row per job, mean ± std over seeds, CSV / JSON / Markdown."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomalens._fileio import atomic_write_json, atomic_write_text

__all__ = ["METRICS", "mean_std", "summarize", "write_reports"]

METRICS = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "pixel_aupro",
    "seconds_per_image",
)
_HEAD = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "P-AUPRO", "s/img")


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean, population std (numpy's ddof=0) and count of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std()), int(v.size)


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (category, k): mean and std over seeds; plus a ``mean`` category per k.

    The category-average row averages the categories within each seed first, then takes mean
    and std over seeds (as the official AdaptCLIP scripts do).
    """
    by_cat: dict[tuple[str, int], list[dict]] = defaultdict(list)
    by_seed: dict[tuple[int, Any], list[dict]] = defaultdict(list)
    for r in rows:
        by_cat[(r["category"], r["k"])].append(r)
        by_seed[(r["k"], r["seed"])].append(r)
    out = []
    for (cat, k), rs in sorted(by_cat.items(), key=lambda x: (x[0][1], x[0][0])):
        row: dict[str, Any] = {"category": cat, "k": k, "num_seeds": len(rs)}
        for m in METRICS:
            mu, sd, _ = mean_std([r.get(m) for r in rs])
            row[m], row[m + "_std"] = mu, sd
        out.append(row)
    for k in sorted({r["k"] for r in rows}):
        seed_means = {m: [] for m in METRICS}
        n = 0
        for (kk, _seed), rs in by_seed.items():
            if kk != k:
                continue
            n += 1
            for m in METRICS:
                seed_means[m].append(mean_std([r.get(m) for r in rs])[0])
        row = {"category": "mean", "k": k, "num_seeds": n}
        for m in METRICS:
            mu, sd, _ = mean_std(seed_means[m])
            row[m], row[m + "_std"] = mu, sd
        out.append(row)
    return out


def _fmt(mu: float, sd: float, pct: bool) -> str:
    if not math.isfinite(mu):
        return "n/a"
    if pct:
        return f"{100 * mu:.1f} ± {100 * sd:.1f}"
    return f"{mu:.3f} ± {sd:.3f}"


def _markdown(summary: list[dict[str, Any]], method: str, dataset: str) -> str:
    lines = [f"# {method} on {dataset}", ""]
    for k in sorted({r["k"] for r in summary}):
        lines += [
            f"## k = {k}" + (" (zero-shot)" if k == 0 else ""),
            "",
            "| category | " + " | ".join(_HEAD) + " | seeds |",
            "|---|" + "---|" * (len(_HEAD) + 1),
        ]
        for r in summary:
            if r["k"] != k:
                continue
            cells = [_fmt(r[m], r[m + "_std"], pct=m != "seconds_per_image") for m in METRICS]
            name = f"**{r['category']}**" if r["category"] == "mean" else r["category"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['num_seeds']} |")
        lines.append("")
    lines.append(
        "Metrics ×100, mean ± std (population) over seeds; s/img = predict seconds per image."
    )
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_reports(out: str | Path, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write ``results.csv`` (one row per job), ``summary.csv``, ``results.json``, ``results.md``."""
    out = Path(out)
    summary = summarize(rows)
    flat = [
        "method",
        "dataset",
        "category",
        "k",
        "seed",
        *METRICS,
        "num_test_images",
        "fit_seconds",
    ]
    atomic_write_text(out / "results.csv", _csv(rows, flat))
    sfields = ["category", "k", "num_seeds"] + [x for m in METRICS for x in (m, m + "_std")]
    atomic_write_text(out / "summary.csv", _csv(summary, sfields))
    atomic_write_json(out / "results.json", {"runs": list(rows), "summary": summary})
    method = rows[0]["method"] if rows else "?"
    dataset = rows[0]["dataset"] if rows else "?"
    atomic_write_text(out / "results.md", _markdown(summary, method, dataset))
    return summary
