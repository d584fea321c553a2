"""One Map stream (`Job`) in-process: a fake backend and pool, workers that are plain objects answered by the
test; no sandbox (each test well under 1 s). What the client and the workers are sent is checked."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from snapkernel.backend.fanout_job import Job
from snapkernel.backend.workers import Worker
from snapkernel.protocol.v1 import backend_pb2 as pb

FUNCTION = b"a cloudpickled function"
HASH = hashlib.sha256(FUNCTION).hexdigest()


class FakeManager:
    def __init__(self) -> None:
        self.sent: list[tuple[str, pb.AgentMessage]] = []

    def get(self, sandbox_id: str) -> Any:
        return SimpleNamespace(record=SimpleNamespace(id=sandbox_id))

    def send_to_agent(self, sb: Any, msg: pb.AgentMessage) -> None:
        self.sent.append((sb.record.id, msg))


class FakePools:
    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        self.released: list[str] = []

    async def lease(self, owner: Any, spec: pb.SandboxSpec, count: int, job: Job,
                    clone_stream: int = 0) -> tuple[list[Worker], str]:
        taken = []
        for _ in range(count):
            w = Worker(f"w{len(self.workers) + 1}", ("client", b""), job=job,
                       hello=pb.WorkerHello(python="3", cloudpickle="3"))
            self.workers[w.sandbox_id] = w
            taken.append(w)
        return taken, ""

    def release(self, w: Worker) -> None:
        w.job = None
        self.released.append(w.sandbox_id)

    def retire(self, w: Worker, why: str) -> None:
        w.gone = w.gone or why

    async def kill(self, w: Worker, why: str) -> None:
        self.retire(w, why)


class FakeHost:
    def __init__(self, tmp: Path) -> None:
        self.manager: Any = FakeManager()
        self.pools: Any = FakePools()
        self.blob_root = tmp
        self.functions: dict[str, bytes] = {}
        self.ended: list[int] = []
        self.tasks: list[asyncio.Future[None]] = []

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.ensure_future(coro))

    def cached_function(self, digest: str) -> bytes | None:
        return self.functions.get(digest)

    def remember(self, digest: str, data: bytes) -> None:
        self.functions[digest] = data

    def job_ended(self, job: Job) -> None:
        self.ended.append(job.id)


class Stream:
    """A job and what it sent: to the client (`out`) and to each worker (read by `take_tasks`)."""

    def __init__(self, tmp: Path) -> None:
        self.host = FakeHost(tmp)
        self.out: list[pb.MapResponse] = []
        self.job = Job(self.host, 7, self.out.append, owner=None)
        self.seen = 0

    async def request(self, **kind: Any) -> None:
        await self.job.on_request(pb.MapRequest(**kind))
        await asyncio.sleep(0)  # results are flushed on the next turn of the loop

    async def start(self, n: int, workers: int = 2, retries: int = 0) -> None:
        await self.request(start=pb.MapStart(function_hash=HASH, workers=workers, retries=retries))
        await self.request(function=FUNCTION)
        await asyncio.sleep(0)
        if n:
            await self.request(items=pb.MapItems(items=[pb.MapItem(index=i, data=b"%d" % i) for i in range(n)]))
        await self.request(end=True)

    def take_tasks(self) -> list[tuple[Worker, pb.WorkerTasks]]:
        sent = self.host.manager.sent[self.seen:]
        self.seen = len(self.host.manager.sent)
        return [(self.host.pools.workers[sid], m.worker_tasks) for sid, m in sent
                if m.WhichOneof("kind") == "worker_tasks"]

    async def answer(self, w: Worker, tasks: pb.WorkerTasks) -> None:
        self.job.on_results(w, pb.WorkerResults(job=tasks.job, results=[
            pb.MapResult(index=i.index, ok=True, data=b"r" + i.data) for i in tasks.items]))
        await asyncio.sleep(0)

    def results(self) -> list[pb.MapResult]:
        return [r for m in self.out if m.WhichOneof("kind") == "results" for r in m.results.results]

    def kinds(self) -> list[str]:
        return [str(m.WhichOneof("kind")) for m in self.out]


def test_items_go_to_the_workers_and_every_result_comes_back_once_then_done(tmp_path: Path) -> None:
    async def main() -> None:
        s = Stream(tmp_path)
        await s.start(20)
        assert s.out[0].status.need_function
        functions = [sid for sid, m in s.host.manager.sent if m.WhichOneof("kind") == "worker_function"]
        assert sorted(functions) == ["w1", "w2"]  # the function once per worker, before its first tasks
        while (tasks := s.take_tasks()):
            for w, t in reversed(tasks):
                assert t.job == 7 and t.function_hash == HASH
                await s.answer(w, t)
        got = s.results()
        assert sorted(r.index for r in got) == list(range(20))
        assert all(r.data == b"r%d" % r.index and r.worker in ("w1", "w2") for r in got)
        assert s.out[-1].WhichOneof("kind") == "done" and s.out[-1].done == pb.MapDone()
        assert sorted(s.host.pools.released) == ["w1", "w2"] and s.host.ended == [7]

    asyncio.run(main())


def test_a_worker_lost_mid_batch_is_replaced_and_its_items_rerun_alone(tmp_path: Path) -> None:
    async def main() -> None:
        s = Stream(tmp_path)
        await s.start(20)
        tasks = s.take_tasks()
        victim = tasks[0][0]
        held = [i.index for w, t in tasks if w is victim for i in t.items]
        assert len(held) > 1
        victim.gone, victim.exit_code = "exited", 1
        s.job.on_worker_gone(victim)
        await asyncio.gather(*s.host.tasks)  # the replacement's lease
        assert f"worker {victim.sandbox_id} exited with code 1; replacing it" in [
            m.status.message for m in s.out if m.WhichOneof("kind") == "status"]
        alone = []
        tasks = [(w, t) for w, t in tasks if w is not victim] + s.take_tasks()
        while tasks:
            for w, t in tasks:
                if t.items[0].index in held:
                    assert len(t.items) == 1
                    alone.append(t.items[0].index)
                await s.answer(w, t)
            tasks = s.take_tasks()
        assert sorted(alone) == held
        got = s.results()
        assert sorted(r.index for r in got) == list(range(20)) and all(r.ok and r.attempts == 1 for r in got)
        assert "w3" in {r.worker for r in got}  # the replacement took part
        assert s.out[-1].done == pb.MapDone()

    asyncio.run(main())


def test_an_item_whose_worker_dies_twice_fails_with_the_death(tmp_path: Path) -> None:
    async def main() -> None:
        s = Stream(tmp_path)
        await s.start(1, workers=1)
        for _ in range(2):
            ((w, _),) = s.take_tasks()
            w.gone, w.exit_code = "exited", -11
            s.job.on_worker_gone(w)
            await asyncio.gather(*s.host.tasks)
            await asyncio.sleep(0)
        (r,) = s.results()
        assert (r.index, r.ok, r.died, r.attempts, r.worker) == (0, False, "killed by SIGSEGV", 2, "w2")
        assert r.error.startswith("WorkerDied: worker w2 killed by SIGSEGV while running item 0")
        assert s.out[-1].done == pb.MapDone()

    asyncio.run(main())


def test_cancel_stops_busy_workers_and_ends_once_they_say_so(tmp_path: Path) -> None:
    async def main() -> None:
        s = Stream(tmp_path)
        await s.start(100)
        busy = {w.sandbox_id for w, _ in s.take_tasks()}
        await s.request(cancel=True)
        told = {sid for sid, m in s.host.manager.sent if m.WhichOneof("kind") == "worker_cancel"}
        assert told == busy == {"w1", "w2"}
        assert "done" not in s.kinds()  # not before the workers stopped
        for sid in sorted(busy):
            s.job.on_results(s.host.pools.workers[sid], pb.WorkerResults(job=7, cancelled=True))
        assert s.out[-1].done == pb.MapDone(cancelled=True)
        assert s.take_tasks() == []
        for task in s.host.tasks:
            task.cancel()

    asyncio.run(main())


def test_no_items_is_done_at_the_end_of_input(tmp_path: Path) -> None:
    async def main() -> None:
        s = Stream(tmp_path)
        await s.start(0)
        assert s.kinds()[-1] == "done" and s.out[-1].done == pb.MapDone()
        assert s.take_tasks() == [] and s.results() == []

    asyncio.run(main())
