"""Model registry services: trusted keys, verified bundle upload, listing, download files, policies.

Bundles are stored content-addressed (`bundles/{sha256}.efb`): model names and versions never
become file names.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.protocol import DesiredState, UpdateMode, valid_id
from fleet_server.alerts import DriftPolicy, PolicyError
from fleet_server.storage import Conflict
from model_tools.bundle import BundleError, read_bundle
from model_tools.signing import key_id

if TYPE_CHECKING:
    from fleet_server.context import Services


class RegistryError(ValueError):
    """A registry request that cannot be done; the message says why and what to do."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------ trusted keys


def parse_public_key(pem: bytes | str) -> Ed25519PublicKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise RegistryError(
            f"not a PEM public key ({exc}); pass the .pub file written by 'edgefleet model keygen'"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise RegistryError("only Ed25519 public keys sign edgefleet bundles; use 'edgefleet model keygen'")
    return key


def trust_key(svc: Services, pem: bytes | str, comment: str = "") -> str:
    """Add a bundle-signing public key to the server's trusted keys; returns its key id."""
    key = parse_public_key(pem)
    canonical = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    kid = key_id(key)
    revoked = revoked_keys(svc).get(kid)
    if revoked is not None:
        raise RegistryError(
            f"key {kid} was revoked ({revoked['reason'] or 'no reason given'}): a revoked key is never "
            "trusted again; sign bundles with a new key ('edgefleet model keygen') and trust that one",
            409,
        )
    svc.storage.add_trusted_key(kid, canonical.decode(), comment, svc.clock())
    return kid


KEY_ID = re.compile(r"^[0-9a-f]{16}$")


def revoked_keys(svc: Services) -> dict[str, dict[str, Any]]:
    """Revoked signing keys by key id."""
    return {row["key_id"]: row for row in svc.storage.revoked_keys()}


def revoke_key(svc: Services, kid: str, reason: str = "") -> bool:
    """Revoke a bundle-signing key: bundles it signed are refused from now on, also when its PEM
    comes from `trusted_key_files`. Returns False when it was already revoked. Devices refuse
    them through their own `[trust] revoked_key_ids`."""
    kid = kid.strip().lower()
    if not KEY_ID.match(kid):
        raise RegistryError(f"{kid[:40]!r} is not a key id: use the 16 hex digits listed by GET /api/v1/keys")
    return svc.storage.revoke_key(kid, svc.clock(), reason)


def trusted_key_pems(svc: Services) -> list[str]:
    pems = [row["pem"] for row in svc.storage.trusted_keys()]
    for path in svc.config.trusted_key_files:
        pems.append(Path(path).read_text())
    return pems


def trusted_public_keys(svc: Services) -> list[Ed25519PublicKey]:
    return [parse_public_key(pem) for pem in trusted_key_pems(svc)]


# ------------------------------------------------------------------ bundles


def download_url(svc: Services, name: str, version: str) -> str:
    return f"{svc.config.server_url}/api/v1/models/{quote(name, safe='')}/{quote(version, safe='')}/bundle"


def model_summary(svc: Services, row: dict[str, Any]) -> dict[str, Any]:
    """A model as listed: the manifest's parity, quantization, lineage and sizes, without bins."""
    m = row["manifest"]
    return {
        "name": row["name"],
        "version": row["version"],
        "sha256": row["sha256"],
        "size": row["size"],
        "key_id": row["key_id"],
        "uploaded_at": row["uploaded_at"],
        "task": m.get("task"),
        "variant": m.get("variant"),
        "created_at": m.get("created_at"),
        "features": [{"index": i, "name": f["name"], "kind": f["kind"]} for i, f in enumerate(m.get("inputs", []))],
        "parity": m.get("parity", {}),
        "quantization": m.get("quantization", {}),
        "lineage": m.get("lineage", {}),
        "budget": m.get("budget", {}),
        "reference_rows": m.get("profile", {}).get("rows"),
        "profile_warnings": m.get("profile", {}).get("warnings", []),
        "drift_policy": effective_policy(svc, row).to_dict(),
        "policy_override": row["policy"],
        "download_url": download_url(svc, row["name"], row["version"]),
    }


def upload_bundle(svc: Services, data: bytes) -> dict[str, Any]:
    """Verify a bundle against the trusted keys and store it; idempotent for identical bytes."""
    keys = trusted_public_keys(svc)
    if not keys:
        raise RegistryError(
            "the server trusts no signing key yet: add one with 'edgefleet server trust-key KEY.pub' "
            "(or POST /api/v1/keys), then upload again"
        )
    try:
        bundle = read_bundle(data, keys, require_signature=True, revoked_key_ids=revoked_keys(svc))
    except BundleError as exc:
        raise RegistryError(f"bundle refused: {exc}", 422) from exc
    name, version = bundle.manifest.name, bundle.manifest.version
    for what, value in (("name", name), ("version", version)):
        if not valid_id(value):
            raise RegistryError(
                f"bundle {what} {value!r} cannot be registered: use 1-64 letters, digits, '.', '_' or '-' "
                "(rebuild the bundle with such a name/version)",
                422,
            )
    sha = hashlib.sha256(data).hexdigest()
    existing = svc.storage.get_model(name, version)
    if existing is not None:
        if existing["sha256"] == sha:
            return model_summary(svc, existing)
        raise RegistryError(
            f"model {name} {version} is already registered with different content "
            f"(sha256 {existing['sha256'][:12]}...): give the new bundle a new version",
            409,
        )
    rel = Path("bundles") / f"{sha}.efb"
    _write_bundle(svc.config.data_dir / rel, data)
    svc.storage.put_bundle(sha, data)  # before the row: a registered model always has its bytes
    row = {
        "name": name,
        "version": version,
        "sha256": sha,
        "size": len(data),
        "key_id": bundle.key_id,
        "manifest": bundle.manifest_bytes.decode(),
        "file": str(rel),
        "uploaded_at": svc.clock(),
    }
    try:
        svc.storage.insert_model(row)
    except Conflict as exc:  # a concurrent upload of the same name/version won the race
        raise RegistryError(f"model {name} {version} was registered concurrently; list models", 409) from exc
    return model_summary(svc, svc.storage.get_model(name, version) or {})


def list_models(svc: Services, name: str | None = None) -> list[dict[str, Any]]:
    return [model_summary(svc, row) for row in svc.storage.list_models(name)]


def get_model(svc: Services, name: str, version: str) -> dict[str, Any]:
    row = svc.storage.get_model(name, version)
    if row is None:
        raise RegistryError(f"no model {name!r} version {version!r}; list models with GET /api/v1/models", 404)
    return row


def model_detail(svc: Services, name: str, version: str) -> dict[str, Any]:
    row = get_model(svc, name, version)
    return {**model_summary(svc, row), "manifest": row["manifest"]}


def _write_bundle(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def bundle_file(svc: Services, name: str, version: str) -> tuple[Path, dict[str, Any]]:
    """The bundle's file in this node's data dir; a bundle uploaded through another node sharing
    the database is fetched from storage once and cached here (content-addressed, immutable)."""
    row = get_model(svc, name, version)
    path = svc.config.data_dir / row["file"]
    if not path.is_file():
        data = svc.storage.bundle_bytes(row["sha256"])
        if data is not None and hashlib.sha256(data).hexdigest() == row["sha256"]:
            _write_bundle(path, data)
    return path, row


def effective_policy(svc: Services, row: dict[str, Any] | None) -> DriftPolicy:
    base = DriftPolicy(
        warn_psi=svc.config.warn_psi,
        alert_psi=svc.config.alert_psi,
        min_predictions=svc.config.min_predictions,
        consecutive=svc.config.consecutive,
    )
    return DriftPolicy.from_dict((row or {}).get("policy"), base)


def set_policy(svc: Services, name: str, version: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Override the drift policy of one model version (None/empty restores the server default)."""
    row = get_model(svc, name, version)
    try:
        effective_policy(svc, {"policy": overrides})
    except PolicyError as exc:
        raise RegistryError(str(exc)) from exc
    svc.storage.set_model_policy(name, version, overrides or None)
    return model_summary(svc, {**row, "policy": overrides or None})


def desired_state(
    svc: Services, name: str, version: str, *, mode: UpdateMode = "live", rollout_id: str | None = None,
    allow_downgrade: bool = False,
) -> DesiredState:
    """The DesiredState that points a device at a registered model version (used by rollouts)."""
    row = get_model(svc, name, version)
    return DesiredState(
        model=name,
        version=version,
        url=download_url(svc, name, version),
        sha256=row["sha256"],
        size=row["size"],
        mode=mode,
        rollout_id=rollout_id,
        allow_downgrade=allow_downgrade,
        issued_at=svc.clock(),
    )
