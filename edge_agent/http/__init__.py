"""The agent's local HTTP API (HTTP/1.1 keep-alive, one I/O thread): `HttpApi` serves an `Agent`.

`server.py` runs the listeners, the I/O loop and the worker pool; `connection.py` buffers and
frames each connection's requests; `wire.py` parses and formats HTTP/1.1; `routes.py` holds the
endpoints that call the agent.
"""

from edge_agent.http.connection import INLINE_BODY_BYTES, OUT_HIGH
from edge_agent.http.server import SLOW_S, HttpApi

__all__ = ["INLINE_BODY_BYTES", "OUT_HIGH", "SLOW_S", "HttpApi"]
