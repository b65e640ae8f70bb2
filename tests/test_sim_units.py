"""Unit tests of the simulator's pieces that need no broker: clock, fault plans, shares,
data streams, progress."""

from __future__ import annotations

import numpy as np
import pytest

from firmware_sim.clock import SimClock
from firmware_sim.datagen import DeviceStream, load_dataset
from firmware_sim.device import profile_for
from firmware_sim.faults import FaultPlan
from firmware_sim.fleet import FleetStats, device_ids
from firmware_sim.progress import Progress
from firmware_sim.scenario import Drift, Fault, ScenarioError, assign, load_scenario, parse_scenario


def test_hand_driven_clock_moves_only_forward_and_never_ties():
    clock = SimClock(speed=0, start=1000.0)
    a, b = clock(), clock()
    assert 1000.0 <= a < b < 1000.001
    assert clock.advance(60) >= 1060.0
    with pytest.raises(ValueError):
        clock.advance(-1)
    clock.speed = 0  # re-anchoring keeps time where it is
    assert clock() >= 1060.0


def test_running_clock_rebuilt_in_another_process_agrees():
    clock = SimClock(speed=100)
    twin = SimClock.from_state(clock.state())
    assert abs(twin() - clock()) < 1.0  # 10 ms of real time is a simulated second


def test_fault_plan_windows():
    plan = FaultPlan.from_faults([
        Fault("offline", start_min=2, duration_min=3), Fault("crash_in_state", state="Verify"),
        Fault("corrupt_download", start_min=1), Fault("slow_cpu", factor=10),
    ])
    assert plan.outage_at(119) is None and plan.outage_at(120) is not None and plan.outage_at(300) is None
    assert plan.crash_in == "Verify" and plan.cpu_factor == 10
    assert plan.download_fault_at(30) is None and plan.download_fault_at(60) == "corrupt"
    with pytest.raises(ScenarioError, match="not one of"):
        FaultPlan.from_faults([Fault("crash_in_state", state="Nowhere")])


def test_shares_are_exact_and_stable():
    ids = device_ids(50)
    scenario = parse_scenario({"drift": [{"kind": "shift", "share": 0.2}],
                               "fault": [{"kind": "offline", "share": 0.1, "devices": ["sim-0001"]}]})
    a, b = assign(scenario, ids), assign(scenario, list(reversed(ids)))
    assert sum(1 for d in a.values() if d[0]) == 10
    assert {k for k, v in a.items() if v[0]} == {k for k, v in b.items() if v[0]}
    assert a["sim-0001"][1]  # explicit devices come on top of the share


def test_every_shipped_scenario_loads_and_demo_drifts_a_fifth():
    s = load_scenario("demo")
    assert s.drifts[0].share == 0.2
    with pytest.raises(ScenarioError, match="unknown key"):
        parse_scenario({"drfit": []})


def test_streams_replay_and_drift():
    data = load_dataset("breast_cancer")
    clean = DeviceStream(data, 1, "sim-0001", [])
    again = DeviceStream(data, 1, "sim-0001", [])
    np.testing.assert_array_equal(clean.rows(5, 0)[0], again.rows(5, 0)[0])
    shifted = DeviceStream(data, 1, "sim-0001", [Drift("shift", features=("mean radius",), start_min=1)])
    before, after = shifted.rows(2000, 0.5)[0][:, 0].mean(), shifted.rows(2000, 1.5)[0][:, 0].mean()
    assert after - before > 1.5 * data.X[:, 0].std()


def test_hardware_profiles_are_a_stable_mix():
    names = {profile_for(d).name for d in device_ids(100)}
    assert len(names) >= 4 and profile_for("sim-0007") == profile_for("sim-0007")


def test_progress_line_has_rates():
    p = Progress()
    s = FleetStats(0, 60, 10, 10, 9, 100, 10, 0, 0, {"Idle": 10}, {"1.0.0": 10})
    p.line(s)
    line = p.line(FleetStats(0, 120, 10, 10, 9, 700, 20, 0, 0, {"Idle": 10}, {"1.0.0": 10}))
    assert "online 9/10" in line and "predictions/s" in line and "Idle=10" in line


def test_link_poller_takes_over_an_fd_number_a_closed_link_socket_left_registered():
    """A device's socket closes (power cut) and, before its link is synced again, another link's
    new socket gets the same fd number: the poller must register it, not fail the whole fleet."""
    import socket

    from firmware_sim.network import LinkPoller

    class Client:  # what the poller asks of an MqttLink's paho client
        def __init__(self, sock):
            self.sock = sock

        def socket(self):
            return self.sock

    class Link:
        def __init__(self, sock):
            self.client = Client(sock)

    link = Link

    poller = LinkPoller()
    first, peer = socket.socketpair()
    cut = link(first)
    poller._sync(cut)
    number = first.fileno()
    first.close()
    peer.close()
    a, b = socket.socketpair()
    reused = a if a.fileno() == number else b
    assert reused.fileno() == number
    other = link(reused)
    try:
        assert poller._sync(other) is reused
        assert poller._sockets == {other: reused}
        assert poller.selector.get_key(reused).data is other
    finally:
        poller.close()
        a.close()
        b.close()
