"""The sandbox lifecycle: which state may follow which, and one message form for a refused move.

Every state change of a sandbox goes through `check_move` (in `SandboxManager.set_state`), and every request
that does not fit a sandbox's state or what it is busy with is refused through `refuse`, so the rules live here
and read the same everywhere: `sandbox sb-…: cannot hibernate while snapshotting`.
"""

from __future__ import annotations

import enum

from snapkernel.errors import StateError
from snapkernel.protocol.states import STATE_NAMES
from snapkernel.protocol.v1 import backend_pb2 as pb

_ENDINGS = frozenset({pb.EXITED, pb.LOST, pb.FAILED})  # how a live sandbox can end without being deleted
# A state may always be set again (a new message, a kernel restarted while running); these are the moves.
MOVES: dict[int, frozenset[int]] = {
    pb.PENDING: frozenset({pb.STARTING, pb.STOPPING, *_ENDINGS}),
    # RUNNING once its kernel runs (or at once, resumed from a memory snapshot); KERNEL_EXITED if it dies first.
    pb.STARTING: frozenset({pb.RUNNING, pb.KERNEL_EXITED, pb.STOPPING, *_ENDINGS}),
    # FAILED: a restored state snapshot that does not load.
    pb.RUNNING: frozenset({pb.KERNEL_EXITED, pb.HIBERNATING, pb.MOVING, pb.STOPPING, *_ENDINGS}),
    pb.KERNEL_EXITED: frozenset({pb.RUNNING, pb.STOPPING, *_ENDINGS}),  # RUNNING: restarted
    # RUNNING: it could not hibernate, so it stays awake (or a backend restart found it half-way).
    pb.HIBERNATING: frozenset({pb.HIBERNATED, pb.RUNNING, pb.STOPPING, *_ENDINGS}),
    pb.HIBERNATED: frozenset({pb.WAKING, pb.STOPPING, *_ENDINGS}),
    # HIBERNATED: a backend restart found a suspended one half-way through waking.
    pb.WAKING: frozenset({pb.RUNNING, pb.HIBERNATED, pb.STOPPING, *_ENDINGS}),
    # RUNNING: moved, or back where it was; HIBERNATED: a backend restart found it stopped half-way, its image or
    # variables saved.
    pb.MOVING: frozenset({pb.RUNNING, pb.HIBERNATED, pb.STOPPING, *_ENDINGS}),
    pb.STOPPING: frozenset({pb.DELETED, *_ENDINGS}),
    # An ended sandbox only goes away (deleting one that ended skips STOPPING: nothing is left to stop).
    **{ended: frozenset({pb.STOPPING, pb.DELETED}) for ended in _ENDINGS},
    pb.DELETED: frozenset(),
}


class Activity(enum.Enum):
    """What a sandbox is doing besides being in its state, one at a time: another is refused while one runs
    (`cannot hibernate while snapshotting`), except that deleting takes over from any."""
    SNAPSHOTTING = "snapshotting"
    HIBERNATING = "hibernating"
    MOVING = "moving"
    DELETING = "deleting"
    RESTORING = "restoring"  # from a memory image, until it has its identity (sandboxes.py)
    TEMPLATING = "becoming a template"  # its image is taken and it stops (templates.py)


def allowed(current: int, new: int) -> bool:
    return new == current or new in MOVES[current]


def check_move(sandbox_id: str, current: int, new: int) -> None:
    """Refuse a state change the lifecycle does not have (a bug in the backend, never a user's doing)."""
    if not allowed(current, new):
        raise StateError(f"sandbox {sandbox_id}: cannot become {STATE_NAMES[new]} while {STATE_NAMES[current]}")


def refuse(sandbox_id: str, action: str, why: str, advice: str = "") -> StateError:
    """The one form of a refused request: `sandbox sb-…: cannot ACTION while WHY[; ADVICE]`."""
    return StateError(f"sandbox {sandbox_id}: cannot {action} while {why}" + (f"; {advice}" if advice else ""))
