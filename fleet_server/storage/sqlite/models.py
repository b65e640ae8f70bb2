"""Models (bundles' registry rows and drift policies), signing keys and API tokens."""

from __future__ import annotations

from typing import Any

from fleet_server.storage.base import Conflict
from fleet_server.storage.sqlite.connection import (
    IntegrityError,
    SqliteConnection,
    decode,
    dumps,
    insert_row,
)


class ModelsMixin(SqliteConnection):
    def insert_model(self, row: dict[str, Any]) -> None:
        row = {**row, "manifest": row["manifest"] if isinstance(row["manifest"], str) else dumps(row["manifest"])}
        with self._immediate() as conn:
            try:
                insert_row(conn, "models", row)
            except IntegrityError as exc:
                raise Conflict(f"model {row['name']} {row['version']} already exists") from exc

    def put_bundle(self, sha256: str, data: bytes) -> None:
        pass  # one machine: the data dir's bundles/ directory is the copy every process reads

    def bundle_bytes(self, sha256: str) -> bytes | None:
        return None

    def get_model(self, name: str, version: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM models WHERE name = ? AND version = ?", [name, version])
        return decode(rows, "manifest", "policy")[0] if rows else None

    def list_models(self, name: str | None = None) -> list[dict[str, Any]]:
        if name is None:
            rows = self._rows("SELECT * FROM models ORDER BY name, uploaded_at")
        else:
            rows = self._rows("SELECT * FROM models WHERE name = ? ORDER BY uploaded_at", [name])
        return decode(rows, "manifest", "policy")

    def set_model_policy(self, name: str, version: str, policy: dict[str, Any] | None) -> bool:
        with self._immediate() as conn:
            cur = conn.execute(
                "UPDATE models SET policy = ? WHERE name = ? AND version = ?",
                (dumps(policy) if policy is not None else None, name, version),
            )
            return cur.rowcount > 0

    def add_trusted_key(self, key_id: str, pem: str, comment: str, now: float) -> None:
        with self._immediate() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO trusted_keys(key_id, pem, comment, added_at) VALUES (?,?,?,?)",
                (key_id, pem, comment, now),
            )

    def trusted_keys(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM trusted_keys ORDER BY added_at")

    def remove_trusted_key(self, key_id: str) -> bool:
        with self._immediate() as conn:
            return conn.execute("DELETE FROM trusted_keys WHERE key_id = ?", (key_id,)).rowcount > 0

    def revoked_keys(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM revoked_keys ORDER BY revoked_at")

    def revoke_key(self, key_id: str, now: float, reason: str) -> bool:
        with self._immediate() as conn:
            return conn.execute(
                "INSERT OR IGNORE INTO revoked_keys(key_id, revoked_at, reason) VALUES (?,?,?)", (key_id, now, reason)
            ).rowcount > 0

    def insert_token(self, name: str, role: str, token_hash: str, now: float,
                     expires_at: float | None = None) -> int:
        with self._immediate() as conn:
            return insert_row(conn, "tokens", {"name": name, "role": role, "token_hash": token_hash,
                                               "created_at": now, "expires_at": expires_at})

    def find_token(self, token_hash: str) -> dict[str, Any] | None:
        return self._one(
            "SELECT id, name, role, created_at, expires_at FROM tokens WHERE token_hash = ? AND revoked_at IS NULL",
            [token_hash],
        )
