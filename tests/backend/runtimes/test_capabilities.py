"""Runtimes declare what they can do (`capabilities`) and are found through the `snapkernel.runtimes`
entry-point group; the backend asks those, never a runtime's type or name."""

from __future__ import annotations

import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from snapkernel.backend.runtimes.base import (
    BUILTIN_RUNTIMES,
    RUNTIME_GROUP,
    RuntimeCapabilities,
    RuntimeSettings,
    RuntimeUnusable,
    SandboxRuntime,
)
from snapkernel.backend.runtimes.gvisor import GvisorRuntime, RunscFeatures
from snapkernel.backend.runtimes.process import ProcessRuntime
from snapkernel.backend.sandbox_db import SandboxRecord
from snapkernel.backend.server import BackendApp
from snapkernel.errors import StateError
from snapkernel.protocol.spec import parse_spec
from snapkernel.protocol.v1 import backend_pb2 as pb


def test_the_entry_point_group_lists_both_runtimes() -> None:
    found = {ep.name: ep.load() for ep in entry_points(group=RUNTIME_GROUP)}
    assert found["process"] is ProcessRuntime and found["gvisor"] is GvisorRuntime
    assert all(issubclass(cls, SandboxRuntime) and cls.name == name for name, cls in found.items())


def test_process_runtime_takes_no_memory_snapshots(tmp_path: Path) -> None:
    runtime = ProcessRuntime.from_settings(RuntimeSettings(state_dir=tmp_path, pids_limit=128))
    assert runtime.pids_limit == 128
    caps = runtime.capabilities
    assert not (caps.checkpoint or caps.live_checkpoint or caps.restore or caps.gpu_checkpoint or caps.clone)
    assert not caps.memory_snapshots and caps.version == ""
    assert caps.gpu_suspend and caps.disk_quota


async def test_the_base_runtime_refuses_memory_images_clearly(tmp_path: Path) -> None:
    runtime = ProcessRuntime()
    record = SandboxRecord(id="sb-000000000000", kernel_id="k", runtime="process", spec=pb.SandboxSpec(),
                           dir=str(tmp_path))
    with pytest.raises(StateError, match="the process runtime cannot checkpoint"):
        await runtime.checkpoint(record, tmp_path / "image")
    with pytest.raises(StateError, match="the process runtime cannot checkpoint"):
        runtime.save_bundle(record, tmp_path)
    with pytest.raises(StateError, match="the process runtime cannot restore memory snapshots"):
        runtime.prepare_restore(record, parse_spec(pb.SandboxSpec(), default_runtime="process", default_cpu=1,
                                                  default_memory=1 << 30, default_disk=1 << 30), tmp_path)


def test_gvisor_capabilities_follow_the_detected_runsc() -> None:
    # Built without running it: its capabilities come from the features detected at start-up.
    runtime = GvisorRuntime.__new__(GvisorRuntime)
    runtime.features = RunscFeatures(path="runsc", version="0.0~20221219.0", build_date=20221219)
    old = runtime.capabilities
    assert old.memory_snapshots and old.clone and not old.live_checkpoint and not old.gpu_checkpoint
    assert old.version == "0.0~20221219.0" and not old.gpu_suspend
    runtime.features = RunscFeatures(path="runsc", version="new", build_date=20260601,
                                     checkpoint_flags={"cuda-checkpoint-path"})
    new = runtime.capabilities
    assert new.live_checkpoint and new.gpu_checkpoint and new.version == "new"
    assert new == RuntimeCapabilities(checkpoint=True, live_checkpoint=True, restore=True, gpu_checkpoint=True,
                                      clone=True, disk_quota=True, version="new")


def test_a_missing_runsc_makes_gvisor_unusable_with_the_usual_line(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnusable) as e:
        GvisorRuntime.from_settings(RuntimeSettings(state_dir=tmp_path, runsc=str(tmp_path / "no-runsc")))
    assert e.value.info.name == "gvisor" and not e.value.info.available
    assert e.value.info.detail.startswith("runsc not found")


def test_the_backend_builds_its_runtimes_from_the_group(tmp_path: Path) -> None:
    app = BackendApp(runsc=str(tmp_path / "no-runsc"), pids_limit=256)
    runtimes, missing = app.build_runtimes(tmp_path, "")
    assert list(runtimes) == ["process"] and isinstance(runtimes["process"], ProcessRuntime)
    assert runtimes["process"].pids_limit == 256  # type: ignore[attr-defined]
    assert [(m.name, m.available) for m in missing] == [("gvisor", False)]
    assert "runsc not found" in missing[0].detail and "--BackendApp.runsc=PATH" in missing[0].detail


@pytest.mark.gvisor
def test_installed_runsc_gives_gvisor_its_settings_and_capabilities(tmp_path: Path) -> None:
    runsc = shutil.which("runsc")
    assert runsc is not None
    app = BackendApp(runsc=runsc, pids_limit=512, sandbox_uid=1234, sandbox_gid=4321, platform="ptrace")
    runtimes, missing = app.build_runtimes(tmp_path, "")
    assert list(runtimes) == ["process", "gvisor"] and missing == []
    gvisor = runtimes["gvisor"]
    assert isinstance(gvisor, GvisorRuntime)  # the test checks the build; the backend never asks this
    assert (gvisor.pids_limit, gvisor.user.uid, gvisor.user.gid, gvisor.platform) == (512, 1234, 4321, "ptrace")
    caps = gvisor.capabilities
    assert caps.memory_snapshots and caps.clone and caps.version == gvisor.features.version
    assert caps.live_checkpoint == gvisor.features.can_snapshot_live_kernel
    assert caps.gpu_checkpoint == gvisor.features.cuda_checkpoint


def test_the_built_in_list_matches_the_installed_group() -> None:
    installed = {ep.name: ep.value for ep in entry_points(group=RUNTIME_GROUP)}
    assert {n: installed[n] for n in BUILTIN_RUNTIMES} == BUILTIN_RUNTIMES


def test_an_uninstalled_tree_falls_back_to_the_built_in_runtimes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from snapkernel.backend import server

    monkeypatch.setattr(server, "entry_points", lambda group: [])
    runtimes, missing = BackendApp(runsc=str(tmp_path / "no-runsc")).build_runtimes(tmp_path, "")
    assert list(runtimes) == ["process"] and [m.name for m in missing] == ["gvisor"]


def test_the_process_runtime_lifts_a_cpu_quota_and_puts_it_back(tmp_path: Path) -> None:
    """While a hibernating GPU kernel copies its tensors (hibernation.py), its cgroup's quota is lifted."""
    runtime = ProcessRuntime()
    runtime.cgroup_base = tmp_path  # a plain directory in place of the cgroup tree: what it writes is read back
    record = SandboxRecord(id="sb-000000000001", kernel_id="k", runtime="process", spec=pb.SandboxSpec(),
                           dir=str(tmp_path))
    (tmp_path / record.id).mkdir()
    runtime.set_cpu_limit(record, None)
    assert (tmp_path / record.id / "cpu.max").read_text() == "max 100000"
    runtime.set_cpu_limit(record, 1.5)
    assert (tmp_path / record.id / "cpu.max").read_text() == "150000 100000"
    gone = SandboxRecord(id="sb-000000000002", kernel_id="k", runtime="process", spec=pb.SandboxSpec(),
                         dir=str(tmp_path))
    runtime.set_cpu_limit(gone, None)  # no cgroup (rlimits, or already removed): nothing to change
    assert not (tmp_path / gone.id).exists()
