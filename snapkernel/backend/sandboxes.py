"""The sandbox manager: create, find, signal, restart, delete and re-adopt sandboxes, and their state changes
(checked by lifecycle.py, saved to SQLite, pushed to watchers). Its parts, each through a narrow protocol:
starting.py (boot or restore), agent_messages.py (to and from agents), snapshotting.py, hibernation.py,
templates.py and warm_pool.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapkernel.backend import lifecycle
from snapkernel.backend.agent_link import AgentLink
from snapkernel.backend.agent_messages import AgentMessages
from snapkernel.backend.hibernation import IMAGE_DIR, STATE_DIR, Hibernator, remove_image
from snapkernel.backend.lifecycle import Activity
from snapkernel.backend.moving import Mover
from snapkernel.backend.runtimes.base import EXIT_FILE, LINK_SOCKET, LOG_FILE, SELF_EXIT_WAIT, SandboxRuntime
from snapkernel.backend.sandbox import POOL_KERNEL_ID, TEMPLATE_KERNEL_ID, Defaults, LiveSandbox
from snapkernel.backend.sandbox_db import SandboxDB, SandboxRecord
from snapkernel.backend.scheduler import Scheduler
from snapkernel.backend.shared_snapshots import SharedSnapshots
from snapkernel.backend.snapshotting import Snapshotter
from snapkernel.backend.starting import Starter
from snapkernel.backend.templates import KERNEL, Templates, eligible, mode
from snapkernel.backend.warm_pool import WarmPool
from snapkernel.backend.workspace import WORKSPACE, Workspaces
from snapkernel.errors import (
    InvalidSpecError,
    NoCapacityError,
    NotFoundError,
    RuntimeUnavailableError,
    SandboxFailedError,
    SnapkernelError,
    StateError,
    TimeoutError_,
)
from snapkernel.protocol.spec import ParsedSpec, check_sandbox_id, format_bytes, parse_spec
from snapkernel.protocol.states import HELD, STATE_NAMES
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.snapshots.store import Snapshot, SnapshotStore

if TYPE_CHECKING:
    from snapkernel.snapshots.shared import SharedStore

log = logging.getLogger(__name__)


class SandboxManager:
    def __init__(self, state_dir: Path, runtimes: dict[str, SandboxRuntime], scheduler: Scheduler,
                 defaults: Defaults, known_runtimes: Sequence[str] = (), *, shared_store: SharedStore | None = None
                 ) -> None:
        self.state_dir = state_dir
        self.sandbox_root = state_dir / "sandboxes"
        self.sandbox_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = SandboxDB(state_dir / "backend.db")
        self.runtimes = runtimes
        self.known_runtimes = tuple(known_runtimes) or tuple(runtimes)  # with those that do not work here
        self.scheduler = scheduler
        self.defaults = defaults
        self.live: dict[str, LiveSandbox] = {}
        self.snapshots = SnapshotStore(state_dir / "snapshots")
        # The store above as a cache of a shared one, when there is one.
        self.shared = SharedSnapshots(self.snapshots, shared_store, state_dir / "shared_snapshots")
        self.workspaces = Workspaces(state_dir)
        self._tasks: set[asyncio.Task[None]] = set()
        self.hibernator = Hibernator(self)
        self.mover = Mover(self, self.hibernator)
        self.snapshotter = Snapshotter(self)
        self.messages = AgentMessages(self)
        self.starter = Starter(self)
        self.templates = Templates(state_dir / "templates", self, list(defaults.template_preimport),
                                   enabled=defaults.templates)
        self.pool = WarmPool(self, [(pb.SandboxSpec(), defaults.warm_pool), *defaults.warm_pool_classes]
                             if defaults.templates else [])
        # Agent messages of other parts of the backend (fan-out), by oneof name.
        self.handlers: dict[str, Callable[[LiveSandbox, pb.AgentMessage], None]] = {}

    # --- helpers --------------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def parse(self, spec: pb.SandboxSpec) -> ParsedSpec:
        return parse_spec(spec, default_runtime=self.defaults.runtime, default_cpu=self.defaults.cpu,
                          default_memory=self.defaults.memory, default_disk=self.defaults.disk)

    def runtime_for(self, spec: ParsedSpec) -> SandboxRuntime:
        runtime = self.runtimes.get(spec.runtime)
        if spec.runtime not in self.known_runtimes:
            raise InvalidSpecError(f"runtime {spec.runtime!r} is not known: use one of "
                                   f"{', '.join(self.known_runtimes)}")
        if runtime is None:
            raise RuntimeUnavailableError(
                f"runtime {spec.runtime!r} is not available on this backend; available: "
                f"{', '.join(self.runtimes)}"
            )
        return runtime

    def get(self, sandbox_id: str) -> LiveSandbox:
        check_sandbox_id(sandbox_id)
        sb = self.live.get(sandbox_id)
        if sb is None:
            raise NotFoundError(f"no sandbox {sandbox_id!r} here; `snapkernel sandboxes list` shows them")
        return sb

    def set_state(self, sb: LiveSandbox, state: int, message: str | None = None,
                   progress: pb.Progress | None = None) -> None:
        r = sb.record
        if sb.deleting and not lifecycle.allowed(r.state, state):
            # A start, wake or restore that finished while the sandbox is being deleted: moot.
            log.info("sandbox_id=%s being deleted: not %s", r.id, STATE_NAMES[state])
            return
        lifecycle.check_move(r.id, r.state, state)
        r.state = state
        if message is not None:
            r.message = message
        if state != pb.DELETED:
            self.db.save(r)
        self.notify(sb, progress)
        log.info("sandbox_id=%s kernel_id=%s state=%s %s", r.id, r.kernel_id, STATE_NAMES[state],
                 message or (progress.message if progress else ""))

    def notify(self, sb: LiveSandbox, progress: pb.Progress | None = None) -> None:
        event = pb.SandboxEvent(sandbox=sb.record.to_pb(), progress=progress)
        for q in sb.watchers:
            q.put_nowait(event)

        async def wake() -> None:
            async with sb.changed:
                sb.changed.notify_all()

        self.spawn(wake())

    def progress(self, sb: LiveSandbox, step: str, message: str, fraction: float = -1.0) -> None:
        self.notify(sb, pb.Progress(step=step, message=message, fraction=fraction))
        log.info("sandbox_id=%s %s: %s", sb.record.id, step, message)

    def release(self, sb: LiveSandbox) -> None:
        self.scheduler.release(sb.record.id)

    def state_name(self, sb: LiveSandbox) -> str:
        return STATE_NAMES[sb.record.state]

    # --- create ---------------------------------------------------------------------------------
    async def create(self, req: pb.CreateSandboxRequest) -> pb.Sandbox:
        spec = self.parse(req.spec)
        runtime = self.runtime_for(spec)
        restore: Path | None = None
        restore_source: Path | None = None
        snap: Snapshot | None = None
        if spec.restore_from:
            await self.shared.ensure_local(spec.restore_from, spec.runtime, runtime.capabilities.version)
            snap = await asyncio.to_thread(self.snapshots.check, spec.restore_from, spec.runtime,
                                           runtime.capabilities.version)
            if snap.kind == "memory":
                restore = self.snapshots.path(snap.id)
            else:
                restore_source = self.snapshots.path(snap.id)
        if req.kernel.signature_scheme not in ("", "hmac-sha256"):
            raise InvalidSpecError(
                f"signature scheme {req.kernel.signature_scheme!r} is not supported: use hmac-sha256"
            )
        runtime.check(spec)
        # A template's own sandbox boots; the pool's restores the template; a kernel takes from the pool first
        # (it holds kernels only: a fan-out worker restores its class's template).
        building = req.kernel_id.startswith(TEMPLATE_KERNEL_ID)
        if (not building and not req.kernel_id.startswith(POOL_KERNEL_ID) and eligible(spec, runtime)
                and mode(spec) == KERNEL):
            handed = await self.pool.hand_out(self.templates.key(spec, runtime), req, spec,
                                              self.hibernate_after(spec))
            if handed is not None:
                return handed
        self.workspaces.check(spec.disk, req.spec.disk or format_bytes(spec.disk))
        state = self.state_dir.resolve()
        if spec.mount_dir and (Path(spec.mount_dir) == state or state in Path(spec.mount_dir).parents):
            raise InvalidSpecError(f"mount_dir {spec.mount_dir!r} is inside the backend's state dir: mount a "
                                   "notebook directory elsewhere")
        sandbox_id = self._new_id(req.sandbox_id)
        try:
            gpus = self.scheduler.allocate(sandbox_id, spec)
        except NoCapacityError:
            leaving = None if req.kernel_id.startswith(POOL_KERNEL_ID) else self.pool.give_room(
                lambda sb: self.scheduler.fits_without(sandbox_id, spec, sb.record.id))
            if leaving is None:
                raise
            self.release(leaving)  # its room goes to this request at once: nothing can come in between
            self.spawn(self.delete(leaving.record.id))
            gpus = self.scheduler.allocate(sandbox_id, spec)
        template = None if building else self.templates.take(spec, runtime)  # counted as used from here on
        if template is not None:
            restore = template[1]
        record = SandboxRecord(
            id=sandbox_id, kernel_id=req.kernel_id, runtime=spec.runtime, spec=req.spec,
            dir=str(self.sandbox_root / sandbox_id), gpu_indices=gpus, created=time.time(),
            notebook_path=req.notebook_path, kernel=req.kernel, last_activity=time.time(),
            hibernate_after=self.hibernate_after(spec),
        )
        sb = LiveSandbox(record, spec)
        if restore_source is not None:
            sb.restore_state, sb.restore_source = f".snapkernel-restore-{secrets.token_hex(4)}", restore_source
        self.live[sandbox_id] = sb
        self.set_state(sb, pb.PENDING, "")
        self.spawn(self.starter.start(sb, runtime, req.kernel, restore, template[0] if template else ""))
        if snap is not None:
            # The snapshot's checksums are read while it restores (one after the other they were most of a
            # resume: the image read twice); should one fail, the sandbox goes and the request fails with it.
            try:
                await asyncio.to_thread(self.snapshots.check_files, snap)
            except (SnapkernelError, asyncio.CancelledError):  # a client that gave up gets no unchecked sandbox
                await self.delete(sandbox_id)
                raise
        return record.to_pb()

    def _new_id(self, asked: str) -> str:
        """A new sandbox's id: a fresh one, or the one a cluster's front gives a sandbox it re-places here."""
        if not asked:
            return f"sb-{secrets.token_hex(6)}"
        if check_sandbox_id(asked) in self.live:
            raise StateError(f"sandbox_id {asked!r} is taken here already: leave sandbox_id empty for a new id")
        return asked

    def hibernate_after(self, spec: ParsedSpec) -> float:
        if spec.hibernate_after is not None:
            return spec.hibernate_after
        return self.defaults.hibernate_after_gpu if spec.gpu else self.defaults.hibernate_after_cpu

    def pool_class(self, spec: pb.SandboxSpec) -> tuple[ParsedSpec, str] | None:
        """A warm pool class's spec and its template's key, once that template is ready (pool sandboxes restore
        it); None before, or where that class has no template."""
        parsed = self.parse(spec)
        runtime = self.runtimes.get(parsed.runtime)
        template = self.templates.ensure(parsed, runtime) if runtime is not None and mode(parsed) == KERNEL else None
        return (parsed, template.key) if template is not None and template.state == "ready" else None

    def prepare_workspace(self, sb: LiveSandbox) -> Path:
        """The sandbox's workspace, mounted with its quota and owned by the user its kernel runs as."""
        runtime = self.runtimes[sb.record.runtime]
        return self.workspaces.prepare(Path(sb.record.dir), sb.spec.disk, runtime.owner(sb.spec),
                                       quota=runtime.capabilities.disk_quota)

    async def connect(self, sb: LiveSandbox, runtime: SandboxRuntime, timeout: float) -> None:
        r = sb.record
        link = AgentLink(r.id, str(Path(r.dir) / LINK_SOCKET),
                         lambda msg, seq: self.messages.on_numbered(sb, msg, seq),
                         lambda: self._on_link_closed(sb, link))
        await link.connect(timeout, lambda: runtime.is_alive(r))
        sb.link = link
        for msg in sb.pending:
            link.send(msg)
        sb.pending.clear()

    # --- agent events ---------------------------------------------------------------------------
    async def _on_link_closed(self, sb: LiveSandbox, link: AgentLink) -> None:
        if sb.link is not link and sb.link is not None:
            return  # a sandbox that was stopped on purpose, and another runs now (a wake, a move)
        sb.link = None
        if sb.deleting or sb.record.ended or sb.activity is Activity.TEMPLATING:
            return
        if sb.activity is Activity.RESTORING:  # `_start` says why it failed, and may boot instead
            sb.fail_code_results(f"the restored sandbox ended{_log_tail(Path(sb.record.dir) / LOG_FILE, 2)}")
            return
        if sb.record.state in HELD:  # stopped on purpose; or, while waking or moving, the new sandbox died
            if sb.record.state == pb.WAKING or sb.record.relaunching:
                sb.state_error = f"the sandbox ended as it started again{_log_tail(Path(sb.record.dir) / LOG_FILE)}"
                sb.restore_state = None
                sb.fail_code_results(sb.state_error)
                self.notify(sb)
            return
        runtime = self.runtimes.get(sb.record.runtime)
        if runtime is not None:
            await runtime.reap(sb.record, timeout=1.0)
            if runtime.is_alive(sb.record):  # the shim lives on: the link alone broke, so reconnect
                log.warning("sandbox_id=%s agent link closed while the sandbox lives; reconnecting", sb.record.id)
                try:
                    await self.connect(sb, runtime, timeout=5.0)
                    return
                except SnapkernelError as e:
                    log.warning("sandbox_id=%s could not reconnect: %s", sb.record.id, e)
        await self.ended_on_its_own(sb, runtime)

    async def ended_on_its_own(self, sb: LiveSandbox, runtime: SandboxRuntime | None) -> None:
        """The sandbox ended on its own: read its exit status, release what it held."""
        r = sb.record
        code = _read_exit_code(Path(r.dir) / EXIT_FILE)
        self.release(sb)
        if runtime is not None:
            await asyncio.to_thread(runtime.cleanup, r)
        tail = _log_tail(Path(r.dir) / LOG_FILE)
        if code is None:
            self.set_state(sb, pb.LOST, f"the sandbox ended without leaving an exit status{tail}")
        elif code in (137, -9):
            r.exit_code = code
            self.set_state(sb, pb.EXITED, (
                f"the sandbox was killed (SIGKILL), most likely for going over its {format_bytes(sb.spec.memory)} "
                f"memory limit: ask for more memory (kernelspec config `memory`){tail}"))
        else:
            r.exit_code = code
            self.set_state(sb, pb.EXITED, f"sandbox exited with code {code}{tail}")
        for q in sb.attached:
            q.put_nowait(None)

    # --- requests -------------------------------------------------------------------------------
    def list(self, include_ended: bool) -> list[pb.Sandbox]:
        return [sb.record.to_pb() for sb in self.live.values() if (include_ended or not sb.record.ended)
                and not sb.internal]

    async def delete(self, sandbox_id: str) -> None:
        sb = self.get(sandbox_id)
        if sb.deleting:
            raise lifecycle.refuse(sandbox_id, "delete", "deleting already")
        sb.activity = lifecycle.Activity.DELETING  # takes over from a snapshot or hibernation under way
        sb.ack()
        # What waits on its kernel (a restore's identity, a snapshot's state) ends now, not at its timeout.
        sb.fail_code_results(f"sandbox {sandbox_id} was deleted")
        r = sb.record
        if sb.waking is not None:
            sb.waking.cancel()
        runtime = self.runtimes.get(r.runtime)
        if not r.ended:
            self.set_state(sb, pb.STOPPING, "deleting")
            self.release(sb)
        if runtime is not None:
            await runtime.stop(r)  # also when it ended: nothing of it may be left running
        if sb.link is not None:
            sb.link.close()
        self.set_state(sb, pb.DELETED, "deleted")
        for q in sb.attached:
            q.put_nowait(None)
        for w in sb.watchers:
            w.put_nowait(None)
        self.live.pop(sandbox_id, None)
        self.db.delete(sandbox_id)
        await asyncio.to_thread(self.workspaces.release, Path(r.dir))
        await asyncio.to_thread(remove_image, r)
        await asyncio.to_thread(shutil.rmtree, r.dir, True)

    def send_to_agent(self, sb: LiveSandbox, msg: pb.AgentMessage, internal: bool = False) -> None:
        self.messages.send(sb, msg, internal)

    async def restart_kernel(self, sandbox_id: str, timeout: float) -> pb.Sandbox:
        sb = self.get(sandbox_id)
        generation = sb.record.kernel_generation
        self.send_to_agent(sb, pb.AgentMessage(restart=True))
        try:
            async with sb.changed:
                await asyncio.wait_for(
                    sb.changed.wait_for(lambda: sb.record.kernel_generation > generation or sb.record.ended),
                    timeout,
                )
        except TimeoutError as e:
            raise TimeoutError_(f"sandbox {sandbox_id}: the kernel did not restart within {timeout:g}s") from e
        if sb.record.ended:
            raise SandboxFailedError(f"sandbox {sandbox_id} ended while restarting: {sb.record.message}")
        return sb.record.to_pb()

    def signal_kernel(self, sandbox_id: str, signum: int) -> None:
        if signum not in (2, 9, 15, 1, 10, 12):
            raise InvalidSpecError(
                f"signal {signum} is not accepted: use SIGINT (2), SIGTERM (15), SIGKILL (9), SIGHUP (1), "
                "SIGUSR1 (10) or SIGUSR2 (12)"
            )
        sb = self.get(sandbox_id)
        if sb.record.state in HELD:  # nothing runs in a hibernated kernel: no reason to wake it for this
            log.info("sandbox_id=%s signal %s ignored: the kernel is %s", sandbox_id, signum, self.state_name(sb))
            return
        self.send_to_agent(sb, pb.AgentMessage(signal=signum))

    # --- snapshots ------------------------------------------------------------------------------
    async def run_in_kernel(self, sb: LiveSandbox, code: str, timeout: float) -> pb.CodeResult:
        return await self.messages.run_code(sb, code, timeout)

    async def snapshot(self, req: pb.CreateSnapshotRequest) -> Snapshot:
        return await self.snapshotter.snapshot(req)

    async def save_state(self, sb: LiveSandbox, inside: str, into_store: bool = False) -> dict[str, Any]:
        return await self.snapshotter.save_state(sb, inside, into_store)

    # --- hibernation ----------------------------------------------------------------------------
    async def hibernate(self, sandbox_id: str) -> pb.Sandbox:
        return await self.hibernator.hibernate(self.get(sandbox_id), "asked to")

    async def wake(self, sandbox_id: str) -> pb.Sandbox:
        return await self.hibernator.wake(self.get(sandbox_id))

    async def move(self, req: pb.MoveSandboxRequest) -> pb.Sandbox:
        return await self.mover.move(self.get(req.id), req)

    def on_kernel_request(self, sb: LiveSandbox, request: pb.KernelRequest) -> None:
        """`%snapshot` or `%move` in the kernel, once its cell has finished."""
        if request.action == "move":
            sb.holding = True  # from now on: the next cell, sent once this one ended, runs after the move
            self.spawn(self.mover.on_kernel_request(sb, request.move))
        elif request.action == "snapshot":
            self.spawn(self.snapshotter.on_kernel_request(sb, request))
        else:
            log.warning("sandbox_id=%s unknown kernel request %r", sb.record.id, request.action)

    # --- start-up and shut-down -----------------------------------------------------------------

    async def readopt(self) -> None:
        """Take back the sandboxes of a previous backend: reconnect the living, mark the rest."""
        for record in self.db.load():
            spec = self.parse(record.spec)
            sb = LiveSandbox(record, spec)
            self.live[record.id] = sb
            runtime = self.runtimes.get(record.runtime)
            if sb.internal:  # a template's half built, or the pool's: made again instead
                with contextlib.suppress(SnapkernelError):
                    await self.delete(record.id)
                continue
            if record.ended:
                continue
            alive = runtime is not None and runtime.is_alive(record)
            if record.state in (pb.HIBERNATING, pb.WAKING, pb.MOVING) and alive and runtime is not None:
                alive = await self._half_way(sb, runtime)
            if record.state in HELD and record.hibernation in ("memory", "state") and not alive:
                # Its image or variables are on disk: it stays hibernated, holding nothing.
                self.set_state(sb, pb.HIBERNATED, "hibernated (backend restarted); the next message wakes it")
                continue
            if record.state in (pb.HIBERNATING, pb.WAKING, pb.MOVING) and alive:
                # Interrupted half-way by the restart. A suspend is undone on the next wake; otherwise it runs.
                state = pb.HIBERNATED if record.hibernation == "suspend" else pb.RUNNING
                if state == pb.RUNNING:
                    record.hibernation = ""
                self.set_state(sb, state, "the backend restarted while it was hibernating or waking")
            if alive and runtime is not None:
                asleep_on_host = record.state == pb.HIBERNATED  # suspended: its GPUs are free meanwhile
                self.scheduler.claim(record.id, spec.cpu, spec.memory, [] if asleep_on_host else record.gpu_indices)
                try:
                    await self.connect(sb, runtime, timeout=5.0)
                    log.info("sandbox_id=%s re-adopted (state=%s)", record.id, STATE_NAMES[record.state])
                    continue
                except SnapkernelError as e:
                    log.warning("sandbox_id=%s could not be re-adopted: %s", record.id, e)
                    self.release(sb)
                    self.set_state(sb, pb.LOST, f"could not reconnect after a backend restart: {e}")
                    continue
            self.scheduler.claim(record.id, spec.cpu, spec.memory, record.gpu_indices)
            await self.ended_on_its_own(sb, runtime)

    async def _half_way(self, sb: LiveSandbox, runtime: SandboxRuntime) -> bool:
        """A sandbox the restart found alive half-way through being saved or started again from what was saved:
        whether it goes on running. One whose image is being written ends once it is (then it is hibernated); a new
        kernel that may not have loaded its variables yet goes (they are loaded again on the next message)."""
        r = sb.record
        starting = r.state == pb.WAKING or r.relaunching
        state_dir = Path(r.dir) / WORKSPACE / STATE_DIR
        if not starting and r.hibernation == "memory" and (Path(r.dir) / IMAGE_DIR).exists():
            # Being written, or written with the sandbox about to end (it ends on its own then).
            writing = runtime.checkpointing(r)
            log.info("sandbox_id=%s its memory image is %s: waiting for the sandbox to end", r.id,
                     "being written" if writing else "there")
            await runtime.ended(r, self.defaults.wake_timeout if writing else SELF_EXIT_WAIT)
        elif starting and r.hibernation == "state" and state_dir.exists():
            log.info("sandbox_id=%s its new kernel may not have its variables yet: starting it again", r.id)
            await runtime.stop(r)
        elif not starting and r.hibernation == "state":  # saved half-way or not at all: it runs on as it was
            await asyncio.to_thread(shutil.rmtree, state_dir, True)
        r.relaunching = False
        if runtime.is_alive(r) and r.hibernation == "memory":  # it runs: its image (whole or not) is of no use
            await asyncio.to_thread(remove_image, r)
        return runtime.is_alive(r)

    async def start_templates(self) -> None:
        """Load the templates an earlier backend built, and build the default spec's if it has none."""
        if not self.defaults.templates:
            return
        await asyncio.to_thread(self.templates.load)
        self.ensure_template(pb.SandboxSpec())

    def ensure_template(self, spec: pb.SandboxSpec) -> None:
        """Build the template of `spec`'s class in the background, unless it has one (or cannot have one)."""
        parsed = self.parse(spec)
        runtime = self.runtimes.get(parsed.runtime)
        if runtime is not None:
            self.templates.ensure(parsed, runtime)

    async def close(self) -> None:
        """Backend stopping: detach from sandboxes, leave them running for the next backend (not templates'
        half built: the next backend would only remove them)."""
        await self.hibernator.stop()
        await self.pool.stop()
        await self.templates.stop()
        for sb in self.live.values():
            if sb.link is not None:
                await sb.link.detach()
            for q in sb.attached:
                q.put_nowait(None)
            for w in sb.watchers:
                w.put_nowait(None)
        for task in list(self._tasks):
            task.cancel()
        self.db.close()
        self.snapshots.close()


def _log_tail(path: Path, lines: int = 8) -> str:
    """The last lines of a sandbox's log, to put in the message a user sees when it ends early."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return ("; last lines of its log:\n" + "\n".join(text)) if text else ""


def _read_exit_code(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
