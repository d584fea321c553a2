"""`SnapKernelProvisioner`: Jupyter kernels that run in backend sandboxes.

The kernelspec's `metadata.kernel_provisioner.config` (gpu, cpu, memory, runtime, ...) becomes the
sandbox's spec. The Jupyter server talks ZMQ to a local relay (127.0.0.1); the relay carries everything
to the sandbox over the backend's gRPC Attach stream.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Float, Unicode, default

from snapkernel.client import BackendClient
from snapkernel.errors import NotFoundError, SandboxFailedError, SnapkernelError, StateError, TimeoutError_
from snapkernel.kernel_provisioner.io_thread import IOThread
from snapkernel.kernel_provisioner.relay import KernelRelay
from snapkernel.protocol.spec import CONFIG_KEYS, spec_from_config
from snapkernel.protocol.states import ALIVE, ENDED, STATE_NAMES
from snapkernel.protocol.v1 import backend_pb2 as pb

T = TypeVar("T")
# The start_kernel() keyword that carries a spec chosen at launch time (POST /snapkernel/api/kernels): its
# keys override the kernelspec's config. jupyter_client keeps it for restarts like its other launch arguments.
LAUNCH_SPEC = "snapkernel_spec"


class SnapKernelProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Starts the kernel in a sandbox of the snapkernel backend."""

    # The sandbox spec, straight from the kernelspec's provisioner config (see DESIGN.md).
    gpu = Unicode(None, allow_none=True, help="GPU request: 'H100', 'H100:2', 'any:1'; absent = none.").tag(
        config=True)
    cpu = Float(None, allow_none=True, help="Cores for the sandbox, e.g. 2 or 0.5.").tag(config=True)
    memory = AnyTrait(None, allow_none=True, help="Memory limit, e.g. '8Gi'.").tag(config=True)
    disk = AnyTrait(None, allow_none=True, help="Workspace quota, e.g. '10Gi'.").tag(config=True)
    runtime = Unicode(None, allow_none=True, help="Sandbox runtime: 'gvisor' or 'process'.").tag(config=True)
    image = Unicode(None, allow_none=True, help="Root filesystem directory for the sandbox (default: a minimal "
                    "root of the host's system directories).").tag(config=True)
    restore_from = Unicode(None, allow_none=True, help="Snapshot id to start the kernel from.").tag(config=True)
    hibernate_after = Float(None, allow_none=True, help="Idle seconds before hibernating; 0 = never.").tag(
        config=True)
    network = Bool(None, allow_none=True, help="Give the sandbox network access.").tag(config=True)
    env = Dict(None, allow_none=True, help="Extra environment variables for the kernel.").tag(config=True)
    mount_notebook_dir = Bool(None, allow_none=True, help="Mount the notebook's directory read-write in the "
                              "sandbox, as the kernel's working directory.").tag(config=True)

    backend_address = Unicode(help="The backend's address (default: $SNAPKERNEL_BACKEND, else the "
                                   "default state dir's unix socket).").tag(config=True)
    backend_token = Unicode(None, allow_none=True,
                            help="The backend's token (default: $SNAPKERNEL_TOKEN or the token file).").tag(
        config=True)
    start_timeout = Float(help="Seconds to wait for the sandbox and kernel to start "
                               "(default $SNAPKERNEL_START_TIMEOUT or 120).").tag(config=True)
    start_timeout_env = "SNAPKERNEL_START_TIMEOUT"

    def __init__(self, **kwargs: Any) -> None:
        known = set(self.class_trait_names()) | {"parent", "config", "log"}
        self._unknown_config = {k: kwargs.pop(k) for k in list(kwargs) if k not in known}
        super().__init__(**kwargs)
        self.sandbox_id: str | None = None
        self.relay: KernelRelay | None = None
        self.io = IOThread.instance()
        self._exit_code: int | None = None

    @default("backend_address")
    def _default_address(self) -> str:
        return os.environ.get("SNAPKERNEL_BACKEND", "")

    @default("start_timeout")
    def _default_start_timeout(self) -> float:
        return float(os.environ.get(self.start_timeout_env, "120"))

    # --- helpers --------------------------------------------------------------------------------
    def _tag(self) -> str:
        return f"kernel_id={self.kernel_id} sandbox_id={self.sandbox_id}"

    def sandbox_spec(self, cwd: str = "") -> pb.SandboxSpec:
        config = {k: getattr(self, k) for k in CONFIG_KEYS if getattr(self, k) is not None}
        env = dict(self.kernel_spec.env or {}) if self.kernel_spec is not None else {}
        env.update(config.get("env") or {})
        if env:
            config["env"] = env
        spec = spec_from_config({**config, **self._unknown_config})
        if self.mount_notebook_dir:
            spec.mount_dir = os.path.abspath(cwd or os.getcwd())
        return spec

    def _client(self) -> BackendClient:
        """The shared backend client; call on the I/O loop only (see io_thread)."""
        return self.io.client(self.backend_address or None, self.backend_token)

    async def _backend(self, call: Callable[[BackendClient], Awaitable[T]]) -> T:
        """Run one backend call on the I/O loop, from whatever loop the provisioner is called on."""

        async def on_io_loop() -> T:
            return await call(self._client())

        return await self.io.call(on_io_loop())

    def _on_event(self, event: pb.SandboxEvent) -> None:
        if event.HasField("progress"):
            p = event.progress
            self.log.info("%s %s: %s", self._tag(), p.step, p.message)

    # --- KernelProvisionerBase ------------------------------------------------------------------
    @property
    def has_process(self) -> bool:
        return self.sandbox_id is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        launch_spec = kwargs.pop(LAUNCH_SPEC, None) or {}
        spec_from_config(launch_spec)  # names a bad key or value
        for key, value in launch_spec.items():
            setattr(self, key, value)
        self.sandbox_spec()  # a bad spec fails here, before anything starts
        km: Any = self.parent
        if self.restore_from and self.sandbox_id is None:
            # A kernel resumed from a memory snapshot signs with the key it had: this session must use it.
            restore_from = self.restore_from
            snapshot = await self._backend(lambda c: c.get_snapshot(restore_from))
            if snapshot.kernel_key:
                km.session.key = snapshot.kernel_key
        if self.relay is None:
            self.relay = await self.io.call(self._make_relay())
        ports = self.relay.ports
        km.transport = "tcp"
        km.ip = "127.0.0.1"
        km.shell_port, km.iopub_port = ports["shell"], ports["iopub"]
        km.stdin_port, km.hb_port, km.control_port = ports["stdin"], ports["hb"], ports["control"]
        km.write_connection_file()
        self.connection_info = km.get_connection_info()
        kernel_cmd = km.format_kernel_cmd(extra_arguments=kwargs.pop("extra_arguments", []))
        return await super().pre_launch(cmd=kernel_cmd, **kwargs)

    async def _make_relay(self) -> KernelRelay:
        relay = KernelRelay(self._client(), sandbox_id="", on_event=self._on_event)
        relay.bind()
        return relay

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        assert self.relay is not None
        self._exit_code = None
        sandbox_id = self.sandbox_id
        if sandbox_id is not None and self.relay.sandbox is not None and self.relay.sandbox.state not in ENDED:
            self.log.info("%s restarting the kernel inside its sandbox", self._tag())
            generation = self.relay.sandbox.kernel_generation
            await self._backend(lambda c: c.restart_kernel(sandbox_id))
            await self._wait_running(generation)
            return self.connection_info
        await self._create_sandbox(kwargs.get("env") or {}, str(kwargs.get("cwd") or ""))
        return self.connection_info

    async def _create_sandbox(self, launch_env: dict[str, str], cwd: str) -> None:
        assert self.relay is not None
        km: Any = self.parent
        request = pb.CreateSandboxRequest(
            spec=self.sandbox_spec(cwd),
            kernel=pb.KernelConfig(key=km.session.key, signature_scheme=km.session.signature_scheme,
                                   kernel_name=getattr(km, "kernel_name", "")),
            kernel_id=self.kernel_id or "",
            notebook_path=launch_env.get("JPY_SESSION_NAME", ""),
        )
        try:
            sandbox = await self._backend(lambda c: c.create_sandbox(request))
        except Exception:
            await self.cleanup(restart=False)  # the relay's sockets must not outlive a refused start
            raise
        self.sandbox_id = sandbox.id
        self.relay.sandbox_id = sandbox.id
        self.log.info("%s sandbox created (runtime %s); waiting for the kernel", self._tag(), sandbox.runtime)
        await self.io.call(self._start_relay())
        await self._wait_running(0)

    async def _start_relay(self) -> None:
        assert self.relay is not None
        self.relay.start()

    async def _wait_running(self, generation: int) -> None:
        """Wait until a kernel newer than `generation` runs in the sandbox, or the sandbox failed."""
        assert self.relay is not None
        relay = self.relay
        try:
            sandbox = await self.io.call(relay.wait_for(
                lambda s: (s.state == pb.RUNNING and s.kernel_generation > generation)
                or s.state in ENDED or s.state == pb.KERNEL_EXITED,
                self.start_timeout))
        except TimeoutError as e:
            state = STATE_NAMES.get(relay.sandbox.state, "unknown") if relay.sandbox else "unknown"
            failed: SnapkernelError = TimeoutError_(
                f"sandbox {self.sandbox_id} did not start its kernel within {self.start_timeout:g}s "
                f"(last state: {state}); raise SNAPKERNEL_START_TIMEOUT or check the backend's log")
            await self.cleanup(restart=False)  # a failed start leaves nothing behind
            raise failed from e
        if sandbox.state != pb.RUNNING:
            message = sandbox.message or STATE_NAMES[sandbox.state]
            failed = SandboxFailedError(f"sandbox {self.sandbox_id} failed: {message}")
            await self.cleanup(restart=False)  # a failed start leaves nothing behind
            raise failed
        self.log.info("%s kernel running", self._tag())

    async def poll(self) -> int | None:
        """None while the sandbox's kernel lives (or is starting); its exit code once it ended."""
        if self.relay is None or self.relay.sandbox is None:
            return None if self.sandbox_id else self._exit_code
        sandbox = self.relay.sandbox
        if sandbox.state in ALIVE:
            return None
        return sandbox.exit_code if sandbox.exit_code else (0 if sandbox.state == pb.KERNEL_EXITED else 1)

    async def wait(self) -> int | None:
        while (code := await self.poll()) is None:
            await asyncio.sleep(0.05)
        return code

    async def send_signal(self, signum: int) -> None:
        sandbox_id = self.sandbox_id
        if sandbox_id is None:
            return
        try:
            await self._backend(lambda c: c.signal_kernel(sandbox_id, signum))
        except (NotFoundError, StateError, SandboxFailedError) as e:
            self.log.debug("%s signal %s not delivered: %s", self._tag(), signum, e)

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """Remove the sandbox and the relay unless restarting. Safe to call more than once."""
        if restart:
            return
        sandbox_id, self.sandbox_id = self.sandbox_id, None
        relay, self.relay = self.relay, None
        if sandbox_id is not None:
            try:
                await self._backend(lambda c: c.delete_sandbox(sandbox_id))
                self.log.info("kernel_id=%s sandbox_id=%s removed", self.kernel_id, sandbox_id)
            except NotFoundError:
                pass
            except Exception as e:
                self.log.warning("kernel_id=%s sandbox_id=%s not removed: %s", self.kernel_id, sandbox_id, e)
        if relay is not None:
            self._exit_code = relay.sandbox.exit_code if relay.sandbox is not None else 0
            await self.io.call(relay.close())

    async def get_provisioner_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await super().get_provisioner_info()
        info.update(sandbox_id=self.sandbox_id, ports=self.relay.ports if self.relay else {})
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.sandbox_id = provisioner_info.get("sandbox_id")
        if self.sandbox_id and self.relay is None:
            ports = provisioner_info.get("ports") or {}
            sandbox_id = self.sandbox_id

            async def start() -> KernelRelay:
                relay = KernelRelay(self._client(), sandbox_id, ports, self._on_event)
                relay.bind()
                relay.start()
                return relay

            self.relay = await self.io.call(start())
