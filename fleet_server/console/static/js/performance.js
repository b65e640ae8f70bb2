// Performance: input drift beside realized performance on one time axis (concept drift), the
// summary with label counts, per-class figures, the reliability diagram, devices and alerts.
import { api, colors, el, fmtClock, fmtNum, fmtPct, fmtTime, kv, levelPill, poll, rows, scopeLink, upsertChart, windowPage } from "./lib.js";

const { charts, form, base, recent, selection, query: q } = windowPage("/api/v1/performance");
const READINGS = {
  stable: "stable",
  concept_drift: "inputs the same, model wrong (concept drift)",
  inputs_moved_model_holds: "inputs moved, model holds",
  inputs_moved_model_wrong: "inputs moved, model wrong",
  inputs_moved: "inputs moved (too few labels)",
  model_wrong: "model wrong (too few rows for drift)",
  unknown: "too few rows and labels",
};

function metricName(view) {
  return view.baseline && view.baseline.metric === "r2" ? "R²" : "accuracy";
}

function renderConcept(view) {
  const points = recent(view.points);
  const labels = points.map((p) => fmtClock(p.bucket_start));
  const realized = points.map((p) => (p.performance.labels ? p.performance.realized ?? p.performance.accuracy : null));
  const datasets = [
    { type: "bar", label: "worst feature PSI (inputs)", data: points.map((p) => p.inputs.max_feature_psi), backgroundColor: "rgba(217,119,6,.45)", yAxisID: "psi" },
    { type: "line", label: `realized ${metricName(view)}`, data: realized, borderColor: colors.blue, backgroundColor: colors.blue, spanGaps: true, yAxisID: "perf", pointRadius: 2 },
  ];
  if (view.baseline) {
    datasets.push({ type: "line", label: `validation ${metricName(view)}`, data: points.map(() => view.baseline.value), borderColor: colors.gray, borderDash: [6, 4], pointRadius: 0, yAxisID: "perf" });
  }
  upsertChart(charts, "concept", "concept-chart", {
    type: "bar",
    data: { labels, datasets },
    options: {
      interaction: { mode: "index", intersect: false },
      scales: {
        psi: { position: "left", beginAtZero: true, title: { display: true, text: "PSI" } },
        perf: { position: "right", min: 0, max: 1, grid: { drawOnChartArea: false }, title: { display: true, text: metricName(view) } },
      },
    },
  });
  const dp = view.drift_policy;
  const pp = view.performance_policy;
  document.getElementById("concept-note").textContent =
    `Inputs: alert at PSI ≥ ${dp.alert_psi} with ≥ ${dp.min_predictions} predictions per bucket. ` +
    `Performance: alert at a drop of ≥ ${pp.alert_drop} below the validation score with ≥ ${pp.min_labels} labels per bucket. ` +
    "Labels are counted in the bucket they arrived in.";
  rows("#diagnosis-table tbody", [...points].reverse().slice(0, 12), (p) => el("tr", {},
    el("td", {}, fmtTime(p.bucket_start)),
    el("td", { class: "num" }, fmtNum(p.inputs.predictions)),
    el("td", { class: "num" }, fmtNum(p.inputs.max_feature_psi)),
    el("td", {}, p.inputs.level ? levelPill(p.inputs.level) : "–"),
    el("td", { class: "num" }, fmtNum(p.performance.labels)),
    el("td", { class: "num" }, fmtNum(p.performance.realized)),
    el("td", { class: "num" }, fmtNum(p.performance.drop)),
    el("td", {}, p.performance.level ? levelPill(p.performance.level) : "–"),
    el("td", { dataset: { diagnosis: p.diagnosis } }, READINGS[p.diagnosis] || p.diagnosis)), "No telemetry or labels in this period.");
}

function renderSummary(perf) {
  const c = perf.counters;
  kv("summary", [
    ["Labels", fmtNum(perf.labels)],
    perf.accuracy !== undefined && ["Accuracy", fmtPct(perf.accuracy)],
    perf.macro_f1 !== undefined && ["Macro F1", fmtNum(perf.macro_f1)],
    perf.mae !== undefined && ["MAE", fmtNum(perf.mae)],
    perf.rmse !== undefined && ["RMSE", fmtNum(perf.rmse)],
    perf.baseline && [`Validation ${perf.baseline.metric}`, `${fmtNum(perf.baseline.value)} on ${perf.baseline.validation_rows} rows`],
    perf.baseline && ["Drop", fmtNum(perf.drop)],
    perf.calibration && ["ECE", fmtNum(perf.calibration.ece)],
    ["Late / unknown / duplicate", `${c.late} / ${c.unknown} / ${c.duplicate}`],
    ["Unknown label / rejected", `${c.unknown_label} / ${c.rejected}`],
  ]);
  rows("#classes-table tbody", perf.classes || [], (k) => el("tr", {},
    el("td", {}, String(k.class)), el("td", { class: "num" }, fmtNum(k.support)),
    el("td", { class: "num" }, fmtNum(k.precision)), el("td", { class: "num" }, fmtNum(k.recall)),
    el("td", { class: "num" }, fmtNum(k.f1))), perf.task === "regression" ? "Regression: no classes." : "No labels yet.");
  const cal = perf.calibration;
  const bins = cal ? cal.bins : [];
  upsertChart(charts, "calibration", "calibration-chart", {
    type: "line",
    data: {
      labels: bins.map((b) => `${b.lower.toFixed(1)}–${b.upper.toFixed(1)}`),
      datasets: [
        { label: "observed", data: bins.map((b) => b.observed), borderColor: colors.teal, backgroundColor: colors.teal, spanGaps: true },
        { label: "perfectly calibrated", data: bins.map((b) => (b.lower + b.upper) / 2), borderColor: colors.gray, borderDash: [6, 4], pointRadius: 0 },
        { type: "bar", label: "labels", data: bins.map((b) => b.count), backgroundColor: "rgba(37,99,235,.15)", yAxisID: "n" },
      ],
    },
    options: { scales: { y: { min: 0, max: 1, title: { display: true, text: "observed accuracy" } }, n: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false } } } },
  });
  document.getElementById("calibration-note").textContent = cal
    ? `Predicted top-class probability per decile against how often it was right (${fmtNum(cal.labels)} labels).`
    : "This model sends no probabilities.";
}

