"""Real kernels in real sandboxes, through jupyter_client as a notebook frontend drives them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from snapkernel.client import BackendClient
from tests.conftest import Backend, sandbox_processes
from tests.kernel_provisioner.kernel_helpers import reply_to, run, running_kernel, value, write_kernelspec


def sandbox_ids(backend: Backend) -> list[str]:
    async def ids() -> list[str]:
        client = BackendClient(backend.address, backend.token)
        try:
            return [s.id for s in await client.list_sandboxes()]
        finally:
            await client.close()

    return asyncio.run(ids())


def test_execute_streams_display_and_errors(backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        content, outputs = run(kc, "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\n6*7")
        assert content["status"] == "ok"
        streams = {(m["content"]["name"], m["content"]["text"]) for m in outputs if m["msg_type"] == "stream"}
        assert ("stdout", "to out\n") in streams and ("stderr", "to err\n") in streams
        assert value(kc, "6*7") == "42"

        _, outputs = run(kc, "from IPython.display import HTML, display\ndisplay(HTML('<b>rich</b>'))")
        shown = [m["content"]["data"] for m in outputs if m["msg_type"] == "display_data"]
        assert shown and shown[0]["text/html"] == "<b>rich</b>"

        content, outputs = run(kc, "def f():\n    return 1/0\nf()")
        assert content["status"] == "error" and content["ename"] == "ZeroDivisionError"
        tb = re.sub(r"\x1b\[[0-9;]*m", "", "".join(
            next(m for m in outputs if m["msg_type"] == "error")["content"]["traceback"]))
        assert "f()" in tb and "1/0" in tb


def test_input_over_stdin(backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        msg_id = kc.execute("answer = input('name? ')", allow_stdin=True)
        request = kc.get_stdin_msg(timeout=20)
        assert request["msg_type"] == "input_request" and request["content"]["prompt"] == "name? "
        kc.input("ada")
        assert reply_to(kc, msg_id)["content"]["status"] == "ok"
        assert value(kc, "answer") == "'ada'"


def test_interrupt_returns_control_within_two_seconds(backend: Backend) -> None:
    with running_kernel() as (km, kc):
        msg_id = kc.execute("import time\ntime.sleep(600)")
        while True:  # wait until the cell really runs
            msg = kc.get_iopub_msg(timeout=20)
            if msg["msg_type"] == "execute_input" and msg["parent_header"]["msg_id"] == msg_id:
                break
        time.sleep(0.2)
        started = time.monotonic()
        km.interrupt_kernel()
        reply = reply_to(kc, msg_id, timeout=10)
        elapsed = time.monotonic() - started
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert elapsed < 2.0, f"interrupt took {elapsed:.2f}s"
        # ipykernel 7 answers `aborted` to a request that reaches it while it still clears its queue after
        # the error (stop_on_error), however late the client sent it: a cell run right after may get that once.
        for _ in range(3):
            content, outputs = run(kc, "'alive'")
            if content["status"] != "aborted":
                break
        assert content["status"] == "ok", content
        assert [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"] == \
            ["'alive'"]


def test_restart_keeps_the_sandbox_and_resets_the_kernel(backend: Backend) -> None:
    with running_kernel() as (km, kc):
        run(kc, "import os\nx = 1")
        sandbox, pid = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']"), value(kc, "os.getpid()")
        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        run(kc, "import os")
        assert value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']") == sandbox
        assert value(kc, "os.getpid()") != pid
        assert value(kc, "'x' in globals()") == "False"


def test_shutdown_removes_the_sandbox_and_its_processes(backend: Backend) -> None:
    with running_kernel() as (km, kc):
        run(kc, "import os")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        kernel_pid = int(value(kc, "os.getpid()"))
        assert sandbox in sandbox_ids(backend)
        km.shutdown_kernel()
    assert sandbox not in sandbox_ids(backend)
    assert sandbox_processes(sandbox) == [], "processes of the sandbox outlived it"
    if backend.runtime == "process":
        assert not Path(f"/proc/{kernel_pid}").exists()
    assert not (backend.state_dir / "sandboxes" / sandbox).exists()


def test_two_kernels_stay_separate(backend: Backend) -> None:
    with running_kernel() as (_k1, c1), running_kernel() as (_k2, c2):
        run(c1, "import os\nwho = 'one'")
        run(c2, "import os\nwho = 'two'")
        assert value(c1, "who") == "'one'" and value(c2, "who") == "'two'"
        assert value(c1, "os.environ['SNAPKERNEL_SANDBOX_ID']") != value(c2, "os.environ['SNAPKERNEL_SANDBOX_ID']")
        # Each has a workspace of its own (kernels restored from one template see it at the same path).
        run(c1, "open('mine.txt', 'w').write('one')")
        assert value(c2, "os.path.exists('mine.txt')") == "False"


def test_kernel_does_not_see_the_backend_token(backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        run(kc, "import os")
        assert value(kc, "sorted(k for k in os.environ if 'TOKEN' in k or k == 'SNAPKERNEL_KERNEL_KEY')") == "[]"
        assert backend.token not in value(kc, "open('/proc/self/environ','rb').read()")


def test_kernel_survives_a_backend_restart_with_its_variables(own_backend: Backend) -> None:
    with running_kernel() as (km, kc):
        run(kc, "state = {'answer': 42}")
        own_backend.restart()
        assert value(kc, "state['answer']", timeout=60) == "42"
        assert km.is_alive()
    assert sandbox_ids(own_backend) == []


def test_kernel_killed_inside_is_reported_dead(backend: Backend) -> None:
    with running_kernel() as (km, kc):
        kc.execute("import os\nos._exit(3)")
        deadline = time.monotonic() + 20
        while km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not km.is_alive()


@pytest.mark.parametrize(("config", "message"), [
    ({"gpu": "Z999:-1"}, "gpu spec 'Z999:-1' is not valid"),
    ({"memory": "lots"}, "memory size 'lots' is not valid"),
    ({"runtime": "docker"}, "runtime 'docker' is not known"),
    ({"gpu": "Z999"}, "no GPU of model 'Z999' here; these exist:"),
    ({"cpu": 0}, "cpu 0 is not valid: use a number of cores above 0 and at most 1024"),  # not the default
])
def test_bad_kernelspec_config_fails_clearly(backend: Backend, kernelspec_dir: Path, config: dict[str, Any],
                                             message: str) -> None:
    name = write_kernelspec(kernelspec_dir, f"snapkernel-bad-{abs(hash(str(config)))}", config)
    before = sandbox_ids(backend)
    with pytest.raises(Exception, match=message.replace("(", r"\(")), running_kernel(name):
        pass
    assert sandbox_ids(backend) == before
    assert os.environ.get("SNAPKERNEL_BACKEND") == backend.address


@pytest.mark.parametrize(("env", "message"), [
    ({"SNAPKERNEL_BACKEND": "unix:///nonexistent/backend.sock"}, "cannot reach the snapkernel backend at unix:///"),
    ({"SNAPKERNEL_TOKEN": "wrong"}, "wrong token"),
])
def test_start_errors_name_the_cause(backend: Backend, monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                     message: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(Exception, match=message), running_kernel():
        pass


def test_cleanup_can_run_twice(backend: Backend) -> None:
    from jupyter_core.utils import run_sync

    with running_kernel() as (km, _kc):
        provisioner = km.provisioner
        km.shutdown_kernel()
        assert provisioner is not None
        run_sync(provisioner.cleanup)(restart=False)
        run_sync(provisioner.cleanup)(restart=False)
        assert not provisioner.has_process


def test_sandbox_killed_while_backend_is_down_is_marked_lost(own_backend: Backend) -> None:
    import signal as signals

    with running_kernel() as (km, kc):
        run(kc, "import os")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        own_backend.stop()
        for pid in sandbox_processes(sandbox):
            if b"snapkernel.backend.shim" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.killpg(pid, signals.SIGKILL)
        own_backend.start()
        rows = json.loads(subprocess.run(
            [sys.executable, "-m", "snapkernel.cli", "sandboxes", "list", "--all", "--json"],
            capture_output=True, text=True, check=True).stdout)
        row = next(r for r in rows if r["id"] == sandbox)
        assert row["state"] == "lost" and "without leaving an exit status" in row["message"]
        deadline = time.monotonic() + 20
        while km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not km.is_alive()

