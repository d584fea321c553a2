"""State snapshots: the kernel's user namespace, portable across runtimes and GPU models.

Runs inside the kernel (the agent asks it to). Arrays and tensors (numpy, torch, cupy, jax) are written as
raw `.npy` buffers, in parallel, with the device they lived on; modules are recorded by name and imported
again; closed files (left by every `with open(...) as f`) as placeholders; everything else goes through
cloudpickle, one file per variable, so one object that cannot be saved only costs its own name, reported with
the reason.
"""

from __future__ import annotations

import io
import json
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

# The namespace's index. Not `manifest.json`: that name is the store's own record of every snapshot;
# state snapshots written before then keep their index there (`load` reads either).
MANIFEST = "variables.json"
_OLD_MANIFEST = "manifest.json"
_SKIP = {"In", "Out", "exit", "quit", "get_ipython", "open"}


NO_SPACE = "no space left"  # starts every message of a state snapshot that does not fit
_NPY_HEADER = 256  # bytes an .npy file holds beyond its array's data, at most (a generous bound)


def save_code(relative: str, host_free: int | None = None, copies: int = 1) -> str:
    """Code for the kernel: save its namespace under $HOME/relative (HOME is the sandbox's workspace).

    `host_free`: bytes the state dir's file system can give the snapshot; `copies`: how many times the files
    take that space (2 where the workspace is a file system of its own: written there, then copied).
    """
    return (f"__import__('snapkernel.snapshots.state', fromlist=['save']).save("
            f"__import__('os').path.join(__import__('os').environ['HOME'], {relative!r}), {host_free!r}, {copies!r})")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("Ki", "Mi", "Gi"):
        value /= 1024
        if value < 1024 or unit == "Gi":
            break
    return f"{value:.1f}{unit}"


def _no_space_in_workspace(free: int, needs: int) -> OSError:
    import errno

    return OSError(errno.ENOSPC, f"{NO_SPACE} in the sandbox's workspace: its disk quota is full ({_size(free)} "
                                 f"free, the state snapshot needs {_size(needs)}); free space in the workspace "
                                 "or ask for a larger `disk`")


def load_code(relative: str) -> str:
    return (f"__import__('snapkernel.snapshots.state', fromlist=['load']).load("
            f"__import__('os').path.join(__import__('os').environ['HOME'], {relative!r}))")


def gpu_variables_code() -> str:
    """Code for the kernel: print `gpu_variables()` as one JSON line (a move to a CPU-only spec checks it)."""
    return ("print(__import__('json').dumps(__import__('snapkernel.snapshots.state', "
            "fromlist=['gpu_variables']).gpu_variables()))")


def _namespace() -> dict[str, Any]:
    from IPython import get_ipython

    ip = get_ipython()
    if ip is None:
        raise RuntimeError("state snapshots run inside an IPython kernel")
    hidden = set(getattr(ip, "user_ns_hidden", {}))
    ns: dict[str, Any] = ip.user_ns
    return {k: v for k, v in ns.items() if not k.startswith("_") and k not in _SKIP and k not in hidden}


class ClosedFile:
    """What a closed file object is saved and restored as: its name and mode, and a closed file's errors.

    A closed file cannot be pickled, yet every `with open(...) as f` leaves one in the namespace; without a
    stand-in it would block hibernating or moving the kernel. Module-level, so cloudpickle saves it by
    reference.
    """

    closed = True

    def __init__(self, name: str | int | None, mode: str | None) -> None:
        self.name = name
        self.mode = mode

    def __repr__(self) -> str:
        name = "" if self.name is None else f" {self.name!r}"
        mode = "" if self.mode is None else f", mode {self.mode!r}"
        return f"<closed file{name}{mode}>"

    def _closed(self, *args: object, **kwargs: object) -> NoReturn:
        raise ValueError("I/O operation on closed file.")

    read = readline = readlines = write = writelines = seek = tell = truncate = fileno = flush = _closed
    readable = writable = seekable = isatty = __iter__ = __next__ = __enter__ = _closed

    def close(self) -> None:
        """Closing a closed file does nothing, as for a real one."""

    def __exit__(self, *exc: object) -> None:  # `with` needs it to reach __enter__'s error
        self.close()


