// Shared by the rollout pages and the overview: one summary row per rollout.
import { el, fmtTime, pill } from "./lib.js";

export function rolloutLink(r) {
  return el("a", { href: `/console/rollouts/${encodeURIComponent(r.id)}` }, r.name || r.id);
}

export function stageText(r) {
  return `${r.stage + 1} of ${r.stages} (${r.mode})`;
}

export function rolloutSummaryRows(list, full = false) {
  return list.map((r) => el("tr", {},
    el("td", {}, rolloutLink(r), r.name ? el("div", { class: "muted small" }, r.id) : null),
    el("td", {}, `${r.model} ${r.version}`),
    el("td", {}, pill(r.state), r.reason ? el("div", { class: "muted small" }, r.reason) : null),
    el("td", {}, stageText(r)),
    el("td", { class: full ? "" : "num" }, r.verdict ? pill(r.verdict) : "–"),
    full ? el("td", {}, fmtTime(r.created_at), r.created_by ? el("div", { class: "muted small" }, `by ${r.created_by}`) : null) : null,
    full ? el("td", {}, fmtTime(r.finished_at || r.updated_at)) : null));
}
