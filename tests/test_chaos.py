"""The chaos suite, shortened: simulated devices in a rollout while the broker, the fleet server
and devices are killed, devices are cut off, disks fill up, downloads are corrupted and device
passwords are rotated; afterwards every invariant holds (seeded, so a failure replays with the
same seed). `make chaos` runs it with 200 devices for five minutes."""

from __future__ import annotations

import pytest

from firmware_sim.chaos import ChaosPlan, ChaosRates, run_chaos

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_plan_is_reproducible():
    a, b = ChaosPlan(seed=7, devices=200, duration=60), ChaosPlan(seed=7, devices=200, duration=60)
    assert a.events() == b.events() and a.device_faults() == b.device_faults()
    assert a.final_rotation_device() == b.final_rotation_device()
    assert a.events() != ChaosPlan(seed=8, devices=200, duration=60).events()
    kinds = {e.kind for e in a.events()}
    assert {"broker_kill", "server_kill", "power_cut", "cut_off", "rotate"} <= kinds
    faults = a.device_faults()
    assert all(faults[k] for k in ("full_disk", "corrupt_download", "crash_in_state"))
    # Process outages never overlap: one infrastructure failure at a time.
    outages = sorted((e.at, e.at + e.duration) for e in a.events() if e.kind.endswith("_kill"))
    assert all(end <= start for (_, end), (start, _) in zip(outages, outages[1:], strict=False))
    # Rotations meet faults: one in every outage, the others just before the device's own fault;
    # no device is rotated twice, nor the one the run rotates across its last broker kill.
    rotations = [e for e in a.events() if e.kind == "rotate"]
    in_outage = [r for r in rotations if any(start < r.at < end for start, end in outages)]
    assert len(in_outage) == len(outages)
    device_faults = {(e.target, e.at) for e in a.events() if e.kind in ("power_cut", "cut_off")}
    before_fault = [r for r in rotations if (r.target, round(r.at + 1.0, 2)) in device_faults]
    assert before_fault and len(in_outage) + len(before_fault) == len(rotations)
    targets = [r.target for r in rotations] + [a.final_rotation_device()]
    assert len(targets) == len(set(targets))


@pytest.mark.timeout(600)  # minutes on a busy machine: setup, a real-time rollout, two settles
def test_short_chaos_run_keeps_every_invariant(tmp_path):
    plan = ChaosPlan(seed=1, devices=40, duration=30, stages=(50, 100),
                     rates=ChaosRates(server_kills_per_min=2.0, broker_kills_per_min=2.0))
    report = run_chaos(plan, tmp_path / "chaos")
    print(report.table())
    done = {line.split()[1] for line in report.executed}
    assert {"server_kill", "broker_kill", "power_cut", "cut_off", "rotate"} <= done
    # Broker kills are restarted by the server's supervisor, never by the driver; the last one
    # rewinds the broker's saved state to before the rollout.
    assert sum("restarted by the server's supervisor" in line for line in report.executed) == \
        sum("broker_kill" in line and "kill -9" in line for line in report.executed) >= 2
    names = {i.name for i in report.invariants}
    assert {"broker's retained desired equals the server's", "rotated devices run on their new password",
            "broker refuses the old password, takes the new"} <= names
    # Including the seq accounting after broker kills: what a restarted broker took before
    # ingest resubscribed is not acknowledged by the server, so the devices send it again.
    assert report.passed, report.table()