def _file_types() -> tuple[type, ...]:
    """The file objects saved as `ClosedFile` once closed (compressed ones where their module is loaded)."""
    found: list[type] = [io.TextIOWrapper, io.BufferedReader, io.BufferedWriter, io.BufferedRandom, io.FileIO]
    for module, cls in (("gzip", "GzipFile"), ("bz2", "BZ2File"), ("lzma", "LZMAFile")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], cls))
    return tuple(found)


def _file_facts(f: Any) -> tuple[bool, str | int | None, str | None]:
    """(closed, name, mode) of a file object; name or mode None where it has none (e.g. a BZ2File)."""
    try:
        closed = bool(f.closed)
    except ValueError:  # a TextIOWrapper whose buffer was detached: no file left behind it
        closed = True
    try:
        name = f.name
    except (AttributeError, ValueError):
        name = None
    mode = getattr(f, "mode", None)
    if isinstance(mode, int):  # an older GzipFile: gzip.READ or gzip.WRITE
        mode = {1: "rb", 2: "wb"}.get(mode)
    return closed, name if isinstance(name, (str, int)) else None, mode if isinstance(mode, str) else None


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
        return cupy.asnumpy(value), f"cupy:{value.device.id}"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(value, jax.Array):
        import numpy

        return numpy.asarray(value), "jax"
    return None


def save(path: str, host_free: int | None = None, copies: int = 1) -> dict[str, Any]:
    """Write the user namespace under `path`; print and return the report.

    The size is known before anything is written (pickles are made in memory first): a snapshot that would
    not fit in the workspace, or in `host_free`, is refused with both numbers; on any failure what was
    written is removed.
    """
    import errno
    import shutil

    base = Path(path)
    if base.exists():
        raise FileExistsError(f"{base} exists already")
    # Nothing is written before the size is known and checked (on a full disk, not even the directory).
    manifest, arrays, pickles = _collect()
    needs = (sum(a.nbytes + _NPY_HEADER for _, a in arrays) + sum(len(d) for _, d in pickles)
             + len(json.dumps(manifest)) + 4096 * (len(arrays) + len(pickles) + 1))  # + a block a file
    free = shutil.disk_usage(base.parent).free
    if needs > free:
        raise _no_space_in_workspace(free, needs)
    if host_free is not None and needs * copies > host_free:
        raise OSError(errno.ENOSPC, f"{NO_SPACE} on the state dir's file system: {_size(host_free)} free, "
                                    f"the snapshot needs {_size(needs * copies)}; delete snapshots "
                                    "(`snapkernel snapshots rm`) or free space")
    base.mkdir(parents=True, exist_ok=False)
    try:
        try:
            _write(base, manifest, arrays, pickles)
        except OSError as e:
            # numpy reports a short write as "N requested and M written" or "Not enough free space to
            # write N bytes", with no errno.
            if (e.errno in (errno.ENOSPC, errno.EDQUOT) or "requested and" in str(e)
                    or "not enough free space" in str(e).lower()):
                raise _no_space_in_workspace(shutil.disk_usage(base.parent).free, needs) from e
            raise
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    report = {"saved": len(manifest["arrays"]) + len(manifest["pickles"]) + len(manifest["modules"]),
              "skipped": manifest["skipped"]}
    print(json.dumps(report))
    return report


def _collect() -> tuple[dict[str, Any], list[tuple[str, Any]], list[tuple[str, bytes]]]:
    """The namespace as (manifest, arrays to write, pickles to write), nothing written yet."""
    import cloudpickle

    # Closed files are pickles (of `ClosedFile`), named in "closed_files" too; `load` needs no more.
    from IPython import get_ipython

    # The cell count goes too: the notebook's next cell is [N+1] in the kernel that loads it, as it would have been.
    manifest: dict[str, Any] = {"arrays": {}, "pickles": [], "modules": {}, "skipped": {}, "closed_files": [],
                                "execution_count": getattr(get_ipython(), "execution_count", 0)}
    arrays: list[tuple[str, Any]] = []
    pickles: list[tuple[str, bytes]] = []
    file_types = _file_types()
    for name, value in _namespace().items():
        if isinstance(value, types.ModuleType):
            manifest["modules"][name] = value.__name__
            continue
        if isinstance(value, file_types):
            closed, file_name, mode = _file_facts(value)
            if not closed:
                what = "" if file_name is None else f" {file_name!r}" + ("" if mode is None else f" (mode {mode!r})")
                manifest["skipped"][name] = (f"an open file{what}: only closed files are saved (they come back "
                                             f"closed); close it (`{name}.close()`) and snapshot again")
                continue
            pickles.append((name, cloudpickle.dumps(ClosedFile(file_name, mode))))
            manifest["pickles"].append(name)
            manifest["closed_files"].append(name)
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
        pickles.append((name, data))
        manifest["pickles"].append(name)
    return manifest, arrays, pickles


