"""Length-prefixed frames of `AgentMessage`s: the agent link on stdio, the shim socket, nothing else.

Each frame is a 4-byte big-endian length followed by one serialized `AgentMessage`.

Light to import: the shim (which relays frames whole) never loads protobuf and a fan-out worker (which reads
its link with a blocking thread) never loads asyncio: each starts in every new sandbox, and a cold fan-out
waits for them.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from snapkernel.errors import InvalidSpecError

if TYPE_CHECKING:
    import asyncio

    from snapkernel.protocol.v1 import backend_pb2 as pb

HEADER = struct.Struct(">I")
MAX_FRAME = 512 * 1024 * 1024  # a kernel message larger than this is refused, not buffered


def encode(msg: pb.AgentMessage) -> bytes:
    body = msg.SerializeToString()
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> pb.AgentMessage:
    from snapkernel.protocol.v1 import backend_pb2 as pb

    msg = pb.AgentMessage()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf raises DecodeError, a bare Exception subclass
        raise InvalidSpecError(f"malformed agent frame of {len(body)} bytes: {e}") from e
    return msg


class FrameBuffer:
    """Accumulates bytes read from a non-blocking fd and yields whole frame bodies."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise InvalidSpecError(f"agent frame of {size} bytes is over the {MAX_FRAME} byte limit")
            end = HEADER.size + size
            if len(self._buf) < end:
                break
            out.append(bytes(self._buf[HEADER.size:end]))
            del self._buf[:end]
        return out


async def _read_head(reader: asyncio.StreamReader, size: int, broken: str) -> bytes | None:
    """`size` bytes, or None at a clean end of stream; an end inside them raises `broken`."""
    from asyncio import IncompleteReadError  # loaded already: the reader is asyncio's

    try:
        return await reader.readexactly(size)
    except IncompleteReadError as e:
        if e.partial:
            raise InvalidSpecError(broken) from e
        return None


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next whole frame (header included), or None at a clean end of stream."""
    head = await _read_head(reader, HEADER.size, "agent link closed in the middle of a frame header")
    if head is None:
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise InvalidSpecError(f"agent frame of {size} bytes is over the {MAX_FRAME} byte limit")
    return head + await reader.readexactly(size)


# --- the shim's socket ------------------------------------------------------------------------------
# Between a sandbox's shim and the backend, each frame is preceded by an 8-byte big-endian word. Shim to
# backend: the frame's number (rising from a start the shim picks, never 0); the shim keeps every frame until
# the backend acknowledges it and sends the unacknowledged ones again to the next backend that connects.
# Backend to shim: 0 and a frame for the agent, or a number alone: every frame up to it is acknowledged.
SEQ = struct.Struct(">Q")


async def read_numbered(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """(number, frame) from the shim's socket; or None at a clean end of stream."""
    head = await _read_head(reader, SEQ.size, "shim link closed in the middle of a frame number")
    if head is None:
        return None
    (seq,) = SEQ.unpack(head)
    frame = await read_frame(reader)
    if frame is None:
        raise InvalidSpecError("shim link closed after a frame number")
    return seq, frame


async def read_from_backend(reader: asyncio.StreamReader) -> tuple[int, bytes | None] | None:
    """(0, frame) for the agent or (n, None), an acknowledgement, from the backend; None at its end."""
    head = await _read_head(reader, SEQ.size, "backend link closed in the middle of a frame number")
    if head is None:
        return None
    (seq,) = SEQ.unpack(head)
    if seq:
        return seq, None
    frame = await read_frame(reader)
    if frame is None:
        raise InvalidSpecError("backend link closed after a frame number")
    return 0, frame
