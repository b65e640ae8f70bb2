// Audit log: newest first.
import { api, el, fmtTime, pill, poll, rows } from "./lib.js";

async function refresh() {
  const { audit } = await api("/console/api/audit?limit=300");
  rows("#audit-table tbody", audit, (a) =>
    el("tr", {}, el("td", {}, fmtTime(a.at)), el("td", {}, a.actor || "–"), el("td", {}, a.role || "–"), el("td", {}, a.action),
      el("td", { class: "mono" }, a.target), el("td", {}, pill(a.outcome, a.outcome === "ok" ? "ok" : a.outcome === "denied" ? "bad" : "warn")),
      el("td", { class: "muted" }, Object.entries(a.detail || {}).map(([k, v]) => `${k}: ${v}`).join("; "))),
    "Nothing recorded yet.");
  if (document.getElementById("locked-table")) { // operators only: the page has the panel
    const { locked } = await api("/console/api/locked-logins");
    rows("#locked-table tbody", locked, (l) =>
      el("tr", { dataset: { locked: l.value } }, el("td", {}, pill(l.kind)), el("td", { class: "mono" }, l.value),
        el("td", { class: "num" }, l.failures), el("td", {}, fmtTime(l.last_at)), el("td", {}, fmtTime(l.until))),
      "No operator or address is locked.");
  }
}

poll(refresh);
