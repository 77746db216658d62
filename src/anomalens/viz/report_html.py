"""A short, self-contained HTML report of a prediction run (worst images first)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

__all__ = ["render_report"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} table{border-collapse:collapse} td,th{padding:4px 8px;border-bottom:1px solid #ddd}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ccc;border-radius:6px;padding:6px;width:260px;font-size:.85em}
.card img{width:124px;height:124px;object-fit:contain;background:#eee}
.anomalous{border-color:#c0392b;background:#fdf0ee}.normal{border-color:#27ae60}
.verdict{font-weight:bold}.anomalous .verdict{color:#c0392b}.normal .verdict{color:#27ae60}
.err{color:#c0392b}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def render_report(
    rows: Sequence[dict[str, Any]],
    *,
    title: str,
    run_info: dict[str, Any],
    errors: Sequence[dict[str, str]] = (),
    max_cards: int = 500,
) -> str:
    """HTML text of the report.

    Args:
        rows: one dict per image with keys path, score, decision, threshold, overlay, mask,
            image (relative links from the report's folder).
        run_info: method settings and threshold (shown as a table).
        errors: files that could not be processed (path, error).
    """
    ordered = sorted(rows, key=lambda r: -float(r["score"]))
    n_anom = sum(r["decision"] == "anomalous" for r in rows)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>{len(rows)} images scored: <b>{n_anom}</b> anomalous, {len(rows) - n_anom} normal"
        + (f", <span class='err'>{len(errors)} could not be read</span>" if errors else "")
        + ". Worst first.</p>",
        "<table>",
    ]
    for k, v in run_info.items():
        parts.append(f"<tr><th style='text-align:left'>{_e(k)}</th><td>{_e(v)}</td></tr>")
    parts.append("</table><h2>Images</h2><div class='grid'>")
    for r in ordered[:max_cards]:
        parts.append(
            f"<div class='card {_e(r['decision'])}'>"
            f"<a href='{_e(r['image'])}'><img src='{_e(r['image'])}' alt='image'></a>"
            + (
                f"<a href='{_e(r['overlay'])}'><img src='{_e(r['overlay'])}' alt='heat map'></a>"
                if r.get("overlay")
                else ""
            )
            + f"<div title='{_e(r['path'])}'>{_e(r['name'])}</div>"
            f"<div>score {float(r['score']):.4f} (threshold {float(r['threshold']):.4f})</div>"
            f"<div class='verdict'>{_e(r['decision'])}</div></div>"
        )
    parts.append("</div>")
    if len(ordered) > max_cards:
        parts.append(f"<p>{len(ordered) - max_cards} more images in results.csv.</p>")
    if errors:
        parts.append("<h2>Files that could not be processed</h2><table>")
        for e in errors:
            parts.append(f"<tr><td>{_e(e['path'])}</td><td class='err'>{_e(e['error'])}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
