// Harmonia review page: plain JS over the JSON API. The token lives in localStorage and goes out as a Bearer
// header, so no cookie can be replayed by another site. Every value from the API is set with textContent.
"use strict";

const TOKEN_KEY = "harmonia_token";
const PAGE = 50;
const $ = (sel) => document.querySelector(sel);
const state = { me: null, items: [], index: -1, offset: 0, total: 0, item: null, mapsOffset: 0 };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") e.addEventListener("click", v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

function say(text, isError = false) {
  const m = $("#message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

async function api(path, { method = "GET", body, raw = false } = {}) {
  const headers = { Authorization: "Bearer " + localStorage.getItem(TOKEN_KEY) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch("api/" + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401) { logout("Your token was not accepted; log in again."); throw new Error("401"); }
  if (!r.ok) {
    let detail = r.statusText;
    try {
      const j = await r.json();
      detail = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail);
    } catch (_) { /* not JSON */ }
    say(`${method} ${path}: ${r.status} ${detail}`, true);
    throw new Error(detail);
  }
  return raw ? r : r.json();
}

// ------------------------------------------------------------------------------------------------ login

async function login(token) {
  localStorage.setItem(TOKEN_KEY, token);
  try {
    state.me = await api("me");
  } catch (e) {
    $("#login-error").textContent = "That token was not accepted.";
    return;
  }
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#nav").hidden = false;
  $("#whoami").textContent = `${state.me.name} (${state.me.role})`;
  document.body.classList.toggle("readonly", !state.me.can_write);
  await loadFacets();
  await loadQueue(0);
}

function logout(reason = "") {
  localStorage.removeItem(TOKEN_KEY);
  state.me = null;
  $("#app").hidden = true;
  $("#nav").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = reason;
}

// ------------------------------------------------------------------------------------------------ queue

async function loadFacets() {
  const f = await api("review/facets");
  for (const [sel, values] of [["#f-vocab", f.source_vocab], ["#f-domain", f.domain]]) {
    const s = $(sel);
    const keep = s.value;
    s.replaceChildren(el("option", { value: "" }, "any"), ...values.map((v) => el("option", { value: v }, v)));
    s.value = keep;
  }
}

function queueQuery(offset) {
  const p = new URLSearchParams({ limit: PAGE, offset });
  for (const s of $("#f-status").value.split(",")) p.append("status", s);
  if ($("#f-vocab").value) p.set("source_vocab", $("#f-vocab").value);
  if ($("#f-domain").value) p.set("domain", $("#f-domain").value);
  if ($("#f-min").value !== "") p.set("min_confidence", $("#f-min").value);
  if ($("#f-max").value !== "") p.set("max_confidence", $("#f-max").value);
  return p.toString();
}

async function loadQueue(offset = state.offset, keepIndex = 0) {
  const page = await api("review/items?" + queueQuery(offset));
  state.items = page.items;
  state.total = page.total;
  state.offset = page.offset;
  $("#queue-count").textContent = page.total
    ? `${page.offset + 1}–${page.offset + page.items.length} of ${page.total}` : "queue empty";
  $("#queue-list").replaceChildren(...page.items.map((it, i) => el("li",
    { "data-id": it.id, class: "q-item " + it.status, onclick: () => select(i) },
    el("b", {}, it.source_code), " ", el("span", { class: "muted" }, it.source_vocab), el("br"),
    el("span", {}, it.source_text || ""), el("br"),
    el("small", {}, `conf ${fmt(it.confidence)} · ${it.top_domain || "-"} · ${it.reason}`))));
  $("#page-prev").disabled = state.offset === 0;
  $("#page-next").disabled = state.offset + PAGE >= state.total;
  if (page.items.length) await select(Math.min(keepIndex, page.items.length - 1));
  else showItem(null);
}

async function select(i) {
  if (i < 0 || i >= state.items.length) return;
  state.index = i;
  document.querySelectorAll("#queue-list li").forEach((li, j) => li.classList.toggle("selected", j === i));
  document.querySelectorAll("#queue-list li")[i].scrollIntoView({ block: "nearest" });
  showItem(await api("review/items/" + state.items[i].id));
}

// The set's calibration from reviews: how far the sample is, and its threshold once fitted.
async function showCalibration(vocab) {
  const c = $("#i-calibration");
  const p = await api("calibration?" + new URLSearchParams({ source_vocab: vocab }));
  if (!state.item || state.item.source_vocab !== vocab) return;  // another item is shown by now
  if (!p.sampled && !p.calibrated_at) { c.textContent = ""; return; }
  c.textContent = `Calibration of ${vocab} from reviews: ${p.judged} of ${p.sampled} sampled decisions judged; ` +
    `upper stratum ${p.high_judged} of ${p.high} (${p.high_right} right, ${p.needed} needed)` +
    (p.calibrated_at ? (p.threshold === null ? "; fitted: no threshold certified"
      : `; fitted: threshold ${fmt(p.threshold)}, lower bound ${fmt(p.bound)}`) : "");
}

const fmt = (x) => (x === null || x === undefined ? "-" : Number(x).toFixed(3));

function showItem(item) {
  state.item = item;
  $("#empty").hidden = !!item;
  $("#item").hidden = !item;
  if (!item) return;
  $("#i-code").textContent = item.source_code;
  $("#i-vocab").textContent = item.source_vocab;
  $("#i-status").textContent = item.status;
  $("#i-status").className = "badge " + item.status;
  $("#i-text").textContent = item.source_text || "";
  const src = [["frequency", item.source_frequency ?? "-"], ...Object.entries(item.extra || {})];
  $("#i-source").replaceChildren(...src.flatMap(([k, v]) =>
    [el("dt", {}, k), el("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))]));
  $("#i-model").replaceChildren(
    "Suggested by ", el("code", { id: "i-model-version" }, item.model_version || "unknown model"),
    ` · confidence ${fmt(item.confidence)} · reason ${item.reason}`,
    item.error ? el("span", { class: "error" }, ` · error: ${item.error}`) : "");
  showCalibration(item.source_vocab);
  $("#i-map").textContent = item.map
    ? `Current map: ${item.map.omop_concept_id} ${item.map.concept_name} (${item.map.decided_by}` +
      `${item.map.reviewer ? " " + item.map.reviewer : ""})` : "Not mapped yet.";
  $("#candidates tbody").replaceChildren(...item.candidates.map((c, i) => el("tr", { class: "candidate" },
    el("td", {}, el("kbd", {}, String(i + 1))),
    el("td", {}, el("b", {}, String(c.concept_id)), " ", c.concept_name || ""),
    el("td", {}, [c.domain_id, c.vocabulary_id, c.concept_class_id].filter(Boolean).join(" / ")),
    el("td", {}, fmt(c.score)), el("td", {}, fmt(c.similarity)),
    el("td", { class: "rationale" }, (c.rationale || "") +
      (c.evidence && c.evidence.memory_source ? ` (already mapped: "${c.evidence.memory_source}")` : "")),
    el("td", {}, el("button", { type: "button", class: "write", onclick: () => approve(i + 1) }, "Approve")))));
  $("#search-results tbody").replaceChildren();
  $("#i-history ol").replaceChildren(...(item.history || []).map((h) => el("li", {},
    `${h.at} ${h.action} ${h.old_concept_id ?? "-"} → ${h.new_concept_id ?? "-"} by ${h.reviewer || "auto"}` +
    (h.note ? ` (${h.note})` : ""))));
}

async function afterDecision(text) {
  say(text);
  await loadFacets();
  await loadQueue(state.offset, state.index);
}

async function approve(rank) {
  if (!state.item || !state.me.can_write) return;
  if (rank > state.item.candidates.length) { say(`no suggestion ${rank}`, true); return; }
  const r = await api(`review/items/${state.item.id}/approve`, { method: "POST", body: { rank } });
  await afterDecision(`${r.action}: ${r.map.source_code} → ${r.map.omop_concept_id} ${r.map.concept_name}`);
}

async function choose(conceptId) {
  if (!state.item || !state.me.can_write) return;
  const r = await api(`review/items/${state.item.id}/choose`, { method: "POST", body: { concept_id: conceptId } });
  await afterDecision(`${r.action}: ${r.map.source_code} → ${r.map.omop_concept_id} ${r.map.concept_name}`);
}

async function noMatch() {
  if (!state.item || !state.me.can_write) return;
  const r = await api(`review/items/${state.item.id}/no-match`, { method: "POST", body: {} });
  await afterDecision(`no match: ${r.map.source_code} → 0`);
}

async function flag() {
  if (!state.item || !state.me.can_write) return;
  const note = window.prompt("Why a second look? (optional)") || null;
  const r = await api(`review/items/${state.item.id}/flag`, { method: "POST", body: { note } });
  await afterDecision(`flagged ${r.item.source_code}`);
}

async function search(q) {
  if (!q.trim()) return;
  say("searching…");
  const r = await api("concepts/search?" + new URLSearchParams({ q, k: 20 }));
  say(`${r.results.length} concept(s) for “${q}”`);
  $("#search-results tbody").replaceChildren(...r.results.map((c) => el("tr", { class: "search-result" },
    el("td", {}, el("b", {}, String(c.concept_id)), " ", c.concept_name),
    el("td", {}, [c.domain_id, c.vocabulary_id, c.concept_class_id].filter(Boolean).join(" / ")),
    el("td", {}, c.similarity === undefined ? "" : fmt(c.similarity)),
    el("td", {}, el("button", { type: "button", class: "write choose", onclick: () => choose(c.concept_id) },
      "Choose")))));
}

// ------------------------------------------------------------------------------------------------ maps

async function loadMaps(offset = 0) {
  const p = new URLSearchParams({ limit: PAGE, offset });
  if ($("#maps-q").value) p.set("q", $("#maps-q").value);
  const page = await api("maps?" + p);
  state.mapsOffset = offset;
  $("#maps-count").textContent = `${page.total} approved map(s)`;
  $("#maps tbody").replaceChildren(...page.items.map((m) => el("tr", {},
    el("td", {}, `${m.source_code} (${m.source_vocab})`), el("td", {}, m.source_text || ""),
    el("td", {}, `${m.omop_concept_id} ${m.concept_name}`),
    el("td", {}, m.decided_by + (m.reviewer ? " " + m.reviewer : "")), el("td", {}, fmt(m.confidence)),
    el("td", {}, el("button", { type: "button", class: "write", onclick: () => revoke(m) }, "Revoke")))));
}

async function revoke(m) {
  if (!window.confirm(`Revoke the map ${m.source_code} → ${m.omop_concept_id}?`)) return;
  await api(`maps/${m.id}/revoke`, { method: "POST", body: {} });
  say(`revoked ${m.source_code}`);
  await loadMaps(state.mapsOffset);
}

function showTab(name) {
  $("#queue-view").hidden = name !== "queue";
  $("#maps-view").hidden = name !== "maps";
  $("#tab-queue").classList.toggle("active", name === "queue");
  $("#tab-maps").classList.toggle("active", name === "maps");
  if (name === "maps") loadMaps(0);
  else loadQueue(state.offset, Math.max(state.index, 0));
}

async function download(fmtName) {
  const r = await api("export/" + fmtName, { raw: true });
  const name = (r.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/)?.[1] || fmtName + ".csv";
  const url = URL.createObjectURL(await r.blob());
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ------------------------------------------------------------------------------------------------ wiring

document.addEventListener("keydown", (ev) => {
  if (!state.me || $("#queue-view").hidden || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (["INPUT", "TEXTAREA", "SELECT"].includes(ev.target.tagName)) {
    if (ev.key === "Escape") ev.target.blur();
    return;
  }
  const k = ev.key;
  let handled = true;
  if (k >= "1" && k <= "5") approve(Number(k)).catch(() => {});
  else if (k === "n") noMatch().catch(() => {});
  else if (k === "f") flag().catch(() => {});
  else if (k === "j") nextItem(1);
  else if (k === "k") nextItem(-1);
  else if (k === "/") $("#search").focus();
  else handled = false;
  if (handled) ev.preventDefault();
});

async function nextItem(step) {
  const i = state.index + step;
  if (i >= 0 && i < state.items.length) return select(i);
  if (step > 0 && state.offset + PAGE < state.total) return loadQueue(state.offset + PAGE, 0);
  if (step < 0 && state.offset > 0) return loadQueue(Math.max(0, state.offset - PAGE), PAGE - 1);
}

$("#login-form").addEventListener("submit", (ev) => { ev.preventDefault(); login($("#token").value.trim()); });
$("#logout").addEventListener("click", () => logout());
$("#filters").addEventListener("change", () => loadQueue(0).catch(() => {}));
$("#filters").addEventListener("submit", (ev) => ev.preventDefault());
$("#page-prev").addEventListener("click", () => loadQueue(Math.max(0, state.offset - PAGE)));
$("#page-next").addEventListener("click", () => loadQueue(state.offset + PAGE));
$("#no-match").addEventListener("click", () => noMatch().catch(() => {}));
$("#flag").addEventListener("click", () => flag().catch(() => {}));
$("#search-form").addEventListener("submit", (ev) => { ev.preventDefault(); search($("#search").value).catch(() => {}); });
$("#tab-queue").addEventListener("click", () => showTab("queue"));
$("#tab-maps").addEventListener("click", () => showTab("maps"));
$("#maps-filter").addEventListener("submit", (ev) => { ev.preventDefault(); loadMaps(0); });
$("#export-usagi").addEventListener("click", () => download("usagi").catch(() => {}));
$("#export-stcm").addEventListener("click", () => download("stcm").catch(() => {}));

if (localStorage.getItem(TOKEN_KEY)) login(localStorage.getItem(TOKEN_KEY));
