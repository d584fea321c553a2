"""The backend's end of one sandbox's agent link: a unix socket to the sandbox's shim.

The shim numbers what it sends and keeps it until acknowledged (see frames.py): `ack` says the backend
has handed a frame on, and the frames not acknowledged come again on the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from snapkernel.backend.tasks import stop_task
from snapkernel.errors import SandboxFailedError
from snapkernel.protocol import hops
from snapkernel.protocol.frames import HEADER, SEQ, decode, encode, read_numbered
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)


class AgentLink:
    def __init__(self, sandbox_id: str, socket_path: str,
                 on_message: Callable[[pb.AgentMessage, int], None],
                 on_closed: Callable[[], Awaitable[None]]) -> None:
        self.sandbox_id = sandbox_id
        self.socket_path = socket_path
        self.on_message = on_message
        self.on_closed = on_closed
        self.writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._acked = 0
        self._to_ack = 0

    async def connect(self, timeout: float, alive: Callable[[], bool]) -> None:
        """Connect to the shim's socket, retrying while the shim starts; then read in the background."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, self.writer = await asyncio.open_unix_connection(self.socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if loop.time() > deadline or not alive():
                    raise SandboxFailedError(
                        f"sandbox {self.sandbox_id}: its supervisor did not open {self.socket_path} ({e}); "
                        "see sandbox.log in the sandbox directory"
                    ) from e
                await asyncio.sleep(0.01)
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (got := await read_numbered(reader)) is not None:
                seq, frame = got
                if hops.ENABLED:
                    hops.mark("link_in")
                self.on_message(decode(frame[HEADER.size:]), seq)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            log.info("sandbox_id=%s agent link broke: %s", self.sandbox_id, e)
        except Exception:
            log.exception("sandbox_id=%s agent link failed", self.sandbox_id)
        finally:
            self.close()
            await self.on_closed()

    def send(self, msg: pb.AgentMessage) -> None:
        if self.writer is None or self.writer.is_closing():
            raise SandboxFailedError(f"sandbox {self.sandbox_id}: the agent link is closed")
        self.writer.write(SEQ.pack(0) + encode(msg))
        if hops.ENABLED:
            hops.mark("link_out")

    def ack(self, seq: int) -> None:
        """Every frame up to `seq` is handed on: the shim may forget them (sent once the loop is free)."""
        if seq <= self._to_ack:
            return
        if self._to_ack == self._acked:
            asyncio.get_running_loop().call_soon(self._send_ack)
        self._to_ack = seq

    def _send_ack(self) -> None:
        if self._to_ack > self._acked and self.writer is not None and not self.writer.is_closing():
            self.writer.write(SEQ.pack(self._to_ack))
            self._acked = self._to_ack

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()

    async def detach(self) -> None:
        """Close without reporting (backend shutting down: the sandbox keeps running)."""
        self.on_closed = _nothing
        await stop_task(self._task)
        self.close()


async def _nothing() -> None:
    return None
