"""The device password goes only to the configured server's origin.

Two real HTTP servers on loopback: the configured fleet server and another origin (a different
port on the same host is another origin). Each records the headers it was sent.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge_agent.download import DownloadRequest, OriginRefused, check_origin, download

BODY = b"bundle bytes " * 1000
AUTH = "Basic " + base64.b64encode(b"dev-1:secret").decode()


class Recorder:
    """A loopback HTTP server serving BODY at /b.efb, or redirecting /go to `redirect_to`."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization)
        self.redirect_to = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.seen.append((self.path, self.headers.get("Authorization")))
                if self.path == "/go":
                    self.send_response(302)
                    self.send_header("Location", outer.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers():
    fleet, other = Recorder(), Recorder()
    yield fleet, other
    fleet.stop()
    other.stop()


def request(tmp_path, url: str, server_url: str, allowed=()) -> DownloadRequest:
    return DownloadRequest(url=url, dest=tmp_path / "b.efb", size=len(BODY), sha256=hashlib.sha256(BODY).hexdigest(),
                           username="dev-1", password="secret", min_free_disk_bytes=0, retries=0, timeout_s=10,
                           server_url=server_url, allowed_origins=allowed)


def test_credentials_go_to_the_configured_server(tmp_path, servers):
    fleet, other = servers
    download(request(tmp_path, f"{fleet.base}/b.efb", fleet.base + "/"))
    assert fleet.seen == [("/b.efb", AUTH)]
    assert (tmp_path / "b.efb").read_bytes() == BODY


def test_another_origin_is_refused_without_a_request(tmp_path, servers):
    fleet, other = servers
    with pytest.raises(OriginRefused, match="update.allowed_download_origins"):
        download(request(tmp_path, f"{other.base}/b.efb", fleet.base))
    assert other.seen == [] and fleet.seen == []
    assert not (tmp_path / "b.efb").exists()


def test_an_allowed_origin_is_fetched_without_credentials(tmp_path, servers):
    fleet, other = servers
    download(request(tmp_path, f"{other.base}/b.efb", fleet.base, allowed=[other.base]))
    assert other.seen == [("/b.efb", None)]
    assert (tmp_path / "b.efb").read_bytes() == BODY


def test_a_redirect_to_an_allowed_origin_drops_the_credentials(tmp_path, servers):
    fleet, other = servers
    fleet.redirect_to = f"{other.base}/b.efb"
    download(request(tmp_path, f"{fleet.base}/go", fleet.base, allowed=[other.base]))
    assert fleet.seen == [("/go", AUTH)]
    assert other.seen == [("/b.efb", None)]


def test_a_redirect_to_another_origin_is_refused(tmp_path, servers):
    fleet, other = servers
    fleet.redirect_to = f"{other.base}/b.efb"
    with pytest.raises(OriginRefused):
        download(request(tmp_path, f"{fleet.base}/go", fleet.base))
    assert other.seen == []


@pytest.mark.parametrize("url", [
    "https://127.0.0.1:{port}/b.efb",  # another scheme
    "http://localhost:{port}/b.efb",  # another host name for the same address
    "http://127.0.0.1:{other}/b.efb",  # another port
    "http://127.0.0.1/b.efb",  # the default port
    "file:///etc/passwd",
    "ftp://127.0.0.1:{port}/b.efb",
    "http://dev-1:secret@127.0.0.1:{other}/b.efb",
])
def test_origin_is_scheme_host_and_port(url, servers):
    fleet, other = servers
    port, other_port = fleet.server.server_address[1], other.server.server_address[1]
    with pytest.raises(OriginRefused):
        check_origin(url.format(port=port, other=other_port), fleet.base)
    assert check_origin(f"HTTP://127.0.0.1:{port}/x", fleet.base) is True  # scheme and host are case-blind


def test_without_a_configured_server_nothing_gets_credentials(servers):
    fleet, _ = servers
    with pytest.raises(OriginRefused, match="none configured"):
        check_origin(f"{fleet.base}/b.efb", "")
