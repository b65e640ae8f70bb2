// Drift: PSI heatmap (feature x time), reference vs current distributions, devices, alerts.
import { act, api, canAct, colors, el, fmtClock, fmtNum, fmtPct, fmtTime, levelPill, poll, rows, scopeLink, upsertChart, windowPage } from "./lib.js";

const { charts, form, base, recent, params, selection, query: q } = windowPage("/api/v1/models");
const featureSelect = document.getElementById("feature");
let featuresKey = "";

if (params.get("feature")) featureSelect.dataset.want = params.get("feature");

function psiColor(v, policy) {
  if (v === null || v === undefined) return "#f3f4f6";
  if (v >= policy.alert_psi) return `rgba(220,38,38,${Math.min(1, 0.55 + v)})`;
  if (v >= policy.warn_psi) return "rgba(217,119,6,.75)";
  return `rgba(13,148,136,${0.12 + Math.min(0.5, (v / policy.warn_psi) * 0.5)})`;
}

function renderHeatmap(tl, policy) {
  const points = recent(tl.points);
  const xs = points.map((p) => fmtClock(p.bucket_start));
  const multivariate = points.some((p) => p.multivariate);
  // The category axis runs bottom up: the multivariate row goes last, on top of the heatmap.
  const ys = [...tl.features.map((f) => f.name), "prediction", ...(multivariate ? ["multivariate"] : [])];
  const data = [];
  points.forEach((p, i) => {
    if (p.multivariate) data.push({ x: xs[i], y: "multivariate", v: p.multivariate.psi, level: p.multivariate.level, n: p.multivariate.rows });
    p.features.forEach((f) => data.push({ x: xs[i], y: tl.features[f.index].name, v: f.psi, level: f.level, n: p.predictions }));
    if (p.prediction) data.push({ x: xs[i], y: "prediction", v: p.prediction.psi, level: p.prediction.level, n: p.predictions });
  });
  upsertChart(charts, "heatmap", "heatmap", {
    type: "matrix",
    data: { datasets: [{
      label: "PSI",
      data,
      backgroundColor: (ctx) => psiColor(ctx.raw && ctx.raw.v, policy),
      borderColor: "#ffffff",
      borderWidth: 1,
      width: ({ chart }) => Math.max(2, (chart.chartArea || { width: 0 }).width / Math.max(1, xs.length) - 1),
      height: ({ chart }) => Math.max(2, (chart.chartArea || { height: 0 }).height / ys.length - 1),
    }] },
    options: {
      plugins: {
        legend: { display: false },
        tooltip: { callbacks: { title: (items) => items[0].raw.y, label: (item) => `${item.raw.x}: PSI ${fmtNum(item.raw.v)}${item.raw.level ? ` (${item.raw.level})` : ""}, ${fmtNum(item.raw.n)} predictions` } },
      },
      scales: {
        x: { type: "category", labels: xs, offset: true, grid: { display: false }, ticks: { maxTicksLimit: 10 } },
        y: { type: "category", labels: ys, offset: true, grid: { display: false } },
      },
      onClick: (evt, elements) => {
        if (!elements.length) return;
        const name = data[elements[0].index].y;
        const idx = tl.features.findIndex((f) => f.name === name);
        if (idx >= 0) {
          featureSelect.value = String(idx);
          refreshDistribution();
        }
      },
    },
  });
}

function distributionChart(key, canvasId, d, currentColor) {
  upsertChart(charts, key, canvasId, {
    type: "bar",
    data: { labels: d.labels, datasets: [
      { label: `reference (${fmtNum(d.n_reference)})`, data: d.reference, backgroundColor: "rgba(156,163,175,.55)", borderColor: colors.gray, borderWidth: 1, barPercentage: 1, categoryPercentage: 0.9 },
      { label: `current (${fmtNum(d.n_current)})`, data: d.current, backgroundColor: "rgba(37,99,235,.35)", borderColor: currentColor, borderWidth: 2, barPercentage: 0.6, categoryPercentage: 0.9, grouped: false },
    ] },
    options: {
      plugins: { legend: { position: "bottom" }, tooltip: { callbacks: { label: (item) => `${item.dataset.label}: ${(item.raw * 100).toFixed(1)} %` } } },
      scales: { y: { beginAtZero: true, ticks: { callback: (v) => `${Math.round(v * 100)} %` } }, x: { ticks: { autoSkip: false, maxRotation: 45, minRotation: 0 } } },
    },
  });
}

async function refreshDistribution() {
  const sel = selection();
  if (!sel || featureSelect.value === "") return;
  const d = await api(`/console/api/drift/distribution?${q(sel, { model: sel.model, version: sel.version, feature: featureSelect.value })}`);
  distributionChart("dist", "dist-chart", d, colors.blue);
  document.getElementById("dist-note").textContent = `Share of rows per reference bin: ${d.name}, ${sel.scope}.`;
}

async function refreshAlerts(sel) {
  const showResolved = document.getElementById("show-resolved").checked;
  const p = new URLSearchParams({ model: sel.model });
  if (!showResolved) p.set("state", "open");
  const { alerts } = await api(`/api/v1/alerts?${p}`);
  const mine = alerts.filter((a) => a.model_version === sel.version);
  rows("#alerts-table tbody", mine, (a) => el("tr", { dataset: { alert: a.id } },
    el("td", {}, levelPill(a.severity)), el("td", {}, a.state), el("td", {}, scopeLink(a.scope)), el("td", {}, a.target),
    el("td", { class: "num" }, fmtNum(a.value)), el("td", {}, fmtTime(a.opened_at)),
    el("td", {}, a.acknowledged_at ? `${a.acknowledged_by}, ${fmtTime(a.acknowledged_at)}` : "no"),
    el("td", {}, canAct && !a.acknowledged_at ? el("button", { type: "button", class: "small", onclick: () => act({
      title: "Acknowledge alert",
      text: `Acknowledge the ${a.severity} on ${a.target} for ${a.scope}? It stays open until the drift ends, marked as seen by you.`,
      label: "Acknowledge",
      call: () => api(`/api/v1/alerts/${a.id}/ack`, { method: "POST" }),
      done: "Alert acknowledged.",
      refresh: () => refreshAlerts(sel),
    }) }, "Acknowledge") : null)),
  showResolved ? "No alerts for this model version." : "No open alerts for this model version.");
}

