"""The agent's configuration: one TOML file, parsed into typed dataclasses.

Unknown keys are errors (a typo must not silently fall back to a default); every key is
documented in docs/device.md.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlsplit

from edge_agent.config_file import ConfigError, field_names, read_toml, unknown_keys
from edge_agent.protocol import valid_id

MiB = 1024 * 1024


@dataclass
class MqttConfig:
    url: str = ""  # mqtt://host:port or mqtts://host:port; empty: no MQTT link
    username: str = ""
    password: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive: int = 30
    clean_start: bool = False

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "localhost", parts.port or (8883 if self.tls else 1883)


@dataclass
class ServerConfig:
    url: str = ""


@dataclass
class TrustConfig:
    public_keys: list[str] = field(default_factory=list)
    public_keys_pem: list[str] = field(default_factory=list)
    revoked_key_ids: list[str] = field(default_factory=list)  # refused even when listed above
    # The fleet server's desired-state keys (PEM): when set, only desired states signed by one of
    # them are accepted (edge_agent.trust); empty: desired states are not verified.
    desired_keys_pem: list[str] = field(default_factory=list)


@dataclass
class HttpConfig:
    listen: str = "127.0.0.1:8470"
    unix_socket: str = ""
    token: str = ""
    max_body_bytes: int = 1 * MiB
    max_rows: int = 1000
    # Host names (besides the listen address, its IP literals and localhost) the API answers
    # to; any other Host is refused (DNS rebinding).
    allowed_hosts: list[str] = field(default_factory=list)
    # Browser origins (scheme://host[:port]) allowed to call the API; a request with any other
    # Origin is refused (a web page's cross-origin request).
    allowed_origins: list[str] = field(default_factory=list)


@dataclass
class RuntimeConfig:
    intra_op_threads: int = 1


@dataclass
class TelemetryConfig:
    window_s: float = 60.0
    sample_rows: int = 16
    sample_exclude: list[str] = field(default_factory=list)


@dataclass
class OutboxConfig:
    max_bytes: int = 16 * MiB
    # A message leaves the outbox when the server acknowledges its seq on `ack`; a message the
    # broker took but the server did not acknowledge within resend_after_s is sent again.
    resend_after_s: float = 120.0
    server_acks: bool = True  # false: delete on the broker's PUBACK (a server without `ack`)


@dataclass
class UpdateConfig:
    probation_predictions: int = 200
    probation_s: float = 300.0
    probation_max_error_rate: float = 0.05
    probation_latency_factor: float = 3.0
    # Below this median (ms) a model is never too slow: scheduling noise on a busy CPU moves
    # sub-millisecond models by more than any factor.
    probation_latency_floor_ms: float = 2.0
    # SelfTest's latency budget (build-time median x the bundle's latency_tolerance) is never
    # below this, for the same reason.
    selftest_latency_floor_ms: float = 0.5
    download_timeout_s: float = 300.0
    max_download_bytes: int = 256 * MiB
    min_free_disk_bytes: int = 64 * MiB
    keep_versions: int = 2
    # Origins (scheme://host[:port]) other than [server] url that bundles may be downloaded
    # from, without the device's credentials (a mirror); any other origin is refused.
    allowed_download_origins: list[str] = field(default_factory=list)


@dataclass
class FeedbackConfig:
    max_records: int = 10_000  # predictions kept joinable (23 bytes each, preallocated)
    horizon_s: float = 86_400.0  # older predictions count feedback as late


@dataclass
class AgentConfig:
    """Everything an agent needs; build it with `load_config` or directly (tests, simulator)."""

    device_id: str
    data_dir: str
    fleet: str = "default"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)

    def __post_init__(self) -> None:
        if not valid_id(self.device_id):
            raise ConfigError(
                f"device_id {self.device_id!r} is not valid: use 1-64 letters, digits, '.', '_' or '-'"
            )
        if not valid_id(self.fleet):
            raise ConfigError(f"fleet {self.fleet!r} is not valid: use letters, digits, '.', '_' or '-'")
        if self.mqtt.url and urlsplit(self.mqtt.url).scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"[mqtt] url {self.mqtt.url!r} must start with mqtt:// or mqtts://")
        if self.telemetry.window_s <= 0:
            raise ConfigError("[telemetry] window_s must be positive")
        if self.runtime.intra_op_threads < 1:
            raise ConfigError("[runtime] intra_op_threads must be at least 1")
        if not self.outbox.resend_after_s > 0:
            raise ConfigError("[outbox] resend_after_s must be positive (seconds before an unacknowledged message is resent)")
        if self.update.keep_versions < 2:
            raise ConfigError("[update] keep_versions must be at least 2 (active and previous)")
        if not 1 <= self.feedback.max_records <= 10_000_000:
            raise ConfigError("[feedback] max_records must be between 1 and 10,000,000 (23 bytes of RAM each)")
        if not self.feedback.horizon_s > 0:
            raise ConfigError("[feedback] horizon_s must be positive")
        _check_origins("[update] allowed_download_origins", self.update.allowed_download_origins)
        _check_origins("[http] allowed_origins", self.http.allowed_origins)
        if self.trust.desired_keys_pem:
            from edge_agent.trust import DesiredTrustError, raw_keys

            try:
                raw_keys(self.trust.desired_keys_pem)
            except DesiredTrustError as exc:
                raise ConfigError(f"{exc}: paste the key printed by 'edgefleet server add-device'") from exc
        for kid in self.trust.revoked_key_ids:
            if len(kid) != 16 or not all(c in "0123456789abcdef" for c in kid):
                raise ConfigError(
                    f"[trust] revoked_key_ids: {kid[:40]!r} is not a key id (16 lowercase hex digits, "
                    "as 'edgefleet model verify' and GET /api/v1/keys print them)"
                )

    @property
    def path(self) -> Path:
        return Path(self.data_dir)


def _check_origins(where: str, origins: list[str]) -> None:
    for o in origins:
        parts = urlsplit(o)
        try:
            parts.port  # noqa: B018 - raises for a bad port
        except ValueError as exc:
            raise ConfigError(f"{where}: {o!r} has a bad port") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.username:
            raise ConfigError(f"{where}: {o!r} is not an origin: write scheme://host or scheme://host:port")


SECTIONS: dict[str, type] = {
    "mqtt": MqttConfig,
    "server": ServerConfig,
    "trust": TrustConfig,
    "http": HttpConfig,
    "runtime": RuntimeConfig,
    "telemetry": TelemetryConfig,
    "outbox": OutboxConfig,
    "update": UpdateConfig,
    "feedback": FeedbackConfig,
}
TOP_LEVEL = ("device_id", "fleet", "data_dir")


def _check_type(where: str, value: Any, hint: Any) -> Any:
    expected = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(hint)
    if expected is not None:
        if isinstance(value, bool) and hint is not bool:
            raise ConfigError(f"{where} must be a {hint.__name__}, not a boolean")
        if not isinstance(value, expected):
            raise ConfigError(f"{where} must be a {hint.__name__}, got {value!r}")
        return float(value) if hint is float else value
    # list[str]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    return list(value)


def _section(name: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    hints = get_type_hints(cls)
    known = field_names(cls)
    unknown = unknown_keys(table, known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in [{name}]; known keys: {', '.join(sorted(known))}")
    return cls(**{key: _check_type(f"[{name}] {key}", value, _plain(hints[key])) for key, value in table.items()})


def _plain(hint: Any) -> Any:
    return list if str(hint).startswith("list") else hint


def config_from_dict(data: dict[str, Any], base_dir: Path | None = None) -> AgentConfig:
    """Build an AgentConfig from parsed TOML; relative paths resolve against `base_dir`."""
    unknown = unknown_keys(data, (*TOP_LEVEL, *SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} at the top level; known: "
            f"{', '.join(TOP_LEVEL)} and sections {', '.join(f'[{s}]' for s in SECTIONS)}"
        )
    for key in ("device_id", "data_dir"):
        if key not in data:
            raise ConfigError(f"missing required key {key!r} at the top level")
        _check_type(key, data[key], str)
    sections = {name: _section(name, cls, data.get(name, {})) for name, cls in SECTIONS.items()}
    base = base_dir or Path.cwd()

    def resolve(p: str) -> str:
        return str(base / p) if p and not os.path.isabs(p) else p

    trust = sections["trust"]
    trust.public_keys = [resolve(p) for p in trust.public_keys]
    mqtt = sections["mqtt"]
    mqtt.ca_file, mqtt.cert_file, mqtt.key_file = (
        resolve(mqtt.ca_file), resolve(mqtt.cert_file), resolve(mqtt.key_file)
    )
    fleet = data.get("fleet", "default")
    _check_type("fleet", fleet, str)
    return AgentConfig(
        device_id=data["device_id"],
        fleet=fleet,
        data_dir=resolve(data["data_dir"]),
        **sections,
    )


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate the agent's TOML configuration file."""
    path = Path(path)
    return config_from_dict(read_toml(path), base_dir=path.resolve().parent)


def all_keys() -> list[str]:
    """Every configuration key as `key` or `section.key` (the docs test checks each one)."""
    keys = list(TOP_LEVEL)
    for name, cls in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys
