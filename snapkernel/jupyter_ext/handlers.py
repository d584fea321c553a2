"""REST handlers under /snapkernel/api: the shared base (auth, JSON errors, backend calls) and the status route.

Every route is behind jupyter_server's authentication (`@tornado.web.authenticated`) and authorization
(`@authorized`, resource `snapkernel`). Errors are JSON `{"message", "reason"}` with the status code of the
`snapkernel.errors` class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

import tornado.web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin

from snapkernel.client import BackendClient
from snapkernel.errors import InvalidSpecError, NotFoundError, SnapkernelError
from snapkernel.kernel_provisioner.kernelspec import installed

T = TypeVar("T")


class ExtensionSettings(Protocol):
    """What handlers use of the server extension (app.py, which imports them)."""

    def backend(self) -> BackendClient: ...

    def prices(self) -> dict[str, Any]: ...


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def message_dict(msg: Message) -> dict[str, Any]:
    """A protobuf message as JSON for the front end: 64-bit integers as numbers (proto3's JSON mapping makes them
    strings), enums as lowercase names ("running", "hibernated"), every field present."""
    out = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _fix(msg.DESCRIPTOR, out)
    return out


def _fix(desc: Any, out: dict[str, Any]) -> None:
    for f in desc.fields:
        if f.name not in out:
            continue
        value = out[f.name]
        if f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for item in value if isinstance(value, list) else [value]:
                _fix(f.message_type, item)
        elif f.type in _INT64:
            out[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif f.enum_type is not None and isinstance(value, str):
            out[f.name] = value.lower()


class SnapKernelHandler(ExtensionHandlerMixin, APIHandler):  # type: ignore[misc]
    auth_resource = "snapkernel"

    @property
    def app(self) -> ExtensionSettings:
        return cast(ExtensionSettings, self.extensionapp)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, SnapkernelError):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"message": str(exc), "reason": exc.reason}))
            return
        super().write_error(status_code, **kwargs)

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, SnapkernelError):
            self.log.info("snapkernel %s %s: %s", self.request.method, self.request.path, e)
            self.send_error(e.http_status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    async def backend_call(self, fn: Callable[[BackendClient], Awaitable[T]]) -> T:
        return await fn(self.app.backend())

    def json_body(self, accepted: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
        """The request's JSON object; unknown keys and values of the wrong type are refused by name."""
        raw = self.request.body.decode("utf-8", errors="replace").strip()
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError as e:
            raise InvalidSpecError(f"the request body is not valid JSON ({e}): send a JSON object") from e
        if not isinstance(body, dict):
            raise InvalidSpecError(f"the request body {raw[:80]!r} is not valid: send a JSON object")
        unknown = sorted(set(body) - set(accepted))
        if unknown:
            raise InvalidSpecError(f"unknown key(s) {', '.join(map(repr, unknown))}: accepted keys are "
                                   f"{', '.join(accepted)}")
        for key, value in body.items():
            types = _tuple(accepted[key])
            # JSON true/false are Python bools, and bool is an int: only where bool is asked for.
            if value is not None and not (bool in types if isinstance(value, bool) else isinstance(value, types)):
                names = " or ".join(dict.fromkeys(_JSON_NAMES[t] for t in types))
                raise InvalidSpecError(f"{key} {value!r} is not valid: expected {names}")
        return {k: v for k, v in body.items() if v is not None}

    def sandbox_of(self, kernel_id: str, action: str) -> str:
        """The sandbox of one of this server's snapkernel kernels (`action`: what only those can be, for the
        error: "snapshotted", "moved")."""
        from snapkernel.kernel_provisioner.provisioner import SnapKernelProvisioner

        km: Any = self.kernel_manager
        if kernel_id not in km:
            raise NotFoundError(f"no kernel {kernel_id!r} on this server: GET /api/kernels lists them")
        provisioner = getattr(km.get_kernel(kernel_id), "provisioner", None)
        if not isinstance(provisioner, SnapKernelProvisioner):
            raise InvalidSpecError(f"kernel {kernel_id!r} is not a snapkernel kernel: only kernels in sandboxes "
                                   f"can be {action}")
        if provisioner.sandbox_id is None:
            raise NotFoundError(f"kernel {kernel_id!r} has no sandbox yet: wait until it has started")
        return provisioner.sandbox_id

    def check_notebook_path(self, path: str) -> str:
        """An API path (relative to the server's root, '/'-separated) of a notebook that may not exist yet."""
        clean = path.strip("/")
        if not clean or path.startswith("/") or ".." in clean.split("/") or "\\" in clean or "\0" in clean:
            raise InvalidSpecError(f"path {path!r} is not valid: give the notebook's path relative to the "
                                   "server's root, e.g. 'work/analysis.ipynb'")
        return clean

    def api_path(self, os_path: str) -> str:
        """The API path of a file the backend recorded by its OS path; "" when it lies outside the root."""
        if not os_path:
            return ""
        root = os.path.realpath(self.serverapp.root_dir)
        rel = os.path.relpath(os.path.realpath(os_path), root)
        return "" if rel.startswith("..") else rel.replace(os.sep, "/")


_JSON_NAMES: dict[type, str] = {str: "a string", int: "a number", float: "a number", bool: "true or false",
                                dict: "an object", list: "a list"}


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


class StatusHandler(SnapKernelHandler):
    """The backend's status (runtimes, GPUs, capacity), the snapkernel kernelspecs, and the prices."""

    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        status = await self.backend_call(lambda c: c.status())
        body = message_dict(status)
        body["kernelspecs"] = installed()
        body["prices"] = self.app.prices()
        self.finish(json.dumps(body))
