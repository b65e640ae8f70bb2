"""firmware_sim: many real edge_agent cores on one machine, with simulated data, drift, faults,
hardware, network and clock — for tests, the demo and rollout rehearsals."""

from firmware_sim.clock import SimClock
from firmware_sim.device import DeviceState, SimAgent, SimDevice
from firmware_sim.fleet import FleetStats, SimFleet, device_ids
from firmware_sim.provision import DataDirProvisioner, RestProvisioner, ServicesProvisioner
from firmware_sim.scenario import (
    Drift,
    Fault,
    Scenario,
    ScenarioError,
    load_scenario,
    parse_scenario,
)

__all__ = [
    "DataDirProvisioner",
    "DeviceState",
    "Drift",
    "Fault",
    "FleetStats",
    "RestProvisioner",
    "Scenario",
    "ScenarioError",
    "ServicesProvisioner",
    "SimAgent",
    "SimClock",
    "SimDevice",
    "SimFleet",
    "device_ids",
    "load_scenario",
    "parse_scenario",
]
