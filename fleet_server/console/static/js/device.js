// Device detail: versions, hardware, telemetry series and bandwidth, drift, alerts, the newest
// sampled rows and the update timeline.
import { act, ago, api, canAct, chartDefaults, colors, el, fmtBytes, fmtClock, fmtNum, fmtTime, kv, levelPill, pill, poll, replace, upsertChart } from "./lib.js";

chartDefaults();
const charts = {};
const deviceId = document.getElementById("device-title").dataset.device;

function lineOptions(yTitle, percent = false) {
  return {
    plugins: { legend: { position: "bottom" } },
    scales: {
      y: { beginAtZero: true, title: { display: true, text: yTitle }, ticks: percent ? { callback: (v) => `${(v * 100).toFixed(1)} %` } : {} },
      x: { ticks: { maxTicksLimit: 8 } },
    },
  };
}

function timeline(events) {
  if (!events.length) return [el("li", { class: "empty" }, "No update events yet.")];
  return events.map((e) => {
    const failed = e.event === "failure" || ["failure", "rolled_back", "rollback_failed", "disk_full"].includes(e.outcome) || e.kind === "refused";
    const ok = e.outcome === "success" || e.to_state === "Commit";
    const what = e.kind === "outcome" ? `outcome: ${e.outcome}` : e.kind === "refused" ? "refused" : `${e.from_state || "?"} → ${e.to_state || "?"}`;
    return el("li", { class: failed ? "bad" : ok ? "ok" : "" },
      el("span", { class: "when", title: fmtTime(e.ts) }, fmtClock(e.ts)),
      el("span", { class: "what" }, what),
      e.version ? el("span", { class: "tag" }, e.version) : null,
      e.event ? el("span", { class: "muted" }, e.event) : null,
      e.rollout_id ? el("a", { href: `/console/rollouts/${encodeURIComponent(e.rollout_id)}`, class: "muted" }, "rollout") : null,
      e.reason ? el("span", { class: "reason" }, e.reason) : null);
  });
}

function sampleValue(v) {
  // null: the feature is excluded from samples on the device (privacy), or the output was missing.
  if (v === null || v === undefined) return el("td", { class: "null", title: "not sent by the device" }, "null");
  return el("td", { class: typeof v === "number" ? "num" : "" }, typeof v === "number" ? fmtNum(v, 4) : String(v));
}

// One table per model version among the rows, headed by that version's feature names.
function sampleTables(s) {
  if (!s.samples.length) return [el("p", { class: "muted" }, "No sampled rows yet.")];
  const many = s.columns.length > 1;
  return s.columns.map((c) => {
    const rows = s.samples.filter((r) => r.model === c.model && r.model_version === c.model_version);
    const width = Math.max(c.features.length, ...rows.map((r) => r.x.length));
    const names = Array.from({ length: width }, (_, i) => c.features[i] ?? `x${i}`);
    return el("div", {},
      many ? el("h3", {}, `${c.model} ${c.model_version}`) : null,
      el("table", { class: "data compact samples" },
        el("thead", {}, el("tr", {}, el("th", {}, "Time"), names.map((n) => el("th", { title: n }, n)), el("th", { title: `output ${c.output}` }, `→ ${c.output}`))),
        el("tbody", {}, rows.map((r) => el("tr", {},
          el("td", { title: `window ending ${fmtTime(r.window_end)}, seq ${r.seq}` }, fmtClock(r.window_end)),
          names.map((_, i) => sampleValue(r.x[i])),
          sampleValue(r.y))))));
  });
}

