"""The local HTTP API: POST /v1/predict, /v1/feedback, GET /v1/health, /v1/model, /metrics.

HTTP/1.1 keep-alive with a small request parser of our own: the stdlib's BaseHTTPRequestHandler
parses every request's headers with the `email` package, which cost more CPU than validation and
inference together. Views only translate: decode the body, call `Agent.predict` (or
`Agent.feedback`), encode the answer. Nagle is off on TCP sockets; nothing is logged per request.

One I/O thread (`selectors`: epoll on Linux) accepts the connections of every listener (TCP and
the Unix socket) and reads them non-blockingly into per-connection buffers. Once a buffer holds
a complete request (head, then `Content-Length` body bytes) the request is answered, and the
answer goes out non-blockingly through a per-connection output buffer. A thread per connection
(the earlier design) spent 60-100 µs more CPU per request with 8 busy keep-alive clients than
with one, handing the GIL back and forth between the connection threads; answering on the loop
costs no hand-off at all. Stalled or half-sent clients hold a buffer, never a thread, so they
cannot block anyone; a connection silent for `idle_timeout_s` (60 s: an idle keep-alive, a
request that stalls half-sent, or a client that stops reading its answers) is closed.

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

Back-pressure: while a connection has unsent output it is not read (a client that pipelines
requests without reading the answers stops being served until it reads), and answering
pipelined requests pauses once 256 KiB of output waits.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from edge_agent.agent import Agent
from edge_agent.feedback import items_from_payload
from edge_agent.validation import RequestError, rows_from_payload

log = logging.getLogger("edge_agent.http")

_REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
            422: "Unprocessable Entity", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
JSON = "application/json"
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; more is refused with 431
INLINE_BODY_BYTES = 8 * 1024  # predict/feedback bodies up to this run on the I/O thread
SLOW_S = 0.001  # a predict/feedback taking longer is "slow"; mostly slow ones -> the worker pool
OUT_HIGH = 256 * 1024  # stop answering pipelined requests while this much output is unsent
RECV_BYTES = 65536
LISTEN_BACKLOG = 128
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEADS: dict[tuple[int, str], bytes] = {}  # status line + Content-Type, built once per pair
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
# How a request with a body is run once the body is in: on the loop, in the pool, or on the loop
# unless the body is large or the model slow.
_INLINE, _POOL, _ADAPTIVE = 0, 1, 2


def _head(status: int, content_type: str) -> bytes:
    head = _HEADS.get((status, content_type))
    if head is None:
        head = _HEADS[(status, content_type)] = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
            "Content-Length: "
        ).encode("latin-1")
    return head


Job = Callable[[bytes], None]


def body_length(value: str, headers: dict[str, str]) -> int:
    """A request's body length from its Content-Length, or -1 when the framing is ambiguous:
    anything but decimal digits (no sign, `_`, spaces inside or hex, which `int()` would take),
    or Content-Length together with Transfer-Encoding (RFC 9112 6.3: a request smuggling vector)."""
    value = value.strip()
    if "transfer-encoding" in headers or not (value.isascii() and value.isdigit()) or len(value) > 18:
        return -1
    return int(value)

class Connection:
    """One client connection: buffered input, the request being framed, unsent output.

    Touched only by the I/O thread, except while `busy` (a worker runs its request and appends
    the answer to `out`; the loop does not touch the connection until the worker hands it back).
    """

    __slots__ = ("sock", "loop", "agent", "inbuf", "scan", "want", "job", "mode", "expect_continue", "out",
                 "out_len", "close", "eof", "busy", "events", "last", "closed")

    def __init__(self, sock: socket.socket, loop: _Loop) -> None:
        self.sock = sock
        self.loop = loop
        self.agent = loop.agent
        self.inbuf = bytearray()
        self.scan = 0  # where to resume looking for the end of the head
        self.want = -1  # body bytes the pending `job` waits for; -1: waiting for a request head
        self.job: Job | None = None
        self.mode = _INLINE
        self.expect_continue = False
        self.out: list[bytes] = []
        self.out_len = 0
        self.close = False  # no request after the current one: answer it, then close
        self.eof = False  # the client sent everything it will send
        self.busy = False  # a worker holds the request
        self.events = 0  # what the selector watches for
        self.last = loop.now
        self.closed = False

    # ------------------------------------------------------------------ I/O (loop thread)

    def on_event(self, events: int) -> None:
        if events & _READ:
            try:
                data = self.sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.drop()
                return
            self.last = self.loop.now
            if not data:
                self.eof = True
            else:
                self.inbuf += data
        elif events & _WRITE and not self.flush():
            return
        self.pump()

    def pump(self) -> None:
        """Answer the complete requests buffered, send what is answered, settle what to watch."""
        while True:
            more = False
            if not self.busy and (self.want >= 0 or not self.close):
                try:
                    more = self.process()
                except Exception:  # a bug must not take the loop down: answer 500, close
                    log.exception("HTTP request failed")
                    self.answer_500()
            if self.busy:
                break  # a worker may be appending to `out`: flushed when it hands the connection back
            if self.out and not self.flush():
                return
            if not more or self.out or self.close:
                break
        if self.busy:
            want = 0
        elif self.out:
            want = _WRITE
        elif self.eof or (self.close and self.want < 0):
            # Nothing more will be answered: a half-sent request at EOF is dropped unanswered.
            self.drop()
            return
        else:
            want = _READ
        if want != self.events:
            sel = self.loop.sel
            if not want:
                sel.unregister(self.sock)
            elif not self.events:
                sel.register(self.sock, want, self)
            else:
                sel.modify(self.sock, want, self)
            self.events = want

    def flush(self) -> bool:
        """Send what the socket takes now; False when the connection failed (and is dropped)."""
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.drop()
            return False
        if sent:
            self.last = self.loop.now
        if sent == len(data):
            out.clear()
            self.out_len = 0
        else:
            self.out = [data[sent:]]
            self.out_len = len(data) - sent
        return True

    def drop(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.loop.sel.unregister(self.sock)
            self.events = 0
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.sock.close()
        self.loop.conns.discard(self)

    # ------------------------------------------------------------------ framing

    def process(self) -> bool:
        """Answer buffered requests until one is incomplete, in a worker, or closes the
        connection; True when it paused because OUT_HIGH bytes of output wait."""
        buf = self.inbuf
        # `close` (Connection: close, HTTP/1.0) ends the connection after the current request.
        while not self.busy and (self.want >= 0 or not self.close):
            if self.out_len >= OUT_HIGH:
                return True
            want = self.want
            if want >= 0:
                if len(buf) < want:
                    if self.expect_continue:
                        self.expect_continue = False
                        self.out.append(_CONTINUE)
                        self.out_len += len(_CONTINUE)
                    return False
                body = bytes(buf[:want])
                del buf[:want]
                job = self.job
                self.want, self.job, self.expect_continue = -1, None, False
                assert job is not None
                self.run(job, body, self.mode)
                continue
            if buf[:1] in (b"\r", b"\n"):
                # stray line ends between requests are allowed (RFC 9112 2.2)
                i = 0
                while i < len(buf) and buf[i] in (13, 10):
                    i += 1
                del buf[:i]
                self.scan = 0
            end = buf.find(b"\r\n\r\n", self.scan)
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self.send(431, _encode({"error": "bad_request", "message": "request headers over 64 KiB"}),
                              close=True)
                else:
                    self.scan = max(0, len(buf) - 3)
                return False
            head = buf[:end].decode("latin-1")
            del buf[: end + 4]
            self.scan = 0
            self.on_head(head)
        return False

    def on_head(self, head: str) -> None:
        lines = head.split("\r\n")
        words = lines[0].split()
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            status = 505 if len(words) == 3 and words[2].startswith("HTTP/") else 400
            self.send(status, _encode({"error": "bad_request", "message": f"bad request line {lines[0][:100]!r}"}),
                      close=True)
            return
        method, target, version = words
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self.send(400, _encode({"error": "bad_request", "message": f"bad header line {line[:100]!r}"}),
                          close=True)
                return
            headers[name.strip().lower()] = value.strip()
        conn = headers.get("connection", "").lower()
        self.close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
        path = target.split("?", 1)[0]
        if method == "POST":
            self.do_post(path, headers, version)
        elif method == "GET":
            self.do_get(path, headers, version)
        else:
            self.discard_body(headers, version, lambda _body: self.send(501, _encode(
                {"error": "not_implemented", "message": f"method {method[:20]} is not supported; use GET or POST"})))

    def send(self, status: int, body: bytes, content_type: str = JSON, extra: str = "", close: bool = False) -> None:
        if close:
            self.close = True
        if self.close:
            extra += "Connection: close\r\n"
        tail = f"{len(body)}\r\n{extra}\r\n" if extra else f"{len(body)}\r\n\r\n"
        data = _head(status, content_type) + tail.encode("latin-1") + body
        self.out.append(data)
        self.out_len += len(data)

    def answer_500(self) -> None:
        self.want, self.job = -1, None
        self.send(500, _encode({"error": "internal_error", "message": "the agent failed on this request; see its log"}),
                  close=True)

    def await_body(self, n: int, headers: dict[str, str], version: str, job: Job, mode: int) -> None:
        """Run `job` with the next `n` bytes once they are in (at once when they already are)."""
        self.want, self.job, self.mode = n, job, mode
        self.expect_continue = version == "HTTP/1.1" and headers.get("expect", "").lower() == "100-continue"

    def discard_body(self, headers: dict[str, str], version: str, answer: Job, mode: int = _INLINE) -> None:
        """Read and drop the body (if it is one we would accept), then `answer`; a body we
        would not read closes the connection after the answer."""
        n = body_length(headers.get("content-length", "0"), headers)
        if 0 < n <= self.agent.config.http.max_body_bytes:
            self.await_body(n, headers, version, answer, mode)
            return
        if n:
            self.close = True
        self.run(answer, b"", mode)

    def run(self, job: Job, body: bytes, mode: int) -> None:
        loop = self.loop
        if mode == _POOL or (mode == _ADAPTIVE and (len(body) > INLINE_BODY_BYTES or loop.slow)):
            loop.pool.submit(self, job, body, mode == _ADAPTIVE and len(body) <= INLINE_BODY_BYTES)
            self.busy = True  # handed back (busy = False) by the loop, after this call returns
            return
        if mode == _ADAPTIVE:
            t0 = time.perf_counter()
            job(body)
            loop.observe(time.perf_counter() - t0)
        else:
            job(body)

    # ------------------------------------------------------------------ views

    def error(self, exc: RequestError, close: bool = False) -> None:
        extra = 'WWW-Authenticate: Bearer realm="edgefleet-agent"\r\n' if exc.kind == "unauthorized" else ""
        self.send(exc.status, _encode(exc.to_dict()), extra=extra, close=close)

    def authorized(self, headers: dict[str, str], method: str) -> bool:
        token = self.agent.config.http.token
        if not token:
            return True
        given = headers.get("authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            return True
        self.agent.telemetry.record_error("unauthorized")
        # The body (if any) is unread: close the connection rather than parse it.
        self.error(RequestError("unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)"),
                   close=method == "POST")
        return False

    def do_get(self, path: str, headers: dict[str, str], version: str) -> None:
        if not self.authorized(headers, "GET"):
            return
        if path in ("/v1/health", "/v1/model", "/metrics"):
            self.discard_body(headers, version, lambda _body: self.get(path), _POOL)
        else:
            self.discard_body(headers, version, lambda _body: self.error(RequestError(
                "not_found", f"no endpoint {path[:100]}; see /v1/predict, /v1/feedback, /v1/health, /v1/model, /metrics")))

    def get(self, path: str) -> None:
        agent = self.agent
        if path == "/v1/health":
            health = agent.health()
            self.send(200 if health["status"] == "ok" else 503, _encode(health))
        elif path == "/v1/model":
            self.send(200, _encode(agent.model_info()))
        else:  # /metrics
            # Imported on the first scrape: most devices are never scraped.
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self.send(200, generate_latest(agent.registry), CONTENT_TYPE_LATEST)

    def do_post(self, path: str, headers: dict[str, str], version: str) -> None:
        if not self.authorized(headers, "POST"):
            return
        if path == "/v1/predict":
            self.json_body(headers, version, self.predict,
                           lambda exc: self.agent.telemetry.record_error(exc.kind, exc.feature))
        elif path == "/v1/feedback":
            self.json_body(headers, version, self.feedback, lambda _exc: self.agent.telemetry.record_feedback_rejected())
        else:
            self.discard_body(headers, version, lambda _body: self.error(
                RequestError("not_found", "POST only to /v1/predict or /v1/feedback")))

    def json_body(self, headers: dict[str, str], version: str, job: Job,
                  refused: Callable[[RequestError], None]) -> None:
        """Frame a JSON body for `job`, or refuse it (411, 413) without reading it."""
        length = headers.get("content-length")
        if length is None:
            self.send(411, _encode({"error": "length_required", "message": "send a Content-Length header"}), close=True)
            return
        n = body_length(length, headers)
        limit = self.agent.config.http.max_body_bytes
        if n < 0:
            self.close = True  # the framing is unknown: the connection cannot go on
            exc = RequestError("bad_request", f"Content-Length must be decimal digits alone, without "
                               f"Transfer-Encoding; got {length[:40]!r}")
            refused(exc)
            self.error(exc)
            return
        if n > limit:
            # Not read: the connection cannot go on.
            self.close = True
            exc = RequestError("body_too_large", f"body of {n} bytes; at most {limit} are accepted")
            refused(exc)
            self.error(exc)
            return
        self.await_body(n, headers, version, job, _ADAPTIVE)

    @staticmethod
    def decode(body: bytes) -> Any:
        try:
            return _decode(body)
        except msgspec.DecodeError as exc:
            raise RequestError("malformed_json", f"the body is not valid JSON: {exc}") from exc
        except RecursionError:  # msgspec recurses per nesting level: `[[[[...` a few thousand deep
            raise RequestError("malformed_json", "the body's JSON is nested too deeply; "
                               "rows are lists or objects of plain values") from None
        except UnicodeDecodeError as exc:  # msgspec raises this (not DecodeError) for a non-UTF-8 string
            raise RequestError("malformed_json", f"the body is not UTF-8: {exc}") from None

    def predict(self, body: bytes) -> None:
        agent = self.agent
        try:
            rows = rows_from_payload(self.decode(body), agent.config.http.max_rows)
        except RequestError as exc:
            agent.telemetry.record_error(exc.kind, exc.feature)
            self.error(exc)
            return
        try:
            result = agent.predict(rows)
        except RequestError as exc:
            self.error(exc)
            return
        out = result.output
        answer: dict[str, Any] = {"model": result.model, "version": result.version, "predictions": out.primary,
                                  "ids": result.ids}
        if out.probabilities is not None:
            answer["probabilities"] = out.probabilities
            answer["classes"] = result.classes
        if out.labels is not None and out.values is not None:
            answer["scores"] = out.values
        self.send(200, _encode(answer))

    def feedback(self, body: bytes) -> None:
        agent = self.agent
        try:
            items = items_from_payload(self.decode(body))
        except RequestError as exc:
            agent.telemetry.record_feedback_rejected()
            self.error(exc)
            return
        try:
            result = agent.feedback(items)  # counts its own refusals
        except RequestError as exc:
            self.error(exc)
            return
        self.send(200, _encode(result.to_dict()))


class _Listener:
    """A listening socket on the loop: accepts until the backlog is empty."""

    def __init__(self, sock: socket.socket, loop: _Loop, nodelay: bool) -> None:
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
            loop.sel.register(sock, _READ, conn)
            conn.events = _READ


class _Waker:
    """A socket pair: workers write a byte to wake the loop when an answer is ready."""

    def __init__(self, loop: _Loop) -> None:
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

    def __init__(self, loop: _Loop, size: int) -> None:
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


class _Loop:
    """The I/O thread: listeners, connections, the worker pool's finished requests."""

    def __init__(self, agent: Agent, idle_timeout_s: float) -> None:
        self.agent = agent
        self.idle_timeout_s = idle_timeout_s
        self.sel = selectors.DefaultSelector()
        self.now = time.monotonic()
        self.conns: set[Connection] = set()
        self.listeners: list[_Listener] = []
        self.paused: list[_Listener] = []
        self.resume_accepting_at = 0.0
        self.done: deque[Connection] = deque()
        self.waker = _Waker(self)
        self.sel.register(self.waker.r, _READ, self.waker)
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
        self.sel.register(sock, _READ, listener)

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
                self.sel.register(listener.sock, _READ, listener)
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
        self._loop: _Loop | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        return self._address

    def start(self) -> HttpApi:
        cfg = self.agent.config.http
        loop = _Loop(self.agent, self.idle_timeout_s)
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
