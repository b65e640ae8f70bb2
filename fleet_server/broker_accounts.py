"""Device accounts on the broker through Mosquitto's dynamic-security plugin.

The registry is the truth; the broker holds one client per active device (username = device id,
bound to client id = device id) with its own role: publish only under `ef/{fleet}/d/{id}/`, read
only its own `desired`, `ack` and `credentials`. The server account has the server role (the
whole `ef/` tree, shared subscriptions, `$SYS`) and the plugin's admin topics, and is not bound to
one client id: each server process connects with several.

Changes are pushed by whichever process makes them (`add-device`, revoke, a password change), over
MQTT on `$CONTROL/dynamic-security/v1`, and take effect at once (a deleted, disabled or re-passworded
client is disconnected by the broker). Mosquitto 2.0's control API accepts only plaintext passwords,
so only the process that holds a new password can create or change its account; the plugin's own
JSON file, which takes the registry's `$7$` hashes as they are, seeds a broker at start.
`reconcile` removes accounts the registry no longer has and reports registered devices the broker
lacks.
"""

from __future__ import annotations

import base64
import glob
import itertools
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_agent.protocol import topic
from fleet_server.config import SERVER_USERNAME, ServerConfig

if TYPE_CHECKING:
    from fleet_server.context import Services

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
SERVER_ROLE = "edgefleet-server"
DEVICE_ROLE_PREFIX = "edgefleet-device-"
# A device publishes these and reads those (DESIGN section 3; `credentials` carries rotations).
DEVICE_WRITES = ("telemetry", "events", "reported", "status")
DEVICE_READS = ("desired", "ack", "credentials")
COMMANDS_PER_MESSAGE = 100  # ~1 KB each: a control message stays far below the broker's message size limit

