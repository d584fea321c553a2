"""REST handlers under /snapkernel/api, all behind jupyter_server's authentication."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

import tornado.web
from google.protobuf.json_format import MessageToDict
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin

from snapkernel.backend.client import BackendClient
from snapkernel.errors import SnapkernelError

if TYPE_CHECKING:
    from snapkernel.jupyter_ext.app import SnapKernelApp


class SnapKernelHandler(ExtensionHandlerMixin, APIHandler):  # type: ignore[misc]
    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, SnapkernelError):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"message": str(exc), "reason": exc.reason}))
            return
        super().write_error(status_code, **kwargs)

    async def backend_call(self, fn: Any) -> Any:
        client = BackendClient(**cast("SnapKernelApp", self.extensionapp).backend_kwargs())
        try:
            return await fn(client)
        finally:
            await client.close()

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, SnapkernelError):
            self.send_error(e.http_status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)


class StatusHandler(SnapKernelHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        status = await self.backend_call(lambda c: c.status())
        self.finish(json.dumps(MessageToDict(status, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)))
