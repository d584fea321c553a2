"""REST: `POST /snapkernel/api/kernels` (a kernel with a spec chosen at launch) and `GET .../kernels/{id}`.

The kernel starts through the server's own kernel manager with the spec as the `snapkernel_spec` launch
argument (see the provisioner), so it is an ordinary Jupyter kernel afterwards: sessions, websockets,
interrupts and restarts work as for any other. With a notebook `path` it gets a session too.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import time
from typing import Any

import tornado.web
from jupyter_client.jsonutil import json_default
from jupyter_client.kernelspec import NoSuchKernel
from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized

from snapkernel.errors import InvalidSpecError, NotFoundError, SnapkernelError
from snapkernel.jupyter_ext.handlers import SnapKernelHandler, message_dict
from snapkernel.kernel_provisioner.kernelspec import CPU_KERNEL
from snapkernel.kernel_provisioner.provisioner import LAUNCH_SPEC, SnapKernelProvisioner
from snapkernel.protocol.spec import spec_from_config
from snapkernel.protocol.v1 import backend_pb2 as pb

# The resources of a kernel (at launch, in a move, for a resume), with their JSON types.
RESOURCE_KEYS: dict[str, type | tuple[type, ...]] = {
    "gpu": str, "cpu": (int, float), "memory": (str, int), "disk": (str, int), "runtime": str,
}
# The spec keys a client may choose at launch.
LAUNCH_KEYS: dict[str, type | tuple[type, ...]] = {**RESOURCE_KEYS, "restore_from": str,
                                                   "hibernate_after": (int, float)}


async def start_kernel(handler: SnapKernelHandler, kernel_name: str, spec: dict[str, Any],
                       path: str | None) -> dict[str, Any]:
    """Start a snapkernel kernel with `spec`; with a notebook `path`, the notebook's session uses it.

    Returns {"kernel": kernel model, "session": session model or None}.
    """
    try:
        kernelspec = handler.kernel_spec_manager.get_kernel_spec(kernel_name)
    except NoSuchKernel as e:
        raise NotFoundError(f"no kernelspec {kernel_name!r}: GET /api/kernelspecs lists them, "
                            "`snapkernel kernels install` installs snapkernel's") from e
    if kernelspec.metadata.get("kernel_provisioner", {}).get("provisioner_name") != "snapkernel":
        raise InvalidSpecError(f"kernelspec {kernel_name!r} is not a snapkernel kernel: its provisioner cannot "
                               f"take a launch-time spec; use {CPU_KERNEL!r} or another snapkernel-* kernelspec")
    spec_from_config(spec)  # a bad value is named before anything starts
    km: Any = handler.kernel_manager  # jupyter_server's managers are only partly typed
    sm: Any = handler.session_manager
    kwargs: dict[str, Any] = {"kernel_name": kernel_name, LAUNCH_SPEC: spec}
    name = ""
    if path is not None:
        path = handler.check_notebook_path(path)
        name = posixpath.basename(path)
        contents: Any = handler.contents_manager
        kwargs["path"] = await ensure_async(contents.get_kernel_path(path=path))
        kwargs["env"] = sm.get_kernel_env(path, name)  # JPY_SESSION_NAME: snapshots remember the notebook
    kernel_id: str = await km.start_kernel(**kwargs)
    handler.log.info("snapkernel kernel_id=%s started from %s with %s (path %r)", kernel_id, kernel_name, spec,
                     path)
    session = None
    if path is not None:
        try:
            session = await attach_session(handler, path, name, kernel_id)
        except Exception:
            await ensure_async(km.shutdown_kernel(kernel_id))  # no kernel without the session it was for
            raise
    return {"kernel": await ensure_async(km.kernel_model(kernel_id)), "session": session}


async def attach_session(handler: SnapKernelHandler, path: str, name: str, kernel_id: str) -> dict[str, Any]:
    """The notebook's session, now on `kernel_id`: a new one, or its existing one moved over (the old kernel is
    shut down when no other session uses it, as `PATCH /api/sessions` does)."""
    km: Any = handler.kernel_manager  # jupyter_server's managers are only partly typed
    sm: Any = handler.session_manager
    sessions: list[dict[str, Any]] = await sm.list_sessions()
    existing = next((s for s in sessions if s.get("path") == path), None)
    if existing is None:
        model: dict[str, Any] = await sm.create_session(path=path, name=name, type="notebook",
                                                        kernel_id=kernel_id)
        return model
    old = (existing.get("kernel") or {}).get("id")
    await sm.update_session(existing["id"], kernel_id=kernel_id)
    in_use = any((s.get("kernel") or {}).get("id") == old for s in sessions if s is not existing)
    if old is not None and old != kernel_id and not in_use:
        await ensure_async(km.shutdown_kernel(old))
        handler.log.info("snapkernel kernel_id=%s replaced by kernel_id=%s in session of %r", old, kernel_id, path)
    model = await sm.get_session(session_id=existing["id"])
    return model


class KernelsHandler(SnapKernelHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body({**LAUNCH_KEYS, "name": str, "path": str})
        kernel_name = body.pop("name", CPU_KERNEL)
        path = body.pop("path", None)
        result = await start_kernel(self, kernel_name, body, path)
        self.set_status(201)
        self.finish(json.dumps(result, default=json_default))


class KernelMoveHandler(SnapKernelHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        """Move the kernel to other resources (`gpu`, `cpu`, `memory`, `disk`, `runtime`; `allow_cpu_fallback`),
        its variables intact, under the same kernel id and session. Answers once it runs there."""
        body = self.json_body({**RESOURCE_KEYS, "allow_cpu_fallback": bool})
        allow = bool(body.pop("allow_cpu_fallback", False))
        if not body:
            raise InvalidSpecError(f"the move changes nothing: give one of {', '.join(RESOURCE_KEYS)}")
        spec = spec_from_config(body)  # a bad value is named before anything moves
        request = pb.MoveSandboxRequest(id=self.sandbox_of(kernel_id, "moved"), allow_cpu_fallback=allow)
        for key in body:  # those given, even "" (gpu: none)
            setattr(request, key, getattr(spec, key))
        sandbox_id = request.id
        self.log.info("snapkernel kernel_id=%s sandbox_id=%s moving to %s", kernel_id, sandbox_id, body)
        sandbox = await self.backend_call(lambda c: c.move_sandbox(request))
        km: Any = self.kernel_manager
        self.finish(json.dumps({"kernel": await ensure_async(km.kernel_model(kernel_id)),
                                "sandbox": message_dict(sandbox)}, default=json_default))


class KernelHandler(SnapKernelHandler):
    """A kernel's sandbox, state and usage (CPU, memory, GPU utilization and memory)."""

    @tornado.web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        km: Any = self.kernel_manager
        if kernel_id not in km:
            raise NotFoundError(f"no kernel {kernel_id!r} on this server: GET /api/kernels lists them")
        provisioner = getattr(km.get_kernel(kernel_id), "provisioner", None)
        body: dict[str, Any] = {"kernel": await ensure_async(km.kernel_model(kernel_id)), "now": time.time(),
                                "snapkernel": isinstance(provisioner, SnapKernelProvisioner),
                                "state": "", "sandbox": None, "usage": None, "usage_error": ""}
        sandbox_id = provisioner.sandbox_id if isinstance(provisioner, SnapKernelProvisioner) else None
        if isinstance(provisioner, SnapKernelProvisioner) and sandbox_id is None:
            body["state"] = "starting"
        elif sandbox_id is not None:
            sandbox, usage = await self.backend_call(lambda c: asyncio.gather(
                c.get_sandbox(sandbox_id), c.sandbox_usage(sandbox_id), return_exceptions=True))
            if isinstance(sandbox, BaseException):
                raise sandbox
            body["sandbox"] = message_dict(sandbox)
            body["state"] = body["sandbox"]["state"]
            if isinstance(usage, SnapkernelError):  # the sandbox is there, its figures are not: say why
                body["usage_error"] = str(usage)
            elif isinstance(usage, BaseException):
                raise usage
            else:
                body["usage"] = message_dict(usage)
        self.finish(json.dumps(body, default=json_default))
