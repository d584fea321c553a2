"""The sandbox lifecycle's transition table, in-process: every move it lists is reachable from PENDING,
every other move is refused with the one message form."""

from __future__ import annotations

import itertools

import pytest

from snapkernel.backend import lifecycle
from snapkernel.backend.lifecycle import Activity
from snapkernel.backend.sandbox import LiveSandbox
from snapkernel.backend.sandbox_db import SandboxRecord
from snapkernel.errors import StateError
from snapkernel.protocol.spec import ParsedSpec
from snapkernel.protocol.v1 import backend_pb2 as pb

STATES = [s for s in pb.SandboxState.values() if s != pb.SANDBOX_STATE_UNSPECIFIED]


def test_every_state_has_its_moves_and_every_state_is_reachable() -> None:
    assert set(lifecycle.MOVES) == set(STATES)
    reached, frontier = {pb.PENDING}, [pb.PENDING]
    while frontier:
        for new in lifecycle.MOVES[frontier.pop()]:
            if new not in reached:
                reached.add(new)
                frontier.append(new)
    assert reached == set(STATES)


def test_every_state_can_end_and_be_deleted() -> None:
    for state in STATES:
        if state != pb.DELETED:
            assert pb.DELETED in lifecycle.MOVES[state] or pb.STOPPING in lifecycle.MOVES[state], state


@pytest.mark.parametrize(("current", "new"), [
    (c, n) for c, n in itertools.product(STATES, STATES) if c != n and n not in lifecycle.MOVES[c]])
def test_a_move_not_in_the_table_is_refused_naming_both_states(current: int, new: int) -> None:
    with pytest.raises(StateError) as e:
        lifecycle.check_move("sb-000000000000", current, new)
    assert str(e.value) == (f"sandbox sb-000000000000: cannot become {pb.SandboxState.Name(new).lower()} "
                            f"while {pb.SandboxState.Name(current).lower()}")


def test_legal_moves_and_staying_put_pass() -> None:
    for current in STATES:
        lifecycle.check_move("sb-000000000000", current, current)
        for new in lifecycle.MOVES[current]:
            lifecycle.check_move("sb-000000000000", current, new)


def test_nothing_leaves_deleted_and_an_ended_sandbox_only_goes_away() -> None:
    assert lifecycle.MOVES[pb.DELETED] == frozenset()
    for ended in (pb.EXITED, pb.LOST, pb.FAILED):
        assert lifecycle.MOVES[ended] == {pb.STOPPING, pb.DELETED}


def test_a_refused_request_reads_the_same_everywhere() -> None:
    err = lifecycle.refuse("sb-000000000000", "hibernate", "snapshotting", "try again when it is idle")
    assert isinstance(err, StateError) and err.reason == "wrong_state"
    assert str(err) == "sandbox sb-000000000000: cannot hibernate while snapshotting; try again when it is idle"


def _sandbox() -> LiveSandbox:
    record = SandboxRecord(id="sb-000000000000", kernel_id="k", runtime="process", spec=pb.SandboxSpec(), dir="/x")
    spec = ParsedSpec(gpu=None, cpu=1.0, memory=1 << 30, disk=1 << 30, runtime="process", image="", restore_from="",
                      hibernate_after=None, network=False)
    return LiveSandbox(record, spec)


def test_one_activity_at_a_time_and_a_deletion_takes_over() -> None:
    sb = _sandbox()
    with sb.doing(Activity.SNAPSHOTTING, "snapshot"):
        with pytest.raises(StateError) as refused, sb.doing(Activity.HIBERNATING, "hibernate", "try again later"):
            pass
        assert str(refused.value) == "sandbox sb-000000000000: cannot hibernate while snapshotting; try again later"
        assert sb.activity is Activity.SNAPSHOTTING  # the refused one changed nothing
    assert sb.activity is None
    with sb.doing(Activity.HIBERNATING, "hibernate"):
        sb.activity = Activity.DELETING  # what SandboxManager.delete does
    assert sb.deleting  # the hibernation's end leaves the deletion in place
    with pytest.raises(StateError, match="cannot snapshot while deleting"), sb.doing(Activity.SNAPSHOTTING, "snapshot"):
        pass


def test_an_activity_that_fails_frees_the_sandbox() -> None:
    sb = _sandbox()
    with pytest.raises(OSError), sb.doing(Activity.SNAPSHOTTING, "snapshot"):
        raise OSError("disk full")
    assert sb.activity is None
