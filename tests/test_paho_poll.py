"""MQTT clients in a process that holds more than 1024 descriptors (paho's select() limit)."""

from __future__ import annotations

import os
import select
import socket

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent import paho_poll
from tests.brokers import wait_until


@pytest.fixture
def high_descriptors():
    """Enough open descriptors that the next socket is numbered above 1024."""
    held = []
    while True:
        fd = os.open(os.devnull, os.O_RDONLY)
        held.append(fd)
        if fd > 1100:
            break
    yield
    for fd in held:
        os.close(fd)


def test_poll_select_takes_descriptors_select_refuses(high_descriptors):
    a, b = socket.socketpair()
    try:
        assert a.fileno() >= 1024
        with pytest.raises(ValueError):
            select.select([a], [], [], 0)
        stand_in = paho_poll.PollSelect()
        assert stand_in.select([a], [a], [], 0) == ([], [a], [])
        b.send(b"x")
        assert stand_in.select([a], [], [], 1.0) == ([a], [], [])
        b.close()
        readable, _, _ = stand_in.select([a], [], [], 1.0)  # a hang-up reads as readable, as with select
        assert readable == [a]
    finally:
        a.close()
        b.close()


def test_select_stand_in_answers_like_select_on_bad_arguments():
    stand_in = paho_poll.PollSelect()
    with pytest.raises(TypeError):
        stand_in.select([None], [], [], 0)
    with pytest.raises(ValueError):
        stand_in.select([-1], [], [], 0)
    assert stand_in.error is select.error  # the rest is the real module


def test_a_client_connects_and_receives_with_descriptors_above_1024(broker, high_descriptors):
    paho_poll.install(mqtt)
    got = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="many-fds", protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, m: got.append(m.payload)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("t/#", qos=1)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        wait_until(client.is_connected, 10, message="connected with a descriptor above 1024")
        assert client.socket().fileno() >= 1024
        wait_until(lambda: client.publish("t/x", b"hello", qos=1).rc == 0 and got, 10, interval=0.2,
                   message="its own message back")
        assert got[0] == b"hello"
    finally:
        client.disconnect()
        client.loop_stop()
