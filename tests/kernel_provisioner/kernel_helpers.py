"""Helpers to drive real kernels through jupyter_client, as a notebook frontend would."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from snapkernel.kernel_provisioner.kernelspec import kernel_json


def write_kernelspec(kernelspec_dir: Path, name: str, config: dict[str, Any]) -> str:
    """A snapkernel kernelspec with this provisioner config, in the tests' kernelspec dir; returns its name."""
    spec_dir = kernelspec_dir / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json(name, config)))
    return name


@contextlib.contextmanager
def running_kernel(name: str = "snapkernel-python",
                   cwd: str | None = None) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    km = KernelManager(kernel_name=name)
    km.start_kernel(**({"cwd": cwd} if cwd else {}))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            try:
                km.shutdown_kernel(now=True)
            except Exception as e:  # never hide the test's own failure behind a teardown error
                print(f"kernel shutdown failed: {e}")


def run(kc: BlockingKernelClient, code: str, timeout: float = 30) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Execute `code`; returns (reply content, iopub messages of that request)."""
    outputs: list[dict[str, Any]] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=outputs.append)
    return reply["content"], outputs


def reply_to(kc: BlockingKernelClient, msg_id: str, timeout: float = 20) -> dict[str, Any]:
    """The shell reply to `msg_id`, skipping stale ones (wait_for_ready may leave kernel_info replies)."""
    while True:
        reply: dict[str, Any] = kc.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def value(kc: BlockingKernelClient, expr: str, timeout: float = 30) -> str:
    """The text/plain repr of `expr` evaluated in the kernel."""
    content, outputs = run(kc, expr, timeout)
    assert content["status"] == "ok", content
    results = [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"]
    assert results, outputs
    return str(results[-1])
