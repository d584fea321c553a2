"""The sandbox supervisor ("shim"): holds the sandbox's stdio so sandboxes outlive the backend.

Like containerd's shim, one runs per sandbox, in the sandbox's own session and process group. It starts
the sandbox's entry point (the agent, or `runsc run ...` that starts it) with pipes on its stdin and
stdout, and relays whole frames between those pipes and a unix socket in the sandbox directory that the
backend connects to. When the backend goes away the shim keeps the sandbox running and waits for it to
come back; when the entry point exits, the shim writes its exit status next to the socket and ends.

    python -m snapkernel.backend.shim --socket S --exit-file F [--limits JSON] -- ARGV...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from typing import Any

from snapkernel.agent.frames import read_frame


def _apply_limits(limits: dict[str, Any]) -> None:
    """Runs in the child between fork and exec: rlimits, CPU affinity and cgroup membership."""
    if limits.get("cgroup"):
        with open(os.path.join(limits["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if limits.get("memory"):
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory"], limits["memory"]))
    if limits.get("cpus"):
        os.sched_setaffinity(0, limits["cpus"])
    if limits.get("nofile"):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        n = limits["nofile"] if hard == resource.RLIM_INFINITY else min(limits["nofile"], hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


class Shim:
    def __init__(self, socket_path: str, exit_file: str, argv: list[str], limits: dict[str, Any]) -> None:
        self.socket_path = socket_path
        self.exit_file = exit_file
        self.argv = argv
        self.limits = limits
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None

    async def run(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                preexec_fn=lambda: _apply_limits(self.limits),
            )
        except (OSError, subprocess.SubprocessError) as e:
            print(f"shim: cannot start {self.argv[0]} with limits {self.limits}: {e}", file=sys.stderr)
            self._write_exit(127)
            return 1
        old = os.umask(0o177)  # the socket is the backend's alone
        try:
            server = await asyncio.start_unix_server(self._on_connect, self.socket_path)
        finally:
            os.umask(old)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._forward, sig)
        await self._pump_out()
        self._write_exit(await self.proc.wait())
        server.close()
        if self.writer is not None:
            self.writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        return 0

    def _write_exit(self, code: int) -> None:
        tmp = self.exit_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"code": code}, f)
        os.replace(tmp, self.exit_file)

    def _forward(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def _pump_out(self) -> None:
        """Entry point's stdout → backend, whole frames only; paused while no backend is connected."""
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            frame = await read_frame(self.proc.stdout)
            if frame is None:
                return
            while True:
                await self.connected.wait()
                writer = self.writer
                if writer is None:
                    continue
                try:
                    writer.write(frame)
                    await writer.drain()
                    break
                except (ConnectionError, RuntimeError):
                    self._drop(writer)  # resend this frame to the next backend

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        if self.writer is writer:
            self.writer = None
            self.connected.clear()
        writer.close()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.writer is not None:  # a newer backend replaces the old connection
            self._drop(self.writer)
        self.writer = writer
        self.connected.set()
        assert self.proc is not None and self.proc.stdin is not None
        stdin = self.proc.stdin
        try:
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    break
                stdin.write(frame)
                await stdin.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except Exception as e:  # a malformed frame from the backend must not end the sandbox
            print(f"shim: dropping backend connection: {e}", file=sys.stderr)
        self._drop(writer)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m snapkernel.backend.shim")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--exit-file", required=True)
    parser.add_argument("--limits", default="{}")
    parser.add_argument("--sandbox-id", default="")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return asyncio.run(Shim(args.socket, args.exit_file, argv, json.loads(args.limits)).run())


if __name__ == "__main__":
    sys.exit(main())
