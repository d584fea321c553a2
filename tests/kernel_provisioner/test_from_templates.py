"""The kernel suite again, on kernels restored from a template: a kernel from a template and one booted cold
(test_kernels.py and the conformance suite, on the session's backends) behave the same."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Backend, serving_backend
from tests.kernel_provisioner.test_conformance import test_conformance
from tests.kernel_provisioner.test_kernels import (
    test_execute_streams_display_and_errors,
    test_input_over_stdin,
    test_interrupt_returns_control_within_two_seconds,
    test_kernel_does_not_see_the_backend_token,
    test_kernel_killed_inside_is_reported_dead,
    test_restart_keeps_the_sandbox_and_resets_the_kernel,
    test_shutdown_removes_the_sandbox_and_its_processes,
    test_two_kernels_stay_separate,
)

pytestmark = pytest.mark.gvisor
__all__ = ["test_conformance", "test_execute_streams_display_and_errors", "test_input_over_stdin",
           "test_interrupt_returns_control_within_two_seconds", "test_kernel_does_not_see_the_backend_token",
           "test_kernel_killed_inside_is_reported_dead", "test_restart_keeps_the_sandbox_and_resets_the_kernel",
           "test_shutdown_removes_the_sandbox_and_its_processes", "test_two_kernels_stay_separate"]


@pytest.fixture(scope="module")
def backend(kernelspec_dir: Path) -> Iterator[Backend]:
    """A gvisor backend whose `snapkernel-python` kernels restore the default spec's template."""
    with serving_backend("gvisor", ["--BackendApp.templates=True", "--BackendApp.warm_pool=0"]) as b:
        log = b.state_dir / "backend.log"
        deadline = time.monotonic() + 120
        while " ready (cpu 1, memory 4Gi" not in log.read_text():
            assert time.monotonic() < deadline, f"no template after 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        yield b
        text = log.read_text()
        restored = len(re.findall(r"restored from template", text))
        assert restored >= 10 and not re.search(r"template \w+ dropped", text), \
            f"{restored} kernels from the template:\n{text[-3000:]}"
