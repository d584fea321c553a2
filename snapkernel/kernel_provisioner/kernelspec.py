"""The snapkernel kernelspecs: `snapkernel-python` and one `snapkernel-gpu-<model>` per GPU model."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

CPU_KERNEL = "snapkernel-python"


def kernel_json(display_name: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {"provisioner_name": "snapkernel", "config": config},
        },
    }


def specs_for(gpu_models: dict[str, int]) -> dict[str, dict[str, Any]]:
    """{kernel name: kernel.json} for the CPU kernel and each GPU model (model → how many here)."""
    specs = {CPU_KERNEL: kernel_json("Python 3 (snapkernel)", {})}
    for model in sorted(gpu_models):
        name = f"snapkernel-gpu-{model.lower()}"
        specs[name] = kernel_json(f"Python 3 (snapkernel, {model} GPU)", {"gpu": model})
    return specs


def install(gpu_models: dict[str, int], user: bool = False, prefix: str | None = None) -> list[tuple[str, str]]:
    """Install the kernelspecs; returns [(name, path)]."""
    ksm = KernelSpecManager()
    if not user and prefix is None:
        prefix = sys.prefix
    installed = []
    for name, spec in specs_for(gpu_models).items():
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "kernel.json").write_text(json.dumps(spec, indent=1))
            path = ksm.install_kernel_spec(tmp, kernel_name=name, user=user, prefix=prefix)
        installed.append((name, path))
    return installed


def installed() -> list[dict[str, Any]]:
    """The installed kernelspecs that use the snapkernel provisioner."""
    out = []
    for name, info in sorted(KernelSpecManager().get_all_specs().items()):
        spec = info.get("spec", {})
        prov = spec.get("metadata", {}).get("kernel_provisioner", {})
        if prov.get("provisioner_name") == "snapkernel":
            out.append({"id": name, "display_name": spec.get("display_name", name),
                        "config": prov.get("config", {}), "path": info.get("resource_dir", "")})
    return out
