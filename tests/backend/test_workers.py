"""The worker pool in-process (no sandbox): a worker is ready, and told to its job, once it says hello as its
own sandbox; a hello naming another sandbox (a restored worker that has not taken its identity) is not."""

from __future__ import annotations

from types import SimpleNamespace

from snapkernel.backend.workers import Worker, WorkerPools
from snapkernel.protocol.v1 import backend_pb2 as pb


class Job:
    id = 1

    def __init__(self) -> None:
        self.ready: list[str] = []

    def on_worker_ready(self, w: Worker) -> None:
        self.ready.append(w.sandbox_id)

    def on_results(self, w: Worker, msg: pb.WorkerResults) -> None: ...

    def on_worker_gone(self, w: Worker) -> None: ...


def test_a_worker_is_ready_once_it_says_hello_as_its_own_sandbox() -> None:
    pools = WorkerPools(SimpleNamespace(handlers={}), idle_timeout=300)  # type: ignore[arg-type]
    job = Job()
    restored, clone = Worker("sb-1", ("client", b""), job=job), Worker("sb-2", ("client", b""), job=job)
    pools.workers = {w.sandbox_id: w for w in (restored, clone)}
    pools.on_hello("sb-1", pb.WorkerHello(python="3", sandbox_id="sb-template"))  # the template's, from its image
    assert not restored.ready and job.ready == []
    pools.on_hello("sb-1", pb.WorkerHello(python="3", sandbox_id="sb-1"))
    assert restored.ready and job.ready == ["sb-1"]
    pools.on_hello("sb-2", pb.WorkerHello(python="3"))  # a --clone's hello names no sandbox
    assert clone.ready and job.ready == ["sb-1", "sb-2"]
