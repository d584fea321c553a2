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
import collections
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from typing import Any

from snapkernel.protocol import hops
from snapkernel.protocol.frames import SEQ, read_frame, read_from_backend


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


MEMORY_LIMIT = 64 * 1024 * 1024  # bytes of unacknowledged frames kept in memory; more go to the spool file
SPOOL_LIMIT = 1024 * 1024 * 1024  # bytes the spool file may hold; past it the agent's output waits
SPOOL_FILE = "shim-spool"


class Outbox:
    """Frames sent or to send to the backend, kept until it acknowledges them: the oldest in memory, and
    once that holds `memory_limit` bytes, the newer ones in a spool file, up to `spool_limit` bytes."""

    def __init__(self, spool_path: str, memory_limit: int = MEMORY_LIMIT, spool_limit: int = SPOOL_LIMIT,
                 first: int = 1) -> None:
        self.spool_path = spool_path
        self.memory_limit = memory_limit
        self.spool_limit = spool_limit
        self.first = first  # the number of the oldest frame kept
        self.memory: collections.deque[bytes] = collections.deque()
        self.memory_bytes = 0
        self.spooled: collections.deque[tuple[int, int]] = collections.deque()  # (offset, size) in the spool
        self.spool: int | None = None  # its fd, open while frames are in it
        self.spool_end = 0
        self.added = asyncio.Event()

    @property
    def next(self) -> int:
        return self.first + len(self.memory) + len(self.spooled)

    def fits(self, size: int) -> bool:
        if not self.spooled and self.memory_bytes + size <= self.memory_limit:
            return True
        return self.spool_end + size <= self.spool_limit or (not self.spooled and not self.memory)

    def add(self, frame: bytes) -> int:
        """Keep `frame` (the caller checked it `fits`); returns its number."""
        seq = self.next
        if not self.spooled and (self.memory_bytes + len(frame) <= self.memory_limit or not self.memory):
            self.memory.append(frame)
            self.memory_bytes += len(frame)
        else:
            if self.spool is None:
                self.spool = os.open(self.spool_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.pwrite(self.spool, frame, self.spool_end)
            self.spooled.append((self.spool_end, len(frame)))
            self.spool_end += len(frame)
        self.added.set()
        return seq

    def get(self, seq: int) -> bytes | None:
        i = seq - self.first
        if i < 0 or i >= len(self.memory) + len(self.spooled):
            return None
        if i < len(self.memory):
            return self.memory[i]
        offset, size = self.spooled[i - len(self.memory)]
        assert self.spool is not None
        return os.pread(self.spool, size, offset)

    def ack(self, seq: int) -> None:
        """The backend has every frame up to `seq`: forget them."""
        while self.first <= seq and (self.memory or self.spooled):
            if self.memory:
                self.memory_bytes -= len(self.memory.popleft())
            else:
                self.spooled.popleft()
            self.first += 1
        if not self.spooled and self.spool is not None:
            os.close(self.spool)
            self.spool = None
            self.spool_end = 0
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spool_path)


class Shim:
    def __init__(self, socket_path: str, exit_file: str, argv: list[str], limits: dict[str, Any]) -> None:
        self.socket_path = socket_path
        self.exit_file = exit_file
        self.argv = argv
        self.limits = limits
        self.writer: asyncio.StreamWriter | None = None
        self.proc: asyncio.subprocess.Process | None = None
        # Numbers rise across shims of one sandbox too (a memory snapshot's restore starts a new one), so a
        # client that has seen a number before knows a frame again: the start is the time in microseconds.
        self.outbox = Outbox(os.path.join(os.path.dirname(os.path.abspath(socket_path)), SPOOL_FILE),
                             first=time.time_ns() // 1000)
        self.told_full = False
        self.sent = 0  # the highest number written to the connected backend

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
        code = await self.proc.wait()
        # What the agent wrote last (its kernel's end) goes to a backend before the exit status says it ended.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), 5.0)
        self._write_exit(code)
        server.close()
        if self.writer is not None:
            self.writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self.outbox.ack(self.outbox.next)
        return 0

    async def _drained(self) -> None:
        """Everything is acknowledged, or written to a connected backend (which holds it now)."""
        while (self.outbox.memory or self.outbox.spooled) and (self.writer is None or self.sent < self.outbox.next - 1):
            await asyncio.sleep(0.02)
        if self.writer is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.writer.drain()

    def _write_exit(self, code: int) -> None:
        tmp = self.exit_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"code": code}, f)
        os.replace(tmp, self.exit_file)

    def _forward(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def _pump_out(self) -> None:
        """Entry point's stdout → the outbox, whole frames only; while it is full, the agent's output waits."""
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            frame = await read_frame(self.proc.stdout)
            if frame is None:
                return
            while not self.outbox.fits(len(frame)):
                if not self.told_full:
                    self.told_full = True
                    print(f"shim: {self.outbox.memory_bytes + self.outbox.spool_end} bytes of the sandbox's "
                          "output wait for the backend (memory and spool file full): the agent's output is held "
                          "back until it reconnects, and the kernel may drop output meanwhile", file=sys.stderr)
                await asyncio.sleep(0.1)
            self.told_full = False
            if hops.ENABLED:
                hops.mark("shim_out")
            self.outbox.add(frame)

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        """Every frame kept, then each new one, to this backend (a connection starts with the unacknowledged)."""
        seq = self.outbox.first
        while self.writer is writer:
            seq = max(seq, self.outbox.first)
            frame = self.outbox.get(seq)
            if frame is None:
                self.outbox.added.clear()
                await self.outbox.added.wait()
                continue
            writer.write(SEQ.pack(seq) + frame)
            await writer.drain()
            self.sent = seq
            seq += 1

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        if self.writer is writer:
            self.writer = None
            self.outbox.added.set()  # its sender ends
        writer.close()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.writer is not None:  # a newer backend replaces the old connection
            self._drop(self.writer)
        self.writer = writer
        self.sent = 0
        sender = asyncio.create_task(self._send(writer))
        assert self.proc is not None and self.proc.stdin is not None
        stdin = self.proc.stdin
        try:
            while True:
                got = await read_from_backend(reader)
                if got is None:
                    break
                seq, frame = got
                if frame is None:
                    self.outbox.ack(seq)
                    continue
                if hops.ENABLED:
                    hops.mark("shim_in")
                stdin.write(frame)
                await stdin.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            # The shim is ending (its server closes): a quiet end, or asyncio logs a traceback into
            # sandbox.log that buries the sandbox's real last lines.
            pass
        except Exception as e:  # a malformed frame from the backend must not end the sandbox
            print(f"shim: dropping backend connection: {e}", file=sys.stderr)
        self._drop(writer)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
            await sender


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
