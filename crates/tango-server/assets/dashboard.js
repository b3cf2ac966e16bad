// tango-rs dashboard: reads /v2/ every 2 s with the key as a bearer token.
// Job names, traces and outputs come from students: they are only ever
// inserted as text (textContent / text nodes), never as markup.
"use strict";

const KEY_SLOT = "tango-dashboard-key";
const REFRESH_MS = 2000;
const LIVE_OUTPUT_JOBS = 8;
const LIVE_OUTPUT_LINES = 6;
const QUEUE_ROWS = 30;
const SVG_NS = "http://www.w3.org/2000/svg";

let selectedJob = null;
let timer = null;

function $(id) {
  return document.getElementById(id);
}

// el("td", {class: "x"}, "text", otherNode): an element with text children.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  return node;
}

// A key passed as #key=... (for scripts and tests) is moved to
// sessionStorage and removed from the address bar at once. Fragments are
// never sent to the server.
function takeKeyFromFragment() {
  const match = /(?:^#|&)key=([^&]*)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(KEY_SLOT, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function key() {
  return sessionStorage.getItem(KEY_SLOT);
}

class Unauthorized extends Error {}

async function api(path) {
  const response = await fetch(path, {
    headers: { Authorization: "Bearer " + key() },
    cache: "no-store",
    credentials: "omit",
  });
  if (response.status === 401) throw new Unauthorized("key not recognized");
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
  return body;
}

function duration(ms) {
  if (ms === null || ms === undefined || ms < 0) return "–";
  if (ms < 1000) return ms + " ms";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min " + Math.floor(s % 60) + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}

function clock(ms) {
  if (!ms) return "–";
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function span(from, to) {
  return from && to ? to - from : null;
}

function badge(job) {
  let kind = job.state;
  let text = job.state;
  if (job.state === "done" && job.outcome && job.outcome.startsWith("Error")) {
    kind = "error";
    text = "error";
  }
  return el("span", { class: "badge " + kind, title: job.outcome || "" }, text);
}

function isFailure(job) {
  return job.state === "failed" || (job.outcome || "").startsWith("Error");
}

function fillTable(table, rows, columns, emptyText) {
  const body = table.tBodies[0];
  const fresh = rows.map((job) => {
    const tr = el("tr", { "data-job": job.id });
    for (const cell of columns(job)) tr.append(el("td", {}, cell));
    tr.addEventListener("click", () => select(job.id));
    return tr;
  });
  if (fresh.length === 0) {
    fresh.push(el("tr", {}, el("td", { class: "empty", colspan: table.tHead.rows[0].cells.length }, emptyText)));
  }
  body.replaceChildren(...fresh);
}

function lastLines(text, n) {
  const lines = (text || "").replace(/\n$/, "").split("\n");
  return lines.slice(-n).join("\n");
}

function renderTiles(summary) {
  $("t-queued").textContent = summary.jobs.queued;
  $("t-running").textContent = summary.jobs.running;
  $("t-oldest").textContent =
    summary.oldest_wait_secs === null ? "none" : duration(Math.round(summary.oldest_wait_secs * 1000));
  $("t-done").textContent = summary.finished_total.done;
  $("t-failed").textContent = summary.finished_total.failed;
  $("t-callbacks").textContent = summary.callbacks.delivered;
  $("t-callbacks-sub").textContent = summary.callbacks.retries + " retries · " + summary.callbacks.abandoned + " abandoned";
}

// A round grid step (1, 2, 5, 10, 20, 50, ...) giving at most 4 lines.
function gridStep(max) {
  for (let magnitude = 1; ; magnitude *= 10) {
    for (const m of [1, 2, 5]) {
      if (max / (m * magnitude) <= 4) return m * magnitude;
    }
  }
}

function renderChart(t) {
  // Drawn at the element's own width so text is not stretched.
  const width = Math.max(300, $("chart").clientWidth || 1000);
  const height = 180;
  const left = 34;
  const bottom = 22;
  const top = 8;
  const n = t.done.length;
  const totals = t.done.map((d, i) => d + t.failed[i]);
  const max = Math.max(1, ...totals);
  const step = gridStep(max);
  const scaleMax = Math.ceil(max / step) * step;
  const plotH = height - bottom - top;
  const barW = (width - left) / n;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  const title = svg("title");
  title.textContent = "jobs finished per minute over the last hour";
  root.append(title);
  for (let v = 0; v <= scaleMax; v += step) {
    const y = top + plotH - (v / scaleMax) * plotH;
    root.append(svg("line", { x1: left, x2: width, y1: y, y2: y, class: "axis" }));
    const label = svg("text", { x: left - 6, y: y + 4, "text-anchor": "end" });
    label.textContent = v;
    root.append(label);
  }
  for (let i = 0; i < n; i++) {
    const x = left + i * barW + 1;
    const w = Math.max(1, barW - 2);
    const doneH = (t.done[i] / scaleMax) * plotH;
    const failedH = (t.failed[i] / scaleMax) * plotH;
    const minuteStart = t.start_ms + i * t.minute_ms;
    const tip = `${clock(minuteStart)}: ${t.done[i]} done, ${t.failed[i]} failed`;
    if (doneH > 0) {
      const bar = svg("rect", { x, width: w, y: top + plotH - doneH, height: doneH, class: "bar-done" });
      bar.append(svg("title"));
      bar.firstChild.textContent = tip;
      root.append(bar);
    }
    if (failedH > 0) {
      const bar = svg("rect", { x, width: w, y: top + plotH - doneH - failedH, height: failedH, class: "bar-failed" });
      bar.append(svg("title"));
      bar.firstChild.textContent = tip;
      root.append(bar);
    }
    if (i % 10 === 0 || i === n - 1) {
      const last = i === n - 1;
      const label = svg("text", { x: last ? width : x + w / 2, y: height - 6, "text-anchor": last ? "end" : "middle" });
      label.textContent = i === n - 1 ? "now" : "-" + (n - 1 - i) + " min";
      root.append(label);
    }
  }
  const legend = el(
    "div",
    { class: "legend" },
    el("span", {}, el("i", { class: "key-done" }), "done"),
    el("span", {}, el("i", { class: "key-failed" }), "failed"),
    el("span", {}, "last minute: " + totals[n - 1] + " · last hour: " + totals.reduce((a, b) => a + b, 0)),
  );
  $("chart").replaceChildren(root, legend);
  const note = $("chart-note");
  note.hidden = t.complete;
  note.textContent = t.complete ? "" : "Only the newest finished jobs the server keeps are counted; older minutes may be low.";
}

function renderPools(pools) {
  const body = $("pools").tBodies[0];
  const rows = pools.map((p) =>
    el("tr", {}, ...[p.image, p.vmms, p.total, p.busy, p.free, p.creating, p.target].map((v) => el("td", {}, v))),
  );
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { class: "empty", colspan: 7 }, "no pools yet")));
  body.replaceChildren(...rows);
}

