"""Fan-out traffic of the kernel's code, relayed by the agent between a unix socket and its link.

The kernel holds no token and no network: `snapkernel.fanout` connects to SNAPKERNEL_FANOUT_SOCKET, one
connection per job, and writes length-prefixed `MapRequest`s; each connection becomes a numbered stream of
`FanoutFrame`s on the agent link, and the backend's `MapResponse`s come back the same way. The agent does
not parse the messages, it only frames them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from snapkernel.errors import SnapkernelError
from snapkernel.protocol.frames import HEADER, FrameBuffer
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger("snapkernel.agent")
SEND_TIMEOUT = 10.0


class FanoutRelay:
    def __init__(self, path: str, send: Callable[[pb.AgentMessage], None], poller: Any) -> None:
        self.send = send
        self.poller = poller  # the agent's select.poll: the relay registers and unregisters its own fds
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self.listener.bind(path)
        finally:
            os.umask(old)
        self.listener.listen(16)
        self.listener.setblocking(False)
        poller.register(self.listener.fileno(), 1)  # POLLIN
        self.conns: dict[int, tuple[socket.socket, int, FrameBuffer]] = {}  # fd -> (conn, stream, frames)
        self.streams: dict[int, socket.socket] = {}
        self.next_stream = 1

    def on_readable(self, fd: int) -> None:
        if fd == self.listener.fileno():
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            stream = self.next_stream
            self.next_stream += 1
            self.conns[conn.fileno()] = (conn, stream, FrameBuffer())
            self.streams[stream] = conn
            self.poller.register(conn.fileno(), 1)
            return
        if fd not in self.conns:  # closed by an earlier event of the same poll
            return
        conn, stream, frames = self.conns[fd]
        try:
            data = conn.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(fd, tell_backend=True)
            return
        try:
            for body in frames.feed(data):
                self.send(pb.AgentMessage(fanout=pb.FanoutFrame(stream=stream, data=body)))
        except SnapkernelError as e:
            log.warning("fan-out stream %s: %s", stream, e)
            self._close(fd, tell_backend=True)

    def deliver(self, frame: pb.FanoutFrame) -> None:
        """A frame from the backend to its connection."""
        conn = self.streams.get(frame.stream)
        if conn is None:
            return
        fd = conn.fileno()
        if frame.data:
            try:
                conn.settimeout(SEND_TIMEOUT)  # the client reads all the time; a short wait is fine
                conn.sendall(HEADER.pack(len(frame.data)) + frame.data)
                conn.setblocking(False)
            except OSError:  # timeouts included: a client that stopped reading loses its job
                frame = pb.FanoutFrame(stream=frame.stream, closed=True)
        if frame.closed:
            self._close(fd, tell_backend=False)

    def _close(self, fd: int, tell_backend: bool) -> None:
        conn, stream, _ = self.conns.pop(fd)
        self.streams.pop(stream, None)
        self.poller.unregister(fd)
        conn.close()
        if tell_backend:
            self.send(pb.AgentMessage(fanout=pb.FanoutFrame(stream=stream, closed=True)))

    def close_all(self) -> None:
        """The kernel stopped: its jobs end (the backend cancels what they left)."""
        for fd in list(self.conns):
            self._close(fd, tell_backend=True)
