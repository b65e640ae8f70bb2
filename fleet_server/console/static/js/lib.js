// Shared helpers of the console pages: JSON calls with the session's CSRF token, DOM building
// without innerHTML (feature names and tags are arbitrary strings), formatting, polling, dialogs.

const body = document.body;
export const canAct = body.dataset.role === "operator";
export const pollMs = Number(body.dataset.pollMs || 3000);

export function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// fetch JSON from the fleet server; state-changing calls carry the CSRF token.
export async function api(path, { method = "GET", body: payload } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
  if (payload !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: payload === undefined ? undefined : JSON.stringify(payload),
  });
  if (response.status === 401) {
    window.location.assign(`/console/login?next=${encodeURIComponent(location.pathname + location.search)}`);
    throw new ApiError("session ended; log in again", 401);
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(data.error || `${response.status} ${response.statusText}`, response.status);
  return data;
}

// el("td", {class: "num", title: "x"}, "text", otherNode)
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export function replace(target, ...children) {
  const node = typeof target === "string" ? document.getElementById(target) : target;
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}

export function rows(tbody, items, render, empty = "Nothing here.") {
  const node = typeof tbody === "string" ? document.querySelector(tbody) : tbody;
  const cols = node.closest("table").querySelectorAll("thead th").length || 1;
  if (!items.length) {
    node.replaceChildren(el("tr", {}, el("td", { colspan: cols, class: "empty" }, empty)));
    return;
  }
  node.replaceChildren(...items.map(render));
}

export function kv(target, pairs) {
  const node = typeof target === "string" ? document.getElementById(target) : target;
  node.replaceChildren(
    ...pairs.filter(Boolean).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v === null || v === undefined || v === "" ? "–" : v)]),
  );
}

// ------------------------------------------------------------------ formatting

export function fmtTime(ts) {
  if (!ts) return "–";
  const d = new Date(ts * 1000);
  return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function fmtClock(ts) {
  if (!ts) return "";
  return new Date(ts * 1000).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function ago(ts, now = Date.now() / 1000) {
  if (!ts) return "never";
  const s = Math.max(0, now - ts);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString();
  return Number(x.toPrecision(digits)).toLocaleString(undefined, { maximumFractionDigits: 6 });
}

export function fmtPct(x, digits = 1) {
  if (x === null || x === undefined) return "–";
  return `${(x * 100).toFixed(digits)} %`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function pill(text, kind) {
  return el("span", { class: `pill ${kind || String(text || "").toLowerCase()}` }, text || "–");
}

export function levelPill(level) {
  if (!level || level === "ok") return el("span", { class: "pill ok" }, "ok");
  return el("span", { class: `pill ${level === "alert" ? "bad" : "warn"}` }, level);
}

export function deviceLink(id) {
  return el("a", { href: `/console/devices/${encodeURIComponent(id)}` }, id);
}

export function scopeLink(scope) {
  if (scope && scope.startsWith("device:")) {
    const id = scope.slice(7);
    return el("span", {}, "device ", deviceLink(id));
  }
  return el("span", {}, scope);
}

// ------------------------------------------------------------------ live updates

const live = document.getElementById("live");

// Call `fn` now and every pollMs while the page is visible; the header shows how fresh it is.
export function poll(fn, interval = pollMs) {
  let timer = null;
  let running = false;
  async function tick() {
    if (running) return;
    running = true;
    try {
      await fn();
      if (live) {
        live.classList.remove("stale");
        live.textContent = `live · ${new Date().toLocaleTimeString()}`;
      }
    } catch (err) {
      if (live) {
        live.classList.add("stale");
        live.textContent = "connection problem";
      }
      if (err && err.status !== 401) console.warn("refresh failed:", err.message);
    } finally {
      running = false;
      timer = setTimeout(tick, interval);
    }
  }
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer !== null) {
      clearTimeout(timer);
      tick();
    }
  });
  tick();
  return { refresh: () => { clearTimeout(timer); return tick(); } };
}

// ------------------------------------------------------------------ feedback

