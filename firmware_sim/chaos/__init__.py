"""The chaos suite: a simulated fleet in a rollout while processes die and devices misbehave.

A fleet server runs as its own process (`edgefleet server run`, managed Mosquitto) in real time;
a `SimFleet` of real agents shares that time (a `SimClock` at speed 1). A seeded `ChaosPlan`
decides, reproducibly, when the driver kills the broker (`kill -9`; the server's own supervisor
starts it again), kills the fleet server (`kill -9`, restarted), cuts a device's power, cuts
devices off the network for a while, rotates device passwords during those faults, and which
devices have a full disk, receive corrupted downloads or crash in an update state. When the
chaos is over and everything is back, one more broker kill rewinds the broker's saved state to
before the rollout while a cut-off device's rotation is announced; then the run checks the
invariants and returns them as rows (name, expected, observed, pass):

- every device runs a model whose signature verifies: the rollout's target, or the previous
  version with a reason (a failed update and its error, a timeout);
- every telemetry window or event the server acknowledged to its device is stored exactly once,
  and every seq the server is missing is one the device reports as dropped (settling waits until
  every outbox is empty: acknowledged by the server, resent where a killed broker lost it);
- the rollout's stored state matches what the devices run and report;
- the server's bucket sums and drift equal a recomputation from the stored windows (as the
  devices sent them);
- the broker's retained `desired` of every device equals the server's `device_desired`;
- every rotated device runs on its new password, which the registry and the broker take while
  they refuse the old one.

    report = run_chaos(ChaosPlan(seed=1, devices=200, duration=300), workdir=Path(".chaos"))
    print(report.table())
"""

from firmware_sim.chaos.cli import chaos_command
from firmware_sim.chaos.driver import run_chaos
from firmware_sim.chaos.invariants import check_invariants
from firmware_sim.chaos.plan import ChaosError, ChaosEvent, ChaosPlan, ChaosRates
from firmware_sim.chaos.recorder import WindowRecorder
from firmware_sim.chaos.report import ChaosReport, Invariant

__all__ = ["ChaosError", "ChaosEvent", "ChaosPlan", "ChaosRates", "ChaosReport", "Invariant", "WindowRecorder",
           "chaos_command", "check_invariants", "run_chaos"]