function renderEstimated(tl, est) {
  const points = recent(tl.points);
  const labels = points.map((p) => fmtClock(p.bucket_start));
  const datasets = [
    { label: "interval low", data: points.map((p) => (p.interval ? p.interval[0] : null)), borderColor: "rgba(13,148,136,.25)", pointRadius: 0, fill: false },
    { label: "interval high", data: points.map((p) => (p.interval ? p.interval[1] : null)), borderColor: "rgba(13,148,136,.25)", backgroundColor: "rgba(13,148,136,.12)", pointRadius: 0, fill: "-1" },
    { label: "estimated accuracy", data: points.map((p) => p.accuracy), borderColor: colors.teal, backgroundColor: colors.teal, pointRadius: 2, spanGaps: true },
    { label: "realized accuracy", data: points.map((p) => (p.labels ? p.realized : null)), borderColor: colors.blue, backgroundColor: colors.blue, showLine: false, pointRadius: 4 },
  ];
  if (tl.baseline !== null && tl.baseline !== undefined) {
    datasets.push({ label: "validation accuracy", data: points.map(() => tl.baseline), borderColor: colors.gray, borderDash: [6, 4], pointRadius: 0 });
  }
  upsertChart(charts, "estimated", "estimated-chart", {
    type: "line",
    data: { labels, datasets },
    options: { interaction: { mode: "index", intersect: false }, scales: { y: { min: 0, max: 1 } },
      plugins: { legend: { labels: { filter: (item) => !item.text.startsWith("interval") } } } },
  });
  const cal = est.calibration;
  document.getElementById("estimated-note").textContent = !tl.estimable
    ? (est.reason || "This model version is not estimated.")
    : `Estimated from calibrated confidence on ${fmtNum(est.rows)} predictions: ${fmtPct(est.accuracy)} ` +
      `(interval ${est.interval ? `${fmtPct(est.interval[0])}–${fmtPct(est.interval[1])}` : "–"})` +
      (est.realized && est.realized.realized !== null ? `, realized ${fmtPct(est.realized.realized)} on ${fmtNum(est.realized.labels)} labels` : "") +
      `. Calibration: ${cal && cal.applied ? `isotonic (held-out ECE ${fmtNum(cal.ece_raw)} → ${fmtNum(cal.ece_calibrated)})` : "raw probabilities"}. ` +
      `${tl.assumption.charAt(0).toUpperCase()}${tl.assumption.slice(1)}.`;
}

async function refresh() {
  const sel = selection();
  if (!sel) return;
  const [estTl, est] = await Promise.all([
    api(`${base(sel)}/estimated/timeline?${q(sel)}`),
    api(`${base(sel)}/estimated?${q(sel)}`),
  ]);
  renderEstimated(estTl, est);
  const [view, perf, groups, alerts] = await Promise.all([
    api(`${base(sel)}/concept-drift?${q(sel)}`),
    api(`${base(sel)}?${q(sel)}`),
    api(`${base(sel)}/groups?${q(sel, { by: "device" })}`),
    api(`/api/v1/alerts?${new URLSearchParams({ kind: "performance", model: sel.model, limit: "100" })}`),
  ]);
  renderConcept(view);
  renderSummary(perf);
  rows("#devices-table tbody", [...groups.groups].sort((a, b) => (b.drop ?? -1) - (a.drop ?? -1)), (g) => el("tr", {},
    el("td", {}, scopeLink(g.scope)), el("td", { class: "num" }, fmtNum(g.labels)),
    el("td", { class: "num" }, fmtNum(g.accuracy ?? g.rmse)), el("td", { class: "num" }, fmtNum(g.drop))), "No labels yet.");
  rows("#alerts-table tbody", alerts.alerts.filter((a) => a.model_version === sel.version), (a) => el("tr", {},
    el("td", {}, levelPill(a.severity)), el("td", {}, a.state), el("td", {}, scopeLink(a.scope)),
    el("td", {}, a.target), el("td", { class: "num" }, fmtNum(a.value)), el("td", { class: "num" }, fmtNum(a.details.labels)),
    el("td", {}, fmtTime(a.opened_at))), "No performance alerts.");
}

const live = poll(refresh);
form.addEventListener("change", () => {
  const sel = selection();
  if (sel) history.replaceState(null, "", `?${new URLSearchParams(new FormData(form))}`);
  live.refresh();
});
