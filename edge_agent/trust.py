"""Trust in the fleet server's orders: Ed25519-signed desired states and their freshness.

The server signs each `desired` document with its desired-state key; a device trusts the public
half from provisioning (`[trust] desired_keys_pem`). A signature covers every field of the
document, so a broker (or anyone who can publish on `desired`) can neither forge one nor change
its URL, version or `allow_downgrade`. `issued_at` orders the documents: a device refuses one
issued before the last it accepted, so an old signed document (e.g. one allowing a downgrade)
cannot be replayed.

Everything here takes and returns plain data (dicts, bytes, floats). `verify_desired` checks the
signature through `edge_agent.signatures` (in a short-lived child process unless cryptography is
loaded already), so the long-lived agent never maps `cryptography`; only `sign_desired` (the
server's side) uses it directly.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model_tools.digest import sha256

SIGNATURE_FIELD = "sig"  # base64 of the 64-byte Ed25519 signature
KEY_ID_FIELD = "sig_key"  # key id of the signer (as `model_tools.signing.key_id`), a hint only

# DER of SEQUENCE { SEQUENCE { OID 1.3.101.112 (Ed25519) }, BIT STRING (0 unused bits) of 32 bytes }
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN = "-----BEGIN PUBLIC KEY-----"
_PEM_END = "-----END PUBLIC KEY-----"


class DesiredTrustError(ValueError):
    """A desired document that is unsigned, forged, signed by an unknown key, or replayed."""


def raw_public_key(pem: str | bytes) -> bytes:
    """The 32 raw bytes of an Ed25519 public key from its PEM (stdlib only; no cryptography)."""
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    start = text.find(_PEM_BEGIN)
    end = text.find(_PEM_END, start + len(_PEM_BEGIN)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise DesiredTrustError(f"no '{_PEM_BEGIN}' block found")
    try:
        der = base64.b64decode("".join(text[start + len(_PEM_BEGIN) : end].split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DesiredTrustError(f"the PUBLIC KEY block is not valid base64: {exc}") from exc
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        raise DesiredTrustError("not an Ed25519 public key (44-byte SubjectPublicKeyInfo)")
    return der[len(_ED25519_SPKI_PREFIX) :]


def raw_key_id(raw: bytes) -> str:
    """The key id `model_tools.signing.key_id` gives the same key."""
    return sha256(raw).hexdigest()[:16]


def signed_bytes(doc: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: every field but the signature's own, as canonical JSON
    (sorted keys, no spaces, ASCII). Fields a device does not know are covered too."""
    body = {k: v for k, v in doc.items() if k not in (SIGNATURE_FIELD, KEY_ID_FIELD)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def sign_desired(doc: Mapping[str, Any], private_key: Any) -> dict[str, Any]:
    """`doc` with its signature (server side; `private_key` is an Ed25519PrivateKey)."""
    raw = private_key.public_key().public_bytes_raw()
    signature = private_key.sign(signed_bytes(doc))
    return {**doc, SIGNATURE_FIELD: base64.b64encode(signature).decode(), KEY_ID_FIELD: raw_key_id(raw)}


def parse_document(payload: bytes) -> dict[str, Any]:
    """A `desired` payload as a JSON object (raises DesiredTrustError for anything else)."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DesiredTrustError(f"desired is not JSON: {str(exc)[:120]}") from exc
    if not isinstance(doc, dict):
        raise DesiredTrustError("desired is not a JSON object")
    return doc


def verify_desired(doc: Mapping[str, Any], keys: Sequence[bytes]) -> None:
    """Return if `doc` is signed by one of `keys` (raw 32-byte Ed25519 public keys); raise
    DesiredTrustError otherwise. The only function here that needs `cryptography`."""
    if not keys:
        raise DesiredTrustError("no desired-state key is trusted ([trust] desired_keys_pem is empty)")
    sig = doc.get(SIGNATURE_FIELD)
    if not isinstance(sig, str) or not sig:
        raise DesiredTrustError("desired is not signed (no 'sig'): refused, the device requires signed desired states")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DesiredTrustError("desired signature is not base64") from exc
    try:
        data = signed_bytes(doc)
    except (TypeError, ValueError) as exc:  # NaN or a value JSON cannot hold
        raise DesiredTrustError(f"desired cannot be canonicalised: {exc}") from exc
    if len(signature) != 64:
        raise DesiredTrustError(f"desired signature is {len(signature)} bytes, not 64")
    # In a short-lived child process unless cryptography is loaded here already (the server,
    # tests): the long-lived agent never maps it.
    from edge_agent.signatures import TrustedKey
    from model_tools.errors import SignatureError

    for raw in keys:
        try:
            if TrustedKey(raw).verifies(signature, data):
                return
        except SignatureError as exc:
            raise DesiredTrustError(f"desired signature cannot be checked: {exc}") from exc
    ids = ", ".join(raw_key_id(k) for k in keys)
    raise DesiredTrustError(
        f"desired signature does not verify with any trusted desired-state key ({ids}): "
        "forged or changed after signing"
    )


@dataclass(frozen=True)
class Accepted:
    """The last desired document a device accepted: its `issued_at` and digest."""

    issued_at: float
    digest: str

    def to_json(self) -> dict[str, Any]:
        return {"issued_at": self.issued_at, "digest": self.digest}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Accepted | None:
        try:
            return cls(float(data["issued_at"]), str(data["digest"])) if data else None
        except (KeyError, TypeError, ValueError):
            return None


def digest(doc: Mapping[str, Any]) -> str:
    return sha256(signed_bytes(doc)).hexdigest()


def check_fresh(doc: Mapping[str, Any], last: Accepted | None) -> Accepted:
    """Refuse a document issued before the last accepted one (or another document with the same
    `issued_at`); the same document again (the retained copy after a reconnect) passes.
    Returns what to remember as accepted."""
    issued = doc.get("issued_at")
    if isinstance(issued, bool) or not isinstance(issued, (int, float)) or issued != issued:
        raise DesiredTrustError("desired has no numeric issued_at")
    mine = Accepted(float(issued), digest(doc))
    if last is not None:
        if mine.issued_at < last.issued_at:
            raise DesiredTrustError(
                f"replayed desired: issued_at {mine.issued_at} is older than the last accepted {last.issued_at}"
            )
        if mine.issued_at == last.issued_at and mine.digest != last.digest:
            raise DesiredTrustError(
                f"replayed desired: another document with issued_at {mine.issued_at} was accepted already"
            )
    return mine


def raw_keys(pems: Iterable[str]) -> list[bytes]:
    """Raw keys from PEM strings (config loading: a bad key is an error naming its index)."""
    out = []
    for i, pem in enumerate(pems):
        try:
            out.append(raw_public_key(pem))
        except DesiredTrustError as exc:
            raise DesiredTrustError(f"[trust] desired_keys_pem[{i}]: {exc}") from exc
    return out
