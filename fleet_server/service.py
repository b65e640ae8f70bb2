"""Composition root: build the services once (`bootstrap`) and run the whole server (`FleetServer`).

`FleetServer` starts, in order, the managed broker (unless external), the MQTT publisher, the
ingest worker, the background loops and the waitress HTTP server, and stops them in reverse.
Tests and `edgefleet server run` use the same class.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fleet_server.auth import PasswordChecker
from fleet_server.broker import ManagedBroker
from fleet_server.config import ServerConfig
from fleet_server.context import Services
from fleet_server.login_limiter import LoginLimiter
from fleet_server.mqtt_link import Publisher
from fleet_server.storage.open import open_storage

log = logging.getLogger(__name__)


def bootstrap(config: ServerConfig, *, clock: Callable[[], float] = time.time) -> Services:
    """Open (and migrate) storage and build the services; starts no threads or processes."""
    config.ensure_dirs()
    return Services(
        config=config,
        storage=open_storage(config.storage_location),
        clock=clock,
        passwords=PasswordChecker(),
        rollouts_lock=threading.RLock(),
        login_limiter=LoginLimiter(),
    )


class Loop:
    """A named background thread calling `fn` every `interval` seconds until stopped."""

    def __init__(self, name: str, interval: float, fn: Callable[[], Any]) -> None:
        self.name, self.interval, self.fn = name, interval, fn
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.fn()
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
        self.config = config
        self.mqtt = mqtt
        self.svc = bootstrap(config, clock=clock)
        self.http, self.ingest_enabled, self.loops_enabled = http, ingest, loops
        self.ingest = None
        self.notifier = None
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
            svc.broker = ManagedBroker(self.config, svc.storage)
            svc.broker.start()
        if self.mqtt:
            svc.publisher = Publisher(self.config)
            svc.publisher.start()
        if self.mqtt and self.ingest_enabled:
            self.ingest = IngestWorker(self.config, svc.storage, clock=svc.clock)
            self.ingest.start()
        if self.loops_enabled:
            self.notifier = Notifier(svc)
            self.notifier.start()
            notifier = self.notifier
            self.loops.append(
                Loop("alerts", self.config.alert_interval_s, lambda: notifier.submit(evaluate_closed(svc)))
            )
            if svc.publisher is not None:
                from fleet_server.rollouts import reconcile

                self.loops.append(Loop("rollouts", self.config.rollout_interval_s, lambda: reconcile(svc)))
            if svc.broker is not None:
                self.loops.append(Loop("broker-sync", self.config.broker_sync_interval_s, svc.broker.reload_if_changed))
            for loop in self.loops:
                loop.start()
        if self.http:
            self._start_http()
        return self

    def _start_http(self) -> None:
        from waitress import create_server

        from fleet_server.app import create_app

        self.app = create_app(self.config, services=self.svc)
        host, port = self.config.listen_host_port
        if self.config.serves_https:
            from fleet_server.tls import HttpsServer

            cert, key, _ = self.config.tls_files
            self.https = HttpsServer(self.app, host, port, cert, key, threads=self.config.threads).start()
            return
        # poll(), not select(): a process with more than 1024 open files (a simulated fleet, a busy
        # server) would hand select() descriptors it cannot watch.
        self.wsgi = create_server(self.app, host=host, port=port, threads=self.config.threads, ident="edgefleet",
                                  asyncore_use_poll=True)
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
        if self.notifier is not None:
            self.notifier.stop()
        if self.ingest is not None:
            self.ingest.stop()
        if self.svc.publisher is not None:
            self.svc.publisher.stop()
        if self.svc.broker is not None:
            self.svc.broker.stop()
        self.svc.storage.close()

    def wait(self) -> None:
        self._stopped.wait()

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
