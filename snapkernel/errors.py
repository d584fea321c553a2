"""One error hierarchy for snapkernel, translated once at each boundary.

gRPC: `abort()` on the server (the status code, the message, and the `reason` in the trailing metadata
`snapkernel-reason`), `from_grpc()` in the client (the class by reason; by status code for a daemon that sent
none, or an error of gRPC itself). HTTP: `http_status`. IPython: the magics turn any `SnapkernelError` into a
`UsageError`. Messages say what was wrong and what to do about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # grpc is not imported at run time: the agent in every sandbox imports this module
    import grpc

# Trailing metadata of a failed call: the `reason` of the error the daemon raised. Several classes share a
# status code (FAILED_PRECONDITION: StateError and RuntimeUnavailableError), so the code alone loses the class.
REASON_KEY = "snapkernel-reason"


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


def describe(e: BaseException) -> str:
    """What went wrong, for a user: a snapkernel error's own message; anything else with its type named."""
    return str(e) if isinstance(e, SnapkernelError) else f"{type(e).__name__}: {e}"


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


def _classes(cls: type[SnapkernelError]) -> list[type[SnapkernelError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _classes(sub))]


def by_reason() -> dict[str, type[SnapkernelError]]:
    """Every `SnapkernelError` class by its `reason` (built from the hierarchy, so a new class is in it)."""
    return {c.reason: c for c in _classes(SnapkernelError)}


async def abort(context: Any, err: SnapkernelError) -> NoReturn:
    """End a server-side call (a `grpc.aio.ServicerContext`) with `err`: every daemon abort goes through here."""
    await context.abort(err.code, str(err), trailing_metadata=((REASON_KEY, err.reason),))
    raise AssertionError("unreachable: abort raises")


def _reason(err: Any) -> str:
    try:
        trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    except Exception:  # a call that never got trailers
        return ""
    for key, value in trailers or ():
        if key == REASON_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def from_grpc(err: Any, address: str = "") -> SnapkernelError:
    """The typed error for a failed gRPC call (a `grpc.RpcError`), keeping the server's message.

    The class is the one the daemon raised, by the reason in the trailers; an older daemon's error, an unknown
    reason or gRPC's own (no connection, deadline) maps by status code."""
    status = err.code().name if hasattr(err, "code") else "UNKNOWN"
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    reason = _reason(err)
    cls = by_reason().get(reason) or _BY_STATUS.get(status, SnapkernelError)
    if status == "UNAVAILABLE" and not reason:  # gRPC's own: the backend could not be reached
        where = f" at {address}" if address else ""
        details = (
            f"cannot reach the snapkernel backend{where} ({details}); start it with "
            "`snapkernel backend --listen ADDR` or check SNAPKERNEL_BACKEND"
        )
    return cls(details)
