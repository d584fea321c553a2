"""Fan-out jobs: one function over many inputs, run by a pool of worker sandboxes.

A job is one Map stream, from the gRPC `Map` call or relayed by a kernel's agent (`AgentMessage.fanout`);
both feed the same `Job`. The function arrives once per content hash (the backend keeps recent ones, so an
unchanged cell ships nothing); items arrive in batches under the client's bounded window and wait in a
queue; each worker holds a small window of items and gets more as its results come back (workers pull), in
batches sized to about 20 ms of work. Results stream back as they finish, in completion order; the client
restores input order. Payloads over a few MiB travel as blob chunks and reach workers as files.

In parts: this module (jobs by stream, the relay from kernels, the function cache), fanout_job.py (one Map
stream), fanout_dispatch.py (items to workers: batches, retries, blame), fanout_blobs.py (large payloads),
workers.py (the pools of warm workers and --clone workers jobs lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from snapkernel.backend.fanout_job import Job
from snapkernel.backend.fanout_upstream import UpstreamRelay
from snapkernel.backend.sandbox import LiveSandbox
from snapkernel.backend.sandboxes import SandboxManager
from snapkernel.backend.workers import WorkerPools
from snapkernel.errors import SnapkernelError
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)

FUNCTION_CACHE = 512 * 1024 * 1024  # bytes of recent functions kept by hash

__all__ = ["FanoutManager", "Job"]


class FanoutManager:
    def __init__(self, manager: SandboxManager, idle_timeout: float, upstream: UpstreamRelay | None = None) -> None:
        self.manager = manager
        self.upstream = upstream  # a cluster node's: its kernels' jobs go to the front
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
        self.pools.build_default_template()
        self._reaper = asyncio.ensure_future(self.pools.reap())

    def cached_function(self, digest: str) -> bytes | None:
        data = self.functions.get(digest)
        if data is not None:
            self.functions.move_to_end(digest)
        return data

    def remember(self, digest: str, data: bytes) -> None:
        self.functions[digest] = data
        while sum(map(len, self.functions.values())) > FUNCTION_CACHE and len(self.functions) > 1:
            self.functions.popitem(last=False)

    def new_job(self, send: Callable[[pb.MapResponse], None], owner: LiveSandbox | None) -> Job:
        job = Job(self, next(self.ids), send, owner)
        self.jobs[job.id] = job
        return job

    def job_ended(self, job: Job) -> None:
        self.jobs.pop(job.id, None)

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
        if self.upstream is not None and self._relay(sb, key, frame):
            return
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

    def _relay(self, sb: LiveSandbox, key: tuple[str, int], frame: pb.FanoutFrame) -> bool:
        """Whether the frame is of a job that goes to the cluster's front (and went there)."""
        assert self.upstream is not None
        if frame.closed:
            if key not in self.upstream.jobs:
                return False
            self.upstream.closed(key)
            return True
        if key in self.streams:
            return False
        req = pb.MapRequest()
        with contextlib.suppress(Exception):  # a malformed one: the local job answers it
            req.ParseFromString(frame.data)
        if not self.upstream.takes(key, req):
            return False

        def send(resp: pb.MapResponse, stream: int = frame.stream) -> None:
            with contextlib.suppress(SnapkernelError):
                self.manager.send_to_agent(sb, pb.AgentMessage(fanout=pb.FanoutFrame(
                    stream=stream, data=resp.SerializeToString())))

        if key in self.upstream.jobs:
            self.upstream.forward(key, req)
        else:
            self.upstream.open(key, sb, req, send)
        return True

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
        if self.upstream is not None:
            await self.upstream.close()
        await self.pools.close()
