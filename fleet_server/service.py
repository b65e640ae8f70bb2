"""Composition root: build the services once (`bootstrap`) and run the whole server (`FleetServer`).

`FleetServer` starts, in order, the managed broker (unless external), the MQTT publisher, the
ingest worker, leadership and the node's heartbeat, the background loops and the waitress HTTP
server, and stops them in reverse. Tests and `edgefleet server run` use the same class.

Several nodes may run on one PostgreSQL database (docs/deployment.md): every node serves the API
and ingests; the singleton work (rollout controller, alert evaluation, the ingest worker's
maintenance pass, reconciling an external broker's accounts) runs only on the node that holds
leadership (`fleet_server.leadership`), which the root builds and hands to them.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fleet_server.auth import PasswordChecker
from fleet_server.broker import BrokerSync, ManagedBroker
from fleet_server.broker_accounts import make_accounts
from fleet_server.config import ServerConfig
from fleet_server.context import Services
from fleet_server.leadership import AdvisoryLockLeadership, FencedPublisher, Leadership, SoleLeader
from fleet_server.login_limiter import LoginLimiter
from fleet_server.mqtt_link import Publisher
from fleet_server.storage.open import backend, open_storage

log = logging.getLogger(__name__)

# On a database server several ingest processes share `$share/ingest`. Mosquitto hands a shared
# subscription's messages to every member that has a session, online or not, and queues an
# offline member's share until it returns or its session expires; a node that is gone for good
# would keep its share for session_expiry_s (a week by default). So on PostgreSQL an ingest
# session outlives its process by at most this: a node restarted within it gets its unacknowledged
# messages again from the broker; after it, they are dropped and the devices resend what no one
# acknowledged (the end-to-end `ack`). A smaller session_expiry_s in server.toml applies as is.
SHARED_INGEST_SESSION_EXPIRY_S = 30


def bootstrap(config: ServerConfig, *, clock: Callable[[], float] = time.time) -> Services:
    """Open (and migrate) storage and build the services; starts no threads or processes."""
    config.ensure_dirs()
    if backend(config.storage_location) == "postgresql" and config.worker_id == "0":
        # Nodes on one database must not share an MQTT client id (each would take the other's
        # session over) nor an ingest statistics row: the default worker id becomes the node id.
        from fleet_server.cluster import node_id

        config = replace(config, worker_id=node_id(config.data_dir))
    return Services(
        config=config,
        storage=open_storage(config.storage_location),
        clock=clock,
        passwords=PasswordChecker(),
        rollouts_lock=threading.RLock(),
        login_limiter=LoginLimiter(),
        leadership=make_leadership(config),
        accounts=make_accounts(config),
    )


def make_leadership(config: ServerConfig) -> Leadership:
    """SQLite: the one node leads. PostgreSQL: an advisory lock, checked twice per loop interval of
    the fastest singleton loop, so a takeover happens within one such interval of a leader's loss."""
    url = config.storage_location
    if backend(url) != "postgresql":
        return SoleLeader()
    fastest = min(config.rollout_interval_s, config.alert_interval_s)
    return AdvisoryLockLeadership(url, check_s=max(0.05, min(fastest, 2.0) / 2), name=config.worker_id)


def ingest_config(config: ServerConfig) -> ServerConfig:
    """The ingest worker's settings: on a database several nodes share, a short MQTT session."""
    if backend(config.storage_location) != "postgresql":
        return config
    return replace(config, session_expiry_s=min(config.session_expiry_s, SHARED_INGEST_SESSION_EXPIRY_S))


class Loop:
    """A named background thread calling `fn` every `interval` seconds until stopped.

    With `leadership`, a singleton loop: each pass runs only while this node leads, inside
    `leading_pass()` (leadership confirmed just before; publishing refused once lost)."""

    def __init__(self, name: str, interval: float, fn: Callable[[], Any], *,
                 leadership: Leadership | None = None) -> None:
        self.name, self.interval, self.fn, self.leadership = name, interval, fn, leadership
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.passes = 0

    def run_once(self) -> bool:
        """One pass (when leading, for a singleton loop); True when it ran."""
        if self.leadership is None:
            self.fn()
            self.passes += 1
            return True
        with self.leadership.leading_pass() as leading:
            if leading:
                self.fn()
                self.passes += 1
            return leading

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:
                log.exception("background loop %s failed; it keeps running", self.name)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


