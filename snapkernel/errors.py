"""One error hierarchy for snapkernel, translated once at each boundary.

gRPC: `grpc_status()` on the server, `from_grpc()` in the client. HTTP: `http_status`. IPython: the magics
turn any `SnapkernelError` into a `UsageError`. Messages say what was wrong and what to do about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # grpc is not imported at run time: the agent in every sandbox imports this module
    import grpc


class SnapkernelError(Exception):
    """Base of every error snapkernel raises on purpose."""

    status = "INTERNAL"
    http_status: int = 500
    reason: str = "internal"

    @property
    def code(self) -> grpc.StatusCode:
        """The gRPC status this error travels as."""
        import grpc

        return grpc.StatusCode[self.status]


class InvalidSpecError(SnapkernelError):
    """A request or spec value that is not accepted (names the value and what is accepted)."""

    status = "INVALID_ARGUMENT"
    http_status = 400
    reason = "invalid"


class NotFoundError(SnapkernelError):
    status = "NOT_FOUND"
    http_status = 404
    reason = "not_found"


class UnauthenticatedError(SnapkernelError):
    status = "UNAUTHENTICATED"
    http_status = 401
    reason = "unauthenticated"


class NoCapacityError(SnapkernelError):
    """The host cannot give what was asked (GPUs of that model, cores, memory)."""

    status = "RESOURCE_EXHAUSTED"
    http_status = 409
    reason = "no_capacity"


class StateError(SnapkernelError):
    """The operation does not fit the sandbox's current state."""

    status = "FAILED_PRECONDITION"
    http_status = 409
    reason = "wrong_state"


class BackendUnavailableError(SnapkernelError):
    status = "UNAVAILABLE"
    http_status = 503
    reason = "backend_unavailable"


class RuntimeUnavailableError(SnapkernelError):
    """The chosen runtime cannot run here (for example runsc missing)."""

    status = "FAILED_PRECONDITION"
    http_status = 409
    reason = "runtime_unavailable"


class SandboxFailedError(SnapkernelError):
    """A sandbox or its kernel failed to start or ended unexpectedly."""

    status = "ABORTED"
    http_status = 500
    reason = "sandbox_failed"


class SnapshotCorruptError(SnapkernelError):
    """A snapshot whose files do not match their recorded checksums: never restored."""

    status = "DATA_LOSS"
    http_status = 500
    reason = "snapshot_corrupt"


class TimeoutError_(SnapkernelError):
    status = "DEADLINE_EXCEEDED"
    http_status = 504
    reason = "timeout"


class FanoutError(SnapkernelError):
    """A fan-out job that failed as a whole (workers could not start, versions differ, cancelled)."""

    status = "ABORTED"
    http_status = 500
    reason = "fanout_failed"


class RemoteError(SnapkernelError):
    """An exception raised by a fan-out call that could not be sent back as itself (its text is kept)."""

    reason = "remote_error"


class WorkerDiedError(RemoteError):
    """A fan-out item's worker died running it (twice: it is retried once on a new worker)."""

    reason = "worker_died"


_BY_STATUS: dict[str, type[SnapkernelError]] = {
    "INVALID_ARGUMENT": InvalidSpecError,
    "NOT_FOUND": NotFoundError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": UnauthenticatedError,
    "RESOURCE_EXHAUSTED": NoCapacityError,
    "FAILED_PRECONDITION": StateError,
    "UNAVAILABLE": BackendUnavailableError,
    "ABORTED": SandboxFailedError,
    "DEADLINE_EXCEEDED": TimeoutError_,
    "DATA_LOSS": SnapshotCorruptError,
}


def from_grpc(err: Any, address: str = "") -> SnapkernelError:
    """The typed error for a failed gRPC call (a `grpc.RpcError`), keeping the server's message."""
    status = err.code().name if hasattr(err, "code") else "UNKNOWN"
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    cls = _BY_STATUS.get(status, SnapkernelError)
    if status == "UNAVAILABLE":
        where = f" at {address}" if address else ""
        details = (
            f"cannot reach the snapkernel backend{where} ({details}); start it with "
            "`snapkernel backend --listen ADDR` or check SNAPKERNEL_BACKEND"
        )
    return cls(details)
