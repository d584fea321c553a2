"""The `snapkernel` command against a real backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Backend
from tests.kernel_provisioner.kernel_helpers import running_kernel, value


def cli(*args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapkernel.cli", *args], capture_output=True, text=True,
                          check=check, env={**os.environ, **env}, timeout=60)


def test_status_json_lists_runtimes_and_capacity(backend: Backend) -> None:
    status = json.loads(cli("status", "--json").stdout)
    assert status["default_runtime"] == backend.runtime
    assert {r["name"] for r in status["runtimes"]} >= {"process", "gvisor"}
    assert status["capacity"]["cpu_total"] >= 1
    human = cli("status").stdout
    assert "runtimes:" in human and "GPUs:" in human


def test_sandboxes_list_and_rm(backend: Backend) -> None:
    with running_kernel() as (km, kc):
        sandbox = value(kc, "__import__('os').environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        rows = json.loads(cli("sandboxes", "list", "--json").stdout)
        row = next(r for r in rows if r["id"] == sandbox)
        assert row["kernel_id"] == km.kernel_id and row["runtime"] == backend.runtime and row["state"] == "running"
        assert sandbox in cli("sandboxes", "list").stdout
        assert f"removed {sandbox}" in cli("sandboxes", "rm", sandbox).stdout
        assert sandbox not in [r["id"] for r in json.loads(cli("sandboxes", "list", "--json").stdout)]


def test_errors_name_the_value_and_exit_nonzero(backend: Backend) -> None:
    bad = cli("sandboxes", "rm", "sb-nothere", check=False)
    assert bad.returncode == 2 and "sandbox id 'sb-nothere' is not valid" in bad.stderr
    assert "Traceback" not in bad.stderr
    unknown = cli("sandboxes", "rm", "sb-0123456789ab", check=False)
    assert unknown.returncode == 2 and "no sandbox 'sb-0123456789ab'" in unknown.stderr


def test_unreachable_backend_and_bad_token_say_what_to_do(backend: Backend, tmp_path: object) -> None:
    r = cli("status", check=False, SNAPKERNEL_BACKEND="unix:///nonexistent/backend.sock")
    assert r.returncode == 2 and "cannot reach the snapkernel backend at unix:///nonexistent" in r.stderr
    r = cli("status", check=False, SNAPKERNEL_TOKEN="wrong")
    assert r.returncode == 2 and "wrong token" in r.stderr


def test_kernels_install_and_list(backend: Backend, tmp_path: object) -> None:
    out = json.loads(cli("kernels", "install", "--prefix", str(tmp_path), "--json").stdout)
    status = json.loads(cli("status", "--json").stdout)
    gpu_kernels = sorted({f"snapkernel-gpu-{g['model'].lower()}" for g in status["gpus"]})
    assert [k["id"] for k in out] == ["snapkernel-python", *gpu_kernels]
    listed = json.loads(cli("kernels", "list", "--json").stdout)
    spec = next(k for k in listed if k["id"] == "snapkernel-python")
    assert spec["config"] == {}


@pytest.mark.parametrize(("setting", "message"), [
    ("--BackendApp.warm_pool=99", "warm_pool 99 is not valid: use 0 to 16 sandboxes"),
    ('--BackendApp.template_preimport=["numpy; import os"]', "'numpy; import os' is not a module name"),
    ("--BackendApp.pids_limit=5", "pids_limit 5 is not valid: use 64 to 65536"),
    ("--BackendApp.runtime=Docker", "runtime 'Docker' is not a runtime's name"),
    ("--BackendApp.gpu_offload_buffers=0", "gpu_offload_buffers: 0 staging buffers is not valid: use 1 to 16"),
    ("--BackendApp.gpu_offload_buffer_size=1000", "a staging buffer of 1000 bytes is not valid: use 1 MiB to 1 GiB"),
    ("--BackendApp.gpu_offload_buffer_size=lots", "gpu_offload_buffer_size size 'lots' is not valid"),
    ('--BackendApp.warm_pool_classes={"memory": "8Gi"}', "size None is not valid: use 1 to 16 sandboxes"),
    ('--BackendApp.warm_pool_classes={"gpu": "any", "size": 1}', "kernels with gpu boot"),
    ('--BackendApp.warm_pool_classes={"memory": "lots", "size": 1}', "memory size 'lots' is not valid"),
    ('--BackendApp.warm_pool_classes={"mem": "8Gi", "size": 1}', "unknown snapkernel config key(s) 'mem'"),
])
def test_a_bad_backend_setting_is_named_without_a_traceback(setting: str, message: str, tmp_path: Path) -> None:
    out = cli("backend", "--state-dir", str(tmp_path), setting, check=False)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
