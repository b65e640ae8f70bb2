"""The MQTT link (paho-mqtt 2.x, MQTT 5, QoS 1): connect, last will, retained snapshots, outbox sends.

Two ways to drive it: `start()` runs a small network thread (the real agent), or a simulator
calls `service(timeout=0)` for many links from one thread (no OS thread per device).
Reconnects back off exponentially with jitter so a fleet does not reconnect in lockstep after
a broker restart. paho callbacks only record facts (PUBACKs, the server's delivery
acknowledgements, connection state, desired payloads); the agent acts on them in `tick`, outside
paho's locks.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import AgentConfig
from edge_agent.paho_import import paho_client
from edge_agent.paho_poll import install as poll_select
from edge_agent.protocol import DeliveryAck, ProtocolError, decode, topic

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

log = logging.getLogger("edge_agent.link")

SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our subscription through a week offline
# MQTT 5 PUBLISH overhead beyond topic and payload: fixed header (~3), topic length (2),
# packet id (2), properties length (1); plus the 4-byte PUBACK coming back.
PUBLISH_OVERHEAD = 8
PUBACK_BYTES = 4


def _loop_writes(client: object, userdata: object, sock: object) -> None:
    """paho's write callback in thread mode: nothing to do, the loop thread writes what is queued."""


class MqttLink:
    """One device's MQTT connection."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        on_connected: Callable[[], None],
        on_desired: Callable[[bytes], None],
        clock: Callable[[], float],
        will_payload: Callable[[], bytes],
        on_credentials: Callable[[bytes], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        max_inflight: int = 20,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self._on_connected = on_connected
        self._on_desired = on_desired
        self._on_credentials = on_credentials
        self._on_refused = on_refused
        self._will_payload = will_payload
        self.max_inflight = max_inflight
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.rng = rng or random.Random()
        self.desired_topic = topic(config.fleet, config.device_id, "desired")
        self.ack_topic = topic(config.fleet, config.device_id, "ack")
        self.credentials_topic = topic(config.fleet, config.device_id, "credentials")
        self.connected = False
        self.bytes_out = 0  # approximate bytes on the wire (telemetry bandwidth accounting)
        self.connects = 0
        self._attempts = 0
        self._next_attempt = 0.0
        self._acks: deque[int] = deque()
        self._delivered: deque[int] = deque()  # seqs the server acknowledged on `ack`
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self._inflight_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.wakeup: Callable[[], None] = lambda: None
        # ssl only for mqtts:// (see edge_agent.paho_import).
        self.paho = poll_select(paho_client(config.mqtt.tls))
        self.client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        cfg = self.config.mqtt
        mqtt = self.paho
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.config.device_id,
            protocol=mqtt.MQTTv5,
        )
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls:
            client.tls_set(
                ca_certs=cfg.ca_file or None,
                certfile=cfg.cert_file or None,
                keyfile=cfg.key_file or None,
                cert_reqs=mqtt.ssl.CERT_REQUIRED,
            )
        client.max_inflight_messages_set(self.max_inflight)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        return client

    # ------------------------------------------------------------------ paho callbacks

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            if self._on_refused is not None:
                try:
                    self._on_refused(str(reason_code))
                except Exception:  # a callback must never kill paho's loop
                    log.exception("on_refused failed")
            return
        self.connected = True
        self._attempts = 0
        self.connects += 1
        client.subscribe(self.desired_topic, qos=1)
        if self.config.outbox.server_acks:
            client.subscribe(self.ack_topic, qos=1)
        if self._on_credentials is not None:
            client.subscribe(self.credentials_topic, qos=1)
        try:
            self._on_connected()
        except Exception:  # a callback must never kill paho's loop
            log.exception("on_connected failed")
        self.wakeup()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected:
            log.info("disconnected from broker: %s", reason_code)
        self.connected = False
        self._schedule_retry()

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # Runs under paho's message lock: only record the fact.
        self._acks.append(mid)
        self.wakeup()

    def _handle_message(self, client, userdata, message) -> None:
        if message.topic == self.ack_topic:
            try:
                ack = decode("ack", bytes(message.payload))
            except ProtocolError as exc:
                log.warning("ignoring a malformed delivery acknowledgement: %s", exc)
                return
            assert isinstance(ack, DeliveryAck)
            if ack.device == self.config.device_id:
                self._delivered.extend(ack.seqs)
                self.wakeup()
            return
        if message.topic == self.credentials_topic and self._on_credentials is not None:
            try:
                self._on_credentials(bytes(message.payload))
            except Exception:
                log.exception("handling a credentials notice failed")
            return
        if message.topic == self.desired_topic:
            try:
                self._on_desired(bytes(message.payload))
            except Exception:
                log.exception("handling desired failed")
            self.wakeup()

    def set_password(self, password: str) -> None:
        """Log in with this password from the next connection on (a rotated password)."""
        self.config.mqtt.password = password
        self.client.username_pw_set(self.config.mqtt.username, password or None)

    # ------------------------------------------------------------------ connection

    def _schedule_retry(self) -> None:
        self._attempts += 1
        delay = min(self.backoff_max_s, self.backoff_min_s * 2 ** min(self._attempts - 1, 16))
        self._next_attempt = self.clock() + delay * self.rng.uniform(0.5, 1.0)

    def _properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if self.config.mqtt.clean_start else SESSION_EXPIRY_S
        return props

    def _try_connect(self) -> None:
        cfg = self.config.mqtt
        host, port = cfg.host_port()
        status = topic(self.config.fleet, self.config.device_id, "status")
        # The will's timestamp is that of this connection attempt.
        self.client.will_set(status, self._will_payload(), qos=1, retain=True)
        try:
            self.client.connect(
                host, port, keepalive=cfg.keepalive, clean_start=cfg.clean_start, properties=self._properties()
            )
        except OSError as exc:
            ssl = sys.modules.get("ssl")  # loaded only for mqtts://
            if ssl is not None and isinstance(exc, ssl.SSLError):
                # A wrong CA or host name does not heal by retrying: say so.
                log.warning("TLS to %s:%s failed (check mqtt.ca_file and the host name): %s", host, port, exc)
            else:
                log.debug("connect to %s:%s failed: %s", host, port, exc)
            self._schedule_retry()

    def service(self, timeout: float = 0.0) -> None:
        """One step of network work: reconnect when due, then read/write what is ready."""
        if self.client.socket() is None:
            if self.clock() >= self._next_attempt:
                self._try_connect()
            if self.client.socket() is None:
                return
        rc = self.client.loop(timeout=timeout)
        if rc != self.paho.MQTT_ERR_SUCCESS and self.client.socket() is None and self.connected:
            self.connected = False
            self._schedule_retry()
        elif rc != self.paho.MQTT_ERR_SUCCESS and not self.connected and self.clock() >= self._next_attempt:
            self._schedule_retry()

    def start(self) -> None:
        """Run the network loop in a background thread (the real agent's mode).

        Only that thread touches the socket. paho writes a message at once from the thread that
        publishes it unless its own loop thread or a write callback is set. With TLS, two threads
        on one SSL object can crash the process (OpenSSL's objects are not thread-safe). The
        callback below makes a publish only queue its packet and wake the loop."""
        self.client.on_socket_register_write = _loop_writes
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.config.device_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.client.socket() is None:
                wait = max(0.0, min(0.5, self._next_attempt - self.clock()))
                if wait and self._stop.wait(wait):
                    break
            try:
                self.service(timeout=0.5)
            except Exception:
                log.exception("MQTT loop error")
                self._stop.wait(0.5)

    def stop(self, offline_payload: bytes | None = None) -> None:
        """Publish `offline` (when given and connected), disconnect and stop the thread."""
        if offline_payload is not None and self.connected:
            info = self.client.publish(
                topic(self.config.fleet, self.config.device_id, "status"), offline_payload, qos=1, retain=True
            )
            if self._thread is not None:
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(timeout=2.0)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.client.on_socket_register_write = None  # the loop has stopped: DISCONNECT goes out from here
        self.client.disconnect()
        self.connected = False

    # ------------------------------------------------------------------ publishing

    def publish_retained(self, kind: str, payload: bytes) -> None:
        """A retained snapshot (status, reported): direct, not through the outbox."""
        if not self.connected:
            return
        t = topic(self.config.fleet, self.config.device_id, kind)  # type: ignore[arg-type]
        self.client.publish(t, payload, qos=1, retain=True)
        self.bytes_out += len(t) + len(payload) + PUBLISH_OVERHEAD + PUBACK_BYTES

    def room(self) -> int:
        return self.max_inflight - len(self._inflight) if self.connected else 0

    def send(self, seq: int, kind: str, payload: bytes) -> bool:
        """Hand one outbox message to paho (QoS 1); its seq comes back from `take_acks`."""
        if not self.connected:
            return False
        t = topic(self.config.fleet, self.config.device_id, kind)  # type: ignore[arg-type]
        with self._inflight_lock:
            info = self.client.publish(t, payload, qos=1)
            if info.rc not in (self.paho.MQTT_ERR_SUCCESS, self.paho.MQTT_ERR_NO_CONN):
                return False
            # paho keeps unacked QoS 1 messages and resends them itself after a reconnect.
            self._inflight[info.mid] = seq
        self.bytes_out += len(t) + len(payload) + PUBLISH_OVERHEAD + PUBACK_BYTES
        return True

    def take_acks(self) -> list[int]:
        """Seqs of outbox messages the broker acknowledged since the last call."""
        seqs = []
        with self._inflight_lock:
            while self._acks:
                seq = self._inflight.pop(self._acks.popleft(), None)
                if seq is not None:
                    seqs.append(seq)
        return seqs

    def take_delivered(self) -> list[int]:
        """Seqs the server acknowledged (stored, or had already) since the last call."""
        seqs = []
        while self._delivered:
            seqs.append(self._delivered.popleft())
        return seqs

    @property
    def inflight_seqs(self) -> set[int]:
        with self._inflight_lock:
            return set(self._inflight.values())
