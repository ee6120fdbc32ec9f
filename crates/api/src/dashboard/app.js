// sandpool dashboard. Talks only to this server, with the bearer token typed in (kept in this
// tab's sessionStorage). Every value from the server is written with textContent, never as
// HTML: identifiers are chosen by clients and must not become markup.
"use strict";

const REFRESH_MS = 2000;
let token = sessionStorage.getItem("sandpool-token") || "";
let timer = null;
/// The identifier whose delete button was clicked once (armed); a second click deletes.
let armed = null;

const $ = (id) => document.getElementById(id);

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

/// The outcome of the last action (a deletion), kept until the next one.
function setNotice(text, isError) {
  $("notice").textContent = text;
  $("notice").classList.toggle("error", Boolean(isError));
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function duration(seconds) {
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

async function api(method, path) {
  const response = await fetch(path, { method, headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body && body.error) message = `${body.error.code}: ${body.error.message}`;
    } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

function renderPools(pools) {
  const body = $("pools").tBodies[0];
  body.replaceChildren();
  for (const pool of pools) {
    const row = body.insertRow();
    row.dataset.pool = pool.name;
    cell(row, pool.name);
    cell(row, pool.status);
    cell(row, String(pool.ready), "number ready");
    cell(row, String(pool.allocated), "number allocated");
    cell(row, String(pool.creating), "number");
    cell(row, String(pool.max), "number");
    const use = cell(row, "");
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.title = `${pool.allocated} of ${pool.max}`;
    const fill = document.createElement("div");
    fill.style.width = `${Math.min(100, (100 * pool.allocated) / Math.max(1, pool.max))}%`;
    bar.appendChild(fill);
    use.appendChild(bar);
  }
}

function renderSessions(pools, canDelete) {
  const body = $("sessions").tBodies[0];
  body.replaceChildren();
  let count = 0;
  for (const pool of pools) {
    for (const session of pool.sessions) {
      count += 1;
      const row = body.insertRow();
      row.dataset.pool = pool.name;
      row.dataset.identifier = session.identifier;
      cell(row, pool.name);
      const id = cell(row, "");
      const code = document.createElement("code");
      code.textContent = session.identifier;
      id.appendChild(code);
      cell(row, session.sessionGuid || "starting");
      cell(row, duration(session.ageSeconds), "number");
      cell(row, session.inUse ? "in use" : duration(session.idleSeconds), "number");
      cell(row, duration(session.cooldownLeftSeconds), "number");
      const actions = cell(row, "");
      if (canDelete) {
        const key = `${pool.name}\u0000${session.identifier}`;
        const button = document.createElement("button");
        button.type = "button";
        button.className = armed === key ? "confirm-delete" : "delete";
        button.textContent = armed === key ? "Really delete" : "Delete";
        button.addEventListener("click", () => onDelete(key, pool.name, session.identifier));
        actions.appendChild(button);
      }
    }
  }
  $("no-sessions").hidden = count > 0;
}

async function onDelete(key, pool, identifier) {
  if (armed !== key) {
    armed = key;
    refresh();
    return;
  }
  armed = null;
  try {
    const query = new URLSearchParams({ pool, identifier });
    await api("POST", `/dashboard/api/delete?${query}`);
    setNotice(`Deleted session ${identifier} of pool ${pool}.`);
  } catch (error) {
    setNotice(`Could not delete ${identifier}: ${error.message}`, true);
  }
  refresh();
}

function svg(name, attributes) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  return element;
}

/// Bars of `bars` (and red bars of `failures`), and optionally a line of `line`, 60 minutes.
function chart(target, bars, failures, line) {
  const width = 600, height = 140, slot = width / bars.length;
  const top = Math.max(1, ...bars);
  target.replaceChildren();
  bars.forEach((value, i) => {
    const h = (height - 10) * (value / top);
    target.appendChild(svg("rect", { class: "count", x: i * slot + 1, y: height - h, width: slot - 2, height: h }));
    if (failures && failures[i] > 0) {
      const f = (height - 10) * (failures[i] / top);
      target.appendChild(svg("rect", { class: "failures", x: i * slot + 1, y: height - f, width: slot - 2, height: f }));
    }
  });
  if (line) {
    const lineTop = Math.max(1, ...line);
    const points = line.map((value, i) => `${i * slot + slot / 2},${height - (height - 10) * (value / lineTop)}`).join(" ");
    target.appendChild(svg("polyline", { class: "wait", points }));
  }
}

function renderCharts(minutes) {
  const allocations = minutes.map((m) => m.allocations);
  const waits = minutes.map((m) => m.allocationWaitMsMean);
  chart($("chart-allocations"), allocations, null, waits);
  const total = allocations.reduce((a, b) => a + b, 0);
  const worst = Math.max(0, ...minutes.map((m) => m.allocationWaitMsMax));
  $("legend-allocations").textContent = `${total} new sessions in the last hour; longest wait ${worst.toFixed(1)} ms`;
  const executions = minutes.map((m) => m.executions);
  const failures = minutes.map((m) => m.executionFailures);
  chart($("chart-executions"), executions, failures, null);
  const runs = executions.reduce((a, b) => a + b, 0);
  const failed = failures.reduce((a, b) => a + b, 0);
  $("legend-executions").textContent = `${runs} executions in the last hour, ${failed} not successful`;
}

function renderEvents(events) {
  $("events-section").hidden = events === null;
  const list = $("events");
  list.replaceChildren();
  for (const event of events || []) {
    const item = document.createElement("li");
    const details = Object.entries(event.details).map(([k, v]) => `${k}=${v}`).join(" ");
    item.textContent = `${event.time}  ${event.pool}  ${event.identifier}  ${event.kind}  ${details}`;
    item.dataset.kind = event.kind;
    list.appendChild(item);
  }
}

async function refresh() {
  if (!token) return;
  try {
    const overview = await api("GET", "/dashboard/api/overview");
    renderPools(overview.pools);
    renderSessions(overview.pools, overview.caller.canDelete);
    renderCharts(overview.minutes);
    renderEvents(overview.events);
    $("content").hidden = false;
    setStatus(`Connected as ${overview.caller.subject} (${overview.caller.roles.join(", ")}); updated ${new Date().toLocaleTimeString()}.`);
  } catch (error) {
    setStatus(`Cannot read the overview: ${error.message}`, true);
    if (error.status === 401 || error.status === 403) {
      $("content").hidden = true;
      stop();
    }
  }
}

function start() {
  stop();
  $("disconnect").hidden = false;
  refresh();
  timer = setInterval(refresh, REFRESH_MS);
}

function stop() {
  if (timer) clearInterval(timer);
  timer = null;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("sandpool-token", token);
    start();
  });
  $("disconnect").addEventListener("click", () => {
    token = "";
    sessionStorage.removeItem("sandpool-token");
    stop();
    $("content").hidden = true;
    $("disconnect").hidden = true;
    setStatus("Not connected.");
    setNotice("");
  });
  if (token) start();
});
