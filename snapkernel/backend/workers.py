"""Fan-out worker sandboxes: started like kernel sandboxes (same runtime, image and scheduler) with the agent in
worker mode, kept warm in a pool per (owner, spec) between jobs, and reaped after an idle time. Under gvisor a
new worker restores its class's worker template (templates.py) rather than booting; it is ready once it has said
hello as its own sandbox.

GPU workers get distinct GPUs because every worker is a sandbox of its own and the scheduler gives GPUs out
exclusively. A pool owned by a kernel's sandbox goes away with that kernel (restart, exit, deletion).

A leased worker serves one job at a time: a `Lessee`, told of the worker's hello, results and death. The pool
knows jobs by that interface only (fan-out builds on the pool, never the other way round).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from snapkernel.backend.sandbox import MODE_ENV, LiveSandbox
from snapkernel.backend.sandboxes import SandboxManager
from snapkernel.errors import NoCapacityError, SnapkernelError
from snapkernel.protocol.states import ENDED
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)

CLIENT_OWNER = "client"  # pools of gRPC callers outside any sandbox


def describe_exit(code: int) -> str:
    """An exit status as words: a negative one (Python's) or one above 128 (a shell's, runsc's) is a signal."""
    number = -code if code < 0 else code - 128 if 128 < code < 128 + 65 else 0
    if not number:
        return f"exited with code {code}"
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if number == signal.SIGKILL:
        return f"killed by {name} (over its memory limit, or stopped from outside)"
    return f"killed by {name}"


def is_worker(spec: pb.SandboxSpec) -> bool:
    """A fan-out worker's sandbox ("clone": a --clone worker, restored from its kernel's snapshot)."""
    return spec.env.get(MODE_ENV) in ("worker", "clone")


class Lessee(Protocol):
    """What holds a leased worker (a fan-out job): it hears of the worker's events from the pool."""
    id: int

    def on_worker_ready(self, w: Worker) -> None: ...
    def on_results(self, w: Worker, msg: pb.WorkerResults) -> None: ...
    def on_worker_gone(self, w: Worker) -> None: ...


def worker_spec(asked: pb.SandboxSpec, owner: LiveSandbox | None) -> pb.SandboxSpec:
    """A plain worker's spec: the resources as asked; everything else as the kernel's. A kernel holds no token,
    so its code gets no say in the image, runtime, mounts or network; a gRPC caller (with the token) does."""
    spec = pb.SandboxSpec(gpu=asked.gpu, cpu=asked.cpu if asked.HasField("cpu") else 1.0, memory=asked.memory)
    base = owner.record.spec if owner is not None else asked
    spec.runtime = owner.record.runtime if owner is not None else asked.runtime
    spec.image = base.image
    spec.mount_dir = base.mount_dir
    spec.env.update(base.env)
    spec.env[MODE_ENV] = "worker"
    spec.hibernate_after = 0  # idle workers are stopped by their pool, never hibernated
    return spec


def clone_spec(owner: LiveSandbox, snapshot_id: str) -> pb.SandboxSpec:
    """A --clone worker's spec: its kernel's, restored from the kernel's memory snapshot."""
    spec = pb.SandboxSpec()
    spec.CopyFrom(owner.record.spec)
    spec.restore_from = snapshot_id
    spec.hibernate_after = 0
    spec.env[MODE_ENV] = "clone"  # listed as a worker; never leased to another job
    return spec


@dataclass(eq=False)  # compared (and hashed) as itself: a job's dispatcher keys its bookkeeping by worker
class Worker:
    sandbox_id: str
    pool_key: tuple[str, bytes]
    hello: pb.WorkerHello | None = None
    gone: str = ""                                # why it can serve no more ("" while alive)
    functions: list[str] = field(default_factory=list)  # hashes it holds, as it keeps them (MAX_FUNCTIONS)
    job: Lessee | None = None
    cancelling: bool = False                      # told to stop its job's items; not leased until it answers
    idle_since: float = field(default_factory=time.monotonic)
    clone_stream: int = 0  # a --clone worker: its kernel's relay stream, on which it serves (0: a worker sandbox)
    exit_code: int | None = None  # its sandbox's exit status, once it exited (negative: killed by that signal)

    def how_it_died(self) -> str:
        """`exited with code 1`, `killed by SIGSEGV`, or the sandbox's own word (lost, deleted...)."""
        if self.exit_code is None:
            return (self.gone.splitlines()[0] if self.gone else "went away").removeprefix("sandbox ")
        return describe_exit(self.exit_code)

    @property
    def ready(self) -> bool:
        return self.hello is not None and not self.gone

    def send(self, manager: SandboxManager, msg: pb.AgentMessage) -> None:
        """A command to the worker: on its link, or for a clone on its kernel's fan-out stream."""
        sb = manager.get(self.sandbox_id)
        if not self.clone_stream:
            manager.send_to_agent(sb, msg)
        elif msg.WhichOneof("kind") == "worker_tasks":
            data = pb.MapResponse(clone_tasks=msg.worker_tasks).SerializeToString()
            manager.send_to_agent(sb, pb.AgentMessage(fanout=pb.FanoutFrame(stream=self.clone_stream, data=data)))


class WorkerPools:
    def __init__(self, manager: SandboxManager, idle_timeout: float) -> None:
        self.manager = manager
        self.idle_timeout = idle_timeout
        self.workers: dict[str, Worker] = {}
        self.owners: dict[str, asyncio.Task[None]] = {}  # owner sandbox id -> its watcher
        self._tasks: set[asyncio.Task[None]] = set()
        manager.handlers["worker_hello"] = self._on_hello
        manager.handlers["worker_results"] = self._on_results
        self.on_owner_gone: Callable[[str], None] = lambda owner: None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def build_default_template(self) -> None:
        """The template of the workers a kernel of the default spec fans out to, built in the background (after
        the default kernel's), so that even the first fan-out restores its workers."""
        self.manager.ensure_template(worker_spec(pb.SandboxSpec(), None))

    # --- leasing --------------------------------------------------------------------------------
    async def lease(self, owner: LiveSandbox | None, spec: pb.SandboxSpec, count: int,
                    job: Lessee, clone_stream: int = 0) -> tuple[list[Worker], str]:
        """`count` workers for `job`: idle ones of the pool first, new sandboxes for the rest. Where the host
        has room for fewer, those few (and why not more); none at all is an error."""
        owner_id = owner.record.id if owner is not None else CLIENT_OWNER
        key = (owner_id, spec.SerializeToString(deterministic=True))
        taken: list[Worker] = []
        for w in self.workers.values() if not clone_stream else ():  # clones serve their own job only
            if len(taken) == count:
                break
            if w.pool_key == key and w.job is None and not w.gone and not w.cancelling:
                w.job = job
                taken.append(w)
        shortfall = ""
        while len(taken) < count:
            try:
                sandbox = await self.manager.create(pb.CreateSandboxRequest(
                    spec=spec, notebook_path=owner.record.notebook_path if owner else ""))
            except NoCapacityError as e:
                if not taken:
                    raise
                shortfall = f"only {len(taken)} of {count} workers: {e}"
                break
            w = Worker(sandbox.id, key, job=job, clone_stream=clone_stream)
            self.workers[sandbox.id] = w
            self._spawn(self._watch(w))
            taken.append(w)
            log.info("sandbox_id=%s fan-out worker started for owner=%s job=%s", sandbox.id, owner_id, job.id)
        if owner is not None and owner_id not in self.owners:
            task = asyncio.ensure_future(self._watch_owner(owner))
            self.owners[owner_id] = task
        return taken, shortfall

    def release(self, w: Worker) -> None:
        """Back to the pool, warm, once its job has ended."""
        w.job = None
        w.idle_since = time.monotonic()

    def retire(self, w: Worker, why: str) -> None:
        """Out of the pool now, never to be leased or heard again; `kill` stops its sandbox."""
        if not w.gone:
            w.gone = why
            log.info("sandbox_id=%s stopping fan-out worker: %s", w.sandbox_id, why)
        self.workers.pop(w.sandbox_id, None)

    async def kill(self, w: Worker, why: str) -> None:
        """Stop a worker for good (it did not stop when cancelled, or its pool went away)."""
        self.retire(w, why)
        with contextlib.suppress(SnapkernelError):
            await self.manager.delete(w.sandbox_id)

    # --- events ---------------------------------------------------------------------------------
    def _on_hello(self, sb: LiveSandbox, msg: pb.AgentMessage) -> None:
        self.on_hello(sb.record.id, msg.worker_hello)

    def on_hello(self, sandbox_id: str, hello: pb.WorkerHello) -> None:
        w = self.workers.get(sandbox_id)
        if w is None:
            return
        if hello.sandbox_id and hello.sandbox_id != sandbox_id:  # restored, and not (yet) as this sandbox
            log.warning("sandbox_id=%s fan-out worker said hello as %s: not ready", sandbox_id, hello.sandbox_id)
            return
        w.hello = hello
        w.idle_since = time.monotonic()
        log.info("sandbox_id=%s fan-out worker up: python %s cloudpickle %s", w.sandbox_id, w.hello.python,
                 w.hello.cloudpickle)
        if w.job is not None:
            w.job.on_worker_ready(w)

    def _on_results(self, sb: LiveSandbox, msg: pb.AgentMessage) -> None:
        self.on_results(sb.record.id, msg.worker_results)

    def on_results(self, sandbox_id: str, results: pb.WorkerResults) -> None:
        w = self.workers.get(sandbox_id)
        if w is not None and w.job is not None:
            w.job.on_results(w, results)
        elif w is not None and results.cancelled:
            w.cancelling = False

    async def _watch(self, w: Worker) -> None:
        """Until the worker's sandbox ends: then its job hears of it."""
        sb = self.manager.get(w.sandbox_id)
        queue: asyncio.Queue[pb.SandboxEvent | None] = asyncio.Queue()
        sb.watchers.add(queue)
        event: pb.SandboxEvent | None = pb.SandboxEvent(sandbox=sb.record.to_pb())  # its state now, then changes
        told = False
        try:
            while event is not None and event.sandbox.state not in ENDED:
                if w.clone_stream and event.sandbox.state == pb.RUNNING and not told:
                    # The restored kernel is inside its %%fanout cell, reading this stream: make it a worker.
                    told = True
                    data = pb.MapResponse(become_worker=True).SerializeToString()
                    with contextlib.suppress(SnapkernelError):
                        self.manager.send_to_agent(sb, pb.AgentMessage(
                            fanout=pb.FanoutFrame(stream=w.clone_stream, data=data)))
                event = await queue.get()
        finally:
            sb.watchers.discard(queue)
        why = (event.sandbox.message if event is not None else "") or "its sandbox was deleted"
        if event is not None and event.sandbox.state == pb.EXITED and w.exit_code is None:
            w.exit_code = event.sandbox.exit_code
        if not w.gone:
            w.gone = why
        self.workers.pop(w.sandbox_id, None)
        log.info("sandbox_id=%s fan-out worker gone: %s", w.sandbox_id, why)
        if w.job is not None:
            w.job.on_worker_gone(w)
        if sb.record.ended and sb.record.id in self.manager.live and not sb.deleting:
            with contextlib.suppress(SnapkernelError):
                await self.manager.delete(sb.record.id)  # nothing of a dead worker is kept

    async def _watch_owner(self, owner: LiveSandbox) -> None:
        """A kernel's workers end with its kernel: on a restart, an exit or the sandbox's deletion."""
        queue: asyncio.Queue[pb.SandboxEvent | None] = asyncio.Queue()
        owner.watchers.add(queue)
        generation = owner.record.kernel_generation
        try:
            while (event := await queue.get()) is not None:
                s = event.sandbox
                if s.state in ENDED or s.state == pb.KERNEL_EXITED or s.kernel_generation != generation:
                    break
        finally:
            owner.watchers.discard(queue)
            self.owners.pop(owner.record.id, None)
        log.info("sandbox_id=%s kernel restarted or ended: stopping its fan-out workers", owner.record.id)
        self.on_owner_gone(owner.record.id)
        for w in [w for w in self.workers.values() if w.pool_key[0] == owner.record.id]:
            await self.kill(w, f"its kernel's sandbox {owner.record.id} restarted or ended")

    async def reap(self) -> None:
        """Every few seconds: stop workers idle longer than the idle timeout."""
        while True:
            await asyncio.sleep(max(0.5, min(10.0, self.idle_timeout / 4)))
            now = time.monotonic()
            for w in list(self.workers.values()):
                if w.job is None and not w.cancelling and now - w.idle_since > self.idle_timeout:
                    try:
                        await self.kill(w, f"idle for {self.idle_timeout:g}s")
                    except Exception:  # the reaper must outlive one bad stop
                        log.exception("sandbox_id=%s could not stop an idle worker", w.sandbox_id)

    async def remove_leftovers(self) -> None:
        """Workers of a previous backend have no job and no pool any more: stop them."""
        for sb in list(self.manager.live.values()):
            if is_worker(sb.record.spec) and not sb.record.ended and not sb.internal:
                log.info("sandbox_id=%s stopping a fan-out worker left by a previous backend", sb.record.id)
                with contextlib.suppress(SnapkernelError):
                    await self.manager.delete(sb.record.id)

    async def close(self) -> None:
        for task in [*self._tasks, *self.owners.values()]:
            task.cancel()
        for w in list(self.workers.values()):
            await self.kill(w, "the backend is stopping")
