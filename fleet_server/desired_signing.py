"""The server's desired-state key: every `desired` the server publishes is signed with it.

Devices trust its public half from provisioning (`[trust] desired_keys_pem` in the printed agent
config) and refuse a desired document that does not verify, or that was issued before the last
one they accepted (`edge_agent.trust`). So neither a compromised broker nor anyone else able to
publish on `desired` can point a device at another URL or version, or replay an old document
that allowed a downgrade.

The key lives in `DATA_DIR/secrets/desired-signing.key` (0600), created on first use; several
server processes on one data dir share it (created once, atomically).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import msgspec

from edge_agent.protocol import DesiredState
from edge_agent.trust import sign_desired

log = logging.getLogger("fleet_server.desired_signing")

KEY_FILE = "desired-signing.key"


class DesiredSigner:
    """Signs desired documents with the server's Ed25519 desired-state key."""

    def __init__(self, private_key: Any) -> None:
        self._key = private_key

    @classmethod
    def for_secrets_dir(cls, secrets_dir: Path) -> DesiredSigner:
        """The data dir's key, created on first use (0600; a concurrent creator wins once)."""
        from model_tools.signing import generate_keypair, load_private_key, save_private_key

        path = Path(secrets_dir) / KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
            save_private_key(generate_keypair()[0], tmp)
            try:
                os.link(tmp, path)  # fails if another process created it meanwhile: theirs is kept
                log.info("created the desired-state signing key %s", path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        return cls(load_private_key(path))

    @property
    def public_pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    @property
    def key_id(self) -> str:
        from model_tools.signing import key_id

        return key_id(self._key)

    def sign(self, desired: DesiredState) -> dict[str, Any]:
        """The desired document with its signature (`sig`, `sig_key`)."""
        return sign_desired(msgspec.to_builtins(desired), self._key)

    def payload(self, desired: DesiredState) -> bytes:
        """What is published on `desired`: the signed document as JSON."""
        return msgspec.json.encode(self.sign(desired))