// Shown only when a backend spreads VMs over several hosts (docker with
// [[docker.hosts]]); a host that is down or drained says so in its row.
function renderHosts(hosts) {
  $("hosts-card").hidden = hosts.length === 0;
  const rows = hosts.map((h) => {
    const state = (h.up ? "up" : "down") + (h.draining ? ", draining" : "");
    return el(
      "tr",
      { "data-host": h.name, class: h.up ? (h.draining ? "draining" : "") : "down" },
      ...[h.name, state, h.vms + " / " + h.max_vms, h.running_jobs, h.vm_starts, h.vm_start_failures, h.url].map((v) =>
        el("td", {}, v),
      ),
    );
  });
  $("hosts").tBodies[0].replaceChildren(...rows);
}

// Every server registered in the store: this one, and others alive or
// dead (killed, frozen or cut off: their heartbeat is older than their lease).
function renderServers(servers) {
  const rows = servers.map((s) =>
    el(
      "tr",
      { "data-server": s.id, class: s.alive ? "" : "down" },
      ...[
        s.name + (s.answering ? " (this)" : ""),
        s.alive ? "alive" : "dead",
        duration(s.heartbeat_age_ms) + " ago",
        duration(s.lease_ms),
        s.address,
        s.version,
      ].map((v) => el("td", {}, v)),
    ),
  );
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { class: "empty", colspan: 6 }, "no servers registered")));
  $("servers").tBodies[0].replaceChildren(...rows);
}

function renderQueue(queued, now) {
  $("c-queue").textContent = queued.length ? "(" + queued.length + ")" : "";
  // Oldest first: the longest waits lead (fair scheduling may start a
  // later job of another submitter first). A deadline queue can be long;
  // the first rows are the ones that matter.
  const rows = queued.slice().reverse();
  fillTable(
    $("queue"),
    rows.slice(0, QUEUE_ROWS),
    (j) => ["#" + j.id, j.name, j.submitter, j.courselab, j.image, duration(span(j.phases.added, now))],
    "nothing waiting",
  );
  if (rows.length > QUEUE_ROWS) {
    $("queue").tBodies[0].append(
      el("tr", {}, el("td", { class: "empty", colspan: 6 }, "… and " + (rows.length - QUEUE_ROWS) + " more")),
    );
  }
}

function renderRunning(running, details, now) {
  $("c-running").textContent = running.length ? "(" + running.length + ")" : "";
  const cards = running.map((job) => {
    const detail = details.get(job.id);
    const card = el(
      "div",
      { class: "job-card", "data-job": job.id },
      el(
        "div",
        { class: "head" },
        el("span", { class: "name" }, "#" + job.id + " " + job.name),
        el("span", { class: "meta" }, "by " + job.submitter),
        el("span", { class: "meta" }, [job.courselab, job.image, job.vm, job.host].filter((v) => v).join(" · ")),
        el("span", { class: "meta" }, "running " + duration(span(job.phases.copied_in || job.phases.assigned, now)) + " of " + job.timeout_secs + " s"),
      ),
    );
    if (detail) {
      const text = detail.output_tail ? lastLines(detail.output_tail, LIVE_OUTPUT_LINES) : "(no output yet)";
      card.append(el("pre", { class: "output" }, text));
    }
    card.addEventListener("click", () => select(job.id));
    return card;
  });
  if (cards.length === 0) cards.push(el("p", { class: "hint" }, "no job running"));
  $("running").replaceChildren(...cards);
}

