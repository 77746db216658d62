"""The review page of a prediction run: one self-contained, relocatable HTML file.

Everything the page needs is inline (CSS, JavaScript, the rows as JSON); images are referenced
by relative links (percent-encoded) to the run folder's ``overlays/`` and ``review/`` layers and
to the input images, so the run folder can be moved or zipped as a whole. The page offers:

* a grid of every image, worst first, filtered by decision and score range;
* a full-size viewer (zoom with the wheel or +/-, pan by dragging, previous/next with the arrow
  keys), the heat map as an adjustable translucent layer over the image, the predicted region
  as an outline, and the colour bar of the heat scale;
* a score histogram with the threshold, and a threshold slider that re-judges the images in the
  page (decisions, counts, outlines, normalised scores) without running anything again; the
  files on disk keep the run's threshold;
* the run's settings as a table, and the files that could not be read.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

__all__ = ["href", "render_report"]


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def href(link: str) -> str:
    """A file link as a URL: relative paths percent-encoded (``#``, ``%``, spaces), URIs kept."""
    if not link or link.startswith("file:"):
        return link
    return quote(link.replace(os.sep, "/"), safe="/")


def _json_for_script(obj: Any) -> str:
    """JSON that is safe inside ``<script>`` (no ``</script>`` or ``<!--`` can close it)."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def render_report(
    rows: Sequence[dict[str, Any]],
    *,
    title: str,
    settings: Sequence[tuple[str, str]],
    threshold: float,
    score_scale: tuple[float, float] | None = None,
    vis_range: tuple[float, float] | None = None,
    pixel_threshold: float | None = None,
    colorbar: str = "",
    errors: Sequence[dict[str, str]] = (),
) -> str:
    """HTML text of the review page.

    Args:
        rows: one dict per image with ``path``, ``name``, ``score``, ``decision`` and the links
            (relative to the page's folder) ``image`` and optionally ``overlay``,
            ``heat_layer``, ``region_layer``, ``mask``; ``normalized_score`` when known.
        title: page title.
        settings: (name, value) lines of the settings table.
        threshold: the run's image threshold (where the slider starts).
        score_scale: (min, max) of the normal scores behind the normalised score, or None.
        vis_range: (lo, hi) anomaly-map values of the heat colour scale, or None.
        pixel_threshold: the anomaly-map value the predicted regions are cut at.
        colorbar: relative link to the colour bar image ("" for none).
        errors: files that could not be processed (path, error).
    """
    items = []
    for r in sorted(rows, key=lambda r: -float(r["score"])):
        items.append(
            {
                "name": str(r.get("name", r["path"])),
                "path": str(r["path"]),
                "score": _finite(r["score"]),
                "norm": _finite(r.get("normalized_score")),
                "decision": str(r["decision"]),
                "image": href(str(r.get("image", ""))),
                "overlay": href(str(r.get("overlay", ""))),
                "heat": href(str(r.get("heat_layer", ""))),
                "region": href(str(r.get("region_layer", ""))),
                "mask": href(str(r.get("mask", ""))),
                "w": int(r.get("width") or 1),
                "h": int(r.get("height") or 1),
            }
        )
    data = {
        "threshold": threshold,
        "scale": list(score_scale) if score_scale else None,
        "visRange": list(vis_range) if vis_range else None,
        "pixelThreshold": pixel_threshold,
        "items": items,
    }
    n_anom = sum(r["decision"] == "anomalous" for r in rows)
    settings_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in settings)
    error_rows = "".join(
        f"<tr><td>{_e(x['path'])}</td><td class='err'>{_e(x['error'])}</td></tr>" for x in errors
    )
    bar = (
        f"<img id='colorbar' src='{_e(href(colorbar))}' alt='heat colour scale'>"
        if colorbar
        else ""
    )
    return _PAGE.format(
        title=_e(title),
        css=_CSS,
        js=_JS,
        data=_json_for_script(data),
        summary=_e(
            f"{len(rows)} images scored at threshold {threshold:.6g}: {n_anom} anomalous, "
            f"{len(rows) - n_anom} normal"
            + (f", {len(errors)} could not be read" if errors else "")
        ),
        settings=settings_rows,
        errors=(
            "<h2>Files that could not be processed</h2><table class='kv'>"
            f"<tr><th>file</th><th>problem</th></tr>{error_rows}</table>"
            if errors
            else ""
        ),
        colorbar=bar,
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body>
<header><h1>{title}</h1><p id="summary">{summary}</p>
<noscript><p class="err">This page needs JavaScript for the grid and the viewer;
results.csv holds every score and decision.</p></noscript></header>
<section id="controls">
 <div class="ctl"><label for="thr">threshold <b id="thr-value"></b></label>
  <input type="range" id="thr" min="0" max="1000" step="1">
  <input type="number" id="thr-number" step="any" aria-label="threshold value">
  <button id="thr-reset" title="back to the run's threshold">run threshold</button>
  <span id="counts"></span></div>
 <div class="ctl"><label for="filter">show</label>
  <select id="filter"><option value="all">all images</option>
   <option value="anomalous">anomalous</option><option value="normal">normal</option>
   <option value="changed">decision changed by the slider</option></select>
  <label for="smin">score from</label><input type="number" id="smin" step="any">
  <label for="smax">to</label><input type="number" id="smax" step="any">
  <select id="sort" aria-label="order"><option value="score">worst first</option>
   <option value="name">by name</option></select>
  <span id="shown"></span></div>
 <div class="ctl"><label for="opacity">heat-map opacity</label>
  <input type="range" id="opacity" min="0" max="100" value="60">
  <label><input type="checkbox" id="outline" checked> outline regions</label></div>
</section>
<section id="hist-box"><svg id="hist" viewBox="0 0 800 160" preserveAspectRatio="none"
 role="img" aria-label="score histogram with the threshold"></svg>
 <div class="hint">Score histogram (red: judged anomalous at the page's threshold).
 Click it to move the threshold.</div></section>
<section><div id="grid"></div><button id="more" hidden>show more</button></section>
<section><h2>Settings</h2><table class="kv" id="settings">{settings}</table>{errors}</section>
<div id="viewer" hidden role="dialog" aria-label="image viewer">
 <div id="vbar">
  <button id="prev" title="previous (left arrow)">&larr;</button>
  <button id="next" title="next (right arrow)">&rarr;</button>
  <button id="zin" title="zoom in (+)">+</button><button id="zout" title="zoom out (-)">&minus;</button>
  <button id="zfit" title="fit (0)">fit</button><button id="z1" title="100 % (1)">1:1</button>
  <label>opacity <input type="range" id="vopacity" min="0" max="100"></label>
  <span id="vinfo"></span><a id="vlinks"></a>
  <button id="close" title="close (Esc)">&times;</button></div>
 <div id="stage"><div id="layers"><img id="v-image" alt="image"><img id="v-heat" alt="">
  <img id="v-region" alt=""></div></div>
 <div id="vfoot">{colorbar}<span id="vscale"></span></div>
</div>
<script type="application/json" id="data">{data}</script>
<script>{js}</script>
</body></html>
"""

_CSS = """
*{box-sizing:border-box}body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header,section{padding:.4em 1.2em}h1{font-size:1.3em;margin:.4em 0}h2{font-size:1.1em}
#controls{display:flex;flex-direction:column;gap:.35em;position:sticky;top:0;background:#fafafa;
 border-bottom:1px solid #ddd;z-index:2}
.ctl{display:flex;flex-wrap:wrap;align-items:center;gap:.5em}
#thr{width:28em}#thr-number{width:8em}#smin,#smax{width:7em}
#hist{width:100%;height:160px;background:#fff;border:1px solid #ddd;cursor:crosshair}
.hint{font-size:.8em;color:#666}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px}
.card{border:2px solid #ccc;border-radius:6px;padding:4px;background:#fff;cursor:pointer;font-size:.8em}
.card.anomalous{border-color:#c0392b}.card.normal{border-color:#27ae60}
.card.changed{outline:3px dashed #e67e22}
.thumb{width:100%;aspect-ratio:1;background:#222;overflow:hidden;display:flex;
 align-items:center;justify-content:center}
.fit{position:relative;max-width:100%;max-height:100%}
.fit img{position:absolute;inset:0;width:100%;height:100%}
.name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.verdict{font-weight:bold}.anomalous .verdict{color:#c0392b}.normal .verdict{color:#27ae60}
table.kv{border-collapse:collapse;font-size:.85em}
.kv th,.kv td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
.kv td{font-family:ui-monospace,monospace;word-break:break-all}
.err{color:#c0392b}
#viewer{position:fixed;inset:0;background:#111;color:#eee;z-index:10;display:flex;flex-direction:column}
#viewer[hidden]{display:none}
#vbar,#vfoot{display:flex;flex-wrap:wrap;align-items:center;gap:.5em;padding:.4em .8em;background:#222}
#vbar button{min-width:2.2em}#vinfo{flex:1}#vlinks a{color:#9cf;margin-right:.6em}
#stage{flex:1;overflow:hidden;position:relative;cursor:grab;touch-action:none}
#stage.drag{cursor:grabbing}
#layers{position:absolute;left:0;top:0;transform-origin:0 0}
#layers img{position:absolute;left:0;top:0;width:100%;height:100%;user-select:none;-webkit-user-drag:none}
#layers.pixels img{image-rendering:pixelated}
#colorbar{height:84px;background:#fff}#vscale{font-size:.85em}
"""

_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const items = D.items, $ = (id) => document.getElementById(id);
const scores = items.map((it) => it.score).filter((s) => s !== null);
const lo = Math.min(D.threshold, ...scores), hi = Math.max(D.threshold, ...scores);
let thr = D.threshold, view = [], shown = 120, current = -1;
const fmt = (v) => (v === null || v === undefined ? "n/a" : Number(v).toPrecision(4));
const decide = (it) => (it.score !== null && it.score > thr ? "anomalous" : "normal");
function norm(it) {
  if (!D.scale || it.score === null) return null;
  const v = (it.score - thr) / (D.scale[1] - D.scale[0]) + 0.5;
  return Math.min(1, Math.max(0, v));
}
function sliderToValue(p) { return hi > lo ? lo + (hi - lo) * (p / 1000) : lo; }
function valueToSlider(v) { return hi > lo ? Math.round(((v - lo) / (hi - lo)) * 1000) : 0; }
function setThreshold(v, fromSlider) {
  if (!Number.isFinite(v)) return;
  thr = v;
  if (!fromSlider) $("thr").value = valueToSlider(v);
  $("thr-number").value = Number(v.toPrecision(6));
  $("thr-value").textContent = fmt(v) + (v === D.threshold ? " (run)" : " (page only)");
  refresh();
}
function filtered() {
  const f = $("filter").value, a = parseFloat($("smin").value), b = parseFloat($("smax").value);
  let out = items.filter((it) => {
    const d = decide(it);
    if (f === "anomalous" && d !== "anomalous") return false;
    if (f === "normal" && d !== "normal") return false;
    if (f === "changed" && d === it.decision) return false;
    if (Number.isFinite(a) && !(it.score >= a)) return false;
    if (Number.isFinite(b) && !(it.score <= b)) return false;
    return true;
  });
  if ($("sort").value === "name") out = out.slice().sort((x, y) => x.name.localeCompare(y.name));
  return out;
}
function layerImg(src, cls) {
  const im = document.createElement("img");
  im.loading = "lazy"; im.alt = ""; im.className = cls; im.src = src; return im;
}
function card(it, idx) {
  const d = decide(it), c = document.createElement("div");
  c.className = "card " + d + (d !== it.decision ? " changed" : "");
  c.dataset.decision = d; c.dataset.index = idx; c.title = it.path;
  const box = document.createElement("div"); box.className = "thumb";
  const t = document.createElement("div"); t.className = "fit"; box.appendChild(t);
  // the layers share the image's aspect ratio (the heat layer is stored at the map's size)
  t.style.aspectRatio = it.w + " / " + it.h;
  t.style[it.w >= it.h ? "width" : "height"] = "100%";
  const base = layerImg(it.image || it.overlay, "t-image");
  if (it.overlay) base.onerror = () => { if (base.src.indexOf(it.overlay) < 0) base.src = it.overlay; };
  t.appendChild(base);
  if (it.heat) { const h = layerImg(it.heat, "t-heat"); h.style.opacity = opacity(); t.appendChild(h); }
  if (it.region && d === "anomalous") {
    const r = layerImg(it.region, "t-region"); r.hidden = !$("outline").checked; t.appendChild(r);
  }
  c.appendChild(box);
  const n = document.createElement("div"); n.className = "name"; n.textContent = it.name; c.appendChild(n);
  const s = document.createElement("div");
  s.textContent = "score " + fmt(it.score) + " · normalised " + fmt(norm(it));
  c.appendChild(s);
  const v = document.createElement("div"); v.className = "verdict";
  v.textContent = d + (d !== it.decision ? " (run: " + it.decision + ")" : ""); c.appendChild(v);
  c.addEventListener("click", () => openViewer(idx));
  return c;
}
function opacity() { return $("opacity").value / 100; }
function refresh() {
  view = filtered();
  const grid = $("grid"); grid.textContent = "";
  view.slice(0, shown).forEach((it, i) => grid.appendChild(card(it, i)));
  $("more").hidden = view.length <= shown;
  const nA = items.filter((it) => decide(it) === "anomalous").length;
  $("counts").textContent = nA + " anomalous, " + (items.length - nA) + " normal";
  $("shown").textContent = "showing " + Math.min(shown, view.length) + " of " + view.length;
  drawHist();
  if (current >= 0) showCurrent();
}
function drawHist() {
  const svg = $("hist"), W = 800, H = 160, nb = 40, ns = "http://www.w3.org/2000/svg";
  svg.textContent = "";
  if (!scores.length) return;
  const span = hi > lo ? hi - lo : 1, below = new Array(nb).fill(0), above = new Array(nb).fill(0);
  for (const s of scores) {
    const b = Math.min(nb - 1, Math.floor(((s - lo) / span) * nb));
    (s > thr ? above : below)[b] += 1;
  }
  const top = Math.max(...below.map((x, i) => x + above[i]), 1), bw = W / nb;
  const rect = (x, y, w, h, fill) => {
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", x); r.setAttribute("y", y); r.setAttribute("width", w);
    r.setAttribute("height", h); r.setAttribute("fill", fill); svg.appendChild(r);
  };
  for (let i = 0; i < nb; i++) {
    const hb = (below[i] / top) * (H - 20), ha = (above[i] / top) * (H - 20);
    rect(i * bw + 1, H - hb, bw - 2, hb, "#27ae60");
    rect(i * bw + 1, H - hb - ha, bw - 2, ha, "#c0392b");
  }
  const line = (v, color, dash) => {
    const x = ((v - lo) / span) * W, l = document.createElementNS(ns, "line");
    l.setAttribute("x1", x); l.setAttribute("x2", x); l.setAttribute("y1", 0); l.setAttribute("y2", H);
    l.setAttribute("stroke", color); l.setAttribute("stroke-width", 2);
    if (dash) l.setAttribute("stroke-dasharray", "6 4");
    svg.appendChild(l);
  };
  if (thr !== D.threshold) line(D.threshold, "#888", true);
  line(thr, "#000", false);
  const t = document.createElementNS(ns, "text");
  t.setAttribute("x", 4); t.setAttribute("y", 14); t.setAttribute("font-size", 12);
  t.textContent = "score " + fmt(lo) + " … " + fmt(hi) + "   threshold " + fmt(thr);
  svg.appendChild(t);
}
// ---------------------------------------------------------------- viewer
let z = 1, tx = 0, ty = 0, natW = 0, natH = 0;
function applyTransform() {
  $("layers").style.transform = "translate(" + tx + "px," + ty + "px) scale(" + z + ")";
  $("layers").classList.toggle("pixels", z >= 3);
}
function fit() {
  const st = $("stage").getBoundingClientRect();
  if (!natW || !natH) return;
  z = Math.min(st.width / natW, st.height / natH);
  tx = (st.width - natW * z) / 2; ty = (st.height - natH * z) / 2; applyTransform();
}
function zoomAt(f, cx, cy) {
  const nz = Math.min(64, Math.max(0.05, z * f));
  tx = cx - ((cx - tx) * nz) / z; ty = cy - ((cy - ty) * nz) / z; z = nz; applyTransform();
}
function openViewer(idx) { current = idx; $("viewer").hidden = false; showCurrent(true); }
function closeViewer() { current = -1; $("viewer").hidden = true; }
function showCurrent(refit) {
  const it = view[current];
  if (!it) { closeViewer(); return; }
  const d = decide(it), img = $("v-image");
  img.onload = () => {
    const sized = natW !== img.naturalWidth || natH !== img.naturalHeight;
    natW = img.naturalWidth; natH = img.naturalHeight;
    $("layers").style.width = natW + "px"; $("layers").style.height = natH + "px";
    if (refit || sized) fit();
  };
  img.onerror = () => { if (it.overlay && img.src.indexOf(it.overlay) < 0) img.src = it.overlay; };
  if (img.getAttribute("src") !== (it.image || it.overlay)) img.src = it.image || it.overlay;
  else if (refit) fit();
  $("v-heat").src = it.heat || ""; $("v-heat").hidden = !it.heat;
  $("v-heat").style.opacity = $("vopacity").value / 100;
  $("v-region").src = it.region || "";
  $("v-region").hidden = !it.region || d !== "anomalous" || !$("outline").checked;
  $("vinfo").textContent = (current + 1) + " / " + view.length + " · " + it.name + " · score " +
    fmt(it.score) + " · normalised " + fmt(norm(it)) + " · " + d +
    (d !== it.decision ? " (run: " + it.decision + ")" : "");
  const links = $("vlinks"); links.textContent = "";
  for (const [label, src] of [["image", it.image], ["overlay", it.overlay], ["mask", it.mask]]) {
    if (!src) continue;
    const a = document.createElement("a"); a.href = src; a.textContent = label; a.target = "_blank";
    links.appendChild(a);
  }
}
function step(k) { if (view.length) { current = (current + k + view.length) % view.length; showCurrent(true); } }
// ---------------------------------------------------------------- wiring
$("thr").addEventListener("input", (e) => setThreshold(sliderToValue(+e.target.value), true));
$("thr-number").addEventListener("change", (e) => setThreshold(parseFloat(e.target.value), false));
$("thr-reset").addEventListener("click", () => setThreshold(D.threshold, false));
for (const id of ["filter", "smin", "smax", "sort"]) $(id).addEventListener("input", () => { shown = 120; refresh(); });
$("opacity").addEventListener("input", () => {
  for (const h of document.querySelectorAll(".t-heat")) h.style.opacity = opacity();
  $("vopacity").value = $("opacity").value; $("v-heat").style.opacity = opacity();
});
$("vopacity").addEventListener("input", (e) => { $("opacity").value = e.target.value; $("opacity").dispatchEvent(new Event("input")); });
$("outline").addEventListener("change", refresh);
$("more").addEventListener("click", () => { shown += 240; refresh(); });
$("hist").addEventListener("click", (e) => {
  const r = $("hist").getBoundingClientRect();
  setThreshold(lo + ((e.clientX - r.left) / r.width) * (hi - lo), false);
});
$("prev").addEventListener("click", () => step(-1));
$("next").addEventListener("click", () => step(1));
$("close").addEventListener("click", closeViewer);
const centre = () => { const r = $("stage").getBoundingClientRect(); return [r.width / 2, r.height / 2]; };
$("zin").addEventListener("click", () => zoomAt(1.5, ...centre()));
$("zout").addEventListener("click", () => zoomAt(1 / 1.5, ...centre()));
$("zfit").addEventListener("click", fit);
$("z1").addEventListener("click", () => { const [cx, cy] = centre(); zoomAt(1 / z, cx, cy); });
$("stage").addEventListener("wheel", (e) => {
  e.preventDefault(); const r = $("stage").getBoundingClientRect();
  zoomAt(e.deltaY < 0 ? 1.2 : 1 / 1.2, e.clientX - r.left, e.clientY - r.top);
}, { passive: false });
let drag = null;
$("stage").addEventListener("pointerdown", (e) => {
  drag = [e.clientX - tx, e.clientY - ty]; $("stage").setPointerCapture(e.pointerId); $("stage").classList.add("drag");
});
$("stage").addEventListener("pointermove", (e) => { if (drag) { tx = e.clientX - drag[0]; ty = e.clientY - drag[1]; applyTransform(); } });
$("stage").addEventListener("pointerup", () => { drag = null; $("stage").classList.remove("drag"); });
window.addEventListener("resize", () => { if (current >= 0) fit(); });
document.addEventListener("keydown", (e) => {
  if (current < 0) return;
  const k = e.key;
  if (k === "Escape") { closeViewer(); e.preventDefault(); return; }
  if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
  if (k === "ArrowRight" || k === "n") step(1);
  else if (k === "ArrowLeft" || k === "p") step(-1);
  else if (k === "+" || k === "=") zoomAt(1.5, ...centre());
  else if (k === "-") zoomAt(1 / 1.5, ...centre());
  else if (k === "0") fit();
  else if (k === "1") { const [cx, cy] = centre(); zoomAt(1 / z, cx, cy); }
  else return;
  e.preventDefault();
});
$("vopacity").value = $("opacity").value;
if (D.visRange) {
  $("vscale").textContent = "heat colours span map values " + fmt(D.visRange[0]) + " … " +
    fmt(D.visRange[1]) + (D.pixelThreshold !== null ? "; regions above " + fmt(D.pixelThreshold) : "");
}
setThreshold(D.threshold, false);
"""
