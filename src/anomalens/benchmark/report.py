"""Benchmark tables and plots: one flat row per job, mean ± std over seeds, CSV / JSON / Markdown.

Two column groups: the threshold-free metrics (AUROC, AP, F1-max, AUPRO) and the metrics at the
no-label threshold ``predict`` uses (precision, recall, F1, false-alarm rate). One PNG per
(category, k) in ``plots/`` (see :mod:`anomalens.benchmark.plots`), linked from results.md.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomalens.benchmark.plots import read_scores, safe_name, write_category_plot
from anomalens.fileio import atomic_write_json, atomic_write_text

__all__ = ["METRICS", "THRESHOLD_METRICS", "mean_std", "summarize", "write_reports"]

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
#: Image metrics at the no-label threshold (leave-one-out on the k shots, as ``predict``).
THRESHOLD_METRICS = ("thr_precision", "thr_recall", "thr_f1", "thr_false_alarm_rate")
_THR_HEAD = ("precision", "recall", "F1", "false alarms")
_ALL = (*METRICS, *THRESHOLD_METRICS)


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
        for m in _ALL:
            mu, sd, _ = mean_std([r.get(m) for r in rs])
            row[m], row[m + "_std"] = mu, sd
        out.append(row)
    for k in sorted({r["k"] for r in rows}):
        seed_means: dict[str, list[float]] = {m: [] for m in _ALL}
        n = 0
        for (kk, _seed), rs in by_seed.items():
            if kk != k:
                continue
            n += 1
            for m in _ALL:
                seed_means[m].append(mean_std([r.get(m) for r in rs])[0])
        row = {"category": "mean", "k": k, "num_seeds": n}
        for m in _ALL:
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


def _markdown(
    summary: list[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    method: str,
    dataset: str,
    plots: dict[tuple[str, int], str],
) -> str:
    lines = [f"# {method} on {dataset}", ""]
    lines += _prompt_list_lines(rows)
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
        lines += [
            "",
            f"At the no-label threshold `predict` sets (k = {k}: "
            + (
                "the method's default, or the batch-robust rule"
                if k == 0
                else "leave-one-out on the shots"
            )
            + "):",
            "",
            "| category | " + " | ".join(_THR_HEAD) + " | threshold | seeds |",
            "|---|" + "---|" * (len(_THR_HEAD) + 2),
        ]
        for r in summary:
            if r["k"] != k:
                continue
            cells = [_fmt(r[m], r[m + "_std"], pct=True) for m in THRESHOLD_METRICS]
            jobs = [x for x in rows if x["k"] == k and r["category"] in ("mean", x["category"])]
            how = sorted({x.get("threshold_method") or "" for x in jobs} - {""})
            notes = sorted({x.get("threshold_note") or "" for x in jobs} - {""})
            what = ", ".join(how) or ("none: " + "; ".join(notes) if notes else "n/a")
            name = f"**{r['category']}**" if r["category"] == "mean" else r["category"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {what} | {r['num_seeds']} |")
        figures = [(c, p) for (c, kk), p in sorted(plots.items()) if kk == k]
        if figures:
            lines += ["", "Plots (ROC, PR, score histogram, per defect type):", ""]
            lines += [f"- [{c}]({p})" for c, p in figures]
            lines += [""] + [f"![{c}, k = {k}]({p})" for c, p in figures]
        lines.append("")
    lines.append(
        "Metrics ×100, mean ± std (population) over seeds; s/img = predict seconds per image. "
        "False alarms = share of normal test images flagged. Per-image scores and decisions: "
        "scores/<category>/<job>.csv."
    )
    return "\n".join(lines) + "\n"


def _prompt_list_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The prompt-list files of the run (path, kind, sha256), when the prompts were not drawn."""
    used: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r.get("prompt_list"):
            key = (r["prompt_list"], r.get("prompt_list_sha256") or "")
            used.setdefault(key, {"kind": r.get("prompt_list_kind"), "seeds": set()})
            used[key]["seeds"].add(r.get("seed"))
    if not used:
        return []
    lines = ["Prompts read from prompt lists, not drawn:", ""]
    for (path, sha), info in sorted(used.items()):
        seeds = sorted(s for s in info["seeds"] if s is not None)
        what = "one prompt per test image" if info["kind"] == "per_query" else "per category"
        lines.append(
            f"- `{path}` ({what}; sha256 `{sha}`"
            + (f"; seed {', '.join(map(str, seeds))}" if seeds else "")
            + ")"
        )
    return [*lines, ""]


def _plots(out: Path, rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], str]:
    """One PNG per (category, k) from the jobs' per-image scores; relative links by key."""
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for r in rows:
        f = r.get("scores_file")
        if f and (out / f).is_file():
            groups[(r["category"], r["k"])].append((r, read_scores(out / f)))
    made = {}
    for (cat, k), jobs in groups.items():
        jobs.sort(key=lambda j: (j[0].get("seed") is not None, j[0].get("seed") or 0))
        rel = f"plots/{safe_name(cat)}_k{k}.png"
        if write_category_plot(out / rel, cat, k, jobs):
            made[(cat, k)] = rel
    return made


def _csv(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_reports(out: str | Path, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write ``results.csv`` (one row per job), ``summary.csv``, ``results.json``, ``results.md``
    and ``plots/<category>_k<k>.png``."""
    out = Path(out)
    summary = summarize(rows)
    flat = [
        "method",
        "dataset",
        "category",
        "k",
        "seed",
        *METRICS,
        *THRESHOLD_METRICS,
        "threshold",
        "threshold_method",
        "num_test_images",
        "fit_seconds",
        "scores_file",
    ]
    if any(r.get("prompt_list") for r in rows):  # the prompts came from list files
        flat += ["prompt_list", "prompt_list_sha256", "prompt_list_kind"]
    atomic_write_text(out / "results.csv", _csv(rows, flat))
    sfields = ["category", "k", "num_seeds"] + [x for m in _ALL for x in (m, m + "_std")]
    atomic_write_text(out / "summary.csv", _csv(summary, sfields))
    atomic_write_json(out / "results.json", {"runs": list(rows), "summary": summary})
    method = rows[0]["method"] if rows else "?"
    dataset = rows[0]["dataset"] if rows else "?"
    plots = _plots(out, rows)
    atomic_write_text(out / "results.md", _markdown(summary, rows, method, dataset, plots))
    return summary
