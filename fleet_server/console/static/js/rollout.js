// Live view of one rollout: stages, gates (value vs threshold, sample), cohorts, timeouts,
// devices and the audit log; pause / resume / advance / abort behind a confirmation.
import { act, api, canAct, el, fmtClock, fmtNum, fmtTime, kv, pill, poll, replace, rows, deviceLink } from "./lib.js";

const rolloutId = document.getElementById("rollout-title").dataset.rollout;
const path = `/api/v1/rollouts/${encodeURIComponent(rolloutId)}`;
let current = null;

function stageSize(s) {
  if (s.count !== null && s.count !== undefined) return `${s.count} device${s.count === 1 ? "" : "s"}`;
  const share = `${fmtNum(s.percent)} %`;
  return s.size !== null && s.size !== undefined ? `${share} → ${s.size} device${s.size === 1 ? "" : "s"}` : share;
}

// An audit row's detail in words: gate results as "name status", nested objects compact.
function auditDetail(detail) {
  return Object.entries(detail || {}).filter(([k]) => k !== "spec").map(([k, v]) => {
    if (k === "gates" && v && typeof v === "object") {
      return `gates: ${Object.entries(v).map(([name, g]) => `${name.replaceAll("_", " ")} ${g.status}${g.value !== null && g.value !== undefined ? ` (${fmtNum(g.value)})` : ""}`).join(", ")}`;
    }
    return `${k.replaceAll("_", " ")}: ${typeof v === "object" && v !== null ? JSON.stringify(v) : v}`;
  }).join("; ");
}

function fmtGateValue(g) {
  if (g.value === null || g.value === undefined) return "–";
  return fmtNum(g.value, 3);
}

function stageCard(r, s) {
  const isCurrent = s.index === r.stage && !["completed", "aborted"].includes(r.state);
  const soak = isCurrent ? Math.min(1, r.soak.min_s ? r.soak.elapsed_s / r.soak.min_s : 1) : s.state === "done" ? 1 : 0;
  const bar = el("span", { class: soak === 0 ? "w0" : "" });
  bar.style.width = `${Math.round(soak * 100)}%`; // CSSOM, allowed by the CSP
  return el("div", { class: `stage ${isCurrent ? "current" : ""} ${s.state === "done" ? "done" : ""}`, dataset: { stage: s.index } },
    el("h3", {}, `Stage ${s.index + 1}`, pill(s.state === "active" ? "running" : s.state)),
    el("div", {}, pill(s.mode), " ", stageSize(s)),
    el("div", { class: "progress", title: "soak time" }, bar),
    el("div", { class: "muted small" }, `soak ${fmtNum(s.min_soak_s)} s · ${s.min_reporting} reporting${s.approval ? " · approval" : ""}`),
    s.started_at ? el("div", { class: "muted small" }, `started ${fmtClock(s.started_at)}${s.ended_at ? `, ended ${fmtClock(s.ended_at)}` : ""}`) : null,
    s.verdict ? el("div", {}, "verdict ", pill(s.verdict)) : null);
}

// The schedule in words: start, maintenance window, whether it is open, the next one (in the
// window's time zone, as the server formats it) and why the rollout waits.
function scheduleText(r) {
  const sc = r.schedule;
  if (!sc) return "";
  const parts = [];
  if (sc.not_before_iso) parts.push(`starts not before ${sc.not_before_iso}`);
  if (sc.window) {
    const w = sc.window;
    parts.push(`maintenance window "${w.cron}" for ${fmtNum(w.duration_s / 60)} min (${w.timezone})`);
    if (sc.current_window) parts.push(`open until ${sc.current_window.closes}`);
    if (sc.next_window) parts.push(`next opens ${sc.next_window.opens}`);
  }
  if (sc.device_windows) parts.push("devices activate only inside their own windows");
  return `Schedule: ${parts.join(" · ")}${r.waiting ? `. Waiting: ${r.waiting}` : ""}`;
}

// The server says which actions apply now (r.actions); the API refuses the others with 409.
function setButtons(r) {
  if (!canAct) return;
  for (const action of ["pause", "resume", "advance", "abort"]) {
    document.getElementById(action).disabled = !(r.actions || []).includes(action);
  }
}

