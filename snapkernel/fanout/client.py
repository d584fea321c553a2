"""The client half of a fan-out job, shared by `%%fanout` and `remote`: it sends the function (only when
the backend does not hold it already), feeds the items in batches under a bounded window, and yields the
results as they arrive, in input order or completion order. A failing item is re-raised here with its
remote traceback and the index and repr of its input; an interrupt cancels what is left.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import cloudpickle

from snapkernel.errors import FanoutError, InvalidSpecError, RemoteError, WorkerDiedError
from snapkernel.fanout.capture import Payload, versions
from snapkernel.fanout.progress import Progress
from snapkernel.fanout.transport import Transport, connect
from snapkernel.protocol.v1 import backend_pb2 as pb

Call = tuple[Any, tuple[Any, ...], dict[str, Any]]  # (the item as the user gave it, args, kwargs)
BATCH = 256                      # items per message
WINDOW = 8192                    # items sent and not yet answered...
WINDOW_BYTES = 256 * 1024 * 1024  # ...and their bytes
BLOB_THRESHOLD = 4 * 1024 * 1024  # larger payloads go through the blob path
CHUNK = 1024 * 1024
CANCEL_WAIT = 2.5                 # seconds to wait for the backend to confirm a cancel


@dataclass
class Options:
    workers: int = 4
    gpu: str = ""
    cpu: float | None = None  # cores per worker; None: 1
    memory: str = ""
    retries: int = 0
    timeout: float = 0.0
    ordered: bool = True
    return_exceptions: bool = False
    clone: bool = False
    progress: bool = True


class RemoteTraceback(Exception):
    """Carries the remote traceback's text; set as the `__cause__` of a re-raised remote exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text.rstrip()


@dataclass
class Stats:
    """What the last job did, for tests and benchmarks."""

    function_sent: int = 0    # bytes of function uploaded (0 when the backend held it)
    items: int = 0
    first_result: float = 0.0  # seconds from start to the first result
    seconds: float = 0.0
    workers: int = 0


_LAST = [Stats()]


def last_stats() -> Stats:
    """What the last job started in this process did (function bytes sent, timings)."""
    return _LAST[0]


def short_repr(item: Any) -> str:
    text = repr(item)
    return text[:200] + ("..." if len(text) > 200 else "")


def remote_exception(result: pb.MapResult, item: Any, show_caller: bool = True,
                     describe: Callable[[Any], str] | None = None) -> BaseException:
    """The exception a remote call raised, with its remote traceback as cause and the failing input named
    (as `describe` words it: `x=3` for `%%fanout --as x`; by default its repr).

    In IPython it renders as the caller's own frames (with `show_caller`), the worker's frames and the
    summary: not the frames of snapkernel's client code in between (IPython's `_render_traceback_` hook).
    A worker that died running the item (`os._exit`, a segfault) raises `WorkerDiedError` saying how.
    """
    shown = (describe or short_repr)(item)
    exc: BaseException | None = None
    if result.died:
        exc = WorkerDiedError(f"worker {result.died} while running item {result.index} ({shown})")
        text = (f"{type(exc).__name__}: {exc}\n(worker {result.worker or '?'}; an earlier worker had died with "
                "this item in flight too, so it is not retried again)\n")
        result = pb.MapResult(index=result.index, worker=result.worker, attempts=result.attempts, error=text)
    elif result.data:
        try:
            exc = cloudpickle.loads(result.data)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        last = result.error.strip().splitlines()[-1] if result.error.strip() else "remote error"
        exc = RemoteError(last)
    text = result.error or f"{type(exc).__name__}: {exc}\n"
    exc.__cause__ = RemoteTraceback(text)
    worker = result.worker or "?"
    note = (f"fan-out item {result.index} (input {short_repr(item)}) failed on worker "
            f"{worker} after {result.attempts or 1} attempt(s)")
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    with contextlib.suppress(AttributeError):  # an exception type without a __dict__ renders as usual
        exc._render_traceback_ = functools.partial(_render, exc, text, note, worker, show_caller)  # type: ignore[attr-defined]
    return exc


