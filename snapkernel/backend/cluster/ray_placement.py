"""`RayPlacement`: the front of a cluster (`snapkernel backend --placement ray`), the placement seam over Ray.

Ray decides where: each sandbox holds a detached placement group `sk-<id>` of one bundle (its cores, memory,
GPUs and the markers of its runtime and GPU model: resources.py) on the node Ray chose; hibernated, it holds
none. The node's daemon runs it: every call and the `Attach` stream go to that daemon over gRPC (node_link.py,
front_attach.py), never through Ray objects. The front polls each daemon for its sandboxes and Ray for its
nodes: a node Ray declares dead, or whose daemon stays silent, has its sandboxes turned `lost` naming it (or,
with `replace_lost`, resumed elsewhere from their newest snapshot). A restarted front finds its placements in
its database and the rest in the daemons' listings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapkernel.backend.cluster import resources
from snapkernel.backend.cluster.front_attach import FrontAttachment
from snapkernel.backend.cluster.front_db import FrontDB, Placed
from snapkernel.backend.cluster.front_fanout import FrontMapJob
from snapkernel.backend.cluster.node_agent import AGENT_PREFIX, NAMESPACE, NodeAgent
from snapkernel.backend.cluster.node_link import NodeLink
from snapkernel.backend.placement import Attachment, MapJob, Placement
from snapkernel.errors import (
    BackendUnavailableError,
    InvalidSpecError,
    NoCapacityError,
    NotFoundError,
    SnapkernelError,
    StateError,
    describe,
)
from snapkernel.protocol.spec import parse_spec
from snapkernel.protocol.states import ASLEEP, ENDED
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)

DB = "front.db"
RETRY_DELAY = 0.5  # seconds between tries to reach a node's daemon that restarts


@dataclass
class FrontSettings:
    ray_address: str
    state_dir: Path
    default_runtime: str  # "": gvisor where a node has it, else process
    default_cpu: float
    default_memory: int
    default_disk: int
    node_args: list[str]  # more `snapkernel backend` arguments for every node's daemon
    shared_store: bool = False  # the nodes share a snapshot store: a sandbox can wake and move across nodes
    front_address: str = ""  # where the nodes' daemons send their kernels' fan-out jobs
    front_token: str = ""
    poll_interval: float = 0.5
    placement_timeout: float = 10.0  # seconds a sandbox may wait for room before it is refused
    node_lost_after: float = 30.0  # seconds a node's daemon may not answer before its sandboxes are lost
    replace_lost: bool = False


class RayPlacement(Placement):
    def __init__(self, settings: FrontSettings) -> None:
        self.s = settings
        self.default_runtime = settings.default_runtime
        self.db = FrontDB(settings.state_dir / DB)
        self.placed: dict[str, Placed] = {}
        self.links: dict[str, NodeLink] = {}  # by Ray node id
        self.ray_nodes: dict[str, dict[str, Any]] = {}  # ray.nodes() by node id
        self.unsent: dict[str, list[pb.KernelFrame]] = {}
        self.seq_out: dict[str, int] = {}  # the highest output number given out per sandbox
        self.busy: dict[str, asyncio.Lock] = {}  # one wake, hibernation or move of a sandbox at a time
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.join_errors: dict[str, str] = {}  # by Ray node id: why a node's daemon is not there

    # --- Ray -------------------------------------------------------------------------------------
    def _connect(self) -> None:
        import ray

        host, _, port = self.s.ray_address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidSpecError(f"--ray-address {self.s.ray_address!r} is not valid: give the Ray head's HOST:PORT "
                                   "(its GCS port, 6379 unless `ray start --head --port` chose another)")
        try:  # Ray itself would retry an address that does not answer for minutes
            socket.create_connection((host.strip("[]"), int(port)), timeout=5.0).close()
        except OSError as e:
            raise BackendUnavailableError(
                f"cannot reach the Ray cluster at --ray-address {self.s.ray_address!r} ({e}): start its head with "
                "`ray start --head` (or `snapkernel cluster up`) and give its address, e.g. 127.0.0.1:6379") from e
        try:
            ray.init(address=self.s.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False)
        except Exception as e:  # ConnectionError, or Ray's own for a bad address
            raise BackendUnavailableError(
                f"cannot reach the Ray cluster at --ray-address {self.s.ray_address!r} ({describe(e)}): start its "
                "head with `ray start --head` (or `snapkernel cluster up`) and give its address, e.g. "
                "127.0.0.1:6379") from e

    async def _refresh_nodes(self) -> None:
        import ray

        found = await asyncio.to_thread(ray.nodes)
        self.ray_nodes = {n["NodeID"]: n for n in found}
        new = [n for n in found if n["Alive"] and resources.NODE in n["Resources"] and n["NodeID"] not in self.links]
        if new:
            await asyncio.gather(*(self._join(n) for n in new))
        for node_id, link in self.links.items():
            node = self.ray_nodes.get(node_id)
            if link.alive and (node is None or not node["Alive"]):
                await self._lost(link, "Ray reports its node dead (its raylet is gone)")

    async def _join(self, node: dict[str, Any]) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node_id = node["NodeID"]
        actor: Any = ray.remote(NodeAgent)
        agent = actor.options(
            name=AGENT_PREFIX + node_id, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=0, max_restarts=-1, max_task_retries=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(self.s.node_args, self.s.front_address, self.s.front_token)
        try:
            info = await asyncio.wait_for(agent.info.remote(), 90.0)
        except Exception as e:
            name = node.get("NodeName") or node_id[:8]
            self.join_errors[node_id] = f"{name}: its daemon did not start ({describe(e)})"
            log.error("node %s", self.join_errors[node_id])
            return
        self.join_errors.pop(node_id, None)
        name = str(node.get("NodeName") or node_id[:8])
        if any(link.name == name for link in self.links.values()):
            name = f"{name}-{node_id[:6]}"  # several Ray nodes of one host share its address as their name
        self.links[node_id] = NodeLink(name, node_id, info["address"], info["token"])
        log.info("node %s (%s) joined: daemon at %s", name, node_id[:8], info["address"])

    # --- the background look at every node -------------------------------------------------------------
    async def _poll(self) -> None:
        last_nodes = 0.0
        while True:
            await asyncio.sleep(self.s.poll_interval)
            try:
                if time.monotonic() - last_nodes > max(1.0, self.s.poll_interval):
                    last_nodes = time.monotonic()
                    await self._refresh_nodes()
                await asyncio.gather(*(self._poll_node(link) for link in list(self.links.values()) if link.alive))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("looking at the nodes failed")

    async def _poll_node(self, link: NodeLink) -> None:
        try:
            resp = await link.call("ListSandboxes", pb.ListSandboxesRequest(all=True), timeout=5.0)
        except SnapkernelError as e:
            if not link.unreachable_since:
                link.unreachable_since = time.monotonic()
                log.warning("%s does not answer: %s", link.describe(), e)
            elif time.monotonic() - link.unreachable_since > self.s.node_lost_after:
                await self._lost(link, f"its daemon has not answered for {self.s.node_lost_after:g} s ({e})")
            return
        link.unreachable_since = 0.0
        for sb in resp.sandboxes:
            p = self.placed.get(sb.id)
            if p is None:
                continue
            if p.ray_node_id != link.ray_node_id and p.last.state != pb.LOST:
                continue  # an old copy on a node it left
            p.node, p.ray_node_id = link.name, link.ray_node_id  # a lost one its node's new daemon took back
            await self._observe(p, sb)

    async def _observe(self, p: Placed, sb: pb.Sandbox) -> None:
        """The node's word on a sandbox: keep it, and give its placement group back once it needs none."""
        sb.node = p.node
        changed = sb.state != p.last.state
        p.last = sb
        if p.group and (sb.state in ENDED or sb.state == pb.HIBERNATED):
            await self._release(p)
        elif changed:
            self.db.save(p)

    async def _lost(self, link: NodeLink, why: str) -> None:
        link.alive, link.message = False, why
        log.error("%s is lost: %s", link.describe(), why)
        for p in [p for p in self.placed.values() if p.ray_node_id == link.ray_node_id]:
            if p.last.state in ENDED:
                continue
            await self._release(p)
            if self.s.replace_lost and await self._replace(p, why):
                continue
            p.last.state = pb.LOST
            p.last.message = f"node {link.name} was lost: {why}"
            self.db.save(p)

    async def _replace(self, p: Placed, why: str) -> bool:
        """A lost sandbox starts again elsewhere from its newest snapshot; False when it has none or that fails."""
        snaps = [s for s in await self.list_snapshots("") if s.sandbox_id == p.sandbox_id and not s.damaged]
        if not snaps:
            return False
        newest = max(snaps, key=lambda s: s.created)
        request = pb.CreateSandboxRequest()
        request.CopyFrom(p.request)
        request.spec.restore_from = newest.id
        request.sandbox_id = p.sandbox_id
        try:
            await self._place(request, base=max(self.seq_out.get(p.sandbox_id, 0), time.time_ns() // 1000))
        except SnapkernelError as e:
            log.error("sandbox_id=%s could not be re-placed from %s: %s", p.sandbox_id, newest.id, e)
            return False
        log.warning("sandbox_id=%s re-placed from snapshot %s (%s)", p.sandbox_id, newest.id, why)
        return True

    # --- placing ---------------------------------------------------------------------------------
    def _parse(self, spec: pb.SandboxSpec) -> Any:
        checked = pb.SandboxSpec()
        checked.CopyFrom(spec)
        checked.mount_dir = ""  # the node's path to check, not the front's
        return parse_spec(checked, default_runtime=self.default_runtime, default_cpu=self.s.default_cpu,
                          default_memory=self.s.default_memory, default_disk=self.s.default_disk)

    def _nodes_text(self, per_node: dict[str, dict[str, float]]) -> str:
        names = {link.ray_node_id: link.name for link in self.links.values()}
        found = "; ".join(f"{names[n]}: {resources.describe(r)}"
                          for n, r in sorted(per_node.items(), key=lambda i: names.get(i[0], "")) if n in names)
        if found:
            return found
        why = "; ".join(self.join_errors.values())
        return "no node runs a snapkernel daemon " + (f"({why})" if why else "(start nodes with `snapkernel cluster "
                                                                            "up`, or `ray start` with the "
                                                                            "resources of `snapkernel cluster "
                                                                            "resources`)")

    async def _reserve(self, wants: dict[str, float], name: str, near: str = "", strict: bool = False) -> str:
        """A placement group for `wants` (on node `near` if it can, or only there with `strict`); returns the
        node id. NoCapacityError naming what the nodes have when none can take it, or none has room in time."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

        alive = {i for i, link in self.links.items() if link.alive}
        totals = {i: n["Resources"] for i, n in self.ray_nodes.items() if i in alive}
        if strict:
            totals = {i: r for i, r in totals.items() if i == near}
        if not any(resources.fits(wants, r) for r in totals.values()):
            raise NoCapacityError(f"no node can take a sandbox of {resources.describe(wants)}: the nodes have "
                                  f"{self._nodes_text(totals)}")
        kw: dict[str, Any] = {"bundle_label_selector": [{"ray.io/node-id": near}]} if strict else \
            {"_soft_target_node_id": near} if near else {}
        group = placement_group([wants], strategy="STRICT_PACK", name=name, lifetime="detached", **kw)
        try:
            await asyncio.wait_for(group.ready(), self.s.placement_timeout)
        except TimeoutError:
            await asyncio.to_thread(remove_placement_group, group)
            free = await asyncio.to_thread(ray._private.state.state.available_resources_per_node)
            raise NoCapacityError(
                f"no node has room for a sandbox of {resources.describe(wants)} (waited "
                f"{self.s.placement_timeout:g} s): free now: "
                f"{self._nodes_text({i: r for i, r in free.items() if i in alive})}; stop or hibernate a kernel, "
                "or add a node") from None
        table = await asyncio.to_thread(placement_group_table, group)
        return str(table["bundles_to_node_id"][0])

    @staticmethod
    async def remove_group(name: str) -> None:
        from ray.util import get_placement_group
        from ray.util.placement_group import remove_placement_group

        if name:
            with contextlib.suppress(Exception):  # gone already (a front that died halfway)
                await asyncio.to_thread(lambda: remove_placement_group(get_placement_group(name)))

    async def reserve_spread(self, wants: dict[str, float], count: int, name: str) -> dict[str, int]:
        """Fan-out workers: `count` bundles of `wants` spread over the nodes; how many landed on each node."""
        from ray.util.placement_group import placement_group, placement_group_table

        alive = {i for i, link in self.links.items() if link.alive}
        if not any(resources.fits(wants, n["Resources"]) for i, n in self.ray_nodes.items() if i in alive):
            raise NoCapacityError(f"no node can take a fan-out worker of {resources.describe(wants)}: the nodes "
                                  f"have {self._nodes_text({i: self.ray_nodes[i]['Resources'] for i in alive})}")
        group = placement_group([wants] * count, strategy="SPREAD", name=name, lifetime="detached")
        try:
            await asyncio.wait_for(group.ready(), self.s.placement_timeout)
        except TimeoutError:
            await self.remove_group(name)
            raise NoCapacityError(f"no room for {count} fan-out worker(s) of {resources.describe(wants)} within "
                                  f"{self.s.placement_timeout:g} s: ask for fewer --workers or less --cpu/--memory, "
                                  "or add a node") from None
        table = await asyncio.to_thread(placement_group_table, group)
        per_node: dict[str, int] = {}
        for node_id in table["bundles_to_node_id"].values():
            per_node[node_id] = per_node.get(node_id, 0) + 1
        return per_node

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, p: Placed) -> None:
        await self.remove_group(p.group)
        p.group = ""
        self.db.save(p)

    async def _place(self, request: pb.CreateSandboxRequest, near: str = "", base: int = 0) -> pb.Sandbox:
        spec = self._parse(request.spec)
        sandbox_id = request.sandbox_id or f"sb-{secrets.token_hex(6)}"
        group = f"sk-{sandbox_id}-{secrets.token_hex(3)}"
        node_id = await self._reserve(resources.bundle(spec), group, near)
        link = self.links[node_id]
        sent = pb.CreateSandboxRequest()
        sent.CopyFrom(request)
        sent.sandbox_id = sandbox_id
        sent.spec.runtime = spec.runtime  # the one Ray placed it for, whatever the node's default
        p = Placed(sandbox_id, link.name, node_id, group, request, pb.Sandbox(id=sandbox_id), base)
        self.placed[sandbox_id] = p
        try:
            sb: pb.Sandbox = await link.call("CreateSandbox", sent, timeout=120.0)
        except BaseException:
            await self._release(p)
            self.placed.pop(sandbox_id, None)
            self.db.forget(sandbox_id)
            raise
        await self._observe(p, sb)
        self.db.save(p)
        return sb

    # --- the seam --------------------------------------------------------------------------------
    async def start(self, remove_leftovers: bool = False) -> int:
        await asyncio.to_thread(self._connect)
        if self.s.front_address.startswith(("0.0.0.0:", "[::]:")):  # the nodes reach the front at its own address
            import ray

            port = self.s.front_address.rpartition(":")[2]
            host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
            self.s.front_address = f"{host}:{port}"
        self.placed = {p.sandbox_id: p for p in self.db.load()}
        for p in self.placed.values():
            self.seq_out[p.sandbox_id] = p.seq_base
        await self._refresh_nodes()
        if not self.default_runtime:
            offered = {k for n in self.ray_nodes.values() for k in n["Resources"]}
            self.default_runtime = "gvisor" if resources.runtime_resource("gvisor") in offered else "process"
        await asyncio.gather(*(self._poll_node(link) for link in self.links.values()))
        removed = 0
        if remove_leftovers:
            for sandbox_id in list(self.placed):
                with contextlib.suppress(SnapkernelError):
                    await self.delete(sandbox_id)
                    removed += 1
        self._poller = asyncio.ensure_future(self._poll())
        return removed

    async def stop(self, remove_sandboxes: bool = False) -> int:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        removed = 0
        if remove_sandboxes:
            for sandbox_id in list(self.placed):
                with contextlib.suppress(SnapkernelError):
                    await self.delete(sandbox_id)
                    removed += 1
        for link in self.links.values():
            await link.close()
        self.db.close()
        import ray

        await asyncio.to_thread(ray.shutdown)  # the driver leaves; agents and placement groups stay
        return removed

    def _find(self, sandbox_id: str) -> Placed:
        p = self.placed.get(sandbox_id)
        if p is None:
            raise NotFoundError(f"no sandbox {sandbox_id!r}; `snapkernel sandboxes list` shows them")
        return p

    def link_of(self, sandbox_id: str) -> tuple[NodeLink, int]:
        p = self._find(sandbox_id)
        link = self.links.get(p.ray_node_id)
        if link is None:
            raise NotFoundError(f"sandbox {sandbox_id!r} is on node {p.node}, which this front does not know")
        return link, p.seq_base

    def _alive_link(self, sandbox_id: str) -> NodeLink:
        link, _ = self.link_of(sandbox_id)
        if not link.alive:
            raise StateError(f"sandbox {sandbox_id} is lost with its node {link.name} ({link.message}); "
                             "`snapkernel sandboxes rm` removes it")
        return link

    def asleep(self, sandbox_id: str) -> bool:
        p = self.placed.get(sandbox_id)
        return p is not None and p.last.state in ASLEEP and not p.group

    async def started(self, sandbox_id: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.ended(sandbox_id):
            with contextlib.suppress(SnapkernelError):
                if (await self.get(sandbox_id)).state not in (pb.PENDING, pb.STARTING, pb.WAKING):
                    return
            await asyncio.sleep(0.1)

    def ended(self, sandbox_id: str) -> bool:
        p = self.placed.get(sandbox_id)
        return p is None or p.last.state in ENDED

    async def create(self, request: pb.CreateSandboxRequest) -> pb.Sandbox:
        if request.sandbox_id:
            raise InvalidSpecError(f"sandbox_id {request.sandbox_id!r}: the front chooses sandbox ids; leave it "
                                   "empty")
        return await self._place(request)

    async def get(self, sandbox_id: str) -> pb.Sandbox:
        p = self._find(sandbox_id)
        link = self.links.get(p.ray_node_id)
        if link is None or not link.alive:
            return p.last
        try:
            sb: pb.Sandbox = await link.call("GetSandbox", pb.GetSandboxRequest(id=sandbox_id), timeout=5.0)
        except BackendUnavailableError as e:  # as it was last seen: its node may be dying, or its daemon restarting
            last = pb.Sandbox()
            last.CopyFrom(p.last)
            last.message = f"{link.describe()} does not answer ({e}); this is how it was last seen"
            return last
        await self._observe(p, sb)
        return sb

    async def list_sandboxes(self, include_ended: bool) -> list[pb.Sandbox]:
        async def of(link: NodeLink) -> list[pb.Sandbox]:
            try:
                resp = await link.call("ListSandboxes", pb.ListSandboxesRequest(all=include_ended), timeout=5.0)
            except SnapkernelError:
                return []
            out = []
            for sb in resp.sandboxes:
                p = self.placed.get(sb.id)
                if p is not None and p.ray_node_id != link.ray_node_id:
                    continue  # an old copy on a node it left
                sb.node = link.name
                out.append(sb)
            return out

        found = [sb for part in await asyncio.gather(*(of(link) for link in self.links.values() if link.alive))
                 for sb in part]
        seen = {sb.id for sb in found}
        reachable = {i for i, link in self.links.items() if link.alive}
        found += [p.last for p in self.placed.values()  # those of lost nodes, as the front last knew them
                  if p.sandbox_id not in seen and p.ray_node_id not in reachable
                  and (include_ended or p.last.state not in ENDED)]
        return sorted(found, key=lambda sb: sb.created)

    async def delete(self, sandbox_id: str) -> None:
        p = self._find(sandbox_id)
        link = self.links.get(p.ray_node_id)
        if link is not None and link.alive:
            with contextlib.suppress(NotFoundError):
                await link.call("DeleteSandbox", pb.DeleteSandboxRequest(id=sandbox_id), timeout=60.0)
        await self._release(p)
        self.placed.pop(sandbox_id, None)
        self.db.forget(sandbox_id)
        self.unsent.pop(sandbox_id, None)

    def watch(self, sandbox_id: str) -> AsyncGenerator[pb.SandboxEvent, None]:
        self._find(sandbox_id)  # here: an unknown id fails the call at once

        async def events() -> AsyncGenerator[pb.SandboxEvent, None]:
            while True:
                link = self._alive_link(sandbox_id)
                try:
                    async for event in link.watch(sandbox_id):
                        event.sandbox.node = link.name
                        yield event
                except NotFoundError:
                    pass
                except BackendUnavailableError:  # its daemon restarts (the node's keeper starts another)
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                if sandbox_id not in self.placed or self.links.get(self.placed[sandbox_id].ray_node_id) is link:
                    return  # it ended or went; a sandbox woken elsewhere is followed there
        return events()

    async def attach(self, sandbox_id: str) -> Attachment:
        self._alive_link(sandbox_id)
        return FrontAttachment(self, sandbox_id)

    async def signal(self, sandbox_id: str, signal: int) -> None:
        await self._alive_link(sandbox_id).call("SignalKernel", pb.SignalKernelRequest(id=sandbox_id, signal=signal))

    async def restart(self, sandbox_id: str) -> pb.Sandbox:
        link = self._alive_link(sandbox_id)
        sb: pb.Sandbox = await link.call("RestartKernel", pb.RestartKernelRequest(id=sandbox_id), timeout=120.0)
        sb.node = link.name
        return sb

    async def hibernate(self, sandbox_id: str) -> pb.Sandbox:
        link = self._alive_link(sandbox_id)
        async with self._lock(sandbox_id):
            sb: pb.Sandbox = await link.call("HibernateSandbox", pb.HibernateSandboxRequest(id=sandbox_id),
                                             timeout=None)
            await self._observe(self.placed[sandbox_id], sb)
        return sb

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self.busy.setdefault(sandbox_id, asyncio.Lock())

    async def wake(self, sandbox_id: str) -> pb.Sandbox:
        """Back on its old node where it has room, else on any node that can take its image."""
        async with self._lock(sandbox_id):
            p = self._find(sandbox_id)
            link = self._alive_link(sandbox_id)
            if not (p.last.state in ASLEEP and not p.group):
                return await self.get(sandbox_id)
            spec = self._parse(p.last.spec)
            group = f"sk-{sandbox_id}-{secrets.token_hex(3)}"
            # Elsewhere only through a shared snapshot store; without one it waits for room on its own node.
            node_id = await self._reserve(resources.bundle(spec), group, near=p.ray_node_id,
                                          strict=not self.s.shared_store)
            p.group = group
            self.db.save(p)
            if node_id == p.ray_node_id:
                sb: pb.Sandbox = await link.call("WakeSandbox", pb.WakeSandboxRequest(id=sandbox_id), timeout=None)
                await self._observe(p, sb)
                return sb
            return await self._relocate(p, link, node_id, group)

    async def _relocate(self, p: Placed, old: NodeLink, node_id: str, group: str,
                        spec: pb.SandboxSpec | None = None) -> pb.Sandbox:
        """A hibernated sandbox leaves `old` as a snapshot in the shared store and resumes on `node_id` (its
        placement group `group` is there already) under the same id."""
        new = self.links[node_id]
        try:
            snap: pb.SnapshotInfo = await old.call("ExportSandbox", pb.ExportSandboxRequest(id=p.sandbox_id),
                                                   timeout=None)
        except SnapkernelError:
            await self._release(p)
            raise
        request = pb.CreateSandboxRequest()
        request.CopyFrom(p.request)
        if spec is not None:
            request.spec.CopyFrom(spec)
        request.spec.restore_from = snap.id
        request.sandbox_id = p.sandbox_id
        # Above any number given out before, also by a front that has restarted since: microseconds now.
        base = max(self.seq_out.get(p.sandbox_id, 0), time.time_ns() // 1000)
        p.node, p.ray_node_id, p.seq_base = new.name, node_id, base
        p.last = pb.Sandbox(id=p.sandbox_id, state=pb.WAKING, node=new.name, spec=request.spec)
        self.db.save(p)
        try:
            sb: pb.Sandbox = await new.call("CreateSandbox", request, timeout=120.0)
        except SnapkernelError as e:
            await self._release(p)
            p.last.state, p.last.message = pb.FAILED, f"could not resume on node {new.name}: {e}; its snapshot " \
                                                       f"{snap.id} is kept (`snapkernel resume {snap.id}`)"
            self.db.save(p)
            raise
        await self._observe(p, sb)
        log.info("sandbox_id=%s woke on %s (from %s, snapshot %s)", p.sandbox_id, new.name, old.name, snap.id)
        return sb

    async def move(self, request: pb.MoveSandboxRequest) -> pb.Sandbox:
        """On its node where the new resources fit there, else hibernated, handed over and resumed on another."""
        async with self._lock(request.id):
            p = self._find(request.id)
            link = self._alive_link(request.id)
            spec = pb.SandboxSpec()
            spec.CopyFrom(p.last.spec)
            for field in ("gpu", "cpu", "memory", "disk", "runtime"):
                if request.HasField(field):
                    setattr(spec, field, getattr(request, field))
            wants = resources.bundle(self._parse(spec))
            group = f"sk-{request.id}-{secrets.token_hex(3)}"
            old_group = p.group
            try:
                await self._reserve(wants, group, near=p.ray_node_id, strict=True)
            except NoCapacityError:
                if not self.s.shared_store:
                    raise
                node_id = await self._reserve(wants, group)
                await link.call("HibernateSandbox", pb.HibernateSandboxRequest(id=request.id), timeout=None)
                await self._release(p)
                p.group = group
                return await self._relocate(p, link, node_id, group, spec)
            try:
                sb: pb.Sandbox = await link.call("MoveSandbox", request, timeout=None)
            except BaseException:
                await self.remove_group(group)
                raise
            await self.remove_group(old_group)
            p.group = group
            await self._observe(p, sb)
            self.db.save(p)
            return sb

    async def usage(self, sandbox_id: str) -> pb.SandboxUsage:
        usage: pb.SandboxUsage = await self._alive_link(sandbox_id).call(
            "GetSandboxUsage", pb.GetSandboxUsageRequest(id=sandbox_id))
        return usage

    async def export(self, sandbox_id: str) -> pb.SnapshotInfo:
        raise InvalidSpecError("ExportSandbox is a node daemon's call: the front moves sandboxes between nodes "
                               "itself (WakeSandbox, MoveSandbox)")

    # --- snapshots: each node sees the shared store; a snapshot of a sandbox is taken on its node --------
    def _any_link(self) -> NodeLink:
        for link in self.links.values():
            if link.alive:
                return link
        raise BackendUnavailableError("no node of the cluster answers: start one (`ray start` with snapkernel, or "
                                      "`snapkernel cluster up`)")

    async def create_snapshot(self, request: pb.CreateSnapshotRequest) -> pb.SnapshotInfo:
        info: pb.SnapshotInfo = await self._alive_link(request.sandbox_id).call("CreateSnapshot", request,
                                                                                timeout=600.0)
        return info

    async def get_snapshot(self, snapshot_id: str) -> pb.SnapshotInfo:
        info: pb.SnapshotInfo = await self._any_link().call("GetSnapshot", pb.GetSnapshotRequest(id=snapshot_id))
        return info

    async def list_snapshots(self, notebook_path: str) -> list[pb.SnapshotInfo]:
        async def of(link: NodeLink) -> list[pb.SnapshotInfo]:
            with contextlib.suppress(SnapkernelError):
                resp = await link.call("ListSnapshots", pb.ListSnapshotsRequest(notebook_path=notebook_path))
                return list(resp.snapshots)
            return []

        found: dict[str, pb.SnapshotInfo] = {}
        for part in await asyncio.gather(*(of(link) for link in self.links.values() if link.alive)):
            for snap in part:
                found.setdefault(snap.id, snap)
        return sorted(found.values(), key=lambda s: -s.created)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        deleted = False
        for link in [link for link in self.links.values() if link.alive]:
            with contextlib.suppress(NotFoundError):
                await link.call("DeleteSnapshot", pb.DeleteSnapshotRequest(id=snapshot_id))
                deleted = True
        if not deleted:
            raise NotFoundError(f"no snapshot {snapshot_id!r}; `snapkernel snapshots list` shows them")

    # --- status and fan-out ----------------------------------------------------------------------
    async def status(self) -> pb.Status:
        """The nodes as Ray accounts for them (what it has given out is what placement groups hold), with the
        runtimes each advertises and each daemon's GPUs."""
        import ray

        free = await asyncio.to_thread(ray._private.state.state.available_resources_per_node)

        async def of(link: NodeLink) -> pb.Node:
            node = pb.Node(name=link.name, ray_node_id=link.ray_node_id, address=link.address, alive=link.alive,
                           message=link.message)
            total = self.ray_nodes.get(link.ray_node_id, {}).get("Resources", {})
            left = free.get(link.ray_node_id, total)
            node.capacity.CopyFrom(pb.Capacity(
                cpu_total=total.get("CPU", 0), cpu_allocated=total.get("CPU", 0) - left.get("CPU", 0),
                cpu_limit=total.get("CPU", 0), cpu_overcommit=1, memory_total=int(total.get("memory", 0)),
                memory_allocated=int(total.get("memory", 0) - left.get("memory", 0)),
                memory_limit=int(total.get("memory", 0)), memory_overcommit=1, gpus_total=int(total.get("GPU", 0)),
                gpus_allocated=int(total.get("GPU", 0) - left.get("GPU", 0))))
            if link.alive:
                try:
                    st: pb.Status = await link.call("GetStatus", pb.GetStatusRequest(), timeout=5.0)
                except SnapkernelError as e:
                    node.message = f"does not answer: {e}"
                else:  # the runtimes Ray places for on this node, as its daemon has them
                    node.runtimes.extend(r for r in st.runtimes if resources.runtime_resource(r.name) in total)
                    node.gpus.extend(st.gpus)
                    node.sandboxes, node.driver_version = st.sandboxes, st.driver_version
            return node

        nodes = list(await asyncio.gather(*(of(link) for link in self.links.values())))
        status = pb.Status(default_runtime=self.default_runtime, nodes=nodes)
        runtimes: dict[str, pb.Runtime] = {}
        cap = status.capacity
        for node in nodes:
            for r in node.runtimes:
                if r.name not in runtimes or (r.available and not runtimes[r.name].available):
                    runtimes[r.name] = pb.Runtime(name=r.name, available=r.available, version=r.version,
                                                  detail=f"on {node.name}: {r.detail}")
            status.gpus.extend(node.gpus)
            c = node.capacity
            for name in ("cpu_total", "cpu_allocated", "cpu_limit", "memory_total", "memory_allocated",
                         "memory_limit", "gpus_total", "gpus_allocated"):
                setattr(cap, name, getattr(cap, name) + getattr(c, name))
            status.sandboxes += node.sandboxes
        status.runtimes.extend(runtimes.values())
        cap.cpu_overcommit = cap.memory_overcommit = 1  # Ray gives out what the nodes were started with
        if not status.gpus:
            status.gpu_detail = "no node of the cluster has a GPU"
        return status

    def open_map(self, send: Callable[[pb.MapResponse], None]) -> MapJob:
        return FrontMapJob(self, send)
