"""Reading Jupyter messages out of kernel frames, in-process."""

from __future__ import annotations

from snapkernel.protocol import wire


def frame(msg_type: str, content: bytes, identities: int = 1) -> list[bytes]:
    header = f'{{"msg_id": "1", "msg_type": "{msg_type}"}}'.encode()
    return [b"id"] * identities + [wire.DELIM, b"sig", header, b"{}", b"{}", content]


def test_the_parts_after_the_delimiter_whatever_the_identities() -> None:
    for n in (0, 1, 3):
        assert wire.message_parts(frame("status", b"{}", n))[0] == b"sig"
    assert wire.message_parts([b"id", wire.DELIM, b"sig"]) == []  # not a whole message
    assert wire.message_parts([b"no", b"delimiter"] * 4) == []


def test_msg_type_and_an_unreadable_header() -> None:
    assert wire.msg_type(frame("execute_request", b"{}")) == "execute_request"
    assert wire.msg_type([wire.DELIM, b"sig", b"not json", b"{}", b"{}", b"{}"]) == "?"
    assert wire.msg_type([wire.DELIM, b"sig", b"[1]", b"{}", b"{}", b"{}"]) == "?"
    assert wire.msg_type([b"junk"]) == "?"


def test_kernel_status_only_for_status_messages() -> None:
    assert wire.kernel_status(frame("status", b'{"execution_state": "busy"}')) == "busy"
    assert wire.kernel_status(frame("status", b'{"execution_state": "idle"}')) == "idle"
    assert wire.kernel_status(frame("status", b'{"execution_state": "starting"}')) == "idle"
    assert wire.kernel_status(frame("stream", b'{"text": "\\"busy\\""}')) is None
    assert wire.kernel_status([b"junk"]) is None
