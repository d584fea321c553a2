"""Moving a kernel's torch CUDA tensors out to host memory and back (snapshots/gpu_offload.py).

The `gpu` tests run torch on a real GPU, in this process (the module works on the process it runs in, as in a
kernel); the others check, on any machine, what the module does where torch or CUDA is missing and the
cell the backend sends. Only that last test needs the daemon's dependencies: the file also runs where only
torch is installed (`pytest --noconftest`, as bench/gpu_check.sh does on a GPU machine)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapkernel.snapshots import gpu_offload  # light: it runs in kernels (the daemon's modules are imported below)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def python(code: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter that has not imported torch (as in a kernel that never used it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                          check=False)


def test_without_torch_there_is_nothing_to_move_and_the_cells_say_so() -> None:
    r = python("import json, sys\n"
               "from snapkernel.snapshots import gpu_offload as g\n"
               "g.run('offload'); g.run('reload'); g.run('release')\n"
               "try:\n    g._torch()\nexcept RuntimeError as e:\n    print(json.dumps(str(e)))\n"
               "assert 'torch' not in sys.modules")
    assert r.returncode == 0, r.stderr
    offload, reload, release, error = (json.loads(line) for line in r.stdout.splitlines())
    assert offload == {"bytes": 0, "seconds": 0.0, "storages": 0}
    assert reload == {"bytes": 0, "seconds": 0.0}
    assert release["bytes"] == 0 and release["staging_bytes"] == 0
    assert "has not initialized torch's CUDA" in error


def test_the_backends_cells_run_in_a_kernel_without_torch() -> None:
    pytest.importorskip("jupyter_client", reason="the daemon's dependencies are not installed here")
    from snapkernel.backend.hibernation import offload_code
    from snapkernel.backend.sandbox import Defaults

    defaults = Defaults(runtime="process", cpu=1.0, memory=1 << 30, start_timeout=10.0,
                        gpu_offload_buffers=2, gpu_offload_buffer_bytes=8 * MiB)
    code = offload_code("offload", defaults)
    assert "buffers': 2" in code and str(8 * MiB) in code
    r = python("\n".join(offload_code(a, defaults) for a in ("offload", "reload", "release")))
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["bytes"] for line in r.stdout.splitlines()] == [0, 0, 0]


def test_bad_actions_and_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown GPU offload action 'hibernate': use one of offload, reload"):
        gpu_offload.run("hibernate")
    with pytest.raises(ValueError, match="0 staging buffers is not valid"):
        gpu_offload.offload(buffers=0)
    with pytest.raises(ValueError, match="a staging buffer of 12345 bytes is not valid"):
        gpu_offload.offload(buffer_bytes=12345)


# --- on a GPU ---------------------------------------------------------------------------------------------
@pytest.fixture
def torch() -> Iterator[Any]:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    torch.cuda.init()
    yield torch
    gpu_offload.reload()  # never leave a failed test's tensors out
    gpu_offload.release()


def random_tensor(torch: Any, dtype: Any, n: int, device: str = "cuda") -> Any:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, device=device).view(dtype)


def raw(t: Any, every: int = 1) -> Any:
    """The tensor's bytes (of every `every`th element) on the CPU: bit-exact, also for NaNs and odd bools."""
    return t.reshape(-1)[::every].contiguous().view(sys.modules["torch"].uint8).cpu()


DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "int32", "int64", "bool", "complex64"]
# Elements: one, odd, a buffer's worth of float32 and one more, several buffers and not a multiple of one.
COUNTS = [1, 3, 1001, MiB // 4 + 1, (5 * MiB) // 4 + 3]


@pytest.mark.gpu
@pytest.mark.parametrize("buffers", [1, 2, 4])
def test_every_dtype_and_size_comes_back_bit_identical(torch: Any, buffers: int) -> None:
    tensors = [random_tensor(torch, getattr(torch, d), n) for d in DTYPES for n in COUNTS]
    before = [raw(t) for t in tensors]
    storages = [t.untyped_storage()._cdata for t in tensors]
    total = sum(t.untyped_storage().nbytes() for t in tensors)
    allocated = torch.cuda.memory_allocated()
    out = gpu_offload.offload(buffers=buffers, buffer_bytes=MiB)
    assert out["bytes"] >= total and out["storages"] >= len(tensors)  # (and whatever else lives on the GPU)
    assert out["batches"] >= total // MiB and out["staging_bytes"] == buffers * MiB
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    assert torch.cuda.memory_allocated() <= allocated - total  # the GPU memory is free
    back = gpu_offload.reload()
    assert back["bytes"] == out["bytes"] and back["storages"] == out["storages"]
    assert [t.untyped_storage()._cdata for t in tensors] == storages  # the same storages, grown back
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(raw(t), b), (t.dtype, t.numel())
    assert gpu_offload.release()["bytes"] == out["bytes"]


@pytest.mark.gpu
def test_views_share_their_storage_after_waking(torch: Any) -> None:
    t = torch.randn(3 << 20, device="cuda")
    odd, block, window = t[1::2], t.view(-1, 3), t[10:20]
    again = torch.empty(0, device="cuda").set_(t.untyped_storage())  # a second tensor over the same storage
    expected = t.cpu()
    distinct = len(gpu_offload._scan(torch)[0])
    out = gpu_offload.offload(buffers=2, buffer_bytes=4 * MiB)
    assert out["storages"] == distinct  # the storage moved once, not once per view
    gpu_offload.reload()
    assert odd.data_ptr() == t.data_ptr() + 4 and block.data_ptr() == again.data_ptr() == t.data_ptr()
    assert torch.equal(t.cpu(), expected) and torch.equal(window.cpu(), expected[10:20])
    odd.fill_(7.0)  # writes through a view still land in the tensor
    assert float(t[1]) == 7.0 and float(again[3]) == 7.0 and float(block[0, 1]) == 7.0
    gpu_offload.release()


@pytest.mark.gpu
def test_many_storages_twice_reuse_the_staging_buffers(torch: Any) -> None:
    tensors = [random_tensor(torch, torch.float32, n) for n in [7, 64, 4096, 300_001, 2 << 20] * 40]
    before = [raw(t) for t in tensors]
    first = gpu_offload.offload(buffers=3, buffer_bytes=2 * MiB)
    gpu_offload.reload()
    gpu_offload.release()
    second = gpu_offload.offload(buffers=3, buffer_bytes=2 * MiB)
    assert second["staging_seconds"] == 0.0 and second["bytes"] == first["bytes"]  # kept from the first time
    gpu_offload.reload()
    assert gpu_offload.release()["staging_bytes"] == 6 * MiB
    assert all(torch.equal(raw(t), b) for t, b in zip(tensors, before, strict=True))


@pytest.mark.gpu
def test_empty_and_host_tensors_are_left_alone_and_small_pages_work(torch: Any) -> None:
    empty, host = torch.empty(0, device="cuda"), torch.arange(10)
    t = random_tensor(torch, torch.int64, 123_457)
    before = raw(t)
    gpu_offload.offload(buffers=2, buffer_bytes=MiB, huge_pages=False)
    assert empty.numel() == 0 and torch.equal(host, torch.arange(10))
    gpu_offload.reload()
    assert torch.equal(raw(t), before) and empty.untyped_storage().nbytes() == 0
    gpu_offload.release()


@pytest.mark.gpu
def test_memory_torch_did_not_allocate_stays_in_place(torch: Any) -> None:
    x = random_tensor(torch, torch.float32, 1 << 20)
    shared = torch.from_dlpack(x)  # another library's view of the same memory (cupy, jax, ... through DLPack)
    if shared.untyped_storage().resizable():
        pytest.skip("this torch hands back a resizable storage through DLPack")
    alone = torch.from_dlpack(random_tensor(torch, torch.int8, 12345))  # its only tensor is the DLPack one
    moved = random_tensor(torch, torch.int64, 999)
    before = [raw(t) for t in (x, alone, moved)]
    out = gpu_offload.offload(buffers=2, buffer_bytes=MiB)
    assert out["left_in_place"] >= 2 and moved.untyped_storage().nbytes() == 0
    assert torch.equal(raw(x), before[0]) and torch.equal(raw(shared), before[0])  # still on the GPU, readable
    assert torch.equal(raw(alone), before[1])
    gpu_offload.reload()
    assert all(torch.equal(raw(t), b) for t, b in zip((x, alone, moved), before, strict=True))
    gpu_offload.release()


@pytest.mark.gpu
def test_a_kernel_with_cuda_graphs_is_left_to_the_driver(torch: Any) -> None:
    x = torch.zeros(1024, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x + 1  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            y = x + 1
        out = gpu_offload.offload()
        assert out["bytes"] == 0 and "CUDA graphs" in out["skipped"]
        assert x.untyped_storage().nbytes() == 4096 and y.untyped_storage().nbytes() > 0
    finally:
        del graph  # or the tests after this one would find it too
        gc.collect()


@pytest.mark.gpu
def test_tensors_on_several_gpus_come_back_on_theirs(torch: Any) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    tensors = [random_tensor(torch, torch.float16, n, device=f"cuda:{d}")
               for d in range(torch.cuda.device_count()) for n in (5, 3 << 20)]
    before = [raw(t) for t in tensors]
    gpu_offload.offload(buffers=2, buffer_bytes=4 * MiB)  # a batch holds pieces of both GPUs' storages
    gpu_offload.reload()
    assert [t.device.index for t in tensors] == [d for d in range(torch.cuda.device_count()) for _ in (5, 3)]
    assert all(torch.equal(raw(t), b) for t, b in zip(tensors, before, strict=True))
    gpu_offload.release()


@pytest.mark.gpu
def test_a_gib_at_the_default_settings(torch: Any) -> None:
    tensors = [random_tensor(torch, torch.bfloat16, n) for n in [256 << 20, 100 << 20, 3, 77_777] + [1 << 16] * 500]
    before = [raw(t, every=4099) for t in tensors]
    out = gpu_offload.offload()
    back = gpu_offload.reload()
    print(f"offload {out['bytes'] / 2**30:.2f} GiB at {out['gib_s']} GiB/s (copies {out['copy_seconds']:.3f} s, "
          f"{out['threads']} threads); reload at {back['gib_s']} GiB/s")
    assert all(torch.equal(raw(t, every=4099), b) for t, b in zip(tensors, before, strict=True))
    gpu_offload.release()
