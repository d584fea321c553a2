"""The agent in worker mode (`SNAPKERNEL_AGENT_MODE=worker`): runs cloudpickled calls for fan-out.

A reader thread takes commands off the link (functions, task batches, cancels); the main thread runs the
items one after the other and sends results back in batches, so a stream of tiny calls costs one frame per
batch, not per call. Asking for more work is implicit: the backend keeps a bounded number of items in
flight per worker and sends more as results come back (workers pull). A cancel interrupts the running item
with SIGINT aimed at the main thread; an item's timeout is a SIGALRM timer.

A worker restored from a template (backend/templates.py) was another sandbox when its image was taken: the
backend's `Identity` makes it this sandbox's (its environment), and it says hello again as this sandbox; the
backend leases it only then. The backend may run its own code here too (`RunCode`: a template's pre-imports).

The user's code may print: fd 1 is pointed at the sandbox log, and frames go to a private copy of it.
"""

from __future__ import annotations

import linecache
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import cloudpickle

from snapkernel.protocol.fanout import (
    MAX_FUNCTIONS,
    ItemTimeout,
    format_remote,
    pickled_exception,
    read_blob,
    run_one,
    spill,
)
from snapkernel.protocol.frames import FrameBuffer, decode, encode
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger("snapkernel.worker")

FLUSH_ITEMS = 256     # results sent once this many are waiting...
FLUSH_SECONDS = 0.01  # ...or this long after the last send, and when the batch is done


class _Cancelled(BaseException):
    """The running item's job was cancelled (raised by the SIGINT the reader thread aims at us)."""


def load_function(data: bytes) -> Callable[..., Any]:
    """Unpickle a shipped function, registering the notebook sources its tracebacks quote."""
    fn, sources = cloudpickle.loads(data)
    for filename, lines in sources.items():
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    return fn  # type: ignore[no-any-return]


