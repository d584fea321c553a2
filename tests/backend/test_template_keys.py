"""Which kernels and workers may start from which template, in-process: a template's key changes with everything
its memory image carries (a worker's mode too), and sandboxes that need another environment or mounts boot
instead; a template that fails is dropped and rebuilt once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from snapkernel.backend.runtimes.base import RuntimeSettings
from snapkernel.backend.runtimes.process import ProcessRuntime
from snapkernel.backend.templates import Template, Templates, eligible
from snapkernel.backend.workers import MODE_ENV
from snapkernel.errors import NoCapacityError
from snapkernel.protocol.spec import GpuRequest, ParsedSpec
from snapkernel.protocol.v1 import backend_pb2 as pb


def spec(**changes: object) -> ParsedSpec:
    base: dict[str, object] = dict(gpu=None, cpu=1.0, memory=4 << 30, disk=10 << 30, runtime="gvisor", image="",
                                   restore_from="", hibernate_after=None, network=False)
    return ParsedSpec(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture
def runtime(tmp_path: Path) -> ProcessRuntime:
    return ProcessRuntime.from_settings(RuntimeSettings(state_dir=tmp_path))


def test_the_key_follows_the_limits_the_runtime_and_the_pre_imports(tmp_path: Path, runtime: ProcessRuntime,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    templates = Templates(tmp_path, host=None, preimport=[])  # type: ignore[arg-type]
    key = templates.key(spec(), runtime)
    assert templates.key(spec(), runtime) == key
    assert templates.key(spec(hibernate_after=60.0), runtime) == key  # not in the image
    for other in (spec(cpu=2.0), spec(memory=2 << 30), spec(disk=20 << 30), spec(network=True)):
        assert templates.key(other, runtime) != key
    assert Templates(tmp_path, host=None, preimport=["numpy"]).key(spec(), runtime) != key  # type: ignore[arg-type]
    monkeypatch.setattr(runtime, "image_settings", lambda: "runsc 20250101 ptrace uid=1000:1000")
    assert templates.key(spec(), runtime) != key  # another runsc, or other mounts, user or limits


def test_kernels_that_need_their_own_environment_or_mounts_boot(runtime: ProcessRuntime,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert not eligible(spec(), runtime)  # the process runtime takes no memory images
    monkeypatch.setattr(ProcessRuntime, "capabilities", property(lambda self: type(
        "Caps", (), {"memory_snapshots": True, "live_checkpoint": True})()))
    assert eligible(spec(), runtime)
    for other in (spec(gpu=GpuRequest("H100", 1)), spec(mount_dir="/nb"), spec(env={"A": "b"}),
                  spec(restore_from="snap-1"), spec(image="/images/x")):
        assert not eligible(other, runtime), other


def test_plain_workers_have_templates_of_their_own_and_other_modes_boot(tmp_path: Path, runtime: ProcessRuntime,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ProcessRuntime, "capabilities", property(lambda self: type(
        "Caps", (), {"memory_snapshots": True, "live_checkpoint": True, "version": "1"})()))
    worker = spec(env={MODE_ENV: "worker"})
    assert eligible(worker, runtime)
    for other in (spec(env={MODE_ENV: "worker", "A": "b"}), spec(env={MODE_ENV: "clone"}, restore_from="snap-1"),
                  spec(env={MODE_ENV: "clone"})):
        assert not eligible(other, runtime), other  # its kernel's variables; or a --clone, restored from a snapshot
    templates = Templates(tmp_path, host=None, preimport=[])  # type: ignore[arg-type]
    assert templates.key(worker, runtime) != templates.key(spec(), runtime)
    assert templates.key(worker, runtime) != templates.key(spec(cpu=2.0, env={MODE_ENV: "worker"}), runtime)
    shown = Template("k", pb.SandboxSpec(cpu=1, memory="4Gi", disk="10Gi", env={MODE_ENV: "worker"})).to_pb()
    assert (shown.spec, shown.mode) == ("fan-out worker, cpu 1, memory 4Gi, disk 10Gi", "worker")
    shown = Template("k", pb.SandboxSpec(cpu=1, memory="4Gi", disk="10Gi")).to_pb()
    assert (shown.spec, shown.mode) == ("cpu 1, memory 4Gi, disk 10Gi", "kernel")


class RefusingHost:
    """A host with no room: every build fails at once (these tests count builds, not sandboxes)."""

    def __init__(self) -> None:
        self.creates = 0

    async def create(self, req: pb.CreateSandboxRequest) -> Any:
        self.creates += 1
        raise NoCapacityError("no room")


def test_a_template_that_many_restores_fail_at_once_is_rebuilt_once(tmp_path: Path) -> None:
    host = RefusingHost()
    templates = Templates(tmp_path, host=host, preimport=[])  # type: ignore[arg-type]

    async def go() -> None:
        templates.templates["k"] = Template("k", pb.SandboxSpec(env={MODE_ENV: "worker"}), "ready", time.time() - 10)
        taken = time.time() - 5
        for _ in range(4):  # the four workers of one fan-out, restoring it at the same time
            templates.failed("k", "restoring it failed", taken=taken)
        await asyncio.gather(*templates._builds)
        assert host.creates == 1
        # A restore that took the template before it was built again does not drop the new one.
        templates.templates["k"] = Template("k", pb.SandboxSpec(), "ready", time.time())
        templates.failed("k", "restoring it failed", taken=taken)
        assert templates.templates["k"].state == "ready" and not templates._builds

    asyncio.run(go())


def test_the_key_follows_snapkernels_own_code(tmp_path: Path, runtime: ProcessRuntime) -> None:
    # A template holds the agent and magics of the code that built it: a changed checkout (or an upgrade under the
    # same version number) builds its own.
    import shutil

    import snapkernel
    from snapkernel.backend import templates as module

    copy = tmp_path / "snapkernel"
    shutil.copytree(Path(snapkernel.__file__).parent, copy,
                    ignore=shutil.ignore_patterns("__pycache__", "labextension"))
    original = module.code_fingerprint()
    bridge = copy / "agent" / "kernel_bridge.py"
    bridge.write_text(bridge.read_text() + "\n# changed\n")
    real_file = snapkernel.__file__
    try:
        snapkernel.__file__ = str(copy / "__init__.py")
        module.code_fingerprint.cache_clear()
        assert module.code_fingerprint() != original
    finally:
        snapkernel.__file__ = real_file
        module.code_fingerprint.cache_clear()
    assert module.code_fingerprint() == original
