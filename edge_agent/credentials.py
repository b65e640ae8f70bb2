"""Device password rotation on the device, without a site visit.

The server announces a rotation on the device's own `credentials` topic (only this device and
the server can read it). The agent then asks the server for the new password over HTTP(S),
authenticated with the current one, keeps it as pending in `credentials.json` in its data dir
(atomic write, 0600), and confirms with the new password itself. Only a confirmed rotation
switches the MQTT link and downloads to the new password; the server keeps the old one valid
until then. A restart between any two steps resumes from the file: a pending password is
confirmed again (the server's confirm is idempotent), so a power cut never leaves the device with
a password the server does not know.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import urllib.error
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_agent.store import atomic_write_bytes

log = logging.getLogger("edge_agent.credentials")

CREDENTIALS_FILE = "credentials.json"
ISSUE_PATH = "/api/v1/device/credentials"
CONFIRM_PATH = "/api/v1/device/credentials/confirm"


class RotationError(Exception):
    """A rotation step failed; `final` ones (the server no longer has that rotation) end it."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


@dataclass
class StoredCredentials:
    """What `credentials.json` holds: the password in force and a rotation in progress."""

    password: str = ""  # the confirmed password ("" : the one in agent.toml)
    pending_rotation: str = ""
    pending_password: str = ""


class CredentialStore:
    """The device's password, persisted beside its state so a rotation survives restarts."""

    def __init__(self, data_dir: str | os.PathLike[str], configured_password: str) -> None:
        self.path = Path(data_dir) / CREDENTIALS_FILE
        self.configured = configured_password
        self._lock = threading.Lock()
        self.state = self._load()

    def _load(self) -> StoredCredentials:
        try:
            data = json.loads(self.path.read_text())
            return StoredCredentials(**{k: str(v) for k, v in data.items() if k in StoredCredentials.__annotations__})
        except FileNotFoundError:
            return StoredCredentials()
        except (OSError, ValueError, TypeError) as exc:
            log.error("ignoring unreadable %s (%s): using the configured password", self.path, exc)
            return StoredCredentials()

    def _save(self, state: StoredCredentials) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps(asdict(state)).encode())
        os.chmod(self.path, 0o600)
        self.state = state

    @property
    def password(self) -> str:
        """The password in force (MQTT login and downloads)."""
        return self.state.password or self.configured

    @property
    def pending(self) -> tuple[str, str] | None:
        """(rotation id, new password) taken from the server but not yet confirmed."""
        if self.state.pending_rotation and self.state.pending_password:
            return self.state.pending_rotation, self.state.pending_password
        return None

    def save_pending(self, rotation_id: str, password: str) -> None:
        with self._lock:
            self._save(StoredCredentials(self.state.password, rotation_id, password))

    def save_confirmed(self, rotation_id: str) -> str:
        with self._lock:
            pending = self.pending
            if pending is None or pending[0] != rotation_id:
                return self.password
            self._save(StoredCredentials(password=pending[1]))
            return pending[1]

    def drop_pending(self) -> None:
        with self._lock:
            self._save(StoredCredentials(password=self.state.password))


class Rotator:
    """Carries out rotations the server announces, one at a time, in its own short-lived thread.

    `on_switch(password)` is called once a rotation is confirmed: the agent points its MQTT link
    and downloads at the new password."""

    def __init__(
        self,
        device_id: str,
        server_url: str,
        store: CredentialStore,
        on_switch: Callable[[str], None],
        *,
        ca_file: str = "",
        timeout_s: float = 15.0,
    ) -> None:
        self.device_id = device_id
        self.server_url = server_url.rstrip("/")
        self.store = store
        self.on_switch = on_switch
        self.ca_file = ca_file
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wanted: str | None = None
        self.completed: list[str] = []  # rotation ids confirmed by this process
        self.last_error: str | None = None

    # ---- triggers
    def notice(self, payload: bytes) -> None:
        """The `credentials` message (from paho's thread: only record it and start the worker)."""
        if not payload:
            return  # the server cleared it: nothing pending
        try:
            data = json.loads(payload)
            rotation_id = str(data["rotation_id"])
            if data.get("device") not in (None, self.device_id):
                return
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed credentials notice")
            return
        self._start(rotation_id)

    def resume(self) -> None:
        """At start, or when the broker refused our password: finish a rotation left pending."""
        pending = self.store.pending
        if pending is not None:
            self._start(pending[0])

    def _start(self, rotation_id: str) -> None:
        with self._lock:
            self._wanted = rotation_id
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="credentials", daemon=True)
            self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                rotation_id, self._wanted = self._wanted, None
                if rotation_id is None:
                    return
            try:
                self.rotate(rotation_id)
                self.last_error = None
            except RotationError as exc:
                self.last_error = str(exc)
                log.warning("password rotation %s: %s", rotation_id, exc)
                if exc.final:
                    self.store.drop_pending()
            except Exception as exc:  # a worker thread must not die silently
                self.last_error = str(exc)
                log.exception("password rotation %s failed", rotation_id)

    # ---- the steps
    def rotate(self, rotation_id: str) -> None:
        """Take the new password (unless one is pending for this rotation), persist it, confirm
        with it, then switch to it."""
        if rotation_id in self.completed:
            return
        pending = self.store.pending
        if pending is None or pending[0] != rotation_id:
            answer = self._post(ISSUE_PATH, self.store.password, {"rotation_id": rotation_id})
            password = answer.get("password")
            if not isinstance(password, str) or not password:
                raise RotationError("the server's answer has no password")
            self.store.save_pending(rotation_id, password)  # before it is used anywhere
        _, password = self.store.pending or (rotation_id, "")
        self._post(CONFIRM_PATH, password, {"rotation_id": rotation_id})
        new = self.store.save_confirmed(rotation_id)
        self.completed.append(rotation_id)
        log.info("password rotation %s confirmed: using the new password", rotation_id)
        self.on_switch(new)

    def _post(self, path: str, password: str, body: dict[str, str]) -> dict:
        if not self.server_url:
            raise RotationError("no [server] url configured to rotate the password with", final=True)
        # Imported here: urllib.request brings http.client, email and ssl (~3 MiB) into an agent
        # that otherwise never loads them (docs/device.md#memory).
        import ssl
        import urllib.request

        token = base64.b64encode(f"{self.device_id}:{password}".encode()).decode()
        req = urllib.request.Request(
            self.server_url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        context = ssl.create_default_context(cafile=self.ca_file or None) if self.server_url.startswith("https") else None
        # The password goes to the configured server only: no redirects are followed.
        opener = urllib.request.build_opener(_no_redirect(), *([urllib.request.HTTPSHandler(context=context)]
                                                             if context else []))
        try:
            with opener.open(req, timeout=self.timeout_s) as response:
                return json.loads(response.read(65536) or b"{}")
        except urllib.error.HTTPError as exc:
            detail = _error_text(exc)
            # 404/409/410: the server has no such rotation pending (cancelled, expired, replaced).
            raise RotationError(f"{path} answered {exc.code}: {detail}", final=exc.code in (404, 409, 410)) from exc
        except (OSError, ValueError) as exc:
            raise RotationError(f"{path}: {exc}") from exc


def _no_redirect():
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
            return None

    return NoRedirect


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read(4096)).get("error", ""))[:200]
    except (OSError, ValueError, AttributeError):
        return exc.reason if isinstance(exc.reason, str) else ""
