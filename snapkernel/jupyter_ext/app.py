"""`SnapKernelApp`: the server extension. Its REST handlers talk to the backend through one client."""

from __future__ import annotations

from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Dict, Float, Unicode

from snapkernel.client import BackendClient
from snapkernel.jupyter_ext.handlers import StatusHandler
from snapkernel.jupyter_ext.kernels import KernelHandler, KernelMoveHandler, KernelsHandler
from snapkernel.jupyter_ext.snapshots import ResumeHandler, SnapshotHandler, SnapshotsHandler
from snapkernel.protocol.connection import default_address, default_token

_KERNEL_ID = r"(?P<kernel_id>[^/]+)"
_SNAPSHOT_ID = r"(?P<snapshot_id>[^/]+)"


class SnapKernelApp(ExtensionApp):  # type: ignore[misc]
    name = "snapkernel"
    backend_address = Unicode("", help="The backend's address (default: $SNAPKERNEL_BACKEND, else the "
                                       "default state dir's unix socket).").tag(config=True)
    backend_token = Unicode("", help="The backend's token (default: $SNAPKERNEL_TOKEN or the token file).").tag(
        config=True)
    # Prices only feed the status bar's cost estimate; nothing is billed.
    currency = Unicode("USD", help="Currency of the prices below, shown in the status bar, e.g. 'USD' or 'EUR'.").tag(
        config=True)
    gpu_price_per_second = Dict(value_trait=Float(), default_value={}, help=(
        "Price of one GPU per second by model, e.g. {'H100': 0.00111, 'A100': 0.00075}; the key '*' prices "
        "models not listed.")).tag(config=True)
    cpu_price_per_second = Float(0.0, help="Price of one CPU core per second, e.g. 0.0000131.").tag(config=True)
    memory_price_per_gib_second = Float(0.0, help="Price of one GiB of memory per second, e.g. 0.00000222.").tag(
        config=True)

    def initialize_settings(self) -> None:
        self._clients: dict[tuple[str, str], BackendClient] = {}

    def initialize_handlers(self) -> None:
        self.handlers.extend([
            (r"/snapkernel/api/status", StatusHandler),
            (r"/snapkernel/api/kernels", KernelsHandler),
            (rf"/snapkernel/api/kernels/{_KERNEL_ID}", KernelHandler),
            (rf"/snapkernel/api/kernels/{_KERNEL_ID}/move", KernelMoveHandler),
            (r"/snapkernel/api/snapshots", SnapshotsHandler),
            (rf"/snapkernel/api/snapshots/{_SNAPSHOT_ID}", SnapshotHandler),
            (rf"/snapkernel/api/snapshots/{_SNAPSHOT_ID}/resume", ResumeHandler),
        ])

    def backend(self) -> BackendClient:
        """The shared backend client; on the server's event loop only (grpc.aio's rule).

        Address and token are resolved on each call, so a changed SNAPKERNEL_BACKEND or SNAPKERNEL_TOKEN gets a
        client of its own rather than a stale one.
        """
        address = self.backend_address or default_address()
        token = self.backend_token or default_token(address)
        if (address, token) not in self._clients:
            self._clients[address, token] = BackendClient(address, token)
        return self._clients[address, token]

    async def stop_extension(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()

    def prices(self) -> dict[str, Any]:
        return {"currency": self.currency, "gpu_per_second": dict(self.gpu_price_per_second),
                "cpu_per_second": self.cpu_price_per_second,
                "memory_gib_per_second": self.memory_price_per_gib_second}