async function refresh() {
  const sel = selection();
  if (!sel) return;
  const p = new URLSearchParams();
  for (const field of form.elements) if (field.name && field.value) p.set(field.name, field.value);
  if (featureSelect.value) p.set("feature", featureSelect.value);
  history.replaceState(null, "", `${location.pathname}?${p}`);
  const [tl, report, cohorts] = await Promise.all([
    api(`${base(sel)}/drift/timeline?${q(sel)}`),
    api(`${base(sel)}/drift?${q(sel)}`),
    api(`${base(sel)}/drift/cohorts?${q(sel, { by: "device" })}`),
  ]);
  const key = tl.features.map((f) => f.name).join("\u0000");
  if (key !== featuresKey) {
    featuresKey = key;
    const keep = featureSelect.dataset.want || featureSelect.value;
    featureSelect.replaceChildren(...tl.features.map((f) => el("option", { value: String(f.index) }, f.name)));
    // Start on the most drifted feature.
    const worst = [...report.features].sort((a, b) => (b.psi || 0) - (a.psi || 0))[0];
    featureSelect.value = keep !== undefined && keep !== "" && tl.features[Number(keep)] ? keep : worst ? String(worst.index) : "0";
    delete featureSelect.dataset.want;
  }
  const policy = report.policy;
  document.getElementById("policy").textContent =
    `${tl.points.length} buckets of ${fmtNum(tl.bucket_s)} s, ${fmtNum(report.predictions)} predictions from ${report.devices} device(s). ` +
    `Policy: warn at PSI ${policy.warn_psi}, alert at ${policy.alert_psi}, at least ${policy.min_predictions} predictions, ${policy.consecutive} buckets in a row; a feature is flagged only above its sampling-noise level.`;
  renderHeatmap(tl, policy);
  const mv = report.multivariate && report.multivariate.rows ? [{ ...report.multivariate, name: "multivariate (PCA reconstruction error)" }] : [];
  rows("#features-table tbody", [...mv, ...report.features, ...(report.prediction ? [report.prediction] : [])], (f) =>
    el("tr", {}, el("td", {}, f.name), el("td", { class: "num" }, fmtNum(f.psi)), el("td", { class: "num" }, fmtNum(f.noise_psi)),
      el("td", { class: "num" }, fmtNum(f.js)), el("td", { class: "num" }, fmtNum(f.ks)), el("td", {}, levelPill(f.level))),
    "No telemetry in this period.");
  document.getElementById("multivariate-note").textContent = mv.length
    ? `Multivariate: mean reconstruction error ${fmtNum(mv[0].mean)} vs reference ${fmtNum(mv[0].reference_mean)} ` +
      `(shifted beyond ±${fmtNum(mv[0].mean_threshold)}: ${mv[0].mean_shift ? "yes" : "no"}); ` +
      `${mv[0].components} components of ${mv[0].features} numeric features explain ${fmtPct(mv[0].explained)} of the reference variance.`
    : "";
  rows("#quality-table tbody", report.quality || [], (f) => el("tr", {},
    el("td", {}, f.name), el("td", { class: "num" }, fmtNum(f.rows)), el("td", { class: "num" }, fmtPct(f.nan_share)),
    el("td", { class: "num" }, fmtNum(f.nan_refused)), el("td", { class: "num" }, fmtPct(f.out_of_range_share)),
    el("td", { class: "num" }, fmtNum(f.wrong_type)), el("td", {}, f.level ? levelPill(f.level) : "–")),
  "No rows in this period.");
  const names = tl.features.map((f) => f.name);
  rows("#cohorts-table tbody", [...cohorts.cohorts].sort((a, b) => (b.max_feature_psi || 0) - (a.max_feature_psi || 0)), (c) =>
    el("tr", {}, el("td", {}, scopeLink(c.scope)), el("td", { class: "num" }, fmtNum(c.predictions)),
      el("td", { class: `num ${c.max_feature_psi >= policy.alert_psi ? "bad-text" : ""}` }, `${fmtNum(c.max_feature_psi)}${c.max_feature_index !== null ? ` (${names[c.max_feature_index]})` : ""}`),
      el("td", { class: "num" }, fmtNum(c.prediction_psi))),
    "No device reported this version.");
  const pred = await api(`/console/api/drift/distribution?${q(sel, { model: sel.model, version: sel.version, feature: "prediction" })}`);
  distributionChart("pred", "pred-chart", pred, colors.violet);
  document.getElementById("pred-note").textContent = report.prediction
    ? `Prediction PSI ${fmtNum(report.prediction.psi)} (noise level ${fmtNum(report.prediction.noise_psi)}).`
    : "No predictions in this period.";
  await Promise.all([refreshDistribution(), refreshAlerts(sel)]);
}

const live = poll(refresh);
form.addEventListener("change", () => live.refresh());
form.addEventListener("submit", (e) => { e.preventDefault(); live.refresh(); });
featureSelect.addEventListener("change", () => refreshDistribution());
document.getElementById("show-resolved").addEventListener("change", () => live.refresh());