def _render(exc: BaseException, remote: str, note: str, worker: str, show_caller: bool) -> list[str]:
    """The lines IPython shows for a remote failure."""
    lines = ["Traceback (most recent call last):"]
    if show_caller:  # the notebook's own frames, down to the call of snapkernel
        hidden = _hidden_dirs()
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(hidden)]
        lines += "".join(traceback.format_list(frames)).rstrip("\n").splitlines()
    lines.append(f"  ... in worker {worker}:")
    lines += remote.rstrip("\n").removeprefix("Traceback (most recent call last):\n").splitlines()
    return [*lines, note]


def _hidden_dirs() -> tuple[str, ...]:
    """Where the frames between the notebook and the remote call come from: snapkernel, IPython."""
    dirs = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep]  # the snapkernel package
    ipython = sys.modules.get("IPython")
    if ipython is not None and ipython.__file__:
        dirs.append(os.path.dirname(ipython.__file__) + os.sep)
    return tuple(dirs)


class MapCall:
    def __init__(self, payload: Payload, options: Options, total: int | None, label: str,
                 local_fn: Callable[..., Any] | None = None, *, show_caller: bool = True,
                 describe: Callable[[Any], str] | None = None) -> None:
        self.payload = payload
        self.describe = describe  # how a failure names its input (default: "input" and its repr)
        self.show_caller = show_caller  # a failure shows the calling frames (not %%fanout's: that is the magic)
        self.local_fn = local_fn  # --clone: what a clone of this kernel runs for each item
        self.options = options
        self.total = total
        self.label = label
        self.inputs: dict[int, tuple[Any, int]] = {}  # the items on their way: (item, its size)
        self.in_flight_bytes = 0
        self.blobs: dict[str, list[bytes]] = {}
        self.stats = Stats()

    def start_message(self) -> pb.MapRequest:
        o = self.options
        python, pickle_version = versions()
        spec = pb.SandboxSpec(gpu=o.gpu, memory=o.memory)
        if o.cpu is not None:  # absent: the default (1 core per worker)
            spec.cpu = o.cpu
        return pb.MapRequest(start=pb.MapStart(
            spec=spec, workers=o.workers, function_hash=self.payload.digest, retries=o.retries, timeout=o.timeout,
            clone=o.clone, python=python, cloudpickle=pickle_version, total=self.total or 0))

    def run(self, calls: Iterable[Call]) -> Iterator[tuple[int, Any]]:
        """Yield (index, value or exception) for each (item, args, kwargs) of `calls`."""
        _LAST[0] = self.stats
        if self.total == 0:  # nothing to run: no worker needed
            return
        started = time.monotonic()
        transport = connect()
        progress = Progress(self.label, self.total, enabled=self.options.progress)
        done = False
        try:
            transport.send(self.start_message())
            source = enumerate(calls)
            pending: dict[int, Any] = {}
            next_index = 0
            sent = answered = 0
            exhausted = False
            while True:
                while not exhausted and sent - answered < WINDOW and self.in_flight_bytes < WINDOW_BYTES:
                    batch = list(itertools.islice(source, BATCH))
                    if batch:
                        self._send_items(transport, batch)
                        sent += len(batch)
                    if len(batch) < BATCH:
                        exhausted = True
                        transport.send(pb.MapRequest(end=True))
                        if progress.total is None:
                            progress.total = sent
                resp = transport.recv(0.2)
                progress.show()
                if resp is None:
                    continue
                kind = resp.WhichOneof("kind")
                if kind == "status":
                    if resp.status.need_function:
                        transport.send(pb.MapRequest(function=self.payload.data))
                        self.stats.function_sent = len(self.payload.data)
                    else:
                        progress.workers = (resp.status.workers_ready, resp.status.workers)
                        self.stats.workers = resp.status.workers
                        progress.status = resp.status.message or progress.status
                elif kind == "become_worker" and self.local_fn is not None:
                    self._serve_as_clone(transport, self.local_fn)
                elif kind == "blob":
                    self.blobs.setdefault(resp.blob.name, []).append(resp.blob.data)
                elif kind == "results":
                    if not self.stats.first_result:
                        self.stats.first_result = time.monotonic() - started
                    for r in resp.results.results:
                        answered += 1
                        item, size = self.inputs.pop(r.index, (None, 0))
                        self.in_flight_bytes -= size
                        if r.output:  # what the call printed, shown here as it arrives
                            sys.stdout.write(r.output)
                        value = self._value(r, item)
                        progress.add(ok=r.ok)
                        if not r.ok and not self.options.return_exceptions:
                            assert isinstance(value, BaseException)
                            self._cancel(transport)
                            done = True
                            raise value
                        if not self.options.ordered:
                            yield r.index, value
                        else:
                            pending[r.index] = value
                            while next_index in pending:
                                yield next_index, pending.pop(next_index)
                                next_index += 1
                elif kind == "done":
                    done = True
                    if resp.done.error:
                        raise FanoutError(f"fan-out failed: {resp.done.error}")
                    if resp.done.cancelled:
                        raise FanoutError("fan-out was cancelled by the backend")
                    break
        except KeyboardInterrupt:
            if not done:
                progress.note("interrupted: cancelling the remaining items")
                self._cancel(transport)
                done = True
            raise
        finally:
            if not done:  # a consumer that stopped early (or an error here): the rest is not wanted
                self._cancel(transport)
            transport.close()
            progress.close()
            self.stats.seconds = time.monotonic() - started
            self.stats.items = progress.done

    def _send_items(self, transport: Transport, batch: list[tuple[int, Call]]) -> None:
        items = []
        for index, (item, args, kwargs) in batch:
            try:
                data = cloudpickle.dumps((args, kwargs))
            except Exception as e:
                raise InvalidSpecError(f"item {index} ({short_repr(item)}) cannot be sent to workers: {e}") from e
            self.inputs[index] = (item, len(data))
            self.in_flight_bytes += len(data)
            if len(data) > BLOB_THRESHOLD:
                name = f"i{index}"
                for i in range(0, len(data), CHUNK):
                    transport.send(pb.MapRequest(blob=pb.BlobChunk(name=name, data=data[i:i + CHUNK],
                                                                   last=i + CHUNK >= len(data))))
                items.append(pb.MapItem(index=index, blob=name))
            else:
                items.append(pb.MapItem(index=index, data=data))
        transport.send(pb.MapRequest(items=pb.MapItems(items=items)))

    def _value(self, r: pb.MapResult, item: Any) -> Any:
        data = b"".join(self.blobs.pop(r.blob, [])) if r.blob else r.data
        if not r.ok:
            return remote_exception(pb.MapResult(index=r.index, data=data, error=r.error, worker=r.worker,
                                                 attempts=r.attempts, died=r.died), item, self.show_caller,
                                    self.describe)
        try:
            return cloudpickle.loads(data)
        except Exception as e:
            raise FanoutError(f"the result of item {r.index} ({short_repr(item)}) cannot be unpickled here: "
                              f"{type(e).__name__}: {e}") from e

    @staticmethod
    def _serve_as_clone(transport: Transport, fn: Callable[..., Any]) -> None:
        """This kernel is a --clone of the one that runs the cell: serve items until the backend stops it."""
        from snapkernel.protocol.fanout import read_blob, run_one, spill

        python, pickle_version = versions()
        transport.send(pb.MapRequest(clone_hello=pb.WorkerHello(python=python, cloudpickle=pickle_version,
                                                                pid=os.getpid())))
        while True:
            resp = transport.recv(1.0)
            if resp is None or resp.WhichOneof("kind") != "clone_tasks":
                continue
            tasks = resp.clone_tasks
            out = pb.WorkerResults(job=tasks.job)
            for item in tasks.items:
                result = run_one(fn, read_blob(item.blob) if item.blob else item.data, item.index)
                out.results.append(spill(result, tasks.job))
            transport.send(pb.MapRequest(clone_results=out))

    def _cancel(self, transport: Transport) -> None:
        """Ask the backend to stop the rest; wait (briefly) until it says the workers stopped."""
        try:
            transport.send(pb.MapRequest(cancel=True))
            deadline = time.monotonic() + CANCEL_WAIT
            while time.monotonic() < deadline:
                resp = transport.recv(deadline - time.monotonic())
                if resp is not None and resp.WhichOneof("kind") == "done":
                    return
        except Exception:  # the stream is gone already: so is the job
            return