export function toast(message, kind = "ok") {
  const box = document.getElementById("toasts");
  const node = el("div", { class: `toast ${kind}` }, message);
  box.append(node);
  setTimeout(() => node.remove(), 6000);
}

// A modal confirmation; resolves true when the operator confirms.
export function confirmAction(title, text, label = "Confirm") {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = label;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

// Run an action behind a confirmation, report the result, refresh the page's data.
export async function act({ title, text, label, call, done, refresh }) {
  if (!(await confirmAction(title, text, label))) return false;
  try {
    const result = await call();
    toast(done || "Done.");
    if (refresh) await refresh();
    return result || true;
  } catch (err) {
    toast(err.message, "bad");
    return false;
  }
}

// ------------------------------------------------------------------ scope filters

// The model version / scope / period form of the drift and performance pages. Its fields start
// from the page's query string (returned as `params`); `selection()` reads the form as
// {model, version, scope, start} (null without a model version) and `query(sel, extra)` is the
// API query string of a selection.
export function scopeFilters(form) {
  const params = new URLSearchParams(location.search);
  for (const [key, value] of params) {
    const field = form.elements.namedItem(key);
    if (field) field.value = value;
  }

  function selection() {
    const mv = form.elements.mv.value;
    if (!mv) return null;
    const slash = mv.indexOf("/");
    const kind = form.elements.kind.value;
    const value = form.elements.value.value.trim();
    let scope = "fleet";
    if (kind === "tag" && value.includes("=")) scope = `tag:${value}`;
    else if (kind === "device" && value) scope = `device:${value}`;
    const period = form.elements.period.value;
    return { model: mv.slice(0, slash), version: mv.slice(slash + 1), scope, start: period ? Date.now() / 1000 - Number(period) : null };
  }

  function query(sel, extra = {}) {
    const p = new URLSearchParams({ scope: sel.scope, ...extra });
    if (sel.start) p.set("start", String(Math.floor(sel.start)));
    return p.toString();
  }

  return { params, selection, query };
}

// A page over one model version in a time window (drift, performance): chart defaults, the
// page's chart holder, the filter form read by scopeFilters, the selected version's API base
// under `apiRoot`, and the most recent buckets a chart shows.
export function windowPage(apiRoot, maxBuckets = 120) {
  chartDefaults();
  const form = document.getElementById("filters");
  return {
    ...scopeFilters(form),
    form,
    charts: {},
    base: (sel) => `${apiRoot}/${encodeURIComponent(sel.model)}/${encodeURIComponent(sel.version)}`,
    recent: (points) => points.slice(-maxBuckets),
  };
}

// ------------------------------------------------------------------ charts

export const colors = {
  blue: "#2563eb",
  teal: "#0d9488",
  amber: "#d97706",
  red: "#dc2626",
  gray: "#9ca3af",
  violet: "#7c3aed",
  green: "#16a34a",
  series: ["#2563eb", "#0d9488", "#d97706", "#7c3aed", "#db2777", "#65a30d", "#0891b2", "#9ca3af"],
};

export function chartDefaults() {
  const Chart = window.Chart;
  Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
  Chart.defaults.font.size = 12;
  Chart.defaults.color = "#4b5563";
  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;
  Chart.defaults.plugins.legend.labels.boxWidth = 12;
}

// Create the chart on first call, then update its data in place (no flicker on refresh).
export function upsertChart(holder, key, canvasId, config) {
  const existing = holder[key];
  if (existing) {
    existing.data.labels = config.data.labels;
    config.data.datasets.forEach((ds, i) => {
      if (existing.data.datasets[i]) Object.assign(existing.data.datasets[i], ds);
      else existing.data.datasets.push(ds);
    });
    existing.data.datasets.length = config.data.datasets.length;
    if (config.options && config.options.scales) {
      for (const [axis, opts] of Object.entries(config.options.scales)) {
        if (opts.labels) existing.options.scales[axis].labels = opts.labels;
      }
    }
    existing.update("none");
    return existing;
  }
  holder[key] = new window.Chart(document.getElementById(canvasId), config);
  return holder[key];
}
