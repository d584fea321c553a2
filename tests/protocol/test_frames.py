import pytest

from snapkernel.errors import InvalidSpecError
from snapkernel.protocol.frames import HEADER, MAX_FRAME, FrameBuffer, decode, encode
from snapkernel.protocol.v1 import backend_pb2 as pb


def test_frames_split_and_joined_across_reads() -> None:
    msgs = [pb.AgentMessage(frame=pb.KernelFrame(channel=pb.SHELL, parts=[b"id", b"x" * n])) for n in (0, 5, 70000)]
    data = b"".join(encode(m) for m in msgs)
    buf = FrameBuffer()
    bodies = []
    for i in range(0, len(data), 1000):  # arbitrary read boundaries
        bodies += buf.feed(data[i:i + 1000])
    assert [decode(b) for b in bodies] == msgs


def test_oversized_and_garbage_frames_are_refused() -> None:
    with pytest.raises(InvalidSpecError, match="over the"):
        FrameBuffer().feed(HEADER.pack(MAX_FRAME + 1))
    with pytest.raises(InvalidSpecError, match="malformed agent frame"):
        decode(b"\xff\xff\xff")
