"""HTTP/1.1 on the wire: parsing a request head, a body's framing, formatting an answer's head.

A parser of our own: the stdlib's BaseHTTPRequestHandler parses every request's headers with the
`email` package, which cost more CPU than validation and inference together.
"""

from __future__ import annotations

import msgspec

REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
           422: "Unprocessable Entity", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}
encode = msgspec.json.Encoder().encode
JSON = "application/json"
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; more is refused with 431
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEADS: dict[tuple[int, str], bytes] = {}  # status line + Content-Type, built once per pair


class HeadError(Exception):
    """A request head that cannot be read: answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def answer_head(status: int, content_type: str) -> bytes:
    """The status line, Content-Type and `Content-Length: ` (the length and the rest follow)."""
    head = _HEADS.get((status, content_type))
    if head is None:
        head = _HEADS[(status, content_type)] = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
            "Content-Length: "
        ).encode("latin-1")
    return head


def parse_head(head: str) -> tuple[str, str, str, dict[str, str]]:
    """(method, path without the query, HTTP version, headers by lowercase name) of a request
    head (without its final blank line); HeadError when the request line or a header is broken."""
    lines = head.split("\r\n")
    words = lines[0].split()
    if len(words) != 3 or not words[2].startswith("HTTP/1."):
        status = 505 if len(words) == 3 and words[2].startswith("HTTP/") else 400
        raise HeadError(status, f"bad request line {lines[0][:100]!r}")
    method, target, version = words
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise HeadError(400, f"bad header line {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    return method, target.split("?", 1)[0], version, headers


def body_length(value: str, headers: dict[str, str]) -> int:
    """A request's body length from its Content-Length, or -1 when the framing is ambiguous:
    anything but decimal digits (no sign, `_`, spaces inside or hex, which `int()` would take),
    or Content-Length together with Transfer-Encoding (RFC 9112 6.3: a request smuggling vector)."""
    value = value.strip()
    if "transfer-encoding" in headers or not (value.isascii() and value.isdigit()) or len(value) > 18:
        return -1
    return int(value)