class FleetServer:
    """The whole server in one process: broker (managed), HTTP API, ingest and loops."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        http: bool = True,
        ingest: bool = True,
        loops: bool = True,
        mqtt: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.mqtt = mqtt
        self.svc = bootstrap(config, clock=clock)
        self.config = self.svc.config  # as bootstrap settled it (a node's worker id on PostgreSQL)
        self.http, self.ingest_enabled, self.loops_enabled = http, ingest, loops
        self.ingest = None
        self.notifier = None
        self.node = None  # fleet_server.cluster.Node once started (HTTP or loops)
        self.loops: list[Loop] = []
        self.wsgi = None
        self.https = None  # fleet_server.tls.HttpsServer when the API is served over TLS
        self._wsgi_thread: threading.Thread | None = None
        self.app = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.config.listen_host_port
        if self.wsgi is not None:
            port = self.wsgi.effective_port
        if self.https is not None:
            port = self.https.port
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.config.serves_https else 'http'}://{host}:{port}"

    def start(self) -> FleetServer:
        from fleet_server.alerts_service import Notifier, evaluate_closed
        from fleet_server.ingest import IngestWorker

        svc = self.svc
        # Ingest allocates many short-lived objects per message; the default GC thresholds make
        # full collections over every long-lived object run hundreds of times a second (measured:
        # msgspec decoding 3x slower). Freeze what exists and collect less often.
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
        if self.mqtt and self.config.managed_broker:
            svc.broker = ManagedBroker(self.config, svc.storage, accounts=svc.accounts)
            svc.broker.start()
        if self.mqtt:
            publisher = Publisher(self.config)
            publisher.start()
            svc.publisher = FencedPublisher(publisher, svc.leadership)  # type: ignore[assignment]
        if self.mqtt and self.ingest_enabled:
            # Maintenance (compaction, purges, retention) is singleton work: a node runs it while it
            # leads; a `server ingest` process (no HTTP, no loops: not a node) never does.
            node = self.loops_enabled or self.http
            self.ingest = IngestWorker(ingest_config(self.config), svc.storage, clock=svc.clock,
                                       maintains=svc.leadership.is_leader if node else lambda: False)
            self.ingest.start()
        if self.loops_enabled or self.http:
            self._start_node()
        if self.loops_enabled:
            self.notifier = Notifier(svc)
            self.notifier.start()
            notifier = self.notifier
            lead = svc.leadership
            loops = [Loop("alerts", self.config.alert_interval_s,
                                   lambda: notifier.submit(evaluate_closed(svc)), leadership=lead)]
            if svc.publisher is not None:
                from fleet_server.rollouts import reconcile

                loops.append(Loop("rollouts", self.config.rollout_interval_s, lambda: reconcile(svc),
                                  leadership=lead))
            if svc.broker is not None or svc.publisher is not None:
                # Not a singleton loop: the managed broker is this node's own process (supervised,
                # its accounts in step). Its singleton parts run inside a leader pass: reconciling an
                # external broker's accounts, republishing desired states after a broker restart.
                loops.append(Loop("broker-sync", self.config.broker_sync_interval_s, BrokerSync(svc)))
            for loop in loops:
                loop.start()
            self.loops.extend(loops)
        if self.http:
            self._start_http()
        return self

    def _start_node(self) -> None:
        """Leadership and the heartbeat that lists this node in `GET /api/v1/cluster`."""
        from fleet_server.cluster import Node, node_id

        svc = self.svc
        svc.leadership.start()
        interval = max(0.05, min(self.config.stats_interval_s, 5.0))
        self.node = svc.node = Node(svc.storage, svc.leadership, node_id(self.config.data_dir), self.url, interval)
        try:
            self.node.beat()
        except Exception:
            log.exception("first heartbeat failed; the heartbeat loop retries")
        heartbeat = Loop("heartbeat", interval, self.node.beat)
        heartbeat.start()
        self.loops.append(heartbeat)

    def _start_http(self) -> None:
        from fleet_server.app import create_app
        from fleet_server.body_gate import BodyGate, gated_server

        self.app = create_app(self.config, services=self.svc)
        host, port = self.config.listen_host_port
        if self.config.serves_https:
            from fleet_server.tls import HttpsServer

            cert, key, _ = self.config.tls_files
            self.https = HttpsServer(self.app, host, port, cert, key, threads=self.config.threads).start()
            return
        # poll(), not select(): a process with more than 1024 open files (a simulated fleet, a busy
        # server) would hand select() descriptors it cannot watch.
        # The body gate answers 413/401 from a request's headers, before waitress buffers its body.
        self.wsgi = gated_server(self.app, BodyGate(self.svc.storage, self.svc.clock), host=host, port=port,
                                 threads=self.config.threads, ident="edgefleet", asyncore_use_poll=True)
        self._wsgi_thread = threading.Thread(target=self.wsgi.run, name="waitress", daemon=True)
        self._wsgi_thread.start()

    def stop(self) -> None:
        """Stop everything, newest first; safe to call twice."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.https is not None:
            self.https.stop()
        if self.wsgi is not None:
            # waitress has no public shutdown: finish the worker threads' current requests,
            # then close the sockets, which ends run()'s loop (as webtest's StopableWSGIServer).
            self.wsgi.task_dispatcher.shutdown(timeout=5)
            waitress_log = logging.getLogger("waitress")
            level = waitress_log.level
            waitress_log.setLevel(logging.CRITICAL)  # late keep-alive channels log harmless errors
            try:
                for channel in list(self.wsgi._map.values()):
                    channel.handle_close()
                if self._wsgi_thread:
                    self._wsgi_thread.join(5)
            finally:
                waitress_log.setLevel(level)
        for loop in reversed(self.loops):
            loop.stop()
        self.svc.leadership.stop()
        if self.notifier is not None:
            self.notifier.stop()
        if self.ingest is not None:
            self.ingest.stop()
        if self.svc.publisher is not None:
            self.svc.publisher.stop()
        if self.svc.broker is not None:
            self.svc.broker.stop()
        self.svc.close()

    def wait(self) -> None:
        self._stopped.wait()

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
