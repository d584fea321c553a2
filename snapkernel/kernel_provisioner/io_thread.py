"""One background event loop per process for backend I/O: gRPC channels, relays, watches.

Provisioners are called from the Jupyter server's loop, from `run_sync` loops of blocking kernel
managers, or from tests; grpc.aio channels and zmq.asyncio sockets must stay on the loop that made them.
So every relay and every backend client lives here, and callers hop over with `call()`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from snapkernel.client import BackendClient
from snapkernel.protocol.connection import default_address, default_token

T = TypeVar("T")


class IOThread:
    _instance: IOThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="snapkernel-io", daemon=True)
        self.thread.start()
        self.clients: dict[tuple[str, str], BackendClient] = {}

    @classmethod
    def instance(cls) -> IOThread:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the I/O loop and await its result from any other loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def client(self, address: str | None, token: str | None) -> BackendClient:
        """The shared client for a backend; only call from the I/O loop.

        Address and token are resolved first (environment, token file), so a changed
        SNAPKERNEL_TOKEN or SNAPKERNEL_BACKEND gets a client of its own rather than a stale one.
        """
        address = address or default_address()
        token = token if token is not None else default_token(address)
        key = (address, token)
        if key not in self.clients:
            self.clients[key] = BackendClient(address, token)
        return self.clients[key]
