// anomalens inspection page: plain JavaScript, no build step, no external resources.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { token: sessionStorage.getItem("anomalens-token") || "", normals: [], offset: 0, limit: 20, syncLimit: 16 };

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

function authHeaders() {
  // the client header marks a same-origin call (a foreign page cannot send it without CORS)
  const headers = { "X-Anomalens-Client": "1" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  return headers;
}

// fetch a JSON API; errors become exceptions carrying the server's message
async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const msg = body && body.message ? body.message : resp.status + " " + resp.statusText;
    const err = new Error(msg);
    err.status = resp.status;
    throw err;
  }
  return body;
}

// images and downloads go through fetch so that the token header is sent
async function loadImage(img, url) {
  try {
    const resp = await fetch(url, { headers: authHeaders() });
    if (!resp.ok) throw new Error(resp.status);
    const blob = await resp.blob();
    if (img.dataset.blob) URL.revokeObjectURL(img.dataset.blob);
    img.dataset.blob = URL.createObjectURL(blob);
    img.src = img.dataset.blob;
  } catch (e) {
    img.alt = "image not available";
  }
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

function fmt(x) { return Number(x).toPrecision(4); }

// ------------------------------------------------------------------ drop zones
function dropZone(zone, input, onFiles) {
  ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => {
    e.preventDefault(); zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    onFiles(Array.from(e.dataTransfer.files));
  });
  input.addEventListener("change", () => { onFiles(Array.from(input.files)); input.value = ""; });
}

// ------------------------------------------------------------------ profiles
async function loadMethods() {
  const methods = await api("/api/methods");
  const sel = $("#method");
  sel.replaceChildren(...methods.map((m) => el("option", { value: m.name, text: `${m.name} (${m.learning_type})` })));
  const pc = methods.find((m) => m.name === "patchcore");
  if (pc) sel.value = "patchcore";
}

async function loadProfiles() {
  const profiles = await api("/api/profiles");
  const body = $("#profiles-table tbody");
  body.replaceChildren(...profiles.map((p) => {
    const del = el("button", { type: "button", class: "small", text: "delete" });
    del.addEventListener("click", async () => {
      if (!confirm(`Delete profile ${p.name}? Its history stays.`)) return;
      try { await api(`/api/profiles/${encodeURIComponent(p.name)}`, { method: "DELETE" }); setStatus(`deleted ${p.name}`); }
      catch (e) { setStatus(e.message, true); }
      loadProfiles();
    });
    return el("tr", { "data-name": p.name }, [
      el("td", { text: p.name }), el("td", { text: p.method }), el("td", { text: String(p.num_normals) }),
      el("td", { text: `${fmt(p.threshold.value)} (${p.threshold.method})` }),
      el("td", { text: p.created_at }), el("td", {}, [del]),
    ]);
  }));
  const sel = $("#inspect-profile");
  const prev = sel.value;
  sel.replaceChildren(...profiles.map((p) => el("option", { value: p.name, text: p.name })));
  if (profiles.some((p) => p.name === prev)) sel.value = prev;
}

function showNormals() {
  $("#normal-list").textContent = state.normals.length
    ? `${state.normals.length} image(s): ` + state.normals.map((f) => f.name).join(", ")
    : "";
}

