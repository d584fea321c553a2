"""Snapshot kinds: the one list of them and the one check, shared by the store, the backend, the REST
handler, the magics and the command line (whose `--kind` offers `SNAPSHOT_KINDS` as its choices).

`memory` is the exact image of a sandbox (restores under the same runtime and GPU model); `state` is the
kernel's variables (restores anywhere).
"""

from __future__ import annotations

from snapkernel.errors import InvalidSpecError

SNAPSHOT_KINDS = ("memory", "state")
DEFAULT_SNAPSHOT_KIND = "memory"


def check_snapshot_kind(kind: str) -> str:
    """`kind` when it is a snapshot kind; otherwise an `InvalidSpecError` that names it and the kinds."""
    if kind not in SNAPSHOT_KINDS:
        accepted = " or ".join(repr(k) for k in SNAPSHOT_KINDS)
        raise InvalidSpecError(f"snapshot kind {kind!r} is not known: use {accepted}")
    return kind
