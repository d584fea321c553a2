"""Messages between the daemon and a sandbox's agent: what each message from the agent does, and the way
messages go to it (held while the sandbox sleeps, queued while its link is down)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from snapkernel.backend import cells, lifecycle
from snapkernel.errors import SandboxFailedError, TimeoutError_
from snapkernel.protocol import wire
from snapkernel.protocol.states import HELD
from snapkernel.protocol.v1 import backend_pb2 as pb

if TYPE_CHECKING:
    from snapkernel.backend.hibernation import Hibernator
    from snapkernel.backend.sandbox import LiveSandbox
    from snapkernel.backend.snapshotting import Snapshotter

log = logging.getLogger(__name__)

MAX_PENDING_FRAMES = 1000  # messages held for a sandbox asleep, or queued while its agent is not connected


class AgentHost(Protocol):
    """What agent messages use of the sandbox manager (sandboxes.py), and all they use."""

    hibernator: Hibernator
    snapshotter: Snapshotter
    # Agent messages of other parts of the backend (fan-out), by oneof name.
    handlers: dict[str, Callable[[LiveSandbox, pb.AgentMessage], None]]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def set_state(self, sb: LiveSandbox, state: int, message: str | None = None,
                  progress: pb.Progress | None = None) -> None: ...

    def progress(self, sb: LiveSandbox, step: str, message: str, fraction: float = -1.0) -> None: ...

    def notify(self, sb: LiveSandbox, progress: pb.Progress | None = None) -> None: ...

    def state_name(self, sb: LiveSandbox) -> str: ...

    def on_kernel_request(self, sb: LiveSandbox, request: pb.KernelRequest) -> None: ...


class AgentMessages:
    def __init__(self, host: AgentHost) -> None:
        self.m = host

    # --- from the agent -------------------------------------------------------------------------
    def on_numbered(self, sb: LiveSandbox, msg: pb.AgentMessage, seq: int) -> None:
        """A message of the agent link. The shim sends again what was not acknowledged when a link breaks:
        what this backend has had already is not handled twice."""
        if seq <= sb.last_seq:
            sb.ack()
            return
        sb.last_seq = seq
        if msg.WhichOneof("kind") == "frame":
            msg.frame.seq = seq
            sb.undelivered[seq] = None  # acknowledged once a client has it
        self.on_message(sb, msg)
        sb.ack()

    def on_message(self, sb: LiveSandbox, msg: pb.AgentMessage) -> None:
        kind = msg.WhichOneof("kind")
        r = sb.record
        handler = self.m.handlers.get(kind or "")
        if handler is not None:
            handler(sb, msg)
        elif kind == "frame":
            r.last_activity = time.time()
            if msg.frame.channel == pb.IOPUB and (status := wire.kernel_status(msg.frame.parts)) is not None:
                sb.busy = status == "busy"  # a busy kernel is never idle enough to hibernate
            sb.to_clients(msg.frame)
        elif kind == "hello":
            self.m.progress(sb, "kernel", f"agent up (python {msg.hello.python}); kernel starting", 0.6)
        elif kind == "kernel_started":
            r.kernel_generation = msg.kernel_started.generation
            r.exit_code = 0
            sb.busy = False
            if sb.restore_state is not None:
                self.m.spawn(self.m.snapshotter.load_state(sb))
                return
            self.m.set_state(sb, pb.RUNNING, "", pb.Progress(step="kernel", message="kernel running",
                                                              fraction=1.0))
        elif kind == "kernel_request":
            self.m.on_kernel_request(sb, msg.kernel_request)
        elif kind == "code_result":
            future = sb.code_results.pop(msg.code_result.id, None)
            if future is not None and not future.done():
                future.set_result(msg.code_result)
        elif kind == "kernel_exited":
            if msg.kernel_exited.generation == r.kernel_generation and not sb.deleting:
                r.exit_code = msg.kernel_exited.code
                sb.fail_code_results(f"the kernel exited with code {r.exit_code}")
                if r.state in (pb.WAKING, pb.MOVING):  # the kernel that was to take the saved variables
                    sb.state_error = f"the new kernel exited with code {r.exit_code} as it started"
                    sb.restore_state = None
                    self.m.notify(sb)
                    return
                self.m.set_state(sb, pb.KERNEL_EXITED, f"kernel exited with code {r.exit_code}")
        elif kind == "error":
            log.warning("sandbox_id=%s agent: %s", r.id, msg.error)

    # --- to the agent ---------------------------------------------------------------------------
    def send(self, sb: LiveSandbox, msg: pb.AgentMessage, internal: bool = False) -> None:
        """Send to the sandbox's agent. While it hibernates, messages other than the backend's own
        (`internal`) are held, and the first of them wakes it."""
        if sb.record.ended or sb.deleting:
            raise lifecycle.refuse(sb.record.id, "take kernel messages", self.m.state_name(sb),
                                   "start a new kernel")
        if not internal:
            if sb.notice and cells.tell_cell(sb, msg, sb.notice):
                sb.notice = ""
            if sb.record.state in HELD or sb.holding:
                if len(sb.held) >= MAX_PENDING_FRAMES:
                    raise lifecycle.refuse(sb.record.id, "hold more messages",
                                           f"{self.m.state_name(sb)} with {MAX_PENDING_FRAMES} held already",
                                           "wait for it to wake")
                sb.held.append(msg)
                log.info("sandbox_id=%s %s holds %s%s", sb.record.id, self.m.state_name(sb), _describe(msg),
                         "; it wakes" if sb.record.state == pb.HIBERNATED and sb.waking is None else "")
                self.m.hibernator.wake_soon(sb)
                return
            sb.record.last_activity = time.time()
        if sb.link is None:
            if len(sb.pending) >= MAX_PENDING_FRAMES:
                raise lifecycle.refuse(sb.record.id, "queue more messages", "not connected with its queue full")
            sb.pending.append(msg)
            return
        sb.link.send(msg)

    async def run_code(self, sb: LiveSandbox, code: str, timeout: float) -> pb.CodeResult:
        """Run `code` in the sandbox's kernel as the agent's own client (its output is not the notebook's)."""
        return await self._ask(sb, lambda rid: pb.AgentMessage(run_code=pb.RunCode(id=rid, code=code)), timeout)

    async def give_identity(self, sb: LiveSandbox, env: dict[str, str], timeout: float | None,
                            memory: int = 0) -> None:
        """Make a kernel restored from a memory image this sandbox's: it signs with the sandbox's session key
        from now on and sees `env`, and with `memory` takes that memory limit (see `Identity`). With no
        `timeout`, only sent: the kernel takes it when it is next idle (a resumed snapshot keeps its key; a
        --clone's kernel stays in its cell for good)."""
        key = sb.record.kernel.key
        if timeout is None:
            self.send(sb, pb.AgentMessage(identity=pb.Identity(id=secrets.token_hex(8), key=key, env=env,
                                                               memory=memory)), internal=True)
            return
        result = await self._ask(
            sb, lambda rid: pb.AgentMessage(identity=pb.Identity(id=rid, key=key, env=env, memory=memory)), timeout)
        if not result.ok:
            raise SandboxFailedError(f"sandbox {sb.record.id}: the restored kernel did not take its identity "
                                     f"(session key{', memory limit' if memory else ''}): {result.error}")

    async def _ask(self, sb: LiveSandbox, message: Callable[[str], pb.AgentMessage],
                   timeout: float) -> pb.CodeResult:
        """Send the agent `message(request id)` and wait for the `code_result` that answers it."""
        request_id = secrets.token_hex(8)
        future: asyncio.Future[pb.CodeResult] = asyncio.get_running_loop().create_future()
        sb.code_results[request_id] = future
        self.send(sb, message(request_id), internal=True)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as e:
            raise TimeoutError_(f"sandbox {sb.record.id}: the kernel did not finish within {timeout:g}s "
                                "(is a cell still running? state snapshots wait for the kernel to be idle)") from e
        finally:
            sb.code_results.pop(request_id, None)


def _describe(msg: pb.AgentMessage) -> str:
    """What a message to the agent is, for logs: a kernel message's channel and type."""
    if msg.WhichOneof("kind") != "frame":
        return str(msg.WhichOneof("kind"))
    return f"{pb.Channel.Name(msg.frame.channel).lower()} {wire.msg_type(msg.frame.parts)}"
