// taskloom dashboard: vanilla JS, no build step. The API key lives in this tab's
// sessionStorage and goes out only as an "Authorization: Bearer" header.
"use strict";
const KEY = "taskloom.key";
const state = { snapshot: { queues: [], workers: [] }, history: [], tasks: {}, rates: [], cursorStack: [] };
const view = () => document.getElementById("view");

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v); else if (v !== undefined && v !== null) el.setAttribute(k, v);
  }
  for (const kid of kids.flat()) el.append(kid instanceof Node ? kid : document.createTextNode(kid === undefined || kid === null ? "" : String(kid)));
  return el;
}
function badge(s) { return h("span", { class: "state " + s }, s); }
function when(ms) { return ms ? new Date(ms).toLocaleTimeString() : ""; }
function toast(msg) { const t = document.getElementById("toast"); t.textContent = msg; t.hidden = false; setTimeout(() => { t.hidden = true; }, 4000); }

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers["Authorization"] = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: "omit" });
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) { showLogin(data.error); throw new Error(data.error); }
  if (!r.ok) { toast(data.error || ("HTTP " + r.status)); throw new Error(data.error); }
  return data;
}

function showLogin(msg) {
  document.getElementById("login").hidden = false;
  document.getElementById("key-error").textContent = msg || "";
}

// -- live updates: server-sent events read with fetch (EventSource cannot send a header)
async function live() {
  const badgeEl = document.getElementById("live");
  for (;;) {
    try {
      const key = sessionStorage.getItem(KEY);
      const r = await fetch("/api/events", { headers: key ? { "Authorization": "Bearer " + key } : {}, credentials: "omit" });
      if (r.status === 401) { showLogin(); await new Promise(res => setTimeout(res, 2000)); continue; }
      badgeEl.textContent = "live"; badgeEl.className = "live on";
      const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
          const data = chunk.split("\n").filter(l => l.startsWith("data:")).map(l => l.slice(5)).join("\n");
          if (data) onEvent(JSON.parse(data));
        }
      }
    } catch (e) { /* reconnect below */ }
    badgeEl.textContent = "offline"; badgeEl.className = "live off";
    await new Promise(res => setTimeout(res, 2000));
  }
}

function onEvent(ev) {
  if (ev.type === "snapshot") {
    state.snapshot = ev;
    const depth = (ev.queues || []).reduce((n, q) => n + q.ready + q.delayed + q.in_flight, 0);
    state.history.push({ at: ev.at_ms, depth, done: state.doneTick || 0, failed: state.failTick || 0 });
    state.doneTick = 0; state.failTick = 0;
    if (state.history.length > 150) state.history.shift();
  } else if (ev.type === "task") {
    const st = ev.state || ev.phase;
    if (st === "SUCCESS") state.doneTick = (state.doneTick || 0) + 1;
    if (st === "FAILURE") state.failTick = (state.failTick || 0) + 1;
    state.tasks[ev.id] = Object.assign(state.tasks[ev.id] || {}, ev, { state: st });
  } else if (ev.type === "progress") {
    state.tasks[ev.id] = Object.assign(state.tasks[ev.id] || {}, { progress: ev });
  }
  const page = current();
  if (page.name === "task" && ev.id === page.arg) renderTask(page.arg);
  else if (ev.type === "snapshot" && ["overview", "queues", "workers"].includes(page.name)) render();
  else if (page.name === "tasks" && ev.type === "task") {
    const cell = document.querySelector(`[data-state-of="${CSS.escape(ev.id)}"]`);
    if (cell) cell.replaceChildren(badge(ev.state || ev.phase));
  }
}

