"""Resumable bundle download over HTTP(S): Basic auth, Range resume, size cap, deadline, retries.

stdlib only (urllib): a device needs no `requests`. The partial file survives a restart so a
flaky link resumes where it stopped instead of starting over.

The device's password goes only to the configured server's origin (scheme, host and port of
`[server] url`): a desired state naming another origin is refused, unless that origin is in
`update.allowed_download_origins` (a mirror or CDN), which is then fetched without credentials.
Redirects are held to the same rule, hop by hop. A full disk is a `DiskFull` failure with the
free and needed bytes, which the update machine retries once space returns.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edge_agent.store import is_disk_full
from model_tools.digest import sha256

CHUNK = 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


class DownloadError(Exception):
    """A download that failed; `transient` ones may succeed when retried later."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class DiskFull(DownloadError):
    """The bundle does not fit: `free` bytes are free, `needed` are needed. Transient: the update
    is tried again when space returns."""

    def __init__(self, free: int, needed: int, detail: str = "") -> None:
        super().__init__(f"disk full: {free} bytes free, {needed} needed{detail}", transient=True)
        self.free = free
        self.needed = needed


class OriginRefused(DownloadError):
    """The URL's origin is neither the configured server's nor an allowed download origin."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


def origin_of(url: str) -> Origin:
    """(scheme, host, port) of an http(s) URL, lower-cased, with the scheme's default port.
    Raises ValueError for other schemes, no host, or a bad port."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"{url[:120]!r} is not an http:// or https:// URL")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"{url[:120]!r} has no host")
    port = parts.port  # raises ValueError for a port out of range
    return scheme, host, port or DEFAULT_PORTS[scheme]


def format_origin(o: Origin) -> str:
    host = f"[{o[1]}]" if ":" in o[1] else o[1]
    return f"{o[0]}://{host}:{o[2]}"


def resolve_url(url: str, server_url: str) -> str:
    """An absolute URL: a relative one (a path) is taken against the configured server."""
    return url if "://" in url else server_url.rstrip("/") + "/" + url.lstrip("/")


def check_origin(url: str, server_url: str, allowed: Sequence[str] = ()) -> bool:
    """Whether `url` may be fetched, and with credentials: True for the server's own origin, False
    for an allowed other origin (no credentials); raises OriginRefused for anything else."""
    try:
        target = origin_of(url)
    except ValueError as exc:
        raise OriginRefused(f"refusing download URL: {exc}") from exc
    server = None
    if server_url:
        try:
            server = origin_of(server_url)
        except ValueError:
            server = None
    if target == server:
        return True
    for entry in allowed:
        try:
            if origin_of(entry) == target:
                return False
        except ValueError:
            continue
    where = format_origin(server) if server else "none configured"
    raise OriginRefused(
        f"refusing download from {format_origin(target)}: not the fleet server's origin ({where}) "
        "and not in update.allowed_download_origins; the device password is sent to the server only"
    )


@dataclass
class DownloadRequest:
    url: str
    dest: Path  # final path; the partial file is dest + ".part"
    size: int
    sha256: str
    username: str = ""
    password: str = ""
    ca_file: str = ""
    timeout_s: float = 300.0
    max_bytes: int = 256 * 1024 * 1024
    min_free_disk_bytes: int = 64 * 1024 * 1024
    retries: int = 4
    server_url: str = ""  # credentials go to this origin only (none when empty)
    allowed_origins: Sequence[str] = ()  # other origins fetched without credentials
    # Fetch the bytes through this URL instead (a simulator's fault relay, set in code only);
    # which origin gets the credentials is still decided by `url`.
    via: str = ""


