"""The nodes of a deployment: each `server run` names itself, heartbeats into storage, and reads
the others' rows for `GET /api/v1/cluster` and the console's overview.

A node's id is kept in its data dir (made once), so a restarted node is the same row. A node whose
heartbeat is older than three of its own intervals is shown as gone.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.version import __version__
from fleet_server.leadership import Leadership
from fleet_server.storage import Storage

log = logging.getLogger(__name__)

NODE_ID_FILE = "node-id"
MISSED_BEATS = 3  # heartbeats a node may miss before it is shown as gone


def node_id(data_dir: Path) -> str:
    """This node's id: `host-xxxxxx`, made on first start and kept in the data dir."""
    path = Path(data_dir) / NODE_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    host = socket.gethostname().split(".")[0][:40] or "node"
    made = f"{host}-{secrets.token_hex(3)}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(made + "\n")
    os.replace(tmp, path)
    return made


@dataclass
class Node:
    """One running node and its heartbeat (a loop calls `beat`)."""

    storage: Storage
    leadership: Leadership
    node_id: str
    url: str
    interval_s: float
    started_at: float = 0.0

    def __post_init__(self) -> None:
        self.started_at = self.started_at or time.time()
        self.last_beat = 0.0

    def row(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "host": socket.gethostname(), "pid": os.getpid(), "version": __version__,
            "url": self.url, "started_at": self.started_at, "heartbeat_at": time.time(),
            "heartbeat_s": self.interval_s, "leader": self.leadership.is_leader(),
        }

    def beat(self) -> None:
        self.storage.put_node(self.row())
        self.last_beat = time.time()


def cluster_view(storage: Storage, now: float | None = None) -> list[dict[str, Any]]:
    """Every node with its role: `leader`, `follower`, or `gone` (no heartbeat for three intervals)."""
    now = time.time() if now is None else now
    out = []
    for row in storage.list_nodes():
        age = max(0.0, now - row["heartbeat_at"])
        gone = age > MISSED_BEATS * row["heartbeat_s"] + 1.0
        role = "gone" if gone else ("leader" if row["leader"] else "follower")
        out.append({**row, "role": role, "gone": gone, "heartbeat_age_s": round(age, 3)})
    return out
