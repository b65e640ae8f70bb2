"""The server's MQTT connections (server account): a client factory and the desired/alert publisher."""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.paho_poll import install as poll_select
from edge_agent.protocol import TOPIC_ROOT, DesiredState, topic
from fleet_server.config import SERVER_USERNAME, ServerConfig

log = logging.getLogger(__name__)
poll_select(mqtt)  # a server has many sockets open: paho's select() stops at descriptor 1024


class BufferedSocket:
    """A plain TCP socket whose `recv` serves paho from a 64 KiB read buffer.

    paho reads each packet with several small `recv` calls (type byte, length bytes one at a
    time, body) and a `select` before each packet: ~5 system calls per message, most of its
    network thread's time at thousands of messages a second. paho skips the wait in `select`
    while `pending()` reports buffered bytes (the hook it has for TLS sockets), so one `recv`
    here serves dozens of messages.
    """

    def __init__(self, sock: socket.socket, size: int = 65536) -> None:
        self._sock = sock
        self._size = size
        self._data = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            data = self._sock.recv(max(bufsize, self._size))  # BlockingIOError passes through
            if len(data) <= bufsize:
                return data
            self._data, self._pos = data, 0
        out = self._data[self._pos:self._pos + bufsize]
        self._pos += len(out)
        return out

    def pending(self) -> int:
        return len(self._data) - self._pos

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Client(mqtt.Client):
    def _create_socket(self):  # paho's socket factory; plain TCP only (TLS buffers already)
        sock = super()._create_socket()
        return BufferedSocket(sock) if type(sock) is socket.socket else sock


def make_client(
    config: ServerConfig, client_id: str, *, persistent: bool = False, manual_ack: bool = False
) -> tuple[mqtt.Client, dict[str, Any]]:
    """A paho MQTT 5 client logged in as the server account; returns (client, connect kwargs)."""
    parts = urlsplit(config.broker_url)
    client = _Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    client.username_pw_set(SERVER_USERNAME, config.server_mqtt_password())
    if parts.scheme == "mqtts":
        client.tls_set(ca_certs=config.mqtt_ca_file or None)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(0.2, 5)
    props = None
    if persistent:
        # A persistent session: the broker queues messages while this process is down, and
        # redelivers unacknowledged ones, so a kill -9 loses nothing that was acknowledged.
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = config.session_expiry_s
    connect_kwargs = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or (8883 if parts.scheme == "mqtts" else 1883),
        "keepalive": 30,
        "clean_start": not persistent,
        "properties": props,
    }
    return client, connect_kwargs


_PUBACK = struct.Struct("!BBH")  # MQTT 5 PUBACK with reason "success" omitted: type, length 2, mid
_PUBACK_TYPE = PacketTypes.PUBACK << 4


def ack_all(client: mqtt.Client, mids: Sequence[int]) -> None:
    """Acknowledge many QoS 1 messages of a manual-ack client at once.

    `client.ack` queues one packet per message, and paho wakes its network thread and makes
    one `send` per packet: thousands of system calls a second at full ingest. These PUBACKs go
    out as one write through paho's own packet queue (falling back to `ack` one by one if a
    paho version lacks it); the broker reads them as separate PUBACKs either way.
    """
    queue_packet = getattr(client, "_packet_queue", None)
    if queue_packet is None:
        for mid in mids:
            client.ack(mid, 1)
    elif mids:
        queue_packet(_PUBACK_TYPE, b"".join([_PUBACK.pack(_PUBACK_TYPE, 2, mid) for mid in mids]), 0, 1)


def _varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining length)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


_PUBLISH_QOS0 = PacketTypes.PUBLISH << 4


def publish_all(client: mqtt.Client, messages: Sequence[tuple[str, bytes]]) -> None:
    """Publish many small QoS 0 messages of an MQTT 5 client at once, as one write.

    `client.publish` costs ~20 µs of Python a message, and at QoS 1 as much again for each PUBACK
    coming back; delivery acknowledgements go out once per device and batch, so that would be
    most of ingest's CPU per window. These PUBLISH packets (no properties) are written together
    through paho's packet queue (or one by one with `publish` if a paho version lacks it).
    """
    queue_packet = getattr(client, "_packet_queue", None)
    if queue_packet is None:
        for name, payload in messages:
            client.publish(name, payload, qos=0)
        return
    packets = []
    for name, payload in messages:
        topic_bytes = name.encode()
        body = struct.pack("!H", len(topic_bytes)) + topic_bytes + b"\x00" + payload  # \x00: no properties
        packets.append(bytes((_PUBLISH_QOS0,)) + _varint(len(body)) + body)
    if packets:
        # Queued as an opaque write (command 0): paho runs no QoS 0 publish bookkeeping for it.
        queue_packet(0, b"".join(packets), 0, 0)


class Publisher:
    """Publishes retained `desired` states and fleet alerts as the server account (QoS 1)."""

    def __init__(self, config: ServerConfig, client_id: str = "") -> None:
        self.config = config
        self.client, self._connect = make_client(config, client_id or f"ef-server-pub-{config.worker_id}")
        self._connected = threading.Event()
        self.connects = 0  # successful connections: a new one after the first means the broker may have restarted
        self._desired_signer: Any = None  # the desired-state key, read (or created) on first use
        self._issued: dict[str, float] = {}  # device -> issued_at of the last desired published
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a, **k: self._connected.clear()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("publisher MQTT connect refused: %s", reason_code)
        else:
            self.connects += 1
            self._connected.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout: float = 10.0) -> None:
        self.client.connect_async(**self._connect)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            log.warning("publisher not connected after %.0fs; messages are queued until it is", timeout)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic_name: str, payload: bytes, retain: bool = False, wait: float | None = 5.0) -> bool:
        info = self.client.publish(topic_name, payload, qos=1, retain=retain)
        if wait:
            try:
                info.wait_for_publish(wait)
            except (RuntimeError, ValueError):
                return False
        return info.is_published()

    def publish_desired(self, device_id: str, desired: DesiredState) -> bool:
        """Set a device's desired state (retained, so an offline device converges on reconnect),
        signed with the server's desired-state key: devices refuse anything else."""
        if self._desired_signer is None:
            from fleet_server.desired_signing import DesiredSigner

            self._desired_signer = DesiredSigner.for_secrets_dir(self.config.secrets_dir)
        # Devices refuse a desired issued before (or, if different, at the same time as) the last
        # they accepted: two publishes within one clock tick must still be ordered.
        last = self._issued.get(device_id)
        if last is not None and desired.issued_at <= last:
            desired = msgspec.structs.replace(desired, issued_at=last + 0.001)
        self._issued[device_id] = desired.issued_at
        payload = self._desired_signer.payload(desired)
        return self.publish(topic(self.config.fleet, device_id, "desired"), payload, retain=True)

    def clear_desired(self, device_id: str) -> bool:
        return self.publish(topic(self.config.fleet, device_id, "desired"), b"", retain=True)

    def publish_alert(self, payload: dict[str, Any]) -> bool:
        """Alert transitions on `ef/{fleet}/alerts` (not retained: a stream for retraining triggers)."""
        return self.publish(alerts_topic(self.config.fleet), msgspec.json.encode(payload), wait=2.0)


def alerts_topic(fleet: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/alerts"
