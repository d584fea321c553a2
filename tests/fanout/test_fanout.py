"""Fan-out from a real kernel in a real sandbox (`%%fanout`, `remote`) and from a plain process (gRPC):
worker sandboxes of the same runtime, failures, retries, timeouts, cancel, a worker killed mid-run and
no workers left behind by a kernel restart."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from snapkernel.backend.workers import is_worker
from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.conftest import Backend, sandbox_processes
from tests.kernel_provisioner.kernel_helpers import reply_to, run, running_kernel, value
from tests.snapshots.test_memory import backend_call

Kernel = tuple[KernelManager, BlockingKernelClient]


def workers(backend: Backend) -> list[pb.Sandbox]:
    """The backend's live fan-out worker sandboxes."""
    return [s for s in backend_call(backend, lambda c: c.list_sandboxes()) if is_worker(s.spec)]


def error_text(outputs: list[dict[str, Any]]) -> str:
    tb = next(m for m in outputs if m["msg_type"] == "error")["content"]["traceback"]
    return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(tb))


@pytest.fixture(scope="module")
def kernel(backend: Backend) -> Iterator[Kernel]:
    """One snapkernel kernel for this module's tests (per runtime); its workers stay warm between them."""
    with running_kernel() as (km, kc):
        yield km, kc


