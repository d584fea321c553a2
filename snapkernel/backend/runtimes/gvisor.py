"""The `gvisor` runtime: each sandbox is a gVisor sandbox started with `runsc run` under the shim.

The root filesystem is, by default, a minimal one (`rootfs.py`: the host's system directories and the
agent's Python read-only, a generated /etc), or an image directory; the kernel runs as an unprivileged
user; `/tmp` and the sandbox's workspace are writable; the network is `none` unless the spec asks for it.
CPU, memory and pid limits go in the OCI spec (runsc applies them).
What the installed runsc can do (platform, checkpoint flags, nvproxy and the host driver) is detected once
at start-up and shown by `snapkernel status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from jupyter_core.paths import jupyter_runtime_dir

from snapkernel.backend.runtimes import rootfs
from snapkernel.backend.runtimes.base import (
    DEFAULT_PIDS_LIMIT,
    SELF_EXIT_WAIT,
    Launch,
    RuntimeCapabilities,
    RuntimeInfo,
    RuntimeSettings,
    RuntimeUnusable,
    SandboxRuntime,
)
from snapkernel.backend.runtimes.rootfs import SandboxUser, bind
from snapkernel.backend.sandbox_db import SandboxRecord
from snapkernel.errors import RuntimeUnavailableError, SandboxFailedError, StateError
from snapkernel.protocol.spec import ParsedSpec

log = logging.getLogger(__name__)

# The host's pids cgroup counts the Sentry's own threads and, under ptrace, several stub tasks per sandbox
# process (about 5.4 per process measured, 1 under systrap): reaching it kills the whole sandbox, so it is only
# a backstop well above the per-sandbox limit the Sentry enforces (see snapkernel.agent.sandbox_user).
HOST_TASKS_PER_PROCESS = 8
HOST_TASKS_BASE = 1024
# A forked process costs the Sentry far more memory than Linux: a sleeping child of an ipykernel 27-30 MiB
# (measured at 512Mi, 1Gi and 4Gi; copy-on-write breaks copy 2 MiB units), and reaching the memory limit kills
# the whole sandbox. At 128 tasks a 4Gi sandbox's fork bomb peaked at 85% of its memory (and was killed on CI);
# at 64, 512Mi and 1Gi sandboxes were killed. How many of its tasks a bomb gets varies (pids.current is 9-15
# at start), so the limit is BASE_TASKS, which could all be forks and are paid for by KERNEL_MEMORY (with the
# kernel's own ~75 MiB), plus one per MEMORY_PER_TASK (about twice a child's cost) of the rest.
BASE_TASKS = 16
KERNEL_MEMORY = 640 << 20
MEMORY_PER_TASK = 64 << 20
# The first runsc build that checkpoints a live ipykernel (Debian trixie's 0.0~20240729.0).
SNAPSHOT_MIN_VERSION = 20240729
_VERSION_RE = re.compile(r"runsc version (?:release-)?(?:0\.0~)?(\d{8})")


@dataclass
class RunscFeatures:
    path: str
    version: str = ""
    build_date: int = 0
    platform: str = ""
    checkpoint_flags: set[str] = field(default_factory=set)
    restore_flags: set[str] = field(default_factory=set)
    nvproxy: bool = False
    nvproxy_drivers: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def cuda_checkpoint(self) -> bool:
        """This runsc moves GPU memory into its checkpoints itself (builds from mid-2026 on)."""
        return "cuda-checkpoint-path" in self.checkpoint_flags

    @property
    def can_snapshot_live_kernel(self) -> bool:
        return self.build_date >= SNAPSHOT_MIN_VERSION

    def nvproxy_problem(self, driver: str) -> str:
        """Why GPU sandboxes cannot run under this runsc with this driver ("" when they can)."""
        if not self.nvproxy:
            return f"runsc {self.version} has no --nvproxy"
        if driver and self.nvproxy_drivers and driver not in self.nvproxy_drivers:
            return (f"runsc {self.version} does not support NVIDIA driver {driver} (nvproxy knows "
                    f"{', '.join(self.nvproxy_drivers[:3])}...)")
        return ""


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"<{e}>"
    return out.stdout + out.stderr


def _in_memory(path: Path) -> bool:
    """Whether `path` is on a tmpfs (a move's image: no O_DIRECT, and no need for it)."""
    real, best, fstype = os.path.realpath(path), "", ""
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            point = fields[1]
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, fstype = point, fields[2]
    return fstype in ("tmpfs", "ramfs")


def detect(path: str) -> RunscFeatures:
    f = RunscFeatures(path=path)
    text = _run([path, "--version"])
    m = _VERSION_RE.search(text)
    if not m:
        f.error = f"`{path} --version` said: {text.strip()[:200]}"
        return f
    f.version = text.split("\n")[0].removeprefix("runsc version ").strip()
    f.build_date = int(m.group(1))
    flags = _run([path, "flags"])
    pm = re.search(r'-platform string.*?\(default "(\w+)"\)', flags, re.S)
    f.platform = pm.group(1) if pm else "ptrace"
    f.nvproxy = "-nvproxy\n" in flags or "-nvproxy " in flags
    help_checkpoint = _run([path, "help", "checkpoint"])
    f.checkpoint_flags = {name for name in ("compression", "direct", "exclude-committed-zero-pages", "leave-running",
                                            "cuda-checkpoint-path") if f"-{name}" in help_checkpoint}
    help_restore = _run([path, "help", "restore"])
    f.restore_flags = {name for name in ("direct",) if f"-{name}" in help_restore}
    if f.nvproxy:
        drivers = _run([path, "nvproxy", "list-supported-drivers"]).split()
        f.nvproxy_drivers = [d for d in drivers if re.fullmatch(r"\d+\.\d+(\.\d+)?", d)]
    return f


def find_runsc(configured: str = "") -> str | None:
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("runsc")


ROOTFS = "rootfs"  # in the sandbox's directory: the skeleton of its minimal root filesystem
PLATFORM = "dev.snapkernel.platform"  # OCI annotation: the gVisor platform the sandbox runs under
RLIM_INFINITY = 2**64 - 1  # OCI's rlimits are uint64; this one is RLIM_INFINITY


class GvisorRuntime(SandboxRuntime):
    name = "gvisor"

    def __init__(self, runsc: str, state_dir: Path, driver_version: str = "", platform: str = "", *,
                 user: SandboxUser | None = None, ro_paths: list[str] | None = None,
                 pids_limit: int = DEFAULT_PIDS_LIMIT) -> None:
        super().__init__()
        self.pids_limit = pids_limit
        self.user = user or SandboxUser()
        self.ro_paths = rootfs.check_ro_paths(ro_paths or [])
        self.features = detect(runsc)
        self.state_dir = state_dir
        self.root = state_dir / "runsc"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.driver_version = driver_version
        self.platform = platform  # "" = ptrace for CPU sandboxes, runsc's own (systrap) for GPU ones

    @classmethod
    def from_settings(cls, settings: RuntimeSettings) -> Self:
        runsc = find_runsc(settings.runsc)
        if runsc is None:
            raise RuntimeUnusable(RuntimeInfo(cls.name, False, "", "runsc not found: `make install` as root installs "
                                              "it, or set --BackendApp.runsc=PATH"))
        runtime = cls(runsc, settings.state_dir, settings.driver_version, settings.platform,
                      ro_paths=list(settings.ro_paths), user=SandboxUser(settings.sandbox_uid, settings.sandbox_gid),
                      pids_limit=settings.pids_limit)
        if not runtime.available:
            raise RuntimeUnusable(runtime.probe())
        return runtime

    def image_settings(self) -> str:
        return (f"{self.features.version} {self.platform_for(False)} uid={self.user.uid}:{self.user.gid} "
                f"pids={self.pids_limit} ro={','.join(self.ro_paths)}")

    @property
    def available(self) -> bool:
        return not self.features.error

    @property
    def capabilities(self) -> RuntimeCapabilities:
        # Computed from the detected features each time (cheap): what this runsc build can do.
        f = self.features
        return RuntimeCapabilities(checkpoint=True, live_checkpoint=f.can_snapshot_live_kernel, restore=True,
                                   gpu_checkpoint=f.cuda_checkpoint, clone=True, disk_quota=True, version=f.version)

    def probe(self) -> RuntimeInfo:
        f = self.features
        if f.error:
            return RuntimeInfo(self.name, False, "", f.error)
        gpu = f.nvproxy_problem(self.driver_version) if self.driver_version else "no NVIDIA driver here"
        snap = ("yes" if f.can_snapshot_live_kernel else
                f"no: runsc {f.version} cannot checkpoint a live ipykernel; `make install` as root installs "
                "the 2024-07 build")
        platforms = (self.platform or f"{self.platform_for(False)} ({self.platform_for(True)} for GPU sandboxes)")
        detail = (f"{f.path}; platform {platforms}; memory snapshots of live kernels: {snap}; "
                  f"checkpoint flags: {', '.join(sorted(f.checkpoint_flags)) or 'none'}; "
                  f"GPUs (nvproxy): {('no: ' + gpu) if gpu else 'yes'}; root filesystem: minimal (system directories "
                  f"and Python read-only{', ' + ', '.join(self.ro_paths) if self.ro_paths else ''}); kernels run as "
                  f"uid {self.user.uid}; at most {self.pids_limit} processes each (fewer in small sandboxes: "
                  f"{BASE_TASKS} + one per {MEMORY_PER_TASK >> 20} MiB of memory past {KERNEL_MEMORY >> 20} MiB)")
        return RuntimeInfo(self.name, True, f.version, detail)

    def check(self, spec: ParsedSpec) -> None:
        if spec.gpu is None:
            return
        problem = self.features.nvproxy_problem(self.driver_version)
        if problem:
            raise RuntimeUnavailableError(
                f"GPU sandboxes cannot run under gvisor here: {problem}. Use a newer runsc, or ask for "
                "runtime 'process' (in the kernelspec config: \"runtime\": \"process\")"
            )

    def user_for(self, spec: ParsedSpec) -> SandboxUser:
        """The unprivileged sandbox user; with the notebook's directory mounted, that directory's owner, so the
        kernel reads and writes the notebook's files as their owner would (only that directory is shown)."""
        if spec.mount_dir:
            st = os.stat(spec.mount_dir)
            return SandboxUser(st.st_uid, st.st_gid, "root" if st.st_uid == 0 else self.user.name)
        return self.user

    def owner(self, spec: ParsedSpec) -> tuple[int, int] | None:
        user = self.user_for(spec)
        return (user.uid, user.gid) if os.geteuid() == 0 else None  # runsc runs as root: its files are chowned

    def prepare(self, record: SandboxRecord, spec: ParsedSpec, env: dict[str, str]) -> Launch:
        sandbox_dir = Path(record.dir)
        oci = self.oci_spec(record, spec, env)
        if not spec.image:
            rootfs.build(sandbox_dir / ROOTFS, oci["mounts"], user=self.user_for(spec),
                         home=str(sandbox_dir / "workspace"),
                         hostname=record.id, network=spec.network)
        bundle = sandbox_dir / "bundle"
        bundle.mkdir(exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(oci, indent=1))
        argv = [*self._argv(record, spec.network, bool(record.gpu_indices), oci["annotations"][PLATFORM]), "run",
                "--bundle", str(bundle),
                record.id]
        host_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        return Launch(argv, host_env, {}, "runsc")

    def oci_spec(self, record: SandboxRecord, spec: ParsedSpec, env: dict[str, str]) -> dict[str, Any]:
        workspace = str(Path(record.dir) / "workspace")
        state = str(self.state_dir.resolve())
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
            # gVisor's own cgroupfs: the sandbox's cgroup, whose pids.max the agent sets as it starts.
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
            *rootfs.system_mounts(spec.image),
            *rootfs.venv_config_mount(Path(record.dir)),
            *(bind(p, "ro") for p in self.ro_paths),
        ]
        shown = list(self.ro_paths)
        if spec.mount_dir:  # the notebook's directory, only when the spec asks for it
            mounts.append(bind(spec.mount_dir, "rw"))
            shown.append(spec.mount_dir)
        # A directory shown above may hold the backend's state dir (its token) or Jupyter's runtime dir (the
        # server's cookie secret, which forges logins): hidden behind empty tmpfs mounts.
        for secret in (state, os.path.realpath(jupyter_runtime_dir())):
            if rootfs.under(secret, shown):
                mounts.append({"destination": secret, "type": "tmpfs", "source": "tmpfs"})
        mounts.append(bind(workspace, "rw"))
        user = self.user_for(spec)
        tasks = self.tasks_for(spec)
        # Started as root only to set the Sentry-enforced pids limit, then the agent becomes `user` for good.
        env = {**env, "SNAPKERNEL_RUN_AS": f"{user.uid}:{user.gid}", "SNAPKERNEL_PIDS_LIMIT": str(tasks)}
        setid_only = ["CAP_SETUID", "CAP_SETGID"]
        return {
            "ociVersion": "1.0.0",
            # The platform goes with the sandbox's snapshots: a memory image restores only under the same one.
            "annotations": {PLATFORM: self.platform_for(bool(record.gpu_indices))},
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0},
                "capabilities": {"bounding": setid_only, "effective": setid_only, "permitted": setid_only},
                "args": [sys.executable, "-m", "snapkernel.agent"],
                "env": [f"{k}={v}" for k, v in env.items()],
                "cwd": spec.mount_dir or workspace,
                "rlimits": self.rlimits(spec),
                "noNewPrivileges": True,
            },
            "root": {"path": spec.image or str(Path(record.dir) / ROOTFS), "readonly": True},
            "hostname": record.id,
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                "resources": self.resources(spec),
            },
        }

    def resources(self, spec: ParsedSpec) -> dict[str, Any]:
        return {
            "memory": {"limit": spec.memory},
            "cpu": {"quota": int(spec.cpu * 100000), "period": 100000},
            "pids": {"limit": self.tasks_for(spec) * HOST_TASKS_PER_PROCESS + HOST_TASKS_BASE},
        }

    def tasks_for(self, spec: ParsedSpec) -> int:
        """The sandbox's pids limit: `pids_limit`, lowered for small memory limits (see MEMORY_PER_TASK)."""
        return min(self.pids_limit, BASE_TASKS + max(0, spec.memory - KERNEL_MEMORY) // MEMORY_PER_TASK)

    def platform_for(self, gpus: bool) -> str:
        """The configured platform, or by default: ptrace for CPU sandboxes (with this runsc, systrap keeps
        every idle sandbox ~3% of a core busy: its fast-path monitor wakes every 400 us, parked only by gVisor
        PR 13470 of mid-2026; ptrace idles at ~0.1% and its slower system calls matter little to a notebook),
        and runsc's own default for GPU sandboxes, whose driver calls (nvproxy) want the fast path."""
        return self.platform or (self.features.platform if gpus else "ptrace")

    def _argv(self, record: SandboxRecord, spec_network: bool, gpus: bool, platform: str) -> list[str]:
        # --cpu-num-from-quota: the kernel sees the cores it was given (at least 2), so libraries size their
        # thread pools (and their share of the pids limit) to the sandbox, not to a 128-core host.
        argv = [self.features.path, "--root", str(self.root), f"--platform={platform}", "--cpu-num-from-quota",
                f"--network={'sandbox' if spec_network else 'none'}"]
        return [*argv, "--nvproxy"] if gpus else argv

    async def checkpoint(self, record: SandboxRecord, image_dir: Path, leave_running: bool = True) -> None:
        """Write the running sandbox's memory image to `image_dir`; the sandbox keeps running unless
        `leave_running` is false (hibernation: it stops once its image is written)."""
        if not self.capabilities.live_checkpoint:
            raise StateError(
                f"runsc {self.features.version} cannot checkpoint a live kernel (it panics on ipykernel's "
                "loopback listener); `make install` as root installs the 2024-07 build, or use --kind state"
            )
        image_dir.mkdir(mode=0o700)
        argv = [self.features.path, "--root", str(self.root), "checkpoint", "--image-path", str(image_dir)]
        if leave_running:
            argv.append("--leave-running")
        if "compression" in self.features.checkpoint_flags:
            argv.append("--compression=none")
        if "exclude-committed-zero-pages" in self.features.checkpoint_flags:
            argv.append("--exclude-committed-zero-pages")
        proc = await asyncio.create_subprocess_exec(*argv, record.id, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise SandboxFailedError(f"checkpointing sandbox {record.id}: runsc exited {proc.returncode}: "
                                     f"{err.decode(errors='replace').strip()[-400:]}")
        if not leave_running:
            # It ends on its own now, in a few ms. Stopped sooner, runsc's record of it stays "running", and
            # `runsc delete` then takes over a second to find out otherwise (most of a small kernel's move).
            await self.ended(record, SELF_EXIT_WAIT)

    def save_bundle(self, record: SandboxRecord, snapshot_dir: Path) -> None:
        """Keep what a restore needs besides the image: the OCI spec and where the workspace was."""
        oci = json.loads((Path(record.dir) / "bundle" / "config.json").read_text())
        (snapshot_dir / "sandbox.json").write_text(json.dumps({
            "oci": oci, "workspace": str(Path(record.dir) / "workspace"),
            "kernel_key": record.kernel.key.decode(),  # not the OCI spec's where it was restored and rekeyed
            "network": record.spec.network, "gpus": bool(record.gpu_indices),
            "rootfs": oci["root"]["path"] == str(Path(record.dir) / ROOTFS),
        }))

    def prepare_restore(self, record: SandboxRecord, spec: ParsedSpec, snapshot_dir: Path) -> Launch:
        saved = json.loads((snapshot_dir / "sandbox.json").read_text())
        oci = saved["oci"]
        # The sandbox's limits are this spec's (the Sentry's memory and CPU quota are set as it restores); the
        # restored processes keep their own rlimits, which the agent raises to this memory (`Identity.memory`).
        oci["linux"]["resources"].update(self.resources(spec))
        oci["process"]["rlimits"] = self.rlimits(spec)
        # The restored processes expect every mount where it was; only the sources in the old sandbox's
        # directory (its workspace, its pyvenv.cfg) move to this one's.
        old = str(Path(saved["workspace"]).parent)
        for mount in oci["mounts"]:
            if mount.get("type") == "bind" and mount["source"].startswith(old + "/"):
                mount["source"] = record.dir + mount["source"][len(old):]
        oci["hostname"] = record.id
        if saved.get("rootfs"):  # the skeleton went with the old sandbox: the same one, in this sandbox
            rootfs.venv_config_mount(Path(record.dir))  # writes this sandbox's pyvenv.cfg, named by the mounts
            oci["root"]["path"] = str(Path(record.dir) / ROOTFS)
            user = oci["process"]["user"]
            rootfs.build(Path(oci["root"]["path"]), oci["mounts"], home=saved["workspace"],
                         user=SandboxUser(user["uid"], user["gid"], self.user.name if user["uid"] else "root"),
                         hostname=record.id, network=saved["network"])
        bundle = Path(record.dir) / "bundle"
        bundle.mkdir(exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(oci, indent=1))
        # Images from before the platform was recorded were taken under runsc's default.
        platform = oci.get("annotations", {}).get(PLATFORM, self.features.platform)
        argv = [*self._argv(record, saved["network"], saved["gpus"], platform), "restore", "--image-path",
                str(snapshot_dir / "image"), "--bundle", str(bundle)]
        if "direct" in self.features.restore_flags and not _in_memory(snapshot_dir):
            argv.append("--direct")  # O_DIRECT reads of the pages file: a 1 GiB resume took 2.7 s, now 2.1 s
        argv.append(record.id)
        return Launch(argv, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, {}, "runsc")

    def checkpointing(self, record: SandboxRecord) -> bool:
        """A `runsc checkpoint` of this sandbox runs (it outlives the backend that started it)."""
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                argv = cmdline.read_bytes().split(b"\0")
                if b"checkpoint" in argv and record.id.encode() in argv and str(self.root).encode() in argv:
                    return True
        return False

    async def stop(self, record: SandboxRecord) -> None:
        """runsc's own kill first: the sandbox ends and runsc records it, so `runsc delete` is quick (signalled
        itself, runsc's record stays "running" and `runsc delete` takes over a second to find out otherwise)."""
        if self.is_alive(record):
            await asyncio.to_thread(subprocess.run, [self.features.path, "--root", str(self.root), "kill", "--all",
                                                     record.id, "KILL"], capture_output=True, timeout=30, check=False)
            await self.ended(record, SELF_EXIT_WAIT)
        await super().stop(record)

    def memory_used(self, record: SandboxRecord) -> int | None:
        """The Sentry's own count (`runsc events --stats`): under ptrace the application's memory is not in the
        RSS of any host process of the sandbox."""
        try:
            out = subprocess.run([self.features.path, "--root", str(self.root), "events", "--stats", record.id],
                                 capture_output=True, text=True, timeout=5, check=False)
            return int(json.loads(out.stdout)["data"]["memory"]["usage"]["usage"])
        except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def rlimits(spec: ParsedSpec) -> list[dict[str, Any]]:
        limits: list[dict[str, Any]] = [{"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 65536}]
        if spec.gpu is None:
            # An address-space limit turns a memory hog into a MemoryError in its cell, reported to the
            # notebook, before the cgroup limit kills the whole sandbox. Not with GPUs: CUDA reserves far
            # more address space than it ever touches. Only the soft limit: the Sentry's memory limit is the
            # boundary, and a kernel moved to more memory raises its own (it runs unprivileged).
            limits.append({"type": "RLIMIT_AS", "hard": RLIM_INFINITY, "soft": spec.memory})
        return limits

    def cleanup(self, record: SandboxRecord) -> None:
        out = subprocess.run([self.features.path, "--root", str(self.root), "delete", "--force", record.id],
                             capture_output=True, text=True, timeout=30, check=False)
        if out.returncode != 0 and "does not exist" not in out.stderr:
            log.warning("sandbox_id=%s runsc delete: %s", record.id, out.stderr.strip()[-300:])
        for part in ("bundle", ROOTFS):
            with contextlib.suppress(OSError):
                shutil.rmtree(Path(record.dir) / part)
