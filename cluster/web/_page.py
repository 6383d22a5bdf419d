"""The dashboard page and the HTML view of the dead letters.

Plain HTML, one inline style sheet and one inline script (no build step, nothing
fetched from elsewhere: it works offline). The script polls the JSON API about
once a second and builds every row with ``textContent``, never ``innerHTML``:
task names, ids, tags and errors are user data. The server-rendered dead-letter
view escapes everything with ``html.escape``. Both carry a per-response nonce
that the Content-Security-Policy header requires of inline code.
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import urlencode

__all__ = ["dashboard_html", "dead_letters_html"]

_STYLE = """
:root { color-scheme: light dark; --line: #8884; --muted: #888; --bad: #c0392b; --good: #1e8449; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; padding: 0 16px 32px;
       max-width: 1280px; }
header { display: flex; align-items: baseline; gap: 16px; border-bottom: 1px solid var(--line); }
h1 { font-size: 20px; margin: 12px 0; }
h2 { font-size: 16px; margin: 24px 0 8px; }
#status { color: var(--muted); }
#status.down { color: var(--bad); font-weight: 600; }
#message { min-height: 1.4em; margin: 8px 0; }
#message.error { color: var(--bad); }
.counters { display: grid; grid-template-columns: repeat(auto-fill, minmax(110px, 1fr)); gap: 8px; }
.counter { border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; }
.counter .label { color: var(--muted); font-size: 12px; }
.counter .value { font-size: 20px; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { font-weight: 600; font-size: 12px; color: var(--muted); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.id, td.mono { font-family: ui-monospace, monospace; word-break: break-all; }
td.error { max-width: 420px; }
pre { white-space: pre-wrap; font-size: 12px; margin: 4px 0; }
.state-running { color: #2471a3; font-weight: 600; }
.state-succeeded { color: var(--good); }
.state-failed, .state-timed_out { color: var(--bad); }
.state-cancelled { color: var(--muted); }
form.filters, .actions, nav.pager { display: flex; gap: 8px; align-items: center; margin: 8px 0;
  flex-wrap: wrap; }
nav.pager span { color: var(--muted); font-variant-numeric: tabular-nums; }
.empty { color: var(--muted); font-style: italic; }
"""

_SCRIPT = r"""
"use strict";
const TOKEN = document.querySelector('meta[name="cluster-token"]').content;
const PAGE = 20;
const TICK_MS = 1000;
const NAMES_EVERY = 5;  // per-name stats scan every task: fetch them less often
const STATES = ["pending", "delayed", "running", "retrying",
                "succeeded", "failed", "cancelled", "timed_out"];
const COUNTERS = [
  ["submitted", "submitted"], ["succeeded", "succeeded"], ["failed", "failed"],
  ["cancelled", "cancelled"], ["timed_out", "timed out"], ["retried", "retried"],
  ["queued", "queued"], ["delayed", "delayed"], ["running", "running"],
  ["waiting", "waiting"], ["workers", "workers"], ["dead_letters", "dead letters"],
  ["abandoned", "abandoned threads"],
];
const view = {
  tasks: {state: "", name: "", tag: "", offset: 0},
  dead: {offset: 0},
  selected: new Set(),   // dead-letter ids whose box is ticked
  open: new Set(),       // ids whose traceback is unfolded
  tick: 0,
};
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function fmtNum(n) { return typeof n === "number" ? n.toLocaleString() : String(n); }
function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleTimeString();
}
function timeCell(tr, iso) {
  const td = el("td", fmtTime(iso)); if (iso) td.title = iso; tr.append(td);
}
function errorText(err) { return err ? err.type + ": " + err.message : ""; }
function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}
async function getJSON(url) {
  const r = await fetch(url, {headers: {"Accept": "application/json"}, cache: "no-store"});
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
  return body;
}
async function post(url, body) {
  const r = await fetch(url, {
    method: "POST", cache: "no-store",
    headers: {"Content-Type": "application/json", "X-Cluster-Token": TOKEN},
    body: JSON.stringify(body),
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
  return data;
}
function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null) q.set(k, v);
  return q.toString();
}
function pager(prefix, offset, shown, total) {
  $(prefix + "-range").textContent = total === 0 ? "none"
    : fmtNum(offset + 1) + "\u2013" + fmtNum(offset + shown) + " of " + fmtNum(total);
  $(prefix + "-prev").disabled = offset <= 0;
  $(prefix + "-next").disabled = offset + shown >= total;
}
function emptyRow(tbody, columns, text) {
  const tr = el("tr"); const td = el("td", text, "empty"); td.colSpan = columns;
  tr.append(td); tbody.append(tr);
}

function renderStats(s) {
  const box = $("counters");
  box.replaceChildren();
  for (const [key, label] of COUNTERS) {
    const div = el("div", null, "counter"); div.dataset.counter = key;
    div.append(el("div", label, "label"), el("div", fmtNum(s[key]), "value"));
    box.append(div);
  }
  const tbody = $("executors").tBodies[0];
  tbody.replaceChildren();
  for (const [name, e] of Object.entries(s.executors || {})) {
    const tr = el("tr");
    tr.append(el("td", name, "mono"), el("td", fmtNum(e.capacity), "num"),
              el("td", fmtNum(e.running), "num"), el("td", fmtNum(e.queued), "num"));
    tbody.append(tr);
  }
}

function renderTasks(data) {
  const tbody = $("tasks").tBodies[0];
  tbody.replaceChildren();
  for (const t of data.tasks) {
    const tr = el("tr"); tr.dataset.id = t.id;
    tr.append(el("td", t.id, "id"), el("td", t.name, "mono"),
              el("td", t.state, "state state-" + t.state),
              el("td", fmtNum(t.priority), "num"), el("td", fmtNum(t.attempts), "num"));
    timeCell(tr, t.submitted_at); timeCell(tr, t.started_at); timeCell(tr, t.finished_at);
    tr.append(el("td", (t.tags || []).join(", ")),
              el("td", errorText(t.error || t.last_error), "error"));
    tbody.append(tr);
  }
  if (!data.tasks.length) emptyRow(tbody, 10, "no tasks");
  pager("tasks", data.offset, data.tasks.length, data.total);
}

function renderNames(data) {
  const tbody = $("names").tBodies[0];
  tbody.replaceChildren();
  const entries = Object.entries(data.names);
  for (const [name, n] of entries) {
    const tr = el("tr"); tr.dataset.name = name;
    tr.append(el("td", name, "mono"));
    for (const k of ["active", "dead", "succeeded", "failed", "cancelled", "timed_out"]) {
      tr.append(el("td", fmtNum(n[k]), "num"));
    }
    tbody.append(tr);
  }
  if (!entries.length) emptyRow(tbody, 7, "no tasks yet");
}

function renderDead(data) {
  const tbody = $("dead-letters").tBodies[0];
  tbody.replaceChildren();
  const present = new Set();
  for (const d of data.dead_letters) {
    present.add(d.id);
    const tr = el("tr"); tr.dataset.id = d.id;
    const box = el("input"); box.type = "checkbox"; box.checked = view.selected.has(d.id);
    box.setAttribute("aria-label", "select " + d.id);
    box.addEventListener("change", () => {
      if (box.checked) view.selected.add(d.id); else view.selected.delete(d.id);
    });
    const pick = el("td"); pick.append(box);
    const err = el("td", null, "error");
    const details = el("details"); details.open = view.open.has(d.id);
    details.addEventListener("toggle", () => {
      if (details.open) view.open.add(d.id); else view.open.delete(d.id);
    });
    details.append(el("summary", errorText(d.error)), el("pre", d.error_text));
    err.append(details);
    const act = el("td");
    const again = el("button", "Resurrect"); again.dataset.action = "resurrect";
    again.addEventListener("click", () => act_on("resurrect", [d.id]));
    const drop = el("button", "Clear"); drop.dataset.action = "clear";
    drop.addEventListener("click", () => act_on("clear", [d.id]));
    act.append(again, " ", drop);
    tr.append(pick, el("td", d.id, "id"), el("td", d.name, "mono"), err,
              el("td", fmtNum(d.attempts), "num"));
    timeCell(tr, d.failed_at);
    tr.append(act);
    tbody.append(tr);
  }
  for (const id of [...view.selected]) if (!present.has(id)) view.selected.delete(id);
  if (!data.dead_letters.length) emptyRow(tbody, 7, "no dead letters");
  pager("dead", data.offset, data.dead_letters.length, data.total);
}

async function act_on(action, ids) {
  try {
    const body = ids === null ? {} : {ids: ids};
    const r = await post("/dead-letters/" + action, body);
    say(action === "resurrect" ? "resurrected " + r.resurrected.join(", ")
                               : "cleared " + r.cleared + " dead letter(s)");
    for (const id of ids || []) view.selected.delete(id);
  } catch (e) {
    say(action + " failed: " + e.message, true);
  }
  refresh();
}

let timer = null;
let busy = false;
let again = false;  // a refresh was asked for while one was in flight
async function refresh() {
  if (timer !== null) { clearTimeout(timer); timer = null; }
  if (busy) { again = true; return; }
  busy = true;
  const began = performance.now();
  try {
    const t = view.tasks;
    const wantNames = view.tick % NAMES_EVERY === 0;
    const [stats, tasks, dead, names] = await Promise.all([
      getJSON("/api/stats"),
      getJSON("/api/tasks?" + query({state: t.state, name: t.name, tag: t.tag,
                                     limit: PAGE, offset: t.offset})),
      getJSON("/dead-letters?" + query({limit: PAGE, offset: view.dead.offset})),
      wantNames ? getJSON("/api/names") : Promise.resolve(null),
    ]);
    renderStats(stats); renderTasks(tasks); renderDead(dead);
    if (names) renderNames(names);
    view.tick += 1;
    $("status").textContent = "live \u00b7 updated " + new Date().toLocaleTimeString();
    $("status").className = "";
  } catch (e) {
    $("status").textContent = "disconnected: " + e.message;
    $("status").className = "down";
  } finally {
    busy = false;
  }
  if (again) { again = false; refresh(); return; }
  // A cluster holding a million tasks makes some queries slow (a state filter, the
  // per-name stats scan every task under the cluster's lock): poll at most 10% of the time.
  timer = setTimeout(refresh, Math.max(TICK_MS, 10 * (performance.now() - began)));
}

function setup() {
  const select = $("filter-state");
  for (const s of STATES) { const o = el("option", s); o.value = s; select.append(o); }
  $("task-filter").addEventListener("submit", (ev) => {
    ev.preventDefault();
    view.tasks.state = select.value;
    view.tasks.name = $("filter-name").value.trim();
    view.tasks.tag = $("filter-tag").value.trim();
    view.tasks.offset = 0;
    refresh();
  });
  $("tasks-prev").addEventListener("click", () => {
    view.tasks.offset = Math.max(0, view.tasks.offset - PAGE); refresh();
  });
  $("tasks-next").addEventListener("click", () => { view.tasks.offset += PAGE; refresh(); });
  $("dead-prev").addEventListener("click", () => {
    view.dead.offset = Math.max(0, view.dead.offset - PAGE); refresh();
  });
  $("dead-next").addEventListener("click", () => { view.dead.offset += PAGE; refresh(); });
  $("dl-resurrect-selected").addEventListener("click", () => {
    if (view.selected.size) act_on("resurrect", [...view.selected]);
  });
  $("dl-clear-selected").addEventListener("click", () => {
    if (view.selected.size) act_on("clear", [...view.selected]);
  });
  $("dl-clear-all").addEventListener("click", () => {
    if (confirm("Forget every dead letter?")) act_on("clear", null);
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  refresh();
}
setup();
"""

_DASHBOARD = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="cluster-token" content="@TOKEN@">
<link rel="icon" href="data:,">
<title>cluster dashboard</title>
<style nonce="@NONCE@">@STYLE@</style>
</head>
<body>
<header><h1>cluster</h1><span id="status">connecting\u2026</span></header>
<div id="message" role="status"></div>
<section>
<div class="counters" id="counters"></div>
</section>
<section>
<h2>Executors</h2>
<table id="executors"><thead><tr><th>executor</th><th class="num">capacity</th>
<th class="num">running</th><th class="num">queued</th></tr></thead><tbody></tbody></table>
</section>
<section>
<h2>Tasks</h2>
<form class="filters" id="task-filter">
<select id="filter-state" aria-label="state"><option value="">any state</option></select>
<input id="filter-name" placeholder="name" aria-label="name">
<input id="filter-tag" placeholder="tag" aria-label="tag">
<button type="submit">Filter</button>
</form>
<table id="tasks"><thead><tr><th>id</th><th>name</th><th>state</th><th class="num">priority</th>
<th class="num">attempts</th><th>submitted</th><th>started</th><th>finished</th><th>tags</th>
<th>error</th></tr></thead><tbody></tbody></table>
<nav class="pager"><button id="tasks-prev" type="button">\u2039 newer</button>
<span id="tasks-range"></span><button id="tasks-next" type="button">older \u203a</button></nav>
</section>
<section>
<h2>Task names</h2>
<table id="names"><thead><tr><th>name</th><th class="num">active</th><th class="num">dead</th>
<th class="num">succeeded</th><th class="num">failed</th><th class="num">cancelled</th>
<th class="num">timed out</th></tr></thead><tbody></tbody></table>
</section>
<section>
<h2>Dead letters</h2>
<div class="actions">
<button id="dl-resurrect-selected" type="button">Resurrect selected</button>
<button id="dl-clear-selected" type="button">Clear selected</button>
<button id="dl-clear-all" type="button">Clear all</button>
</div>
<table id="dead-letters"><thead><tr><th></th><th>id</th><th>name</th><th>error</th>
<th class="num">attempts</th><th>failed</th><th></th></tr></thead><tbody></tbody></table>
<nav class="pager"><button id="dead-prev" type="button">\u2039 newer</button>
<span id="dead-range"></span><button id="dead-next" type="button">older \u203a</button></nav>
</section>
<script nonce="@NONCE@">@SCRIPT@</script>
</body>
</html>
"""


def _fill(template: str, **parts: str) -> str:
    for key, value in parts.items():
        template = template.replace(f"@{key}@", value)
    return template


def dashboard_html(token: str, nonce: str) -> str:
    """The dashboard page, carrying the server's token in ``<meta name="cluster-token">``."""
    return _fill(
        _DASHBOARD,
        TOKEN=escape(token),
        NONCE=escape(nonce),
        STYLE=_STYLE,
        SCRIPT=_SCRIPT,
    )


def dead_letters_html(data: dict[str, Any], name: str | None, token: str, nonce: str) -> str:
    """The dead letters as a server-rendered table (``GET /dead-letters`` asked for
    HTML): ``data`` is the JSON form of the page. Resurrect and clear are on the
    dashboard (they need the token header, which a plain form cannot send)."""
    rows = []
    for d in data["dead_letters"]:
        error = d["error"] or {"type": "", "message": ""}
        rows.append(
            "<tr>"
            f'<td class="id">{escape(d["id"])}</td>'
            f'<td class="mono">{escape(d["name"])}</td>'
            f'<td class="error"><details><summary>{escape(error["type"])}: '
            f"{escape(error['message'])}</summary><pre>{escape(d['error_text'])}</pre>"
            "</details></td>"
            f'<td class="num">{d["attempts"]}</td>'
            f"<td>{escape(d['failed_at'])}</td>"
            "</tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="5" class="empty">no dead letters</td></tr>')
    total, limit, offset = data["total"], data["limit"], data["offset"]
    shown = len(data["dead_letters"])
    links = []
    base = {} if name is None else {"name": name}
    if offset > 0:
        prev = urlencode({**base, "limit": limit, "offset": max(0, offset - limit)})
        links.append(f'<a rel="prev" href="/dead-letters?{escape(prev)}">\u2039 newer</a>')
    span = "none" if total == 0 else f"{offset + 1}\u2013{offset + shown} of {total}"
    links.append(f"<span>{span}</span>")
    if offset + shown < total:
        nxt = urlencode({**base, "limit": limit, "offset": offset + limit})
        links.append(f'<a rel="next" href="/dead-letters?{escape(nxt)}">older \u203a</a>')
    title = "Dead letters" if name is None else f"Dead letters of {escape(name)}"
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="cluster-token" content="{escape(token)}">\n'
        '<link rel="icon" href="data:,">\n'
        f'<title>{title}</title>\n<style nonce="{escape(nonce)}">{_STYLE}</style>\n'
        "</head>\n<body>\n"
        f'<header><h1>{title}</h1><a href="/">dashboard</a></header>\n'
        '<table id="dead-letters"><thead><tr><th>id</th><th>name</th><th>error</th>'
        '<th class="num">attempts</th><th>failed</th></tr></thead><tbody>\n'
        + "\n".join(rows)
        + '\n</tbody></table>\n<nav class="pager">'
        + " ".join(links)
        + "</nav>\n</body>\n</html>\n"
    )