def _write(base: Path, manifest: dict[str, Any], arrays: list[tuple[str, Any]],
           pickles: list[tuple[str, bytes]]) -> None:
    import numpy as np

    for name, data in pickles:
        (base / f"{name}.pkl").write_bytes(data)

    def write(item: tuple[str, Any]) -> None:
        np.save(base / f"{item[0]}.npy", item[1], allow_pickle=False)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, arrays))
    (base / MANIFEST).write_text(json.dumps(manifest))


def _target_device(saved: str, gpu_count: int) -> str:
    """The device for what was saved on `saved` ("cuda:1", "cpu") in a kernel that sees `gpu_count` GPUs.

    A moved kernel sees its sandbox's GPUs only, numbered from 0, maybe fewer or none: a saved `cuda:N` keeps
    its index where that GPU exists, goes to cuda:0 where not, and to the CPU where there is no GPU.
    """
    kind, _, index = saved.partition(":")
    if kind != "cuda":
        return saved
    if gpu_count < 1:
        return "cpu"
    return f"cuda:{int(index) if index.isdigit() and int(index) < gpu_count else 0}"


def _on_device(array: Any, origin: str) -> Any:
    if origin.startswith("torch:"):
        import torch

        # "torch:cuda:1:False": the device itself holds a colon.
        device, _, grad = origin.removeprefix("torch:").rpartition(":")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return torch.from_numpy(array).to(_target_device(device or "cpu", gpus)).requires_grad_(grad == "True")
    if origin == "cupy" or origin.startswith("cupy:"):  # "cupy": saved before the device was recorded
        try:
            import cupy

            device = _target_device(f"cuda:{origin.removeprefix('cupy').lstrip(':') or 0}",
                                    cupy.cuda.runtime.getDeviceCount())
        except Exception:
            return array  # no cupy, or no GPU: the array stays a numpy one
        if device == "cpu":
            return array
        with cupy.cuda.Device(int(device.removeprefix("cuda:"))):
            return cupy.asarray(array)
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

    ip = get_ipython()
    ns = ip.user_ns
    base = Path(path)
    index = base / MANIFEST if (base / MANIFEST).is_file() else base / _OLD_MANIFEST
    manifest = json.loads(index.read_text())
    ip.execution_count = max(ip.execution_count, int(manifest.get("execution_count", 0)))
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


def gpu_variables() -> dict[str, int]:
    """The namespace's variables that live on a GPU, with their bytes there.

    A move to a spec without a GPU brings arrays and tensors back on the CPU, and cannot load a torch module
    pickled with CUDA tensors: the move asks first. Torch tensors and modules (their CUDA parameters and
    buffers), cupy arrays and jax arrays, of the frameworks the kernel has imported; a variable that cannot
    say where it lives is left out.
    """
    torch, cupy, jax = (sys.modules.get(m) for m in ("torch", "cupy", "jax"))
    found: dict[str, int] = {}
    for name, value in _namespace().items():
        try:
            if torch is not None and isinstance(value, torch.Tensor):
                on_gpu, nbytes = value.is_cuda, value.element_size() * value.nelement()
            elif torch is not None and isinstance(value, torch.nn.Module):
                cuda = [t for t in (*value.parameters(), *value.buffers()) if t.is_cuda]
                on_gpu, nbytes = bool(cuda), sum(t.element_size() * t.nelement() for t in cuda)
            elif cupy is not None and isinstance(value, cupy.ndarray):
                on_gpu, nbytes = True, int(value.nbytes)
            elif jax is not None and isinstance(value, jax.Array):
                on_gpu = any(d.platform in ("gpu", "cuda", "rocm") for d in value.devices())
                nbytes = int(value.nbytes)
            else:
                continue
        except Exception:
            continue
        if on_gpu:
            found[name] = nbytes
    return found
