// Device list: the filters live in the URL (shareable), the server searches and pages.
import { ago, api, deviceLink, el, fmtNum, pill, poll, rows } from "./lib.js";

const form = document.getElementById("filters");
const params = new URLSearchParams(location.search);
let page = Number(params.get("page") || 1);
let pages = 1;

for (const [key, value] of params) {
  const field = form.elements.namedItem(key);
  if (field) field.value = value;
}

function query() {
  const q = new URLSearchParams();
  for (const field of form.elements) {
    if (field.name && field.value) q.set(field.name, field.value.trim());
  }
  if (page > 1) q.set("page", String(page));
  return q;
}

function updateState(device) {
  if (!device.update_state || ["idle", "Idle"].includes(device.update_state)) return "";
  const target = device.candidate_version ? ` → ${device.candidate_version}` : "";
  return pill(`${device.update_state}${target}`, "info");
}

async function refresh() {
  const q = query();
  history.replaceState(null, "", `${location.pathname}${q.toString() ? `?${q}` : ""}`);
  const data = await api(`/console/api/devices?${q}`);
  pages = data.pages;
  document.getElementById("total").textContent = `${fmtNum(data.total)} total`;
  document.getElementById("page-info").textContent = `page ${data.page} of ${data.pages}`;
  document.getElementById("prev").disabled = page <= 1;
  document.getElementById("next").disabled = page >= pages;
  rows("#devices-table tbody", data.devices, (d) =>
    el("tr", {},
      el("td", {}, deviceLink(d.id)),
      el("td", {}, pill(d.status === "unknown" ? "never connected" : d.status, d.status)),
      el("td", {}, d.model || "–"),
      el("td", {}, d.active_version || "–"),
      el("td", {}, updateState(d)),
      el("td", {}, Object.entries(d.tags).map(([k, v]) => el("span", { class: "tag" }, `${k}=${v}`))),
      el("td", { title: d.last_seen ? new Date(d.last_seen * 1000).toISOString() : "" }, ago(d.last_seen, data.server_time))),
    "No device matches these filters.");
}

const live = poll(refresh);
let typing = null;
form.addEventListener("input", () => {
  page = 1;
  clearTimeout(typing);
  typing = setTimeout(() => live.refresh(), 250);
});
form.addEventListener("submit", (e) => e.preventDefault());
document.getElementById("prev").addEventListener("click", () => { page = Math.max(1, page - 1); live.refresh(); });
document.getElementById("next").addEventListener("click", () => { page = Math.min(pages, page + 1); live.refresh(); });