def test_1000_items_in_order_and_an_unchanged_cell_ships_nothing(backend: Backend, kernel: Kernel) -> None:
    _, kc = kernel
    cell = "%%fanout --over range(1000) --as x --workers 2 --out res\nx * 2"
    content, _ = run(kc, cell, timeout=120)
    assert content["status"] == "ok", content
    assert value(kc, "res == [x * 2 for x in range(1000)]") == "True"
    assert value(kc, "from snapkernel.fanout.client import last_stats; last_stats().function_sent > 0") == "True"
    content, _ = run(kc, cell, timeout=60)
    assert content["status"] == "ok", content
    assert value(kc, "last_stats().function_sent") == "0"  # the backend held it by its hash
    live = workers(backend)
    assert len(live) >= 2 and all(w.runtime == backend.runtime for w in live)
    assert value(kc, "%%fanout --over [] --as x\nx") == "[]"
    content, outputs = run(kc, "%%fanout --over range(5) --as x --workers 2 --unordered\nx", timeout=60)
    results = [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"]
    assert content["status"] == "ok" and sorted(eval(results[-1])) == [0, 1, 2, 3, 4]
    bars = [m for m in outputs if m["msg_type"] in ("display_data", "update_display_data")]
    assert bars and "5/5" in bars[-1]["content"]["data"]["text/plain"]  # the progress bar


def test_a_helper_and_a_lambda_of_the_notebook_are_captured(kernel: Kernel) -> None:
    _, kc = kernel
    run(kc, "offset = 10\ndef helper(v):\n    return v + offset\nsquare = lambda v: v * v")
    content, _ = run(kc, "%%fanout --over [1, 2, 3] --as x --workers 2 --out r\ny = square(x)\nhelper(y)",
                     timeout=60)
    assert content["status"] == "ok", content
    assert value(kc, "r") == "[11, 14, 19]"
    content, outputs = run(kc, "%%fanout --over [1, 2] --as x --workers 2\nprint('hello', x)\nx", timeout=60)
    printed = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
    assert "hello 1\n" in printed and "hello 2\n" in printed, outputs  # workers' prints reach the cell
    # Payloads over 4 MiB, both ways, through the agent's relay: the blob path.
    content, _ = run(kc, "%%fanout --over [b'ab' * 3 * 2**20] --as x --workers 1 --out big\nx + x", timeout=120)
    assert content["status"] == "ok", content
    assert value(kc, "[len(big[0]), big[0][:4]]") == "[12582912, b'abab']"
    run(kc, "from snapkernel import remote\n@remote(workers=2)\ndef f(v, k=1):\n    return helper(square(v)) * k")
    assert value(kc, "f.map([1, 2, 3])", timeout=60) == "[11, 14, 19]"
    assert value(kc, "f.remote(3, k=2)", timeout=60) == "38"
    assert value(kc, "f.spawn(4).result(60)", timeout=70) == "26"


def test_a_failing_item_is_raised_with_its_remote_traceback(kernel: Kernel) -> None:
    _, kc = kernel
    for _ in range(3):  # again: the cancel that follows a failure races the job's end, and must not hurt
        content, outputs = run(kc, "%%fanout --over range(6) --as x --workers 2\nz = x - 3\n1 / z", timeout=60)
        assert content["status"] == "error" and content["ename"] == "ZeroDivisionError"
        tb = error_text(outputs)
        assert "1 / z" in tb and "line 2" in tb, tb  # the remote file, line and source
        assert "fan-out item 3 (input 3)" in tb, tb
        assert "<dynamic-code>" not in tb and "snapkernel/" not in tb, tb  # the user's frames only
    # A function of a notebook cell, shipped with the newest cloudpickle: its own line is quoted, and the
    # notebook shows the calling line, the worker's frames and the summary, not snapkernel's frames.
    run(kc, "from snapkernel import remote\n@remote(workers=1)\ndef inverse(v):\n    return 1 / v")
    content, outputs = run(kc, "inverse.map([1, 0])", timeout=60)
    assert content["status"] == "error" and content["ename"] == "ZeroDivisionError", content
    tb = error_text(outputs)
    assert "return 1 / v" in tb and "inverse.map([1, 0])" in tb and "fan-out item 1 (input 0)" in tb, tb
    assert "<dynamic-code>" not in tb and "snapkernel/" not in tb, tb
    content, _ = run(kc, "%%fanout --over range(6) --as x --workers 2 --return-exceptions --out r\n1 / (x - 3)",
                     timeout=60)
    assert content["status"] == "ok", content
    assert value(kc, "[type(v).__name__ for v in r]") == "['float', 'float', 'float', 'ZeroDivisionError', " \
                                                         "'float', 'float']"


def test_retries_and_timeout(kernel: Kernel) -> None:
    _, kc = kernel
    flaky = ("import os\np = os.path.join(os.environ['HOME'], f'seen-{x}')\nif not os.path.exists(p):\n"
             "    open(p, 'w').close()\n    raise RuntimeError('first try fails')\nx")
    content, _ = run(kc, f"%%fanout --over ['a', 'b'] --as x --workers 1 --retries 1 --out r\n{flaky}", timeout=60)
    assert content["status"] == "ok", content
    assert value(kc, "r") == "['a', 'b']"
    content, outputs = run(kc, f"%%fanout --over ['c'] --as x --workers 1\n{flaky}", timeout=60)
    assert content["ename"] == "RuntimeError" and "first try fails" in error_text(outputs)
    started = time.monotonic()
    content, _ = run(kc, "%%fanout --over [0, 60] --as x --workers 2 --timeout 1 --return-exceptions --out r\n"
                         "import time\ntime.sleep(x)\nx", timeout=60)
    assert content["status"] == "ok", content
    assert time.monotonic() - started < 30  # not the 60 s the second item would sleep
    assert value(kc, "[r[0], isinstance(r[1], TimeoutError)]") == "[0, True]"
    # Code that ignores the timeout's signal: the backend kills its worker and fails the item.
    content, _ = run(kc, "%%fanout --over [0, 60] --as x --workers 2 --timeout 1 --return-exceptions --out r\n"
                         "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\ntime.sleep(x)\nx",
                     timeout=60)
    assert content["status"] == "ok", content
    assert value(kc, "[r[0], isinstance(r[1], TimeoutError), 'did not stop' in str(r[1])]") == "[0, True, True]"


def test_interrupt_cancels_the_rest_and_kills_workers_that_do_not_stop(backend: Backend, kernel: Kernel) -> None:
    km, kc = kernel
    for body in ("import time\ntime.sleep(60)",
                 "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"):
        msg_id = kc.execute(f"%%fanout --over range(8) --as x --workers 2\n{body}")
        deadline = time.monotonic() + 120
        while not any(w.state == pb.RUNNING for w in workers(backend)) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # the items run
        started = time.monotonic()
        km.interrupt_kernel()
        reply = reply_to(kc, msg_id, timeout=30)
        elapsed = time.monotonic() - started
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        print(f"cancel took {elapsed:.2f}s")
        assert elapsed < 4.0, f"cancel took {elapsed:.1f}s"
    # ipykernel aborts requests that reach it just after an error; a frontend sends them again.
    deadline = time.monotonic() + 10
    while run(kc, "'alive'")[0]["status"] == "aborted" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert value(kc, "'alive'") == "'alive'"
    content, _ = run(kc, "%%fanout --over range(4) --as x --workers 2 --out r\nx + 1", timeout=120)
    assert content["status"] == "ok", content  # the killed workers were replaced
    assert value(kc, "r") == "[1, 2, 3, 4]"


def test_a_worker_killed_mid_run_is_replaced_and_its_items_retried(backend: Backend, kernel: Kernel) -> None:
    _, kc = kernel
    msg_id = kc.execute("%%fanout --over range(40) --as x --workers 2 --out r\nimport time\ntime.sleep(0.25)\nx")
    deadline = time.monotonic() + 60
    victim: pb.Sandbox | None = None
    while victim is None and time.monotonic() < deadline:
        running = [w for w in workers(backend) if w.state == pb.RUNNING]
        victim = running[0] if len(running) >= 2 else None
        time.sleep(0.2)
    assert victim is not None
    time.sleep(1.5)
    os.killpg(victim.pid, signal.SIGKILL)  # the worker's whole sandbox, from outside
    reply = reply_to(kc, msg_id, timeout=120)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert value(kc, "r == list(range(40))") == "True"
    assert victim.id not in [w.id for w in workers(backend)]


def test_code_in_the_kernel_cannot_choose_the_workers_image_or_network(backend: Backend, kernel: Kernel) -> None:
    _, kc = kernel
    run(kc, "from snapkernel.fanout import client\nplain = client.MapCall.start_message\n"
            "def forged(self):\n    m = plain(self)\n    m.start.spec.image = '/nonexistent'\n"
            "    m.start.spec.network = True\n    return m\nclient.MapCall.start_message = forged")
    try:
        content, _ = run(kc, "%%fanout --over [1] --as x --workers 1 --out r\nx", timeout=60)
        assert content["status"] == "ok", content
        live = workers(backend)
        assert live and all(w.spec.image == "" and not w.spec.network for w in live)  # the kernel's, not forged
    finally:
        run(kc, "client.MapCall.start_message = plain")


def test_bad_flags_say_what_is_accepted(kernel: Kernel) -> None:
    _, kc = kernel
    for line, expected in [
        ("--over 5 --as x", "--over '5' is not an iterable"),
        ("--over range(3) --as 1x", "--as '1x' is not a Python name"),
        ("--over range(3) --as x --workers 0", "workers 0 is not accepted"),
        ("--over range(3) --as x --gpu H100:zero", "gpu spec 'H100:zero' is not valid"),
        ("--over range(3) --as x --memory lots", "lots"),
        ("--over range(3) --as x --cpu 0", "cpu 0 is not valid: use a number of cores above 0"),
        ("--over range(3)", "the following arguments are required: --as"),
    ]:
        content, _ = run(kc, f"%%fanout {line}\nx", timeout=60)
        assert content["status"] == "error", line
        assert expected in content["evalue"], (line, content["evalue"])


def test_clone_workers_see_the_kernels_state_without_pickling_it(backend: Backend, kernel: Kernel) -> None:
    _, kc = kernel
    before = {s.id for s in backend_call(backend, lambda c: c.list_snapshots())}  # other tests' snapshots
    # A lock cannot be pickled: without --clone the cell is refused, with it the clones use their own copy.
    run(kc, "import threading\nlock = threading.Lock()\nfactor = 7\nclass Model:\n    def __call__(self, v):\n"
            "        return v * factor\nmodel = Model()")
    cell = "%%fanout --over range(4) --as x --workers 2 --clone --out r\nwith lock:\n    y = model(x)\ny"
    content, _ = run(kc, cell, timeout=180)
    if backend.runtime != "gvisor":
        assert content["status"] == "error" and "--clone needs a kernel under the gvisor runtime" in str(content)
        return
    assert content["status"] == "ok", content
    assert value(kc, "r") == "[0, 7, 14, 21]"
    content, _ = run(kc, cell.replace(" --clone", ""), timeout=60)
    assert content["status"] == "error" and "refers to 'lock'" in content["evalue"]
    deadline = time.monotonic() + 30  # the clones and their snapshot go with the job
    while any(w.spec.env.get("SNAPKERNEL_AGENT_MODE") == "clone" for w in workers(backend)):
        assert time.monotonic() < deadline, workers(backend)
        time.sleep(0.2)
    assert {s.id for s in backend_call(backend, lambda c: c.list_snapshots())} == before


def test_a_kernel_restart_leaves_no_workers(backend: Backend) -> None:
    with running_kernel() as (km, kc):
        content, _ = run(kc, "%%fanout --over range(2) --as x --workers 2 --out r\nimport os\nos.environ['"
                             "SNAPKERNEL_SANDBOX_ID']", timeout=120)
        assert content["status"] == "ok", content
        mine = set(eval(value(kc, "r")))
        assert mine <= {w.id for w in workers(backend)}
        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        deadline = time.monotonic() + 30
        while mine & {w.id for w in workers(backend)} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not mine & {w.id for w in workers(backend)}


@pytest.mark.gpu
def test_gpu_workers_get_distinct_gpus(backend: Backend) -> None:
    from snapkernel.fanout import remote
    from snapkernel.host.gpus import inventory

    if len(inventory()[0]) < 2:
        pytest.skip("needs 2 GPUs")

    @remote(gpu="any:1", workers=2, progress=False)
    def visible(_: int) -> str:
        import os
        import time

        time.sleep(1)  # both workers take an item
        return os.environ["CUDA_VISIBLE_DEVICES"]

    seen = set(visible.map(range(4)))
    assert len(seen) == 2 and "" not in seen


def test_remote_from_a_plain_process_over_grpc(backend: Backend) -> None:
    """Outside any sandbox the same client talks to the backend's Map call; large payloads use blobs."""
    from snapkernel.fanout import remote

    @remote(workers=2, progress=False)
    def grow(data: bytes) -> bytes:
        return data * 2

    big = os.urandom(5 * 1024 * 1024)
    out = grow.map([b"ab", big])
    assert out[0] == b"abab" and out[1] == big * 2

    def adder(k: int) -> Any:
        return remote(workers=1, progress=False)(lambda v: v + k)

    # More functions than a warm worker keeps: the backend knows which ones it dropped and sends them again.
    assert [adder(k).map([1])[0] for k in [*range(18), 0, 17]] == [1 + k for k in [*range(18), 0, 17]]

    results: list[Any] = []
    t = threading.Thread(target=lambda: results.append(grow.spawn(b"x").result(120)))
    t.start()
    t.join(130)
    assert results == [b"xx"]


def test_fanout_magic_in_a_plain_kernel_goes_over_grpc(backend: Backend) -> None:
    """`%load_ext snapkernel` in an ordinary ipykernel: the same magic, through the backend's Map call."""
    with running_kernel("python3") as (_km, kc):
        run(kc, "%load_ext snapkernel")
        assert value(kc, "import os; 'SNAPKERNEL_FANOUT_SOCKET' in os.environ") == "False"
        assert value(kc, "%%fanout --over range(3) --as x --workers 1\nx * 3", timeout=120) == "[0, 3, 6]"


def test_a_version_mismatch_is_refused_with_both_versions(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    from snapkernel.errors import FanoutError
    from snapkernel.fanout import client, remote

    monkeypatch.setattr(client, "versions", lambda: ("2.7.18", "0.1"))

    @remote(workers=1, progress=False)
    def one(v: int) -> int:
        return v

    with pytest.raises(FanoutError) as e:
        one.map([1])
    assert "python 2.7.18" in str(e.value) and "cloudpickle 0.1" in str(e.value)
    assert "python 3." in str(e.value)


def test_workers_left_by_a_killed_backend_are_stopped_by_the_next(own_backend: Backend) -> None:
    from snapkernel.fanout import remote

    @remote(workers=2, progress=False)
    def pid(_: int) -> int:
        import os
        import time

        time.sleep(0.5)
        return os.getpid()

    assert len(pid.map(range(4))) == 4
    left = workers(own_backend)
    assert len(left) == 2
    own_backend.stop(signal.SIGKILL)  # no chance to stop them itself
    assert all(sandbox_processes(w.id) for w in left)
    own_backend.start()
    assert workers(own_backend) == []
    deadline = time.monotonic() + 15
    while any(sandbox_processes(w.id) for w in left) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(sandbox_processes(w.id) for w in left)


class IdleBackend(Backend):
    """A backend whose warm workers are stopped after 2 idle seconds."""

    def start(self) -> None:
        sock = self.state_dir / "backend.sock"
        self.log = open(self.state_dir / "backend.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snapkernel.cli", "backend", "--listen", self.address,
             "--state-dir", str(self.state_dir), "--runtime", self.runtime, "--BackendApp.fanout_idle_timeout=2"],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.read_log()
            time.sleep(0.02)
        self.token = (self.state_dir / "token").read_text().strip()


def test_idle_workers_are_reaped_and_busy_ones_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from snapkernel.fanout import remote

    b = IdleBackend(tmp_path)
    b.start()
    for k, v in b.env().items():
        monkeypatch.setenv(k, v)
    try:
        @remote(workers=1, progress=False)
        def nap(s: float) -> float:
            import time

            time.sleep(s)
            return s

        assert nap.map([4.0]) == [4.0]  # busy for longer than the idle timeout: kept
        (warm,) = workers(b)
        assert nap.map([0.0]) == [0.0]
        assert [w.id for w in workers(b)] == [warm.id]  # the warm one served again
        deadline = time.monotonic() + 15
        while workers(b) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workers(b) == []
        assert not sandbox_processes(warm.id)
    finally:
        b.stop()
        b.report()


def test_an_item_that_kills_its_worker_names_the_exit_and_the_item(backend: Backend, kernel: Kernel) -> None:
    _, kc = kernel
    content, outputs = run(kc, "%%fanout --over range(4) --as x --workers 2\nimport os\nif x == 0:\n"
                               "    os._exit(1)\nx", timeout=120)
    assert content["status"] == "error", content
    tb = error_text(outputs)
    assert "WorkerDiedError: worker exited with code 1 while running item 0 (x=0)" in tb, tb
    assert "CancelledError" not in tb and "after 2 attempt(s)" in tb, tb
    content, outputs = run(kc, "%%fanout --over range(5) --as x --workers 2 --return-exceptions --out r\n"
                               "import ctypes\nif x == 3:\n    ctypes.string_at(0)\nx", timeout=120)
    assert content["status"] == "ok", content
    text = value(kc, "[str(v) if isinstance(v, BaseException) else v for v in r]")
    assert "worker killed by SIGSEGV while running item 3 (x=3)" in text, text
    assert value(kc, "r[:3] + r[4:]") == "[0, 1, 2, 4]"  # the items queued behind it are not blamed
    assert value(kc, "type(r[3]).__name__") == "'WorkerDiedError'"
    content, _ = run(kc, "%%fanout --over range(4) --as x --workers 2 --out r\nx + 1", timeout=120)
    assert content["status"] == "ok", content  # the dead workers were replaced
    assert value(kc, "r") == "[1, 2, 3, 4]"
    # `remote` names the call.
    run(kc, "from snapkernel import remote\n@remote(workers=1)\ndef quit_with(code):\n    import os\n"
            "    os._exit(code)")
    content, outputs = run(kc, "quit_with.remote(2)", timeout=120)
    assert content["status"] == "error" and content["ename"] == "WorkerDiedError", content
    assert "worker exited with code 2 while running item 0 (quit_with(2))" in error_text(outputs)


def test_exit_statuses_in_words() -> None:
    from snapkernel.backend.workers import describe_exit

    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-11) == describe_exit(139) == "killed by SIGSEGV"  # Python's way, runsc's way
    assert describe_exit(-9).startswith("killed by SIGKILL (over its memory limit")
    assert describe_exit(255) == "exited with code 255"
