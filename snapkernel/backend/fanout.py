"""Fan-out jobs: one function over many inputs, run by a pool of worker sandboxes.

A job is one Map stream, from the gRPC `Map` call or relayed by a kernel's agent (`AgentMessage.fanout`);
both feed the same `Job`. The function arrives once per content hash (the backend keeps recent ones, so an
unchanged cell ships nothing); items arrive in batches under the client's bounded window and wait in a
queue; each worker holds a small window of items and gets more as its results come back (workers pull), in
batches sized to about 20 ms of work. Results stream back as they finish, in completion order; the client
restores input order. Payloads over a few MiB travel as blob chunks and reach workers as files.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import logging
import os
import re
import shutil
import stat
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from snapkernel.backend.sandboxes import LiveSandbox, SandboxManager
from snapkernel.backend.workers import MODE_ENV, Worker, WorkerPools
from snapkernel.backend.workspace import WORKSPACE
from snapkernel.errors import InvalidSpecError, SnapkernelError, StateError
from snapkernel.protocol.fanout import BLOB_DIR, MAX_FUNCTIONS, ItemTimeout, format_remote, pickled_exception
from snapkernel.protocol.spec import check_cpu
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)

MAX_WORKERS = 256
MAX_FUNCTION = 64 * 1024 * 1024
FUNCTION_CACHE = 512 * 1024 * 1024  # bytes of recent functions kept by hash
BATCH_SECONDS = 0.02                # a batch for a worker holds about this much work
MAX_BATCH = 256
CANCEL_GRACE = 0.75                 # seconds a worker has to stop a cancelled item before it is killed
CHUNK = 1024 * 1024
MAX_BLOB = 2 * 1024**3
WATCHDOG_GRACE = 3.0                # seconds past an item's timeout before its worker is killed
_BLOB_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


def _blob_dir(sandbox_dir: str, owner: tuple[int, int] | None = None) -> int:
    """A worker's blob directory, opened without following links: the worker's code could plant them to make
    the backend read or write host files. Made for `owner`, the user the worker runs as."""
    workspace = os.open(Path(sandbox_dir) / WORKSPACE, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            os.mkdir(BLOB_DIR, 0o700, dir_fd=workspace)
            if owner is not None:
                os.chown(BLOB_DIR, *owner, dir_fd=workspace, follow_symlinks=False)
        except FileExistsError:
            pass
        return os.open(BLOB_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=workspace)
    finally:
        os.close(workspace)


def _put_blob(src: Path, d: int, name: str) -> None:
    """An input blob into a worker's blob directory: a hard link, or a copy where the worker's workspace is a
    file system of its own (its disk quota). Readable by the worker's user either way."""
    os.chmod(src, 0o644)  # the job's blob directory is the backend's (0700): only workers get to see this
    try:
        os.link(src, name, dst_dir_fd=d)
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=d)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, CHUNK)


def _take_blob(sandbox_dir: str, name: str) -> bytes:
    """Read and remove a result a worker left as a file (a plain file of a checked name, nothing else)."""
    if not _BLOB_NAME.match(name):
        raise InvalidSpecError(f"result blob name {name!r} is not accepted")
    d = _blob_dir(sandbox_dir)
    try:
        with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=d), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BLOB:
                raise InvalidSpecError(f"result blob {name!r} is not a plain file of at most {MAX_BLOB} bytes")
            data = f.read()
        os.unlink(name, dir_fd=d)
        return data
    finally:
        os.close(d)


