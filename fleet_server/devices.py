"""Device registry services: provision (credentials + a ready agent config), revoke, list, show."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.protocol import valid_id
from fleet_server.auth import hash_password, mosquitto_hash, new_device_password
from fleet_server.broker_accounts import device_added, device_removed
from fleet_server.config import ServerConfig
from fleet_server.storage import Conflict

if TYPE_CHECKING:
    from fleet_server.context import Services

DEFAULT_AGENT_DATA_DIR = "/var/lib/edgefleet"
DEFAULT_AGENT_LISTEN = "127.0.0.1:8470"


class DeviceError(ValueError):
    """A device request that cannot be done; the message says why and what to do."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Provisioned:
    device: dict[str, Any]
    password: str  # shown once; only hashes are stored
    agent_config: str


def parse_tags(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["site=berlin", "line=2"]` -> dict; raises DeviceError naming the bad pair."""
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DeviceError(f"tag {pair!r} must look like key=value, e.g. site=berlin")
        tags[key.strip()] = value.strip()
    return tags


def _toml_str(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(value)


def agent_config_toml(
    config: ServerConfig,
    device_id: str,
    password: str,
    trusted_pems: list[str],
    *,
    data_dir: str = DEFAULT_AGENT_DATA_DIR,
    listen: str = DEFAULT_AGENT_LISTEN,
    window_s: float = 60.0,
) -> str:
    """The agent config file for one device (the only place it is generated)."""
    from fleet_server.desired_signing import DesiredSigner

    keys = "".join(f"  {_toml_str(pem.strip())},\n" for pem in trusted_pems)
    # The device accepts only desired states signed with this key (created on first use).
    desired_key = _toml_str(DesiredSigner.for_secrets_dir(config.secrets_dir).public_pem.strip())
    ca_file, ca_note = config.mqtt_ca_file, ""
    if config.tls or config.serves_https:
        # Relative paths resolve beside the config file: ship the server's CA with it.
        ca_file = config.device_ca_file
        ca_note = f"# TLS: install the server's CA ({config.tls_files[2]}) as {ca_file} (relative: beside this file).\n"
    return (
        f"# edgefleet agent configuration for device {device_id}\n"
        "# Keep this file private: it holds the device's MQTT and download password.\n"
        f"device_id = {_toml_str(device_id)}\n"
        f"fleet = {_toml_str(config.fleet)}\n"
        f"data_dir = {_toml_str(data_dir)}\n"
        "\n[mqtt]\n"
        f"url = {_toml_str(config.device_broker_url)}\n"
        f"username = {_toml_str(device_id)}\n"
        f"password = {_toml_str(password)}\n"
        f"{ca_note}ca_file = {_toml_str(ca_file)}\n"
        "\n[server]\n"
        f"url = {_toml_str(config.server_url)}\n"
        "\n[trust]\n"
        f"public_keys_pem = [\n{keys}]\n"
        "# the fleet server's desired-state key: desired states it did not sign are refused\n"
        f"desired_keys_pem = [\n  {desired_key},\n]\n"
        "\n[http]\n"
        f"listen = {_toml_str(listen)}\n"
        "\n[telemetry]\n"
        f"window_s = {float(window_s)}\n"
    )


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")
_PLAIN = re.compile(r"^[^\x00-\x1f\x7f]+$")


def check_agent_options(*, data_dir: str | None = None, listen: str | None = None,
                        window_s: float | None = None) -> None:
    """The agent config options a device is provisioned with (CLI and API alike): DeviceError
    naming the bad one, before anything is stored."""
    if data_dir is not None and not (isinstance(data_dir, str) and _PLAIN.match(data_dir) and len(data_dir) <= 4096):
        raise DeviceError(f"agent data_dir {data_dir!r} must be a path without control characters")
    if listen is not None:
        m = _HOST_PORT.match(listen) if isinstance(listen, str) else None
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise DeviceError(f"agent listen {listen!r} must be HOST:PORT, e.g. 127.0.0.1:8471")
    if window_s is not None and (isinstance(window_s, bool) or not isinstance(window_s, int | float)
                                 or not 0 < window_s <= 86400):
        raise DeviceError(f"telemetry window_s {window_s!r} must be more than 0 and at most 86400 seconds")


def provision_device(
    svc: Services, device_id: str, tags: dict[str, str] | None = None, **config_options: Any
) -> Provisioned:
    """Create a device with fresh credentials and return its agent config (password shown once).
    `config_options` are those of `agent_config_toml` (data_dir, listen, window_s)."""
    if not valid_id(device_id):
        raise DeviceError(
            f"device id {device_id!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    check_agent_options(**config_options)
    password = new_device_password()
    try:
        svc.storage.insert_device(
            device_id, svc.config.fleet, dict(tags or {}), hash_password(password), mosquitto_hash(password), svc.clock()
        )
    except Conflict as exc:
        raise DeviceError(
            f"device {device_id!r} already exists; revoke it first or pick another id", 409
        ) from exc
    device_added(svc, device_id, password)  # on the broker at once (this process holds the password)
    pems = [k["pem"] for k in svc.storage.trusted_keys()]
    return Provisioned(
        device=svc.storage.get_device(device_id) or {},
        password=password,
        agent_config=agent_config_toml(svc.config, device_id, password, pems, **config_options),
    )


def revoke_device(svc: Services, device_id: str) -> dict[str, Any]:
    """Remove a device's broker account and download access (its history stays)."""
    device = svc.storage.get_device(device_id)
    if device is None:
        raise DeviceError(f"no device {device_id!r}; list devices with 'edgefleet server list-devices'", 404)
    if device["revoked_at"] is None:
        svc.storage.revoke_device(device_id, svc.clock())
        device_removed(svc, device_id)  # the broker disconnects it at once
    return svc.storage.get_device(device_id) or {}


def get_device(svc: Services, device_id: str) -> dict[str, Any]:
    device = svc.storage.get_device(device_id)
    if device is None:
        raise DeviceError(f"no device {device_id!r}", 404)
    stats = svc.storage.seq_stats(device_id)
    device["delivery"] = loss_summary(stats[0]) if stats else None
    return device


def loss_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """Loss = seq gaps the device did not explain by its own `dropped_total`, over its current
    install: a reinstall (seqs jumping far above the highest) starts the counts over, and is
    counted in `reinstalls` (see fleet_server.storage.accounting.account)."""
    expected = stats["max_seq"] - stats["first_seq"] + 1
    missing = expected - stats["received"]
    return {
        "first_seq": stats["first_seq"],
        "max_seq": stats["max_seq"],
        "received": stats["received"],
        "missing": missing,
        "dropped_by_device": stats["dropped_total"],
        "lost": max(0, missing - stats["dropped_total"]),
        "reinstalls": stats.get("reinstalls", 0),
        "reinstalled_at": stats.get("reinstalled_at"),
        "purged_upto": stats.get("purged_upto"),
    }


def list_devices(
    svc: Services,
    *,
    tags: dict[str, str] | None = None,
    model_version: str | None = None,
    online: bool | None = None,
    seen_within_s: float | None = None,
    not_seen_within_s: float | None = None,
    include_revoked: bool = False,
    limit: int = 1000,
    offset: int = 0,
) -> list[dict[str, Any]]:
    now = svc.clock()
    status = None if online is None else ("online" if online else "offline")
    return svc.storage.list_devices(
        tags=tags,
        model_version=model_version,
        status=status,
        seen_after=now - seen_within_s if seen_within_s is not None else None,
        seen_before=now - not_seen_within_s if not_seen_within_s is not None else None,
        include_revoked=include_revoked,
        limit=limit,
        offset=offset,
    )


def device_events(svc: Services, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
    get_device(svc, device_id)
    return svc.storage.events(device_id, limit)
