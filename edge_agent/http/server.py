"""The agent's HTTP server: one I/O thread (`selectors`: epoll on Linux) and a small worker pool.

The I/O thread accepts the connections of every listener (TCP and the Unix socket), reads them
non-blockingly (`connection.py`) and answers complete requests (`routes.py`). Nagle is off on TCP
sockets. A thread per connection (the earlier design) spent 60-100 µs more CPU per request with
8 busy keep-alive clients than with one, handing the GIL back and forth between the connection
threads; answering on the loop costs no hand-off at all. A connection silent for `idle_timeout_s`
(60 s: an idle keep-alive, a request that stalls half-sent, or a client that stops reading its
answers) is closed.

What runs on the loop and what does not. Validation and inference of a small request on a
typical model take tens of microseconds, less than handing it to another thread would cost, so
predict and feedback requests run on the loop while (a) the body is at most
`INLINE_BODY_BYTES` (8 KiB, about 120 rows: ~0.5 ms) and (b) the model is fast. Bodies above
that, every predict/feedback while the model is slow (most of the recent requests above
`SLOW_S`, 1 ms: onnxruntime releases the GIL, so a pool runs a slow model on several cores
while the loop keeps serving), and the GET endpoints (/v1/health counts the outbox under its
lock, /v1/model may read the data dir, /metrics imports prometheus_client on the first scrape)
go to a small worker pool (one thread per core, 2 to 4, started on first use). A connection
whose request is in the pool is not read until its answer is queued, so answers keep their
order. Pure-Python work in a worker still holds the GIL: a very large request delays the loop
by up to the interpreter's switch interval (5 ms) at a time instead of for its whole duration.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from edge_agent.http.connection import READ, Connection, Job, Routes
from edge_agent.http.routes import AgentRoutes

if TYPE_CHECKING:
    from edge_agent.agent import Agent
    from edge_agent.config import HttpConfig

log = logging.getLogger("edge_agent.http")

SLOW_S = 0.001  # a predict/feedback taking longer is "slow"; mostly slow ones -> the worker pool
LISTEN_BACKLOG = 128


class _Listener:
    """A listening socket on the loop: accepts until the backlog is empty."""

    def __init__(self, sock: socket.socket, loop: IoLoop, nodelay: bool) -> None:
        self.sock = sock
        self.loop = loop
        self.nodelay = nodelay

    def on_event(self, events: int) -> None:
        loop = self.loop
        for _ in range(64):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of file descriptors, most likely: stop accepting for a while
                log.warning("HTTP accept failed (%s); pausing accepts for 1 s", exc)
                loop.pause_accepting(self)
                return
            try:
                sock.setblocking(False)
                if self.nodelay:  # answers are small single writes: never wait for the client's ACK
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # the client is already gone
                sock.close()
                continue
            conn = Connection(sock, loop)
            loop.conns.add(conn)
            loop.sel.register(sock, READ, conn)
            conn.events = READ


class _Waker:
    """A socket pair: workers write a byte to wake the loop when an answer is ready."""

    def __init__(self, loop: IoLoop) -> None:
        self.loop = loop
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self.w.send(b"\0")

    def on_event(self, events: int) -> None:
        with contextlib.suppress(OSError):
            self.r.recv(4096)
        self.loop.resume_done()

    def close(self) -> None:
        self.r.close()
        self.w.close()


class _Pool:
    """A few worker threads for requests that must not hold up the loop (started on first use)."""

    def __init__(self, loop: IoLoop, size: int) -> None:
        self.loop = loop
        self.size = size
        self.jobs: queue.SimpleQueue[tuple[Connection, Job, bytes, bool] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def submit(self, conn: Connection, job: Job, body: bytes, observe: bool) -> None:
        if not self.threads:
            for i in range(self.size):
                t = threading.Thread(target=self.work, name=f"http-worker-{i}", daemon=True)
                t.start()
                self.threads.append(t)
        self.jobs.put((conn, job, body, observe))

    def work(self) -> None:
        loop = self.loop
        while (item := self.jobs.get()) is not None:
            conn, job, body, observe = item
            t0 = time.perf_counter()
            try:
                job(body)
            except Exception:
                log.exception("HTTP request failed")
                conn.answer_500()
            if observe:
                loop.observe(time.perf_counter() - t0)
            loop.finished(conn)

    def stop(self, timeout: float) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.threads.clear()


class IoLoop:
    """The I/O thread: listeners, connections, the worker pool's finished requests."""

    def __init__(self, routes: Routes, http: HttpConfig, idle_timeout_s: float) -> None:
        self.routes = routes
        self.http = http
        self.idle_timeout_s = idle_timeout_s
        self.sel = selectors.DefaultSelector()
        self.now = time.monotonic()
        self.conns: set[Connection] = set()
        self.listeners: list[_Listener] = []
        self.paused: list[_Listener] = []
        self.resume_accepting_at = 0.0
        self.done: deque[Connection] = deque()
        self.waker = _Waker(self)
        self.sel.register(self.waker.r, READ, self.waker)
        self.pool = _Pool(self, max(2, min(4, os.cpu_count() or 2)))
        # Saturating count of recent slow predict/feedback requests (up +1, down -1 per request):
        # at 8 the model counts as slow (requests go to the pool), back at 0 as fast again.
        self.slow_score = 0
        self.slow = False
        self.stopping = False

    def add_listener(self, sock: socket.socket, nodelay: bool) -> None:
        sock.setblocking(False)
        listener = _Listener(sock, self, nodelay)
        self.listeners.append(listener)
        self.sel.register(sock, READ, listener)

    def observe(self, seconds: float) -> None:
        """One predict/feedback's service time (loop or worker thread; races only blur the count)."""
        score = self.slow_score
        if seconds > SLOW_S:
            self.slow_score = score = min(16, score + 1)
            if score >= 8:
                self.slow = True
        elif score:
            self.slow_score = score = score - 1
            if not score:
                self.slow = False

    def finished(self, conn: Connection) -> None:
        """From a worker: `conn`'s answer is queued."""
        self.done.append(conn)
        self.waker.wake()

    def resume_done(self) -> None:
        done = self.done
        while done:
            conn = done.popleft()
            conn.busy = False
            if not conn.closed:
                conn.last = self.now
                try:
                    conn.pump()
                except Exception:
                    log.exception("HTTP loop error")
                    conn.drop()

    def pause_accepting(self, listener: _Listener) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(listener.sock)
        self.paused.append(listener)
        self.resume_accepting_at = self.now + 1.0

    def run(self) -> None:
        sel = self.sel
        tick = max(0.01, min(1.0, self.idle_timeout_s / 4))
        next_sweep = time.monotonic() + tick
        try:
            while not self.stopping:
                ready = sel.select(tick if (self.conns or self.paused) else None)
                self.now = now = time.monotonic()
                for key, events in ready:
                    try:
                        key.data.on_event(events)
                    except Exception:  # never let one connection take the loop down
                        log.exception("HTTP loop error")
                        if isinstance(key.data, Connection):
                            key.data.drop()
                if now >= next_sweep:
                    next_sweep = now + tick
                    self.sweep(now)
        finally:
            self.close_all()

    def sweep(self, now: float) -> None:
        limit = now - self.idle_timeout_s
        for conn in [c for c in self.conns if c.last < limit and not c.busy]:
            conn.drop()
        if self.paused and now >= self.resume_accepting_at:
            for listener in self.paused:
                self.sel.register(listener.sock, READ, listener)
            self.paused.clear()

    def close_all(self) -> None:
        for conn in list(self.conns):
            conn.drop()
        for listener in self.listeners:
            listener.sock.close()
        self.sel.close()
        self.waker.close()


