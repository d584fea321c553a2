"""A backend SIGKILLed mid-cell loses none of the cell's output: every line, the reply and `idle` arrive once."""

from __future__ import annotations

import queue
import signal
import time
from typing import Any

import pytest

from tests.conftest import RUNTIMES, Backend
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value

LINES = 25
CELL = f"import time\nfor i in range({LINES}):\n    print(f'line {{i}}', flush=True)\n    time.sleep(0.2)\n'done'"


def _crash_mid_cell(backend: Backend, outage: float) -> None:
    with running_kernel() as (_km, kc):
        run(kc, "x = 41")
        msg_id = kc.execute(CELL)
        time.sleep(1.2)
        backend.stop(signal.SIGKILL)
        time.sleep(outage)
        backend.start()
        deadline = time.monotonic() + outage + 60
        text, idle, result = "", 0, []
        while idle == 0 and time.monotonic() < deadline:
            try:
                msg: dict[str, Any] = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            content = msg["content"]
            if msg["msg_type"] == "stream":
                text += content["text"]
            elif msg["msg_type"] == "execute_result":
                result.append(content["data"]["text/plain"])
            elif msg["msg_type"] == "status" and content["execution_state"] == "idle":
                idle += 1
        assert text.splitlines() == [f"line {i}" for i in range(LINES)], text
        assert result == ["'done'"] and idle == 1
        while True:
            reply = kc.get_shell_msg(timeout=10)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["status"] == "ok"
        time.sleep(0.5)  # nothing of that cell arrives twice, also late
        while True:
            try:
                late = kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                break
            assert late["parent_header"].get("msg_id") != msg_id, late
        assert value(kc, "x + 1") == "42"


def test_output_of_a_running_cell_survives_a_backend_crash(own_backend: Backend) -> None:
    _crash_mid_cell(own_backend, outage=1.5)


@pytest.mark.parametrize("own_backend", RUNTIMES[:1], indirect=True)
def test_output_of_a_running_cell_survives_a_long_backend_outage(own_backend: Backend) -> None:
    _crash_mid_cell(own_backend, outage=20.0)
