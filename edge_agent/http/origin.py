"""Which browsers may talk to the agent's API: the `Host` and `Origin` checks.

A web page the device's browser opens can reach the loopback API in two ways: a cross-origin
"simple" request (a `text/plain` POST needs no preflight, so the request runs even though the
page cannot read the answer), and DNS rebinding (the page's own name, re-pointed at 127.0.0.1,
makes its requests same-origin for the browser: they arrive with `Host: evil.example`). So a
request is answered only when its Host names the agent itself (the listen address, an IP
literal the agent can be reached at, localhost, or `http.allowed_hosts`) and it carries no
`Origin` or one listed in `http.allowed_origins`. Clients that are not browsers send no Origin,
and a request without Host (HTTP/1.0) cannot come from a browser.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from edge_agent.config import HttpConfig

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_name(value: str) -> str:
    """The host part of a Host header, lower-cased, without port, brackets or a final dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def normal_origin(value: str) -> str:
    """An origin as scheme://host[:port], lower-cased, without a default port."""
    parts = urlsplit(value.strip().lower())
    try:
        port = parts.port
    except ValueError:
        return value
    if not parts.scheme or not parts.hostname:
        return value.strip().lower()
    default = {"http": 80, "https": 443}.get(parts.scheme)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


class BrowserPolicy:
    """Decides from a request's headers whether it may be answered (see the module docstring)."""

    def __init__(self, http: HttpConfig) -> None:
        listen_host = host_name(http.listen.rpartition(":")[0]) if http.listen else "127.0.0.1"
        self.any_ip = listen_host in WILDCARDS  # reachable at any of the host's addresses
        self.names = set(LOOPBACK_NAMES) | {host_name(h) for h in http.allowed_hosts}
        if not self.any_ip:
            self.names.add(listen_host)
        self.origins = frozenset(normal_origin(o) for o in http.allowed_origins)

    def host_allowed(self, host: str | None) -> bool:
        if host is None:
            return True
        name = host_name(host)
        if name in self.names:
            return True
        ip = _ip(name)
        return ip is not None and (ip.is_loopback or self.any_ip)

    def origin_allowed(self, origin: str | None) -> bool:
        return origin is None or normal_origin(origin) in self.origins

    def refusal(self, headers: dict[str, str]) -> tuple[str, str] | None:
        """(kind, message) when the request must be refused, else None."""
        host = headers.get("host")
        if not self.host_allowed(host):
            return "forbidden_host", (
                f"Host {host[:100]!r} is not this agent's name or address (DNS rebinding?); "
                "add the name to http.allowed_hosts if the API is served under it")
        origin = headers.get("origin")
        if not self.origin_allowed(origin):
            return "forbidden_origin", (
                f"requests from the web origin {origin[:100]!r} are refused; "
                "add it to http.allowed_origins to let that web app use the API")
        return None
