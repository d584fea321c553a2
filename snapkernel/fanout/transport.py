"""How a fan-out job reaches the backend: one bidirectional stream of MapRequest / MapResponse.

Inside a snapkernel sandbox the kernel has no network and no token: it talks to its agent's unix socket
(SNAPKERNEL_FANOUT_SOCKET), which relays the stream over the agent link. Elsewhere (`%load_ext snapkernel`
in a plain kernel, a script) the same messages go over the backend's gRPC `Map` call (SNAPKERNEL_BACKEND,
SNAPKERNEL_TOKEN). Both are blocking, thread-safe senders plus a reader thread feeding a queue.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
from typing import Any, Protocol

from snapkernel.errors import BackendUnavailableError, SnapkernelError, from_grpc
from snapkernel.protocol.frames import HEADER, MAX_FRAME
from snapkernel.protocol.v1 import backend_pb2 as pb

_CLOSED = object()


class Transport(Protocol):
    def send(self, req: pb.MapRequest) -> None: ...
    def recv(self, timeout: float) -> pb.MapResponse | None:
        """The next response; None when none came in time. Raises when the stream broke."""
    def close(self) -> None: ...


class _Inbox:
    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.error: SnapkernelError | None = None

    def recv(self, timeout: float) -> pb.MapResponse | None:
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _CLOSED:
            self.queue.put(_CLOSED)
            raise self.error or BackendUnavailableError("the fan-out stream to the backend closed unexpectedly")
        return item  # type: ignore[no-any-return]


class SocketTransport(_Inbox):
    """Through the sandbox's agent."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as e:
            raise BackendUnavailableError(f"cannot reach this sandbox's agent at {path} ({e}): restart the "
                                          "kernel") from e
        self.lock = threading.Lock()
        threading.Thread(target=self._read, name="fanout-reader", daemon=True).start()

    def send(self, req: pb.MapRequest) -> None:
        body = req.SerializeToString()
        with self.lock:
            self.sock.sendall(HEADER.pack(len(body)) + body)

    def _read(self) -> None:
        f = self.sock.makefile("rb")
        try:
            while len(head := f.read(HEADER.size)) == HEADER.size:
                (size,) = HEADER.unpack(head)
                if size > MAX_FRAME:
                    break
                resp = pb.MapResponse()
                resp.ParseFromString(f.read(size))
                self.queue.put(resp)
        except (OSError, ValueError):
            pass
        self.queue.put(_CLOSED)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class GrpcTransport(_Inbox):
    """Straight to the backend's `Map` call."""

    def __init__(self) -> None:
        import grpc

        from snapkernel.protocol.connection import (
            GRPC_OPTIONS,
            call_metadata,
            default_address,
            default_token,
            grpc_target,
        )
        from snapkernel.protocol.v1 import backend_pb2_grpc as pb_grpc

        super().__init__()
        self.address = default_address()
        target = grpc_target(self.address)
        ca = os.environ.get("SNAPKERNEL_TLS_CA")
        if ca and not target.startswith("unix://"):
            with open(ca, "rb") as f:
                creds = grpc.ssl_channel_credentials(f.read())
            self.channel = grpc.secure_channel(target, creds, options=GRPC_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        self.outgoing: queue.SimpleQueue[Any] = queue.SimpleQueue()
        stub = pb_grpc.BackendStub(self.channel)
        self.call = stub.Map(iter(self.outgoing.get, _CLOSED),
                             metadata=call_metadata(default_token(self.address)))
        threading.Thread(target=self._read, name="fanout-reader", daemon=True).start()

    def send(self, req: pb.MapRequest) -> None:
        self.outgoing.put(req)

    def _read(self) -> None:
        import grpc

        try:
            for resp in self.call:
                self.queue.put(resp)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                self.error = from_grpc(e, self.address)
        self.queue.put(_CLOSED)

    def close(self) -> None:
        self.outgoing.put(_CLOSED)
        self.call.cancel()  # type: ignore[no-untyped-call]
        self.channel.close()


def connect() -> Transport:
    """The agent's socket inside a snapkernel sandbox, the backend's gRPC address elsewhere."""
    path = os.environ.get("SNAPKERNEL_FANOUT_SOCKET")
    if path and os.path.exists(path):
        return SocketTransport(path)
    return GrpcTransport()
