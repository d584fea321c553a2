"""Accounting of a host's CPU, memory and GPUs among sandboxes (the host's totals are given, not read here).

GPUs are exclusive: a sandbox gets whole GPUs that no other sandbox holds. CPU and memory are limits per
sandbox. The cores given out in total may exceed the host's by `cpu_overcommit` (default 4: notebooks idle
most of the time); memory is not overcommitted by default (`memory_overcommit` 1), GPUs never are. Status
shows the policy (`Capacity.cpu_overcommit`, `cpu_limit`); a refusal names the limit it hit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

from snapkernel.errors import NoCapacityError
from snapkernel.host.gpus import GpuInfo
from snapkernel.host.resources import HostResources
from snapkernel.protocol.spec import GpuRequest, ParsedSpec, format_bytes
from snapkernel.protocol.v1 import backend_pb2 as pb

R = TypeVar("R")


class Scheduler:
    """Who holds what. Claims are per sandbox, so releasing twice is harmless. Waking kernels that find
    their GPUs taken wait in one line (first come, first served); while anyone waits, new kernels get no
    GPU ahead of them."""

    def __init__(self, host: HostResources, cpu_overcommit: float, memory_overcommit: float) -> None:
        self.gpus: list[GpuInfo] = list(host.gpus)
        self.cpu_total = host.cpus
        self.memory_total = host.memory
        self.cpu_overcommit = cpu_overcommit
        self.memory_overcommit = memory_overcommit
        self.claims: dict[str, tuple[float, int]] = {}  # sandbox id -> (cores, bytes)
        self.gpu_owner: dict[int, str] = {}  # GPU index -> sandbox id
        self.line: list[str] = []  # sandbox ids waiting for GPUs, first first
        self._changed = asyncio.Condition()

    @property
    def cpu_allocated(self) -> float:
        return sum(c for c, _ in self.claims.values())

    @property
    def cpu_limit(self) -> float:
        """The cores that may be given out in total."""
        return self.cpu_total * self.cpu_overcommit

    @property
    def memory_limit(self) -> int:
        return int(self.memory_total * self.memory_overcommit)

    @property
    def memory_allocated(self) -> int:
        return sum(m for _, m in self.claims.values())

    def _matching(self, req: GpuRequest) -> list[GpuInfo]:
        matching = [g for g in self.gpus if req.model.lower() in ("any", g.model.lower(), g.name.lower())]
        if not matching:
            have = ", ".join(sorted({f"{g.model} ({g.name})" for g in self.gpus})) or "none"
            raise NoCapacityError(
                f"no GPU of model {req.model!r} here; these exist: {have}. Ask for one of those, 'any:N', or no GPU"
            )
        if len(matching) < req.count:
            raise NoCapacityError(f"asked for {req.count} GPUs of model {req.model!r}; only {len(matching)} exist here")
        return matching

    def _pick_gpus(self, sandbox_id: str, req: GpuRequest) -> list[int]:
        matching = self._matching(req)
        ahead = self._ahead_of(sandbox_id)
        free = [g.index for g in matching if g.index not in self.gpu_owner]
        if len(free) < req.count or ahead:
            waiting = f"; {len(ahead)} waking kernel(s) wait for GPUs ahead of this one" if ahead else ""
            raise NoCapacityError(
                f"asked for {req.count} GPU(s) of model {req.model!r}; {len(matching)} exist here and "
                f"{len(free)} are free{waiting}. Shut down or hibernate another GPU kernel, or ask for fewer"
            )
        return free[: req.count]

    def _ahead_of(self, sandbox_id: str) -> list[str]:
        return self.line[: self.line.index(sandbox_id)] if sandbox_id in self.line else list(self.line)

    def allocate(self, sandbox_id: str, spec: ParsedSpec) -> list[int]:
        indices = self._fit(sandbox_id, spec)
        self.claim(sandbox_id, spec.cpu, spec.memory, indices)
        return indices

    def fits_without(self, sandbox_id: str, spec: ParsedSpec, other: str) -> bool:
        """Whether `spec` would be allocated once sandbox `other` gave its claim back (nothing changes here)."""
        try:
            self.fit_without(sandbox_id, spec, other)
            return True
        except NoCapacityError:
            return False

    def fit_without(self, sandbox_id: str, spec: ParsedSpec, other: str) -> list[int]:
        """The GPUs `spec` would get once sandbox `other` gave back its claim and GPUs (a sandbox moving to other
        resources gives back its own); NoCapacityError saying what is short. Nothing changes here."""
        held = self.claims.pop(other, None)
        gpus = {i: owner for i, owner in self.gpu_owner.items() if owner == other}
        for i in gpus:
            del self.gpu_owner[i]
        try:
            return self._fit(sandbox_id, spec)
        finally:
            if held is not None:
                self.claims[other] = held
            self.gpu_owner.update(gpus)

    def check_host(self, spec: ParsedSpec) -> None:
        """Refuse a spec this host could never give, however many sandboxes ended (NoCapacityError)."""
        if spec.cpu > self.cpu_total:
            raise NoCapacityError(f"cpu {spec.cpu:g} is more than this host's {self.cpu_total:g} cores")
        if spec.memory > self.memory_total:
            raise NoCapacityError(
                f"memory {format_bytes(spec.memory)} is more than this host's {format_bytes(self.memory_total)}"
            )
        if spec.gpu:
            self._matching(spec.gpu)

    def _fit(self, sandbox_id: str, spec: ParsedSpec) -> list[int]:
        """The GPUs `spec` would get; NoCapacityError saying what is short."""
        self.check_host(spec)
        if self.cpu_allocated + spec.cpu > self.cpu_limit + 1e-9:
            raise NoCapacityError(
                f"no room for {spec.cpu:g} more cores: {self.cpu_allocated:g} are given out and the limit is "
                f"{self.cpu_limit:g} ({self.cpu_total:g} cores x {self.cpu_overcommit:g} cpu_overcommit, "
                "--BackendApp.cpu_overcommit); stop a kernel or ask for fewer"
            )
        if self.memory_allocated + spec.memory > self.memory_limit:
            policy = ("memory is not overcommitted" if self.memory_overcommit == 1 else
                      f"{self.memory_overcommit:g} memory_overcommit")
            raise NoCapacityError(
                f"no room for {format_bytes(spec.memory)} more memory: {format_bytes(self.memory_allocated)} "
                f"are given out and the limit is {format_bytes(self.memory_limit)} (this host's "
                f"{format_bytes(self.memory_total)}, {policy}); stop a kernel or ask for less"
            )
        return self._pick_gpus(sandbox_id, spec.gpu) if spec.gpu else []

    def claim(self, sandbox_id: str, cpu: float, memory: int, gpu_indices: list[int]) -> None:
        """Record an allocation (also used when re-adopting sandboxes after a restart)."""
        self.claims[sandbox_id] = (cpu, memory)
        for i in gpu_indices:
            self.gpu_owner[i] = sandbox_id

    def resize(self, sandbox_id: str, memory: int) -> None:
        """Account a sandbox's memory anew (a suspended GPU kernel holds its GPU memory in host memory)."""
        if sandbox_id in self.claims:
            self.claims[sandbox_id] = (self.claims[sandbox_id][0], memory)

    def claim_gpus(self, sandbox_id: str, gpu_indices: list[int]) -> None:
        """Take back exactly these GPUs (a suspended process wakes on the GPUs it had)."""
        taken = {i: self.gpu_owner[i] for i in gpu_indices if self.gpu_owner.get(i, sandbox_id) != sandbox_id}
        ahead = self._ahead_of(sandbox_id)
        if taken or ahead:
            held = ", ".join(f"GPU {i} is held by {owner}" for i, owner in taken.items())
            raise NoCapacityError(held or f"{len(ahead)} waking kernel(s) wait for GPUs ahead of this one")
        for i in gpu_indices:
            self.gpu_owner[i] = sandbox_id

    def release(self, sandbox_id: str) -> None:
        self.claims.pop(sandbox_id, None)
        self.release_gpus(sandbox_id)

    def release_gpus(self, sandbox_id: str) -> None:
        for i in [i for i, owner in self.gpu_owner.items() if owner == sandbox_id]:
            del self.gpu_owner[i]
        self._wake_line()

    def _wake_line(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop: nobody can be waiting
            asyncio.get_running_loop().create_task(notify())

    async def wait_in_line(self, sandbox_id: str, take: Callable[[], R], on_wait: Callable[[str], None],
                           timeout: float) -> R:
        """Call `take` (which raises `NoCapacityError` while what it wants is held) until it succeeds, in
        first-come order with other waiters; `on_wait` hears why it waits. Gives up after `timeout`."""
        self.line.append(sandbox_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                try:
                    return take()
                except NoCapacityError as e:
                    if loop.time() >= deadline:
                        raise NoCapacityError(f"{e}; gave up after waiting {timeout:g}s") from e
                    position = self.line.index(sandbox_id) + 1
                    on_wait(f"{e}; waiting in line (position {position} of {len(self.line)})")
                async with self._changed:
                    with contextlib.suppress(asyncio.TimeoutError):
                        # Also retry now and then: GPU memory used outside the scheduler frees up unseen.
                        await asyncio.wait_for(self._changed.wait(), min(5.0, max(0.1, deadline - loop.time())))
        finally:
            self.line.remove(sandbox_id)
            self._wake_line()

    def capacity(self) -> pb.Capacity:
        return pb.Capacity(
            cpu_total=self.cpu_total, cpu_allocated=self.cpu_allocated,
            memory_total=self.memory_total, memory_allocated=self.memory_allocated,
            gpus_total=len(self.gpus), gpus_allocated=len(self.gpu_owner),
            cpu_overcommit=self.cpu_overcommit, cpu_limit=self.cpu_limit,
            memory_overcommit=self.memory_overcommit, memory_limit=self.memory_limit,
        )
