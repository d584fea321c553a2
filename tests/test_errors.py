"""The error hierarchy across gRPC: every class comes back as itself, by its reason, over a real gRPC server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from snapkernel import errors
from snapkernel.errors import (
    REASON_KEY,
    BackendUnavailableError,
    RuntimeUnavailableError,
    SandboxFailedError,
    SnapkernelError,
    StateError,
    from_grpc,
)

CLASSES = errors._classes(SnapkernelError)


def test_every_class_has_a_reason_of_its_own() -> None:
    reasons = [c.reason for c in CLASSES]
    assert len(reasons) == len(set(reasons)), reasons
    assert errors.by_reason() == {c.reason: c for c in CLASSES}
    assert {RuntimeUnavailableError, StateError, SandboxFailedError, errors.FanoutError} <= set(CLASSES)


def test_grpc_is_not_imported_by_the_errors_module() -> None:
    # The agent in every sandbox imports snapkernel.errors: grpc must stay a lazy import there.
    code = "import sys, snapkernel.errors; assert 'grpc' not in sys.modules, 'grpc imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


async def _abort_server(path: Path) -> grpc.aio.Server:
    """A gRPC server whose one method aborts with the class named by the request, through `errors.abort`.

    A request `code:NAME` aborts as gRPC's own errors do, with that status and no reason."""
    by_name = {c.__name__: c for c in CLASSES}

    async def fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        name = request.decode()
        if name.startswith("code:"):
            await context.abort(grpc.StatusCode[name[5:]], "plain")
        await errors.abort(context, by_name[name](f"raised {name}"))

    async def fail_stream(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        yield b"first"
        await errors.abort(context, by_name[request.decode()](f"raised {request.decode()}"))

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "FailStream": grpc.unary_stream_rpc_method_handler(fail_stream),
    })])
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    return server


async def test_every_class_round_trips_by_reason(tmp_path: Path) -> None:
    server = await _abort_server(tmp_path / "s.sock")
    channel = grpc.aio.insecure_channel(f"unix://{tmp_path / 's.sock'}")
    try:
        unary = channel.unary_unary("/t.T/Fail")
        stream = channel.unary_stream("/t.T/FailStream")
        for cls in CLASSES:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await unary(cls.__name__.encode())
            assert dict(e.value.trailing_metadata() or ())[REASON_KEY] == cls.reason  # type: ignore[call-overload]
            err = from_grpc(e.value, "unix:///x")
            assert type(err) is cls and err.reason == cls.reason and str(err) == f"raised {cls.__name__}"
            assert e.value.code() == err.code

            with pytest.raises(grpc.aio.AioRpcError) as e:  # a stream that fails after a message
                async for _ in stream(cls.__name__.encode()):
                    pass
            assert type(from_grpc(e.value)) is cls

        # gRPC's own errors (or an older daemon's) carry no reason: the class is the status code's.
        for code, cls in [("FAILED_PRECONDITION", StateError), ("ABORTED", SandboxFailedError),
                          ("UNAVAILABLE", BackendUnavailableError), ("CANCELLED", SnapkernelError)]:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await unary(f"code:{code}".encode())
            assert type(from_grpc(e.value)) is cls
    finally:
        await channel.close()
        await server.stop(None)


async def test_the_sync_client_gets_the_class_too(tmp_path: Path) -> None:
    """The fan-out transport outside a sandbox uses grpc's blocking API: its errors carry the reason as well."""
    server = await _abort_server(tmp_path / "s.sock")

    def calls() -> list[type[SnapkernelError]]:
        got = []
        with grpc.insecure_channel(f"unix://{tmp_path / 's.sock'}") as channel:
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary("/t.T/Fail")(b"RuntimeUnavailableError", timeout=10)
            got.append(type(from_grpc(e.value)))
            with pytest.raises(grpc.RpcError) as e:
                for _ in channel.unary_stream("/t.T/FailStream")(b"FanoutError", timeout=10):
                    pass
            got.append(type(from_grpc(e.value)))
        return got

    try:
        assert await asyncio.to_thread(calls) == [RuntimeUnavailableError, errors.FanoutError]
    finally:
        await server.stop(None)


class _Failed:
    """What from_grpc reads of a failed call, for reasons no server of ours sends."""

    def __init__(self, code: str, trailers: Any) -> None:
        self._code, self._trailers = code, trailers

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self._code]

    def details(self) -> str:
        return "the message"

    def trailing_metadata(self) -> Any:
        return self._trailers


@pytest.mark.parametrize(("code", "trailers", "cls"), [
    ("FAILED_PRECONDITION", ((REASON_KEY, "from_a_newer_daemon"),), StateError),  # unknown reason: by code
    ("ABORTED", ((REASON_KEY, b"fanout_failed"),), errors.FanoutError),
    ("FAILED_PRECONDITION", (("other-key", "runtime_unavailable"),), StateError),
    ("FAILED_PRECONDITION", None, StateError),
    ("UNKNOWN", ((REASON_KEY, "runtime_unavailable"),), RuntimeUnavailableError),
])
def test_unknown_or_missing_reasons_map_by_code(code: str, trailers: Any, cls: type[SnapkernelError]) -> None:
    err = from_grpc(_Failed(code, trailers))
    assert type(err) is cls and str(err) == "the message"


def test_an_unreachable_backend_says_what_to_do() -> None:
    err = from_grpc(_Failed("UNAVAILABLE", ()), "unix:///nowhere.sock")
    assert type(err) is BackendUnavailableError
    assert "cannot reach the snapkernel backend at unix:///nowhere.sock" in str(err)
    # The daemon's own BackendUnavailableError keeps its message.
    err = from_grpc(_Failed("UNAVAILABLE", ((REASON_KEY, "backend_unavailable"),)))
    assert type(err) is BackendUnavailableError and str(err) == "the message"
