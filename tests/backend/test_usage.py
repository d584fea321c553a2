"""Per-sandbox usage: CPU and memory of the sandbox's process tree, GPUs from NVML where there are any."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapkernel.client import BackendClient
from snapkernel.errors import InvalidSpecError, NotFoundError
from snapkernel.host.gpus import gpu_usage
from snapkernel.host.processes import sample_tree
from tests.conftest import Backend
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec


def test_process_tree_includes_descendants() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        time.sleep(1.0)
        sample = sample_tree(os.getpid())
        assert os.getpid() in sample.pids and child.pid in sample.pids
        assert sample.memory > 64 << 20
    finally:
        child.kill()
        child.wait()


def test_no_gpus_asked_means_no_gpu_figures() -> None:
    assert gpu_usage([], [1]) == ([], "")


async def test_sandbox_usage_reports_its_cpu_and_memory(backend: Backend) -> None:
    with running_kernel() as (_, kc):
        sandbox_id = value(kc, "__import__('os').environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        # Written, not just allocated: untouched pages are not resident under gVisor's ptrace platform.
        content, _ = run(kc, "import threading, time\nblob = b'\\x01' * (300 << 20)\n"
                             "def spin():\n    end = time.time() + 8\n    while time.time() < end: pass\n"
                             "threading.Thread(target=spin, daemon=True).start()")
        assert content["status"] == "ok"
        client = BackendClient(backend.address, backend.token)
        try:
            usage = await client.sandbox_usage(sandbox_id)
            assert usage.sandbox_id == sandbox_id and usage.processes >= 1
            assert usage.memory_used > 300 << 20, usage
            assert usage.cpu_percent > 30, usage  # one thread spinning: about 100% of a core
            assert usage.cpu_limit > 0 and usage.memory_limit > 0
            assert not usage.gpus  # a CPU kernel has no GPU
            with pytest.raises(NotFoundError, match="no sandbox 'sb-000000000000'"):
                await client.sandbox_usage("sb-000000000000")
            with pytest.raises(InvalidSpecError, match="'nope'"):
                await client.sandbox_usage("nope")
        finally:
            await client.close()


@pytest.mark.gpu
async def test_gpu_sandbox_usage_reports_its_gpu(backend: Backend, kernelspec_dir: Path) -> None:
    from snapkernel.host.gpus import inventory

    gpu = inventory()[0][0]
    with running_kernel(write_kernelspec(kernelspec_dir, "snapkernel-test-usage-gpu", {"gpu": gpu.model})) as (_, kc):
        sandbox_id = value(kc, "__import__('os').environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        has_torch = value(kc, "__import__('importlib.util').util.find_spec('torch') is not None") == "True"
        if has_torch:
            run(kc, "import torch\nx = torch.ones(256 << 20, dtype=torch.uint8, device='cuda')")
        client = BackendClient(backend.address, backend.token)
        try:
            usage = await client.sandbox_usage(sandbox_id)
        finally:
            await client.close()
        assert len(usage.gpus) == 1, usage
        assert usage.gpus[0].model == gpu.model and usage.gpus[0].memory_total == gpu.memory_total
        if has_torch:
            assert usage.gpus[0].memory_used >= 256 << 20
            if usage.gpus[0].sandbox_memory_known:
                assert usage.gpus[0].sandbox_memory_used >= 256 << 20, usage