class Worker:
    def __init__(self, in_fd: int, out_fd: int) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.write_lock = threading.Lock()
        # int: a cancel marker; RunCode: the backend's own code, run between items
        self.tasks: queue.SimpleQueue[pb.WorkerTasks | pb.RunCode | int] = queue.SimpleQueue()
        self.functions: dict[str, Callable[..., Any] | bytes] = {}  # by hash, in the order received
        self.cancelled: set[int] = set()
        self.current_job = 0
        self.in_item = False
        self.timeout = 0.0
        self.running = True
        self.sandbox_id = os.environ.get("SNAPKERNEL_SANDBOX_ID", "")

    # --- the link -------------------------------------------------------------------------------
    def send(self, msg: pb.AgentMessage) -> None:
        data = memoryview(encode(msg))
        with self.write_lock:
            while data:
                n = os.write(self.out_fd, data)
                data = data[n:]

    def read_loop(self) -> None:
        frames = FrameBuffer()
        while True:
            data = os.read(self.in_fd, 1 << 20)
            if not data:
                break
            for body in frames.feed(data):
                self.handle(decode(body))
        log.info("link closed; stopping")
        self.running = False
        self.tasks.put(0)

    def handle(self, msg: pb.AgentMessage) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "worker_function":
            self.functions[msg.worker_function.hash] = msg.worker_function.data  # unpickled on first use
            while len(self.functions) > MAX_FUNCTIONS:
                self.functions.pop(next(iter(self.functions)))
        elif kind == "worker_tasks":
            self.tasks.put(msg.worker_tasks)
        elif kind == "worker_cancel":
            job = msg.worker_cancel
            self.cancelled.add(job)
            if self.in_item and self.current_job == job:
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            self.tasks.put(job)
        elif kind == "identity":
            self.take_identity(msg.identity)
        elif kind == "run_code":
            self.tasks.put(msg.run_code)
        elif kind == "shutdown":
            self.running = False
            self.tasks.put(0)
        else:
            log.warning("worker: ignored command %r", kind)

    def hello(self) -> None:
        self.send(pb.AgentMessage(worker_hello=pb.WorkerHello(
            python=sys.version.split()[0], cloudpickle=cloudpickle.__version__, pid=os.getpid(),
            sandbox_id=self.sandbox_id)))

    def take_identity(self, identity: pb.Identity) -> None:
        """Restored from a template: become this sandbox (its environment names it), then say so."""
        os.environ.update(identity.env)
        self.sandbox_id = os.environ.get("SNAPKERNEL_SANDBOX_ID", "")
        self.send(pb.AgentMessage(code_result=pb.CodeResult(id=identity.id, ok=True)))
        self.hello()

    def run_code(self, req: pb.RunCode) -> None:
        """The backend's own code (a template's pre-imports), in a namespace of its own; answered with a
        `code_result`."""
        try:
            exec(compile(req.code, "<snapkernel>", "exec"), {"__name__": "__snapkernel__"})
            result = pb.CodeResult(id=req.id, ok=True)
        except Exception as e:  # its failure is the backend's to report, never the worker's end
            result = pb.CodeResult(id=req.id, ok=False, error=f"{type(e).__name__}: {e}")
        self.send(pb.AgentMessage(code_result=result))

    # --- running items --------------------------------------------------------------------------
    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.in_item and self.current_job in self.cancelled:
            raise _Cancelled

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self.in_item:
            raise ItemTimeout(f"the item ran past its timeout of {self.timeout:g}s")

    def function(self, digest: str) -> Callable[..., Any]:
        fn = self.functions[digest]
        if isinstance(fn, bytes):
            fn = self.functions[digest] = load_function(fn)
        return fn

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGALRM, self._on_alarm)
        self.send(pb.AgentMessage(hello=pb.AgentHello(python=sys.version.split()[0], pid=os.getpid())))
        self.hello()
        # The worker loop is this sandbox's "kernel": the sandbox shows as running.
        self.send(pb.AgentMessage(kernel_started=pb.KernelStarted(pid=os.getpid(), generation=1)))
        threading.Thread(target=self.read_loop, name="worker-link", daemon=True).start()
        while self.running:
            task = self.tasks.get()
            if isinstance(task, pb.RunCode):
                self.run_code(task)
                continue
            if isinstance(task, int):
                if task:  # a cancel marker: everything of that job before it is dropped
                    self.send(pb.AgentMessage(worker_results=pb.WorkerResults(job=task, cancelled=True)))
                continue
            self.run_tasks(task)
        return 0

    def run_tasks(self, task: pb.WorkerTasks) -> None:
        if task.job in self.cancelled:
            return
        self.current_job = task.job
        self.timeout = task.timeout
        out = pb.WorkerResults(job=task.job)
        try:
            fn = self.function(task.function_hash)
        except Exception as e:
            err = RuntimeError(f"the function could not be loaded on worker {self.sandbox_id}: {e}")
            for item in task.items:
                out.results.add(index=item.index, ok=False, error=format_remote(err), data=pickled_exception(err))
            self.send(pb.AgentMessage(worker_results=out))
            return
        last_send = time.monotonic()
        for item in task.items:
            if task.job in self.cancelled:
                return
            data = read_blob(item.blob) if item.blob else item.data
            try:
                self.in_item = True
                if task.timeout > 0:
                    signal.setitimer(signal.ITIMER_REAL, task.timeout)
                result = run_one(fn, data, item.index)
            except _Cancelled:
                return
            finally:
                self.in_item = False
                if task.timeout > 0:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            out.results.append(spill(result, task.job))
            now = time.monotonic()
            if len(out.results) >= FLUSH_ITEMS or now - last_send > FLUSH_SECONDS:
                self.send(pb.AgentMessage(worker_results=out))
                out = pb.WorkerResults(job=task.job)
                last_send = now
        if out.results and task.job not in self.cancelled:
            self.send(pb.AgentMessage(worker_results=out))


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s worker %(levelname)s %(message)s")
    # Frames get private copies of stdin/stdout; the user's prints go to the sandbox log (fd 2).
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        return Worker(in_fd, out_fd).run()
    except BrokenPipeError:  # the shim is gone: nobody is left to talk to
        return 0
