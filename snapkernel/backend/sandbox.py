"""One sandbox as the daemon holds it: its record (what is on disk), its agent link, the clients and watchers
subscribed to it, and what it is busy with. The manager (sandboxes.py) creates, finds and deletes them."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from snapkernel.backend import lifecycle
from snapkernel.backend.agent_link import AgentLink
from snapkernel.backend.lifecycle import Activity
from snapkernel.backend.sandbox_db import SandboxRecord
from snapkernel.backend.workspace import WORKSPACE
from snapkernel.errors import SandboxFailedError
from snapkernel.protocol import hops
from snapkernel.protocol.spec import ParsedSpec, format_bytes
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.snapshots import cuda
from snapkernel.snapshots.staging import DEFAULT_BUFFER_BYTES, DEFAULT_BUFFERS

log = logging.getLogger(__name__)

# The kernel ids of the backend's own sandboxes (templates.py, warm_pool.py): never listed, never reaped.
TEMPLATE_KERNEL_ID = "template:"
POOL_KERNEL_ID = "pool:"
# What the sandbox's agent runs (agent/__main__.py): a kernel where unset, "worker" for a fan-out worker, "clone"
# for a --clone worker (a kernel restored from its kernel's snapshot).
MODE_ENV = "SNAPKERNEL_AGENT_MODE"
IDENTITY_ENV = ("SNAPKERNEL_SANDBOX_ID",)  # the key goes to the agent only (its kernel's environment never has it)
MAX_UNATTACHED_OUTPUT = 20000  # kernel frames held for a sandbox while no client is attached
MAX_UNATTACHED_BYTES = 256 * 1024 * 1024


@dataclass
class LiveSandbox:
    record: SandboxRecord
    spec: ParsedSpec
    link: AgentLink | None = None
    watchers: set[asyncio.Queue[pb.SandboxEvent | None]] = field(default_factory=set)
    attached: set[asyncio.Queue[pb.KernelFrame | None]] = field(default_factory=set)
    pending: list[pb.AgentMessage] = field(default_factory=list)
    # Kernel output and its delivery: numbers of the agent link (see agent_link.py)
    last_seq: int = 0  # the highest number the agent link brought
    undelivered: dict[int, None] = field(default_factory=dict)  # numbers not written to a client yet, rising
    unattached: collections.deque[pb.KernelFrame] = field(default_factory=collections.deque)  # for no client
    unattached_bytes: int = 0
    dropped_output: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    activity: Activity | None = None  # a snapshot, hibernation or deletion under way (see `doing`)
    code_results: dict[str, asyncio.Future[pb.CodeResult]] = field(default_factory=dict)
    restore_state: str | None = None  # a state dir in the workspace to load once the kernel runs
    restore_source: Path | None = None  # where to copy that dir from first (a snapshot in the store)
    state_error: str = ""  # why loading it failed
    whole_state: bool = False  # a move's new kernel: its variables must all load there, or it goes back
    holding: bool = False  # a `%move` is about to begin: the notebook's next cells wait for it (held)
    notice: str = ""  # for the next cell sent: how a `%move` went, when no cell waited to hear it
    busy: bool = False  # the kernel said `busy` on iopub and not yet `idle`
    detached_at: float = field(default_factory=time.time)  # when its last client left (see orphans.py)
    # Hibernation (see hibernation.py)
    held: list[pb.AgentMessage] = field(default_factory=list)  # kernel messages waiting for it to wake
    waking: asyncio.Future[None] | None = None
    suspended: cuda.Suspended | None = None
    offload_staging: int = 0  # bytes of pinned staging buffers its kernel keeps (gpu_offload.py), once it has any
    refused_at: float = -1.0  # `last_activity` when it last could not hibernate: not again until used
    told_waiting: bool = False

    @property
    def internal(self) -> bool:
        """A template's or the warm pool's: nobody's kernel (yet)."""
        return self.record.kernel_id.startswith((TEMPLATE_KERNEL_ID, POOL_KERNEL_ID))

    @property
    def deleting(self) -> bool:
        return self.activity is Activity.DELETING

    @contextlib.contextmanager
    def doing(self, activity: Activity, action: str, advice: str = "") -> Iterator[None]:
        """Run `activity` (refused, naming `action`, while another is under way), then be free again."""
        if self.activity is not None:
            raise lifecycle.refuse(self.record.id, action, self.activity.value, advice)
        self.activity = activity
        try:
            yield
        finally:
            if self.activity is activity:  # not if a deletion took over
                self.activity = None

    def env(self, kernel: pb.KernelConfig) -> dict[str, str]:
        """The environment its agent and kernel start with."""
        r = self.record
        # The agent's interpreter first, as in an activated virtualenv: `!pip` in a cell is the kernel's pip.
        bin_dir = os.path.dirname(sys.executable)
        path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(":") if p and p != bin_dir]
        env = {
            "PATH": ":".join([bin_dir, *path]),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": str(Path(r.dir) / WORKSPACE),
            "SNAPKERNEL_SANDBOX_ID": r.id,
            "SNAPKERNEL_KERNEL_KEY": kernel.key.decode(),
            "SNAPKERNEL_SIGNATURE_SCHEME": kernel.signature_scheme or "hmac-sha256",
            "PYTHONUNBUFFERED": "1",
            "MALLOC_ARENA_MAX": "2",  # keeps the address space small under a memory (RLIMIT_AS) limit
            # Only the GPUs given to this sandbox are visible; none at all without a GPU request.
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, r.gpu_indices)),
            "NVIDIA_VISIBLE_DEVICES": ",".join(map(str, r.gpu_indices)) or "none",
        }
        if "PYTHONPATH" in os.environ:  # the agent runs on this interpreter and needs the same packages
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        if hops.ENABLED:  # profiling the message path (bench/message_path.py): the agent marks its hops too
            env[hops.ENV] = "1"
        env.update(self.spec.env)
        return env

    def identity_env(self, kernel: pb.KernelConfig) -> dict[str, str]:
        """What of `env` names this sandbox: a kernel restored from another's image is given it."""
        env = self.env(kernel)
        return {name: env[name] for name in IDENTITY_ENV} | self.spec.env

    def fail_code_results(self, why: str) -> None:
        """The backend's code waiting in this sandbox's kernel will not finish: fail it now, not at its timeout."""
        for future in self.code_results.values():
            if not future.done():
                future.set_exception(SandboxFailedError(why))

    # --- kernel output and its delivery to clients ---------------------------------------------
    def to_clients(self, frame: pb.KernelFrame) -> None:
        """To every attached client; while none is, held (bounded) for the next one to attach."""
        if self.attached:
            for q in self.attached:
                q.put_nowait(frame)
            return
        self.unattached.append(frame)
        self.unattached_bytes += frame.ByteSize()
        while len(self.unattached) > MAX_UNATTACHED_OUTPUT or self.unattached_bytes > MAX_UNATTACHED_BYTES:
            old = self.unattached.popleft()
            self.unattached_bytes -= old.ByteSize()
            self.delivered(old.seq)
            self.dropped_output += 1
            if self.dropped_output == 1:
                log.warning("sandbox_id=%s no client attached: kernel output beyond %s messages or %s is dropped, "
                            "oldest first, until one attaches", self.record.id, MAX_UNATTACHED_OUTPUT,
                            format_bytes(MAX_UNATTACHED_BYTES))

    def attach(self, queue: asyncio.Queue[pb.KernelFrame | None]) -> None:
        """A client attaches: it gets the output held for none first, in order."""
        if self.dropped_output:
            log.warning("sandbox_id=%s a client attached; %s kernel output messages were dropped while none was",
                        self.record.id, self.dropped_output)
            self.dropped_output = 0
        while self.unattached:
            queue.put_nowait(self.unattached.popleft())
        self.unattached_bytes = 0
        self.attached.add(queue)

    def detach(self, queue: asyncio.Queue[pb.KernelFrame | None],
               unsent: list[pb.KernelFrame]) -> None:
        """A client left; `unsent` are the frames it did not get (or may not have): held again if none is left."""
        self.attached.discard(queue)
        while not queue.empty():
            frame = queue.get_nowait()
            if frame is not None:
                unsent.append(frame)
        if self.attached or self.deleting or self.record.ended:
            for frame in unsent:
                self.delivered(frame.seq)
            return
        for frame in reversed(unsent):
            if frame.seq and frame.seq not in self.undelivered:
                continue  # another client wrote it
            self.unattached.appendleft(frame)
            self.unattached_bytes += frame.ByteSize()

    def delivered(self, seq: int) -> None:
        """Output `seq` is written to a client (or given up): the shim may forget it."""
        if seq and self.undelivered.pop(seq, 0) is None:
            self.ack()

    def ack(self) -> None:
        """Tell the shim which output it may forget: all up to the first that no client has yet."""
        if self.link is not None:
            if self.deleting or self.record.ended:  # nobody will want its output now
                self.undelivered.clear()
            first = next(iter(self.undelivered), None)
            self.link.ack(self.last_seq if first is None else first - 1)


@dataclass
class Defaults:
    """What a sandbox gets when its spec does not say (the daemon's settings)."""
    runtime: str
    cpu: float
    memory: int
    start_timeout: float
    disk: int = 10 * 1024**3
    hibernate_after_gpu: float = 600.0
    hibernate_after_cpu: float = 0.0
    gpu_offload: bool = True
    gpu_offload_buffers: int = DEFAULT_BUFFERS  # the offload's pinned staging buffers in the kernel (staging.py)
    gpu_offload_buffer_bytes: int = DEFAULT_BUFFER_BYTES
    wake_timeout: float = 600.0
    templates: bool = False  # new kernels restore a template of their class (templates.py)
    template_preimport: tuple[str, ...] = ()
    warm_pool: int = 0  # running sandboxes of the default spec waiting for a kernel request (warm_pool.py)
    warm_pool_classes: tuple[tuple[pb.SandboxSpec, int], ...] = ()  # other classes' pools: (spec, size)
