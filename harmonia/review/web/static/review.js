// Harmonia review page: plain JS over the JSON API. Logging in trades the API token for a session token that
// expires (kept in sessionStorage, sent as a Bearer header, so no cookie can be replayed by another site); logging
// out revokes it. Every value from the API is set with textContent. One decision at a time per item: a decision in
// flight blocks the next, key repeats are ignored, and each carries the version it was made on and a request id.
"use strict";

const TOKEN_KEY = "harmonia_session";
const PAGE = 50;
const EQUIVALENCES = ["EQUAL", "EQUIVALENT", "WIDER", "NARROWER", "INEXACT", "UNMATCHED", "UNREVIEWED"];
const TYPES = ["MAPS_TO", "MAPS_TO_VALUE", "MAPS_TO_UNIT"];
const $ = (sel) => document.querySelector(sel);
const state = { me: null, items: [], index: -1, offset: 0, total: 0, item: null, mapsOffset: 0, busy: false,
                draft: [], sel: -1, pending: null, results: [] };
const storage = window.sessionStorage;

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

class ApiError extends Error {
  constructor(status, detail, body) { super(detail); this.status = status; this.body = body; }
}

async function api(path, { method = "GET", body, raw = false, token = null, quiet = false } = {}) {
  const headers = { Authorization: "Bearer " + (token || storage.getItem(TOKEN_KEY)) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch("api/" + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401 && !token) { logout("Your session ended; log in again."); throw new ApiError(401, "401"); }
  if (!r.ok) {
    let detail = r.statusText, j = null;
    try {
      j = await r.json();
      detail = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail);
    } catch (_) { /* not JSON */ }
    if (!quiet) say(`${method} ${path}: ${r.status} ${detail}`, true);
    throw new ApiError(r.status, detail, j);
  }
  return raw ? r : r.json();
}

// ------------------------------------------------------------------------------------------------ login

