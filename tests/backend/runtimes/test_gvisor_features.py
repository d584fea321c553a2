"""runsc feature detection, and GPU requests refused at once where nvproxy cannot drive the driver."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from snapkernel.backend.runtimes.gvisor import GvisorRuntime, RunscFeatures, detect
from snapkernel.errors import RuntimeUnavailableError
from snapkernel.protocol.spec import GpuRequest, ParsedSpec


def gpu_spec() -> ParsedSpec:
    return ParsedSpec(gpu=GpuRequest("H100", 1), cpu=1, memory=2**30, disk=2**30, runtime="gvisor", image="",
                      restore_from="", hibernate_after=0, network=False)


def test_nvproxy_problem_names_both_versions() -> None:
    f = RunscFeatures(path="runsc", version="0.0~20240729.0", nvproxy=True, nvproxy_drivers=["550.54.15"])
    assert "0.0~20240729.0" in f.nvproxy_problem("580.159.04") and "580.159.04" in f.nvproxy_problem("580.159.04")
    assert f.nvproxy_problem("550.54.15") == ""
    assert "has no --nvproxy" in RunscFeatures(path="runsc", version="x").nvproxy_problem("580.159.04")


def test_a_missing_runsc_is_reported_not_raised(tmp_path: Path) -> None:
    f = detect(str(tmp_path / "no-runsc"))
    assert f.error and "no-runsc" in f.error


@pytest.mark.gvisor
def test_installed_runsc_is_detected_and_refuses_gpus_it_cannot_drive(tmp_path: Path) -> None:
    runsc = shutil.which("runsc")
    assert runsc is not None
    runtime = GvisorRuntime(runsc, tmp_path, driver_version="999.1.2")
    f = runtime.features
    assert f.version and f.build_date >= 20221219 and f.platform in ("systrap", "ptrace", "kvm")
    info = runtime.probe()
    assert info.available and f.version in info.version and "platform" in info.detail
    with pytest.raises(RuntimeUnavailableError) as e:
        runtime.check(gpu_spec())
    message = str(e.value)
    assert f.version in message and "runtime 'process'" in message
    if f.nvproxy:
        assert "999.1.2" in message