class HttpApi:
    """The agent's HTTP listeners (TCP and/or Unix socket), served by one I/O thread."""

    # A connection silent this long (idle keep-alive, a request that stalls half-sent, a client
    # that stops reading its answers) is closed.
    idle_timeout_s = 60.0

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._address: tuple[str, int] | None = None
        self._unix_path: str | None = None
        self._loop: IoLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        return self._address

    def start(self) -> HttpApi:
        cfg = self.agent.config.http
        loop = IoLoop(AgentRoutes(self.agent), cfg, self.idle_timeout_s)
        try:
            if cfg.listen:
                host, _, port = cfg.listen.rpartition(":")
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((host or "127.0.0.1", int(port)))
                    sock.listen(LISTEN_BACKLOG)
                except BaseException:
                    sock.close()
                    raise
                loop.add_listener(sock, nodelay=True)
                bound_host, bound_port = sock.getsockname()[:2]
                self._address = (str(bound_host), int(bound_port))
            if cfg.unix_socket:
                if os.path.exists(cfg.unix_socket):
                    os.unlink(cfg.unix_socket)  # a stale socket from a previous run
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.bind(cfg.unix_socket)
                    os.chmod(cfg.unix_socket, 0o660)
                    sock.listen(LISTEN_BACKLOG)
                except BaseException:
                    sock.close()
                    raise
                self._unix_path = cfg.unix_socket
                # TCP_NODELAY does not exist on Unix sockets.
                loop.add_listener(sock, nodelay=False)
        except BaseException:
            loop.close_all()
            self._address = None
            raise
        self._loop = loop
        self._thread = threading.Thread(target=loop.run, name="http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listeners and every connection; requests in the pool get up to 5 s."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.stopping = True
        loop.waker.wake()
        thread.join(timeout=10)
        loop.pool.stop(timeout=5)
        if self._unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
        self._loop = self._thread = None
        self._address = None
