"""Snapshot kinds are checked in one place, with one message, on both sides."""

from __future__ import annotations

import pytest

from snapkernel.errors import InvalidSpecError
from snapkernel.protocol.kinds import DEFAULT_SNAPSHOT_KIND, SNAPSHOT_KINDS, check_snapshot_kind


def test_known_kinds_pass() -> None:
    assert SNAPSHOT_KINDS == ("memory", "state") and DEFAULT_SNAPSHOT_KIND in SNAPSHOT_KINDS
    for kind in SNAPSHOT_KINDS:
        assert check_snapshot_kind(kind) == kind


@pytest.mark.parametrize("kind", ["disk", "", "Memory", "memory "])
def test_unknown_kind_is_named_with_the_kinds_accepted(kind: str) -> None:
    with pytest.raises(InvalidSpecError) as e:
        check_snapshot_kind(kind)
    assert str(e.value) == f"snapshot kind {kind!r} is not known: use 'memory' or 'state'"


def test_the_command_line_offers_the_same_kinds() -> None:
    from snapkernel.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["snapshots", "create", "sb-000000000000", "--kind", "state"])
    assert args.kind == "state"
    with pytest.raises(SystemExit):
        parser.parse_args(["snapshots", "create", "sb-000000000000", "--kind", "disk"])