class Job:
    def __init__(self, fm: FanoutManager, job_id: int, send: Callable[[pb.MapResponse], None],
                 owner: LiveSandbox | None) -> None:
        self.fm = fm
        self.id = job_id
        self.send_out = send
        self.owner = owner
        self.start: pb.MapStart | None = None
        self.function: str = ""
        self.function_data = b""  # kept here: the backend's cache may drop it while the job runs
        self.queue: deque[pb.MapItem] = deque()
        self.attempts: dict[int, int] = {}
        self.died_on: set[int] = set()       # items whose worker died under them (retried once)
        # Items in flight when a worker died, and items retried after their worker died: each runs alone on a
        # worker, so that a death is known to be its own (results of a batch come back only now and then).
        self.suspects: set[int] = set()
        self.workers: list[Worker] = []
        self.input_ended = False
        self.finished = False
        self.cancelled = False
        self.out: list[pb.MapResult] = []
        self.flush_scheduled = False
        self.item_seconds = 0.0
        self.blob_dir = fm.blob_root / str(job_id)
        self.blobs: dict[str, list[bytes]] = {}
        self.blobs_in_flight = 0  # result blobs being sent back
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
            self.queue.extend(req.items.items)
            self.pump()
        elif kind == "blob":
            await self._on_blob(req.blob)
        elif kind == "end":
            self.input_ended = True
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
        self.function = start.function_hash
        if start.timeout > 0:
            self.fm.spawn(self._watchdog(start.timeout))
        if start.clone:
            await self._start_clones()
        elif self.function in self.fm.functions:
            self.fm.functions.move_to_end(self.function)
            self.function_data = self.fm.functions[self.function]
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

    async def _on_blob(self, chunk: pb.BlobChunk) -> None:
        if not _BLOB_NAME.match(chunk.name):
            raise InvalidSpecError(f"blob name {chunk.name!r} is not accepted: use 1-64 letters, digits, - or _")
        parts = self.blobs.setdefault(chunk.name, [])
        parts.append(chunk.data)
        if sum(map(len, parts)) > MAX_BLOB:
            raise InvalidSpecError(f"blob {chunk.name!r} is over the {MAX_BLOB} byte limit of one payload")
        if chunk.last:
            data = b"".join(self.blobs.pop(chunk.name))
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread((self.blob_dir / chunk.name).write_bytes, data)

    async def _start_clones(self) -> None:
        """--clone: a live memory snapshot of the calling kernel, and workers restored from it. Each clone's
        kernel is inside this very %%fanout cell, reading the job's stream; told to, it serves the items
        with the cell body run in its own namespace (every variable, import and model already there)."""
        assert self.start is not None
        owner = self.owner
        if owner is None or not self.stream:
            raise InvalidSpecError("--clone works from a snapkernel kernel only: it clones the calling kernel")
        if owner.record.runtime != "gvisor":
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
        spec = pb.SandboxSpec()
        spec.CopyFrom(self.owner.record.spec)
        spec.restore_from = self.clone_snapshot
        spec.hibernate_after = 0
        spec.env[MODE_ENV] = "clone"  # listed as a worker; never leased to another job
        workers, shortfall = await self.fm.pools.lease(self.owner, spec, count, self, clone_stream=self.stream)
        self.workers += workers
        self._status(shortfall or f"{len(self.workers)} clone(s) of the kernel starting")
        if self.finished or self.cancelled:
            self._cleanup()
        return workers

    def worker_spec(self) -> pb.SandboxSpec:
        """The workers' resources as asked; everything else as the kernel's. A kernel holds no token, so its
        code gets no say in the image, runtime, mounts or network; a gRPC caller (with the token) does."""
        assert self.start is not None
        asked = self.start.spec
        spec = pb.SandboxSpec(gpu=asked.gpu, cpu=asked.cpu if asked.HasField("cpu") else 1.0, memory=asked.memory)
        base = self.owner.record.spec if self.owner is not None else asked
        spec.runtime = self.owner.record.runtime if self.owner is not None else asked.runtime
        spec.image = base.image
        spec.mount_dir = base.mount_dir
        spec.env.update(base.env)
        spec.env[MODE_ENV] = "worker"
        spec.hibernate_after = 0  # idle workers are stopped by their pool, never hibernated
        return spec

    async def _start_workers(self) -> None:
        assert self.start is not None
        self.workers, shortfall = await self.fm.pools.lease(self.owner, self.worker_spec(), self.start.workers,
                                                            self)
        if self.finished or self.cancelled:  # the client went away meanwhile
            for w in self.workers:
                self.fm.pools.release(w)
            return
        self._status(shortfall or f"{len(self.workers)} worker(s)")
        for w in self.workers:
            if w.ready:
                self.on_worker_ready(w)

    async def _watchdog(self, timeout: float) -> None:
        """A worker silent long past an item's timeout runs code that ignores the timeout's signal: the item
        fails as timed out, the worker is replaced and its other items go back to the queue."""
        while not self.finished and not self.cancelled:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for w in list(self.workers):
                if not w.inflight or not w.mark or w.gone or now - w.mark < timeout + WATCHDOG_GRACE:
                    continue
                index, item = next(iter(w.inflight.items()))  # the one it runs: items run in the order sent
                del w.inflight[index]
                for other in w.inflight:
                    self.attempts[other] -= 1  # not their fault
                self.queue.extendleft(reversed(w.inflight.values()))
                w.inflight.clear()
                err = ItemTimeout(f"the item ran past its timeout of {timeout:g}s and did not stop (its code "
                                  f"ignores signals); worker {w.sandbox_id} was replaced")
                self._settle(item, pb.MapResult(index=index, ok=False, worker=w.sandbox_id, error=format_remote(err),
                                                data=pickled_exception(err)))
                self._flush_soon()
                await self.fm.pools.kill(w, f"item {index} ran past its timeout")

    def _status(self, message: str) -> None:
        ready = sum(1 for w in self.workers if w.ready)
        self.send(pb.MapResponse(status=pb.MapStatus(workers_ready=ready, workers=len(self.workers),
                                                     message=message)))

    # --- workers --------------------------------------------------------------------------------
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
        ready = [w for w in self.workers if w.ready and w.job is self and not w.cancelling]
        if not ready:
            return
        batch = 8  # until an item's time is measured
        if self.item_seconds > 0:
            batch = max(1, min(MAX_BATCH, int(BATCH_SECONDS / self.item_seconds)))
        window = 2 * batch  # the next batch waits on the worker while it runs this one
        for w in ready:
            while self.queue and len(w.inflight) < window:
                if self.suspects and any(i in self.suspects for i in w.inflight):
                    break  # a suspect runs alone
                if self.queue[0].index in self.suspects:
                    if w.inflight:
                        break
                    self._send_tasks(w, [self.queue.popleft()])
                    break
                fair = -(-len(self.queue) // len(ready))  # the last items are spread over all workers
                n = min(batch, window - len(w.inflight), fair)
                items: list[pb.MapItem] = []
                while self.queue and len(items) < n and self.queue[0].index not in self.suspects:
                    items.append(self.queue.popleft())
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
                self._link_blob(w, item.blob)
            w.inflight[item.index] = item
            self.attempts[item.index] = self.attempts.get(item.index, 0) + 1
        if not w.mark:
            w.mark = time.monotonic()
        try:
            w.send(self.fm.manager, pb.AgentMessage(
                worker_tasks=pb.WorkerTasks(job=self.id, function_hash=self.function, timeout=self.start.timeout,
                                            items=items)))
        except SnapkernelError as e:  # it is going away; its watcher hands the items back
            log.info("sandbox_id=%s job=%s could not take tasks: %s", w.sandbox_id, self.id, e)

    def _link_blob(self, w: Worker, name: str) -> None:
        sb = self.fm.manager.get(w.sandbox_id)
        d = _blob_dir(sb.record.dir, self.fm.manager.runtimes[sb.record.runtime].owner(sb.spec))
        try:
            _put_blob(self.blob_dir / name, d, name)
        finally:
            os.close(d)

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
        now = time.monotonic()
        if msg.results and w.mark:
            per_item = (now - w.mark) / len(msg.results)
            self.item_seconds = per_item if not self.item_seconds else 0.7 * self.item_seconds + 0.3 * per_item
        w.mark = now if w.inflight else 0.0
        for r in msg.results:
            item = w.inflight.pop(r.index, None)
            self.suspects.discard(r.index)
            r.worker = w.sandbox_id
            if item is not None:
                self._settle(item, r, w)
        if not w.inflight:
            w.mark = 0.0
        self._flush_soon()
        self.pump()
        self._maybe_done()

    def _settle(self, item: pb.MapItem, r: pb.MapResult, w: Worker | None = None) -> None:
        """An item's outcome: back to the queue while it has retries left, else on its way to the client."""
        r.attempts = self.attempts.get(r.index, 1)
        if not r.ok and r.attempts <= (self.start.retries if self.start is not None else 0):
            self.queue.appendleft(item)
        elif r.blob and w is not None:
            self.blobs_in_flight += 1
            self.fm.spawn(self._send_result_blob(w, r))
        else:
            self.out.append(r)

    async def _send_result_blob(self, w: Worker, r: pb.MapResult) -> None:
        try:
            data = await asyncio.to_thread(_take_blob, self.fm.manager.get(w.sandbox_id).record.dir, r.blob)
            for i in range(0, len(data), CHUNK):
                self.send(pb.MapResponse(blob=pb.BlobChunk(name=r.blob, data=data[i:i + CHUNK],
                                                           last=i + CHUNK >= len(data))))
        except (OSError, SnapkernelError) as e:
            r = pb.MapResult(index=r.index, ok=False, worker=r.worker, attempts=r.attempts,
                             error=f"BlobLost: the result of worker {w.sandbox_id} could not be read back: {e}")
        finally:
            self.blobs_in_flight -= 1
        self.out.append(r)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self.out and not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.out:
            out, self.out = self.out, []
            self.send(pb.MapResponse(results=pb.MapResults(results=out)))
        self._maybe_done()

    def on_worker_gone(self, w: Worker) -> None:
        """A worker died: its items go back to the queue once; a new worker takes its place."""
        lost = list(w.inflight.values())
        w.inflight.clear()
        if w in self.workers:
            self.workers.remove(w)
        if self.finished or self.cancelled:
            self._maybe_done()
            return
        how = w.how_it_died()
        requeue = []
        for item in lost:
            if len(lost) == 1 and item.index in self.died_on:
                # It ran alone (a suspect) and its worker died: the second death under it is its own.
                self.suspects.discard(item.index)
                self.out.append(pb.MapResult(index=item.index, ok=False, worker=w.sandbox_id, died=how,
                                             attempts=self.attempts.get(item.index, 1) + 1, error=(
                    f"WorkerDied: worker {w.sandbox_id} {how} while running item {item.index} (an earlier "
                    "worker had died with it in flight too)\n")))
            else:
                # Which of a batch ran when the worker died is not known: each runs alone from now on.
                self.died_on.add(item.index)
                self.suspects.add(item.index)
                self.attempts[item.index] = self.attempts.get(item.index, 1) - 1  # not the item's fault
                requeue.append(item)
        self.queue.extendleft(reversed(requeue))  # in their order, ahead of the rest
        self._flush_soon()
        running = f" while running item {lost[0].index}" if len(lost) == 1 else ""
        self._status(f"worker {w.sandbox_id} {how}{running}; replacing it")
        log.info("sandbox_id=%s job=%s worker %s with %d item(s) in flight", w.sandbox_id, self.id, how, len(lost))
        self.replacements += 1
        if self.replacements > 2 * (self.start.workers if self.start else 1) + 4:
            self.fail(f"workers keep dying ({self.replacements} replaced); the last one {how}{running}")
            return
        self.fm.spawn(self._replace())

    async def _replace(self) -> None:
        try:
            if self.clone_snapshot:
                await self._lease_clones(1)
                return
            (w,), _ = await self.fm.pools.lease(self.owner, self.worker_spec(), 1, self)
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

    # --- ending ---------------------------------------------------------------------------------
    def _maybe_done(self) -> None:
        if self.finished:
            return
        if self.cancelled:
            if not any(w.cancelling for w in self.workers):
                self._finish(pb.MapDone(cancelled=not self.error, error=self.error))
            return
        busy = any(w.inflight for w in self.workers) or self.blobs_in_flight
        if self.input_ended and not self.queue and not busy and not self.out:
            self._finish(pb.MapDone())

    def cancel(self) -> None:
        """Drop queued items, stop running ones (workers that do not stop in time are killed)."""
        if self.cancelled or self.finished:
            return
        self.cancelled = True
        self.queue.clear()
        for w in self.workers:
            if w.gone or w.clone_stream:  # clones are stopped with the job
                continue
            if w.inflight:
                w.cancelling = True
                w.inflight.clear()
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
            w.gone = f"it did not stop job {self.id}'s item within {CANCEL_GRACE:g}s of the cancel"
            self.fm.pools.workers.pop(w.sandbox_id, None)
            self._maybe_done()
            await self.fm.pools.kill(w, w.gone)

    def fail(self, message: str) -> None:
        log.warning("job=%s failed: %s", self.id, message)
        self.error = self.error or message
        self.cancel()

    def _finish(self, done: pb.MapDone) -> None:
        self.finished = True
        if self.out and not self.cancelled:
            self.send_out(pb.MapResponse(results=pb.MapResults(results=self.out)))
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
        self.fm.jobs.pop(self.id, None)
        shutil.rmtree(self.blob_dir, ignore_errors=True)


class FanoutManager:
    def __init__(self, manager: SandboxManager, idle_timeout: float) -> None:
        self.manager = manager
        self.pools = WorkerPools(manager, idle_timeout)
        self.pools.on_owner_gone = self._owner_gone
        self.functions: OrderedDict[str, bytes] = OrderedDict()
        self.jobs: dict[int, Job] = {}
        self.ids = itertools.count(1)
        self.blob_root = manager.state_dir / "fanout"
        shutil.rmtree(self.blob_root, ignore_errors=True)
        # (kernel sandbox id, relay stream) -> job, until the connection closes (a finished job ignores the rest)
        self.streams: dict[tuple[str, int], Job] = {}
        manager.handlers["fanout"] = self._on_agent_frame
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        await self.pools.remove_leftovers()
        self._reaper = asyncio.ensure_future(self.pools.reap())

    def remember(self, digest: str, data: bytes) -> None:
        self.functions[digest] = data
        while sum(map(len, self.functions.values())) > FUNCTION_CACHE and len(self.functions) > 1:
            self.functions.popitem(last=False)

    def new_job(self, send: Callable[[pb.MapResponse], None], owner: LiveSandbox | None) -> Job:
        job = Job(self, next(self.ids), send, owner)
        self.jobs[job.id] = job
        return job

    async def handle(self, job: Job, req: pb.MapRequest) -> None:
        """One request of a job; a bad one fails the job with the error, the backend keeps serving."""
        async with job.lock:
            try:
                await job.on_request(req)
            except SnapkernelError as e:
                job.fail(str(e))
            except Exception as e:  # a bug here must cost one job, not the daemon
                log.exception("job=%s failed on a %s request", job.id, req.WhichOneof("kind"))
                job.fail(f"internal error in the backend: {type(e).__name__}: {e}")

    # --- jobs relayed by a kernel's agent -------------------------------------------------------
    def _on_agent_frame(self, sb: LiveSandbox, msg: pb.AgentMessage) -> None:
        frame = msg.fanout
        clone = self.pools.workers.get(sb.record.id)
        if clone is not None and clone.clone_stream:
            self._on_clone_frame(clone.sandbox_id, frame)
            return
        key = (sb.record.id, frame.stream)
        job = self.streams.get(key)
        if frame.closed:
            if job is not None:
                self.streams.pop(key, None)
                job.closed()
            return
        if job is None:
            def send(resp: pb.MapResponse, stream: int = frame.stream) -> None:
                with contextlib.suppress(SnapkernelError):
                    self.manager.send_to_agent(sb, pb.AgentMessage(fanout=pb.FanoutFrame(
                        stream=stream, data=resp.SerializeToString())))

            job = self.streams[key] = self.new_job(send, sb)
            job.stream = frame.stream
        req = pb.MapRequest()
        try:
            req.ParseFromString(frame.data)
        except Exception as e:  # protobuf's DecodeError
            job.fail(f"malformed fan-out request of {len(frame.data)} bytes: {e}")
            return
        self.spawn(self.handle(job, req))

    def _on_clone_frame(self, sandbox_id: str, frame: pb.FanoutFrame) -> None:
        """A clone's hello and results; anything else its copy of the cell sends is its original's business."""
        req = pb.MapRequest()
        with contextlib.suppress(Exception):
            req.ParseFromString(frame.data)
        kind = req.WhichOneof("kind")
        if kind == "clone_hello":
            self.pools.on_hello(sandbox_id, req.clone_hello)
        elif kind == "clone_results":
            self.pools.on_results(sandbox_id, req.clone_results)

    def _owner_gone(self, owner_id: str) -> None:
        for key, job in list(self.streams.items()):
            if key[0] == owner_id:
                self.streams.pop(key, None)
                job.closed()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._tasks):
            task.cancel()
        for job in list(self.jobs.values()):
            job.closed()
        await self.pools.close()
