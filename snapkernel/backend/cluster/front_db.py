"""The front's own record of where each sandbox was placed, so that a restarted front finds its placement
groups and the sandboxes of nodes that died (the nodes' daemons know the rest)."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from snapkernel.protocol.v1 import backend_pb2 as pb


@dataclass
class Placed:
    sandbox_id: str
    node: str  # the node's name
    ray_node_id: str
    group: str  # the placement group's name; "" while the sandbox holds none (hibernated)
    request: pb.CreateSandboxRequest  # as it came: a sandbox re-placed on another node is created from it
    last: pb.Sandbox  # as the node last reported it
    seq_base: int = 0  # output numbers given out before it came to this node (front_attach.py)


class FrontDB:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.lock = threading.Lock()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS placed (id TEXT PRIMARY KEY, node TEXT, ray_node_id TEXT, "
                        "grp TEXT, request BLOB, last BLOB, seq_base INTEGER)")
        path.chmod(0o600)  # the requests hold the kernels' session keys

    def save(self, p: Placed) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO placed VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (p.sandbox_id, p.node, p.ray_node_id, p.group, p.request.SerializeToString(),
                             p.last.SerializeToString(), p.seq_base))

    def forget(self, sandbox_id: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM placed WHERE id = ?", (sandbox_id,))

    def load(self) -> list[Placed]:
        with self.lock:
            rows = self.db.execute("SELECT id, node, ray_node_id, grp, request, last, seq_base FROM placed").fetchall()
        return [Placed(r[0], r[1], r[2], r[3], pb.CreateSandboxRequest.FromString(r[4]),
                       pb.Sandbox.FromString(r[5]), r[6]) for r in rows]

    def close(self) -> None:
        self.db.close()
