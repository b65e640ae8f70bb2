"""Trusted bundle-signing keys for a long-lived agent, checked in a short-lived child process.

Verifying an Ed25519 signature needs `cryptography`, about 7 MiB of RSS once imported, for an
operation a device does at start and once per update. A `TrustedKey` holds the 32 raw public
bytes (parsed without cryptography) and verifies in a child Python that imports only
`cryptography` and exits, so the agent process never maps it. A process that has imported
cryptography already (the server, the simulator, tests, model tools) verifies in place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable

from model_tools.errors import SignatureError
from model_tools.signing import raw_public_key_from_pem

# Run with `python -c`: argv[1] is JSON {"key", "signature", "data"} (hex); exit 0 valid, 1 not.
_CHILD = (
    "import json, sys\n"
    "from cryptography.exceptions import InvalidSignature\n"
    "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey\n"
    "req = json.loads(sys.stdin.read())\n"
    "try:\n"
    "    Ed25519PublicKey.from_public_bytes(bytes.fromhex(req['key'])).verify("
    "bytes.fromhex(req['signature']), bytes.fromhex(req['data']))\n"
    "except InvalidSignature:\n"
    "    sys.exit(1)\n"
)
CHILD_TIMEOUT_S = 120.0  # a Pi Zero 2 W starts Python and imports cryptography in a few seconds


def cryptography_loaded() -> bool:
    return "cryptography.hazmat.bindings._rust" in sys.modules


class TrustedKey:
    """An Ed25519 public key by its raw bytes; `verifies` checks a signature out of process.

    Duck-types what model_tools.signing needs of a key: `public_bytes_raw()` (for key ids) and
    `verifies(signature, data) -> bool` (instead of cryptography's `verify`).
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise SignatureError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
        self._raw = bytes(raw)

    def public_bytes_raw(self) -> bytes:
        return self._raw

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustedKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"TrustedKey({self._raw.hex()[:16]}...)"

    def verifies(self, signature: bytes, data: bytes) -> bool:
        if cryptography_loaded():
            return _verify_here(self._raw, signature, data)
        return _verify_in_child(self._raw, signature, data)


def _verify_here(raw: bytes, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _verify_in_child(raw: bytes, signature: bytes, data: bytes) -> bool:
    request = json.dumps({"key": raw.hex(), "signature": signature.hex(), "data": data.hex()})
    env = {k: v for k, v in os.environ.items() if k.startswith(("PYTHON", "PATH", "LANG", "LC_", "HOME"))}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD], input=request, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SignatureError(f"cannot run the signature check ({sys.executable}): {exc}") from exc
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise SignatureError(f"the signature check failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")


def trusted_keys(paths: Iterable[str], pems: Iterable[str]) -> list[TrustedKey]:
    """Keys from PEM files and inline PEM strings ([trust] public_keys, public_keys_pem)."""
    from model_tools.signing import load_public_key_raw

    keys = [TrustedKey(load_public_key_raw(p)) for p in paths]
    for i, pem in enumerate(pems):
        try:
            keys.append(TrustedKey(raw_public_key_from_pem(pem)))
        except SignatureError as exc:
            raise ValueError(f"[trust] public_keys_pem[{i}]: {exc}") from exc
    return keys
