"""A real daemon's errors keep their class on the way to the client: unary calls, Watch, Attach, Map, the CLI."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from snapkernel.client import BackendClient
from snapkernel.errors import (
    REASON_KEY,
    InvalidSpecError,
    NotFoundError,
    RuntimeUnavailableError,
    SnapkernelError,
    UnauthenticatedError,
)
from snapkernel.protocol.connection import call_metadata
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.protocol.v1 import backend_pb2_grpc as pb_grpc
from tests.conftest import Backend, _cleanup_sandboxes
from tests.test_cli import cli


@pytest.fixture(scope="module")
def no_gvisor() -> Iterator[Backend]:
    """A backend whose runsc does not exist: gvisor is unavailable there, whatever this host has."""
    with tempfile.TemporaryDirectory(prefix="snapkernel-nogvisor-") as tmp:
        b = Backend(Path(tmp), runtime="process", args=["--BackendApp.runsc=/nonexistent/runsc"])
        b.start()
        yield b
        b.stop()
        b.report()
        _cleanup_sandboxes(b)


def gvisor_request() -> pb.CreateSandboxRequest:
    return pb.CreateSandboxRequest(spec=pb.SandboxSpec(runtime="gvisor"), kernel=pb.KernelConfig(key=b"k"))


def reason_of(e: grpc.aio.AioRpcError) -> str:
    return str(dict(e.trailing_metadata() or ()).get(REASON_KEY, ""))  # type: ignore[call-overload]


async def test_missing_runsc_is_runtime_unavailable_not_wrong_state(no_gvisor: Backend) -> None:
    client = BackendClient(no_gvisor.address, no_gvisor.token)
    try:
        with pytest.raises(RuntimeUnavailableError, match="runtime 'gvisor' is not available") as e:
            await client.create_sandbox(gvisor_request())
        assert e.value.reason == "runtime_unavailable"
        assert e.value.__cause__ is not None
        assert reason_of(e.value.__cause__) == "runtime_unavailable"  # type: ignore[arg-type]
        assert await client.list_sandboxes(include_ended=True) == []
    finally:
        await client.close()


async def test_streams_carry_the_reason(no_gvisor: Backend) -> None:
    client = BackendClient(no_gvisor.address, no_gvisor.token)
    try:
        with pytest.raises(NotFoundError) as e:
            async for _ in client.watch("sb-0123456789ab"):
                pass
        assert reason_of(e.value.__cause__) == "not_found"  # type: ignore[arg-type]
        with pytest.raises(InvalidSpecError):
            async for _ in client.watch("../etc"):
                pass

        stub = pb_grpc.BackendStub(client.channel)
        for first, reason in [(pb.AttachRequest(open=pb.AttachOpen(sandbox_id="sb-0123456789ab")), "not_found"),
                              (pb.AttachRequest(frame=pb.KernelFrame(channel=pb.SHELL)), "invalid")]:
            attach = stub.Attach(metadata=client.metadata)  # type: ignore[call-arg]
            await attach.write(first)
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                async for _ in attach:
                    pass
            assert reason_of(rpc.value) == reason

        # The token interceptor rejects every kind of call with the reason too (Map: a stream both ways).
        bad = pb_grpc.BackendStub(client.channel)
        mapping = bad.Map(metadata=call_metadata("wrong"))  # type: ignore[call-arg]
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            async for _ in mapping:
                pass
        assert reason_of(rpc.value) == "unauthenticated"
        wrong = BackendClient(no_gvisor.address, "wrong")
        try:
            with pytest.raises(UnauthenticatedError):
                await wrong.status()
            with pytest.raises(UnauthenticatedError):
                async for _ in wrong.watch("sb-0123456789ab"):
                    pass
        finally:
            await wrong.close()
    finally:
        await client.close()


def test_fanout_transport_raises_the_class(no_gvisor: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    from snapkernel.fanout.transport import GrpcTransport

    monkeypatch.delenv("SNAPKERNEL_FANOUT_SOCKET", raising=False)
    monkeypatch.setenv("SNAPKERNEL_BACKEND", no_gvisor.address)
    monkeypatch.setenv("SNAPKERNEL_TOKEN", "wrong")
    transport = GrpcTransport()
    try:
        with pytest.raises(SnapkernelError) as e:
            while transport.recv(10) is None:
                pass
        assert type(e.value) is UnauthenticatedError
    finally:
        transport.close()


def test_the_cli_prints_the_reason(no_gvisor: Backend) -> None:
    env = no_gvisor.env()
    r = cli("sandboxes", "rm", "sb-0123456789ab", check=False, **env)
    assert r.returncode == 2 and "snapkernel: error (not_found): no sandbox 'sb-0123456789ab'" in r.stderr
    # A state snapshot may resume on another runtime: on gvisor, which this backend lacks.
    sandbox = asyncio.run(_process_sandbox(no_gvisor))
    r = cli("snapshots", "create", sandbox, "--kind", "state", "--json", check=False, **env)
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout)
    cli("sandboxes", "rm", sandbox, **env)
    r = cli("resume", snap["id"], "--runtime", "gvisor", check=False, **env)
    assert r.returncode == 2, r.stderr
    assert "snapkernel: error (runtime_unavailable): runtime 'gvisor' is not available" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


async def _process_sandbox(backend: Backend) -> str:
    client = BackendClient(backend.address, backend.token)
    try:
        sb = await client.create_sandbox(pb.CreateSandboxRequest(spec=pb.SandboxSpec(runtime="process"),
                                                                 kernel=pb.KernelConfig(key=b"k")))
        async with asyncio.timeout(60):
            async for event in client.watch(sb.id):
                assert event.sandbox.state in (pb.PENDING, pb.STARTING, pb.RUNNING), event
                if event.sandbox.state == pb.RUNNING:
                    return str(sb.id)
        raise AssertionError("the watch ended before the sandbox ran")
    finally:
        await client.close()
