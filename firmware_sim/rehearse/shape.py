"""The fleet a rehearsal simulates, modelled on a real one, and what it reads of a real server.

A real server's data dir is only read (its database opened read only): the registered devices'
hardware, tags and presence, and the registry's bundles and trusted keys.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_sim.device import PROFILES, profile_for


class RehearsalError(RuntimeError):
    """A rehearsal that cannot start; the message says what was wrong and what to do."""



@dataclass(frozen=True)
class DeviceShape:
    """What a simulated device copies from a registered one: hardware, tags, whether it is online."""

    profile: str
    tags: dict[str, str] = field(default_factory=dict)
    online: bool = True


@dataclass(frozen=True)
class FleetShape:
    """The devices a simulated fleet is modelled on; `sample(n)` scales it to n devices."""

    devices: tuple[DeviceShape, ...]
    source: str = "default mix"

    def sample(self, n: int) -> list[DeviceShape]:
        """n devices in the same proportions (every k-th of the registered devices, in id order)."""
        if not self.devices:
            raise RehearsalError(f"{self.source}: no registered device to model the simulated fleet on")
        return [self.devices[i * len(self.devices) // n] for i in range(n)]

    def mix(self) -> dict[str, int]:
        return dict(Counter(d.profile for d in self.devices))


def nearest_profile(hardware: dict[str, Any] | None) -> str:
    """The simulator's hardware profile closest to a device's reported hardware: the same profile
    name if the simulator has it, else the same architecture with the nearest RAM."""
    hw = hardware or {}
    names = {p.name for p in PROFILES}
    if hw.get("profile") in names:
        return str(hw["profile"])
    ram = hw.get("ram_mb") or 0
    same_arch = [p for p in PROFILES if p.arch == hw.get("arch")] or list(PROFILES)
    return min(same_arch, key=lambda p: abs(p.ram_mb - ram)).name


def fleet_shape_from_data_dir(data_dir: str | Path) -> FleetShape:
    """The registered fleet of a real server's data dir (read only): each device's reported
    hardware mapped to a simulator profile, its tags, and whether it is online now."""
    db = _open_read_only(data_dir)
    try:
        rows = db.execute("SELECT id, status, reported FROM devices WHERE revoked_at IS NULL ORDER BY id").fetchall()
        tags: dict[str, dict[str, str]] = {}
        for device, key, value in db.execute("SELECT device, key, value FROM device_tags"):
            tags.setdefault(device, {})[key] = value
    finally:
        db.close()
    shapes = []
    for device_id, status, reported in rows:
        hw = (json.loads(reported) or {}).get("hardware") if reported else None
        shapes.append(DeviceShape(nearest_profile(hw), tags.get(device_id, {}), status == "online"))
    return FleetShape(tuple(shapes), f"the {len(shapes)} devices registered in {data_dir}")


def default_shape(seed: int = 0, n: int = 100) -> FleetShape:
    """The simulator's own mix: hardware profiles spread evenly, every device online."""
    ids = [f"sim-{i:04d}" for i in range(1, n + 1)]
    return FleetShape(tuple(DeviceShape(profile_for(d, seed).name, {}) for d in ids))


def registry_from_data_dir(data_dir: str | Path, model: str, version: str,
                           current: str | None = None) -> tuple[bytes, bytes, list[str], str]:
    """From a real server's data dir: (current bundle, candidate bundle, trusted key PEMs, current
    version). The current version is `current`, else the one most target devices run now."""
    root = Path(data_dir)
    db = _open_read_only(root)
    try:
        if current is None:
            row = db.execute(
                "SELECT active_version, COUNT(*) FROM devices WHERE revoked_at IS NULL AND model = ? "
                "AND active_version IS NOT NULL AND active_version != ? GROUP BY active_version "
                "ORDER BY COUNT(*) DESC LIMIT 1", (model, version)).fetchone()
            if row is None:
                raise RehearsalError(f"no registered device runs a version of {model!r} other than {version}: "
                                     "pass --current VERSION or --current-bundle FILE")
            current = str(row[0])
        files = {}
        for v in (current, version):
            hit = db.execute("SELECT file FROM models WHERE name = ? AND version = ?", (model, v)).fetchone()
            if hit is None:
                raise RehearsalError(f"model {model} {v} is not registered in {root}: upload it first "
                                     "or pass the bundle file")
            files[v] = (root / hit[0]).read_bytes()
        pems = [r[0] for r in db.execute("SELECT pem FROM trusted_keys")]
    finally:
        db.close()
    return files[current], files[version], pems, current


def _open_read_only(data_dir: str | Path) -> sqlite3.Connection:
    path = Path(data_dir) / "fleet.db"
    if not path.exists():
        raise RehearsalError(f"{data_dir} is not a fleet server data dir (no fleet.db); pass the server's --data-dir")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def device_ids(shapes: list[DeviceShape], seed: int) -> list[str]:
    """Ids `sim-NNNN` whose hardware profile (fixed by the id) is the one each shape wants: numbers
    are taken in order and skipped when their profile's quota is full."""
    wanted = Counter(s.profile for s in shapes)
    by_profile: dict[str, list[str]] = {p: [] for p in wanted}
    k = 0
    while any(len(by_profile[p]) < n for p, n in wanted.items()):
        k += 1
        device_id = f"sim-{k:04d}"
        p = profile_for(device_id, seed).name
        if p in wanted and len(by_profile[p]) < wanted[p]:
            by_profile[p].append(device_id)
    return [by_profile[s.profile].pop(0) for s in shapes]
