"""Sandbox records on disk (SQLite in the state dir), so a restarted backend can re-adopt them.

Writes go to one thread of their own, in order: a state change never waits for the disk on the daemon's
event loop. A write that fails (a full disk) is logged; the record's next write catches it up.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapkernel.protocol.states import ENDED
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class SandboxRecord:
    id: str
    kernel_id: str
    runtime: str
    spec: pb.SandboxSpec
    dir: str
    state: int = pb.PENDING
    message: str = ""
    exit_code: int = 0
    gpu_indices: list[int] = field(default_factory=list)
    limits: str = ""
    created: float = 0.0
    notebook_path: str = ""
    pid: int = 0
    kernel_generation: int = 0
    kernel: pb.KernelConfig = field(default_factory=pb.KernelConfig)  # to start its kernel again on a wake
    last_activity: float = 0.0
    hibernation: str = ""  # how it is hibernated ("memory", "suspend", "state"); "" while awake
    hibernate_after: float = 0.0
    # A move past saving the kernel: a new sandbox starts from what was saved, which stays until the kernel runs
    # (should the new one fail, it starts again from it where it was). On disk: a restarted backend knows which
    # sandbox of a move it finds alive.
    relaunching: bool = False

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def to_pb(self) -> pb.Sandbox:
        return pb.Sandbox(
            id=self.id, kernel_id=self.kernel_id, runtime=self.runtime, state=self.state,  # type: ignore[arg-type]
            message=self.message, exit_code=self.exit_code, spec=self.spec,
            gpu_indices=self.gpu_indices, limits=self.limits, created=self.created,
            notebook_path=self.notebook_path, pid=self.pid, kernel_generation=self.kernel_generation,
            last_activity=self.last_activity, hibernation=self.hibernation, hibernate_after=self.hibernate_after,
        )


_COLUMNS = ("id", "kernel_id", "runtime", "spec", "dir", "state", "message", "exit_code", "gpu_indices",
            "limits", "created", "notebook_path", "pid", "kernel_generation", "kernel", "last_activity",
            "hibernation", "hibernate_after", "relaunching")
# Columns added after the first release, with their SQL types: databases of older backends get them added.
_ADDED = {"kernel": "BLOB", "last_activity": "REAL", "hibernation": "TEXT", "hibernate_after": "REAL",
          "relaunching": "INTEGER"}


class SandboxDB:
    def __init__(self, path: Path) -> None:
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-db")
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS sandboxes (id TEXT PRIMARY KEY, kernel_id TEXT, runtime TEXT, "
            "spec BLOB, dir TEXT, state INTEGER, message TEXT, exit_code INTEGER, gpu_indices TEXT, "
            "limits TEXT, created REAL, notebook_path TEXT, pid INTEGER, kernel_generation INTEGER)"
        )
        have = {row[1] for row in self.conn.execute("PRAGMA table_info(sandboxes)")}
        for name, sql_type in _ADDED.items():
            if name not in have:
                self.conn.execute(f"ALTER TABLE sandboxes ADD COLUMN {name} {sql_type}")

    def save(self, r: SandboxRecord) -> None:
        values = (r.id, r.kernel_id, r.runtime, r.spec.SerializeToString(), r.dir, r.state, r.message,
                  r.exit_code, json.dumps(r.gpu_indices), r.limits, r.created, r.notebook_path, r.pid,
                  r.kernel_generation, r.kernel.SerializeToString(), r.last_activity, r.hibernation,
                  r.hibernate_after, int(r.relaunching))
        marks = ",".join("?" * len(_COLUMNS))
        self._write(r.id, f"INSERT OR REPLACE INTO sandboxes ({','.join(_COLUMNS)}) VALUES ({marks})", values)

    def delete(self, sandbox_id: str) -> None:
        self._write(sandbox_id, "DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def _write(self, sandbox_id: str, sql: str, values: tuple[object, ...]) -> None:
        def done(f: Future[Any]) -> None:
            if (e := f.exception()) is not None:
                log.warning("sandbox_id=%s not recorded in the sandbox database (%s); a full disk? the next "
                            "change of it writes it again", sandbox_id, e)

        self.writer.submit(self.conn.execute, sql, values).add_done_callback(done)

    def load(self) -> list[SandboxRecord]:
        rows = self.writer.submit(
            lambda: self.conn.execute(f"SELECT {','.join(_COLUMNS)} FROM sandboxes ORDER BY created").fetchall()
        ).result()
        out = []
        for row in rows:
            d = dict(zip(_COLUMNS, row, strict=True))
            spec = pb.SandboxSpec()
            spec.ParseFromString(d.pop("spec"))
            d["gpu_indices"] = json.loads(d["gpu_indices"])
            kernel = pb.KernelConfig()
            kernel.ParseFromString(d.pop("kernel") or b"")
            d.update(last_activity=d["last_activity"] or 0.0, hibernation=d["hibernation"] or "",
                     hibernate_after=d["hibernate_after"] or 0.0, relaunching=bool(d["relaunching"]))
            out.append(SandboxRecord(spec=spec, kernel=kernel, **d))
        return out

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        self.conn.close()