function renderFinished(jobs, now) {
  const failures = jobs.filter(isFailure).slice(0, 10);
  fillTable(
    $("failures"),
    failures,
    (j) => ["#" + j.id, j.name, j.courselab, clock(j.phases.finished || j.phases.added), j.last_trace || j.outcome || ""],
    "no failures",
  );
  fillTable(
    $("recent"),
    jobs.slice(0, 25),
    (j) => [
      "#" + j.id,
      j.name,
      j.courselab,
      badge(j),
      j.host || "",
      duration(span(j.phases.added, j.phases.vm_ready)),
      duration(span(j.phases.copied_in, j.phases.ran)),
      duration(span(j.phases.added, j.phases.finished)),
      clock(j.phases.finished),
      j.outcome || j.last_trace || "",
    ],
    "no finished jobs yet",
  );
}

const PHASES = [
  ["added", "added"],
  ["assigned", "assigned"],
  ["vm_ready", "VM ready"],
  ["copied_in", "copied in"],
  ["ran", "ran"],
  ["copied_out", "copied out"],
  ["finished", "finished"],
  ["callback_delivered", "callback delivered"],
];

function renderDetail(job) {
  $("detail").hidden = false;
  $("d-title").replaceChildren("#" + job.id + " " + job.name + " ", badge(job));
  const added = job.phases.added;
  $("d-phases").replaceChildren(
    ...PHASES.map(([field, label]) => {
      const at = job.phases[field];
      return el(
        "div",
        { class: "phase" + (at ? "" : " missing") },
        el("b", {}, label),
        at ? clock(at) + (added && field !== "added" ? " (+" + duration(at - added) + ")" : "") : "–",
      );
    }),
  );
  $("d-trace").replaceChildren(...job.trace.map((t) => el("li", {}, el("time", {}, clock(t.at_ms)), t.message)));
  const source = { live: "live", file: "output file", none: "" }[job.output_source] || "";
  $("d-source").textContent = source + (job.output_truncated ? " · last 16 KiB" : "");
  $("d-output").textContent = job.output_tail === null ? "(no output)" : job.output_tail;
}

function select(id) {
  const first = selectedJob === null;
  selectedJob = id;
  refreshNow().then(() => {
    if (first) $("detail").scrollIntoView({ behavior: "smooth", block: "start" });
  });
}

function setStatus(text, bad) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("bad", !!bad);
}

function showLogin(message) {
  clearTimeout(timer);
  $("main").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  setStatus("not connected");
  $("key").focus();
}

async function refresh() {
  const [summary, pools, hosts, servers, live, finished] = await Promise.all([
    api("/v2/summary"),
    api("/v2/pools"),
    api("/v2/hosts"),
    api("/v2/servers"),
    // Live jobs: queued and running together, newest first.
    Promise.all([api("/v2/jobs?state=running&limit=500"), api("/v2/jobs?state=queued&limit=500")]),
    api("/v2/jobs?limit=100"),
  ]);
  const [running, queued] = [live[0].jobs, live[1].jobs];
  const watched = running.slice(0, LIVE_OUTPUT_JOBS).map((j) => j.id);
  const wanted = selectedJob !== null && !watched.includes(selectedJob) ? watched.concat([selectedJob]) : watched;
  const details = new Map();
  await Promise.all(
    wanted.map((id) =>
      api("/v2/jobs/" + id)
        .then((job) => details.set(id, job))
        .catch((e) => {
          if (e instanceof Unauthorized) throw e;
        }),
    ),
  );
  const now = summary.now_ms;
  renderTiles(summary);
  renderChart(summary.throughput);
  renderPools(pools.pools);
  renderHosts(hosts.hosts);
  renderServers(servers.servers);
  renderQueue(queued, now);
  renderRunning(running, details, now);
  renderFinished(
    finished.jobs.filter((j) => j.state === "done" || j.state === "failed"),
    now,
  );
  if (selectedJob !== null && details.has(selectedJob)) renderDetail(details.get(selectedJob));
  setStatus("updated " + clock(now) + " · up " + duration(summary.uptime_secs * 1000));
}

async function refreshNow() {
  clearTimeout(timer);
  try {
    await refresh();
  } catch (e) {
    if (e instanceof Unauthorized) {
      sessionStorage.removeItem(KEY_SLOT);
      showLogin("That key was not recognized.");
      return;
    }
    setStatus("update failed: " + e.message + " (retrying)", true);
  }
  timer = setTimeout(refreshNow, REFRESH_MS);
}

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("forget").hidden = false;
  refreshNow();
}

document.addEventListener("DOMContentLoaded", () => {
  takeKeyFromFragment();
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("key").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY_SLOT, value);
    $("key").value = "";
    start();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_SLOT);
    showLogin();
  });
  $("d-close").addEventListener("click", () => {
    selectedJob = null;
    $("detail").hidden = true;
  });
  if (key()) start();
  else showLogin();
});
