"""Shared fixtures: real brokers on free loopback ports, temporary data dirs."""

from __future__ import annotations

import pytest

# Helper modules that test modules import or name in `pytest_plugins`: rewrite their asserts
# too (registered before anything imports them).
pytest.register_assert_rewrite(
    "tests.agent_fixtures", "tests.brokers", "tests.console_fixtures", "tests.model_fixtures", "tests.server_fixtures",
    "tests.sim_fixtures", "tests.postgres", "tests.postgres_fixtures",
)

import paho.mqtt.client  # noqa: E402

from edge_agent import paho_poll  # noqa: E402
from tests import leaks  # noqa: E402
from tests.brokers import Broker  # noqa: E402 - after the registration above
from tests.leaks import no_leftovers  # noqa: E402, F401 - every module: nothing left running after it
from tests.postgres_fixtures import backend, pg_cluster, pg_url  # noqa: E402, F401 - fixtures for every module


@pytest.fixture
def broker(tmp_path):
    """A fresh Mosquitto (anonymous, loopback, persistent) for one test."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


# The tests' own MQTT clients too: a long run may hold more than 1024 descriptors.
paho_poll.install(paho.mqtt.client)


def pytest_sessionfinish(session, exitstatus):
    leaks.remember_exit_status(exitstatus)


def pytest_unconfigure(config):
    leaks.exit_if_threads_would_hang()
