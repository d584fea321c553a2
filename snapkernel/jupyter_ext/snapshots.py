"""REST: `GET|POST /snapkernel/api/snapshots`, `DELETE .../snapshots/{id}`, `POST .../snapshots/{id}/resume`."""

from __future__ import annotations

import json
from typing import Any

import tornado.web
from jupyter_client.jsonutil import json_default
from jupyter_server.auth.decorator import authorized

from snapkernel.errors import InvalidSpecError
from snapkernel.jupyter_ext.handlers import SnapKernelHandler, message_dict
from snapkernel.jupyter_ext.kernels import RESOURCE_KEYS, start_kernel
from snapkernel.kernel_provisioner.kernelspec import CPU_KERNEL
from snapkernel.protocol.kinds import DEFAULT_SNAPSHOT_KIND, check_snapshot_kind
from snapkernel.protocol.spec import check_sandbox_id, check_snapshot_id
from snapkernel.protocol.v1 import backend_pb2 as pb


class SnapshotsHandler(SnapKernelHandler):
    def snapshot_dict(self, info: pb.SnapshotInfo) -> dict[str, Any]:
        """The backend's record plus `path`: the notebook's API path (the backend keeps its OS path)."""
        return {**message_dict(info), "path": self.api_path(info.notebook_path)}

    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        """Every snapshot, newest first; `?path=NOTEBOOK` keeps that notebook's only."""
        path = self.get_query_argument("path", None)
        snapshots = [self.snapshot_dict(s) for s in await self.backend_call(lambda c: c.list_snapshots())]
        if path is not None:
            path = self.check_notebook_path(path)
            snapshots = [s for s in snapshots if s["path"] == path]
        snapshots.sort(key=lambda s: s["created"], reverse=True)
        self.finish(json.dumps(snapshots))

    @tornado.web.authenticated
    @authorized
    async def post(self) -> None:
        """Snapshot a kernel (`kernel_id`) or a sandbox (`sandbox_id`); `kind` memory (default) or state."""
        body = self.json_body({"kernel_id": str, "sandbox_id": str, "kind": str, "name": str})
        if ("kernel_id" in body) == ("sandbox_id" in body):
            raise InvalidSpecError("give exactly one of kernel_id (a Jupyter kernel's id) or sandbox_id (sb-...)")
        sandbox_id = (self.sandbox_of(body["kernel_id"], "snapshotted") if "kernel_id" in body
                      else check_sandbox_id(body["sandbox_id"]))
        kind, name = check_snapshot_kind(body.get("kind", DEFAULT_SNAPSHOT_KIND)), body.get("name", "")
        self.log.info("snapkernel sandbox_id=%s taking a %s snapshot", sandbox_id, kind)
        info = await self.backend_call(lambda c: c.create_snapshot(sandbox_id, kind, name))
        self.set_status(201)
        self.finish(json.dumps(self.snapshot_dict(info)))


class SnapshotHandler(SnapKernelHandler):
    @tornado.web.authenticated
    @authorized
    async def delete(self, snapshot_id: str) -> None:
        check_snapshot_id(snapshot_id)
        await self.backend_call(lambda c: c.delete_snapshot(snapshot_id))
        self.log.info("snapkernel snapshot_id=%s deleted", snapshot_id)
        self.set_status(204)
        self.finish()


class ResumeHandler(SnapKernelHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self, snapshot_id: str) -> None:
        """A kernel restored from the snapshot, with the snapshot's resources or those the body gives (`gpu`,
        `cpu`, `memory`, `disk`, `runtime`: a state snapshot resumes anywhere); with `path`, that notebook's
        session uses it."""
        body = self.json_body({"path": str, "name": str, **RESOURCE_KEYS})
        check_snapshot_id(snapshot_id)
        info = await self.backend_call(lambda c: c.get_snapshot(snapshot_id))
        spec: dict[str, Any] = {"restore_from": snapshot_id}
        for key in ("gpu", "memory", "disk", "runtime"):
            if getattr(info.spec, key):
                spec[key] = getattr(info.spec, key)
        if info.spec.cpu:
            spec["cpu"] = info.spec.cpu
        if info.runtime and "runtime" not in spec:
            spec["runtime"] = info.runtime
        spec.update({key: body[key] for key in RESOURCE_KEYS if key in body})
        result = await start_kernel(self, body.get("name", CPU_KERNEL), spec, body.get("path"))
        self.log.info("snapkernel snapshot_id=%s resumed as kernel_id=%s", snapshot_id, result["kernel"]["id"])
        self.set_status(201)
        self.finish(json.dumps(result, default=json_default))
