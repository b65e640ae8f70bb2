// Model registry: every version with parity, quantization, sizes, lineage, budget and profile.
import { api, el, fmtBytes, fmtNum, fmtTime, poll, rows } from "./lib.js";

let rendered = "";

// Nested report objects as a definition list (keys are report fields, values numbers/text).
function report(obj, depth = 0) {
  if (obj === null || obj === undefined) return el("span", { class: "muted" }, "–");
  if (obj instanceof Node) return obj;
  if (typeof obj !== "object") return el("span", {}, typeof obj === "number" ? fmtNum(obj, 4) : String(obj));
  if (Array.isArray(obj)) {
    if (obj.every((x) => typeof x !== "object")) return el("span", {}, obj.map((x) => (typeof x === "number" ? fmtNum(x, 4) : x)).join(", "));
    return el("div", {}, obj.map((x) => report(x, depth + 1)));
  }
  const entries = Object.entries(obj);
  if (!entries.length) return el("span", { class: "muted" }, "none");
  return el("dl", { class: `kv ${depth ? "nested" : ""}` }, entries.flatMap(([k, v]) => [el("dt", {}, k.replaceAll("_", " ")), el("dd", {}, report(v, depth + 1))]));
}

function parityPassed(p) {
  if (!p) return undefined;
  if (p.passed !== undefined) return p.passed;
  const variants = Array.isArray(p.variants) ? p.variants : Object.values(p.variants || {});
  const chosen = variants.find((v) => v.variant === p.chosen) || (variants.length === 1 ? variants[0] : null);
  return chosen ? chosen.passed : undefined;
}

function parityBadge(p) {
  const passed = parityPassed(p);
  if (passed === undefined) return el("span", { class: "muted" }, "–");
  return el("span", { class: `pill ${passed ? "ok" : "bad"}` }, passed ? "passed" : "failed");
}

function detail(m, open) {
  const id = `m-${m.name}-${m.version}`.replace(/[^A-Za-z0-9_-]/g, "_");
  return el("details", { class: "panel", id, open },
    el("summary", {}, el("h2", {}, `${m.name} ${m.version}`, " ", parityBadge(m.parity), el("span", { class: "muted small" }, `${fmtNum(m.devices)} device(s) · ${fmtBytes(m.size)}`), " ",
      el("a", { class: "button secondary small", href: `/console/models/${encodeURIComponent(m.name)}/${encodeURIComponent(m.version)}/bundle` }, "Download bundle"))),
    el("div", { class: "grid three" },
      el("div", {}, el("h3", {}, "Bundle"), report({ sha256: m.sha256, size: fmtBytes(m.size), signed_by: m.key_id, created: m.created_at, uploaded: fmtTime(m.uploaded_at),
        devices_running: el("a", { href: `/console/devices?version=${encodeURIComponent(m.version)}` }, `${fmtNum(m.devices)} (show)`) })),
      el("div", {}, el("h3", {}, "Parity report"), report(m.parity)),
      el("div", {}, el("h3", {}, "Quantization"), report(m.quantization))),
    el("div", { class: "grid three" },
      el("div", {}, el("h3", {}, "Runtime budget"), report(m.budget)),
      el("div", {}, el("h3", {}, "Lineage"), report(m.lineage)),
      el("div", {}, el("h3", {}, "Drift policy"), report(m.drift_policy))),
    el("h3", {}, `Reference profile (${fmtNum(m.reference_rows)} rows)`),
    m.profile_warnings.length ? el("p", { class: "warn-text" }, m.profile_warnings.join(" ")) : null,
    el("table", { class: "data compact" },
      el("thead", {}, el("tr", {}, ["Feature", "Kind", "Min", "Max", "Mean", "Std", "Bins"].map((h, i) => el("th", { class: i > 1 ? "num" : "" }, h)))),
      el("tbody", {}, m.profile.map((f) => el("tr", {}, el("td", {}, f.name), el("td", {}, f.kind), ...[f.min, f.max, f.mean, f.std, f.bins].map((x) => el("td", { class: "num" }, fmtNum(x))))))));
}

async function refresh() {
  const { models } = await api("/console/api/models");
  rows("#models-table tbody", models, (m) => {
    const anchor = `#m-${m.name}-${m.version}`.replace(/[^#A-Za-z0-9_-]/g, "_");
    return el("tr", {},
      el("td", {}, el("a", { href: anchor }, m.name)), el("td", {}, m.version), el("td", {}, m.task || "–"), el("td", {}, m.variant || "–"),
      el("td", { class: "num" }, fmtBytes(m.size)), el("td", {}, parityBadge(m.parity)),
      el("td", { class: "num" }, el("a", { href: `/console/devices?version=${encodeURIComponent(m.version)}` }, fmtNum(m.devices))),
      el("td", {}, fmtTime(m.uploaded_at)),
      el("td", {}, el("a", { href: `/console/models/${encodeURIComponent(m.name)}/${encodeURIComponent(m.version)}/bundle` }, "download")));
  }, "No model is registered yet.");
  // Reports change only when a version is added: rebuild them only then (keeps scroll position).
  const key = models.map((m) => `${m.name}/${m.version}/${m.devices}`).join("|");
  if (key !== rendered) {
    rendered = key;
    // The newest version is open; the others are one click away.
    document.getElementById("model-details").replaceChildren(...models.map((m, i) => detail(m, i === models.length - 1)));
  }
}

poll(refresh, 10000);
