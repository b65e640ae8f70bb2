"""One client connection of the agent's HTTP server: buffered input, request framing, unsent output.

The I/O thread reads a connection non-blockingly into its input buffer; once the buffer holds a
complete request (head, then `Content-Length` body bytes) the request is handed to the routes,
and the answer goes out non-blockingly through the connection's output buffer. Stalled or
half-sent clients hold a buffer, never a thread. Back-pressure: while a connection has unsent
output it is not read (a client that pipelines requests without reading the answers stops being
served until it reads), and answering pipelined requests pauses once `OUT_HIGH` bytes wait.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from edge_agent.http.wire import (
    CONTINUE,
    JSON,
    MAX_HEAD_BYTES,
    HeadError,
    answer_head,
    body_length,
    encode,
    parse_head,
)

if TYPE_CHECKING:
    from edge_agent.config import HttpConfig

log = logging.getLogger("edge_agent.http")

INLINE_BODY_BYTES = 8 * 1024  # predict/feedback bodies up to this run on the I/O thread
OUT_HIGH = 256 * 1024  # stop answering pipelined requests while this much output is unsent
RECV_BYTES = 65536
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
# How a request with a body is run once the body is in: on the loop, in the pool, or on the loop
# unless the body is large or the model slow.
INLINE, POOL, ADAPTIVE = 0, 1, 2

Job = Callable[[bytes], None]


class Routes(Protocol):
    """What answers a framed request (`edge_agent.http.routes.AgentRoutes`)."""

    def request(self, conn: Connection, method: str, path: str, headers: dict[str, str], version: str) -> None: ...


class Workers(Protocol):
    def submit(self, conn: Connection, job: Job, body: bytes, observe: bool) -> None: ...


class ConnectionLoop(Protocol):
    """What a connection uses of the I/O loop that owns it (`edge_agent.http.server.IoLoop`)."""

    now: float
    sel: selectors.BaseSelector
    conns: set[Connection]
    pool: Workers
    slow: bool
    http: HttpConfig
    routes: Routes

    def observe(self, seconds: float) -> None: ...


class Connection:
    """One client connection: buffered input, the request being framed, unsent output.

    Touched only by the I/O thread, except while `busy` (a worker runs its request and appends
    the answer to `out`; the loop does not touch the connection until the worker hands it back).
    """

    __slots__ = ("sock", "loop", "routes", "inbuf", "scan", "want", "job", "mode", "expect_continue", "out",
                 "out_len", "close", "eof", "busy", "events", "last", "closed")

    def __init__(self, sock: socket.socket, loop: ConnectionLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.routes = loop.routes
        self.inbuf = bytearray()
        self.scan = 0  # where to resume looking for the end of the head
        self.want = -1  # body bytes the pending `job` waits for; -1: waiting for a request head
        self.job: Job | None = None
        self.mode = INLINE
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
        if events & READ:
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
        elif events & WRITE and not self.flush():
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
            want = WRITE
        elif self.eof or (self.close and self.want < 0):
            # Nothing more will be answered: a half-sent request at EOF is dropped unanswered.
            self.drop()
            return
        else:
            want = READ
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
                        self.out.append(CONTINUE)
                        self.out_len += len(CONTINUE)
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
                    self.send(431, encode({"error": "bad_request", "message": "request headers over 64 KiB"}),
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
        try:
            method, path, version, headers = parse_head(head)
        except HeadError as exc:
            self.send(exc.status, encode({"error": "bad_request", "message": exc.message}), close=True)
            return
        conn = headers.get("connection", "").lower()
        self.close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
        self.routes.request(self, method, path, headers, version)

    def send(self, status: int, body: bytes, content_type: str = JSON, extra: str = "", close: bool = False) -> None:
        if close:
            self.close = True
        if self.close:
            extra += "Connection: close\r\n"
        tail = f"{len(body)}\r\n{extra}\r\n" if extra else f"{len(body)}\r\n\r\n"
        data = answer_head(status, content_type) + tail.encode("latin-1") + body
        self.out.append(data)
        self.out_len += len(data)

    def answer_500(self) -> None:
        self.want, self.job = -1, None
        self.send(500, encode({"error": "internal_error", "message": "the agent failed on this request; see its log"}),
                  close=True)

    def await_body(self, n: int, headers: dict[str, str], version: str, job: Job, mode: int) -> None:
        """Run `job` with the next `n` bytes once they are in (at once when they already are)."""
        self.want, self.job, self.mode = n, job, mode
        self.expect_continue = version == "HTTP/1.1" and headers.get("expect", "").lower() == "100-continue"

    def discard_body(self, headers: dict[str, str], version: str, answer: Job, mode: int = INLINE) -> None:
        """Read and drop the body (if it is one we would accept), then `answer`; a body we
        would not read closes the connection after the answer."""
        n = body_length(headers.get("content-length", "0"), headers)
        if 0 < n <= self.loop.http.max_body_bytes:
            self.await_body(n, headers, version, answer, mode)
            return
        if n:
            self.close = True
        self.run(answer, b"", mode)

    def run(self, job: Job, body: bytes, mode: int) -> None:
        loop = self.loop
        if mode == POOL or (mode == ADAPTIVE and (len(body) > INLINE_BODY_BYTES or loop.slow)):
            loop.pool.submit(self, job, body, mode == ADAPTIVE and len(body) <= INLINE_BODY_BYTES)
            self.busy = True  # handed back (busy = False) by the loop, after this call returns
            return
        if mode == ADAPTIVE:
            t0 = time.perf_counter()
            job(body)
            loop.observe(time.perf_counter() - t0)
        else:
            job(body)
