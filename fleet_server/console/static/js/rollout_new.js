// The create form: stages editor (defaults pre-filled by the server), gates, target; POSTs JSON.
import { api, el } from "./lib.js";

const form = document.getElementById("rollout-form");
const tbody = document.querySelector("#stages tbody");
const errorBox = document.getElementById("form-error");

function renumber() {
  [...tbody.rows].forEach((row, i) => { row.querySelector(".idx").textContent = String(i + 1); });
}

tbody.addEventListener("click", (e) => {
  if (e.target.classList.contains("remove-stage") && tbody.rows.length > 1) {
    e.target.closest("tr").remove();
    renumber();
  }
});

document.getElementById("add-stage").addEventListener("click", () => {
  const last = tbody.rows[tbody.rows.length - 1];
  const row = last.cloneNode(true);
  row.querySelector('[name="percent"]').value = "100";
  row.querySelector('[name="count"]').value = "";
  row.querySelector('[name="mode"]').value = "live";
  tbody.append(row);
  renumber();
});

form.elements.blue_green.addEventListener("change", () => {
  document.getElementById("stages-fieldset").disabled = form.elements.blue_green.checked;
});

function numberOrNull(input) {
  return input.value === "" ? null : Number(input.value);
}

function target() {
  const kind = form.elements.target_kind.value;
  const value = form.elements.target_value.value.trim();
  if (kind === "all") return { all: true };
  if (kind === "group") return { group: value };
  if (kind === "devices") return { devices: value.split(/[\s,]+/).filter(Boolean) };
  const tags = {};
  for (const pair of value.split(",").map((s) => s.trim()).filter(Boolean)) {
    const at = pair.indexOf("=");
    if (at < 1) throw new Error(`tag "${pair}" must look like key=value`);
    tags[pair.slice(0, at).trim()] = pair.slice(at + 1).trim();
  }
  return { tags };
}

function spec() {
  const mv = form.elements.model_version.value;
  if (!mv) throw new Error("pick a registered model version (upload one first)");
  const slash = mv.indexOf("/");
  const out = {
    name: form.elements.name.value.trim(),
    model: mv.slice(0, slash),
    version: mv.slice(slash + 1),
    target: target(),
    on_failure: form.elements.on_failure.value,
    device_timeout_s: Number(form.elements.device_timeout_s.value || 600),
    gates: {},
  };
  const schedule = {};
  const notBefore = form.elements.not_before.value.trim();
  if (notBefore) schedule.not_before = notBefore;
  const cron = form.elements.window_cron.value.trim();
  if (cron) {
    schedule.window = { cron, duration: form.elements.window_duration.value.trim() || "1h" };
    const tz = form.elements.window_timezone.value.trim();
    if (tz) schedule.window.timezone = tz;
  }
  if (form.elements.device_windows.checked) schedule.device_windows = true;
  if (Object.keys(schedule).length) out.schedule = schedule;
  if (form.elements.blue_green.checked) out.blue_green = true;
  else {
    out.stages = [...tbody.rows].map((row) => {
      const stage = {
        mode: row.querySelector('[name="mode"]').value,
        min_soak_s: Number(row.querySelector('[name="min_soak_s"]').value || 0),
        min_reporting: Number(row.querySelector('[name="min_reporting"]').value || 0),
        approval: row.querySelector('[name="approval"]').checked,
      };
      const percent = numberOrNull(row.querySelector('[name="percent"]'));
      const count = numberOrNull(row.querySelector('[name="count"]'));
      if (count !== null) stage.count = count;
      else stage.percent = percent;
      return stage;
    });
  }
  for (const row of document.querySelectorAll("#gates .gate-row")) {
    const settings = { enabled: row.querySelector('[name="enabled"]').checked };
    settings[row.dataset.bound] = Number(row.querySelector('[name="threshold"]').value);
    settings.min_sample = Number(row.querySelector('[name="min_sample"]').value);
    out.gates[row.dataset.gate] = settings;
  }
  return out;
}

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  errorBox.hidden = true;
  const button = document.getElementById("create");
  button.disabled = true;
  try {
    const { rollout } = await api("/api/v1/rollouts", { method: "POST", body: spec() });
    window.location.assign(`/console/rollouts/${encodeURIComponent(rollout.id)}`);
  } catch (err) {
    errorBox.replaceChildren(el("strong", {}, "Not created: "), err.message);
    errorBox.hidden = false;
    button.disabled = false;
  }
});