def file_sha256(path: Path) -> str:
    h = sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(req: DownloadRequest, cancelled: Callable[[], bool] = lambda: False) -> Path:
    """Fetch `req.url` into `req.dest`, resuming a partial file; return the path."""
    if req.size > req.max_bytes:
        raise DownloadError(
            f"bundle is {req.size} bytes, over the device's max_download_bytes {req.max_bytes}", transient=False
        )
    with_credentials = check_origin(req.url, req.server_url, req.allowed_origins)
    if req.dest.exists() and req.dest.stat().st_size == req.size:
        return req.dest
    part = req.dest.with_name(req.dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > req.size:
        part.unlink()
        have = 0
    free = shutil.disk_usage(req.dest.parent).free
    if free - (req.size - have) < req.min_free_disk_bytes:
        raise DiskFull(free, req.size - have + req.min_free_disk_bytes,
                       f" (the bundle's {req.size - have} remaining bytes and update.min_free_disk_bytes "
                       f"{req.min_free_disk_bytes})")
    deadline = time.monotonic() + req.timeout_s
    context = None
    if req.url.startswith("https"):
        import ssl  # here, not at import: an agent on mqtt:// that is not updating never loads it

        context = ssl.create_default_context(cafile=req.ca_file or None)
    delay = 0.5
    last_error = "no attempt"
    for attempt in range(req.retries + 1):
        if cancelled():
            raise DownloadError("cancelled: desired state changed", transient=True)
        try:
            _fetch(req, part, deadline, context, cancelled, with_credentials)
            break
        except DownloadError as exc:
            if not exc.transient or isinstance(exc, DiskFull):
                raise
            last_error = str(exc)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise _disk_full(req, part) from exc
            last_error = f"{type(exc).__name__}: {exc}"
        if attempt == req.retries or time.monotonic() + delay > deadline:
            raise DownloadError(f"download failed after {attempt + 1} attempts: {last_error}")
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
    os.replace(part, req.dest)
    return req.dest


def _disk_full(req: DownloadRequest, part: Path) -> DiskFull:
    have = part.stat().st_size if part.exists() else 0
    return DiskFull(shutil.disk_usage(req.dest.parent).free, req.size - have, " (writing the download)")


def _same_rules_redirects(req: DownloadRequest):
    """A redirect handler that follows a redirect only to an origin the device may fetch from,
    and carries the device's credentials only to the server's origin (urllib would copy them to
    any host). Made when downloading: urllib.request (with http.client, email and ssl, ~3 MiB)
    is imported only by an update."""
    import urllib.request

    class SameRulesRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, r, fp, code, msg, headers, newurl):
            new = super().redirect_request(r, fp, code, msg, headers, newurl)
            if new is None:
                return None
            if not req.via and not check_origin(new.full_url, req.server_url, req.allowed_origins):
                new.remove_header("Authorization")
                new.unredirected_hdrs.pop("Authorization", None)
            return new

    return SameRulesRedirects()


def _fetch(req: DownloadRequest, part: Path, deadline: float, context, cancelled,
           with_credentials: bool = False) -> None:
    import urllib.request

    have = part.stat().st_size if part.exists() else 0
    if have == req.size:
        return
    headers = {"User-Agent": "edgefleet-agent"}
    if req.username and with_credentials:
        token = base64.b64encode(f"{req.username}:{req.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(req.via or req.url, headers=headers)
    remaining = max(1.0, deadline - time.monotonic())
    handlers: list[urllib.request.BaseHandler] = [_same_rules_redirects(req)]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        resp = opener.open(request, timeout=min(30.0, remaining))
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # our partial file does not match the server's: start over
            part.unlink(missing_ok=True)
            raise DownloadError("server refused the range; restarting the download") from exc
        permanent = exc.code in (401, 403, 404, 410)
        raise DownloadError(f"HTTP {exc.code} from {req.url}", transient=not permanent) from exc
    with resp:
        if have and resp.status == 200:
            have = 0  # the server ignored Range: take the whole body
        mode = "ab" if have else "wb"
        length = resp.headers.get("Content-Length")
        if length is not None and have + int(length) > req.size:
            raise DownloadError(
                f"server sends {have + int(length)} bytes, desired says {req.size}", transient=False
            )
        with open(part, mode) as fh:
            got = have
            while True:
                if time.monotonic() > deadline:
                    raise DownloadError("download timed out", transient=False)
                if cancelled():
                    raise DownloadError("cancelled: desired state changed")
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                got += len(chunk)
                if got > req.size:
                    raise DownloadError(f"server sent more than the {req.size} bytes desired says", transient=False)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    if got < req.size:
        raise DownloadError(f"connection ended after {got} of {req.size} bytes")
