"""Resumable bundle download over HTTP(S): Basic auth, Range resume, size cap, deadline, retries.

stdlib only (urllib): a device needs no `requests`. The partial file survives a restart so a
flaky link resumes where it stopped instead of starting over.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK = 64 * 1024


class DownloadError(Exception):
    """A download that failed; `transient` ones may succeed when retried later."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
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
    if req.dest.exists() and req.dest.stat().st_size == req.size:
        return req.dest
    part = req.dest.with_name(req.dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > req.size:
        part.unlink()
        have = 0
    free = shutil.disk_usage(req.dest.parent).free
    if free - (req.size - have) < req.min_free_disk_bytes:
        raise DownloadError(
            f"not enough disk: {free} bytes free, the bundle needs {req.size - have} more and "
            f"{req.min_free_disk_bytes} must stay free",
            transient=False,
        )
    deadline = time.monotonic() + req.timeout_s
    context = ssl.create_default_context(cafile=req.ca_file or None) if req.url.startswith("https") else None
    delay = 0.5
    last_error = "no attempt"
    for attempt in range(req.retries + 1):
        if cancelled():
            raise DownloadError("cancelled: desired state changed", transient=True)
        try:
            _fetch(req, part, deadline, context, cancelled)
            break
        except DownloadError as exc:
            if not exc.transient:
                raise
            last_error = str(exc)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        if attempt == req.retries or time.monotonic() + delay > deadline:
            raise DownloadError(f"download failed after {attempt + 1} attempts: {last_error}")
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
    os.replace(part, req.dest)
    return req.dest


def _fetch(req: DownloadRequest, part: Path, deadline: float, context, cancelled) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have == req.size:
        return
    headers = {"User-Agent": "edgefleet-agent"}
    if req.username:
        token = base64.b64encode(f"{req.username}:{req.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(req.url, headers=headers)
    remaining = max(1.0, deadline - time.monotonic())
    try:
        resp = urllib.request.urlopen(request, timeout=min(30.0, remaining), context=context)
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
