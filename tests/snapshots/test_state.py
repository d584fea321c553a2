"""State snapshots: the namespace saved portably and loaded into a fresh kernel, on any runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.conftest import Backend
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec
from tests.snapshots.test_memory import backend_call


def test_state_snapshot_moves_variables_to_a_fresh_kernel(backend: Backend, kernelspec_dir: Path) -> None:
    with running_kernel() as (_km, kc):
        run(kc, "import os, math, numpy as np, threading\n"
                "table = {'rows': [1, 2, 3], 'name': 'fit'}\narr = np.arange(12, dtype=np.float32).reshape(3, 4)\n"
                "def helper(x):\n    return x * 2 + len(table['rows'])\n"
                "square = lambda v: v * v\nlock = threading.Lock()\n_private = 1\n"
                "with open('notes.txt', 'w') as notes:\n    notes.write('x')\nlog = open('log.txt', 'w')")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        snap: pb.SnapshotInfo = backend_call(backend, lambda c: c.create_snapshot(sandbox, "state", "vars"))
        assert snap.kind == "state" and "arr.npy" in {f.name for f in snap.files}
        assert dict(snap.skipped).keys() == {"lock", "log"} and "pickle" in snap.skipped["lock"]
        assert snap.skipped["log"].startswith("an open file 'log.txt' (mode 'w'): ")
        # The agent's own request left no trace in the notebook's session.
        _, outputs = run(kc, "1")
        assert not [m for m in outputs if m["msg_type"] == "stream"]
    resume = write_kernelspec(kernelspec_dir, f"snapkernel-test-state-{backend.runtime}", {"restore_from": snap.id})
    with running_kernel(resume) as (_km, kc):
        assert value(kc, "table") == "{'rows': [1, 2, 3], 'name': 'fit'}"
        assert value(kc, "arr.dtype.name, arr.shape, float(arr.sum())") == "('float32', (3, 4), 66.0)"
        assert value(kc, "helper(10), square(4), math.pi > 3, np.__name__") == "(23, 16, True, 'numpy')"
        assert value(kc, "'lock' in globals(), '_private' in globals()") == "(False, False)"
        assert value(kc, "notes, notes.closed") == "(<closed file 'notes.txt', mode 'w'>, True)"


@pytest.mark.gvisor
@pytest.mark.parametrize("backend", ["gvisor"], indirect=True)
def test_state_snapshot_moves_across_runtimes(backend: Backend, kernelspec_dir: Path) -> None:
    source = write_kernelspec(kernelspec_dir, "snapkernel-test-state-src", {"runtime": "gvisor"})
    with running_kernel(source) as (_km, kc):
        run(kc, "import os\nmoved = list(range(5))")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        snap = backend_call(backend, lambda c: c.create_snapshot(sandbox, "state"))
    target = write_kernelspec(kernelspec_dir, "snapkernel-test-state-dst", {"runtime": "process",
                                                                            "restore_from": snap.id})
    with running_kernel(target) as (_km, kc):
        assert value(kc, "moved") == "[0, 1, 2, 3, 4]"
        assert value(kc, "__import__('os').uname().release") != "'4.4.0'"  # now outside gVisor


def test_resume_command_serves_the_snapshot_until_stopped(backend: Backend) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys

    from jupyter_client.blocking.client import BlockingKernelClient

    with running_kernel() as (_km, kc):
        run(kc, "import os\nresumed_value = 'from the snapshot'")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        snap = backend_call(backend, lambda c: c.create_snapshot(sandbox, "state"))
    proc = subprocess.Popen([sys.executable, "-m", "snapkernel.cli", "resume", snap.id, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        client = BlockingKernelClient(connection_file=info["connection_file"])
        client.load_connection_file()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=60)
            assert value(client, "resumed_value") == "'from the snapshot'"
        finally:
            client.stop_channels()
        assert info["id"] in [s.id for s in backend_call(backend, lambda c: c.list_sandboxes())]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    assert info["id"] not in [s.id for s in backend_call(backend, lambda c: c.list_sandboxes())]


@pytest.mark.parametrize("kind", ["state", pytest.param("memory", marks=pytest.mark.gvisor)])
def test_snapshot_magic_snapshots_when_the_cell_ends(backend: Backend, kind: str) -> None:
    import time

    if kind == "memory" and backend.runtime != "gvisor":
        pytest.skip("memory snapshots are gvisor's")
    name = f"magic-{kind}-{backend.runtime}"
    with running_kernel() as (_km, kc):
        content, outputs = run(kc, f"%snapshot --name {name} --kind {kind}\nafter_magic = 1")
        assert content["status"] == "ok"
        assert any("will be taken when this cell finishes" in m["content"].get("text", "") for m in outputs)
        deadline = time.monotonic() + 60
        found: list[pb.SnapshotInfo] = []
        while not found and time.monotonic() < deadline:
            found = [s for s in backend_call(backend, lambda c: c.list_snapshots()) if s.name == name]
            time.sleep(0.2)
        assert found and found[0].kind == kind
        content, _ = run(kc, "%snapshot --kind disk")
        assert content["status"] == "error" and "invalid choice: 'disk'" in content["evalue"]


@pytest.mark.gpu
def test_state_snapshot_puts_gpu_tensors_back_on_a_gpu_or_the_cpu(backend: Backend, kernelspec_dir: Path) -> None:
    """A CUDA tensor comes back on the GPU where there is one, and on the CPU where there is none."""
    from snapkernel.host.gpus import inventory

    model = inventory()[0][0].model
    gpu_kernel = write_kernelspec(kernelspec_dir, f"snapkernel-test-state-gpu-{backend.runtime}", {"gpu": model})
    with running_kernel(gpu_kernel) as (_km, kc):
        if value(kc, "__import__('importlib.util').util.find_spec('torch') is not None") != "True":
            pytest.skip("needs torch in the kernel")
        run(kc, "import os, torch\nt = torch.arange(6, dtype=torch.float32, device='cuda').reshape(2, 3)")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        snap = backend_call(backend, lambda c: c.create_snapshot(sandbox, "state"))
    on_gpu = write_kernelspec(kernelspec_dir, f"snapkernel-test-state-gpu-back-{backend.runtime}",
                              {"gpu": model, "restore_from": snap.id})
    with running_kernel(on_gpu) as (_km, kc):
        assert value(kc, "t.device.type, t.shape, float(t.sum())") == "('cuda', torch.Size([2, 3]), 15.0)"
    on_cpu = write_kernelspec(kernelspec_dir, f"snapkernel-test-state-cpu-back-{backend.runtime}",
                              {"restore_from": snap.id})
    with running_kernel(on_cpu) as (_km, kc):
        assert value(kc, "t.device.type, float(t.sum())") == "('cpu', 15.0)"
