"""The workspace quota (`disk`): a cell writing past it gets ENOSPC; nothing else notices."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from snapkernel.client import BackendClient
from tests.conftest import Backend
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec

FILL = ("import errno, os\n"
        "try:\n"
        "    with open('fill.bin', 'wb') as f:\n"
        "        for _ in range(128):\n"
        "            f.write(b'x' * 2**20)\n"
        "            f.flush(); os.fsync(f.fileno())\n"
        "    outcome = 'wrote all'\n"
        "except OSError as e:\n"
        "    outcome = errno.errorcode[e.errno]\n")


def status_detail(backend: Backend) -> str:
    async def ask() -> str:
        client = BackendClient(backend.address, backend.token)
        try:
            st = await client.status()
            return next(r.detail for r in st.runtimes if r.name == backend.runtime)
        finally:
            await client.close()

    return asyncio.run(ask())


def test_writing_past_the_quota_fails_in_the_cell_only(backend: Backend, kernelspec_dir: Path) -> None:
    assert "workspace quota (disk): enforced, an ext4 image per sandbox" in status_detail(backend)
    host_free = shutil.disk_usage(backend.state_dir).free
    small = write_kernelspec(kernelspec_dir, "snapkernel-test-disk-64m", {"disk": "64Mi"})
    with running_kernel() as (_km, neighbour), running_kernel(small) as (_km2, kc):
        workspace = Path(value(kc, "__import__('os').getcwd()").strip("'"))
        content, _ = run(kc, FILL, timeout=120)
        assert content["status"] == "ok", content
        assert value(kc, "outcome") == "'ENOSPC'"  # 128Mi into a 64Mi quota
        assert value(kc, "os.path.getsize('fill.bin') < 64 * 2**20") == "True"
        # The kernel, its neighbour, the backend and the host carry on.
        assert value(kc, "os.remove('fill.bin'); open('after.txt', 'w').write('ok')") == "2"
        assert value(neighbour, "open('n.txt', 'w').write('still writing')") == "13"
        assert status_detail(backend)
        assert shutil.disk_usage(backend.state_dir).free > host_free - (256 << 20)
        sandbox_dir = workspace.parent
        assert (sandbox_dir / "workspace.img").exists() and os.path.ismount(workspace)
    # Removing the sandbox removes what it wrote, image and mount included.
    assert not sandbox_dir.exists()
    assert str(workspace) not in Path("/proc/mounts").read_text()