async function refresh() {
  const d = await api(`/console/api/devices/${encodeURIComponent(deviceId)}`);
  const dev = d.device;
  replace("status", dev.status === "unknown" ? "never connected" : dev.status);
  document.getElementById("status").className = `pill ${dev.status}`;
  replace("tags", ...Object.entries(dev.tags).map(([k, v]) => el("span", { class: "tag" }, `${k}=${v}`)), ` last seen ${ago(dev.last_seen, d.server_time)}`);
  kv("versions", [
    ["Model", dev.model],
    ["Active version", dev.active_version ? el("strong", {}, dev.active_version) : null],
    ["Previous version", dev.previous_version],
    ["Candidate", dev.candidate_version ? `${dev.candidate_version}${d.mode ? ` (${d.mode})` : ""}` : null],
    ["Update state", dev.update_state ? pill(dev.update_state, ["idle", "Idle"].includes(dev.update_state) ? "ok" : "info") : null],
    ["Last outcome", d.update_outcome],
    ["Last error", d.last_error ? el("span", { class: "bad-text" }, d.last_error) : null],
  ]);
  const hw = d.hardware || {};
  kv("hardware", [
    ["Architecture", hw.arch],
    ["CPU", hw.cpu_model ? `${hw.cpu_model} (${hw.cpu_count} cores)` : hw.cpu_count ? `${hw.cpu_count} cores` : null],
    ["Memory", hw.ram_mb ? fmtBytes(hw.ram_mb * 1024 * 1024) : null],
    hw.profile ? ["Profile", hw.profile] : null,
    ["Agent", dev.agent_version],
    ["Uptime", d.uptime_s ? `${fmtNum(d.uptime_s / 3600, 2)} h` : null],
    ["Provisioned", fmtTime(dev.created_at)],
  ]);
  const del = d.delivery || {};
  kv("telemetry", [
    ["Windows (6 h)", fmtNum(d.telemetry.windows)],
    ["Windows per minute", fmtNum(d.telemetry.windows_per_min)],
    ["Predictions (6 h)", fmtNum(d.telemetry.predictions)],
    ["Messages received", fmtNum(del.received)],
    ["Lost (seq gaps)", del.lost ? el("span", { class: "bad-text" }, fmtNum(del.lost)) : fmtNum(del.lost ?? null)],
    ["Dropped on device", fmtNum(del.dropped_by_device ?? null)],
    ["Reinstalls", del.reinstalls ? `${fmtNum(del.reinstalls)} (last ${fmtTime(del.reinstalled_at)})` : fmtNum(del.reinstalls ?? null)],
  ]);
  const labels = d.series.map((p) => fmtClock(p.bucket_start));
  upsertChart(charts, "latency", "latency-chart", {
    type: "line",
    data: { labels, datasets: [
      { label: "p50", data: d.series.map((p) => p.p50_ms), borderColor: colors.blue, backgroundColor: colors.blue, pointRadius: 0, tension: 0.2 },
      { label: "p95", data: d.series.map((p) => p.p95_ms), borderColor: colors.amber, backgroundColor: colors.amber, pointRadius: 0, tension: 0.2 },
    ] },
    options: lineOptions("ms"),
  });
  upsertChart(charts, "errors", "errors-chart", {
    type: "line",
    data: { labels, datasets: [{ label: "error rate", data: d.series.map((p) => p.error_rate), borderColor: colors.red, backgroundColor: "rgba(220,38,38,.12)", fill: true, pointRadius: 0 }] },
    options: lineOptions("errors / requests", true),
  });
  upsertChart(charts, "traffic", "traffic-chart", {
    type: "bar",
    data: { labels, datasets: [
      { label: "predictions", data: d.series.map((p) => p.predictions), backgroundColor: colors.teal, yAxisID: "y" },
      { label: "windows", data: d.series.map((p) => p.windows), type: "line", borderColor: colors.violet, backgroundColor: colors.violet, pointRadius: 0, yAxisID: "y1" },
    ] },
    options: { plugins: { legend: { position: "bottom" } }, scales: { y: { beginAtZero: true, title: { display: true, text: "predictions" } }, y1: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false }, ticks: { precision: 0 }, title: { display: true, text: "windows" } }, x: { ticks: { maxTicksLimit: 8 } } } },
  });
  const bw = d.bandwidth;
  kv("bandwidth", [
    ["Bytes per hour", bw.messages ? el("strong", {}, `${fmtBytes(bw.bytes_per_hour)}/h`) : null],
    ["Messages per hour", bw.messages ? fmtNum(Math.round(bw.messages_per_hour)) : null],
    ["Average message", bw.bytes_per_message ? fmtBytes(bw.bytes_per_message) : null],
    ["Received", bw.messages ? `${fmtBytes(bw.bytes)} in ${fmtNum(bw.messages)} messages` : null],
  ]);
  upsertChart(charts, "bandwidth", "bandwidth-chart", {
    type: "line",
    data: { labels: bw.points.map((p) => fmtClock(p.start)), datasets: [
      { label: "bytes per hour", data: bw.points.map((p) => p.bytes_per_hour), borderColor: colors.violet, backgroundColor: "rgba(124,58,237,.12)", fill: true, pointRadius: 0 },
    ] },
    options: { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true, title: { display: true, text: "bytes / hour" }, ticks: { callback: (v) => fmtBytes(v) } }, x: { ticks: { maxTicksLimit: 6 } } } },
  });
  const s = d.samples;
  replace("samples-note", `Newest ${fmtNum(s.samples.length)} of the ${fmtNum(s.kept_per_device)} rows kept per device; null: a feature the device does not send.`);
  replace("samples", sampleTables(s));
  replace("drift", d.drift.length ? d.drift.map((m) => el("div", {},
    el("h3", {}, `${m.model} ${m.version} `, el("span", { class: "muted" }, `${fmtNum(m.predictions)} predictions`), " ",
      el("a", { href: `/console/drift?mv=${encodeURIComponent(`${m.model}/${m.version}`)}&kind=device&value=${encodeURIComponent(deviceId)}` }, "details")),
    el("table", { class: "data compact" }, el("thead", {}, el("tr", {}, el("th", {}, "Feature"), el("th", { class: "num" }, "PSI"), el("th", { class: "num" }, "noise"), el("th", {}, "Level"))),
      el("tbody", {}, [...m.features, ...(m.prediction ? [{ name: "prediction", ...m.prediction }] : [])].map((f) =>
        el("tr", {}, el("td", {}, f.name), el("td", { class: "num" }, fmtNum(f.psi)), el("td", { class: "num" }, fmtNum(f.noise_psi)), el("td", {}, levelPill(f.level)))))))) :
    [el("p", { class: "muted" }, "No telemetry for a registered model in the last 6 hours.")]);
  const open = d.alerts.filter((a) => a.state === "open");
  replace("device-alerts", open.length ? el("p", { class: "bad-text" }, `${open.length} open drift alert(s): `, el("a", { href: "/console/drift" }, "see the drift page")) : null);
  replace("timeline", timeline(d.events));
}