PLUGIN_PATHS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/*/mosquitto_dynamic_security.so",
)


class DynsecError(RuntimeError):
    """The broker's dynamic-security plugin could not be reached or refused a command."""


def find_plugin() -> str:
    """The plugin's shared library (Debian's `mosquitto` package ships it)."""
    for pattern in PLUGIN_PATHS:
        for path in sorted(glob.glob(pattern)):
            return path
    raise DynsecError(
        "mosquitto_dynamic_security.so not found (install Debian's mosquitto package, or set "
        "broker_accounts = \"password_file\" in server.toml)"
    )


def device_role(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + device_id


def _acl(acltype: str, topic_filter: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic_filter, "allow": True, "priority": 0}


def device_acls(fleet: str, device_id: str) -> list[dict[str, Any]]:
    """Literal topics only: a device cannot subscribe with wildcards or publish for another id."""
    acls = [_acl("publishClientSend", topic(fleet, device_id, kind)) for kind in DEVICE_WRITES]
    for kind in DEVICE_READS:
        acls.append(_acl("subscribeLiteral", topic(fleet, device_id, kind)))
        acls.append(_acl("publishClientReceive", topic(fleet, device_id, kind)))
    return acls


def server_acls() -> list[dict[str, Any]]:
    # Mosquitto 2.0's plugin checks a shared subscription with its `$share/group/` prefix.
    return [
        _acl("publishClientSend", "ef/#"),
        _acl("publishClientReceive", "ef/#"),
        _acl("subscribePattern", "ef/#"),
        _acl("subscribePattern", "$share/+/ef/#"),
        _acl("publishClientReceive", "$SYS/#"),
        _acl("subscribePattern", "$SYS/#"),
        _acl("publishClientSend", CONTROL_TOPIC),
        _acl("publishClientReceive", RESPONSE_TOPIC),
        _acl("subscribeLiteral", RESPONSE_TOPIC),
    ]


def _hashed(mosquitto_hash: str) -> dict[str, Any]:
    """`$7$iterations$salt$hash` (PBKDF2-SHA512, as in the password file) -> the plugin's fields."""
    _, kind, iterations, salt, digest = mosquitto_hash.split("$")
    if kind != "7":
        raise ValueError("not a Mosquitto $7$ (PBKDF2-SHA512) hash")
    base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
    return {"salt": salt, "password": digest, "iterations": int(iterations)}


def dynsec_config(fleet: str, server_hash: str, accounts: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The plugin's configuration file: every active device with its stored hash, and the server."""
    clients = [{"username": SERVER_USERNAME, "roles": [{"rolename": SERVER_ROLE}], **_hashed(server_hash)}]
    roles = [{"rolename": SERVER_ROLE, "acls": server_acls()}]
    for device_id, broker_hash in accounts:
        try:
            hashed = _hashed(broker_hash)
        except ValueError:  # not a $7$ hash (edited by hand?): the device cannot log in until rotated
            log.warning("device %s has no usable broker hash; it gets no broker account", device_id)
            continue
        clients.append({
            "username": device_id, "clientid": device_id, "roles": [{"rolename": device_role(device_id)}],
            **hashed,
        })
        roles.append({"rolename": device_role(device_id), "acls": device_acls(fleet, device_id)})
    return {
        "defaultACLAccess": {
            "publishClientSend": False, "publishClientReceive": False, "subscribe": False, "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


def write_dynsec_config(path: os.PathLike[str] | str, config: dict[str, Any]) -> None:
    """Atomically, 0600: it holds password hashes."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def add_device_commands(fleet: str, device_id: str, password: str) -> list[dict[str, Any]]:
    return [
        {"command": "createRole", "rolename": device_role(device_id), "acls": device_acls(fleet, device_id)},
        {"command": "createClient", "username": device_id, "password": password, "clientid": device_id,
         "roles": [{"rolename": device_role(device_id)}]},
    ]


@dataclass
class Reconciled:
    removed: list[str] = field(default_factory=list)  # accounts the registry no longer has
    missing: list[str] = field(default_factory=list)  # registered devices without a broker account


class DynsecClient:
    """Commands to the plugin as the server account; waits for the plugin's responses.

    Every server process may be subscribed to the response topic, so each command carries its
    own correlation id and only its responses are taken.
    """

    def __init__(self, config: ServerConfig, timeout: float = 15.0) -> None:
        from fleet_server.mqtt_link import make_client

        self.timeout = timeout
        # A unique client id: a CLI process and every server process may talk to the plugin at once.
        client_id = f"ef-accounts-{config.worker_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.client, self._connect = make_client(config, client_id)
        self._ready = threading.Event()
        self._refused: str | None = None
        self._lock = threading.Lock()
        # The sync loop and a request thread may start the client at the same moment: one connects.
        self._start_lock = threading.Lock()
        self._waiting: dict[str, dict[str, Any] | None] = {}
        self._arrived = threading.Condition()
        self._ids = itertools.count()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a, **k: self._ready.clear()
        self.client.on_message = self._on_message
        self._started = False

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            return
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_subscribe(self, *args: Any) -> None:
        self._ready.set()

    def _on_message(self, client, userdata, message) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            return
        with self._arrived:
            for response in responses:
                cid = response.get("correlationData") if isinstance(response, dict) else None
                if cid in self._waiting:
                    self._waiting[cid] = response
            self._arrived.notify_all()

    def start(self) -> DynsecClient:
        with self._start_lock:
            if not self._started:
                self.client.on_subscribe = self._on_subscribe
                try:  # connect now, so that a broker that is not running fails at once
                    self.client.connect(**self._connect)
                except OSError as exc:
                    raise DynsecError(f"cannot reach the broker at {self._connect['host']}:"
                                      f"{self._connect['port']}: {exc.strerror or exc}") from exc
                self.client.loop_start()
                self._started = True
        if not self._ready.wait(self.timeout):
            raise DynsecError(
                f"cannot reach the broker's dynamic-security plugin ({self._refused or 'no connection'}"
                f" after {self.timeout:.0f}s): is the broker running with the plugin loaded?"
            )
        return self

    def close(self) -> None:
        with self._start_lock:
            if self._started:
                self.client.disconnect()
                self.client.loop_stop()
                self._started = False

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send commands (in order, in as few messages as fit) and return one response each."""
        self.start()
        out: list[dict[str, Any]] = []
        with self._lock:
            for i in range(0, len(commands), COMMANDS_PER_MESSAGE):
                out += self._run_batch(commands[i:i + COMMANDS_PER_MESSAGE])
        return out

    def _run_batch(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prefix = uuid.uuid4().hex
        ids = [f"{prefix}-{next(self._ids)}" for _ in commands]
        with self._arrived:
            self._waiting.update(dict.fromkeys(ids))
        try:
            payload = json.dumps({"commands": [{**c, "correlationData": i} for c, i in zip(commands, ids, strict=True)]})
            info = self.client.publish(CONTROL_TOPIC, payload, qos=1)
            with self._arrived:
                if not self._arrived.wait_for(lambda: all(self._waiting[i] is not None for i in ids), self.timeout):
                    raise DynsecError(f"the dynamic-security plugin did not answer within {self.timeout:.0f}s "
                                      f"(publish rc {info.rc}); does the server account have its admin role?")
                return [self._waiting[i] for i in ids]  # type: ignore[misc]
        finally:
            with self._arrived:
                for i in ids:
                    self._waiting.pop(i, None)


class DynsecAccounts:
    """The registry's device accounts on a broker with the dynamic-security plugin."""

    def __init__(self, config: ServerConfig, client: DynsecClient | None = None) -> None:
        self.config = config
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> DynsecClient:
        with self._lock:
            if self._client is None:
                self._client = DynsecClient(self.config)
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _check(self, responses: list[dict[str, Any]], ok_errors: tuple[str, ...] = ()) -> None:
        for response in responses:
            error = response.get("error")
            if error and error not in ok_errors:
                raise DynsecError(f"dynamic-security {response.get('command')}: {error}")

    def add_device(self, device_id: str, password: str) -> None:
        """Create (or re-enable with this password) the device's client and role."""
        responses = self.client.run(add_device_commands(self.config.fleet, device_id, password))
        if responses[1].get("error") == "Client already exists":
            responses[1:] = self.client.run([
                {"command": "setClientPassword", "username": device_id, "password": password},
                {"command": "setClientId", "username": device_id, "clientid": device_id},
                {"command": "enableClient", "username": device_id},
            ])
        self._check(responses, ("Role already exists",))

    def set_password(self, device_id: str, password: str) -> None:
        """The broker disconnects the device's current session; it reconnects with the new one."""
        responses = self.client.run([{"command": "setClientPassword", "username": device_id, "password": password}])
        if responses[0].get("error") == "Client not found":
            self.add_device(device_id, password)
            return
        self._check(responses)

    def remove_device(self, device_id: str) -> None:
        """Delete the client (the broker disconnects it at once) and its role."""
        self._check(self.client.run([
            {"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": device_role(device_id)},
        ]), ("Client not found", "Role not found"))

    def device_accounts(self) -> set[str]:
        """Usernames of the device clients on the broker (not the server's or an operator's)."""
        response = self.client.run([{"command": "listClients", "verbose": False, "count": -1}])[0]
        if response.get("error"):
            raise DynsecError(f"dynamic-security listClients: {response['error']}")
        clients = response.get("data", {}).get("clients", [])
        roles = self.client.run([{"command": "listRoles", "verbose": False, "count": -1}])[0]
        device_roles = {r[len(DEVICE_ROLE_PREFIX):] for r in roles.get("data", {}).get("roles", [])
                        if r.startswith(DEVICE_ROLE_PREFIX)}
        # Only accounts edgefleet made (they have a device role) are ours to remove.
        return {c for c in clients if c in device_roles}

    def reconcile(self, active: set[str]) -> Reconciled:
        """Remove accounts of devices no longer active; report active devices the broker lacks."""
        on_broker = self.device_accounts()
        result = Reconciled(removed=sorted(on_broker - active), missing=sorted(active - on_broker))
        for device_id in result.removed:
            self.remove_device(device_id)
            log.info("broker account of %s removed (not an active device in the registry)", device_id)
        return result


def make_accounts(config: ServerConfig) -> DynsecAccounts | None:
    """What this process pushes account changes to: the plugin in dynsec mode, else None."""
    return DynsecAccounts(config) if config.broker_accounts == "dynsec" else None


def device_added(svc: Services, device_id: str, password: str) -> None:
    """A device was registered: give it its broker account now (this process holds its password)."""
    if svc.accounts is not None:
        try:
            svc.accounts.add_device(device_id, password)
        except DynsecError as exc:
            log.warning("broker account of %s not created yet (%s); a managed broker gets it from the "
                        "registry when it starts again", device_id, exc)
    svc.devices_changed()


def password_changed(svc: Services, device_id: str, password: str) -> None:
    """A device's password changed in the registry: the broker takes it now or this raises
    (DynsecError), so that the caller can keep the change pending and try again."""
    if svc.accounts is not None:
        svc.accounts.set_password(device_id, password)
    svc.devices_changed()


def device_removed(svc: Services, device_id: str) -> None:
    """A device was revoked: delete its account, which disconnects it at once."""
    if svc.accounts is not None:
        try:
            svc.accounts.remove_device(device_id)
        except DynsecError as exc:
            log.warning("broker account of %s not removed yet (%s); the broker-sync loop removes it",
                        device_id, exc)
    svc.devices_changed()
