"""The simulated network: many MQTT links driven from one selector thread, and a download path
that corrupts or cuts off bundles in transit for devices with a download fault.

paho's per-client `loop()` does a `select()` on one socket per call; a thousand devices would
pay a thousand system calls per pass. `LinkPoller` registers every connected socket in one
selector and calls `loop_read` only where bytes arrived, `loop_write` only where paho has bytes
queued, and `loop_misc` (keepalive) once a second. Unconnected links go through
`MqttLink.service`, which owns reconnect backoff.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.link import MqttLink

log = logging.getLogger("firmware_sim.network")

MISC_INTERVAL_S = 1.0  # real seconds between keepalive checks of every link


class LinkPoller:
    """Network I/O for many `MqttLink`s in one thread (links must use link_mode="external")."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._sockets: dict[MqttLink, Any] = {}  # link -> registered socket object
        self._last_misc = 0.0

    def _sync(self, link: MqttLink) -> Any:
        """Keep the selector in step with the link's current socket (it changes on reconnect)."""
        sock = link.client.socket()
        old = self._sockets.get(link)
        if old is sock:
            return sock
        if old is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.selector.unregister(old)
            del self._sockets[link]
        if sock is not None:
            try:
                try:
                    self.selector.register(sock, selectors.EVENT_READ, link)
                except KeyError:
                    # The fd number was another link's, whose socket closed (a power cut, a cut-off)
                    # before that link was synced: drop the stale registration and take the number.
                    stale = self.selector.unregister(sock)
                    self._sockets.pop(stale.data, None)
                    self.selector.register(sock, selectors.EVENT_READ, link)
                self._sockets[link] = sock
            except (ValueError, OSError):
                return None
        return sock

    def forget(self, link: MqttLink) -> None:
        """Stop polling a link (its device crashed, went offline or stopped)."""
        old = self._sockets.pop(link, None)
        if old is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.selector.unregister(old)

    def poll(self, links: list[MqttLink], timeout: float) -> None:
        """One pass: connect what is due, read what arrived, write what is queued, keepalive."""
        for link in links:
            if self._sync(link) is None:
                link.service(0.0)  # reconnect when its backoff allows
                self._sync(link)
        if self._sockets:
            for key, _ in self.selector.select(timeout):
                link = key.data
                link.client.loop_read()
                self._sync(link)
        elif timeout > 0:
            time.sleep(timeout)  # nothing to wait on yet: do not spin
        now = time.monotonic()
        misc = now - self._last_misc >= MISC_INTERVAL_S
        if misc:
            self._last_misc = now
        for link in list(self._sockets):
            client = link.client
            if client.want_write():
                client.loop_write()
            if misc:
                client.loop_misc()
            self._sync(link)

    def close(self) -> None:
        self.selector.close()
        self._sockets.clear()


def cut_connection(link: MqttLink) -> None:
    """Reset a link's TCP connection without an MQTT DISCONNECT: the broker sees the device
    vanish and publishes its last will, as when a network drops."""
    sock = link.client.socket()
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class FaultyDownloads:
    """A loopback HTTP relay in front of the fleet server's bundle downloads.

    `url(original, mode)` gives the address a faulty device downloads from instead. `corrupt`
    flips one byte in the middle of the bundle (the agent's sha256 check must catch it);
    `truncate` drops the connection halfway through every download that starts from the first
    byte (the agent must resume it with a Range request). Authorization and Range headers are passed through unchanged.
    """

    def __init__(self) -> None:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                relay._relay(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="sim-downloads", daemon=True)
        self.thread.start()
        self.requests = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, original: str, mode: str) -> str:
        return f"{self.base}/{mode}?u={urllib.parse.quote(original, safe='')}"

    def _relay(self, h: BaseHTTPRequestHandler) -> None:
        self.requests += 1
        parts = urllib.parse.urlsplit(h.path)
        mode = parts.path.strip("/")
        target = urllib.parse.parse_qs(parts.query).get("u", [""])[0]
        headers = {k: v for k, v in h.headers.items() if k.lower() in ("authorization", "range", "user-agent")}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(target, headers=headers), timeout=30)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            h.send_response(exc.code)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        except (urllib.error.URLError, OSError):
            h.send_response(502)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        with resp:
            body = resp.read()
            start = 0
            content_range = resp.headers.get("Content-Range")
            if content_range:  # "bytes START-END/TOTAL"
                start = int(content_range.split()[1].split("-")[0])
            total = int(content_range.rsplit("/", 1)[1]) if content_range else len(body)
            if mode == "corrupt":
                middle = total // 2 - start
                if 0 <= middle < len(body):
                    body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
            h.send_response(resp.status)
            for name in ("Content-Range", "ETag", "Content-Type"):
                if resp.headers.get(name):
                    h.send_header(name, resp.headers[name])
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if mode == "truncate" and "Range" not in h.headers and len(body) > 1:
                h.wfile.write(body[: len(body) // 2])
                h.close_connection = True
                return
            h.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
