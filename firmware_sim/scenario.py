"""Scenario files: what a simulated fleet sees (data, drift, faults), declared in TOML.

The schema is documented in docs/simulation.md; `load_scenario` refuses unknown keys with the
key's name so that a typo never silently turns a fault off.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SCENARIO_DIR = Path(__file__).parent / "scenarios"

DRIFT_KINDS = ("shift", "gradual", "new_category", "broken_sensor", "concept")
FAULT_KINDS = (
    "disconnect",
    "offline",
    "corrupt_download",
    "truncated_download",
    "crash_in_state",
    "full_disk",
    "slow_cpu",
)
DATASETS = ("breast_cancer", "wine", "iris", "digits", "diabetes")


class ScenarioError(ValueError):
    """A scenario file that does not follow the schema."""


@dataclass(frozen=True)
class Drift:
    """A change in what some devices' sensors report, from `start_min` on."""

    kind: str
    share: float = 0.0  # of devices, chosen deterministically by hash
    features: tuple[str, ...] = ()  # by name; empty = the first feature
    start_min: float = 0.0
    magnitude: float = 2.0  # shift, in reference standard deviations
    ramp_min: float = 30.0  # gradual: minutes to reach the full magnitude
    mode: str = "constant"  # broken_sensor: constant | nan_burst
    nan_share: float = 0.5  # broken_sensor nan_burst: share of rows that are NaN
    category: str = "__new__"  # new_category: the value that appears
    devices: tuple[str, ...] = ()  # explicit devices (in addition to share)


@dataclass(frozen=True)
class Fault:
    """Something going wrong on some devices."""

    kind: str
    share: float = 0.0
    start_min: float = 0.0
    duration_min: float = 5.0
    state: str = "Install"  # crash_in_state: the update state to crash in
    factor: float = 50.0  # slow_cpu: how much slower predictions are
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    dataset: str = "breast_cancer"
    rate_per_s: float = 1.0  # predictions per simulated second per device
    batch: int = 1  # rows per request
    window_s: float = 60.0  # telemetry window (simulated seconds)
    duration_min: float = 10.0  # simulated minutes
    speed: float = 60.0  # simulated seconds per real second
    seed: int = 0
    label_share: float = 0.0  # share of predictions whose true label the device gets back
    label_delay_s: float = 0.0  # simulated seconds between a prediction and its label
    drifts: tuple[Drift, ...] = field(default_factory=tuple)
    faults: tuple[Fault, ...] = field(default_factory=tuple)


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return cls(**values)


def parse_scenario(data: dict[str, Any], name: str = "scenario") -> Scenario:
    """Turn a parsed TOML table into a Scenario, checking kinds, shares and datasets."""
    data = dict(data)
    drifts = tuple(_build(Drift, d, f"{name}: [[drift]]") for d in data.pop("drift", []))
    faults = tuple(_build(Fault, f, f"{name}: [[fault]]") for f in data.pop("fault", []))
    data.setdefault("name", name)
    scenario = _build(Scenario, data, name)
    scenario = Scenario(**{**scenario.__dict__, "drifts": drifts, "faults": faults})
    if scenario.dataset not in DATASETS:
        raise ScenarioError(f"{name}: dataset {scenario.dataset!r} is not one of {DATASETS}")
    for d in drifts:
        if d.kind not in DRIFT_KINDS:
            raise ScenarioError(f"{name}: drift kind {d.kind!r} is not one of {DRIFT_KINDS}")
        if not 0.0 <= d.share <= 1.0:
            raise ScenarioError(f"{name}: drift share {d.share} must be within [0, 1]")
    for f in faults:
        if f.kind not in FAULT_KINDS:
            raise ScenarioError(f"{name}: fault kind {f.kind!r} is not one of {FAULT_KINDS}")
        if not 0.0 <= f.share <= 1.0:
            raise ScenarioError(f"{name}: fault share {f.share} must be within [0, 1]")
    if not 0.0 <= scenario.label_share <= 1.0:
        raise ScenarioError(f"{name}: label_share {scenario.label_share} must be within [0, 1]")
    if scenario.label_delay_s < 0:
        raise ScenarioError(f"{name}: label_delay_s {scenario.label_delay_s} must not be negative")
    if scenario.rate_per_s <= 0 or scenario.window_s <= 0 or scenario.speed <= 0:
        raise ScenarioError(f"{name}: rate_per_s, window_s and speed must be positive")
    return scenario


def load_scenario(path_or_name: str | Path) -> Scenario:
    """Load a scenario file, or a shipped one by name (`sudden-shift`, ...)."""
    path = Path(path_or_name)
    if not path.exists():
        shipped = SCENARIO_DIR / f"{path_or_name}.toml"
        if not shipped.exists():
            names = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
            raise ScenarioError(f"no scenario file {path_or_name!r}; shipped scenarios: {names}")
        path = shipped
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path.name}: not valid TOML: {exc}") from exc
    return parse_scenario(data, path.stem)


def _rank(seed: int, salt: str, device_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{salt}:{device_id}".encode()).digest()[:8], "big")


def chosen_devices(
    item: Drift | Fault, seed: int, index: int, device_ids: list[str]
) -> set[str]:
    """The devices a drift or fault (the index-th in the file) hits: its explicit devices plus
    exactly round(share * N) others, picked by hash so every run and process picks the same."""
    count = round(item.share * len(device_ids))
    ranked = sorted(device_ids, key=lambda d: _rank(seed, f"{item.kind}:{index}", d))
    return set(ranked[:count]) | (set(item.devices) & set(device_ids))


def assign(scenario: Scenario, device_ids: list[str]) -> dict[str, tuple[list[Drift], list[Fault]]]:
    """For every device, the drifts and faults of the scenario that apply to it."""
    out: dict[str, tuple[list[Drift], list[Fault]]] = {d: ([], []) for d in device_ids}
    for i, drift in enumerate(scenario.drifts):
        for device in chosen_devices(drift, scenario.seed, i, device_ids):
            out[device][0].append(drift)
    for i, fault in enumerate(scenario.faults):
        for device in chosen_devices(fault, scenario.seed, i, device_ids):
            out[device][1].append(fault)
    return out
