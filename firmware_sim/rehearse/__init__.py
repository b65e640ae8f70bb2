"""Rollout rehearsal: run a rollout plan against a simulated fleet before a real device is touched.

A throwaway fleet server (own data dir, managed broker) and a `SimFleet` of real agents share one
hand-driven simulated clock. The rehearsal moves the clock one reconcile interval at a time:
every device serves its traffic and ticks, the server stores everything sent, then the rollout
controller makes one pass — so a day of rollout takes minutes and every run sees the same
sequence. It reports per stage the simulated time taken, each gate's value, threshold and sample,
timeouts and failures, and the outcome.

    report = rehearse(load_plan("plan.toml"), devices=200, current_bundle=v1, candidate_bundle=v2,
                      trusted_keys=[pem])
    print(report.table())
"""

from firmware_sim.rehearse.cli import rehearse_command
from firmware_sim.rehearse.report import GateReading, RehearsalReport, StageReport
from firmware_sim.rehearse.run import rehearse
from firmware_sim.rehearse.shape import (
    DeviceShape,
    FleetShape,
    RehearsalError,
    default_shape,
    fleet_shape_from_data_dir,
    nearest_profile,
    registry_from_data_dir,
)

__all__ = ["DeviceShape", "FleetShape", "GateReading", "RehearsalError", "RehearsalReport", "StageReport",
           "default_shape", "fleet_shape_from_data_dir", "nearest_profile", "registry_from_data_dir", "rehearse",
           "rehearse_command"]
