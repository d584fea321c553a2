"""Hibernation: an idle kernel gives its memory and GPUs back, and the next message wakes it.

Three ways, the fastest safe one the sandbox has:
- `memory` (gvisor): `runsc checkpoint` writes the whole sandbox to an image in its directory and the
  sandbox stops; waking is `runsc restore`. Every variable, thread and open file comes back.
- `suspend` (process runtime, GPU kernels): the kernel process stays; its GPU memory moves to host memory
  (torch tensors through pinned buffers, the rest by the CUDA driver's checkpoint) and its GPUs go back to
  the scheduler; waking puts the memory back on the same GPUs.
- `state` (everything else): the kernel's variables are saved as a state snapshot and the sandbox stops;
  waking starts a new kernel and loads them. Refused, and the kernel stays awake, when a variable cannot be
  saved.
Kernel messages that arrive meanwhile are held by the backend and delivered once the kernel is back, so the
notebook sees a slow cell under the same kernel id, not a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from snapkernel.backend import cells, lifecycle
from snapkernel.backend.lifecycle import Activity
from snapkernel.backend.tasks import stop_task
from snapkernel.errors import SnapkernelError, StateError, describe
from snapkernel.protocol.states import ASLEEP
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.snapshots import cuda

if TYPE_CHECKING:
    from snapkernel.backend.runtimes.base import SandboxRuntime
    from snapkernel.backend.sandbox import Defaults, LiveSandbox
    from snapkernel.backend.sandbox_db import SandboxRecord
    from snapkernel.backend.scheduler import Scheduler


class IdentityGiver(Protocol):
    """The agent messages' part (agent_messages.py) that a kernel restored with other resources needs."""

    async def give_identity(self, sb: LiveSandbox, env: dict[str, str], timeout: float | None,
                            memory: int = 0) -> None: ...


class SandboxHost(Protocol):
    """What hibernation uses of the sandbox manager (sandboxes.py), and all it uses: the narrow interface
    between the two, so neither reaches into the other's internals."""

    live: dict[str, LiveSandbox]
    messages: IdentityGiver
    runtimes: dict[str, SandboxRuntime]
    scheduler: Scheduler
    defaults: Defaults

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def set_state(self, sb: LiveSandbox, state: int, message: str | None = None,
                  progress: pb.Progress | None = None) -> None: ...

    def progress(self, sb: LiveSandbox, step: str, message: str, fraction: float = -1.0) -> None: ...

    def state_name(self, sb: LiveSandbox) -> str: ...

    def send_to_agent(self, sb: LiveSandbox, msg: pb.AgentMessage, internal: bool = False) -> None: ...

    def prepare_workspace(self, sb: LiveSandbox) -> Path: ...

    async def connect(self, sb: LiveSandbox, runtime: SandboxRuntime, timeout: float) -> None: ...

    async def ended_on_its_own(self, sb: LiveSandbox, runtime: SandboxRuntime | None) -> None: ...

    async def run_in_kernel(self, sb: LiveSandbox, code: str, timeout: float) -> pb.CodeResult: ...

    async def save_state(self, sb: LiveSandbox, inside: str, into_store: bool = False) -> dict[str, Any]: ...

log = logging.getLogger(__name__)

IDLE_CHECK_INTERVAL = 1.0  # seconds between looks for idle kernels
IMAGE_DIR = "hibernation"  # in the sandbox's directory: the memory image while hibernated
# A move's memory image, where the host's memory has room for it: written and read again at memory speed (a 1 GiB
# move took 4.8 s through the disk, 3.2 s so), and gone once the kernel runs again. IMAGE_DIR links to it.
MEMORY_IMAGES = Path("/dev/shm/snapkernel")
STATE_DIR = ".snapkernel-hibernation"  # in the workspace: the variables while hibernated
OFFLOAD_CODE = "__import__('snapkernel.snapshots.gpu_offload', fromlist=['run']).run({action!r}, **{options!r})"


def remove_image(r: SandboxRecord) -> None:
    """A sandbox's memory image, on disk or in memory (blocking)."""
    path = Path(r.dir) / IMAGE_DIR
    if path.is_symlink():
        path.unlink()
    shutil.rmtree(path, True)
    shutil.rmtree(MEMORY_IMAGES / r.id, True)


