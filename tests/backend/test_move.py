"""Moving a live kernel to other resources: the same sandbox and Jupyter kernel, its variables intact, cells sent
meanwhile run after it, once; what cannot be done is refused before anything stops, and a move that fails half-way
leaves the kernel where it was."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from snapkernel.errors import InvalidSpecError, NoCapacityError, SnapkernelError, StateError
from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.backend.test_hibernation import get, sandbox_of
from tests.conftest import Backend
from tests.kernel_provisioner.kernel_helpers import reply_to, run, running_kernel, value, write_kernelspec
from tests.snapshots.test_memory import backend_call

OTHER = {"process": "gvisor", "gvisor": "process"}
SMALL = {"cpu": 1, "memory": "1Gi"}
# Everything the issue names: numpy arrays, a DataFrame, a function and a class instance of the notebook's own,
# an imported module, and the closed file `with open(...)` leaves behind.
STATE = """
import numpy as np, pandas as pd, json as js
arr = np.arange(1_000_000, dtype=np.int64)
df = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
def double(v):
    return 2 * v
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
p = Point(3, 4)
with open("notes.txt", "w") as fh:
    fh.write("kept")
counter = 0
"""
CHECK = ("(int(arr.sum()), df['b'].tolist(), double(21), (p.x, p.y), js.dumps([1]), fh.closed, "
         "open('notes.txt').read(), counter)")
EXPECTED = f"({sum(range(1_000_000))}, ['x', 'y', 'z'], 42, (3, 4), '[1]', True, 'kept', 1)"


def move(backend: Backend, sandbox: str, **overrides: Any) -> pb.Sandbox:
    request = pb.MoveSandboxRequest(id=sandbox, **overrides)
    result: pb.Sandbox = backend_call(backend, lambda c: c.move_sandbox(request))
    return result


def wait_moving(backend: Backend, sandbox: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while get(backend, sandbox).state != pb.MOVING:
        assert time.monotonic() < deadline, "the move never began"
        time.sleep(0.02)


@pytest.mark.parametrize("change", ["runtime", "cpu", "memory", "disk"])
def test_a_moved_kernel_keeps_its_variables_and_runs_the_cell_sent_meanwhile_once(
        backend: Backend, kernelspec_dir: Path, change: str) -> None:
    name = write_kernelspec(kernelspec_dir, "snapkernel-test-move", SMALL)
    choices: dict[str, dict[str, Any]] = {"runtime": {"runtime": OTHER[backend.runtime]}, "cpu": {"cpu": 2},
                                          "memory": {"memory": "2Gi"}, "disk": {"disk": "12Gi"}}
    overrides = choices[change]
    with running_kernel(name) as (km, kc):
        sandbox = sandbox_of(kc)
        before = get(backend, sandbox)
        content, _ = run(kc, STATE)
        assert content["status"] == "ok", content
        cells = int(value(kc, "get_ipython().execution_count"))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            moving = pool.submit(move, backend, sandbox, **overrides)
            wait_moving(backend, sandbox)
            sent = kc.execute("counter += 1")  # held while it moves, then run there, once
            moved = moving.result(timeout=180)
        assert reply_to(kc, sent, timeout=60)["content"]["status"] == "ok"
        assert moved.id == sandbox and moved.kernel_id == before.kernel_id and moved.state == pb.RUNNING
        assert "moved to" in moved.message, moved.message
        for key, want in overrides.items():
            assert getattr(moved.spec, key) == want, moved.spec
        assert moved.runtime == overrides.get("runtime", backend.runtime)
        assert value(kc, CHECK) == EXPECTED
        assert int(value(kc, "get_ipython().execution_count")) > cells  # the notebook's cell numbers go on
        assert km.is_alive()
        if change == "memory":  # the new limit holds: more than the old 1Gi fits now
            assert value(kc, "len(bytearray(1400 * 2**20))", timeout=120) == str(1400 * 2**20)
        mounted = subprocess.run(["findmnt", "-n", f"{backend.state_dir}/sandboxes/{sandbox}/workspace"],
                                 capture_output=True, check=False).returncode == 0
        if change == "disk" and mounted:  # the workspace's file system grew, files and all
            total = int(value(kc, "__import__('shutil').disk_usage(__import__('os').environ['HOME']).total"))
            assert 11 << 30 < total <= 12 << 30, total
        if change == "cpu" and moved.runtime == "process":  # the new limit holds
            if moved.limits == "cgroup2":
                assert Path(f"/sys/fs/cgroup/snapkernel/{sandbox}/cpu.max").read_text().split()[0] == "200000"
            else:  # pinned to as many cores
                assert value(kc, "len(__import__('os').sched_getaffinity(0))") == str(min(2, len(
                    __import__("os").sched_getaffinity(0))))


def test_a_move_that_cannot_be_met_is_refused_before_anything_stops(backend: Backend, kernelspec_dir: Path) -> None:
    name = write_kernelspec(kernelspec_dir, "snapkernel-test-move", SMALL)
    with running_kernel(name) as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "kept = [1, 2, 3]\nballast = bytearray(100 * 2**20)")
        pid = get(backend, sandbox).pid
        refusals: list[tuple[dict[str, Any], type[SnapkernelError], str]] = [
            ({"gpu": "H100"}, NoCapacityError, "no GPU of model 'H100' here"),
            ({"memory": "1Ti"}, NoCapacityError, "more than this host's"),
            ({"memory": "lots"}, InvalidSpecError, "'lots'"),
            ({"cpu": -1.0}, InvalidSpecError, "cpu -1 is not valid"),
            ({"runtime": "docker"}, InvalidSpecError, "runtime 'docker' is not known"),
            ({"disk": "1Gi"}, InvalidSpecError, "a workspace can grow, not shrink"),
            ({"disk": "1Pi"}, InvalidSpecError, "disk '1Pi' is more than this host has"),
            ({"cpu": 1.0, "memory": "1Gi"}, InvalidSpecError, "has .* already"),
            ({"memory": "64Mi"}, NoCapacityError, "its kernel uses .* more than the 64Mi"),
        ]
        for overrides, error, match in refusals:
            with pytest.raises(error, match=match):
                move(backend, sandbox, **overrides)
        with pytest.raises(InvalidSpecError, match="timeout -1"):
            move(backend, sandbox, cpu=2, timeout=-1)
        with pytest.raises(InvalidSpecError, match="sandbox id"):
            move(backend, "sb-../../etc", cpu=2)
        sb = get(backend, sandbox)
        assert sb.state == pb.RUNNING and sb.pid == pid and sb.spec.memory == "1Gi"  # never stopped
        assert value(kc, "kept") == "[1, 2, 3]"


@pytest.mark.parametrize("backend", ["process"], indirect=True)
def test_a_state_move_refuses_variables_it_cannot_carry(backend: Backend, kernelspec_dir: Path) -> None:
    name = write_kernelspec(kernelspec_dir, "snapkernel-test-move", SMALL)
    with running_kernel(name) as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "gen = (i for i in range(5))\nfirst = next(gen)")
        pid = get(backend, sandbox).pid
        with pytest.raises(StateError, match="gen"):
            move(backend, sandbox, cpu=2)
        sb = get(backend, sandbox)
        assert sb.state == pb.RUNNING and sb.pid == pid and "could not move" in sb.message
        assert value(kc, "next(gen)") == "1"


@pytest.mark.parametrize("backend", [pytest.param("process", marks=pytest.mark.gvisor)], indirect=True)
def test_a_move_whose_new_sandbox_fails_leaves_the_kernel_where_it_was(backend: Backend,
                                                                      kernelspec_dir: Path) -> None:
    # 300 MiB of variables fit the kernel's 1Gi where it runs, not a gvisor sandbox of 512Mi (a kernel there
    # takes about that much address space by itself): the new sandbox fails as it loads them, or as it starts.
    name = write_kernelspec(kernelspec_dir, "snapkernel-test-move", SMALL)
    with running_kernel(name) as (_km, kc):
        sandbox = sandbox_of(kc)
        content, _ = run(kc, "import numpy\nbig = numpy.ones(300 * 2**20 // 8)\nx = 41")
        assert content["status"] == "ok", content
        with pytest.raises(StateError, match=r"could not move to gvisor, .*, so it runs where it was"):
            move(backend, sandbox, runtime="gvisor", memory="512Mi")
        sb = get(backend, sandbox)
        assert sb.state == pb.RUNNING and sb.runtime == "process" and sb.spec.memory == "1Gi"
        assert "could not move" in sb.message
        assert value(kc, "(x + 1, int(big.sum()))") == f"(42, {300 * 2**20 // 8})"


def test_move_magic_moves_when_the_cell_ends(backend: Backend, kernelspec_dir: Path) -> None:
    name = write_kernelspec(kernelspec_dir, "snapkernel-test-move", SMALL)
    with running_kernel(name) as (_km, kc):
        sandbox = sandbox_of(kc)
        content, outputs = run(kc, "y = 'before'\n%move --cpu 2")
        assert content["status"] == "ok", content
        assert any("moves to cpu 2.0 when this cell finishes" in m["content"].get("text", "") for m in outputs)
        content, outputs = run(kc, "y", timeout=180)  # held until the move is done
        assert content["status"] == "ok"
        assert any("this kernel moved to" in m["content"].get("text", "") for m in outputs), outputs
        assert get(backend, sandbox).spec.cpu == 2
        content, _ = run(kc, "%move --memory lots")
        assert content["status"] == "error" and "'lots'" in content["evalue"]
        content, _ = run(kc, "%move")
        assert content["status"] == "error" and "give the resources" in content["evalue"]
        run(kc, "%move --memory 1Ti")  # refused by the backend: the next cell says so
        time.sleep(1)
        outputs = run(kc, "y")[1]
        assert any("%move failed" in m["content"].get("text", "") and "1Ti" in m["content"]["text"]
                   for m in outputs), outputs


def test_sandboxes_move_command(backend: Backend, kernelspec_dir: Path) -> None:
    name = write_kernelspec(kernelspec_dir, "snapkernel-test-move", SMALL)
    env = {**backend.env(), "PATH": "/usr/bin:/bin"}
    with running_kernel(name) as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "z = 7")
        out = subprocess.run([sys.executable, "-m", "snapkernel.cli", "sandboxes", "move", sandbox, "--memory",
                              "1536Mi"], capture_output=True, text=True, env=env, timeout=300, check=False)
        assert out.returncode == 0, out.stderr
        assert "moved to" in out.stdout and "saving the kernel" in out.stderr
        assert value(kc, "z") == "7"
        bad = subprocess.run([sys.executable, "-m", "snapkernel.cli", "sandboxes", "move", sandbox],
                             capture_output=True, text=True, env=env, timeout=60, check=False)
        assert bad.returncode != 0 and "give the resources to move to" in bad.stderr


def _torch_kernel(kernelspec_dir: Path, gpu: str) -> str:
    if not __import__("importlib.util").util.find_spec("torch"):
        pytest.skip("needs torch (bench/gpu_wheels.sh fetches it)")
    return write_kernelspec(kernelspec_dir, "snapkernel-test-move-gpu", {"gpu": gpu, "runtime": "process"})


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["process"], indirect=True)
def test_a_cuda_tensor_lands_on_the_gpu_of_the_new_sandbox(backend: Backend, kernelspec_dir: Path) -> None:
    from snapkernel.host.gpus import inventory

    gpus = inventory()[0]
    with running_kernel(_torch_kernel(kernelspec_dir, "any:1")) as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "import torch\nx = torch.arange(1 << 20, device='cuda', dtype=torch.float32)")
        before = get(backend, sandbox).gpu_indices
        # Two GPUs where there are two (the tensor lands on the new sandbox's first); else more memory, same GPU.
        moved = move(backend, sandbox, gpu="any:2") if len(gpus) > 1 else move(backend, sandbox, memory="6Gi")
        assert moved.state == pb.RUNNING and len(moved.gpu_indices) == (2 if len(gpus) > 1 else 1), before
        assert value(kc, "(str(x.device), float(x.sum()), torch.cuda.device_count())") == \
            f"('cuda:0', {float(sum(range(1 << 20)))}, {2 if len(gpus) > 1 else 1})"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["process"], indirect=True)
def test_gpu_tensors_go_to_host_memory_only_when_allowed(backend: Backend, kernelspec_dir: Path) -> None:
    with running_kernel(_torch_kernel(kernelspec_dir, "any:1")) as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "import torch\nweights = torch.ones(1 << 20, device='cuda')")
        with pytest.raises(StateError, match=r"holds GPU tensors .*weights \(4Mi\).*allow_cpu_fallback"):
            move(backend, sandbox, gpu="")
        assert value(kc, "str(weights.device)") == "'cuda:0'"  # it stayed, on its GPU
        moved = move(backend, sandbox, gpu="", allow_cpu_fallback=True)
        assert moved.state == pb.RUNNING and list(moved.gpu_indices) == []
        assert value(kc, "(str(weights.device), float(weights.sum()))") == f"('cpu', {float(1 << 20)})"


def test_a_backend_killed_while_a_kernel_moves_loses_nothing(own_backend: Backend, kernelspec_dir: Path) -> None:
    # SIGKILLed as the kernel is saved (or its new sandbox starts): the next backend finds it running, or saved
    # and hibernated, and the next cell has every variable.
    name = write_kernelspec(kernelspec_dir, "snapkernel-test-move", {"cpu": 1, "memory": "2Gi"})
    with running_kernel(name) as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "import numpy\ndata = numpy.random.default_rng(0).integers(0, 255, 400 << 20, dtype=numpy.uint8)\n"
                "check = int(data[::4096].sum())")
        check = value(kc, "check")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            moving = pool.submit(move, own_backend, sandbox, cpu=2)
            wait_moving(own_backend, sandbox)
            own_backend.stop(signal.SIGKILL)
            with pytest.raises(SnapkernelError):
                moving.result(timeout=60)
        own_backend.start()
        deadline = time.monotonic() + 120
        while (sb := get(own_backend, sandbox)).state not in (pb.RUNNING, pb.HIBERNATED):
            assert time.monotonic() < deadline and sb.state == pb.MOVING, sb
            time.sleep(0.2)
        assert value(kc, "int(data[::4096].sum())", timeout=120) == check
        assert get(own_backend, sandbox).state == pb.RUNNING
        assert not list((own_backend.state_dir / "sandboxes" / sandbox / "workspace").glob(".snapkernel-*"))


@pytest.mark.parametrize("backend", [pytest.param("gvisor", marks=pytest.mark.gvisor)], indirect=True)
def test_a_memory_snapshot_resumes_with_more_memory(backend: Backend, kernelspec_dir: Path) -> None:
    name = write_kernelspec(kernelspec_dir, "snapkernel-test-move", SMALL)
    with running_kernel(name) as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "kept = 'from the snapshot'")
        snap: pb.SnapshotInfo = backend_call(backend, lambda c: c.create_snapshot(sandbox, "memory"))
    bigger = write_kernelspec(kernelspec_dir, "snapkernel-test-move-resume", {"restore_from": snap.id, "cpu": 2,
                                                                             "memory": "2Gi"})
    with running_kernel(bigger) as (_km, kc):
        assert value(kc, "kept") == "'from the snapshot'"
        assert value(kc, "len(bytearray(1400 * 2**20))", timeout=120) == str(1400 * 2**20)  # over the old 1Gi
    backend_call(backend, lambda c: c.delete_snapshot(snap.id))
