"""`SnapKernelApp`: the server extension. Its REST handlers talk to the backend through one client."""

from __future__ import annotations

from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Unicode

from snapkernel.jupyter_ext.handlers import StatusHandler


class SnapKernelApp(ExtensionApp):  # type: ignore[misc]
    name = "snapkernel"
    backend_address = Unicode("", help="The backend's address (default: $SNAPKERNEL_BACKEND, else the "
                                       "default state dir's unix socket).").tag(config=True)
    backend_token = Unicode("", help="The backend's token (default: $SNAPKERNEL_TOKEN or the token file).").tag(
        config=True)

    def initialize_handlers(self) -> None:
        self.handlers.extend([(r"/snapkernel/api/status", StatusHandler)])

    def backend_kwargs(self) -> dict[str, Any]:
        return {"address": self.backend_address or None, "token": self.backend_token or None}
