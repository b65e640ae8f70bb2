"""SHA-256 without OpenSSL: the interpreter's built-in implementation when it has one.

`import hashlib` loads OpenSSL's libcrypto (about 3.5 MiB of resident memory) to offer its
digests. The agent hashes bundles, downloads and desired states, a few kilobytes to megabytes
now and then, for which CPython's own SHA-256 is fast enough: a long-lived device process keeps
that memory. hashlib remains the fallback for an interpreter built without the module.
"""

from __future__ import annotations

from typing import Any

try:  # CPython 3.12 and later
    from _sha2 import sha256 as _sha256
except ImportError:
    try:  # CPython 3.11
        from _sha256 import sha256 as _sha256
    except ImportError:
        from hashlib import sha256 as _sha256

__all__ = ["sha256", "sha256_hex"]


def sha256(data: bytes = b"") -> Any:
    """A SHA-256 hash object (`update`, `digest`, `hexdigest`), as `hashlib.sha256` returns."""
    return _sha256(data)


def sha256_hex(data: bytes) -> str:
    return _sha256(data).hexdigest()
