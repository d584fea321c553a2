"""IPython magics of snapkernel kernels (loaded in every one; `%load_ext snapkernel` elsewhere).

`%snapshot [--name NAME] [--kind memory|state]` asks the backend, through the sandbox's agent, for a
snapshot of this kernel as soon as the current cell has finished. The kernel holds no token and no
network: the request travels as a message on the kernel's iopub channel that the agent takes off it.
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

REQUEST_MSG_TYPE = "snapkernel_request"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit the kernel
        raise UsageError(f"%snapshot: {message}. Usage: %snapshot [--name NAME] [--kind memory|state]")


@magics_class
class SnapKernelMagics(Magics):  # type: ignore[misc]
    @line_magic  # type: ignore[misc]
    def snapshot(self, line: str) -> None:
        parser = _Parser(prog="%snapshot", add_help=False)
        parser.add_argument("--name", default="")
        parser.add_argument("--kind", choices=["memory", "state"], default="memory")
        args = parser.parse_args(shlex.split(line))
        kernel = getattr(self.shell, "kernel", None)
        if kernel is None or not os.environ.get("SNAPKERNEL_SANDBOX_ID"):
            raise UsageError("%snapshot works in snapkernel kernels only (this kernel runs outside a sandbox)")
        kernel.session.send(kernel.iopub_socket, REQUEST_MSG_TYPE,
                            {"action": "snapshot", "name": args.name, "kind": args.kind},
                            parent=kernel.get_parent("shell"))
        print(f"snapkernel: a {args.kind} snapshot{' ' + repr(args.name) if args.name else ''} will be taken "
              "when this cell finishes (`snapkernel snapshots list` shows it)")