// -- charts: inline SVG
function chart(title, points, color) {
  const W = 560, H = 120, max = Math.max(1, ...points);
  const step = points.length > 1 ? W / (points.length - 1) : W;
  const d = points.map((p, i) => `${i ? "L" : "M"}${(i * step).toFixed(1)},${(H - (p / max) * (H - 10)).toFixed(1)}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("width", W); svg.setAttribute("height", H);
  const path = document.createElementNS(svg.namespaceURI, "path");
  path.setAttribute("d", d || "M0,0"); path.setAttribute("fill", "none"); path.setAttribute("stroke", color); path.setAttribute("stroke-width", "2");
  svg.append(path);
  return h("div", { class: "chart" }, h("div", { class: "muted" }, `${title} (max ${max})`), svg);
}

// -- pages
function current() {
  const [name, ...rest] = (location.hash.replace(/^#\//, "") || "overview").split("/");
  return { name, arg: decodeURIComponent(rest.join("/")) };
}

function render() {
  const page = current();
  document.querySelectorAll("#nav a").forEach(a => a.classList.toggle("active", a.dataset.page === page.name));
  const pages = { overview, queues, tasks, task: () => renderTask(page.arg), workers, dead, schedules };
  (pages[page.name] || overview)();
}

function overview() {
  const s = state.snapshot;
  const depth = s.queues.reduce((n, q) => n + q.ready + q.delayed + q.in_flight, 0);
  const dead = s.queues.reduce((n, q) => n + q.dead, 0);
  view().replaceChildren(h("h2", {}, "Overview"),
    h("div", { class: "cards" },
      h("div", { class: "card" }, h("b", { id: "workers-online" }, s.workers.length), "workers online"),
      h("div", { class: "card" }, h("b", {}, depth), "tasks waiting or running"),
      h("div", { class: "card" }, h("b", {}, dead), "dead letters"),
      h("div", { class: "card" }, h("b", {}, s.queues.length), "queues")),
    chart("queue depth over time", state.history.map(p => p.depth), "#3558d6"),
    chart("succeeded per 2 s", state.history.map(p => p.done), "#1c8a4a"),
    chart("failed per 2 s", state.history.map(p => p.failed), "#c0392b"),
    state.form || (state.form = submitForm()));   // one form, kept across re-renders: typing survives them
}

function submitForm() {
  const name = h("input", { id: "submit-name", placeholder: "task name, e.g. tasks.add", size: 28 });
  const args = h("input", { id: "submit-args", placeholder: "args as JSON, e.g. [1, 2]", size: 28 });
  return h("form", { class: "row", id: "submit-form", onsubmit: async (e) => {
    e.preventDefault();
    let parsed;
    try { parsed = JSON.parse(args.value || "[]"); } catch (err) { toast("args must be a JSON array"); return; }
    const out = await api("POST", "/api/tasks", { name: name.value, args: parsed });
    name.value = ""; args.value = "";
    location.hash = "#/task/" + encodeURIComponent(out.id);
  } }, h("strong", {}, "Submit a task"), name, args, h("button", { id: "submit-btn", type: "submit" }, "Submit"));
}

function queues() {
  const rows = state.snapshot.queues.map(q => h("tr", {},
    h("td", {}, q.name), h("td", {}, q.ready), h("td", {}, q.delayed), h("td", {}, q.in_flight), h("td", {}, q.dead),
    h("td", {}, q.paused ? "paused" : "running"),
    h("td", {}, h("button", { onclick: async () => { await api("POST", `/api/queues/${encodeURIComponent(q.name)}/${q.paused ? "resume" : "pause"}`); toast("done"); } }, q.paused ? "Resume" : "Pause"))));
  view().replaceChildren(h("h2", {}, "Queues"), h("table", { id: "queues-table" },
    h("thead", {}, h("tr", {}, ["queue", "ready", "delayed", "in flight", "dead", "state", ""].map(t => h("th", {}, t)))), h("tbody", {}, rows)));
}

async function tasks(cursor) {
  const q = state.filters || {};
  const params = new URLSearchParams(Object.entries({ ...q, limit: 50 }).filter(([, v]) => v));
  if (cursor) params.set("cursor", cursor);
  const form = h("form", { class: "row", id: "task-filters", onsubmit: (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    if (f.get("id")) { location.hash = "#/task/" + encodeURIComponent(f.get("id")); return; }
    state.filters = { state: f.get("state"), queue: f.get("queue"), name: f.get("name") }; state.cursorStack = []; tasks();
  } },
    h("input", { name: "id", id: "search-id", placeholder: "task id" }),
    h("select", { name: "state" }, ["", "PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE", "dead_lettered", "REVOKED", "EXPIRED"].map(s => h("option", s === q.state ? { selected: "" } : {}, s))),
    h("input", { name: "queue", placeholder: "queue", value: q.queue || "" }),
    h("input", { name: "name", placeholder: "task name", value: q.name || "" }),
    h("button", { type: "submit" }, "Filter"), " ",
    h("button", { type: "button", class: "danger", id: "cancel-matching", onclick: () => cancelMatching(form) }, "Cancel matching…"));
  const page = await api("GET", "/api/tasks?" + params);
  const rows = page.items.map(t => h("tr", {},
    h("td", {}, h("a", { href: "#/task/" + encodeURIComponent(t.id) }, t.id)), h("td", {}, t.name), h("td", {}, t.queue),
    h("td", { "data-state-of": t.id }, badge(t.state)), h("td", {}, when(t.enqueued_ms || t.at_ms))));
  const nav = h("p", {},
    state.cursorStack.length ? h("button", { onclick: () => tasks(state.cursorStack.pop()) }, "Newer") : "",
    " ", page.next_cursor ? h("button", { id: "older", onclick: () => { state.cursorStack.push(cursor || ""); tasks(page.next_cursor); } }, "Older") : "");
  view().replaceChildren(h("h2", {}, "Tasks"), form, state.cancelResult || "", h("table", { id: "tasks-table" },
    h("thead", {}, h("tr", {}, ["id", "task", "queue", "state", "when"].map(t => h("th", {}, t)))), h("tbody", {}, rows)), nav);
}

// cancel every pending task of the queue and/or task name typed in the filters: a dry run
// first says how many match, the operator confirms, the result stays on the page
async function cancelMatching(form) {
  const f = new FormData(form), body = {};
  if (f.get("queue")) body.queue = f.get("queue");
  if (f.get("name")) body.name = f.get("name");
  if (!body.queue && !body.name) { toast("type a queue or a task name to cancel by"); return; }
  const what = [body.queue && `queue ${body.queue}`, body.name && `task ${body.name}`].filter(Boolean).join(", ");
  const dry = await api("POST", "/api/tasks/cancel", { ...body, dry_run: true });
  if (!dry.matched) { toast(`no pending task matches ${what}`); return; }
  if (!confirm(`Cancel ${dry.matched} pending task(s) of ${what}? This cannot be undone.`)) return;
  const out = await api("POST", "/api/tasks/cancel", body);
  state.cancelResult = h("p", { id: "cancel-result" }, `Cancelled ${out.revoked} of ${out.matched} matching task(s) of ${what}` +
    (out.unchanged ? `; ${out.unchanged} had already ended.` : "."));
  state.filters = { queue: body.queue, name: body.name }; state.cursorStack = [];
  await tasks();
  state.cancelResult = null;
}

async function renderTask(id) {
  let t;
  try { t = await api("GET", "/api/tasks/" + encodeURIComponent(id)); } catch (e) { view().replaceChildren(h("h2", {}, "Task " + id), h("p", { class: "error" }, e.message)); return; }
  const live = state.tasks[id];
  const rank = { PENDING: 0, STARTED: 1, RETRY: 2 };
  const st = live && live.state && (rank[live.state] ?? 3) > (rank[t.state] ?? 3) ? live.state : t.state;
  const parts = [h("h2", {}, "Task ", h("code", {}, id)),
    h("p", {}, "State: ", h("span", { id: "task-state", class: "state " + st }, st)),
    h("table", {}, h("tbody", {}, ["name", "queue", "phase", "attempt", "delivery_count", "worker", "enqueued_ms", "started_ms", "finished_ms", "reason"]
      .filter(k => t[k] !== undefined && t[k] !== "" && t[k] !== null)
      .map(k => h("tr", {}, h("th", {}, k), h("td", {}, k.endsWith("_ms") ? new Date(t[k]).toISOString() : t[k]))),
      ["parent_id", "root_id", "retried_as"].filter(k => t[k]).map(k => h("tr", {}, h("th", {}, k),
        h("td", {}, h("a", { href: "#/task/" + encodeURIComponent(t[k]) }, t[k])))))),
    h("h3", {}, "Arguments"), h("pre", { id: "task-args" }, JSON.stringify({ args: t.args, kwargs: t.kwargs }, null, 2))];
  if (t.state === "SUCCESS") parts.push(h("h3", {}, "Result"), h("pre", { id: "task-result" }, JSON.stringify(t.result, null, 2)));
  if (t.error) parts.push(h("h3", {}, "Error"), h("p", { class: "error" }, `${t.error.type}: ${t.error.message}`), h("pre", { id: "task-traceback" }, t.error.traceback || ""));
  const pr = (live && live.progress && (!t.progress || live.progress.at_ms >= (t.progress.at_ms || 0))) ? { done: live.progress.current, total: live.progress.total, message: live.progress.message } : t.progress;
  if (pr) parts.push(h("p", { id: "task-progress" }, "Progress: ",
    pr.total ? h("progress", { max: pr.total, value: pr.done }) : "", ` ${pr.done}${pr.total ? " / " + pr.total : ""} ${pr.message || ""}`));
  if (t.meta && Object.keys(t.meta).length) parts.push(h("h3", {}, "Meta"), h("pre", { id: "task-meta" }, JSON.stringify(t.meta, null, 2)));
  if (t.attempts && t.attempts.length) parts.push(h("h3", {}, "Attempts"), h("table", { id: "task-attempts" },
    h("thead", {}, h("tr", {}, ["attempt", "state", "worker", "started", "finished"].map(c => h("th", {}, c)))),
    h("tbody", {}, t.attempts.map(a => h("tr", {}, h("td", {}, a.attempt), h("td", {}, badge(a.state)), h("td", {}, a.worker || ""),
      h("td", {}, when(a.started_ms)), h("td", {}, when(a.finished_ms)))))));
  const fam = h("div", { id: "task-family" });
  parts.push(fam);
  const actions = h("p", {});
  if (t.state === "FAILURE") actions.append(h("button", { id: "retry-btn", onclick: async () => {
    const out = await api("POST", `/api/tasks/${encodeURIComponent(id)}/retry`);
    toast("retried as " + out.new_id); if (out.new_id) location.hash = "#/task/" + encodeURIComponent(out.new_id);
  } }, "Retry"));
  if (!["SUCCESS", "FAILURE", "REVOKED", "EXPIRED"].includes(t.state)) actions.append(h("button", { class: "danger", id: "cancel-btn", onclick: async () => {
    if (confirm("Cancel task " + id + "?")) { await api("POST", `/api/tasks/${encodeURIComponent(id)}/cancel`); toast("cancelled"); }
  } }, "Cancel"));
  parts.push(actions);
  if (current().name === "task" && current().arg === id) view().replaceChildren(...parts);
  renderFamily(id, fam);
}

// -- a task's canvas: parent, root, children, members (from the task index; cached a few seconds
// because the page re-renders on every live event of the task)
function taskRows(tableId, rows) {
  return h("table", { id: tableId }, h("thead", {}, h("tr", {}, ["id", "task", "state", "queue"].map(c => h("th", {}, c)))),
    h("tbody", {}, rows.map(r => h("tr", {}, h("td", {}, h("a", { href: r.link }, r.id)), h("td", {}, r.name),
      h("td", {}, badge(r.state)), h("td", {}, r.queue)))));
}

async function renderFamily(id, box) {
  const cache = state.family || (state.family = {});
  let f = cache[id];
  if (!f || Date.now() - f.at > 3000) {
    try { f = cache[id] = { at: Date.now(), data: await api("GET", `/api/tasks/${encodeURIComponent(id)}/family`) }; }
    catch (e) { return; }   // not in the index (yet): the page shows what the store knows
  }
  const d = f.data, kids = [];
  if (!d.parent_id && !d.children.length && !d.members.length) return;
  kids.push(h("h3", {}, "Canvas"));
  const link = (label, rid, row) => h("p", { id: "task-" + label }, label + ": ", h("a", { href: "#/task/" + encodeURIComponent(rid) }, rid),
    row ? [" ", row.name, " ", badge(row.state)] : " (not in the index)");
  if (d.parent_id) kids.push(link("parent", d.parent_id, d.parent));
  if (d.root_id !== id) kids.push(link("root", d.root_id, d.root));
  if (d.children.length) kids.push(h("h4", {}, `Children (${d.children.length})`), taskRows("task-children", d.children));
  if (d.members.length) kids.push(h("h4", {}, `Every task under the root (${d.members.length})`), taskRows("task-members", d.members));
  if (!d.complete) kids.push(h("p", { class: "muted" }, `Looked at the ${d.scanned} newest tasks since the root was enqueued; older members may be missing.`));
  box.replaceChildren(...kids);
}

function runningCell(w) {
  return h("td", { class: "running" }, (w.tasks || []).map(t => h("div", {},
    h("a", { href: "#/task/" + encodeURIComponent(t.id) }, t.name), " ", h("span", { class: "muted" }, "since " + when(t.started_ms)))));
}

async function workers() {
  const rows = state.snapshot.workers.map(w => h("tr", {}, h("td", {}, w.id), h("td", {}, w.host), h("td", {}, w.pid),
    h("td", {}, (w.queues || []).join(", ")), h("td", {}, w.state), h("td", {}, `${w.in_flight} / ${w.concurrency}`), runningCell(w),
    h("td", {}, w.processed), h("td", {}, w.failed), h("td", {}, w.lag_ms + " ms"), h("td", {}, when(w.last_seen_ms))));
  const table = h("table", { id: "workers-table" },
    h("thead", {}, h("tr", {}, ["worker", "host", "pid", "queues", "state", "in flight", "running now", "processed", "failed", "loop lag", "seen"].map(t => h("th", {}, t)))), h("tbody", {}, rows));
  const orphanBox = h("div", { id: "orphans" });
  view().replaceChildren(h("h2", {}, "Workers"), table, orphanBox);
  if (!state.orphansAt || Date.now() - state.orphansAt > 10000) {   // orphans scan the index: not every snapshot
    state.orphansAt = Date.now();
    try { state.orphans = (await api("GET", "/api/workers")).orphans || []; } catch (e) { state.orphans = []; }
  }
  const o = state.orphans || [];
  orphanBox.replaceChildren(h("h3", {}, `Orphaned tasks (${o.length})`),
    h("p", { class: "muted" }, "Started on a worker that is gone; the broker hands them out again when their lease ends."),
    o.length ? h("table", { id: "orphans-table" }, h("thead", {}, h("tr", {}, ["id", "task", "queue", "worker", "started"].map(t => h("th", {}, t)))),
      h("tbody", {}, o.map(t => h("tr", {}, h("td", {}, h("a", { href: "#/task/" + encodeURIComponent(t.id) }, t.id)), h("td", {}, t.name),
        h("td", {}, t.queue), h("td", {}, t.worker), h("td", {}, when(t.started_ms))))))
      : "");
}

async function dead() {
  const names = state.snapshot.queues.map(q => q.name);
  const chosen = state.deadQueue || names[0] || "default";
  const select = h("select", { id: "dead-queue", onchange: (e) => { state.deadQueue = e.target.value; dead(); } },
    names.map(n => h("option", n === chosen ? { selected: "" } : {}, n)));
  const data = await api("GET", `/api/queues/${encodeURIComponent(chosen)}/dead-letters?limit=100`);
  const rows = data.items.map(d => h("tr", {}, h("td", {}, d.id), h("td", {}, d.name), h("td", {}, d.reason),
    h("td", {}, h("code", {}, JSON.stringify(d.args))), h("td", {}, h("button", { class: "replay-one", onclick: () => replay(chosen, [d.id]) }, "Replay"))));
  view().replaceChildren(h("h2", {}, "Dead letters"), h("p", {}, "Queue ", select, " ",
    h("button", { id: "replay-all", onclick: () => replay(chosen, null) }, "Replay all"), " ",
    h("button", { class: "danger", id: "purge-btn", onclick: async () => {
      if (!confirm(`Delete every dead letter of ${chosen}? This cannot be undone.`)) return;
      const out = await api("POST", `/api/queues/${encodeURIComponent(chosen)}/dead-letters/purge`); toast(`purged ${out.purged}`); dead();
    } }, "Purge")),
    h("table", { id: "dead-table" }, h("thead", {}, h("tr", {}, ["id", "task", "reason", "args", ""].map(t => h("th", {}, t)))), h("tbody", {}, rows)));
}

async function replay(queue, ids) {
  const dry = await api("POST", `/api/queues/${encodeURIComponent(queue)}/dead-letters/replay`, { ids, dry_run: true });
  const n = (dry.matched || []).length;
  if (!confirm(`Replay ${n} dead letter(s) of ${queue}?`)) return;
  const out = await api("POST", `/api/queues/${encodeURIComponent(queue)}/dead-letters/replay`, { ids, dry_run: false });
  toast(`replayed ${(out.replayed || []).length}`);
  const first = (out.replayed || [])[0];
  if (first) location.hash = "#/task/" + encodeURIComponent(first);
}

async function schedules() {
  const data = await api("GET", "/api/schedules");
  const act = (name, verb) => async () => { await api("POST", `/api/schedules/${encodeURIComponent(name)}/${verb}`); toast(verb + " " + name); schedules(); };
  const rows = data.items.map(s => h("tr", {}, h("td", {}, s.name), h("td", {}, s.task), h("td", {}, s.rule),
    h("td", {}, s.paused ? "paused" : "active"), h("td", {}, s.next_run || ""), h("td", {}, s.last_run || ""), h("td", {}, s.last_outcome || ""),
    h("td", {}, h("button", { onclick: act(s.name, s.paused ? "resume" : "pause") }, s.paused ? "Resume" : "Pause"), " ",
      h("button", { onclick: act(s.name, "trigger") }, "Run now"))));
  view().replaceChildren(h("h2", {}, "Schedules"), h("table", { id: "schedules-table" },
    h("thead", {}, h("tr", {}, ["name", "task", "rule", "state", "next run", "last run", "outcome", ""].map(t => h("th", {}, t)))), h("tbody", {}, rows)));
}

document.getElementById("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, document.getElementById("key-input").value.trim());
  document.getElementById("key-input").value = "";
  document.getElementById("login").hidden = true;
  render();
});
window.addEventListener("hashchange", render);
render();
live();
