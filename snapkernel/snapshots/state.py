"""State snapshots: the kernel's user namespace, portable across runtimes and GPU models.

Runs inside the kernel (the agent asks it to). Arrays and tensors (numpy, torch, cupy, jax) are written as
raw `.npy` buffers, in parallel, with the device they lived on; modules are recorded by name and imported
again; everything else goes through cloudpickle, one file per variable, so one object that cannot be
saved only costs its own name, reported with the reason.
"""

from __future__ import annotations

import json
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# The namespace's index. Not `manifest.json`: that name is the store's own record of every snapshot;
# state snapshots written before then keep their index there (`load` reads either).
MANIFEST = "variables.json"
_OLD_MANIFEST = "manifest.json"
_SKIP = {"In", "Out", "exit", "quit", "get_ipython", "open"}


def save_code(relative: str) -> str:
    """Code for the kernel: save its namespace under $HOME/relative (HOME is the sandbox's workspace)."""
    return (f"__import__('snapkernel.snapshots.state', fromlist=['save']).save("
            f"__import__('os').path.join(__import__('os').environ['HOME'], {relative!r}))")


def load_code(relative: str) -> str:
    return (f"__import__('snapkernel.snapshots.state', fromlist=['load']).load("
            f"__import__('os').path.join(__import__('os').environ['HOME'], {relative!r}))")


def _namespace() -> dict[str, Any]:
    from IPython import get_ipython

    ip = get_ipython()
    if ip is None:
        raise RuntimeError("state snapshots run inside an IPython kernel")
    hidden = set(getattr(ip, "user_ns_hidden", {}))
    ns: dict[str, Any] = ip.user_ns
    return {k: v for k, v in ns.items() if not k.startswith("_") and k not in _SKIP and k not in hidden}


def _as_array(value: Any) -> tuple[Any, str] | None:
    """(a numpy array of the same bytes, the framework and device it came from), or None."""
    np = sys.modules.get("numpy")
    if np is not None and type(value) is np.ndarray and value.dtype != object:
        return value, "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor) and type(value) is torch.Tensor:
        return value.detach().cpu().numpy(), f"torch:{value.device}:{value.requires_grad}"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(value, cupy.ndarray):
        return cupy.asnumpy(value), "cupy"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(value, jax.Array):
        import numpy

        return numpy.asarray(value), "jax"
    return None


def save(path: str) -> dict[str, Any]:
    """Write the user namespace under `path`; print and return the report."""
    import cloudpickle
    import numpy as np

    base = Path(path)
    base.mkdir(parents=True, exist_ok=False)
    manifest: dict[str, Any] = {"arrays": {}, "pickles": [], "modules": {}, "skipped": {}}
    arrays: list[tuple[str, Any]] = []
    for name, value in _namespace().items():
        if isinstance(value, types.ModuleType):
            manifest["modules"][name] = value.__name__
            continue
        try:
            as_array = _as_array(value)
        except Exception as e:
            manifest["skipped"][name] = f"{type(e).__name__}: {e}"
            continue
        if as_array is not None:
            arrays.append((name, as_array[0]))
            manifest["arrays"][name] = as_array[1]
            continue
        try:
            data = cloudpickle.dumps(value)
        except Exception as e:
            manifest["skipped"][name] = f"{type(e).__name__}: {e}"
            continue
        (base / f"{name}.pkl").write_bytes(data)
        manifest["pickles"].append(name)

    def write(item: tuple[str, Any]) -> None:
        np.save(base / f"{item[0]}.npy", item[1], allow_pickle=False)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, arrays))
    (base / MANIFEST).write_text(json.dumps(manifest))
    report = {"saved": len(manifest["arrays"]) + len(manifest["pickles"]) + len(manifest["modules"]),
              "skipped": manifest["skipped"]}
    print(json.dumps(report))
    return report


def _on_device(array: Any, origin: str) -> Any:
    if origin.startswith("torch:"):
        import torch

        _, device, grad = origin.split(":", 2) if origin.count(":") >= 2 else (origin, "cpu", "False")
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # portable: a GPU tensor lands on the CPU where no GPU is
        return torch.from_numpy(array).to(device).requires_grad_(grad == "True")
    if origin == "cupy":
        try:
            import cupy

            return cupy.asarray(array)
        except Exception:
            return array
    if origin == "jax":
        import jax.numpy as jnp

        return jnp.asarray(array)
    return array


def load(path: str) -> dict[str, Any]:
    """Put a saved namespace back into this kernel; print and return the report."""
    import importlib

    import cloudpickle
    import numpy as np
    from IPython import get_ipython

    ns = get_ipython().user_ns
    base = Path(path)
    index = base / MANIFEST if (base / MANIFEST).is_file() else base / _OLD_MANIFEST
    manifest = json.loads(index.read_text())
    failed: dict[str, str] = {}
    for name, module in manifest["modules"].items():
        try:
            ns[name] = importlib.import_module(module)
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {e}"
    for name, origin in manifest["arrays"].items():
        ns[name] = _on_device(np.load(base / f"{name}.npy", allow_pickle=False), origin)
    for name in manifest["pickles"]:
        try:
            ns[name] = cloudpickle.loads((base / f"{name}.pkl").read_bytes())
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {e}"
    report = {"restored": len(manifest["arrays"]) + len(manifest["pickles"]) + len(manifest["modules"]) - len(failed),
              "failed": failed, "skipped_at_snapshot": manifest["skipped"]}
    print(json.dumps(report))
    return report
