"""The broker as an outsider sees it: the retained `desired` of every device (read as the server
account with a real MQTT client) and whether a device login is accepted (a real CONNECT)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt


def retained_desired(config: Any, timeout: float = 30.0) -> dict[str, bytes]:
    """Every retained `desired` payload the broker holds, by device id (an empty payload is a
    cleared one), read as the server account.

    The broker queues a subscription's retained copies before anything published later to this
    client: a message sent to a second topic after the subscription arrives after all of them."""
    from fleet_server.mqtt_link import make_client

    client_id = f"chaos-retained-{os.getpid()}-{time.monotonic_ns()}"
    sentinel = f"ef/{config.fleet}/chaos/{client_id}"
    seen: dict[str, bytes] = {}
    done = threading.Event()

    def on_subscribe(c: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid == first[0]:
            c.subscribe(sentinel, qos=1)
        else:
            c.publish(sentinel, b"end", qos=1)

    def on_message(c: Any, userdata: Any, message: Any) -> None:
        if message.topic == sentinel:
            done.set()
        elif message.retain:  # what the broker kept, not a publish that happens to arrive now
            seen[message.topic.split("/")[3]] = bytes(message.payload)

    first: list[int] = [-1]
    client, kwargs = make_client(config, client_id)
    client.on_connect = lambda c, u, f, rc, p: first.__setitem__(
        0, c.subscribe(f"ef/{config.fleet}/d/+/desired", qos=1)[1])
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(**kwargs)
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise TimeoutError(f"the broker's retained desired states were not all read within {timeout:.0f} s")
        return dict(seen)
    finally:
        client.disconnect()
        client.loop_stop()


def login(host: str, port: int, device_id: str, password: str, timeout: float = 10.0) -> str:
    """Log in to the broker as a device (its own client id) and disconnect at once; returns the
    CONNACK's reason ("Success", "Not authorized", ...) or what went wrong."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=device_id,
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(device_id, password)
    answer: list[str] = []
    done = threading.Event()

    def on_connect(c: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        answer.append(str(reason_code))
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda c, u, f, rc, p: done.set()
    try:
        client.connect(host, port, keepalive=10)
    except OSError as exc:
        return f"no connection: {exc}"
    client.loop_start()
    try:
        if not done.wait(timeout):
            return f"no CONNACK within {timeout:.0f} s"
        return answer[0] if answer else "disconnected before CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
