"""The bearer token: created in a 0600 file, checked by an interceptor (clients send it: protocol.connection)."""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from snapkernel.errors import UnauthenticatedError, abort
from snapkernel.protocol.connection import METADATA_KEY, read_token


def ensure_token(path: Path) -> str:
    """Read the token file, creating it (0600, in a 0700 directory) with a fresh token if absent."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Rejects every call whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        given = dict(details.invocation_metadata or ()).get(METADATA_KEY)
        if given is not None and hmac.compare_digest(str(given).encode(), self._expected):
            return await continuation(details)
        if given is None:
            why = ("no token sent: pass the backend token (SNAPKERNEL_TOKEN, or the `token` file in the "
                   "backend's state directory)")
        else:
            why = "wrong token: use the one in the backend's state directory (`token` file)"
        handler = await continuation(details)
        return _rejecting(handler, why)


def _rejecting(handler: grpc.RpcMethodHandler[Any, Any] | None, why: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def reject(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort(context, UnauthenticatedError(why))

    async def reject_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort(context, UnauthenticatedError(why))
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(reject)
    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(reject, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(reject_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(reject, **kw)
    return grpc.stream_stream_rpc_method_handler(reject_stream, **kw)
