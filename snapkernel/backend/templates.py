"""Template snapshots: for each class of spec, a memory image of a freshly booted sandbox, so that a new sandbox
of that class is a `runsc restore` of it, with its own identity (`AgentMessages.give_identity`), instead of a
boot. Two modes: a kernel's (agent up, ipykernel started, its first cell and the pre-imports run) and a fan-out
worker's (the agent in worker mode, the pre-imports done, waiting for work; once restored it takes its sandbox's
identity and says hello again, and only then is it leased).

A template is built in the background, one at a time: at start-up for the default kernel spec and then the
default worker class (workers.py), and after a sandbox of another class booted cold. Its key covers everything
that makes an image unusable elsewhere (the runtime's version and settings, snapkernel's, Python's, the limits,
the pre-imports, the mode), so a change builds a new one. Its files are checked against their SHA-256 when the
backend loads it, and by size and time before each use; a template whose check or restore fails is dropped and
built again, and the sandbox boots meanwhile: a kernel or worker never fails because of a template.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import snapkernel
from snapkernel.backend.lifecycle import Activity
from snapkernel.backend.sandbox import MODE_ENV, TEMPLATE_KERNEL_ID
from snapkernel.errors import SnapkernelError, describe
from snapkernel.protocol.spec import ParsedSpec, format_bytes, parse_disk, parse_memory
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.snapshots import memory
from snapkernel.snapshots.store import sha256_file

if TYPE_CHECKING:
    from snapkernel.backend.runtimes.base import SandboxRuntime
    from snapkernel.backend.sandbox import LiveSandbox

log = logging.getLogger(__name__)

MANIFEST = "template.json"
MAX_TEMPLATES = 4  # classes kept; the least recently used goes first
BUILD_TIMEOUT = 120.0
RETRY_AFTER = 60.0  # seconds before a class whose build failed is tried again
KERNEL, WORKER = "kernel", "worker"  # the modes a template holds (see `mode`)


class TemplateHost(Protocol):
    """What templates use of the sandbox manager (sandboxes.py), and all they use."""

    runtimes: dict[str, SandboxRuntime]

    async def create(self, req: pb.CreateSandboxRequest) -> pb.Sandbox: ...

    def get(self, sandbox_id: str) -> LiveSandbox: ...

    async def run_in_kernel(self, sb: LiveSandbox, code: str, timeout: float) -> pb.CodeResult: ...

    async def delete(self, sandbox_id: str) -> None: ...


@dataclass
class Template:
    key: str
    spec: pb.SandboxSpec
    state: str = "building"
    created: float = 0.0
    size: int = 0
    used: int = 0
    last_used: float = 0.0
    files: dict[str, list[int]] = field(default_factory=dict)  # name -> [size, mtime_ns] as verified

    @property
    def mode(self) -> str:
        return WORKER if self.spec.env.get(MODE_ENV) == WORKER else KERNEL

    def to_pb(self) -> pb.Template:
        s = self.spec
        summary = ("fan-out worker, " if self.mode == WORKER else "") + (
            f"cpu {s.cpu:g}, memory {format_bytes(parse_memory(s.memory))}, "
            f"disk {format_bytes(parse_disk(s.disk))}" + (", network" if s.network else ""))
        return pb.Template(key=self.key, spec=summary, state=self.state, created=self.created, size=self.size,
                           used=self.used, mode=self.mode)


@functools.cache
def code_fingerprint() -> str:
    """A hash of snapkernel's own code: a template holds the agent, magics and snapshot code of the snapkernel that
    built it, so another one's (an upgrade, a checkout with changes) builds its own."""
    root = Path(snapkernel.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def mode(spec: ParsedSpec) -> str:
    """What a sandbox of this spec runs, as far as templates go: a kernel (no variables of its own), a plain
    fan-out worker (`worker_spec` of a kernel without variables of its own), or "" (anything else boots)."""
    if not spec.env:
        return KERNEL
    return WORKER if spec.env == {MODE_ENV: WORKER} else ""


def class_spec(spec: ParsedSpec) -> pb.SandboxSpec:
    """The request of a sandbox of `spec`'s class, with exact bytes (a template's own, a pool sandbox's)."""
    return pb.SandboxSpec(runtime=spec.runtime, cpu=spec.cpu, memory=str(spec.memory), disk=str(spec.disk),
                          network=spec.network, hibernate_after=0, env=spec.env)


def eligible(spec: ParsedSpec, runtime: SandboxRuntime) -> bool:
    """Whether a kernel or worker of this spec can start from a template: a memory image of a live sandbox,
    restored with the same mounts and environment (no GPU, no notebook directory, no variables of its own but
    a worker's mode, and the minimal root: an image directory's content could change under a template's key)."""
    caps = runtime.capabilities
    return (caps.memory_snapshots and caps.live_checkpoint and spec.gpu is None and not spec.mount_dir
            and bool(mode(spec)) and not spec.restore_from and not spec.image)


class Templates:
    def __init__(self, root: Path, host: TemplateHost, preimport: list[str], enabled: bool = True) -> None:
        self.root = root
        self.host = host
        self.preimport = list(preimport)
        self.enabled = enabled
        self.templates: dict[str, Template] = {}
        self._builds: set[asyncio.Task[None]] = set()
        self._one_at_a_time = asyncio.Semaphore(1)  # builds wait their turn: never more than one boot at once

    # --- which template a spec gets -------------------------------------------------------------
    def key(self, spec: ParsedSpec, runtime: SandboxRuntime) -> str:
        parts = [runtime.name, runtime.image_settings(), snapkernel.__version__, code_fingerprint(), sys.version,
                 repr(spec.cpu),
                 str(spec.memory), str(spec.disk), str(spec.network), *self.preimport]
        if mode(spec) == WORKER:  # kernels' keys as they were before worker templates
            parts.append("mode=worker")
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]

    def ensure(self, spec: ParsedSpec, runtime: SandboxRuntime) -> Template | None:
        """The template of `spec`'s class, built in the background if there is none (or it failed a while
        ago); None where sandboxes of this spec cannot start from one."""
        if not self.enabled or not eligible(spec, runtime):
            return None
        key = self.key(spec, runtime)
        t = self.templates.get(key)
        if t is None or (t.state.startswith("failed") and time.time() - t.created > RETRY_AFTER):
            self.build_soon(key, class_spec(spec))
        return self.templates[key]

    def take(self, spec: ParsedSpec, runtime: SandboxRuntime) -> tuple[str, Path] | None:
        """The ready template for `spec` (its key and directory), if there is one (`ensure` builds one)."""
        if not self.enabled or not eligible(spec, runtime):
            return None
        t = self.templates.get(self.key(spec, runtime))
        if t is None or t.state != "ready":
            return None
        key = t.key
        if not self._unchanged(t):
            self.failed(key, "its files changed since they were checked")
            return None
        t.used += 1
        t.last_used = time.time()
        return key, self.root / key

    def failed(self, key: str, why: str, taken: float | None = None) -> None:
        """A template's check or restore failed: it is dropped and built again. Once only: the other sandboxes
        that took it (`taken`: when) and restore it at the same time, a fan-out's workers, fail too and find it
        being built already, or built since."""
        t = self.templates.get(key)
        if t is None or t.state != "ready" or (taken is not None and t.created > taken):
            log.info("template %s: %s (it is built again already)", key, why)
            return
        log.warning("template %s dropped: %s; building it again", key, why)
        shutil.rmtree(self.root / key, ignore_errors=True)
        del self.templates[key]
        self.build_soon(key, t.spec)

    async def stop(self) -> None:
        """Stop the builds under way and remove their sandboxes."""
        builds = list(self._builds)
        for task in builds:
            task.cancel()
        await asyncio.gather(*builds, return_exceptions=True)

    def list(self) -> list[pb.Template]:
        return [t.to_pb() for t in sorted(self.templates.values(), key=lambda t: t.key)]

    # --- loading and building -------------------------------------------------------------------
    def load(self) -> None:
        """Templates of an earlier backend whose files still match their SHA-256 (the others are removed).
        Blocking: call off the event loop."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d in sorted(self.root.iterdir()):
            try:
                manifest = json.loads((d / MANIFEST).read_text())
                spec = pb.SandboxSpec()
                spec.ParseFromString(bytes.fromhex(manifest["spec"]))
                t = Template(d.name, spec, "ready", manifest["created"], manifest["size"])
                for name, digest in manifest["sha256"].items():
                    if sha256_file(d / name) != digest:
                        raise ValueError(f"{name} does not match its SHA-256")
                t.files = _stats(d)
                self.templates[t.key] = t
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("template %s removed: %s", d.name, e)
                shutil.rmtree(d, ignore_errors=True)

    def build_soon(self, key: str, request: pb.SandboxSpec) -> None:
        if key in self.templates and self.templates[key].state in ("building", "ready"):
            return
        self.templates[key] = Template(key, request)
        task = asyncio.ensure_future(self._build(key, request))
        self._builds.add(task)
        task.add_done_callback(self._builds.discard)

    async def _build(self, key: str, spec: pb.SandboxSpec) -> None:
        async with self._one_at_a_time:
            await self._build_now(key, spec)

    async def _build_now(self, key: str, spec: pb.SandboxSpec) -> None:
        t = self.templates[key]
        started = time.perf_counter()
        sandbox_id = ""
        partial = self.root / f"{key}.partial"
        try:
            sandbox = await self.host.create(pb.CreateSandboxRequest(
                kernel_id=TEMPLATE_KERNEL_ID + key, spec=spec,
                kernel=pb.KernelConfig(key=secrets.token_hex(32).encode(), signature_scheme="hmac-sha256")))
            sandbox_id = sandbox.id
            sb = self.host.get(sandbox_id)
            async with sb.changed:
                await asyncio.wait_for(sb.changed.wait_for(
                    lambda: sb.record.state == pb.RUNNING or sb.record.ended), BUILD_TIMEOUT)
            if sb.record.state != pb.RUNNING:
                raise SnapkernelError(f"its sandbox did not start: {sb.record.message}")
            # One cell first: IPython compiles and imports what a first cell needs, so the user's does not (a
            # worker runs it as the backend's code, and imports the same modules for the user's functions).
            code = "\n".join(["pass", *(f"import {m}" for m in self.preimport)])
            result = await self.host.run_in_kernel(sb, code, BUILD_TIMEOUT)
            if not result.ok:
                raise SnapkernelError(f"its pre-imports failed: {result.error}")
            runtime = self.host.runtimes[sb.record.runtime]
            await asyncio.to_thread(shutil.rmtree, partial, True)
            partial.mkdir(parents=True)
            with sb.doing(Activity.TEMPLATING, "become a template"):  # its link's end is no surprise then
                await runtime.checkpoint(sb.record, partial / memory.IMAGE, leave_running=False)
            await asyncio.to_thread(shutil.copytree, Path(sb.record.dir) / memory.WORKSPACE,
                                    partial / memory.WORKSPACE, symlinks=True)
            runtime.save_bundle(sb.record, partial)
            await asyncio.to_thread(self._seal, partial, t)
            self._make_room(key)
            await asyncio.to_thread(_replace, partial, self.root / key)
            t.files = await asyncio.to_thread(_stats, self.root / key)
            t.state = "ready"
            log.info("template %s ready (%s) in %.1fs: %s", key, t.to_pb().spec, time.perf_counter() - started,
                     format_bytes(t.size))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            why = describe(e)
            t.state, t.created = f"failed: {why}"[:300], time.time()
            log.warning("template %s could not be built (%ss of its class boot instead): %s", key, t.mode, why)
            await asyncio.to_thread(shutil.rmtree, partial, True)
        finally:
            if sandbox_id:
                with contextlib.suppress(Exception):  # gone already, or the backend is stopping
                    await asyncio.shield(self.host.delete(sandbox_id))

    def _seal(self, d: Path, t: Template) -> None:
        """Write the manifest: the spec, and the SHA-256 of every file, checked when a backend loads it."""
        digests = {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}
        t.created = time.time()
        t.size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        (d / MANIFEST).write_text(json.dumps({"spec": t.spec.SerializeToString().hex(), "created": t.created,
                                              "size": t.size, "sha256": digests}))

    def _make_room(self, key: str) -> None:
        ready = sorted((t for t in self.templates.values() if t.state == "ready" and t.key != key),
                       key=lambda t: t.last_used or t.created)
        for t in ready[:max(0, len(ready) + 1 - MAX_TEMPLATES)]:
            del self.templates[t.key]
            shutil.rmtree(self.root / t.key, ignore_errors=True)

    def _unchanged(self, t: Template) -> bool:
        try:
            return _stats(self.root / t.key) == t.files
        except OSError:
            return False


def _stats(d: Path) -> dict[str, list[int]]:
    return {str(p.relative_to(d)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _replace(partial: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
