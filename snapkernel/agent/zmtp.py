"""The agent's end of its kernel's ZMQ sockets: ZMTP 3.0 (RFC 23, NULL security) over unix sockets, in Python.

The agent talks to one local ipykernel only, so it needs no libzmq of its own: every kernel message used to
cross libzmq's I/O thread and its mailbox (a thread wake-up, eventfd writes and a `getpid` per signal) before
the agent's loop saw it. Under gVisor each of those system calls costs tens of microseconds; here a message is
one `recv` in the agent's own poll loop. A `Peer` is one connection, playing DEALER (to the kernel's ROUTER
sockets, with the client's routing identity) or SUB (to its iopub XPUB, subscribed to everything).

Messages sent before the kernel has bound its socket, or before its greeting came, wait in the peer, which
retries the connection on each `connect()` until it succeeds. (libzmq drops a connection whose READY arrives
together with the greeting, so READY goes only after the kernel's greeting.)
"""

from __future__ import annotations

import errno
import socket
import struct

SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
GREETING = SIGNATURE + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31  # version 3.0, client
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
_LONG = struct.Struct(">Q")
_PROP = struct.Struct(">I")
MAX_MESSAGE = 512 * 1024 * 1024  # as the agent link's frames (protocol/frames.py)
READ_SIZE = 1 << 20


class ZmtpError(Exception):
    """The peer broke the protocol; the connection is dropped."""


def command(name: bytes, data: bytes = b"") -> bytes:
    return _frame(bytes([len(name)]) + name + data, COMMAND)


def ready(socket_type: bytes, identity: bytes) -> bytes:
    props = b""
    for name, value in ((b"Socket-Type", socket_type), (b"Identity", identity)):
        props += bytes([len(name)]) + name + _PROP.pack(len(value)) + value
    return command(b"READY", props)


def _frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) > 255:
        return bytes([flags | LONG]) + _LONG.pack(len(body)) + body
    return bytes([flags, len(body)]) + body


def encode(parts: list[bytes]) -> bytes:
    """One multipart message as ZMTP frames."""
    last = len(parts) - 1
    return b"".join(_frame(bytes(p), 0 if i == last else MORE) for i, p in enumerate(parts))


class Peer:
    def __init__(self, path: str, socket_type: bytes, identity: bytes = b"") -> None:
        self.path = path
        self.socket_type = socket_type
        self.identity = identity
        self.sock: socket.socket | None = None
        self.ready = False  # the peer's READY has arrived: it knows our identity and takes messages
        self.closed = False
        self._in = bytearray()
        self._held = bytearray()  # messages until the kernel's greeting has come
        self._out = bytearray()  # bytes for the kernel, written as its socket takes them
        self._greeted = False
        self._parts: list[bytes] = []  # the message being received
        if socket_type == b"SUB":
            self.send([b"\x01"])  # subscribe to every topic (ZMTP 3.0 carries subscriptions as messages)

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    @property
    def wants_write(self) -> bool:
        return self.sock is not None and bool(self._out)

    def connect(self) -> bool:
        """Try to connect (True once connected); the kernel may not have bound its socket yet."""
        if self.sock is not None or self.closed:
            return self.sock is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return False
        sock.setblocking(False)
        self.sock = sock
        self._out += GREETING
        self.flush()
        return True

    def send(self, parts: list[bytes]) -> None:
        if not self._greeted:
            self._held += encode(parts)
            return
        self._out += encode(parts)
        self.flush()

    def flush(self) -> None:
        """Write what the socket takes now; the rest when it is writable again (`wants_write`)."""
        while self._out and self.sock is not None:
            try:
                n = self.sock.send(self._out)
            except BlockingIOError:
                return
            except OSError as e:
                self.close()
                if e.errno in (errno.EPIPE, errno.ECONNRESET):
                    return
                raise
            del self._out[:n]

    def receive(self) -> list[list[bytes]] | None:
        """The whole messages readable now; None once the kernel closed the connection."""
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except BlockingIOError:
                break
            except ConnectionResetError:
                data = b""
            if not data:
                self.close()
                return None
            self._in += data
            if len(data) < READ_SIZE:
                break
        return self._parse()

    def _parse(self) -> list[list[bytes]]:
        out: list[list[bytes]] = []
        buf = self._in
        pos = 0
        if not self._greeted:
            if len(buf) < len(GREETING):
                return out
            if buf[0] != 0xFF or not buf[9] & 0x01 or buf[10] < 3:
                raise ZmtpError(f"{self.path}: not a ZMTP 3 peer")
            self._greeted = True
            pos = len(GREETING)
            self._out += ready(self.socket_type, self.identity) + self._held
            self._held.clear()
            self.flush()
        while pos + 2 <= len(buf):
            flags = buf[pos]
            if flags & LONG:
                if pos + 9 > len(buf):
                    break
                (size,) = _LONG.unpack_from(buf, pos + 1)
                start = pos + 9
            else:
                size, start = buf[pos + 1], pos + 2
            if size > MAX_MESSAGE:
                raise ZmtpError(f"{self.path}: a frame of {size} bytes is over the {MAX_MESSAGE} byte limit")
            if start + size > len(buf):
                break
            body = bytes(buf[start:start + size])
            pos = start + size
            if flags & COMMAND:
                self._command(body)
                continue
            self._parts.append(body)
            if not flags & MORE:
                out.append(self._parts)
                self._parts = []
        del buf[:pos]
        return out

    def _command(self, body: bytes) -> None:
        name = body[1:1 + body[0]] if body else b""
        if name == b"READY":
            self.ready = True
        elif name == b"ERROR":
            raise ZmtpError(f"{self.path}: the kernel refused the connection: {body[7:].decode(errors='replace')}")
        # Other commands (PING and the like) belong to ZMTP 3.1, which a 3.0 peer is never sent.

    def close(self) -> None:
        self.closed = True
        if self.sock is not None:
            self.sock.close()
            self.sock = None
