"""Moving a running kernel to other resources (MoveSandbox, `%move`, REST, the CLI): the same sandbox id and Jupyter
kernel, a new sandbox with the new spec.

The kernel is saved as hibernation saves it (hibernation.py): its memory image where the new spec can take that
image (the same runtime, no GPU in it), otherwise its variables (`state`). Its sandbox stops, and one with the new
spec starts from what was saved. Kernel messages sent meanwhile are held and run after it, as on a wake.

What can be refused is refused before anything stops: a spec this host cannot give, a GPU kernel's tensors with
nowhere to go, variables that cannot be saved, more memory in use than the new spec has. Should the new sandbox
not come up, the kernel starts again from the same image or variables with its old spec: it runs where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from snapkernel.backend import cells, lifecycle
from snapkernel.backend.hibernation import STATE_DIR, Hibernator
from snapkernel.backend.lifecycle import Activity
from snapkernel.backend.workspace import WORKSPACE
from snapkernel.errors import InvalidSpecError, NoCapacityError, SnapkernelError, StateError, describe
from snapkernel.host.processes import sample_tree
from snapkernel.host.resources import host_memory
from snapkernel.protocol.spec import ParsedSpec, describe_spec, format_bytes
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.snapshots import state

if TYPE_CHECKING:
    from snapkernel.backend.runtimes.base import SandboxRuntime
    from snapkernel.backend.sandbox import Defaults, LiveSandbox
    from snapkernel.backend.scheduler import Scheduler
    from snapkernel.backend.workspace import Workspaces

log = logging.getLogger(__name__)

MEMORY_IMAGE_MARGIN = 1 << 30  # bytes of the host's memory a move's image in memory leaves free at least
IDLE_POLL = 0.05  # seconds between looks at a busy kernel the move waits for
# What a move may change (MoveSandboxRequest's fields).
OVERRIDES: tuple[Literal["gpu", "cpu", "memory", "disk", "runtime"], ...] = ("gpu", "cpu", "memory", "disk", "runtime")


class MoveHost(Protocol):
    """What moves use of the sandbox manager (sandboxes.py), and all they use."""

    runtimes: dict[str, SandboxRuntime]
    scheduler: Scheduler
    defaults: Defaults
    workspaces: Workspaces

    def parse(self, spec: pb.SandboxSpec) -> ParsedSpec: ...

    def runtime_for(self, spec: ParsedSpec) -> SandboxRuntime: ...

    def hibernate_after(self, spec: ParsedSpec) -> float: ...

    def set_state(self, sb: LiveSandbox, state: int, message: str | None = None,
                  progress: pb.Progress | None = None) -> None: ...

    def progress(self, sb: LiveSandbox, step: str, message: str, fraction: float = -1.0) -> None: ...

    def state_name(self, sb: LiveSandbox) -> str: ...

    async def run_in_kernel(self, sb: LiveSandbox, code: str, timeout: float) -> pb.CodeResult: ...


def overridden(spec: pb.SandboxSpec, req: pb.MoveSandboxRequest) -> pb.SandboxSpec:
    """`spec` with the fields `req` sets."""
    target = pb.SandboxSpec()
    target.CopyFrom(spec)
    target.ClearField("restore_from")  # where it came from once, not where it goes
    for name in OVERRIDES:
        if req.HasField(name):
            setattr(target, name, getattr(req, name))
    return target


@dataclass(frozen=True)
class Placed:
    """Where a moving kernel ran: what it goes back to should the move fail."""
    request: pb.SandboxSpec
    spec: ParsedSpec
    runtime: SandboxRuntime


class Mover:
    def __init__(self, host: MoveHost, hibernator: Hibernator) -> None:
        self.m = host
        self.h = hibernator

    def method(self, sb: LiveSandbox, runtime: SandboxRuntime, new: ParsedSpec) -> str:
        """"memory" where the new sandbox can restore the kernel's image, else "state"."""
        caps = runtime.capabilities
        same = sb.record.runtime == runtime.name and caps.memory_snapshots and caps.live_checkpoint
        return "memory" if same and not sb.record.gpu_indices and new.gpu is None else "state"

    async def move(self, sb: LiveSandbox, req: pb.MoveSandboxRequest) -> pb.Sandbox:
        r = sb.record
        target = overridden(r.spec, req)
        new = self.m.parse(target)
        runtime = self.m.runtime_for(new)
        runtime.check(new)
        if r.state != pb.RUNNING:
            raise lifecycle.refuse(r.id, "move", self.m.state_name(sb), "only a running kernel can move")
        if describe_spec(new) == describe_spec(sb.spec):
            raise InvalidSpecError(f"sandbox {r.id} has {describe_spec(new)} already: give the resources it "
                                   f"should move to ({', '.join(OVERRIDES)})")
        if new.disk < sb.spec.disk:
            raise InvalidSpecError(f"disk {req.disk!r} is smaller than the workspace's {format_bytes(sb.spec.disk)}: "
                                   "a workspace can grow, not shrink")
        if new.disk > sb.spec.disk:
            self.m.workspaces.check(new.disk - sb.spec.disk, req.disk)
        self.m.scheduler.check_host(new)
        method = self.method(sb, runtime, new)
        with sb.doing(Activity.MOVING, "move", "wait for it to finish"):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (req.timeout or self.m.defaults.wake_timeout)
            await self._wait_for_room(sb, new, deadline - loop.time())
            await self._wait_until_idle(sb, deadline - loop.time())
            used = await self._check_kernel(sb, new, req.allow_cpu_fallback)
            return await self._move(sb, target, new, runtime, method=method, used=used)

    async def on_kernel_request(self, sb: LiveSandbox, request: pb.MoveSandboxRequest) -> None:
        """`%move` in the kernel: the next cell shows how it went (a refusal too: nothing else would)."""
        req = pb.MoveSandboxRequest()
        req.CopyFrom(request)
        req.id = sb.record.id
        try:
            await self.move(sb, req)
        except SnapkernelError as e:
            log.info("sandbox_id=%s %%move failed: %s", sb.record.id, e)
            if sb.record.state == pb.RUNNING and not sb.notice:
                self._tell(sb, f"snapkernel: %move failed: {e}\n")
        finally:
            sb.holding = False
            if sb.record.state == pb.RUNNING:
                self.h.deliver_held(sb)

    async def _wait_for_room(self, sb: LiveSandbox, new: ParsedSpec, timeout: float) -> None:
        """Room for `new` once the sandbox gave back what it holds; for a GPU the move waits in line (the kernel
        runs on meanwhile), for CPU or memory it is refused at once."""
        r = sb.record

        def fit() -> list[int]:
            return self.m.scheduler.fit_without(r.id, new, r.id)

        if new.gpu is None:
            fit()
            return
        told = False

        def waiting(why: str) -> None:
            nonlocal told
            self._say(sb, f"waiting for a GPU: {why}")
            if not told:  # the cells a %move holds meanwhile hear why they wait
                told = cells.tell_waiting(sb, f"snapkernel: this kernel waits for a GPU to move to: {why}\n")

        await self.m.scheduler.wait_in_line(r.id, fit, waiting, max(0.0, timeout))

    async def _wait_until_idle(self, sb: LiveSandbox, timeout: float) -> None:
        if not sb.busy:
            return
        self._say(sb, "waiting for the running cell to finish")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while sb.busy and sb.record.state == pb.RUNNING:  # `busy` changes with no event (on every cell)
            if loop.time() >= deadline:
                raise lifecycle.refuse(sb.record.id, "move", "busy (a cell is running)", "try again when it is idle")
            await asyncio.sleep(IDLE_POLL)
        if sb.record.state != pb.RUNNING:
            raise lifecycle.refuse(sb.record.id, "move", self.m.state_name(sb), "only a running kernel can move")

    async def _check_kernel(self, sb: LiveSandbox, new: ParsedSpec, allow_cpu_fallback: bool) -> int:
        """Refuse, naming what is in the way, a move the kernel's memory or GPU tensors do not fit; returns the
        bytes of memory the kernel uses."""
        r = sb.record
        runtime = self.m.runtimes[r.runtime]
        used = await asyncio.to_thread(lambda: runtime.memory_used(r) or sample_tree(r.pid).memory)
        if used > new.memory:
            raise NoCapacityError(f"sandbox {r.id}: its kernel uses {format_bytes(used)}, more than the "
                                  f"{format_bytes(new.memory)} it would move to: ask for more memory, or free some "
                                  "(del large variables) first")
        if r.gpu_indices and new.gpu is None and not allow_cpu_fallback:
            result = await self.m.run_in_kernel(sb, state.gpu_variables_code(), self.m.defaults.start_timeout)
            if not result.ok:
                raise StateError(f"sandbox {r.id}: its GPU tensors could not be listed: {result.error}")
            tensors: dict[str, int] = json.loads(result.output.strip().splitlines()[-1])
            if tensors:
                names = ", ".join(f"{k} ({format_bytes(v)})" for k, v in sorted(tensors.items())[:8])
                raise StateError(f"sandbox {r.id} holds GPU tensors and the new spec has no GPU: {names}. Move "
                                 "with allow_cpu_fallback (`--allow-cpu-fallback`) to put them in host memory, or "
                                 "keep a GPU")
        return used

    async def _move(self, sb: LiveSandbox, target: pb.SandboxSpec, new: ParsedSpec, runtime: SandboxRuntime,
                    *, method: str, used: int) -> pb.Sandbox:
        r = sb.record
        started = time.perf_counter()
        what = describe_spec(new)
        r.hibernation = method  # a backend restarted half-way finds it saved, as a hibernated kernel
        self.m.set_state(sb, pb.MOVING, f"moving to {what} by {method}: saving the kernel",
                         pb.Progress(step="move", message=f"saving the kernel ({method})", fraction=0.1))
        try:
            if method == "memory":
                # The image in memory where the host has room for it with some to spare (the new sandbox grows
                # while it reads it).
                await self.h.to_image(sb, in_memory=used * 2 + MEMORY_IMAGE_MARGIN < host_memory("MemAvailable"))
            else:
                await self.h.to_state(sb)
        except Exception as e:
            raise await self.h.back_to_running(sb, e, "could not move, so it runs where it was") from e
        old = Placed(r.spec, sb.spec, self.m.runtimes[r.runtime])
        sb.record.relaunching = True
        sb.state_error = ""
        try:
            self._say(sb, f"starting a {new.runtime} sandbox with {what}", 0.4)
            await self._switch(sb, target, new, old.runtime, runtime)
            sb.whole_state = True
            await self.h.relaunch(sb, method, memory=new.memory if new.memory != old.spec.memory else 0)
        except Exception as e:
            sb.whole_state = False  # back where it was, what loads is better than nothing
            why = describe(e)
            log.warning("sandbox_id=%s could not move to %s (%s); starting it again where it was", r.id, what, why)
            if not await self._back(sb, old, method, why):
                raise StateError(f"sandbox {r.id} could not move to {what} ({why}), nor start again where it was: "
                                 f"{r.message}; restart the kernel") from e
            raise StateError(f"sandbox {r.id} could not move to {what}, so it runs where it was: {why}") from e
        finally:
            sb.record.relaunching = sb.whole_state = False
            await asyncio.to_thread(shutil.rmtree, Path(r.dir) / WORKSPACE / STATE_DIR, True)
        took = time.perf_counter() - started
        r.hibernation = ""
        r.last_activity = time.time()
        self.m.set_state(sb, pb.RUNNING, f"moved to {what} by {method} in {took:.1f}s",
                         pb.Progress(step="move", message=f"moved in {took:.1f}s", fraction=1.0))
        log.info("sandbox_id=%s moved to %s by %s in %.2fs", r.id, what, method, took)
        if sb.holding:  # after %move the notebook hears how it went here (a caller of MoveSandbox hears it there)
            self._tell(sb, f"snapkernel: this kernel moved to {what} in {took:.1f}s; its variables are as they "
                           "were\n")
        self.h.deliver_held(sb)
        return r.to_pb()

    async def _switch(self, sb: LiveSandbox, target: pb.SandboxSpec, new: ParsedSpec, was: SandboxRuntime,
                      runtime: SandboxRuntime) -> None:
        """The sandbox's record takes the new spec; its workspace grows to it and belongs to its new user."""
        r = sb.record
        grow = new.disk > sb.spec.disk
        owner_changes = was.owner(sb.spec) != runtime.owner(new)
        r.spec, sb.spec, r.runtime = target, new, new.runtime
        r.hibernate_after = self.m.hibernate_after(new)  # a GPU kernel's default differs from a CPU kernel's
        if grow:
            await asyncio.to_thread(self.m.workspaces.grow, Path(r.dir), new.disk)
        if owner_changes:  # what the kernel wrote, and its variables, are read by another user now
            await asyncio.to_thread(self.m.workspaces.give, Path(r.dir) / WORKSPACE, runtime.owner(new))

    async def _back(self, sb: LiveSandbox, old: Placed, method: str, why: str) -> bool:
        """The new sandbox did not come up: the kernel starts again from what was saved, with its old spec.
        Whether it did (else its sandbox has failed)."""
        r = sb.record
        self.m.scheduler.release(r.id)
        with contextlib.suppress(Exception):
            await self.m.runtimes[r.runtime].stop(r)
        if sb.link is not None:
            await sb.link.detach()
            sb.link = None
        sb.state_error = ""
        r.spec, sb.spec, r.runtime = old.request, old.spec, old.runtime.name
        r.hibernate_after = self.m.hibernate_after(old.spec)
        self._say(sb, f"the move failed ({why}); starting the kernel again where it was", 0.7)
        try:
            await self.h.relaunch(sb, method)
        except Exception as e:
            again = describe(e)
            await self.h.lost_in_wake(sb, f"moving the kernel failed ({why}) and so did starting it again where it "
                                    f"was ({again})")
            return False
        r.hibernation = ""
        r.last_activity = time.time()
        self.m.set_state(sb, pb.RUNNING, f"could not move, so it runs where it was: {why}")
        self._tell(sb, f"snapkernel: this kernel could not move, so it runs where it was: {why}\n")
        self.h.deliver_held(sb)
        return True

    @staticmethod
    def _tell(sb: LiveSandbox, text: str) -> None:
        """Under the cells that waited for the move; else, after a `%move` (its outcome has no other way to the
        notebook), under the next one."""
        if not cells.tell_waiting(sb, text) and sb.holding:
            sb.notice = text

    def _say(self, sb: LiveSandbox, message: str, fraction: float = -1.0) -> None:
        """A step of the move: on the sandbox's watchers, and in its message while it is moving (REST shows it)."""
        if sb.record.state == pb.MOVING:
            sb.record.message = message
        self.m.progress(sb, "move", message, fraction)
