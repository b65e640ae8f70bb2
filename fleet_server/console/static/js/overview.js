// Fleet overview: device states, versions in use, open alerts, active rollouts, ingest health, server nodes.
import { api, chartDefaults, colors, el, fmtNum, fmtTime, kv, levelPill, pill, poll, replace, rows, scopeLink, upsertChart } from "./lib.js";
import { rolloutSummaryRows } from "./rollout_common.js";

chartDefaults();
const charts = {};

function versionLabel(v) {
  return v.version ? `${v.model} ${v.version}` : "no model yet";
}

async function refresh() {
  const o = await api("/console/api/overview");
  for (const key of ["total", "online", "offline", "updating"]) {
    document.getElementById(`n-${key}`).textContent = fmtNum(o.devices[key]);
  }
  document.getElementById("n-alerts").textContent = fmtNum(o.alerts.open);
  upsertChart(charts, "versions", "versions-chart", {
    type: "bar",
    data: {
      labels: o.versions.map(versionLabel),
      datasets: [{ label: "devices", data: o.versions.map((v) => v.devices), backgroundColor: o.versions.map((v, i) => (v.version ? colors.series[i % colors.series.length] : colors.gray)), borderRadius: 4, maxBarThickness: 34 }],
    },
    options: { indexAxis: "y", plugins: { legend: { display: false } }, scales: { x: { beginAtZero: true, ticks: { precision: 0 } } } },
  });
  rows("#versions-table tbody", o.versions, (v) =>
    el("tr", {}, el("td", {}, v.model || "–"), el("td", {}, v.version ? el("a", { href: `/console/devices?version=${encodeURIComponent(v.version)}` }, v.version) : "–"), el("td", { class: "num" }, fmtNum(v.devices))),
    "No devices yet.");
  rows("#alerts-table tbody", o.alerts.recent, (a) =>
    el("tr", {}, el("td", {}, levelPill(a.severity)), el("td", {}, `${a.model} ${a.model_version}`), el("td", {}, scopeLink(a.scope)), el("td", {}, a.target),
      el("td", { class: "num" }, fmtNum(a.value)), el("td", {}, fmtTime(a.opened_at)), el("td", {}, a.acknowledged_by ? `by ${a.acknowledged_by}` : "no")),
    "No open alerts.");
  const ing = o.ingest;
  const lagP99 = Math.max(0, ...ing.workers.map((w) => (w.lag_s && w.lag_s.p99) || 0));
  const lagP50 = Math.max(0, ...ing.workers.map((w) => (w.lag_s && w.lag_s.p50) || 0));
  kv("ingest", [
    ["Ingest processes", ing.workers.length ? ing.workers.map((w) => `#${w.worker_id}`).join(", ") : "none reporting"],
    ["Lag p50 / p99", ing.workers.length ? `${fmtNum(lagP50 * 1000)} ms / ${fmtNum(lagP99 * 1000)} ms` : "–"],
    // Windows a device held back (offline, resent) are not ingest lag: counted apart.
    ["Late deliveries (over 2 min)", fmtNum(ing.workers.reduce((s, w) => s + (w.late_windows || 0), 0))],
    ["Queue depth", fmtNum(ing.workers.reduce((s, w) => s + (w.queue || 0), 0))],
    ["Windows stored", fmtNum(ing.workers.reduce((s, w) => s + (w.stored_windows || 0), 0))],
    ["Rejected messages", ing.rejected ? el("span", { class: "bad-text" }, `${fmtNum(ing.rejected)} (${Object.entries(ing.rejects_by_reason).map(([k, n]) => `${k}: ${n}`).join(", ")})`) : "0"],
    ["Lost (seq gaps)", fmtNum(ing.lost_messages)],
    ["Dropped by devices", fmtNum(ing.dropped_by_devices)],
  ]);
  rows("#nodes-table tbody", o.cluster || [], (n) =>
    el("tr", { class: n.gone ? "muted" : "" }, el("td", {}, n.node_id),
      el("td", {}, n.role === "leader" ? pill("leader", "ok") : n.role === "gone" ? pill("gone", "bad") : "follower"),
      el("td", {}, n.version), el("td", {}, `${n.host} (pid ${n.pid})`), el("td", {}, `${fmtTime(n.heartbeat_at)} (${fmtNum(n.heartbeat_age_s)} s ago)`)),
    "No node has reported yet.");
  await refreshRollouts();
}

async function refreshRollouts() {
  const box = document.getElementById("rollouts");
  let data;
  try {
    data = await api("/api/v1/rollouts?active=true");
  } catch (err) {
    replace(box, el("p", { class: "muted" }, err.status === 404 ? "Rollouts are not available on this server." : err.message));
    return;
  }
  const active = (data.rollouts || []).filter((r) => ["running", "paused", "aborting"].includes(r.state));
  if (!active.length) {
    replace(box, el("p", { class: "muted" }, "No rollout is running. ", el("a", { href: "/console/rollouts" }, "All rollouts")));
    return;
  }
  replace(box, el("table", { class: "data compact" }, el("thead", {}, el("tr", {}, el("th", {}, "Rollout"), el("th", {}, "Version"), el("th", {}, "State"), el("th", {}, "Stage"), el("th", { class: "num" }, "Progress"))),
    el("tbody", {}, rolloutSummaryRows(active))));
}

poll(refresh);
