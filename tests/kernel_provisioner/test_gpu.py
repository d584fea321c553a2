"""GPU kernels: whole GPUs from the NVML inventory, visible to their sandbox alone. Skipped without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapkernel.host.gpus import inventory
from tests.conftest import Backend
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec

pytestmark = pytest.mark.gpu


def gpu_kernelspec(kernelspec_dir: Path, name: str, gpu: str) -> str:
    return write_kernelspec(kernelspec_dir, name, {"gpu": gpu})


def test_gpu_kernel_gets_its_gpu_and_cpu_kernel_none(backend: Backend, kernelspec_dir: Path) -> None:
    gpus = inventory()[0]
    model = gpus[0].model
    name = gpu_kernelspec(kernelspec_dir, "snapkernel-test-gpu", model)
    with running_kernel(name) as (_km, kc):
        run(kc, "import os")
        visible = value(kc, "os.environ['CUDA_VISIBLE_DEVICES']").strip("'")
        assert visible and visible.split(",")[0] in {str(g.index) for g in gpus}
        if value(kc, "__import__('importlib.util').util.find_spec('torch') is not None") == "True":
            run(kc, "import torch\nx = torch.ones(1 << 20, device='cuda')")
            assert value(kc, "torch.cuda.device_count()") == "1"
            assert value(kc, "float(x.sum())") == str(float(1 << 20))
        too_many = gpu_kernelspec(kernelspec_dir, "snapkernel-test-gpu-all", f"{model}:{len(gpus)}")
        with pytest.raises(Exception, match=f"asked for {len(gpus)} GPU\\(s\\) of model '{model}'"), \
                running_kernel(too_many):
            pass
    with running_kernel() as (_km, kc):
        run(kc, "import os")
        assert value(kc, "os.environ['CUDA_VISIBLE_DEVICES']") == "''"
        if value(kc, "__import__('importlib.util').util.find_spec('torch') is not None") == "True":
            assert value(kc, "__import__('torch').cuda.is_available()") == "False"


def test_status_and_kernelspecs_name_the_gpu_model(backend: Backend, tmp_path: Path) -> None:
    import subprocess
    import sys

    model = inventory()[0][0].model
    status = json.loads(subprocess.run([sys.executable, "-m", "snapkernel.cli", "status", "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert status["gpus"][0]["model"] == model and status["driver_version"]
    out = subprocess.run([sys.executable, "-m", "snapkernel.cli", "kernels", "install", "--prefix", str(tmp_path),
                          "--json"], capture_output=True, text=True, check=True).stdout
    assert f"snapkernel-gpu-{model.lower()}" in [k["id"] for k in json.loads(out)]
