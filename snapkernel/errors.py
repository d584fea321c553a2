"""One error hierarchy for snapkernel, translated once at each boundary.

gRPC: `grpc_status()` on the server, `from_grpc()` in the client. HTTP: `http_status`. IPython: the magics
turn any `SnapkernelError` into a `UsageError`. Messages say what was wrong and what to do about it.
"""

from __future__ import annotations

import grpc


class SnapkernelError(Exception):
    """Base of every error snapkernel raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500
    reason: str = "internal"


class InvalidSpecError(SnapkernelError):
    """A request or spec value that is not accepted (names the value and what is accepted)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    reason = "invalid"


class NotFoundError(SnapkernelError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    reason = "not_found"


class UnauthenticatedError(SnapkernelError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    reason = "unauthenticated"


class NoCapacityError(SnapkernelError):
    """The host cannot give what was asked (GPUs of that model, cores, memory)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 409
    reason = "no_capacity"


class StateError(SnapkernelError):
    """The operation does not fit the sandbox's current state."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409
    reason = "wrong_state"


class BackendUnavailableError(SnapkernelError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    reason = "backend_unavailable"


class RuntimeUnavailableError(SnapkernelError):
    """The chosen runtime cannot run here (for example runsc missing)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409
    reason = "runtime_unavailable"


class SandboxFailedError(SnapkernelError):
    """A sandbox or its kernel failed to start or ended unexpectedly."""

    code = grpc.StatusCode.ABORTED
    http_status = 500
    reason = "sandbox_failed"


class TimeoutError_(SnapkernelError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    reason = "timeout"


_BY_CODE: dict[grpc.StatusCode, type[SnapkernelError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidSpecError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: NoCapacityError,
    grpc.StatusCode.FAILED_PRECONDITION: StateError,
    grpc.StatusCode.UNAVAILABLE: BackendUnavailableError,
    grpc.StatusCode.ABORTED: SandboxFailedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError_,
}


def from_grpc(err: grpc.RpcError, address: str = "") -> SnapkernelError:
    """The typed error for a failed gRPC call, keeping the server's message."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    cls = _BY_CODE.get(code, SnapkernelError)
    if code == grpc.StatusCode.UNAVAILABLE:
        where = f" at {address}" if address else ""
        details = (
            f"cannot reach the snapkernel backend{where} ({details}); start it with "
            "`snapkernel backend --listen ADDR` or check SNAPKERNEL_BACKEND"
        )
    return cls(details)
