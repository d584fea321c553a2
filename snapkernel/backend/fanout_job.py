"""One fan-out job: one Map stream, from the gRPC `Map` call or relayed by a kernel's agent, and the workers
that serve it.

The stream's side lives here: `start` checked, the function taken once per content hash (from the backend's
cache where the cell did not change), items and blobs in, status, results and blobs out, cancel and the end.
Which item goes to which worker, retries and blame after a worker's death are the `Dispatcher`'s
(fanout_dispatch.py); the workers come leased from the pool (workers.py), which tells the job of their hello,
results and death.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from snapkernel.backend.fanout_blobs import InputBlobs, chunks, take_blob
from snapkernel.backend.fanout_dispatch import Dispatcher
from snapkernel.backend.sandbox import LiveSandbox
from snapkernel.backend.sandboxes import SandboxManager
from snapkernel.backend.workers import Worker, WorkerPools, clone_spec, worker_spec
from snapkernel.errors import InvalidSpecError, SnapkernelError, StateError
from snapkernel.protocol.fanout import MAX_FUNCTIONS, ItemTimeout, format_remote, pickled_exception
from snapkernel.protocol.spec import check_cpu
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)

MAX_WORKERS = 256
MAX_FUNCTION = 64 * 1024 * 1024
CANCEL_GRACE = 0.75                 # seconds a worker has to stop a cancelled item before it is killed
WATCHDOG_GRACE = 3.0                # seconds past an item's timeout before its worker is killed
_HASH = re.compile(r"^[0-9a-f]{64}$")


class Host(Protocol):
    """What a job needs of the backend (the FanoutManager)."""
    manager: SandboxManager
    pools: WorkerPools
    blob_root: Path

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...
    def cached_function(self, digest: str) -> bytes | None: ...
    def remember(self, digest: str, data: bytes) -> None: ...
    def job_ended(self, job: Job) -> None: ...


class Job:
    def __init__(self, fm: Host, job_id: int, send: Callable[[pb.MapResponse], None],
                 owner: LiveSandbox | None) -> None:
        self.fm = fm
        self.id = job_id
        self.send_out = send
        self.owner = owner
        self.start: pb.MapStart | None = None
        self.function: str = ""
        self.function_data = b""  # kept here: the backend's cache may drop it while the job runs
        self.dispatch: Dispatcher[Worker] = Dispatcher()
        self.workers: list[Worker] = []
        self.finished = False
        self.cancelled = False
        self.flush_scheduled = False
        self.blobs = InputBlobs(fm.blob_root / str(job_id))
        self.error = ""
        self.replacements = 0
        self.stream = 0              # the kernel's relay stream this job came on (0: a gRPC caller)
        self.clone_snapshot = ""     # --clone: the kernel's memory snapshot its workers are restored from
        self.lock = asyncio.Lock()  # requests of one stream are handled in order

    # --- the client's side ----------------------------------------------------------------------
    def send(self, response: pb.MapResponse) -> None:
        if not self.finished:
            self.send_out(response)

    async def on_request(self, req: pb.MapRequest) -> None:
        kind = req.WhichOneof("kind")
        if self.finished:
            return
        if kind == "start":
            await self._on_start(req.start)
        elif self.start is None:
            raise InvalidSpecError(f"Map: the first message must be `start`, not `{kind}` (did the backend restart "
                                   "during this job? run it again)")
        elif kind == "function":
            await self._on_function(req.function)
        elif kind == "items":
            self.dispatch.add(req.items.items)
            self.pump()
        elif kind == "blob":
            await self.blobs.receive(req.blob)
        elif kind == "end":
            self.dispatch.end_input()
            self._maybe_done()
        elif kind == "cancel":
            self.cancel()

    async def _on_start(self, start: pb.MapStart) -> None:
        if self.start is not None:
            raise InvalidSpecError("Map: `start` was sent twice on one stream")
        if not 1 <= start.workers <= MAX_WORKERS:
            raise InvalidSpecError(f"workers {start.workers} is not accepted: ask for 1 to {MAX_WORKERS}")
        if start.timeout < 0 or start.retries > 100:
            raise InvalidSpecError(f"timeout {start.timeout:g} / retries {start.retries} not accepted: use a "
                                   "timeout of 0 (none) or more seconds and 0 to 100 retries")
        if start.spec.HasField("cpu"):
            check_cpu(start.spec.cpu)  # 0 is refused, not taken for the default (absent: 1 core per worker)
        if not _HASH.match(start.function_hash):
            raise InvalidSpecError(f"function hash {start.function_hash!r} is not a sha256 hex digest")
        self.start = start
        self.dispatch.retries = start.retries
        self.function = start.function_hash
        if start.timeout > 0:
            self.fm.spawn(self._watchdog(start.timeout))
        if start.clone:
            await self._start_clones()
        elif (cached := self.fm.cached_function(self.function)) is not None:
            self.function_data = cached
            await self._start_workers()
        else:
            self.send(pb.MapResponse(status=pb.MapStatus(need_function=True)))

    async def _on_function(self, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.function:
            raise InvalidSpecError(f"the function sent has sha256 {digest}, not the {self.function} of `start`")
        if len(data) > MAX_FUNCTION:
            raise InvalidSpecError(f"the function is {len(data)} bytes, over the {MAX_FUNCTION} byte limit")
        self.fm.remember(digest, data)
        self.function_data = data
        await self._start_workers()

    def _status(self, message: str) -> None:
        ready = sum(1 for w in self.workers if w.ready)
        self.send(pb.MapResponse(status=pb.MapStatus(workers_ready=ready, workers=len(self.workers),
                                                     message=message)))

    # --- leasing workers ------------------------------------------------------------------------
    async def _start_workers(self) -> None:
        assert self.start is not None
        self.workers, shortfall = await self.fm.pools.lease(self.owner, worker_spec(self.start.spec, self.owner),
                                                            self.start.workers, self)
        if self.finished or self.cancelled:  # the client went away meanwhile
            for w in self.workers:
                self.fm.pools.release(w)
            return
        self._status(shortfall or f"{len(self.workers)} worker(s)")
        for w in self.workers:
            if w.ready:
                self.on_worker_ready(w)

    async def _start_clones(self) -> None:
        """--clone: a live memory snapshot of the calling kernel, and workers restored from it. Each clone's
        kernel is inside this very %%fanout cell, reading the job's stream; told to, it serves the items
        with the cell body run in its own namespace (every variable, import and model already there)."""
        assert self.start is not None
        owner = self.owner
        if owner is None or not self.stream:
            raise InvalidSpecError("--clone works from a snapkernel kernel only: it clones the calling kernel")
        runtime = self.fm.manager.runtimes.get(owner.record.runtime)
        if runtime is None or not runtime.capabilities.clone:
            raise StateError(f"--clone needs a kernel under the gvisor runtime (memory snapshots); this one runs "
                             f"under {owner.record.runtime}: drop --clone (the cell's variables are sent by value)")
        if owner.record.gpu_indices or self.start.spec.gpu:
            raise StateError("--clone of GPU kernels is not available yet (GPU memory is not in the snapshot); "
                             "drop --clone and load the model inside the cell")
        self._status("cloning the kernel (memory snapshot)")
        snap = await self.fm.manager.snapshot(pb.CreateSnapshotRequest(
            sandbox_id=owner.record.id, kind="memory", name=f"fanout-clone-job-{self.id}"))
        self.clone_snapshot = snap.id
        await self._lease_clones(self.start.workers)

    async def _lease_clones(self, count: int) -> list[Worker]:
        assert self.owner is not None
        workers, shortfall = await self.fm.pools.lease(self.owner, clone_spec(self.owner, self.clone_snapshot),
                                                       count, self, clone_stream=self.stream)
        self.workers += workers
        self._status(shortfall or f"{len(self.workers)} clone(s) of the kernel starting")
        if self.finished or self.cancelled:
            self._cleanup()
        return workers

    async def _replace(self) -> None:
        assert self.start is not None
        try:
            if self.clone_snapshot:
                await self._lease_clones(1)
                return
            (w,), _ = await self.fm.pools.lease(self.owner, worker_spec(self.start.spec, self.owner), 1, self)
        except SnapkernelError as e:
            if not self.workers:
                self.fail(f"a worker died and no new one could be started: {e}")
            return
        if self.finished or self.cancelled:  # the job ended meanwhile
            self.fm.pools.release(w)
            return
        self.workers.append(w)
        if w.ready:
            self.on_worker_ready(w)

    async def _watchdog(self, timeout: float) -> None:
        """A worker silent long past an item's timeout runs code that ignores the timeout's signal: the item
        fails as timed out, the worker is replaced and its other items go back to the queue."""
        while not self.finished and not self.cancelled:
            await asyncio.sleep(1.0)
            for w in self.dispatch.overdue(timeout + WATCHDOG_GRACE):
                if w.gone:
                    continue
                item = self.dispatch.time_out(w)
                if item is None:
                    continue
                err = ItemTimeout(f"the item ran past its timeout of {timeout:g}s and did not stop (its code "
                                  f"ignores signals); worker {w.sandbox_id} was replaced")
                self.dispatch.settle(item, pb.MapResult(index=item.index, ok=False, worker=w.sandbox_id,
                                                        error=format_remote(err), data=pickled_exception(err)))
                self._flush_soon()
                await self.fm.pools.kill(w, f"item {item.index} ran past its timeout")

    # --- the pool's events (a Lessee) -----------------------------------------------------------
    def on_worker_ready(self, w: Worker) -> None:
        assert self.start is not None and w.hello is not None
        s = self.start
        if (s.python and s.python != w.hello.python) or (s.cloudpickle and s.cloudpickle != w.hello.cloudpickle):
            self.fail(f"worker {w.sandbox_id} runs python {w.hello.python} with cloudpickle "
                      f"{w.hello.cloudpickle}, the caller python {s.python} with cloudpickle {s.cloudpickle}: "
                      "calls cannot be shipped between different versions; use an image with the same versions")
            return
        self._status(f"worker {w.sandbox_id} ready")
        self.pump()

    def pump(self) -> None:
        """Hand queued items to ready workers, up to each one's window."""
        if self.cancelled or self.start is None:
            return
        # Every ready worker of the job at once (not one still being leased), so that the first batches are
        # spread over all of them.
        ready = [w for w in self.workers if w.ready and w.job is self and not w.cancelling]
        for w, items in self.dispatch.pump(ready):
            self._send_tasks(w, items)

    def _send_tasks(self, w: Worker, items: list[pb.MapItem]) -> None:
        assert self.start is not None
        if self.function not in w.functions and not w.clone_stream:  # a clone has the cell in its kernel
            w.send(self.fm.manager, pb.AgentMessage(
                worker_function=pb.WorkerFunction(hash=self.function, data=self.function_data)))
            w.functions.append(self.function)
            del w.functions[:-MAX_FUNCTIONS]  # the worker drops the oldest the same way
        for item in items:
            if item.blob:
                sb = self.fm.manager.get(w.sandbox_id)
                self.blobs.link(item.blob, sb.record.dir, self.fm.manager.runtimes[sb.record.runtime].owner(sb.spec))
        try:
            w.send(self.fm.manager, pb.AgentMessage(
                worker_tasks=pb.WorkerTasks(job=self.id, function_hash=self.function, timeout=self.start.timeout,
                                            items=items)))
        except SnapkernelError as e:  # it is going away; its watcher hands the items back
            log.info("sandbox_id=%s job=%s could not take tasks: %s", w.sandbox_id, self.id, e)

    def on_results(self, w: Worker, msg: pb.WorkerResults) -> None:
        if msg.job != self.id:
            return
        if msg.cancelled:
            w.cancelling = False
            self.fm.pools.release(w)
            self._maybe_done()
            return
        if self.cancelled:
            return
        for r in msg.results:
            r.worker = w.sandbox_id
        for r in self.dispatch.results(w, msg.results):
            self.fm.spawn(self._send_result_blob(w, r))
        self._flush_soon()
        self.pump()
        self._maybe_done()

    def on_worker_gone(self, w: Worker) -> None:
        """A worker died: its items go back to the queue once; a new worker takes its place."""
        if w in self.workers:
            self.workers.remove(w)
        if self.finished or self.cancelled:
            self.dispatch.forget(w)
            self._maybe_done()
            return
        how = w.how_it_died()
        lost = self.dispatch.worker_lost(w, w.sandbox_id, how)
        self._flush_soon()
        running = f" while running item {lost[0].index}" if len(lost) == 1 else ""
        self._status(f"worker {w.sandbox_id} {how}{running}; replacing it")
        log.info("sandbox_id=%s job=%s worker %s with %d item(s) in flight", w.sandbox_id, self.id, how, len(lost))
        self.replacements += 1
        if self.replacements > 2 * (self.start.workers if self.start else 1) + 4:
            self.fail(f"workers keep dying ({self.replacements} replaced); the last one {how}{running}")
            return
        self.fm.spawn(self._replace())

    # --- results out ----------------------------------------------------------------------------
    async def _send_result_blob(self, w: Worker, r: pb.MapResult) -> None:
        settled: pb.MapResult | None = None
        try:
            data = await asyncio.to_thread(take_blob, self.fm.manager.get(w.sandbox_id).record.dir, r.blob)
            for chunk in chunks(r.blob, data):
                self.send(pb.MapResponse(blob=chunk))
            settled = r
        except (OSError, SnapkernelError) as e:
            settled = pb.MapResult(index=r.index, ok=False, worker=r.worker, attempts=r.attempts,
                                   error=f"BlobLost: the result of worker {w.sandbox_id} could not be read back: {e}")
        finally:
            self.dispatch.fetched(settled)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self.dispatch.out and not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.dispatch.out:
            self.send(pb.MapResponse(results=pb.MapResults(results=self.dispatch.take_results())))
        self._maybe_done()

    # --- ending ---------------------------------------------------------------------------------
    def _maybe_done(self) -> None:
        if self.finished:
            return
        if self.cancelled:
            if not any(w.cancelling for w in self.workers):
                self._finish(pb.MapDone(cancelled=not self.error, error=self.error))
            return
        if self.dispatch.done:
            self._finish(pb.MapDone())

    def cancel(self) -> None:
        """Drop queued items, stop running ones (workers that do not stop in time are killed)."""
        if self.cancelled or self.finished:
            return
        self.cancelled = True
        busy = set(self.dispatch.cancel())
        for w in self.workers:
            if w.gone or w.clone_stream:  # clones are stopped with the job
                continue
            if w in busy:
                w.cancelling = True
                with contextlib.suppress(SnapkernelError):
                    self.fm.manager.send_to_agent(self.fm.manager.get(w.sandbox_id),
                                                  pb.AgentMessage(worker_cancel=self.id))
                self.fm.spawn(self._kill_if_stuck(w))
            else:
                self.fm.pools.release(w)
        log.info("job=%s cancelled", self.id)
        self._maybe_done()

    async def _kill_if_stuck(self, w: Worker) -> None:
        await asyncio.sleep(CANCEL_GRACE)
        if w.cancelling:
            # The job is done with it now; stopping its sandbox (a few seconds under gvisor) goes on meanwhile.
            w.cancelling = False
            why = f"it did not stop job {self.id}'s item within {CANCEL_GRACE:g}s of the cancel"
            self.fm.pools.retire(w, why)
            self._maybe_done()
            await self.fm.pools.kill(w, why)

    def fail(self, message: str) -> None:
        log.warning("job=%s failed: %s", self.id, message)
        self.error = self.error or message
        self.cancel()

    def _finish(self, done: pb.MapDone) -> None:
        self.finished = True
        if self.dispatch.out and not self.cancelled:
            self.send_out(pb.MapResponse(results=pb.MapResults(results=self.dispatch.take_results())))
        self.send_out(pb.MapResponse(done=done))
        self._cleanup()

    def closed(self) -> None:
        """The client went away (its stream closed, its kernel stopped)."""
        if not self.finished:
            self.cancel()
            self.finished = True
            self._cleanup()

    def _cleanup(self) -> None:
        """Workers back to their pool (clones stopped, their snapshot removed), blobs removed."""
        for w in self.workers:
            if w.clone_stream:
                self.fm.spawn(self.fm.pools.kill(w, f"job {self.id} ended"))
            elif w.job is self and not w.cancelling:
                self.fm.pools.release(w)
        if self.clone_snapshot:
            self.fm.spawn(asyncio.to_thread(self.fm.manager.snapshots.delete, self.clone_snapshot))
        self.fm.job_ended(self)
        self.fm.spawn(asyncio.to_thread(self.blobs.remove))  # a tree of input blobs: not on the event loop
