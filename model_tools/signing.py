"""Ed25519 keys and signatures for bundles (stdlib + cryptography only: devices import it).

Devices only read public keys and verify. Reading a public key parses its PEM here (an Ed25519
SubjectPublicKeyInfo is a fixed 12-byte DER prefix and the 32-byte key), so a device never imports
`cryptography.hazmat.primitives.serialization`, which pulls in the SSH key formats, bcrypt and the
ciphers (~1 MiB of RSS). Key generation and private keys (a laptop's work) import it when called.
`cryptography` itself is imported only where a key object is made or used: the agent holds raw
public keys (`raw_public_key_from_pem`) whose `verifies` runs in a short-lived child process
(edge_agent.signatures), so its long-lived process never maps the library (~7 MiB of RSS).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from model_tools.digest import sha256
from model_tools.errors import SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "SignatureError",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_public_keys",
    "public_key_from_pem",
    "raw_public_key_from_pem",
    "save_private_key",
    "save_public_key",
    "sign",
    "verify_signature",
]


def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """A fresh Ed25519 key pair."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


# DER of SEQUENCE { SEQUENCE { OID 1.3.101.112 (Ed25519) }, BIT STRING (0 unused bits) of 32 bytes }
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN = "-----BEGIN PUBLIC KEY-----"
_PEM_END = "-----END PUBLIC KEY-----"


def save_private_key(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> Path:
    """Write the private key as unencrypted PKCS#8 PEM, readable by the owner only (0600)."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start: a chmod after writing leaves a window where it is readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(path, 0o600)
    return path


def save_public_key(key: Ed25519PublicKey, path: str | os.PathLike[str]) -> Path:
    """Write the public key as SubjectPublicKeyInfo PEM."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a PEM private key written by `save_private_key` (or `openssl genpkey -algorithm ed25519`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(
            f"cannot read private key {path}: {exc}; create one with 'edgefleet model keygen'"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(
            f"{path} is not an Ed25519 private key; create one with 'edgefleet model keygen'"
        )
    return key


def public_key_from_pem(pem: bytes | str) -> Ed25519PublicKey:
    """An Ed25519 public key from its SubjectPublicKeyInfo PEM ("-----BEGIN PUBLIC KEY-----")."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(raw_public_key_from_pem(pem))


def raw_public_key_from_pem(pem: bytes | str) -> bytes:
    """The 32 raw bytes of an Ed25519 public key from its SubjectPublicKeyInfo PEM (stdlib only).

    The first PUBLIC KEY block is read (text around it is ignored, as cryptography's loader
    does); its DER must be exactly the 12-byte Ed25519 prefix and the 32 key bytes. Raises
    SignatureError (a ValueError) for anything else: no PEM block, bad base64, or another key
    type (RSA, EC, X25519, Ed448).
    """
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    start = text.find(_PEM_BEGIN)
    end = text.find(_PEM_END, start + len(_PEM_BEGIN)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise SignatureError(f"no '{_PEM_BEGIN}' ... '{_PEM_END}' block found")
    body = "".join(text[start + len(_PEM_BEGIN) : end].split())
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"the PUBLIC KEY block is not valid base64: {exc}") from exc
    if len(der) != len(ED25519_SPKI_PREFIX) + 32 or not der.startswith(ED25519_SPKI_PREFIX):
        raise SignatureError(
            "not an Ed25519 public key: an Ed25519 SubjectPublicKeyInfo is 44 bytes starting "
            f"{ED25519_SPKI_PREFIX.hex()}, this one is {len(der)} bytes starting {der[:12].hex()}"
        )
    return der[len(ED25519_SPKI_PREFIX) :]


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a PEM public key written by `save_public_key` (or `openssl pkey -pubout`)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(load_public_key_raw(path))


def load_public_key_raw(path: str | os.PathLike[str]) -> bytes:
    """The raw 32 bytes of the PEM public key in `path` (stdlib only; errors name the file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(
            f"cannot read public key {path}: {exc}; pass the .pub file written by 'edgefleet model keygen'"
        ) from exc
    try:
        return raw_public_key_from_pem(data)
    except SignatureError as exc:
        raise SignatureError(
            f"{path} is not a usable public key: {exc}; pass the .pub file written by 'edgefleet model keygen'"
        ) from exc


def load_public_keys(paths: Iterable[str | os.PathLike[str]]) -> list[Ed25519PublicKey]:
    """Read several public keys (a device may trust more than one, e.g. during key rotation)."""
    return [load_public_key(p) for p in paths]


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short, stable id of a key: the first 16 hex digits of sha256 over the raw public bytes."""
    if not hasattr(public_key, "public_bytes_raw"):  # a private key (or anything with a public half)
        public_key = public_key.public_key()
    return sha256(public_key.public_bytes_raw()).hexdigest()[:16]


def _verifies(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether `key` verifies `signature` over `data`. A key object may do it itself
    (`verifies`, e.g. out of process); a cryptography key raises InvalidSignature."""
    own = getattr(key, "verifies", None)
    if own is not None:
        return bool(own(signature, data))
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Ed25519 signature (64 bytes) over `data`."""
    return private_key.sign(data)


def verify_signature(
    public_keys: Iterable[Ed25519PublicKey],
    data: bytes,
    signature: bytes,
    revoked_key_ids: Collection[str] = (),
) -> str:
    """Return the key_id of the trusted key that verifies `signature`; raise SignatureError otherwise.

    A signature by a key in `revoked_key_ids` is refused by name, even when that key is still
    among `public_keys` (revocation wins over trust: a leaked key may sit in old configs).
    """
    keys = list(public_keys or [])
    if not keys:
        raise SignatureError(
            "no trusted public key given: pass the signer's public key (e.g. --public-key edgefleet.pub)"
        )
    if not signature:
        raise SignatureError("the bundle is not signed: sign it with --sign-key when converting")
    for key in keys:
        if not _verifies(key, signature, data):
            continue
        kid = key_id(key)
        if kid in revoked_key_ids:
            raise SignatureError(
                f"the bundle is signed by key {kid}, which is revoked: do not use it; "
                "re-sign the model with a key that is not revoked"
            )
        return kid
    ids = ", ".join(key_id(k) for k in keys)
    raise SignatureError(
        f"signature does not verify with any trusted key ({ids}): the manifest was changed "
        "after signing or it was signed by another key; rebuild or re-sign the bundle with a trusted key"
    )
