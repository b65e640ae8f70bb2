"""One assigned device's rollout status, derived afresh from what it reports and its update events."""

from __future__ import annotations

from typing import Any

from fleet_server.rollouts.records import FAILED_OUTCOMES, PROBATION_STATES


def failed_devices(events: list[dict[str, Any]], version: str) -> dict[str, str]:
    """Device -> reason, for devices whose latest finished attempt at `version` failed or was
    refused (a later successful outcome clears an earlier failure)."""
    out: dict[str, str] = {}
    for e in events:  # ordered by device, seq
        if e["version"] != version or e["kind"] not in ("outcome", "refused"):
            continue
        if e["kind"] == "refused" or e["outcome"] in FAILED_OUTCOMES:
            out[e["device"]] = e["reason"] or e["outcome"] or e["kind"]
        else:
            out.pop(e["device"], None)
    return out


def device_status(rollout_id: str, version: str, member: dict[str, Any], device: dict[str, Any],
                   failure: str | None, now: float, timeout_s: float) -> str:
    """The status of one assigned device, derived afresh from what it reports now.

    `updated` only while it reports the version active (or, in shadow, as its running shadow
    candidate); a live device on probation counts only while it is online (one that went down
    there rolls back when it boots). `failed` when its latest attempt at the version ended in a
    failure, a local rollback or a refusal and it will not try again. Otherwise `pending` until
    the device timeout, then `timed_out`.
    """
    rep = device.get("reported") or {}
    state = rep.get("update_state")
    on_version = rep.get("candidate_version") == version
    if rep.get("active_version") == version:
        if not (on_version and state in PROBATION_STATES) or device.get("status") != "offline":
            return "updated"
    elif member["mode"] == "shadow" and on_version and state == "Shadow":
        return "updated"
    # Busy with the version, or idle after a transient failure it will try again (attempts left).
    trying_again = (on_version and state not in (None, "Idle")) or (
        state == "Idle" and rep.get("update_retry") is True and rep.get("rollout_id") == rollout_id)
    # The reported outcome covers a failure whose event has not been stored yet.
    failed_now = (rep.get("rollout_id") == rollout_id and state == "Idle"
                  and rep.get("update_outcome") in FAILED_OUTCOMES)
    if not trying_again and (failure is not None or failed_now):
        return "failed"
    if now - (member["desired_at"] or member["assigned_at"]) > timeout_s:
        return "timed_out"
    return "pending"


def on_probation(device: dict[str, Any], version: str) -> bool:
    """The device serves `version` live but has not committed it: it may still roll back."""
    rep = device.get("reported") or {}
    return rep.get("candidate_version") == version and rep.get("update_state") in PROBATION_STATES
