"""Webhook delivery: a signed JSON POST with retries (stdlib only, so the server needs no HTTP client).

Receivers check `X-Edgefleet-Signature: sha256=<hex>`, an HMAC-SHA256 of the exact body with
the webhook's secret, and may drop repeats by `X-Edgefleet-Delivery` (one id for all retries of
one delivery). docs/drift.md shows how to verify a request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "SIGNATURE_HEADER",
    "DeliveryResult",
    "alert_payload",
    "deliver",
    "encode_body",
    "sign",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Edgefleet-Signature"
EVENT_HEADER = "X-Edgefleet-Event"
DELIVERY_HEADER = "X-Edgefleet-Delivery"
USER_AGENT = "edgefleet-webhook/1"
PAYLOAD_VERSION = 1
_KEEP_RESPONSE_BYTES = 1024  # of a receiver's answer, kept for the delivery log


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What happened to one delivery, for the delivery log."""

    ok: bool
    delivery_id: str
    attempts: int
    status: int | None  # HTTP status of the last attempt; None when no response came
    error: str | None  # why the last attempt failed
    elapsed_s: float
    response: str = ""  # start of the last response body

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_body(payload: dict[str, Any]) -> bytes:
    """Compact, sorted JSON: the exact bytes that are signed and sent."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def sign(body: bytes, secret: bytes) -> str:
    """The signature header value for `body`: `sha256=<hex hmac>`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, secret: bytes, header: str | None) -> bool:
    """A receiver's check, in constant time."""
    return header is not None and hmac.compare_digest(sign(body, secret), header)


def alert_payload(transition: Any, *, model: str, fleet: str | None = None) -> dict[str, Any]:
    """The body of a drift alert webhook, from an `alerts.AlertTransition`."""
    return {
        "v": PAYLOAD_VERSION,
        "event": transition.event,
        "fleet": fleet,
        "model": model,
        "alert": transition.to_dict(),
    }


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would turn a redirected POST into a bodiless GET; a webhook URL that redirects
    # is misconfigured, and following it could leak the signed body elsewhere.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        return None


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_NoRedirect)


def _retryable(status: int) -> bool:
    # 5xx: the receiver is down or overloaded; 429: it asked us to slow down. Other 4xx
    # (bad URL, bad signature) will not heal by themselves.
    return status >= 500 or status == 429


def deliver(
    url: str,
    payload: dict[str, Any],
    secret: bytes,
    *,
    event: str = "drift.alert",
    timeout: float = 5.0,
    retries: int = 3,
    backoff: float = 1.0,
    max_backoff: float = 60.0,
    delivery_id: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryResult:
    """POST `payload` as signed JSON to `url`; retry connection errors, timeouts, 5xx and 429.

    Up to `retries` retries after the first attempt, waiting backoff * 2**i seconds before
    retry i+1 (capped at `max_backoff`). Any 2xx is success; redirects are not followed.
    Never raises for delivery failures: the result says what happened.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook URL {url!r} must be an http:// or https:// URL with a host")
    if retries < 0 or timeout <= 0 or backoff < 0:
        raise ValueError("retries and backoff must not be negative, timeout must be positive")
    body = encode_body(payload)
    delivery_id = delivery_id or str(uuid.uuid4())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        SIGNATURE_HEADER: sign(body, secret),
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
    }
    opener = _opener()
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    text = ""
    attempt = 0
    while True:
        attempt += 1
        status, error, text = None, None, ""
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with opener.open(request, timeout=timeout) as response:
                status = response.status
                text = response.read(_KEEP_RESPONSE_BYTES).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            status = exc.code
            text = exc.read(_KEEP_RESPONSE_BYTES).decode("utf-8", "replace") if exc.fp else ""
            error = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, DNS, timeout
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            error = f"{type(reason).__name__}: {reason}"
        if status is not None and 200 <= status < 300:
            return DeliveryResult(
                True, delivery_id, attempt, status, None, time.monotonic() - started, text
            )
        if status is not None and error is None:
            error = f"HTTP {status}"  # e.g. a 3xx that was not followed
        retry = status is None or _retryable(status)
        if not retry or attempt > retries:
            return DeliveryResult(
                False, delivery_id, attempt, status, error, time.monotonic() - started, text
            )
        sleep(min(backoff * 2 ** (attempt - 1), max_backoff))
