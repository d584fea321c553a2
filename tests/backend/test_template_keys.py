"""Which kernels may start from which template, in-process: a template's key changes with everything its
memory image carries, and kernels that need another environment or mounts boot instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapkernel.backend.runtimes.base import RuntimeSettings
from snapkernel.backend.runtimes.process import ProcessRuntime
from snapkernel.backend.templates import Templates, eligible
from snapkernel.protocol.spec import GpuRequest, ParsedSpec


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
