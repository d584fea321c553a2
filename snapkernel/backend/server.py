"""`snapkernel backend`: the daemon, as a traitlets Application (`snapkernel backend --help-all`)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from dataclasses import replace
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from traitlets import Bool, Dict, Float, Int, List, Unicode, default, validate
from traitlets.config import Application

from snapkernel import __version__
from snapkernel.backend.auth import TokenInterceptor, ensure_token
from snapkernel.backend.fanout_upstream import UpstreamRelay
from snapkernel.backend.local_placement import LocalPlacement
from snapkernel.backend.placement import Placement
from snapkernel.backend.runtimes.base import (
    BUILTIN_RUNTIMES,
    DEFAULT_PIDS_LIMIT,
    RUNTIME_GROUP,
    RuntimeInfo,
    RuntimeSettings,
    RuntimeUnusable,
    SandboxRuntime,
)
from snapkernel.backend.sandbox import Defaults
from snapkernel.backend.sandboxes import SandboxManager
from snapkernel.backend.scheduler import Scheduler
from snapkernel.backend.service import BackendService
from snapkernel.errors import InvalidSpecError, SnapkernelError
from snapkernel.host.gpus import inventory
from snapkernel.host.resources import HostResources
from snapkernel.protocol.connection import GRPC_OPTIONS, default_state_dir, grpc_target, token_path
from snapkernel.protocol.spec import check_runtime_name, parse_disk, parse_memory, parse_size, spec_from_config
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.protocol.v1 import backend_pb2_grpc as pb_grpc
from snapkernel.snapshots.shared import SharedStore, parse_url
from snapkernel.snapshots.staging import DEFAULT_BUFFER_BYTES, DEFAULT_BUFFERS, check_staging

log = logging.getLogger(__name__)


class BackendApp(Application):
    name = "snapkernel-backend"
    description = "The snapkernel backend daemon: runs kernels in sandboxes and serves them over gRPC."
    version = __version__

    listen = Unicode(help="Address to serve on: unix:///path.sock or HOST:PORT. "
                          "Default: unix socket `backend.sock` in the state dir.").tag(config=True)
    state_dir = Unicode(help="Where sandboxes, the database and the token live "
                             "(default $SNAPKERNEL_STATE_DIR or ~/.local/state/snapkernel).").tag(config=True)
    runtime = Unicode("", help=f"Default runtime for sandboxes that do not name one: {', '.join(BUILTIN_RUNTIMES)} "
                               "or one a plug-in adds. "
                               "Default: gvisor where runsc works, else process (and it says so).").tag(config=True)
    runsc = Unicode("", help="Path of the runsc binary (default: `runsc` on PATH).").tag(config=True)
    platform = Unicode("", help="gVisor platform: systrap, ptrace or kvm. Default: ptrace for CPU sandboxes (an idle "
                                "one uses no CPU; systrap keeps each ~3% of a core busy with runsc builds before "
                                "mid-2026), runsc's own (systrap) for GPU sandboxes. Memory snapshots record theirs "
                                "and restore under it.").tag(config=True)
    default_cpu = Float(1.0, help="Cores for a sandbox that does not ask (e.g. 2 or 0.5).").tag(config=True)
    default_memory = Unicode("4Gi", help="Memory for a sandbox that does not ask (e.g. '8Gi').").tag(config=True)
    default_disk = Unicode("10Gi", help="Workspace quota for a sandbox that does not ask (kernelspec key `disk`, "
                                        "e.g. '50Gi').").tag(config=True)
    sandbox_uid = Int(1000, help="User id gvisor kernels run as inside their sandbox (never 0).").tag(config=True)
    sandbox_gid = Int(1000, help="Group id gvisor kernels run as inside their sandbox.").tag(config=True)
    sandbox_ro_paths = List(Unicode(), help="Host paths every gvisor sandbox sees read-only besides the system "
                                            "directories and the agent's Python (e.g. a shared dataset "
                                            "directory). An admin's setting: notebook users cannot add any."
                            ).tag(config=True)
    pids_limit = Int(DEFAULT_PIDS_LIMIT, help="Processes one sandbox may hold at once; past it `fork` fails with "
                                              "EAGAIN in the kernel (a fork bomb stops there). gvisor sandboxes "
                                              "get fewer when small: 16 + one per 64 MiB of memory past 640 MiB "
                                              "(a forked process costs gVisor far more memory than Linux), "
                                              "enforced by gVisor's Sentry; process sandboxes get it (threads "
                                              "counted too) through their cgroup v2 group where they have one. "
                                              "64 to 65536.").tag(config=True)
    cpu_overcommit = Float(4.0, help="CPU overcommit: sandboxes may be given up to this many times the host's "
                                     "cores in total (each is still limited to the cores it asked for). Default 4: "
                                     "notebooks idle most of the time, so 8 one-core kernels start on a 2-core host; "
                                     "1 gives out no more cores than the host has. A sandbox that would pass the "
                                     "limit is refused, naming it; `snapkernel status` shows it.").tag(config=True)
    memory_overcommit = Float(1.0, help="Memory overcommit: how many times the host's memory may be given out in "
                                        "total (default 1 = never overcommitted: every sandbox can use all of "
                                        "its memory limit at once; more, e.g. 1.5, packs more kernels that use "
                                        "far less than their limit, and one that goes over its share is killed "
                                        "by the OOM killer). GPUs are never shared.").tag(config=True)
    start_timeout = Float(60.0, help="Seconds a sandbox may take to start its agent.").tag(config=True)
    hibernate_after_gpu = Float(600.0, help="Idle seconds before a GPU kernel hibernates, unless its kernelspec "
                                            "sets `hibernate_after`; 0 = never.").tag(config=True)
    hibernate_after_cpu = Float(0.0, help="Idle seconds before a CPU kernel hibernates, unless its kernelspec "
                                          "sets `hibernate_after`; 0 = never.").tag(config=True)
    gpu_offload = Bool(True, help="Hibernating GPU kernels on the process runtime: move torch tensors out through "
                                  "pinned host buffers (fast) before the CUDA driver's checkpoint moves the rest. "
                                  "Off: the driver moves everything (slower; for code that keeps raw GPU pointers)."
                       ).tag(config=True)
    gpu_offload_buffers = Int(DEFAULT_BUFFERS, help="The GPU offload's pinned staging buffers: how many (1 to 16; "
                                                    "2 or more overlap the GPU's copies with the CPU's). A kernel "
                                                    "allocates them on its first hibernation and keeps them; they "
                                                    "count against its memory limit on top of its `memory`."
                              ).tag(config=True)
    gpu_offload_buffer_size = Unicode("64Mi", help="The size of each GPU offload staging buffer, e.g. '64Mi' or "
                                                   "'256Mi' (1Mi to 1Gi, a multiple of 256 bytes; a power of two "
                                                   "wastes nothing in torch's pinned allocator).").tag(config=True)
    wake_timeout = Float(600.0, help="Seconds a waking kernel may wait for its GPU and take to come back.").tag(
        config=True)
    templates = Bool(True, help="New gvisor kernels restore a template (a memory image of a freshly booted "
                                "sandbox of their class of spec, built in the background) instead of booting: "
                                "about half a second instead of two. Off: every kernel boots.").tag(config=True)
    warm_pool = Int(1, help="Sandboxes of the default spec kept running, restored from its template, for the next "
                            "kernel requests: each is handed out in milliseconds and the pool refills in the "
                            "background. They count against capacity (the pool fills only where there is room, "
                            "and gives its room first to a request that needs it). 0 to 16; needs templates."
                    ).tag(config=True)
    warm_pool_classes = List(Dict(), help="Warm pools for other classes of spec than the default: each a "
                                          "kernelspec's snapkernel config (cpu, memory, disk, runtime, network) "
                                          "and `size`, the sandboxes kept ready (1 to 16), e.g. "
                                          "--BackendApp.warm_pool_classes='{\"memory\": \"8Gi\", \"size\": 1}'. "
                                          "Kernels with a GPU, an image or variables of their own boot: no pool "
                                          "for them.").tag(config=True)
    template_preimport = List(Unicode(), help="Modules templates import before their image is taken, so "
                                              "kernels start with them loaded (e.g. numpy pandas).").tag(config=True)
    fanout_idle_timeout = Float(300.0, help="Seconds a warm fan-out worker may sit idle before it is stopped "
                                            "(e.g. 60).").tag(config=True)
    orphan_timeout = Float(3600.0, help="Seconds a kernel's sandbox may have no client attached (its Jupyter "
                                        "server went away without shutting it down) before it is hibernated, "
                                        "or removed where it cannot hibernate; 0 = never. Fan-out workers are "
                                        "not affected.").tag(config=True)
    remove_leftovers = Bool(False, help="At start, after re-adoption, remove every sandbox a previous backend "
                                        "left (snapshots stay). For a backend whose kernels cannot outlive it, "
                                        "like `snapkernel lab`'s: no Jupyter kernel can own them.").tag(config=True)
    remove_on_stop = Bool(False, help="On a clean stop (SIGTERM, SIGINT), remove every sandbox instead of leaving "
                                      "them running for the next backend to re-adopt (snapshots stay). Set by "
                                      "`snapkernel lab`.").tag(config=True)
    stop_on_stdin_eof = Bool(False, help="Stop cleanly when stdin reaches end of file: a parent holding the other "
                                         "end of a pipe takes the backend with it however it dies. Set by "
                                         "`snapkernel lab`.").tag(config=True)
    placement = Unicode("local", help="Where sandboxes run: `local` (this host), or `ray`: on the nodes of the Ray "
                                      "cluster at --ray-address, each running a backend daemon of its own that "
                                      "this one (the front) starts there, places sandboxes on and proxies to."
                        ).tag(config=True)
    ray_address = Unicode("", help="--placement ray: the Ray cluster's address, e.g. 127.0.0.1:6379 (`ray start "
                                   "--head` prints it; default $RAY_ADDRESS).").tag(config=True)
    node_args = List(Unicode(), help="--placement ray: more `snapkernel backend` arguments for every node's daemon, "
                                     "e.g. --BackendApp.node_args=--BackendApp.hibernate_after_cpu=600 (a node's "
                                     "own come from SNAPKERNEL_NODE_ARGS in its raylet's environment)."
                     ).tag(config=True)
    replace_lost = Bool(False, help="--placement ray: a sandbox whose node is lost starts again on another node "
                                    "from its newest snapshot (same sandbox id; the notebook sees its kernel come "
                                    "back as of that snapshot) instead of turning `lost`.").tag(config=True)
    node_lost_after = Float(30.0, help="--placement ray: seconds a node's daemon may not answer (its Ray node "
                                       "alive) before its sandboxes are lost; a node Ray declares dead is lost at "
                                       "once.").tag(config=True)
    placement_timeout = Float(10.0, help="--placement ray: seconds a new sandbox may wait for a node with room "
                                         "before it is refused, naming what each node has free.").tag(config=True)
    fanout_upstream = Unicode("", help="A node of a cluster: fan-out jobs of this daemon's kernels go to the front "
                                       "at this address (set by the front), so their workers spread over all "
                                       "nodes; --clone jobs stay here.").tag(config=True)
    fanout_upstream_token_file = Unicode("", help="The front's token, for --BackendApp.fanout_upstream (a 0600 "
                                                  "file).").tag(config=True)
    snapshot_store = Unicode("", help="Shared storage for snapshots, for daemons on several nodes: "
                                      "file:///absolute/dir (a directory every node mounts, e.g. an NFS volume or "
                                      "a PVC) or s3://bucket/prefix (credentials, region and endpoint from "
                                      "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or "
                                      "AWS_DEFAULT_REGION and AWS_ENDPOINT_URL, e.g. http://minio:9000). Snapshots "
                                      "taken here are uploaded to it, those resumed here are fetched from it into "
                                      "the state dir's store (a cache), listings show both. Checked at start: a "
                                      "store that cannot be used stops the daemon. Default: none (this node's "
                                      "store only). Needs obstore (the `cluster` extra).").tag(config=True)
    tls_cert = Unicode("", help="PEM certificate file: serve TCP addresses with TLS.").tag(config=True)
    tls_key = Unicode("", help="PEM private key file for --tls-cert.").tag(config=True)

    log_level = 20  # type: ignore[assignment]

    aliases = {
        "listen": "BackendApp.listen",
        "state-dir": "BackendApp.state_dir",
        "runtime": "BackendApp.runtime",
        "runsc": "BackendApp.runsc",
        "log-level": "Application.log_level",
        "tls-cert": "BackendApp.tls_cert",
        "tls-key": "BackendApp.tls_key",
        "fanout-idle-timeout": "BackendApp.fanout_idle_timeout",
        "placement": "BackendApp.placement",
        "ray-address": "BackendApp.ray_address",
    }

    @default("state_dir")
    def _default_state_dir(self) -> str:
        return str(default_state_dir())

    @default("listen")
    def _default_listen(self) -> str:
        return f"unix://{Path(self.state_dir).absolute() / 'backend.sock'}"

    @validate("sandbox_uid", "sandbox_gid")
    def _check_ids(self, proposal: dict[str, Any]) -> int:
        value = int(proposal["value"])
        if not 0 < value < 2**31:
            raise InvalidSpecError(f"{proposal['trait'].name} {value} is not valid: use an id from 1 to 2147483647 "
                                   "(kernels never run as root)")
        return value

    @validate("pids_limit")
    def _check_pids_limit(self, proposal: dict[str, Any]) -> int:
        value = int(proposal["value"])
        if not 64 <= value <= 65536:
            raise InvalidSpecError(f"pids_limit {value} is not valid: use 64 to 65536 processes and threads")
        return value

    @validate("warm_pool")
    def _check_warm_pool(self, proposal: dict[str, Any]) -> int:
        if not 0 <= int(proposal["value"]) <= 16:
            raise InvalidSpecError(f"warm_pool {proposal['value']} is not valid: use 0 to 16 sandboxes")
        return int(proposal["value"])

    @validate("gpu_offload_buffers")
    def _check_offload_buffers(self, proposal: dict[str, Any]) -> int:
        try:
            check_staging(int(proposal["value"]), DEFAULT_BUFFER_BYTES)
        except ValueError as e:
            raise InvalidSpecError(f"gpu_offload_buffers: {e}") from e
        return int(proposal["value"])

    @validate("gpu_offload_buffer_size")
    def _check_offload_buffer_size(self, proposal: dict[str, Any]) -> str:
        try:
            check_staging(DEFAULT_BUFFERS, parse_size(proposal["value"], "gpu_offload_buffer_size", 0, "'64Mi'"))
        except ValueError as e:
            raise InvalidSpecError(f"gpu_offload_buffer_size {proposal['value']!r}: {e}") from e
        return str(proposal["value"])

    @validate("warm_pool_classes")
    def _check_warm_pool_classes(self, proposal: dict[str, Any]) -> list[dict[str, Any]]:
        for cls in proposal["value"]:
            pool_class(cls)
        return list(proposal["value"])

    @validate("template_preimport")
    def _check_preimport(self, proposal: dict[str, Any]) -> list[str]:
        for name in proposal["value"]:
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
                raise InvalidSpecError(f"template_preimport {name!r} is not a module name: use dotted names such "
                                       "as numpy or os.path")
        return list(proposal["value"])

    @validate("placement")
    def _check_placement(self, proposal: dict[str, Any]) -> str:
        if proposal["value"] not in ("local", "ray"):
            raise InvalidSpecError(f"placement {proposal['value']!r} is not valid: use local (this host) or ray "
                                   "(the nodes of a Ray cluster, with --ray-address)")
        return str(proposal["value"])

    @validate("snapshot_store")
    def _check_snapshot_store(self, proposal: dict[str, Any]) -> str:
        if proposal["value"]:
            parse_url(proposal["value"])  # the URL's form now; the store itself is opened at start
        return str(proposal["value"])

    @validate("runtime")
    def _check_runtime(self, proposal: dict[str, Any]) -> str:
        return check_runtime_name(proposal["value"]) if proposal["value"] else ""

    def build_runtimes(self, state: Path, driver: str) -> tuple[dict[str, SandboxRuntime], list[RuntimeInfo]]:
        """The runtimes that work here, and a line for each that does not. They are the entry points of the
        `snapkernel.runtimes` group (as jupyter_client finds provisioners), each built from these settings."""
        settings = RuntimeSettings(state_dir=state, driver_version=driver, pids_limit=self.pids_limit,
                                   runsc=self.runsc, platform=self.platform, sandbox_uid=self.sandbox_uid,
                                   sandbox_gid=self.sandbox_gid, ro_paths=tuple(self.sandbox_ro_paths))
        found = {ep.name: ep for ep in reversed(list(entry_points(group=RUNTIME_GROUP)))}  # the first one wins
        if not found:  # not installed (a bare source tree): the package's own runtimes
            log.warning("no %s entry points (snapkernel is not installed): using the built-in runtimes",
                        RUNTIME_GROUP)
            found = {n: EntryPoint(n, v, RUNTIME_GROUP) for n, v in BUILTIN_RUNTIMES.items()}
        # The known runtimes first, in their usual order (listings and messages name them so), then others.
        builtin = list(BUILTIN_RUNTIMES)
        order = sorted(found, key=lambda n: (builtin.index(n) if n in builtin else len(builtin), n))
        runtimes: dict[str, SandboxRuntime] = {}
        missing: list[RuntimeInfo] = []
        for name in order:
            try:
                cls = found[name].load()
                if not (isinstance(cls, type) and issubclass(cls, SandboxRuntime)):
                    raise TypeError(f"{found[name].value} is not a SandboxRuntime")
                runtimes[name] = cls.from_settings(settings)
            except RuntimeUnusable as e:
                missing.append(e.info)
            except Exception as e:  # a broken plug-in runtime is reported, never the end of the backend
                log.exception("runtime %s (entry point %s) could not be loaded", name, found[name].value)
                missing.append(RuntimeInfo(name, False, "", f"could not be loaded: {e}"))
        return runtimes, missing

    async def local_placement(self, state: Path) -> tuple[Placement, str]:
        """This host's sandboxes: its runtimes, GPUs and scheduler."""
        shared = await self.shared_store()
        gpus, driver, why = await asyncio.to_thread(inventory)
        log.info("GPUs: %s", ", ".join(f"{g.index}:{g.name}" for g in gpus) or why)
        runtimes, missing = await asyncio.to_thread(self.build_runtimes, state, driver)  # runs runsc to probe it
        default_runtime = self.runtime or ("gvisor" if "gvisor" in runtimes else "process")
        if default_runtime not in runtimes:
            why_not = next((m.detail for m in missing if m.name == default_runtime), "no such runtime")
            raise InvalidSpecError(f"runtime {default_runtime!r} is not available here ({why_not}); "
                                   f"use one of {', '.join(runtimes)}")
        if default_runtime == "process":
            log.warning("default runtime is `process`: kernels run as plain processes, NOT isolated by gVisor (%s)",
                        "; ".join(m.detail for m in missing) or "chosen by --runtime")
        for name in ("cpu_overcommit", "memory_overcommit"):
            if not 1 <= getattr(self, name) <= 64:
                raise InvalidSpecError(f"--BackendApp.{name}={getattr(self, name):g} is not valid: use a factor "
                                       "from 1 (no overcommit) to 64")
        scheduler = Scheduler(HostResources.local(gpus), self.cpu_overcommit, self.memory_overcommit)
        manager = SandboxManager(state, runtimes, scheduler, Defaults(
            runtime=default_runtime, cpu=self.default_cpu, memory=parse_memory(self.default_memory),
            disk=parse_disk(self.default_disk),
            start_timeout=self.start_timeout, hibernate_after_gpu=self.hibernate_after_gpu,
            hibernate_after_cpu=self.hibernate_after_cpu, gpu_offload=self.gpu_offload,
            gpu_offload_buffers=self.gpu_offload_buffers,
            gpu_offload_buffer_bytes=parse_size(self.gpu_offload_buffer_size, "gpu_offload_buffer_size", 0, "'64Mi'"),
            wake_timeout=self.wake_timeout, templates=self.templates,
            template_preimport=tuple(self.template_preimport), warm_pool=self.warm_pool,
            warm_pool_classes=tuple(pool_class(cls) for cls in self.warm_pool_classes)),
            known_runtimes=[*runtimes, *(m.name for m in missing)], shared_store=shared)

        def infos() -> list[RuntimeInfo]:
            quota = manager.workspaces.describe()
            found = [r.probe() for r in runtimes.values()]
            return [replace(i, detail=f"{i.detail}; {quota}") for i in found] + missing

        upstream = (UpstreamRelay(self.fanout_upstream, self.fanout_upstream_token_file)
                    if self.fanout_upstream else None)
        placement = LocalPlacement(manager, infos, default_runtime, fanout_idle_timeout=self.fanout_idle_timeout,
                                   orphan_timeout=self.orphan_timeout, fanout_upstream=upstream)
        return placement, default_runtime

    async def shared_store(self) -> SharedStore | None:
        """The shared snapshot store, opened with one real request: one that cannot be used stops the daemon."""
        if not self.snapshot_store:
            return None
        shared = await asyncio.to_thread(SharedStore.open, self.snapshot_store)
        log.info("snapshots are shared through %s", shared.url)
        return shared

    async def ray_placement(self, state: Path, token: str) -> tuple[Placement, str]:
        """The front of a Ray cluster: sandboxes go to its nodes' daemons (snapkernel/backend/cluster)."""
        from snapkernel.backend.cluster.ray_placement import FrontSettings, RayPlacement

        address = self.ray_address or os.environ.get("RAY_ADDRESS", "")
        if not address:
            raise InvalidSpecError("--placement ray needs the Ray cluster's address: --ray-address HOST:PORT (or "
                                   "RAY_ADDRESS), e.g. 127.0.0.1:6379")
        node_args = ["--BackendApp.warm_pool=0", *self.node_args]  # a pool would hold room Ray does not know of
        shared = await self.shared_store() is not None  # checked here too: a bad one stops the front at once
        if shared:
            node_args.append(f"--BackendApp.snapshot_store={self.snapshot_store}")
        if self.runtime:
            node_args.append(f"--BackendApp.runtime={self.runtime}")
        settings = FrontSettings(
            ray_address=address, state_dir=state, default_runtime=self.runtime, default_cpu=self.default_cpu,
            default_memory=parse_memory(self.default_memory), default_disk=parse_disk(self.default_disk),
            node_args=node_args, front_address=grpc_target(self.listen), front_token=token,
            placement_timeout=self.placement_timeout, node_lost_after=self.node_lost_after,
            replace_lost=self.replace_lost, shared_store=shared)
        placement = RayPlacement(settings)
        return placement, placement.default_runtime

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        state = Path(self.state_dir).absolute()
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state, 0o700)
        token = ensure_token(token_path(state))
        if self.placement == "ray":
            placement, default_runtime = await self.ray_placement(state, token)
        else:
            placement, default_runtime = await self.local_placement(state)
        removed = await placement.start(remove_leftovers=self.remove_leftovers)
        if removed:
            # On stdout: `snapkernel lab` shows this line on its terminal.
            print(f"snapkernel: removed {plural(removed, 'sandbox')} left by an earlier lab that did not "
                  "stop cleanly (snapshots are kept)", flush=True)

        server = grpc.aio.server(interceptors=[TokenInterceptor(token)], options=GRPC_OPTIONS)
        pb_grpc.add_BackendServicer_to_server(BackendService(placement), server)
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        target = grpc_target(self.listen)
        if target.startswith("unix://"):
            sock = Path(target[len("unix://"):])
            sock.parent.mkdir(parents=True, exist_ok=True)
            sock.unlink(missing_ok=True)
            old = os.umask(0o177)
            try:
                server.add_insecure_port(target)
            finally:
                os.umask(old)
        elif self.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes())])
            server.add_secure_port(target, creds)
        else:
            if not target.startswith(("127.", "localhost:", "[::1]:")):
                log.warning("serving %s without TLS: the token travels in clear text (set --tls-cert)", target)
            server.add_insecure_port(target)
        await server.start()
        for service in ("", "snapkernel.v1.Backend"):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("snapkernel backend %s serving on %s (state dir %s, default runtime %s)",
                 __version__, target, state, default_runtime)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if self.stop_on_stdin_eof:
            stop_on_eof(loop, stop)
        if ready is not None:
            ready.set()
        print(f"snapkernel backend serving on {target}", flush=True)
        await stop.wait()
        if not self.remove_on_stop:
            log.info("stopping: sandboxes keep running and are re-adopted at the next start")
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2.0)
        removed = await placement.stop(remove_sandboxes=self.remove_on_stop)
        if self.remove_on_stop:
            log.info("stopping: removed %s", plural(removed, "sandbox"))

    def start(self) -> None:
        logging.basicConfig(level=self.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        try:
            asyncio.run(self.serve())
        except SnapkernelError as e:
            self.log.error("%s", e)
            self.exit(2)


def pool_class(cls: Any) -> tuple[pb.SandboxSpec, int]:
    """A `warm_pool_classes` entry as (its spec, its size); InvalidSpecError naming the entry otherwise."""
    if not isinstance(cls, dict):
        raise InvalidSpecError(f"warm_pool_classes entry {cls!r} is not valid: give a kernelspec's snapkernel "
                               'config with a size, e.g. {"memory": "8Gi", "size": 1}')
    config = dict(cls)
    size = config.pop("size", None)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 16:
        raise InvalidSpecError(f"warm_pool_classes entry {cls!r}: size {size!r} is not valid: use 1 to 16 sandboxes")
    booting = sorted(k for k in ("gpu", "image", "env", "restore_from", "mount_notebook_dir") if config.get(k))
    if booting:
        raise InvalidSpecError(f"warm_pool_classes entry {cls!r}: kernels with {', '.join(booting)} boot (they "
                               "start from no template), so they have no warm pool; use cpu, memory, disk, runtime "
                               "and network")
    try:
        return spec_from_config(config), size
    except InvalidSpecError as e:
        raise InvalidSpecError(f"warm_pool_classes entry {cls!r}: {e}") from e


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("x") else f"{n} {word}s"


def stop_on_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set `stop` once stdin reaches end of file (its writer is gone), reading and dropping what comes."""
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            log.info("stdin closed: stopping")
            stop.set()

    try:
        os.set_blocking(fd, False)
        loop.add_reader(fd, readable)
    except (OSError, ValueError) as e:  # /dev/null or a file: no end to wait for
        log.warning("stop_on_stdin_eof: stdin cannot be watched (%s); ignored", e)


def main(argv: list[str] | None = None) -> None:
    try:
        BackendApp.launch_instance(argv=argv)
    except SnapkernelError as e:  # a bad setting, refused while the configuration loads
        print(f"snapkernel backend: {e}", file=sys.stderr)
        sys.exit(2)
