"""IPython magics of snapkernel kernels (loaded in every one; `%load_ext snapkernel` elsewhere).

`%snapshot [--name NAME] [--kind memory|state]` asks the backend, through the sandbox's agent, for a
snapshot of this kernel as soon as the current cell has finished. The kernel holds no token and no
network: the request travels as a message on the kernel's iopub channel that the agent takes off it.
`%move [--gpu G] [--cpu N] [--memory M] [--disk D] [--runtime R] [--allow-cpu-fallback]` travels the same way:
the kernel moves to those resources once the cell has finished, and the next cell runs there.

`%%fanout --over EXPR --as NAME [...]` runs the cell body once per item of EXPR in worker sandboxes
(see `snapkernel.fanout`); its flags follow ipyparallel's `%%px` vocabulary where they overlap.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from snapkernel.errors import RemoteError, SnapkernelError
from snapkernel.protocol.kinds import DEFAULT_SNAPSHOT_KIND, SNAPSHOT_KINDS

REQUEST_MSG_TYPE = "snapkernel_request"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit the kernel
        raise UsageError(f"{self.prog}: {message}. Usage: {self.format_usage().removeprefix('usage: ').strip()}")


def _flag_words(line: str) -> list[str]:
    """`--over [1, 2, 3] --as x` → ['--over', '[1, 2, 3]', '--as', 'x']: a flag's value is the raw text up to
    the next flag, so expressions keep their spaces and quotes."""
    words: list[str] = []
    for chunk in re.split(r"\s+(?=--?[A-Za-z])", " " + line.strip()):
        flag, _, rest = chunk.strip().partition(" ")
        if flag:
            words += [flag, rest.strip()] if rest.strip() else [flag]
    return words


def _fanout_parser() -> _Parser:
    p = _Parser(prog="%%fanout", add_help=False)
    p.add_argument("--over", required=True, metavar="EXPR", help="the items (any iterable expression)")
    p.add_argument("--as", dest="name", required=True, metavar="NAME", help="the name each item is bound to")
    p.add_argument("--workers", type=int, default=4, metavar="N")
    p.add_argument("--gpu", default="", metavar="SPEC")
    p.add_argument("--cpu", type=float, default=None, metavar="N")
    p.add_argument("--memory", default="", metavar="M")
    p.add_argument("--out", "-o", default="", metavar="VAR")
    p.add_argument("--unordered", action="store_true")
    p.add_argument("--return-exceptions", action="store_true")
    p.add_argument("--retries", type=int, default=0, metavar="N")
    p.add_argument("--timeout", type=float, default=0.0, metavar="S")
    p.add_argument("--clone", action="store_true")
    return p


@magics_class
class SnapKernelMagics(Magics):  # type: ignore[misc]
    @line_magic  # type: ignore[misc]
    def snapshot(self, line: str) -> None:
        parser = _Parser(prog="%snapshot", add_help=False)
        parser.add_argument("--name", default="")
        parser.add_argument("--kind", choices=SNAPSHOT_KINDS, default=DEFAULT_SNAPSHOT_KIND)
        args = parser.parse_args(shlex.split(line))
        from snapkernel.protocol.spec import MAX_SNAPSHOT_NAME

        if len(args.name) > MAX_SNAPSHOT_NAME:  # the backend refuses it too; say so before the cell runs on
            raise UsageError(f"%snapshot --name is {len(args.name)} characters long: names are at most "
                             f"{MAX_SNAPSHOT_NAME} characters")
        kernel = getattr(self.shell, "kernel", None)
        if kernel is None or not os.environ.get("SNAPKERNEL_SANDBOX_ID"):
            raise UsageError("%snapshot works in snapkernel kernels only (this kernel runs outside a sandbox)")
        kernel.session.send(kernel.iopub_socket, REQUEST_MSG_TYPE,
                            {"action": "snapshot", "name": args.name, "kind": args.kind},
                            parent=kernel.get_parent("shell"))
        print(f"snapkernel: a {args.kind} snapshot{' ' + repr(args.name) if args.name else ''} will be taken "
              "when this cell finishes (`snapkernel snapshots list` shows it)")

    @line_magic  # type: ignore[misc]
    def move(self, line: str) -> None:
        from snapkernel.errors import InvalidSpecError
        from snapkernel.protocol.spec import check_cpu, parse_disk, parse_gpu, parse_memory

        parser = _Parser(prog="%move", add_help=False)
        parser.add_argument("--gpu", metavar="SPEC")
        parser.add_argument("--cpu", type=float, metavar="N")
        parser.add_argument("--memory", metavar="M")
        parser.add_argument("--disk", metavar="D")
        parser.add_argument("--runtime", metavar="NAME")
        parser.add_argument("--allow-cpu-fallback", action="store_true")
        parser.add_argument("--timeout", type=float, default=0.0, metavar="S")
        args = parser.parse_args(shlex.split(line))
        resources = ("gpu", "cpu", "memory", "disk", "runtime")
        move = {k: getattr(args, k) for k in resources if getattr(args, k) is not None}
        if not move:
            raise UsageError("%move: give the resources to move to, e.g. `%move --memory 8Gi --cpu 2` or "
                             "`%move --gpu H100`")
        try:  # a typo is named now, not after the cell
            parse_gpu(move.get("gpu", ""))
            check_cpu(move.get("cpu", 1.0))
            parse_memory(move.get("memory", "1Gi"))
            parse_disk(move.get("disk", "1Gi"))
        except InvalidSpecError as e:
            raise UsageError(f"%move: {e}") from e
        if args.timeout < 0:
            raise UsageError(f"%move --timeout {args.timeout:g} is not valid: give seconds above 0")
        kernel = getattr(self.shell, "kernel", None)
        if kernel is None or not os.environ.get("SNAPKERNEL_SANDBOX_ID"):
            raise UsageError("%move works in snapkernel kernels only (this kernel runs outside a sandbox)")
        move.update(allow_cpu_fallback=args.allow_cpu_fallback, timeout=args.timeout)
        kernel.session.send(kernel.iopub_socket, REQUEST_MSG_TYPE, {"action": "move", "move": move},
                            parent=kernel.get_parent("shell"))
        what = ", ".join(f"{k} {v if v != '' else 'none'}" for k, v in move.items() if k in resources)
        print(f"snapkernel: this kernel moves to {what} when this cell finishes; the next cell runs there, with "
              "every variable")

    @cell_magic  # type: ignore[misc]
    def fanout(self, line: str, cell: str) -> Any:
        from snapkernel.fanout.capture import Payload, cell_function, local_cell_function
        from snapkernel.fanout.client import MapCall, Options, short_repr
        from snapkernel.fanout.remote import check_options

        args = _fanout_parser().parse_args(_flag_words(line))
        shell = self.shell
        assert shell is not None
        if args.out and not args.out.isidentifier():
            raise UsageError(f"%%fanout: --out {args.out!r} is not a Python name: use an identifier")
        try:
            items = list(shell.ev(args.over))  # type: ignore[no-untyped-call]
        except Exception as e:
            raise UsageError(f"%%fanout: --over {args.over!r} is not an iterable expression here: "
                             f"{type(e).__name__}: {e}") from e
        options = Options(workers=min(args.workers, max(1, len(items))), gpu=args.gpu, cpu=args.cpu,
                          memory=args.memory, retries=args.retries, timeout=args.timeout,
                          ordered=not args.unordered, return_exceptions=args.return_exceptions, clone=args.clone)
        local_fn = None
        try:
            check_options(options)
            if args.clone:  # the workers are clones of this kernel: nothing to capture or ship
                local_fn = local_cell_function(cell, args.name, shell.user_ns)
                payload = Payload(b"", hashlib.sha256(cell.encode()).hexdigest())
            else:
                payload = cell_function(cell, args.name, shell.user_ns)
        except SnapkernelError as e:
            raise UsageError(f"%%fanout: {e}") from e
        call = MapCall(payload, options, len(items), "fanout", local_fn, show_caller=False,
                       describe=lambda item: f"{args.name}={short_repr(item)}")
        try:
            results = [value for _, value in call.run((item, (item,), {}) for item in items)]
        except RemoteError:
            raise  # the user's own failure: its remote traceback is the point
        except SnapkernelError as e:  # the job's (workers could not start, ...): no traceback to read
            raise UsageError(f"%%fanout: {e}") from e
        if args.out:
            shell.user_ns[args.out] = results
            return None
        return results
