// Rollout list, newest first.
import { api, poll, rows } from "./lib.js";
import { rolloutSummaryRows } from "./rollout_common.js";

async function refresh() {
  const { rollouts } = await api("/api/v1/rollouts?limit=200");
  rows("#rollouts-table tbody", rollouts, (r) => rolloutSummaryRows([r], true)[0], "No rollout yet.");
}

poll(refresh);
