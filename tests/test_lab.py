"""`snapkernel lab`: the embedded backend and JupyterLab with the extension and kernelspecs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_lab_starts_backend_and_jupyterlab_and_stops_both(tmp_path: Path) -> None:
    port, state = _free_port(), tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPKERNEL_")}
    env["SNAPKERNEL_STATE_DIR"] = str(state)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapkernel.cli", "lab", "--no-browser", f"--port={port}",
         "--IdentityProvider.token=t0k", f"--ServerApp.root_dir={tmp_path}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                status, body = _get(f"{base}/snapkernel/api/status?token=t0k")
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not come up"
                time.sleep(0.3)
        # gvisor wherever runsc works (`make install` installs it as root), else process, said loudly below.
        default = "gvisor" if shutil.which("runsc") else "process"
        assert status == 200 and json.loads(body)["default_runtime"] == default
        assert _get(f"{base}/snapkernel/api/status")[0] == 403
        specs = json.loads(_get(f"{base}/api/kernelspecs?token=t0k")[1])["kernelspecs"]
        assert "snapkernel-python" in specs
        assert (state / "backend.sock").exists()
        assert (state / "token").stat().st_mode & 0o777 == 0o600
        assert state.stat().st_mode & 0o777 == 0o700
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert ("NOT isolated by gVisor" in out) == (default == "process")
    deadline = time.monotonic() + 15
    while (state / "backend.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    backends = [p for p in Path("/proc").glob("[0-9]*") if _cmd(p).count(str(state).encode())]
    assert not backends, "the embedded backend outlived `snapkernel lab`"


def _cmd(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
