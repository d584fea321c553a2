"""One sandbox as the daemon holds it: its record (what is on disk), its agent link, the clients and watchers
subscribed to it, and what it is busy with. The manager (sandboxes.py) creates, finds and deletes them."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from pathlib import Path

from snapkernel.backend.agent_link import AgentLink
from snapkernel.backend.sandbox_db import SandboxRecord
from snapkernel.protocol.spec import ParsedSpec
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.snapshots import cuda


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
    deleting: bool = False
    snapshotting: bool = False
    code_results: dict[str, asyncio.Future[pb.CodeResult]] = field(default_factory=dict)
    restore_state: str | None = None  # a state dir in the workspace to load once the kernel runs
    restore_source: Path | None = None  # where to copy that dir from first (a snapshot in the store)
    state_error: str = ""  # why loading it failed
    busy: bool = False  # the kernel said `busy` on iopub and not yet `idle`
    detached_at: float = field(default_factory=time.time)  # when its last client left (see orphans.py)
    # Hibernation (see hibernation.py)
    held: list[pb.AgentMessage] = field(default_factory=list)  # kernel messages waiting for it to wake
    waking: asyncio.Future[None] | None = None
    suspended: cuda.Suspended | None = None
    refused_at: float = -1.0  # `last_activity` when it last could not hibernate: not again until used
    told_waiting: bool = False


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
    wake_timeout: float = 600.0
