"""The REST API of the server extension against a real Jupyter server and a real backend."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from tests.conftest import Backend, backend_of_its_own
from tests.jupyter_ext.helpers import execute


async def fetch_json(jp_fetch: Any, *parts: str, method: str = "GET", body: Any = None,
                     **kwargs: Any) -> Any:
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
    reply = await jp_fetch("snapkernel", "api", *parts, method=method, body=data,
                           allow_nonstandard_methods=True, **kwargs)
    return json.loads(reply.body) if reply.body else None


async def error_of(jp_fetch: Any, *parts: str, method: str = "GET", body: Any = None) -> tuple[int, dict[str, Any]]:
    with pytest.raises(HTTPClientError) as e:
        await fetch_json(jp_fetch, *parts, method=method, body=body)
    assert e.value.response is not None
    return e.value.code, json.loads(e.value.response.body)


ROUTES = [
    ("GET", ("status",), None),
    ("POST", ("kernels",), {}),
    ("GET", ("kernels", "0f3e8c1a-0000-0000-0000-000000000000"), None),
    ("GET", ("snapshots",), None),
    ("POST", ("snapshots",), {"sandbox_id": "sb-000000000000"}),
    ("DELETE", ("snapshots", "snap-000000000000"), None),
    ("POST", ("snapshots", "snap-000000000000", "resume"), {}),
    ("POST", ("kernels", "0f3e8c1a-0000-0000-0000-000000000000", "move"), {"cpu": 2}),
]


@pytest.mark.parametrize(("method", "parts", "body"), ROUTES)
async def test_every_route_refuses_a_request_without_token(jp_fetch: Any, method: str, parts: tuple[str, ...],
                                                           body: Any) -> None:
    with pytest.raises(HTTPClientError) as e:
        await fetch_json(jp_fetch, *parts, method=method, body=body, headers={"Authorization": ""})
    assert e.value.code == 403


async def test_status_serves_prices_and_kernelspecs(backend: Backend, jp_fetch: Any) -> None:
    status = await fetch_json(jp_fetch, "status")
    assert status["prices"] == {"currency": "EUR", "gpu_per_second": {"H100": 0.001}, "cpu_per_second": 0.00002,
                                "memory_gib_per_second": 0.0}
    assert "snapkernel-python" in [k["id"] for k in status["kernelspecs"]]
    assert isinstance(status["capacity"]["memory_total"], int)  # 64-bit fields as numbers, not strings
    assert {r["name"] for r in status["runtimes"]} >= {"process", "gvisor"}


BAD_REQUESTS = [
    ("POST", ("kernels",), {"gpu": "Z999:-1"}, 400, "gpu spec 'Z999:-1' is not valid"),
    ("POST", ("kernels",), {"memory": "lots"}, 400, "memory size 'lots' is not valid"),
    ("POST", ("kernels",), {"cpu": "two"}, 400, "cpu 'two' is not valid: expected a number"),
    ("POST", ("kernels",), {"runtime": "vmware"}, 400, "runtime 'vmware' is not known"),
    ("POST", ("kernels",), {"gpus": 1}, 400, "unknown key(s) 'gpus': accepted keys are gpu, cpu"),
    ("POST", ("kernels",), {"gpu": "Z999:2"}, 409, "no GPU of model 'Z999' here"),
    ("POST", ("kernels",), {"cpu": -1}, 400, "cpu -1 is not valid: use a number of cores above 0"),
    ("POST", ("kernels",), {"cpu": 0}, 400, "cpu 0 is not valid: use a number of cores above 0 and at most 1024"),
    ("POST", ("kernels",), "[1, 2]", 400, "the request body '[1, 2]' is not valid: send a JSON object"),
    ("POST", ("kernels",), "{", 400, "the request body is not valid JSON"),
    ("POST", ("kernels",), {"name": "python3"}, 400, "kernelspec 'python3' is not a snapkernel kernel"),
    ("POST", ("kernels",), {"name": "no-such-kernel"}, 404, "no kernelspec 'no-such-kernel'"),
    ("POST", ("kernels",), {"path": "../outside.ipynb"}, 400, "path '../outside.ipynb' is not valid"),
    ("GET", ("kernels", "no-such-kernel"), None, 404, "no kernel 'no-such-kernel' on this server"),
    ("POST", ("snapshots",), {}, 400, "give exactly one of kernel_id"),
    ("POST", ("snapshots",), {"kernel_id": "k-1"}, 404, "no kernel 'k-1' on this server"),
    ("POST", ("snapshots",), {"sandbox_id": "sb-1"}, 400, "sandbox id 'sb-1' is not valid"),
    ("POST", ("snapshots",), {"sandbox_id": "sb-000000000000", "kind": "disk"}, 400,
     "snapshot kind 'disk' is not known: use 'memory' or 'state'"),
    ("POST", ("snapshots",), {"sandbox_id": "sb-000000000000", "name": "n" * 100_000}, 400,
     "is 100000 characters long: names are at most 200 characters"),
    ("DELETE", ("snapshots", "latest"), None, 400, "snapshot id 'latest' is not valid"),
    ("DELETE", ("snapshots", "snap-000000000000"), None, 404, "snap-000000000000"),
    ("POST", ("snapshots", "snap-000000000000", "resume"), {"path": 3}, 400, "path 3 is not valid: expected a string"),
    ("POST", ("snapshots", "snap-000000000000", "resume"), {}, 404, "snap-000000000000"),
    ("POST", ("snapshots", "snap-000000000000", "resume"), {"memory": []}, 400, "memory [] is not valid"),
    ("POST", ("kernels", "k-1", "move"), {"cpu": 2}, 404, "no kernel 'k-1' on this server"),
    ("POST", ("kernels", "k-1", "move"), {}, 400, "the move changes nothing: give one of gpu, cpu"),
    ("POST", ("kernels", "k-1", "move"), {"memory": "lots"}, 400, "memory size 'lots' is not valid"),
    ("POST", ("kernels", "k-1", "move"), {"cpu": 2, "allow_cpu_fallback": "yes"}, 400,
     "allow_cpu_fallback 'yes' is not valid: expected true or false"),
    ("POST", ("kernels", "k-1", "move"), {"gpus": 1}, 400, "unknown key(s) 'gpus'"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[f"{r[0]}-{'/'.join(r[1])}-{r[3]}" for r in BAD_REQUESTS])
async def test_bad_requests_get_json_errors_naming_the_value(backend: Backend, jp_fetch: Any,
                                                            case: tuple[Any, ...]) -> None:
    method, parts, body, code, message = case
    status, error = await error_of(jp_fetch, *parts, method=method, body=body)
    assert status == code, error
    assert message in error["message"] and error["reason"], error
    assert (await fetch_json(jp_fetch, "status"))["version"]  # the server and backend keep serving
    assert json.loads((await jp_fetch("api", "kernels")).body) == []  # a refused start leaves no kernel


async def test_other_kernels_are_not_snapkernels(jp_fetch: Any) -> None:
    kernel = json.loads((await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "python3"}))).body)
    info = await fetch_json(jp_fetch, "kernels", kernel["id"])
    assert info["snapkernel"] is False and info["sandbox"] is None and info["kernel"]["name"] == "python3"
    status, error = await error_of(jp_fetch, "snapshots", method="POST", body={"kernel_id": kernel["id"]})
    assert status == 400 and "is not a snapkernel kernel" in error["message"]
    await jp_fetch("api", "kernels", kernel["id"], method="DELETE")


async def test_kernel_with_a_launch_time_spec_and_a_session(backend: Backend, jp_fetch: Any, jp_ws_fetch: Any,
                                                            jp_root_dir: Path) -> None:
    (jp_root_dir / "work").mkdir()
    started = await fetch_json(jp_fetch, "kernels", method="POST",
                               body={"cpu": 1, "memory": "768Mi", "path": "work/analysis.ipynb"})
    kernel_id, session = started["kernel"]["id"], started["session"]
    assert session["path"] == "work/analysis.ipynb" and session["kernel"]["id"] == kernel_id
    sessions = json.loads((await jp_fetch("api", "sessions")).body)
    assert [s["id"] for s in sessions if s["path"] == "work/analysis.ipynb"] == [session["id"]]

    assert await execute(jp_ws_fetch, kernel_id, "blob = bytearray(200 << 20); len(blob)") == ("ok", "209715200")
    info = await fetch_json(jp_fetch, "kernels", kernel_id)
    assert info["snapkernel"] and info["state"] == "running" and info["sandbox"]["runtime"] == backend.runtime
    assert info["sandbox"]["spec"]["memory"] == "768Mi" and info["sandbox"]["spec"]["cpu"] == 1
    assert info["sandbox"]["notebook_path"].endswith("work/analysis.ipynb")
    assert info["usage"]["memory_used"] > 200 << 20 and info["usage"]["memory_limit"] == 768 << 20
    assert info["usage"]["gpus"] == [] and info["now"] >= info["sandbox"]["created"]

    # A restart keeps the launch-time spec: the kernel is an ordinary Jupyter kernel.
    await jp_fetch("api", "kernels", kernel_id, "restart", method="POST", body="{}")
    status, text = await execute(jp_ws_fetch, kernel_id, "'blob' in dir()")
    assert (status, text) == ("ok", "False")
    info = await fetch_json(jp_fetch, "kernels", kernel_id)
    assert info["state"] == "running" and info["sandbox"]["spec"]["memory"] == "768Mi"

    await jp_fetch("api", "sessions", session["id"], method="DELETE")
    status, error = await error_of(jp_fetch, "kernels", kernel_id)
    assert status == 404 and error["reason"] == "not_found"


async def test_snapshot_create_list_resume_delete(backend: Backend, jp_fetch: Any, jp_ws_fetch: Any) -> None:
    kind = "memory" if backend.runtime == "gvisor" else "state"
    started = await fetch_json(jp_fetch, "kernels", method="POST", body={"path": "nb.ipynb"})
    old_kernel = started["kernel"]["id"]
    assert (await execute(jp_ws_fetch, old_kernel, "x = 41 + 1"))[0] == "ok"

    snap = await fetch_json(jp_fetch, "snapshots", method="POST",
                            body={"kernel_id": old_kernel, "kind": kind, "name": "before lunch"})
    assert snap["id"].startswith("snap-") and snap["kind"] == kind and snap["path"] == "nb.ipynb"
    assert isinstance(snap["size"], int) and snap["size"] > 0
    listed = await fetch_json(jp_fetch, "snapshots", params={"path": "nb.ipynb"})
    assert snap["id"] in [s["id"] for s in listed] and all(s["path"] == "nb.ipynb" for s in listed)
    assert await fetch_json(jp_fetch, "snapshots", params={"path": "other.ipynb"}) == []

    resumed = await fetch_json(jp_fetch, "snapshots", snap["id"], "resume", method="POST", body={"path": "nb.ipynb"})
    new_kernel = resumed["kernel"]["id"]
    assert new_kernel != old_kernel and resumed["session"]["kernel"]["id"] == new_kernel
    assert resumed["session"]["id"] == started["session"]["id"]  # the notebook's session moved to the new kernel
    kernels = [k["id"] for k in json.loads((await jp_fetch("api", "kernels")).body)]
    assert old_kernel not in kernels and new_kernel in kernels
    assert await execute(jp_ws_fetch, new_kernel, "x") == ("ok", "42")

    assert await fetch_json(jp_fetch, "snapshots", snap["id"], method="DELETE") is None
    assert snap["id"] not in [s["id"] for s in await fetch_json(jp_fetch, "snapshots")]
    status, error = await error_of(jp_fetch, "snapshots", snap["id"], method="DELETE")
    assert status == 404 and error["reason"] == "not_found"
    await jp_fetch("api", "sessions", started["session"]["id"], method="DELETE")


async def test_move_keeps_the_kernel_and_its_variables(backend: Backend, jp_fetch: Any, jp_ws_fetch: Any) -> None:
    started = await fetch_json(jp_fetch, "kernels", method="POST", body={"cpu": 1, "memory": "1Gi", "path": "m.ipynb"})
    kernel_id = started["kernel"]["id"]
    assert (await execute(jp_ws_fetch, kernel_id, "x = 41"))[0] == "ok"
    moved = await fetch_json(jp_fetch, "kernels", kernel_id, "move", method="POST", body={"cpu": 2, "memory": "2Gi"})
    assert moved["kernel"]["id"] == kernel_id and moved["sandbox"]["state"] == "running"
    assert moved["sandbox"]["spec"]["cpu"] == 2 and moved["sandbox"]["spec"]["memory"] == "2Gi"
    assert await execute(jp_ws_fetch, kernel_id, "x + 1") == ("ok", "42")
    info = await fetch_json(jp_fetch, "kernels", kernel_id)
    assert info["sandbox"]["id"] == moved["sandbox"]["id"] and info["usage"]["memory_limit"] == 2 << 30
    sessions = json.loads((await jp_fetch("api", "sessions")).body)
    assert [s["kernel"]["id"] for s in sessions if s["path"] == "m.ipynb"] == [kernel_id]  # the same session

    status, error = await error_of(jp_fetch, "kernels", kernel_id, "move", method="POST", body={"memory": "1Ti"})
    assert status == 409 and "more than this host's" in error["message"]
    assert await execute(jp_ws_fetch, kernel_id, "x") == ("ok", "41")
    await jp_fetch("api", "sessions", started["session"]["id"], method="DELETE")


@pytest.mark.gvisor
async def test_a_state_snapshot_resumes_with_other_resources(backend: Backend, jp_fetch: Any,
                                                             jp_ws_fetch: Any) -> None:
    started = await fetch_json(jp_fetch, "kernels", method="POST", body={"cpu": 1, "memory": "1Gi",
                                                                        "runtime": "process"})
    kernel_id = started["kernel"]["id"]
    assert (await execute(jp_ws_fetch, kernel_id, "import numpy\na = numpy.arange(10)"))[0] == "ok"
    snap = await fetch_json(jp_fetch, "snapshots", method="POST", body={"kernel_id": kernel_id, "kind": "state"})
    resumed = await fetch_json(jp_fetch, "snapshots", snap["id"], "resume", method="POST",
                               body={"runtime": "gvisor", "cpu": 2, "memory": "1536Mi"})
    new_kernel = resumed["kernel"]["id"]
    assert await execute(jp_ws_fetch, new_kernel, "int(a.sum())") == ("ok", "45")
    info = await fetch_json(jp_fetch, "kernels", new_kernel)
    assert info["sandbox"]["runtime"] == "gvisor" and info["sandbox"]["spec"]["cpu"] == 2
    assert info["sandbox"]["spec"]["memory"] == "1536Mi"
    for kernel in (kernel_id, new_kernel):
        await jp_fetch("api", "kernels", kernel, method="DELETE")
    await fetch_json(jp_fetch, "snapshots", snap["id"], method="DELETE")


async def test_routes_serve_again_after_a_backend_restart(own_backend: Backend, jp_fetch: Any) -> None:
    assert (await fetch_json(jp_fetch, "status"))["default_runtime"] == own_backend.runtime
    own_backend.restart()  # the extension's shared channel reconnects
    deadline = time.monotonic() + 20
    while True:
        try:
            assert (await fetch_json(jp_fetch, "status"))["default_runtime"] == own_backend.runtime
            break
        except HTTPClientError as e:
            assert e.code == 503 and time.monotonic() < deadline, e
            await asyncio.sleep(0.2)


async def test_a_missing_runtime_keeps_its_reason(kernelspec_dir: Path, jp_fetch: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's RuntimeUnavailableError reaches REST as itself, not as the StateError its status code shares."""
    with backend_of_its_own("process", monkeypatch, args=["--BackendApp.runsc=/nonexistent/runsc"]):
        status, error = await error_of(jp_fetch, "kernels", method="POST", body={"runtime": "gvisor"})
        assert status == 409 and error["reason"] == "runtime_unavailable", error
        assert "runtime 'gvisor' is not available on this backend" in error["message"], error
        assert json.loads((await jp_fetch("api", "kernels")).body) == []


@pytest.mark.gvisor
@pytest.mark.parametrize("backend", ["gvisor"], indirect=True)
async def test_a_process_kernel_right_after_a_gvisor_kernel_starts_too(backend: Backend, jp_fetch: Any,
                                                                       jp_ws_fetch: Any) -> None:
    """Issue 12, finding 6: both at once, one per runtime, in one server."""
    started = await asyncio.gather(
        fetch_json(jp_fetch, "kernels", method="POST", body={"runtime": "gvisor"}),
        fetch_json(jp_fetch, "kernels", method="POST", body={"runtime": "process", "cpu": 1, "memory": "1Gi"}))
    ids = [s["kernel"]["id"] for s in started]
    try:
        for kernel_id, runtime in zip(ids, ("gvisor", "process"), strict=True):
            assert await execute(jp_ws_fetch, kernel_id, "6 * 7") == ("ok", "42")
            assert (await fetch_json(jp_fetch, "kernels", kernel_id))["sandbox"]["runtime"] == runtime
    finally:
        for kernel_id in ids:
            await jp_fetch("api", "kernels", kernel_id, method="DELETE")
