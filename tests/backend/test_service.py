"""The gRPC API of a real backend: tokens, bad requests, malformed frames; the daemon keeps serving."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snapkernel.client import BackendClient
from snapkernel.errors import InvalidSpecError, NoCapacityError, NotFoundError, UnauthenticatedError
from snapkernel.protocol.connection import call_metadata
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.protocol.v1 import backend_pb2_grpc as pb_grpc
from tests.conftest import Backend, _cleanup_sandboxes
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value


def request(**spec: Any) -> pb.CreateSandboxRequest:
    return pb.CreateSandboxRequest(spec=pb.SandboxSpec(**spec), kernel=pb.KernelConfig(key=b"k"))


@pytest.mark.parametrize("token", [None, "not-the-token"])
async def test_calls_without_the_right_token_are_refused(backend: Backend, token: str | None) -> None:
    client = BackendClient(backend.address, token or "")
    if token is None:
        client.metadata = ()
    try:
        with pytest.raises(UnauthenticatedError, match="no token sent" if token is None else "wrong token"):
            await client.list_sandboxes()
        with pytest.raises(UnauthenticatedError):
            async for _ in client.watch("sb-000000000000"):
                pass
        health = health_pb2_grpc.HealthStub(client.channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await health.Check(health_pb2.HealthCheckRequest(), metadata=client.metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await client.close()


async def test_health_service_serves_with_the_token(backend: Backend) -> None:
    client = BackendClient(backend.address, backend.token)
    try:
        health = health_pb2_grpc.HealthStub(client.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="snapkernel.v1.Backend"),
                                   metadata=client.metadata)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await client.close()


@pytest.mark.parametrize(("spec", "error", "message"), [
    ({"gpu": "Z999:-1"}, InvalidSpecError, "gpu spec 'Z999:-1' is not valid"),
    ({"memory": "lots"}, InvalidSpecError, "memory size 'lots' is not valid: use a number of bytes"),
    ({"runtime": "vmware"}, InvalidSpecError, "runtime 'vmware' is not known: use one of process, gvisor"),
    ({"gpu": "Z999:2"}, NoCapacityError, "no GPU of model 'Z999' here; these exist: "),
    ({"image": "relative/dir"}, InvalidSpecError, "image 'relative/dir' is not valid"),
    ({"image": "/etc/hostname"}, InvalidSpecError, "image '/etc/hostname' is not valid: it is not a directory"),
    ({"image": "/"}, InvalidSpecError, "image '/' is the host's own root: that shows the whole host"),
    ({"image": "/usr/share/doc"}, InvalidSpecError, "image '/usr/share/doc' has no Linux userland to run Python"),
    ({"disk": "lots"}, InvalidSpecError, "disk size 'lots' is not valid: use a number of bytes or a number with a "
                                         "unit, for example '512Mi', '10Gi'"),
    ({"disk": "-1Gi"}, InvalidSpecError, "disk size '-1Gi' is not valid"),
    ({"disk": "1Mi"}, InvalidSpecError, "disk size '1Mi' is too small: use at least 16Mi"),
    ({"disk": "1Ei"}, InvalidSpecError, "disk '1Ei' is more than this host has: .* free where sandboxes live"),
    ({"mount_dir": "notebooks"}, InvalidSpecError, "mount_dir 'notebooks' is not valid"),
    ({"mount_dir": "/"}, InvalidSpecError, "mount_dir '/' is the host's own root"),
    # 0 is refused, not taken for the default (absent is the default); so are negative and huge counts.
    ({"cpu": 0.0}, InvalidSpecError, "cpu 0 is not valid: use a number of cores above 0 and at most 1024"),
    ({"cpu": -1.0}, InvalidSpecError, "cpu -1 is not valid: use a number of cores above 0 and at most 1024"),
    ({"cpu": 5000.0}, InvalidSpecError, "cpu 5000 is not valid"),
])
async def test_bad_specs_are_refused_with_the_value_named(backend: Backend, spec: dict[str, Any],
                                                          error: type[Exception], message: str) -> None:
    client = BackendClient(backend.address, backend.token)
    try:
        before = await client.list_sandboxes(include_ended=True)
        with pytest.raises(error, match=message.replace("(", r"\(")):
            await client.create_sandbox(request(**spec))
        assert await client.list_sandboxes(include_ended=True) == before
    finally:
        await client.close()


@pytest.mark.parametrize("sandbox_id", ["../../etc", "sb-xyz", ""])
async def test_bad_sandbox_ids_are_refused(backend: Backend, sandbox_id: str) -> None:
    client = BackendClient(backend.address, backend.token)
    try:
        with pytest.raises(InvalidSpecError, match=r"sandbox id .* is not valid"):
            await client.delete_sandbox(sandbox_id)
        with pytest.raises(NotFoundError, match="no sandbox 'sb-0123456789ab'"):
            await client.get_sandbox("sb-0123456789ab")
    finally:
        await client.close()


def test_malformed_attach_frames_close_that_stream_only(backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        sandbox = value(kc, "__import__('os').environ['SNAPKERNEL_SANDBOX_ID']").strip("'")

        async def abuse(first: pb.AttachRequest, then: pb.AttachRequest | None) -> grpc.aio.AioRpcError:
            channel = grpc.aio.insecure_channel(backend.address)
            try:
                attach = pb_grpc.BackendStub(channel).Attach(metadata=call_metadata(backend.token))
                await attach.write(first)
                if then is not None:
                    await attach.write(then)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in attach:
                        pass
                return e.value
            finally:
                await channel.close()

        opened = pb.AttachRequest(open=pb.AttachOpen(sandbox_id=sandbox))
        cases = [
            (pb.AttachRequest(frame=pb.KernelFrame(channel=pb.SHELL, parts=[b"x"])), None,
             "the first message must be `open`"),
            (opened, pb.AttachRequest(frame=pb.KernelFrame(channel=pb.IOPUB, parts=[b"a"] * 7)),
             "channel 4 cannot be sent to a kernel"),
            (opened, pb.AttachRequest(frame=pb.KernelFrame(channel=pb.SHELL, parts=[b"id", b"garbage"])),
             "malformed frame on channel SHELL"),
            (pb.AttachRequest(open=pb.AttachOpen(sandbox_id="nope")), None, "sandbox id 'nope' is not valid"),
        ]
        for first, then, message in cases:
            err = asyncio.run(abuse(first, then))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert message in (err.details() or "")
        # The kernel and the daemon are unharmed.
        assert value(kc, "40 + 2") == "42"


async def test_the_state_dir_cannot_be_mounted(backend: Backend) -> None:
    client = BackendClient(backend.address, backend.token)
    try:
        for path in (backend.state_dir, backend.state_dir / "sandboxes"):
            with pytest.raises(InvalidSpecError, match="is inside the backend's state dir"):
                await client.create_sandbox(request(mount_dir=str(path)))
    finally:
        await client.close()


def test_cpu_0_in_a_kernelspec_config_is_refused_before_anything_starts() -> None:
    from snapkernel.protocol.spec import spec_from_config

    with pytest.raises(InvalidSpecError, match="cpu 0 is not valid: use a number of cores above 0 and at most 1024"):
        spec_from_config({"cpu": 0})
    assert not spec_from_config({}).HasField("cpu")  # absent: the backend's default
    assert spec_from_config({"cpu": 0.5}).cpu == 0.5


def test_snapshot_names_are_capped_at_200_characters(backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        sandbox = value(kc, "__import__('os').environ['SNAPKERNEL_SANDBOX_ID']").strip("'")

        async def snapshot(name: str) -> pb.SnapshotInfo:
            client = BackendClient(backend.address, backend.token)
            try:
                return await client.create_snapshot(sandbox, "state", name)
            finally:
                await client.close()

        with pytest.raises(InvalidSpecError, match="is 100000 characters long: names are at most 200 characters"):
            asyncio.run(snapshot("n" * 100_000))
        snap = asyncio.run(snapshot("n" * 200))
        assert snap.name == "n" * 200

        async def remove() -> None:  # the session's backend is shared: leave no snapshot behind
            client = BackendClient(backend.address, backend.token)
            try:
                await client.delete_snapshot(snap.id)
            finally:
                await client.close()

        asyncio.run(remove())
        # %snapshot says so at once, in the cell.
        content, _ = run(kc, "%snapshot --name " + "m" * 201)
        assert content["status"] == "error" and "names are at most 200 characters" in content["evalue"], content


def test_cpu_overcommit_1_refuses_a_third_one_core_sandbox_naming_the_limit() -> None:
    with tempfile.TemporaryDirectory(prefix="snapkernel-overcommit-") as tmp:
        b = Backend(Path(tmp), "process", args=["--BackendApp.cpu_overcommit=1", "--BackendApp.memory_overcommit=1"])
        b.start()
        try:
            async def go() -> tuple[pb.Capacity, str]:
                client = BackendClient(b.address, b.token)
                try:
                    cores = (await client.status()).capacity.cpu_total
                    made = [await client.create_sandbox(request(cpu=1.0, memory="256Mi"))
                            for _ in range(int(cores))]
                    with pytest.raises(NoCapacityError) as e:
                        await client.create_sandbox(request(cpu=1.0, memory="256Mi"))
                    cap = (await client.status()).capacity
                    for sandbox in made:
                        await client.delete_sandbox(sandbox.id)
                    return cap, str(e.value)
                finally:
                    await client.close()

            cap, refusal = asyncio.run(go())
            total = f"{cap.cpu_total:g}"
            assert f"no room for 1 more cores: {total} are given out and the limit is {total} ({total} cores x 1 " \
                   "cpu_overcommit, --BackendApp.cpu_overcommit)" in refusal, refusal
            assert (cap.cpu_overcommit, cap.cpu_limit, cap.cpu_allocated) == (1, cap.cpu_total, cap.cpu_total)
            assert cap.memory_overcommit == 1 and cap.memory_limit == cap.memory_total
        finally:
            b.stop()
            _cleanup_sandboxes(b)


def test_the_overcommit_policy_is_stated_in_help_and_status(backend: Backend) -> None:
    help_all = subprocess.run([sys.executable, "-m", "snapkernel.cli", "backend", "--help-all"],
                              capture_output=True, text=True, check=True).stdout
    assert "--BackendApp.cpu_overcommit" in help_all and "Default 4" in help_all, help_all
    assert "(default 1 = never overcommitted:" in help_all, help_all
    status = subprocess.run([sys.executable, "-m", "snapkernel.cli", "status"], capture_output=True, text=True,
                            check=True, env={**__import__("os").environ, **backend.env()}).stdout
    line = next(x for x in status.splitlines() if x.startswith("capacity:"))
    assert "cores given out (overcommit 4x: up to " in line and "(overcommit 2x: up to " in line, line
    assert "(never shared)" in line, line


def test_capacity_comes_back_on_every_ending_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted, or died on its own: each gives its cores and memory back; a refused request claims nothing
    (a backend of its own, so other tests' sandboxes do not count)."""
    import os
    import signal

    from tests.conftest import backend_of_its_own, sandbox_processes

    with backend_of_its_own("process", monkeypatch) as b:
        async def go() -> list[tuple[float, int]]:
            client = BackendClient(b.address, b.token)

            async def allocated() -> tuple[float, int]:
                cap = (await client.status()).capacity
                return cap.cpu_allocated, cap.memory_allocated

            async def until(sandbox_id: str, states: set[int]) -> None:
                async with asyncio.timeout(60):
                    async for event in client.watch(sandbox_id):
                        if event.sandbox.state in states:
                            return

            try:
                seen = [await allocated()]
                deleted = await client.create_sandbox(request(cpu=1.0, memory="256Mi"))
                died = await client.create_sandbox(request(cpu=0.5, memory="256Mi"))
                await until(deleted.id, {pb.RUNNING})
                await until(died.id, {pb.RUNNING})
                seen.append(await allocated())
                await client.delete_sandbox(deleted.id)
                seen.append(await allocated())
                for pid in sandbox_processes(died.id):  # the sandbox dies under it (an OOM kill, say)
                    if b"snapkernel.backend.shim" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.killpg(pid, signal.SIGKILL)
                await until(died.id, {pb.EXITED, pb.LOST})
                seen.append(await allocated())
                # A request refused (its snapshot does not exist): nothing stays claimed.
                with pytest.raises(NotFoundError):
                    await client.create_sandbox(request(cpu=1.0, memory="256Mi", restore_from="snap-000000000000"))
                seen.append(await allocated())
                return seen
            finally:
                await client.close()

        seen = asyncio.run(go())
        assert seen == [(0, 0), (1.5, 512 << 20), (0.5, 256 << 20), (0, 0), (0, 0)], seen
