"""Server nodes: each `server run` records itself and its heartbeat (fleet_server.cluster)."""

from __future__ import annotations

from typing import Any

from fleet_server.storage.sqlite.connection import SqliteConnection, insert_row


class NodesMixin(SqliteConnection):
    def put_node(self, row: dict[str, Any]) -> None:
        with self._immediate() as conn:
            insert_row(conn, "nodes", {**row, "leader": int(bool(row.get("leader")))}, or_replace=True)

    def list_nodes(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM nodes ORDER BY started_at, node_id")
        return [{**r, "leader": bool(r["leader"])} for r in rows]