async function refresh() {
  const { rollout: r } = await api(path);
  current = r;
  replace("title-text", r.name || r.id);
  const state = document.getElementById("state");
  state.textContent = r.state;
  state.className = `pill ${r.state}`;
  const t = r.target;
  const targetText = t.all ? "all devices" : t.group ? `group ${t.group}` : t.devices && t.devices.length ? `devices ${t.devices.join(", ")}` : Object.entries(t.tags || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  replace("subtitle", `${r.model} ${r.version} → ${targetText} · ${fmtNum(r.population)} target device(s) · on failure: ${r.on_failure} · created ${fmtTime(r.created_at)}${r.created_by ? ` by ${r.created_by}` : ""}`);
  replace("reason", r.reason ? `Reason: ${r.reason}` : "");
  setButtons(r);
  replace("schedule", scheduleText(r));
  replace("stages", r.stages.map((s) => stageCard(r, s)));
  replace("waiting", ...(r.waiting_for || []).map((w) => el("li", {}, w)));
  rows("#gates-table tbody", r.gates, (g) => el("tr", { dataset: { gate: g.name } },
    el("td", {}, g.name.replaceAll("_", " ")), el("td", {}, pill(g.status)),
    el("td", { class: "num" }, fmtGateValue(g)), el("td", { class: "num" }, `${g.comparison} ${fmtNum(g.threshold)}`),
    el("td", { class: "num" }, `${fmtNum(g.sample)} / ${fmtNum(g.min_sample)} ${g.unit}`), el("td", { class: "muted small" }, g.detail)),
    "No gate measured yet.");
  const c = r.cohorts || {};
  const cohortText = (x) => (x ? `${x.devices} devices, ${x.updated} updated, ${x.failed} failed, ${x.timed_out} timed out, ${fmtNum(x.predictions)} predictions, ${fmtNum(x.errors)} errors` : "–");
  kv("cohorts", [
    ["Canary", cohortText(c.canary)],
    ["Control", cohortText(c.control)],
    ["Assigned", fmtNum(c.assigned)],
    ["By status", Object.entries(c.by_status || {}).map(([k, n]) => el("span", { class: "tag" }, `${k}: ${n}`))],
  ]);
  const to = r.timeouts || { devices: [] };
  replace("timeouts", to.count ? [`${to.count} device(s) did not report within ${fmtNum(to.timeout_s)} s and do not block the rollout (limit ${fmtNum(to.limit)} of the cohort): `, ...to.devices.map((d) => el("span", { class: "tag" }, d))] : `No device timed out (timeout ${fmtNum(to.timeout_s)} s).`);
  rows("#devices-table tbody", r.devices, (d) => el("tr", {}, el("td", {}, deviceLink(d.device)), el("td", {}, d.stage + 1), el("td", {}, pill(d.mode)), el("td", {}, pill(d.status), d.reason && el("span", { class: "muted small" }, ` ${d.reason}`)), el("td", {}, d.previous_version || "–"), el("td", {}, fmtClock(d.assigned_at))), "No device assigned yet.");
  rows("#audit-table tbody", [...(r.audit || [])].reverse(), (a) => el("tr", {}, el("td", {}, fmtTime(a.ts)), el("td", {}, a.actor || "–"), el("td", {}, a.action),
    el("td", { class: "muted small wrap" }, auditDetail(a.detail))), "Nothing yet.");
}

const live = poll(refresh);

const ACTIONS = {
  pause: { title: "Pause the rollout", text: "Devices keep what they run now; no stage advances until it is resumed.", label: "Pause", done: "Rollout paused." },
  resume: { title: "Resume the rollout", text: "The current stage continues and advances when its gates pass.", label: "Resume", done: "Rollout resumed." },
  advance: { title: "Advance to the next stage", text: "Skip the remaining soak time and gates of this stage and move on now.", label: "Advance", done: "Rollout advanced." },
  abort: { title: "Abort the rollout", text: "Every device in the rollout goes back to its previous version. This cannot be undone.", label: "Abort and roll back", done: "Rollout aborting: devices go back to their previous version." },
};

if (canAct) {
  for (const [action, texts] of Object.entries(ACTIONS)) {
    document.getElementById(action).addEventListener("click", () => act({
      ...texts,
      text: `${texts.text}${current ? ` (${current.name || current.id}, ${current.model} ${current.version})` : ""}`,
      call: () => api(`${path}/${action}`, { method: "POST", body: { reason: `from the console` } }),
      refresh: () => live.refresh(),
    }));
  }
}
