"""The fleet server's configuration: one dataclass, read from `DATA_DIR/server.toml` plus overrides.

Everything the server builds (storage, broker, loops) takes its settings from here, so tests
construct a `ServerConfig` directly with small buckets and fast loops.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edge_agent.config_file import ConfigError, field_names, read_toml, unknown_keys
from edge_agent.protocol import valid_id

if TYPE_CHECKING:
    from fleet_server.oidc import OidcConfig

log = logging.getLogger(__name__)

SERVER_USERNAME = "_edgefleet_server"  # never a valid device id: those start with a letter or digit
CONFIG_FILE = "server.toml"
STORAGE_URL_ENV = "EDGEFLEET_STORAGE_URL"


@dataclass
class ServerConfig:
    """Settings of one fleet server (its API, ingest and loops share one data dir)."""

    data_dir: Path
    fleet: str = "default"
    listen: str = "127.0.0.1:8080"
    public_url: str = ""  # base URL devices download from; default http://{listen}
    mqtt_url: str = ""  # external broker; empty: managed broker
    storage_url: str = ""  # sqlite:///PATH or postgresql://USER@HOST:PORT/DB; empty: DATA_DIR/fleet.db
    broker_port: int = 1883  # managed broker's loopback port
    broker_host: str = "127.0.0.1"
    device_mqtt_url: str = ""  # URL written into agent configs; default the broker's URL
    mqtt_ca_file: str = ""
    # TLS (docs/security.md): the managed broker adds an MQTT-over-TLS listener and the HTTP API
    # serves HTTPS, with the certificates `edgefleet server tls-init` writes to DATA_DIR/tls/.
    tls: bool = False
    https: bool | None = None  # HTTPS on `listen`; default: follows `tls`
    broker_tls_listen: str = "127.0.0.1:8883"  # the managed broker's TLS listener (0.0.0.0:8883 for a LAN)
    tls_cert_file: str = ""  # default DATA_DIR/tls/server.pem
    tls_key_file: str = ""  # default DATA_DIR/tls/server.key
    tls_ca_file: str = ""  # the CA devices trust; default DATA_DIR/tls/ca.pem
    device_ca_file: str = "edgefleet-ca.pem"  # ca_file written into agent configs (relative: beside the config)
    worker_id: str = "0"  # distinct per ingest process: it names the persistent MQTT session
    session_expiry_s: int = 7 * 24 * 3600
    bucket_s: float = 300.0  # drift time bucket
    bucket_grace_s: float = 60.0  # a bucket is closed this long after its end
    alert_interval_s: float = 30.0
    rollout_interval_s: float = 2.0  # the rollout controller's reconcile pass
    broker_sync_interval_s: float = 2.0
    # How the broker knows device accounts (docs/deployment.md): "dynsec" (Mosquitto's dynamic-security
    # plugin: changes apply at once, each device bound to its own client id) or "password_file".
    broker_accounts: str = "dynsec"
    broker_restart_backoff_s: float = 1.0  # a dead managed broker is restarted after this, doubling to 60 s
    # A password rotation the device has not confirmed within this expires; the old password stays.
    rotation_grace_s: float = 7 * 24 * 3600.0
    ingest_batch_s: float = 0.1
    ingest_batch_max: int = 2000
    stats_interval_s: float = 2.0
    ack_interval_s: float = 10.0  # a device's delivery acknowledgement goes out at most this often
    samples_per_device: int = 200  # newest sampled rows kept per device; 0 keeps none
    telemetry_retention_days: float = 14.0  # windows (and their seqs) kept this long; 0 keeps them forever
    # Drift buckets and feedback rows (docs/fleet-server.md#retention-and-disk-use): per bucket for
    # history_rollup_days, then one row per device and day, deleted after history_retention_days.
    history_rollup_days: float = 7.0  # 0: never roll up
    history_retention_days: float = 400.0  # 0: keep forever
    audit_retention_days: float = 400.0  # audit log rows; 0: keep forever
    max_queued_messages: int = 1_000_000
    trusted_key_files: list[str] = field(default_factory=list)
    # Default drift policy; per-model overrides live in the registry.
    warn_psi: float = 0.1
    alert_psi: float = 0.25
    min_predictions: int = 500
    consecutive: int = 3
    # Performance alert policy (docs/performance.md): a drop below the bundle's validation score.
    perf_warn_drop: float = 0.02
    perf_alert_drop: float = 0.05
    perf_min_labels: int = 200
    # Data-quality alert policy (docs/drift.md#data-quality-refused-rows-count-too): a rise of a
    # feature's NaN or out-of-range share over the reference's, refused rows included.
    quality_warn_share: float = 0.05
    quality_alert_share: float = 0.20
    quality_min_rows: int = 100
    webhook_timeout_s: float = 5.0
    webhook_retries: int = 3
    threads: int = 8  # waitress worker threads
    # Console single sign-on (docs/console.md#single-sign-on-openid-connect): the [oidc] table.
    oidc: OidcConfig | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if isinstance(self.oidc, dict):
            from fleet_server.oidc import OidcConfig

            self.oidc = OidcConfig.from_table(self.oidc)
        if not valid_id(self.fleet):
            raise ConfigError(f"fleet {self.fleet!r} is not valid: use letters, digits, '.', '_' or '-'")
        if self.mqtt_url and urlsplit(self.mqtt_url).scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"mqtt_url {self.mqtt_url!r} must start with mqtt:// or mqtts://")
        if self.storage_url and self.storage_url.split("://", 1)[0] not in ("sqlite", "postgresql", "postgres"):
            raise ConfigError("storage_url must start with sqlite:/// or postgresql://")
        if self.bucket_s <= 0:
            raise ConfigError("bucket_s must be positive (seconds per drift bucket)")
        if self.ack_interval_s < 0:
            raise ConfigError("ack_interval_s must be 0 (acknowledge after every batch) or more seconds")
        if self.telemetry_retention_days < 0:
            raise ConfigError("telemetry_retention_days must be 0 (keep telemetry windows forever) or more days")
        if self.samples_per_device < 0:
            raise ConfigError("samples_per_device must be 0 (keep no sampled rows) or more")
        for name in ("history_rollup_days", "history_retention_days", "audit_retention_days"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (keep forever) or more days")
        if 0 < self.history_retention_days <= self.history_rollup_days:
            raise ConfigError("history_retention_days must exceed history_rollup_days (or be 0: keep forever)")
        if not 0 < self.quality_warn_share <= self.quality_alert_share <= 1:
            raise ConfigError("quality_warn_share and quality_alert_share must be shares with 0 < warn <= alert <= 1")
        if self.quality_min_rows < 0:
            raise ConfigError("quality_min_rows must be 0 or more rows")
        if self.broker_accounts not in ("dynsec", "password_file"):
            raise ConfigError(f"broker_accounts {self.broker_accounts!r} must be \"dynsec\" or \"password_file\"")
        if ":" not in self.listen:
            raise ConfigError(f"listen {self.listen!r} must be HOST:PORT, e.g. 127.0.0.1:8080")
        if ":" not in self.broker_tls_listen or not self.broker_tls_listen.rpartition(":")[2].isdigit():
            raise ConfigError(f"broker_tls_listen {self.broker_tls_listen!r} must be HOST:PORT, e.g. 0.0.0.0:8883")

    # ------------------------------------------------------------------ derived values

    @property
    def managed_broker(self) -> bool:
        return not self.mqtt_url

    @property
    def broker_url(self) -> str:
        return self.mqtt_url or f"mqtt://{self.broker_host}:{self.broker_port}"

    @property
    def device_broker_url(self) -> str:
        if self.device_mqtt_url:
            return self.device_mqtt_url
        if self.tls and self.managed_broker:
            host, port = self.broker_tls_host_port
            if host in ("", "0.0.0.0", "::"):  # a wildcard: devices use the name they download from
                host = urlsplit(self.server_url).hostname or "localhost"
            return f"mqtts://{_url_host(host)}:{port}"
        return self.broker_url

    @property
    def broker_tls_host_port(self) -> tuple[str, int]:
        host, _, port = self.broker_tls_listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def serves_https(self) -> bool:
        return self.tls if self.https is None else self.https

    @property
    def tls_files(self) -> tuple[Path, Path, Path]:
        """(server certificate, its key, the CA devices trust)."""
        d = self.data_dir / "tls"
        return (Path(self.tls_cert_file or d / "server.pem"), Path(self.tls_key_file or d / "server.key"),
                Path(self.tls_ca_file or d / "ca.pem"))

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host, int(port)

    @property
    def server_url(self) -> str:
        scheme = "https" if self.serves_https else "http"
        return (self.public_url or f"{scheme}://{self.listen}").rstrip("/")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "fleet.db"

    @property
    def storage_location(self) -> str:
        """The storage URL: `storage_url`, or the data dir's SQLite file."""
        return self.storage_url or f"sqlite:///{self.db_path.resolve().as_posix().lstrip('/')}"

    @property
    def bundles_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    def server_mqtt_password(self) -> str:
        """The server account's MQTT password, created on first use (0600 file in the data dir)."""
        path = self.secrets_dir / "mqtt-server-password"
        if not path.exists():
            self.secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(".tmp")
            tmp.touch(mode=0o600)
            tmp.write_text(secrets.token_urlsafe(32))
            tmp.replace(path)
        return path.read_text().strip()

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.bundles_dir, self.secrets_dir):
            d.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        secure_data_dir(self.data_dir)


PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PRIVATE_UMASK = 0o077  # what the server's processes create: for their user only


def secure_data_dir(data_dir: Path) -> list[str]:
    """Make the data dir private to the server's user: the dir and every dir in it 0700, every
    file 0600 (the database holds operator password hashes and webhook secrets, `secrets/` and
    `tls/` hold keys). A dir or file that other local users could read is fixed, with a warning
    saying what was; one that cannot be fixed (owned by another user) refuses the start.
    Returns the paths that were fixed."""
    fixed: list[str] = []
    if not data_dir.is_dir():
        return fixed
    paths = [data_dir, *sorted(data_dir.rglob("*"))]
    for path in paths:
        try:
            st = path.lstat()
        except FileNotFoundError:  # a temporary file gone meanwhile (the database's journal)
            continue
        if stat.S_ISLNK(st.st_mode):
            continue  # the target's owner decides; the server never creates links
        wanted = PRIVATE_DIR_MODE if stat.S_ISDIR(st.st_mode) else PRIVATE_FILE_MODE
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o077:
            continue
        try:
            path.chmod(wanted)
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            raise ConfigError(
                f"{path} is readable by other local users (mode {mode:04o}) and cannot be made private: "
                f"{exc.strerror}. Run the server as the data dir's owner, or 'chmod -R go-rwx {data_dir}'"
            ) from exc
        fixed.append(f"{path} ({mode:04o} -> {wanted:04o})")
    if fixed:
        log.warning(
            "the data dir %s was readable by other local users; made private (dirs 0700, files 0600): %s%s",
            data_dir, ", ".join(fixed[:5]), f" and {len(fixed) - 5} more" if len(fixed) > 5 else "",
        )
    return fixed


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def load_config(data_dir: str | Path, **overrides: Any) -> ServerConfig:
    """Read `DATA_DIR/server.toml` if present, then apply non-None overrides (CLI options)."""
    data_dir = Path(data_dir)
    path = data_dir / CONFIG_FILE
    values = read_toml(path, required=False)
    known = field_names(ServerConfig, exclude={"data_dir"})
    unknown = sorted(unknown_keys(values, known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {path}; known keys: {', '.join(sorted(known))}")
    if os.environ.get(STORAGE_URL_ENV):  # beats the file, not a command-line option
        values["storage_url"] = os.environ[STORAGE_URL_ENV]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServerConfig(data_dir=data_dir, **values)
