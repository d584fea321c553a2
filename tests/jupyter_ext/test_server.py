"""A real Jupyter server with the snapkernel extension: REST auth, and a notebook kernel over websocket."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from snapkernel.client import BackendClient
from tests.conftest import Backend
from tests.jupyter_ext.helpers import execute


async def test_status_route_needs_authentication(backend: Backend, jp_fetch: Any) -> None:
    reply = await jp_fetch("snapkernel", "api", "status")
    body = json.loads(reply.body)
    assert reply.code == 200 and body["default_runtime"] == backend.runtime
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch("snapkernel", "api", "status", headers={"Authorization": ""})
    assert e.value.code == 403


async def test_unreachable_backend_is_a_json_error(backend: Backend, jp_fetch: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPKERNEL_BACKEND", "unix:///nonexistent/backend.sock")
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch("snapkernel", "api", "status")
    assert e.value.code == 503
    body = json.loads(e.value.response.body)
    assert body["reason"] == "backend_unavailable" and "cannot reach the snapkernel backend" in body["message"]


async def test_notebook_kernel_runs_in_a_sandbox(backend: Backend, jp_fetch: Any, jp_ws_fetch: Any) -> None:
    reply = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "snapkernel-python"}))
    kernel_id = json.loads(reply.body)["id"]
    status, printed = await execute(jp_ws_fetch, kernel_id, "import os; print(os.environ['SNAPKERNEL_SANDBOX_ID'])")
    assert status == "ok" and printed.startswith("sb-")
    await jp_fetch("api", "kernels", kernel_id, method="DELETE")
    client = BackendClient(backend.address, backend.token)
    try:
        assert printed.strip() not in [s.id for s in await client.list_sandboxes()]
    finally:
        await client.close()