const ROTATION_KIND = { pending: "info", issued: "info", confirmed: "ok", expired: "bad" };

// The device's password rotation, from the REST API (the console session is accepted there).
async function refreshCredentials() {
  const r = (await api(`/api/v1/devices/${encodeURIComponent(deviceId)}`)).device.rotation;
  kv("credentials", [
    ["Password rotation", r ? pill(r.state, ROTATION_KIND[r.state] || "info") : "never rotated"],
    ["Requested", r ? `${fmtTime(r.requested_at)}${r.requested_by ? ` by ${r.requested_by}` : ""}` : null],
    ["New password taken", r && r.issued_at ? fmtTime(r.issued_at) : null],
    ["Confirmed", r && r.confirmed_at ? fmtTime(r.confirmed_at) : null],
    ["Expires", r && !r.confirmed_at ? fmtTime(r.expires_at) : null],
  ]);
}

if (canAct) {
  document.getElementById("rotate-password").addEventListener("click", () => act({
    title: "Rotate the device's password",
    text: `${deviceId} takes a new password over its own connection when it is online; its old password keeps working until the device confirms the new one.`,
    label: "Rotate password",
    done: "Rotation started: the device switches to its new password when it is online.",
    call: () => api(`/api/v1/devices/${encodeURIComponent(deviceId)}/rotate-password`, { method: "POST" }),
    refresh: refreshCredentials,
  }));
}

poll(refresh);
poll(refreshCredentials);
