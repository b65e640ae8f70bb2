"""What views, MQTT callbacks and loops share: built once by `fleet_server.service.bootstrap`.

A leaf module: it names the collaborators (storage interface, clock, publisher, locks) with their
types and imports no service, so every module can take a `Services` without importing the root.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fleet_server.auth import PasswordChecker
from fleet_server.config import ServerConfig
from fleet_server.leadership import Leadership, SoleLeader
from fleet_server.login_limiter import LoginLimiter
from fleet_server.storage import Storage

if TYPE_CHECKING:
    from fleet_server.broker import ManagedBroker
    from fleet_server.broker_accounts import DynsecAccounts
    from fleet_server.cluster import Node
    from fleet_server.mqtt_link import Publisher

log = logging.getLogger(__name__)


@dataclass
class Services:
    """The server's shared collaborators, each named and typed; the root builds and passes it in."""

    config: ServerConfig
    storage: Storage
    clock: Callable[[], float] = time.time
    publisher: Publisher | None = None
    broker: ManagedBroker | None = None
    # Device accounts on the broker's dynamic-security plugin (None in password-file mode): every
    # process pushes its own registry changes (fleet_server.broker_accounts).
    accounts: DynsecAccounts | None = None
    passwords: PasswordChecker = field(default_factory=PasswordChecker)
    # One rollout decision at a time: operator actions and the reconcile loop share this lock.
    rollouts_lock: threading.RLock = field(default_factory=threading.RLock)
    login_limiter: LoginLimiter = field(default_factory=LoginLimiter)
    # Which node runs the singleton loops (fleet_server.leadership); one SQLite node always leads.
    leadership: Leadership = field(default_factory=SoleLeader)
    node: Node | None = None  # this node's heartbeat, when it runs as a server node
    # What the rollout controller keeps between its passes while this node leads
    # (fleet_server.rollouts.controller.Memory): a steady pass then reads only what changed.
    rollout_memory: Any = None

    def close(self) -> None:
        """Release what this process holds: the broker-accounts connection (its MQTT thread) and
        the storage. The root's own parts (broker, publisher) are stopped by whoever started them."""
        if self.accounts is not None:
            self.accounts.close()
        self.storage.close()

    def devices_changed(self) -> None:
        """The registry changed: a managed broker reloads its password file at once."""
        if self.broker is not None:
            try:
                self.broker.reload_if_changed()
            except OSError:
                log.exception("could not reload the managed broker")
