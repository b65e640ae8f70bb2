"""model_tools: turn fitted scikit-learn models into small, verified, signed ONNX bundles.

This package import stays light (numpy, msgspec, cryptography): devices import the bundle
reader and signing from here. The conversion pipeline (`model_tools.pipeline.build_bundle`)
needs the `tools` extra and is imported on first use.
"""

from __future__ import annotations

from typing import Any

from model_tools.bundle import (
    Bundle,
    BundleLimits,
    extract_bundle,
    load_extracted,
    read_bundle,
    write_bundle,
)
from model_tools.errors import (
    BundleError,
    ModelToolsError,
    SignatureError,
    TamperedBundleError,
    UnsafeBundleError,
)
from model_tools.feeds import feeds_from_columns, feeds_from_rows
from model_tools.manifest import Manifest, decode_manifest, encode_manifest
from model_tools.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_public_keys,
    save_private_key,
    save_public_key,
    sign,
    verify_signature,
)

__all__ = [
    "Bundle",
    "BundleError",
    "BundleLimits",
    "Manifest",
    "ModelToolsError",
    "SignatureError",
    "TamperedBundleError",
    "UnsafeBundleError",
    "build_bundle",
    "decode_manifest",
    "encode_manifest",
    "extract_bundle",
    "feeds_from_columns",
    "feeds_from_rows",
    "generate_keypair",
    "key_id",
    "load_extracted",
    "load_private_key",
    "load_public_key",
    "load_public_keys",
    "read_bundle",
    "save_private_key",
    "save_public_key",
    "sign",
    "verify_signature",
    "write_bundle",
]


def __getattr__(name: str) -> Any:
    # build_bundle pulls in scikit-learn and skl2onnx: load it only when asked for.
    if name == "build_bundle":
        from model_tools.pipeline import build_bundle

        return build_bundle
    raise AttributeError(f"module 'model_tools' has no attribute {name!r}")
