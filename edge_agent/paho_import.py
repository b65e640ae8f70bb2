"""paho-mqtt's client module, imported without what the agent never uses.

paho imports urllib.request (and with it http.client, email and ssl) only to look up a proxy in
the environment when it connects, which it does only with PySocks installed (the agent does not
depend on it), and ssl for TLS. Those modules hold about 4 MiB of a device's RSS. Here paho sees
a stand-in for urllib.request that answers the proxy lookup from the environment (the real
module when a `*_proxy` variable is set) and brings in the real module for anything else; ssl is
imported for mqtts:// only, and handed to paho when a TLS link comes later in the process.
paho's hashlib (SHA-1 of the WebSocket handshake, a transport the agent does not use) is a
stand-in too: importing hashlib loads OpenSSL's libcrypto, another 3.5 MiB.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any


def _proxy_variables() -> bool:
    return any(name.lower().endswith("_proxy") for name in os.environ)


def _real_request() -> types.ModuleType:
    if isinstance(sys.modules.get("urllib.request"), _RequestStandIn):
        del sys.modules["urllib.request"]
    return importlib.import_module("urllib.request")


class _RequestStandIn(types.ModuleType):
    """What paho's proxy lookup asks of urllib.request; anything else imports the real module."""

    def getproxies(self) -> dict[str, str]:
        return _real_request().getproxies() if _proxy_variables() else {}

    def proxy_bypass(self, host: str) -> Any:
        return _real_request().proxy_bypass(host) if _proxy_variables() else False

    def __getattr__(self, name: str) -> Any:
        return getattr(_real_request(), name)


class _HashlibStandIn(types.ModuleType):
    """hashlib, imported on first use."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("hashlib"), name)


def paho_client(tls: bool) -> types.ModuleType:
    """`paho.mqtt.client`, with ssl available to it when `tls`."""
    module = sys.modules.get("paho.mqtt.client")
    if module is None:
        blocked = []
        if "urllib.request" not in sys.modules:
            sys.modules["urllib.request"] = _RequestStandIn("urllib.request")
            blocked.append("urllib.request")
        if "hashlib" not in sys.modules:
            sys.modules["hashlib"] = _HashlibStandIn("hashlib")
            blocked.append("hashlib")
        if not tls and "ssl" not in sys.modules:
            sys.modules["ssl"] = None  # type: ignore[assignment]  # paho: `except ImportError: ssl = None`
            blocked.append("ssl")
        try:
            module = importlib.import_module("paho.mqtt.client")
        finally:
            for name in blocked:
                if sys.modules.get(name) is None or isinstance(sys.modules.get(name), (_RequestStandIn, _HashlibStandIn)):
                    sys.modules.pop(name, None)
    if tls and getattr(module, "ssl", None) is None:
        module.ssl = importlib.import_module("ssl")
    return module
