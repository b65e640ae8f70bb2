"""Shared fixtures: real brokers on free loopback ports, temporary data dirs."""

from __future__ import annotations

import pytest

from tests.brokers import Broker


@pytest.fixture
def broker(tmp_path):
    """A fresh Mosquitto (anonymous, loopback, persistent) for one test."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()