async function login(apiToken) {
  try {
    if (apiToken) {
      const s = await api("session", { method: "POST", token: apiToken, quiet: true });
      storage.setItem(TOKEN_KEY, s.token);
    }
    state.me = await api("me", { quiet: true });
  } catch (e) {
    storage.removeItem(TOKEN_KEY);
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

async function logOut() {
  try { await api("logout", { method: "POST", quiet: true }); } catch (_) { /* gone already */ }
  logout("Logged out.");
}

function logout(reason = "") {
  storage.removeItem(TOKEN_KEY);
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
  const p = new URLSearchParams({ limit: PAGE, offset, available: true });
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
  showProgress().catch(() => {});
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
  const m = item.map;
  $("#i-map").textContent = m
    ? `Current map (version ${m.version}): ${m.status}` + (m.targets.length ? ": " + m.targets.map((t) =>
      `${t.mapping_type} ${t.concept_id} ${t.concept_name} [${t.equivalence}]`).join("; ") : ` (${m.equivalence})`) +
      ` · set by ${m.status_set_by || "-"}` + (m.comment ? ` · “${m.comment}”` : "") : "Not mapped yet.";
  const extra = (item.proposal && item.proposal.additional) || [];
  $("#i-proposal").hidden = !extra.length;
  $("#i-proposal ul").replaceChildren(...extra.map((a) => el("li", { class: "proposed" },
    `${a.mapping_type} ${a.concept_id} ${a.concept_name} (${a.domain_id}) [${a.equivalence}] ${a.rationale || ""}`)));
  state.draft = [];
  state.sel = -1;
  state.pending = null;
  $("#comment").value = (m && m.comment) || "";
  showDraft();
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

async function showProgress() {
  const p = await api("review/progress", { quiet: true });
  $("#progress").textContent = p.sets.map((s) => `${s.source_vocab}: ${s.decided}/${s.total} decided`).join(" · ");
}

const target = (t) => `${t.mapping_type} ${t.concept_id} ${t.concept_name || ""}`;

// Send one decision for the shown item: never two at once, with the version it was made on and a request id (a
// repeat is a no-op). A stale version shows what is there now; a domain conflict asks before mapping anyway.
async function decide(kind, body, describe) {
  const item = state.item;
  if (!item || !state.me.can_write || state.busy) return;
  state.busy = true;
  const comment = $("#comment").value.trim();
  const payload = { ...body, version: item.version, request_id: crypto.randomUUID() };
  if (comment && comment !== ((item.map && item.map.comment) || "")) payload.comment = comment;
  try {
    let r;
    try {
      r = await api(`review/items/${item.id}/${kind}`, { method: "POST", body: payload, quiet: true });
    } catch (e) {
      if (e.status === 409 && e.body && e.body.reason === "domain_conflict" && window.confirm(e.body.detail)) {
        r = await api(`review/items/${item.id}/${kind}`, { method: "POST", body: { ...payload, confirm: true,
          request_id: crypto.randomUUID() }, quiet: true });
      } else throw e;
    }
    const shown = r.map ? (r.map.targets.length ? r.map.targets.map(target).join(" + ") : r.map.status) : "";
    await afterDecision(`${r.action}: ${item.source_code} → ${shown}` + (describe ? ` ${describe}` : ""));
  } catch (e) {
    if (e.status === 409 && e.body && e.body.reason === "stale" && e.body.current) {
      showItem(e.body.current);
      say(`conflict: ${e.body.detail}. Nothing was changed; the item now shows the current map.`, true);
      $("#i-map").classList.add("conflict");
    } else if (e.status !== 401) say(`${kind}: ${e.message}`, true);
  } finally {
    state.busy = false;
  }
}

function approve(rank) {
  if (!state.item) return;
  const c = state.item.candidates[rank - 1];
  if (!c) { say(`no suggestion ${rank}`, true); return; }
  return decide("approve", { rank, concept_id: c.concept_id });
}

const choose = (conceptId) => decide("choose", { concept_id: conceptId });
const noMatch = () => decide("no-match", {});
const ignore = () => decide("ignore", {});
const flag = () => decide("flag", { note: window.prompt("Why a second look? (optional)") || null });

async function undo() {
  if (!state.me.can_write || state.busy) return;
  state.busy = true;
  try {
    const r = await api("review/undo", { method: "POST", quiet: true });
    await afterDecision(`undone: ${r.undone} of ${r.source_code}`);
  } catch (e) {
    if (e.status !== 401) say(`undo: ${e.message}`, true);
  } finally {
    state.busy = false;
  }
}

// The target editor: several targets, each with a mapping type and an equivalence, made with the keyboard
// (a + digit: add a suggestion, r + digit: add a search result, m: mapping type, e: equivalence, x: remove,
// Tab: next target, p: the model's proposal, Enter: save).
function addTarget(c, mappingType = "MAPS_TO", equivalence = "EQUAL") {
  if (!c) { say("nothing to add there", true); return; }
  state.draft.push({ concept_id: c.concept_id, concept_name: c.concept_name, domain_id: c.domain_id,
                     mapping_type: mappingType, equivalence });
  state.sel = state.draft.length - 1;
  showDraft();
}

function cycle(field, values) {
  const t = state.draft[state.sel];
  if (!t) { say("no target selected: add one with a + digit", true); return; }
  t[field] = values[(values.indexOf(t[field]) + 1) % values.length];
  showDraft();
}

function showDraft() {
  $("#draft").hidden = !state.draft.length;
  $("#draft ol").replaceChildren(...state.draft.map((t, i) => el("li", { class: "draft-target" + (i === state.sel
    ? " selected" : "") }, `${t.mapping_type} ${t.concept_id} ${t.concept_name} (${t.domain_id}) [${t.equivalence}]`)));
}

function saveDraft() {
  if (!state.draft.length) { say("no targets to save", true); return; }
  const targets = state.draft.map(({ concept_id, mapping_type, equivalence }) => ({ concept_id, mapping_type,
                                                                                  equivalence }));
  return decide("targets", { targets });
}

function takeProposal() {
  const it = state.item;
  if (!it || !it.candidates.length) return;
  state.draft = [];
  addTarget(it.candidates[0], "MAPS_TO", (it.proposal && it.proposal.equivalence) || "EQUAL");
  for (const a of (it.proposal && it.proposal.additional) || []) addTarget(a, a.mapping_type, a.equivalence);
}

async function claim() {
  const r = await api("review/claim", { method: "POST", body: { n: 20 } });
  say(`claimed ${r.item_ids.length} item(s) for ${Math.round(r.ttl_s / 60)} min`);
  await loadQueue(0);
}

async function search(q) {
  if (!q.trim()) return;
  say("searching…");
  const r = await api("concepts/search?" + new URLSearchParams({ q, k: 20 }));
  say(`${r.results.length} concept(s) for “${q}”`);
  state.results = r.results;
  $("#search-results tbody").replaceChildren(...r.results.map((c, i) => el("tr", { class: "search-result" },
    el("td", {}, el("kbd", {}, String(i + 1))),
    el("td", {}, el("b", {}, String(c.concept_id)), " ", c.concept_name),
    el("td", {}, [c.domain_id, c.vocabulary_id, c.concept_class_id].filter(Boolean).join(" / ")),
    el("td", {}, c.similarity === undefined ? "" : fmt(c.similarity)),
    el("td", {}, el("button", { type: "button", class: "write choose", onclick: () => choose(c.concept_id) },
      "Choose")))));
}

// ------------------------------------------------------------------------------------------------ maps

async function loadMaps(offset = 0) {
  const p = new URLSearchParams({ limit: PAGE, offset, available: true });
  if ($("#maps-q").value) p.set("q", $("#maps-q").value);
  const page = await api("maps?" + p);
  state.mapsOffset = offset;
  $("#maps-count").textContent = `${page.total} approved map(s)`;
  $("#maps tbody").replaceChildren(...page.items.map((m) => el("tr", {},
    el("td", {}, `${m.source_code} (${m.source_vocab})`), el("td", {}, m.source_text || ""),
    el("td", {}, m.targets.length ? m.targets.map((t) => `${target(t)} [${t.equivalence}]`).join("; ")
      : `no target (${m.equivalence})`),
    el("td", {}, m.decided_by + (m.reviewer ? " " + m.reviewer : "")), el("td", {}, fmt(m.confidence)),
    el("td", {}, el("button", { type: "button", class: "write", onclick: () => revoke(m) }, "Revoke")))));
}

async function revoke(m) {
  if (!window.confirm(`Revoke the map ${m.source_code} → ${m.omop_concept_id}?`)) return;
  await api(`maps/${m.id}/revoke`, { method: "POST", body: { version: m.version } });
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
  if (ev.repeat) { ev.preventDefault(); return; }  // a held key is one decision, not many
  const k = ev.key;
  let handled = true;
  const pending = state.pending;
  state.pending = null;
  if (pending && k >= "1" && k <= "9") {
    if (pending === "a") addTarget(state.item && state.item.candidates[Number(k) - 1]);
    else addTarget(state.results[Number(k) - 1]);
  } else if (k === "a" || k === "r") { state.pending = k; say(k === "a" ? "add suggestion: press its number"
    : "add search result: press its number"); }
  else if (k >= "1" && k <= "5") approve(Number(k));
  else if (k === "m") cycle("mapping_type", TYPES);
  else if (k === "e") cycle("equivalence", EQUIVALENCES);
  else if (k === "x") { state.draft.splice(state.sel, 1); state.sel = state.draft.length - 1; showDraft(); }
  else if (k === "Tab" && state.draft.length) { state.sel = (state.sel + 1) % state.draft.length; showDraft(); }
  else if (k === "p") takeProposal();
  else if (k === "Enter") saveDraft();
  else if (k === "c") $("#comment").focus();
  else if (k === "n") noMatch();
  else if (k === "i") ignore();
  else if (k === "u") undo();
  else if (k === "f") flag();
  else if (k === "Escape") { state.draft = []; state.sel = -1; showDraft(); }
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
$("#logout").addEventListener("click", () => logOut());
$("#claim").addEventListener("click", () => claim().catch(() => {}));
$("#ignore").addEventListener("click", () => ignore());
$("#undo").addEventListener("click", () => undo());
$("#save-targets").addEventListener("click", () => saveDraft());
$("#filters").addEventListener("change", () => loadQueue(0).catch(() => {}));
$("#filters").addEventListener("submit", (ev) => ev.preventDefault());
$("#page-prev").addEventListener("click", () => loadQueue(Math.max(0, state.offset - PAGE)));
$("#page-next").addEventListener("click", () => loadQueue(state.offset + PAGE));
$("#no-match").addEventListener("click", () => noMatch());
$("#flag").addEventListener("click", () => flag());
$("#search-form").addEventListener("submit", (ev) => { ev.preventDefault(); search($("#search").value).catch(() => {}); });
$("#tab-queue").addEventListener("click", () => showTab("queue"));
$("#tab-maps").addEventListener("click", () => showTab("maps"));
$("#maps-filter").addEventListener("submit", (ev) => { ev.preventDefault(); loadMaps(0); });
$("#export-usagi").addEventListener("click", () => download("usagi").catch(() => {}));
$("#export-stcm").addEventListener("click", () => download("stcm").catch(() => {}));

if (storage.getItem(TOKEN_KEY)) login(null);