async function createProfile(ev) {
  ev.preventDefault();
  const form = new FormData();
  for (const [id, key] of [["#profile-name", "name"], ["#method", "method"], ["#backbone", "backbone"],
    ["#weights", "weights"], ["#image-size", "image_size"], ["#threshold-mode", "threshold_mode"]]) {
    const v = $(id).value.trim();
    if (v) form.append(key, v);
  }
  if ($("#threshold-mode").value === "fixed") form.append("threshold", $("#threshold-value").value);
  state.normals.forEach((f) => form.append("files", f, f.name));
  const button = $("#create-profile");
  button.disabled = true;
  setStatus("fitting the profile…");
  try {
    const p = await api("/api/profiles", { method: "POST", body: form });
    setStatus(`profile ${p.name} created: threshold ${fmt(p.threshold.value)}`);
    state.normals = []; showNormals();
    await loadProfiles();
    $("#inspect-profile").value = p.name;
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ inspection
function resultCard(r) {
  const img = el("img", { class: "overlay", alt: `overlay of ${r.file_name}` });
  loadImage(img, r.links.overlay);
  const card = el("div", { class: "card", "data-verdict": r.verdict, "data-id": String(r.id) }, [
    img, el("div", { class: "name", text: r.file_name, title: r.file_name }),
    el("span", { class: `verdict ${r.verdict}`, text: r.verdict }), el("span", { text: " " + fmt(r.score) }),
  ]);
  card.addEventListener("click", () => showDetail(r));
  return card;
}

function errorCard(e) {
  return el("div", { class: "card error", text: `${e.file_name}: ${e.message}` });
}

async function inspectFiles(files) {
  const profile = $("#inspect-profile").value;
  if (!profile) { setStatus("create a profile first", true); return; }
  if (!files.length) return;
  const form = new FormData();
  files.forEach((f) => form.append("files", f, f.name));
  const grid = $("#results-grid");
  try {
    if (files.length <= Math.min(4, state.syncLimit)) {
      setStatus(`inspecting ${files.length} image(s)…`);
      const out = await api(`/api/profiles/${encodeURIComponent(profile)}/inspect`, { method: "POST", body: form });
      out.results.forEach((r) => grid.prepend(resultCard(r)));
      out.errors.forEach((e) => grid.prepend(errorCard(e)));
      setStatus(`inspected ${out.results.length} image(s) in ${out.seconds.toFixed(2)} s`);
    } else {
      let job = await api(`/api/profiles/${encodeURIComponent(profile)}/jobs`, { method: "POST", body: form });
      job.errors.forEach((e) => grid.prepend(errorCard(e)));
      const shown = new Set();
      $("#job-progress").hidden = false;
      while (true) {
        job.results.filter((r) => !shown.has(r.id)).forEach((r) => { shown.add(r.id); grid.prepend(resultCard(r)); });
        $("#job-bar").max = job.total; $("#job-bar").value = job.done;
        $("#job-text").textContent = `${job.done} / ${job.total} (${job.status})`;
        if (job.status === "done" || job.status === "failed") break;
        await new Promise((res) => setTimeout(res, 400));
        job = await api(job.links.self);
      }
      if (job.status === "failed") setStatus(`job failed: ${job.message}`, true);
      else setStatus(`job finished: ${job.done} image(s)`);
    }
  } catch (e) {
    setStatus(e.message, true);
  }
  loadHistory();
}

function showDetail(r) {
  $("#detail").hidden = false;
  $("#detail-info").textContent =
    `${r.file_name} — profile ${r.profile} — score ${fmt(r.score)} — threshold ${fmt(r.threshold)} — ` +
    `${r.verdict} — ${r.created_at} — sha256 ${r.sha256.slice(0, 12)}…`;
  for (const kind of ["image", "heatmap", "overlay", "mask"]) loadImage($(`#detail-${kind}`), r.links[kind]);
  $("#detail").scrollIntoView({ behavior: "smooth" });
}

// ------------------------------------------------------------------ history
function historyQuery() {
  const q = new URLSearchParams();
  const p = $("#f-profile").value.trim(); if (p) q.set("profile", p);
  const v = $("#f-verdict").value; if (v) q.set("verdict", v);
  const s = $("#f-since").value; if (s) q.set("since", s + "T00:00:00Z");
  const u = $("#f-until").value;
  if (u) { const d = new Date(u + "T00:00:00Z"); d.setUTCDate(d.getUTCDate() + 1); q.set("until", d.toISOString()); }
  return q;
}

async function loadHistory() {
  const q = historyQuery();
  $("#export-csv").href = "/api/results.csv?" + q.toString();
  q.set("limit", state.limit); q.set("offset", state.offset);
  try {
    const page = await api("/api/results?" + q.toString());
    $("#history-table tbody").replaceChildren(...page.items.map((r) => {
      const row = el("tr", { "data-id": String(r.id) }, [
        el("td", { text: r.created_at.replace("T", " ").replace("Z", "") }), el("td", { text: r.profile }),
        el("td", { text: r.file_name }), el("td", { text: fmt(r.score) }),
        el("td", {}, [el("span", { class: `verdict ${r.verdict}`, text: r.verdict })]), el("td", { text: fmt(r.threshold) }),
      ]);
      row.addEventListener("click", () => showDetail(r));
      return row;
    }));
    const last = Math.min(page.offset + page.items.length, page.total);
    $("#page-info").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "no result";
    $("#prev-page").disabled = page.offset === 0;
    $("#next-page").disabled = last >= page.total;
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function exportCsv(ev) {
  if (!state.token) return; // a plain link works without a token
  ev.preventDefault();
  const resp = await fetch($("#export-csv").href, { headers: authHeaders() });
  if (!resp.ok) { setStatus("CSV export failed: " + resp.status, true); return; }
  const url = URL.createObjectURL(await resp.blob());
  const a = el("a", { href: url, download: "anomalens-results.csv" });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ------------------------------------------------------------------ start
async function refreshAll() {
  try {
    await loadMethods();
    await loadProfiles();
    await loadHistory();
    setStatus("ready");
  } catch (e) {
    setStatus(e.status === 401 ? "enter the access token" : e.message, true);
  }
}

async function start() {
  const health = await api("/api/health");
  state.syncLimit = health.sync_batch_limit;
  if (health.auth) { $("#token-box").hidden = false; $("#token").value = state.token; }
  $("#token-save").addEventListener("click", () => {
    state.token = $("#token").value.trim();
    sessionStorage.setItem("anomalens-token", state.token);
    refreshAll();
  });
  $("#threshold-mode").addEventListener("change", () => {
    $("#threshold-value-label").hidden = $("#threshold-mode").value !== "fixed";
  });
  dropZone($("#normal-drop"), $("#normal-input"), (files) => { state.normals.push(...files); showNormals(); });
  dropZone($("#inspect-drop"), $("#inspect-input"), inspectFiles);
  $("#profile-form").addEventListener("submit", createProfile);
  $("#history-filters").addEventListener("submit", (e) => { e.preventDefault(); state.offset = 0; loadHistory(); });
  $("#prev-page").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); loadHistory(); });
  $("#next-page").addEventListener("click", () => { state.offset += state.limit; loadHistory(); });
  $("#detail-close").addEventListener("click", () => { $("#detail").hidden = true; });
  $("#export-csv").addEventListener("click", exportCsv);
  await refreshAll();
}

document.addEventListener("DOMContentLoaded", () => { start().catch((e) => setStatus(e.message, true)); });