def offload_code(action: str, defaults: Defaults) -> str:
    """The cell that moves the kernel's tensors (`action`: offload, reload or release; gpu_offload.py)."""
    options = ({"buffers": defaults.gpu_offload_buffers, "buffer_bytes": defaults.gpu_offload_buffer_bytes}
               if action == "offload" else {})
    return OFFLOAD_CODE.format(action=action, options=options)


def staging_bytes(defaults: Defaults) -> int:
    """Host memory the offload's pinned staging buffers hold in a kernel that has hibernated once."""
    return defaults.gpu_offload_buffers * defaults.gpu_offload_buffer_bytes if defaults.gpu_offload else 0


class Hibernator:
    def __init__(self, manager: SandboxHost) -> None:
        self.m = manager
        self._watch: asyncio.Task[None] | None = None

    # --- choosing -------------------------------------------------------------------------------
    def method(self, sb: LiveSandbox) -> str:
        caps = self.m.runtimes[sb.record.runtime].capabilities
        if caps.memory_snapshots:
            gpu_ok = not sb.record.gpu_indices or caps.gpu_checkpoint
            return "memory" if caps.live_checkpoint and gpu_ok else "state"
        return "suspend" if sb.record.gpu_indices and caps.gpu_suspend else "state"

    # --- the idle watch -------------------------------------------------------------------------
    def start(self) -> None:
        self._watch = asyncio.create_task(self._idle_watch())

    async def stop(self) -> None:
        await stop_task(self._watch)

    async def _idle_watch(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_INTERVAL)
            now = time.time()
            for sb in list(self.m.live.values()):
                r = sb.record
                if (r.state == pb.RUNNING and r.hibernate_after > 0 and not sb.busy and sb.activity is None
                        and not sb.held and now - r.last_activity >= r.hibernate_after
                        and sb.refused_at != r.last_activity):
                    self.m.spawn(self._hibernate_quietly(sb))

    async def _hibernate_quietly(self, sb: LiveSandbox) -> None:
        try:
            await self.hibernate(sb, f"idle for {sb.record.hibernate_after:g}s")
        except SnapkernelError as e:
            log.warning("sandbox_id=%s stays awake: %s", sb.record.id, e)

    # --- hibernate ------------------------------------------------------------------------------
    async def hibernate(self, sb: LiveSandbox, reason: str) -> pb.Sandbox:
        r = sb.record
        if r.state != pb.RUNNING:
            raise lifecycle.refuse(r.id, "hibernate", self.m.state_name(sb), "only a running kernel can hibernate")
        if sb.busy:
            raise lifecycle.refuse(r.id, "hibernate", "busy (a cell is running)", "try again when it is idle")
        with sb.doing(Activity.HIBERNATING, "hibernate", "try again when it is idle"):
            method = self.method(sb)
            r.hibernation = method
            self.m.set_state(sb, pb.HIBERNATING, f"hibernating ({reason}) by {method}",
                             pb.Progress(step="hibernate", message=f"hibernating by {method}", fraction=0.1))
            started = time.perf_counter()
            try:
                if method == "memory":
                    await self.to_image(sb)
                elif method == "suspend":
                    await self._suspend(sb)
                else:
                    await self.to_state(sb)
            except Exception as e:
                sb.refused_at = r.last_activity  # not again until the kernel has been used
                raise await self.back_to_running(sb, e, "could not hibernate, so it stays awake") from e
        took = time.perf_counter() - started
        self.m.set_state(sb, pb.HIBERNATED, f"hibernated by {method} in {took:.1f}s; the next message wakes it",
                          pb.Progress(step="hibernate", message=f"hibernated in {took:.1f}s", fraction=1.0))
        if sb.held:  # messages came in while it was going to sleep
            self.wake_soon(sb)
        return r.to_pb()

    async def back_to_running(self, sb: LiveSandbox, e: Exception, outcome: str) -> SnapkernelError:
        """Saving the kernel failed (`e`) before its sandbox stopped: it runs on, and gets the messages held
        meanwhile; or, had it died on the way, it has ended. Returns the error to raise."""
        r = sb.record
        r.hibernation = ""
        why = describe(e)
        self.m.set_state(sb, pb.RUNNING, f"{outcome}: {why}")
        runtime = self.m.runtimes[r.runtime]
        if runtime.is_alive(r):
            self.deliver_held(sb)
        else:  # it died on the way (a checkpoint that failed half-way)
            await self.m.ended_on_its_own(sb, runtime)
            cells.tell_waiting(sb, f"snapkernel: this kernel's sandbox ended while it was being saved: {why}\n"
                                   "Restart the kernel.", fail=True)
        return e if isinstance(e, SnapkernelError) else StateError(f"sandbox {r.id} {outcome}: {why}")

    async def to_image(self, sb: LiveSandbox, in_memory: bool = False) -> None:
        """Checkpoint the sandbox into IMAGE_DIR (`in_memory`: into MEMORY_IMAGES), and stop it."""
        r = sb.record
        runtime = self.m.runtimes[r.runtime]
        assert runtime.capabilities.checkpoint  # `method` chose "memory"
        target = Path(r.dir) / IMAGE_DIR
        await asyncio.to_thread(remove_image, r)
        if in_memory:
            MEMORY_IMAGES.mkdir(mode=0o700, parents=True, exist_ok=True)
            (MEMORY_IMAGES / r.id).mkdir(mode=0o700)
            target.symlink_to(MEMORY_IMAGES / r.id)
        else:
            target.mkdir(mode=0o700)
        # What a restore needs besides the image goes first: should this backend die while the image is written,
        # the sandbox still ends once it is, and the next backend finds the whole of it.
        runtime.save_bundle(r, target)
        try:
            await runtime.checkpoint(r, target / "image", leave_running=False)
        except SnapkernelError:
            await asyncio.to_thread(remove_image, r)
            raise
        await self._stop_sandbox(sb)

    async def to_state(self, sb: LiveSandbox) -> None:
        report = await self.m.save_state(sb, STATE_DIR)
        if report["skipped"]:
            await asyncio.to_thread(shutil.rmtree, Path(sb.record.dir) / "workspace" / STATE_DIR, True)
            names = ", ".join(f"{k} ({v})" for k, v in sorted(report["skipped"].items())[:5])
            raise StateError(f"these variables cannot be saved, so waking would lose them: {names}")
        await self._stop_sandbox(sb)

    async def _stop_sandbox(self, sb: LiveSandbox) -> None:
        await self.m.runtimes[sb.record.runtime].stop(sb.record)
        if sb.link is not None:
            await sb.link.detach()  # stopped on purpose: not reported as its end
            sb.link = None
        self.m.scheduler.release(sb.record.id)

    async def _suspend(self, sb: LiveSandbox) -> None:
        r = sb.record
        driver = await asyncio.to_thread(cuda.CudaDriver.load)
        # The GPU memory lands in the kernel's host memory: make room for it under its limit, and count it
        # (with the offload's staging buffers). Measured before the tensors move out: waking needs room on the
        # GPU for all of it again.
        runtime = self.m.runtimes[r.runtime]
        pids = await asyncio.to_thread(cuda.cuda_processes, driver, r.pid)
        held = await asyncio.to_thread(cuda.gpu_memory_of, pids, r.gpu_indices)
        awake = sb.spec.memory + sb.offload_staging
        parked = sb.spec.memory + sum(held.values()) + staging_bytes(self.m.defaults) + cuda.RESTORE_MARGIN
        runtime.set_memory_limit(r, parked)
        self.m.scheduler.resize(r.id, parked)
        try:
            await self._move_out(sb, driver, pids, held)
        except BaseException:
            runtime.set_memory_limit(r, awake)
            self.m.scheduler.resize(r.id, awake)
            raise

    async def _move_out(self, sb: LiveSandbox, driver: cuda.CudaDriver, pids: list[int],
                        held: dict[int, int]) -> None:
        r = sb.record
        offloaded = False
        if self.m.defaults.gpu_offload:
            try:
                result = await self._offload(sb, "offload")
            except SnapkernelError:
                with contextlib.suppress(SnapkernelError):  # what it had moved goes back (nothing, usually)
                    await self._offload(sb, "reload")
                raise
            offloaded = result.get("bytes", 0) > 0
            if "staging_bytes" in result:
                sb.offload_staging = int(result["staging_bytes"])
            log.info("sandbox_id=%s offloaded %s bytes of tensors in %.2fs (%.1f GiB/s, %s storages, %s staging "
                     "bytes)", r.id, result.get("bytes"), result.get("seconds", 0.0), result.get("gib_s", 0.0),
                     result.get("storages", 0), result.get("staging_bytes", 0))
        try:
            sb.suspended = await asyncio.to_thread(cuda.suspend, driver, pids, held)
        except SnapkernelError:
            if offloaded:
                await self._offload(sb, "reload")
            raise
        log.info("sandbox_id=%s driver checkpoint of %s (holding %s bytes of GPU memory) took %.2fs", r.id,
                 sb.suspended.pids, sb.suspended.total_bytes, sb.suspended.seconds)
        self.m.scheduler.release_gpus(r.id)

    async def _offload(self, sb: LiveSandbox, action: str) -> dict[str, int | float]:
        """Run an action of gpu_offload.py in the kernel. Its copies run on torch's CPU threads, so the kernel's
        CPU quota is lifted meanwhile (it runs nothing else: its messages are held)."""
        runtime = self.m.runtimes[sb.record.runtime]
        lift = action in ("offload", "reload")
        if lift:
            runtime.set_cpu_limit(sb.record, None)
        try:
            result = await self.m.run_in_kernel(sb, offload_code(action, self.m.defaults),
                                                self.m.defaults.wake_timeout)
        finally:
            if lift:
                runtime.set_cpu_limit(sb.record, sb.spec.cpu)
        if not result.ok:
            raise StateError(f"moving the kernel's tensors ({action}) failed: {result.error}")
        out: dict[str, int | float] = json.loads(result.output.strip().splitlines()[-1])
        return out

    # --- wake -----------------------------------------------------------------------------------
    def wake_soon(self, sb: LiveSandbox) -> None:
        if sb.record.state == pb.HIBERNATED and sb.waking is None:
            sb.waking = asyncio.ensure_future(self._wake(sb))

    async def wake(self, sb: LiveSandbox) -> pb.Sandbox:
        r = sb.record
        if r.state not in ASLEEP:
            raise lifecycle.refuse(r.id, "wake", self.m.state_name(sb), "it is not hibernated")
        if r.state == pb.HIBERNATING:  # let it fall asleep first; the held messages wake it after
            async with sb.changed:
                await sb.changed.wait_for(lambda: r.state != pb.HIBERNATING)
        self.wake_soon(sb)
        if sb.waking is not None:
            await asyncio.shield(sb.waking)
        if r.state != pb.RUNNING:
            raise StateError(f"sandbox {r.id} did not wake: {r.message}")
        return r.to_pb()

    async def _wake(self, sb: LiveSandbox) -> None:
        r = sb.record
        method = r.hibernation
        self.m.set_state(sb, pb.WAKING, f"waking from {method}",
                          pb.Progress(step="wake", message=f"waking from {method}", fraction=0.1))
        started = time.perf_counter()
        sb.told_waiting = False
        try:
            if method == "suspend":
                await self._resume(sb)
            else:
                await self.relaunch(sb, method)
        except Exception as e:
            why = describe(e)
            log.exception("sandbox_id=%s could not wake", r.id)
            await self.lost_in_wake(sb, f"waking this kernel failed: {why}")
            return
        finally:
            sb.waking = None
        took = time.perf_counter() - started
        r.hibernation = ""
        r.last_activity = time.time()
        self.m.set_state(sb, pb.RUNNING, "", pb.Progress(step="wake", message=f"awake in {took:.2f}s",
                                                          fraction=1.0))
        self.deliver_held(sb)

    async def lost_in_wake(self, sb: LiveSandbox, why: str) -> None:
        """The kernel could not be started again from what was saved: its sandbox fails, and the cells waiting
        for it end with `why`."""
        self.m.scheduler.release(sb.record.id)
        with contextlib.suppress(Exception):
            await self.m.runtimes[sb.record.runtime].stop(sb.record)
        self.m.set_state(sb, pb.FAILED, why)
        cells.tell_waiting(sb, f"snapkernel: {why}\nRestart the kernel (its variables could not be brought back).",
                           fail=True)

    def _waiting(self, sb: LiveSandbox, why: str) -> None:
        self.m.progress(sb, "wake", why)
        if not sb.told_waiting:
            sb.told_waiting = True
            cells.tell_waiting(sb, f"snapkernel: this kernel is hibernated and waits for its GPU to wake: {why}\n")

    async def _resume(self, sb: LiveSandbox) -> None:
        r = sb.record
        await self.m.scheduler.wait_in_line(r.id, lambda: self.m.scheduler.claim_gpus(r.id, r.gpu_indices),
                                            lambda why: self._waiting(sb, why), self.m.defaults.wake_timeout)
        driver = await asyncio.to_thread(cuda.CudaDriver.load)
        # After a backend restart only the processes are known again, not what they held.
        suspended = sb.suspended or cuda.Suspended(await asyncio.to_thread(cuda.cuda_processes, driver, r.pid))
        await self.m.scheduler.wait_in_line(
            r.id, lambda: cuda.check_room(suspended.gpu_bytes, r.gpu_indices), lambda why: self._waiting(sb, why),
            self.m.defaults.wake_timeout)
        await asyncio.to_thread(cuda.resume, driver, suspended, r.gpu_indices)
        sb.suspended = None
        result = await self._offload(sb, "reload")
        if result.get("bytes"):
            log.info("sandbox_id=%s reloaded %s bytes of tensors in %.2fs (%.1f GiB/s)", r.id, result["bytes"],
                     result.get("seconds", 0.0), result.get("gib_s", 0.0))
        self.m.spawn(self._after_resume(sb))

    async def _after_resume(self, sb: LiveSandbox) -> None:
        """Once the waiting cells are on their way: free the host copies, and the limit shrinks back (to the
        kernel's memory and the staging buffers it keeps for the next time)."""
        r = sb.record
        try:
            result = await self._offload(sb, "release")
            if "staging_bytes" in result:
                sb.offload_staging = int(result["staging_bytes"])
        except SnapkernelError as e:
            log.warning("sandbox_id=%s host copies of its tensors not freed: %s", r.id, e)
        awake = sb.spec.memory + sb.offload_staging
        self.m.runtimes[r.runtime].set_memory_limit(r, awake)
        self.m.scheduler.resize(r.id, awake)

    async def relaunch(self, sb: LiveSandbox, method: str, memory: int = 0) -> None:
        """Start the kernel again from its image or variables, with the sandbox's spec (a wake, or a move to
        another: `memory`, when it differs from the image's, is the restored kernel's new memory limit)."""
        r = sb.record
        if sb.spec.gpu:
            r.gpu_indices = await self.m.scheduler.wait_in_line(
                r.id, lambda: self.m.scheduler.allocate(r.id, sb.spec), lambda why: self._waiting(sb, why),
                self.m.defaults.wake_timeout)
        else:
            self.m.scheduler.allocate(r.id, sb.spec)
        runtime = self.m.runtimes[r.runtime]
        await asyncio.to_thread(self.m.prepare_workspace, sb)  # mounted again if the host rebooted meanwhile
        if method == "memory":
            r.limits = await runtime.launch(r, sb.spec, {}, Path(r.dir) / IMAGE_DIR)
            self.m.set_state(sb, r.state)  # on disk with its new process (and spec): a restarted backend finds it
            await self.m.connect(sb, runtime, self.m.defaults.start_timeout)
            if memory:
                await self.m.messages.give_identity(sb, sb.identity_env(r.kernel), self.m.defaults.start_timeout,
                                                    memory)
            # runsc reads the image while it restores: the kernel answering is the sign it is done with it.
            result = await self.m.run_in_kernel(sb, "pass", self.m.defaults.start_timeout)
            if not result.ok:
                raise StateError(f"the restored kernel did not answer: {result.error}")
            await asyncio.to_thread(remove_image, r)
            return
        sb.restore_state = STATE_DIR
        r.limits = await runtime.launch(r, sb.spec, sb.env(r.kernel))
        self.m.set_state(sb, r.state)
        await self.m.connect(sb, runtime, self.m.defaults.start_timeout)
        async with sb.changed:  # the new kernel starts, then loads the variables (see SandboxManager)
            await asyncio.wait_for(sb.changed.wait_for(lambda: sb.restore_state is None or r.ended),
                                   self.m.defaults.wake_timeout)
        if sb.state_error:
            raise StateError(sb.state_error)

    # --- messages -------------------------------------------------------------------------------
    def deliver_held(self, sb: LiveSandbox) -> None:
        held, sb.held = sb.held, []
        for msg in held:
            self.m.send_to_agent(sb, msg)
