"""The kernel bridge: one ipykernel on loopback ZMQ, its channels carried as frames on stdin/stdout.

Single-threaded: one poll loop watches stdin and every connection to the kernel, which the agent speaks ZMTP
on itself (zmtp.py: no libzmq I/O thread between them). Shell, control and stdin traffic of each Jupyter client
gets its own DEALER connections carrying that client's identity, so the kernel routes its replies (and
`input()` requests) back to the right client exactly as if the client were connected directly. What goes to
the backend in one pass of the loop goes in one write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections import OrderedDict

from google.protobuf import json_format

from snapkernel.agent.fanout_relay import FanoutRelay
from snapkernel.agent.kernel_process import KernelProcess
from snapkernel.agent.own_client import OwnClient
from snapkernel.agent.zmtp import Peer, ZmtpError
from snapkernel.protocol import hops
from snapkernel.protocol.frames import FrameBuffer, decode, encode
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger("snapkernel.agent")

_CHANNEL_NAMES = {pb.SHELL: "shell", pb.CONTROL: "control", pb.STDIN: "stdin"}
_MAX_CLIENTS = 64  # clients (identities) kept connected at once; the least recently seen are dropped
_KILL_GRACE = 3.0
REQUEST_MARK = b"snapkernel_request"
STDIN_CONNECT_TIMEOUT_MS = 2000
# Run in the kernel by its agent (not the notebook's history); names nothing in the user's namespace.
IDENTITY_CODE = "__import__('os').environ.update({env!r}); get_ipython().kernel.session.key = {key!r}"
# A kernel restored with more (or less) memory than its image had: its address-space limit follows (the soft one:
# the hard one is unlimited, see GvisorRuntime.rlimits).
MEMORY_CODE = ("; (lambda r: r.setrlimit(r.RLIMIT_AS, ({memory}, r.getrlimit(r.RLIMIT_AS)[1])))"
               "(__import__('resource'))")
# The loop sleeps until a message or SIGCHLD (the kernel's exit) wakes it; this is only a safety net. Under
# gVisor every wake-up of an idle sandbox costs CPU, so it must be rare (it used to be 200 ms).
IDLE_POLL_MS = 10_000
FALLBACK_POLL_MS = 200  # where no SIGCHLD watch could be set up (not the main thread)
CONNECT_RETRY_MS = 10  # while the kernel has not bound a socket the agent connects to yet
READ_EVENTS = select.POLLIN | select.POLLHUP | select.POLLERR


def _socket_identity(ident: bytes) -> bytes:
    # ZMQ reserves identities starting with a zero byte (auto-generated ones look like that).
    return b"\x01sk" + ident if not ident or ident[0] == 0 else ident


class KernelBridge:
    def __init__(self, key: bytes, signature_scheme: str, runtime_dir: str, in_fd: int = 0, out_fd: int = 1) -> None:
        self.key = key
        self.signature_scheme = signature_scheme
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.poller = select.poll()
        self.kernel: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.addresses: dict[str, str] = {}  # channel -> unix socket path
        self.iopub: Peer | None = None
        # ident -> {channel: DEALER connection}; a connection -> (channel, ident) for the way back
        self.clients: OrderedDict[bytes, dict[pb.Channel.ValueType, Peer]] = OrderedDict()
        self.routes: dict[Peer, tuple[pb.Channel.ValueType, bytes]] = {}
        self.peers: dict[int, Peer] = {}  # fd -> connection, once connected
        self.connecting: list[Peer] = []  # not connected yet: retried on every pass of the loop
        self.out = bytearray()  # frames for the backend, written at the end of the loop's pass
        self.exit_reported = True
        self.running = True
        self.own = OwnClient(key)
        self.requests: dict[str, list[pb.KernelRequest]] = {}  # cell msg_id -> requests to send when it ends
        self.own_shell: Peer | None = None
        self.runtime_dir = runtime_dir
        self.child_fd: int | None = None  # readable after a SIGCHLD (see `_watch_children`)
        self.relay = FanoutRelay(os.environ.get("SNAPKERNEL_FANOUT_SOCKET") or os.path.join(runtime_dir, "fanout.sock"),
                                 self.send, self.poller)

    # --- the link -------------------------------------------------------------------------------
    def send(self, msg: pb.AgentMessage) -> None:
        """Queue a frame for the backend: the loop writes everything queued at once before it waits again."""
        self.out += encode(msg)

    def flush(self) -> None:
        if not self.out:
            return
        data = memoryview(self.out)
        while data:
            try:
                n = os.write(self.out_fd, data)
            except BlockingIOError:  # the shim is slow to read: wait for the pipe (rare, output floods)
                select.select([], [self.out_fd], [])
                continue
            data = data[n:]
        del data
        self.out.clear()
        if hops.ENABLED:
            hops.mark("agent_out")

    # --- connections to the kernel --------------------------------------------------------------
    def _open(self, channel: str, socket_type: bytes, identity: bytes = b"") -> Peer:
        peer = Peer(self.addresses[channel], socket_type, identity)
        if peer.connect():
            self._watch(peer)
        else:
            self.connecting.append(peer)
        return peer

    def _watch(self, peer: Peer) -> None:
        """Poll a connected peer for input, and for room to write while it has bytes waiting."""
        if peer.sock is None:
            self._forget(peer)
            return
        self.peers[peer.fileno()] = peer
        self.poller.register(peer.fileno(), READ_EVENTS | (select.POLLOUT if peer.wants_write else 0))

    def _forget(self, peer: Peer) -> None:
        for fd, p in list(self.peers.items()):
            if p is peer:
                del self.peers[fd]
                self.poller.unregister(fd)
        if peer in self.connecting:
            self.connecting.remove(peer)
        peer.close()

    def _retry_connects(self) -> None:
        for peer in list(self.connecting):
            if peer.connect():
                self.connecting.remove(peer)
                self._watch(peer)

    def _wait_ready(self, peer: Peer, timeout_ms: int) -> bool:
        """Block until `peer`'s handshake is done (its READY came), reading nothing else meanwhile."""
        self.flush()
        deadline = time.monotonic() + timeout_ms / 1000
        while not peer.ready and not peer.closed and time.monotonic() < deadline:
            if peer.sock is None:
                self._retry_connects()
                time.sleep(CONNECT_RETRY_MS / 1000)
                continue
            if select.select([peer.sock], [], [], max(deadline - time.monotonic(), 0))[0]:
                if peer.receive() is None:
                    break
                self._watch(peer)
        return peer.ready

    # --- the kernel -----------------------------------------------------------------------------
    def start_kernel(self, launched: KernelProcess | None = None) -> None:
        """Start a kernel (or adopt one `__main__` launched already) and connect to its iopub."""
        self.generation += 1
        kp = launched or KernelProcess.launch(self.key, self.signature_scheme, self.runtime_dir, self.generation)
        self.kernel, self.addresses = kp.proc, kp.addresses
        self.iopub = self._open("iopub", b"SUB")
        self.exit_reported = False
        log.info("kernel started pid=%s generation=%s", self.kernel.pid, self.generation)
        self.send(pb.AgentMessage(kernel_started=pb.KernelStarted(pid=self.kernel.pid,
                                                                  generation=self.generation)))

    def stop_kernel(self) -> None:
        """Kill the kernel if alive and drop every socket of it."""
        if self.kernel is not None and self.kernel.poll() is None:
            self.kernel.terminate()
            try:
                self.kernel.wait(_KILL_GRACE)
            except subprocess.TimeoutExpired:
                self.kernel.kill()
                self.kernel.wait()
        self._report_exit()
        if os.getpid() == 1:
            _kill_leftovers()
        self.relay.close_all()
        for peer in list(self.routes):
            self._forget(peer)
        self.routes.clear()
        self.clients.clear()
        if self.own_shell is not None:
            self._forget(self.own_shell)
            self.own_shell = None
        for pending in self.own.pending.values():
            self.send(pb.AgentMessage(code_result=pb.CodeResult(id=pending.request_id, ok=False,
                                                                error="the kernel stopped")))
        self.own.pending.clear()
        if self.iopub is not None:
            self._forget(self.iopub)
            self.iopub = None

    def _report_exit(self) -> None:
        if self.kernel is None or self.exit_reported:
            return
        code = self.kernel.poll()
        if code is None:
            return
        self.exit_reported = True
        log.info("kernel exited code=%s generation=%s", code, self.generation)
        self.send(pb.AgentMessage(kernel_exited=pb.KernelExited(code=code, generation=self.generation)))

    # --- client sockets -------------------------------------------------------------------------
    def _client_sockets(self, ident: bytes) -> dict[pb.Channel.ValueType, Peer]:
        socks = self.clients.get(ident)
        if socks is not None:
            self.clients.move_to_end(ident)
            return socks
        if len(self.clients) >= _MAX_CLIENTS:
            _, old = self.clients.popitem(last=False)
            for peer in old.values():
                del self.routes[peer]
                self._forget(peer)
        socks = {}
        for channel in (pb.STDIN, pb.CONTROL, pb.SHELL):
            peer = self._open(_CHANNEL_NAMES[channel], b"DEALER", _socket_identity(ident))
            # The kernel's stdin ROUTER drops an input_request for an identity it has not seen yet,
            # so the shell request may only go out once this client's stdin connection is up.
            if channel == pb.STDIN and not self._wait_ready(peer, STDIN_CONNECT_TIMEOUT_MS):
                log.warning("stdin socket of a new client not connected after %s ms", STDIN_CONNECT_TIMEOUT_MS)
            self.routes[peer] = (channel, ident)
            socks[channel] = peer
        self.clients[ident] = socks
        return socks

    # --- commands from the backend --------------------------------------------------------------
    def handle(self, msg: pb.AgentMessage) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "frame":
            frame = msg.frame
            if frame.channel not in _CHANNEL_NAMES or len(frame.parts) < 2:
                self._error(f"dropped a frame for channel {frame.channel} with {len(frame.parts)} parts")
                return
            if self.kernel is None or self.kernel.poll() is not None:
                self._error("dropped a kernel message: the kernel is not running (restart it)")
                return
            peer = self._client_sockets(frame.parts[0])[frame.channel]
            peer.send(list(frame.parts[1:]))
            if peer.sock is not None:
                self._watch(peer)
            if hops.ENABLED:
                hops.mark("kernel_in")
        elif kind == "signal":
            if self.kernel is not None and self.kernel.poll() is None:
                try:
                    os.kill(self.kernel.pid, msg.signal)
                except (OSError, ValueError) as e:
                    self._error(f"cannot send signal {msg.signal} to the kernel: {e}")
        elif kind == "restart":
            self.stop_kernel()
            self.start_kernel()
        elif kind == "shutdown":
            self.running = False
        elif kind == "run_code":
            self._run_code(msg.run_code)
        elif kind == "identity":
            self._take_identity(msg.identity)
        elif kind == "fanout":
            self.relay.deliver(msg.fanout)
        else:
            self._error(f"unknown command {kind!r}")

    def _kernel_request(self, parts: list[bytes]) -> bool:
        """Take a `%snapshot` or `%move` request off iopub; it is sent once its cell has finished."""
        if not any(REQUEST_MARK in p for p in parts[:4]):
            return False
        header, parent, content = OwnClient.decode(parts)
        if header.get("msg_type") != "snapkernel_request":
            return False
        request = pb.KernelRequest(action=str(content.get("action", "")), name=str(content.get("name", "")),
                                   kind=str(content.get("kind", "")))
        if isinstance(content.get("move"), dict):  # %move's overrides
            try:
                json_format.ParseDict(content["move"], request.move)
            except json_format.ParseError as e:
                self._error(f"%move request {content['move']!r} not understood: {e}")
                return True
        self.requests.setdefault(parent.get("msg_id", ""), []).append(request)
        return True

    def _release_requests(self, parts: list[bytes]) -> None:
        if not any(b'"idle"' in p for p in parts[-1:]):
            return
        _, parent, content = OwnClient.decode(parts)
        if content.get("execution_state") == "idle":
            for request in self.requests.pop(parent.get("msg_id", ""), []):
                self.send(pb.AgentMessage(kernel_request=request))

    def _run_code(self, req: pb.RunCode) -> bool:
        """Send `req` to the kernel as this agent's own client (False, answered at once, with no kernel)."""
        if self.kernel is None or self.kernel.poll() is not None:
            self.send(pb.AgentMessage(code_result=pb.CodeResult(id=req.id, ok=False, error="no kernel running")))
            return False
        if self.own_shell is None:
            self.own_shell = self._open("shell", b"DEALER")
        self.own_shell.send(self.own.execute_request(req.id, req.code))
        if self.own_shell.sock is not None:
            self._watch(self.own_shell)
        return True

    def _take_identity(self, identity: pb.Identity) -> None:
        """A restored kernel becomes this sandbox's: its session key and environment, then this agent's (the
        request is signed with the old key; the kernel verifies each later message after the change)."""
        key, env = bytes(identity.key), dict(identity.env)
        code = IDENTITY_CODE.format(key=key, env=env)
        if identity.memory:
            code += MEMORY_CODE.format(memory=identity.memory)
            try:  # a restarted kernel gets it too
                resource.setrlimit(resource.RLIMIT_AS, (identity.memory, resource.getrlimit(resource.RLIMIT_AS)[1]))
            except (ValueError, OSError) as e:
                log.warning("address-space limit not set to %s: %s", identity.memory, e)
        if self._run_code(pb.RunCode(id=identity.id, code=code)):
            self.key = self.own.key = key
        os.environ.update(env)  # a restarted kernel gets it too

    def _error(self, text: str) -> None:
        log.warning("%s", text)
        self.send(pb.AgentMessage(error=text))

    # --- the loop -------------------------------------------------------------------------------
    def _watch_children(self) -> int:
        """Poll timeout in ms: SIGCHLD makes `child_fd` readable, so the kernel's exit wakes the loop at
        once and an idle agent makes no system calls at all meanwhile."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            signal.signal(signal.SIGCHLD, _on_sigchld)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: no signal handlers, so look every FALLBACK_POLL_MS
            os.close(r)
            os.close(w)
            return FALLBACK_POLL_MS
        self.child_fd = r
        self.poller.register(r, select.POLLIN)
        return IDLE_POLL_MS

    def _drain_child_fd(self) -> None:
        assert self.child_fd is not None
        with contextlib.suppress(BlockingIOError):
            while os.read(self.child_fd, 512):
                pass

    def run(self, launched: KernelProcess | None = None) -> int:
        os.set_blocking(self.in_fd, False)
        self.poller.register(self.in_fd, select.POLLIN)
        idle_ms = self._watch_children()
        self.send(pb.AgentMessage(hello=pb.AgentHello(python=sys.version.split()[0], pid=os.getpid())))
        self.start_kernel(launched)
        frames = FrameBuffer()
        check_exit = True  # also catches a kernel that ended before the SIGCHLD watch was set up
        while self.running:
            if check_exit or self.child_fd is None:
                self._report_exit()
            self._retry_connects()
            self.flush()
            events = self.poller.poll(CONNECT_RETRY_MS if self.connecting else idle_ms)
            check_exit = not events
            for fd, event in events:
                if fd == self.in_fd:
                    if not self._from_backend(frames):
                        break
                elif fd == self.child_fd:
                    check_exit = True
                    self._drain_child_fd()
                    if os.getpid() == 1:
                        _reap_orphans(self.kernel.pid if self.kernel is not None else 0)
                elif (peer := self.peers.get(fd)) is not None:
                    self._from_kernel(peer, event)
                else:  # the fan-out relay's (maybe closed earlier in this batch)
                    self.relay.on_readable(fd)
        self.stop_kernel()
        self.flush()
        return 0

    def _from_backend(self, frames: FrameBuffer) -> bool:
        try:
            data = os.read(self.in_fd, 1 << 20)
        except BlockingIOError:
            return True
        if not data:
            log.info("link closed; stopping")
            self.running = False
            return False
        if hops.ENABLED:
            hops.mark("agent_in")
        for body in frames.feed(data):
            self.handle(decode(body))
        return True

    def _from_kernel(self, peer: Peer, event: int) -> None:
        if event & select.POLLOUT:
            peer.flush()
        if event & READ_EVENTS:
            try:
                messages = peer.receive()
            except ZmtpError as e:
                log.warning("%s; dropping the connection", e)
                messages = None
            if messages is None:  # the kernel closed it: it is ending, or the connection broke
                self._lost(peer)
                return
            for parts in messages:
                self._kernel_message(peer, parts)
        self._watch(peer)

    def _lost(self, peer: Peer) -> None:
        self._forget(peer)
        if peer in self.routes:  # the client's next message connects it again
            _, ident = self.routes[peer]
            for other in self.clients.pop(ident, {}).values():
                self.routes.pop(other, None)
                self._forget(other)
        elif peer is self.own_shell:
            self.own_shell = None
        elif peer is self.iopub:
            self.iopub = self._open("iopub", b"SUB") if self.kernel is not None and self.kernel.poll() is None else None

    def _kernel_message(self, peer: Peer, parts: list[bytes]) -> None:
        if hops.ENABLED:
            hops.mark("kernel_out")
        if peer is self.iopub:
            if self.own.pending and self.own.owns(parts):
                self.own.on_iopub(parts)  # the agent's own request: not the notebook's business
            elif not self._kernel_request(parts):
                if self.requests:
                    self._release_requests(parts)
                self.send(pb.AgentMessage(frame=pb.KernelFrame(channel=pb.IOPUB, parts=parts)))
        elif peer is self.own_shell:
            result = self.own.on_reply(parts)
            if result is not None:
                rid, ok, output, error = result
                self.send(pb.AgentMessage(code_result=pb.CodeResult(id=rid, ok=ok, output=output, error=error)))
        elif peer in self.routes:
            channel, ident = self.routes[peer]
            self.send(pb.AgentMessage(frame=pb.KernelFrame(channel=channel, parts=[ident, *parts])))


# As a gvisor sandbox's PID 1 the agent is the init of everything its kernel starts (not so under the
# process runtime, where the host's init is).
def _reap_orphans(kernel_pid: int) -> None:
    """Reap the orphans the agent inherits: their zombies would count against the sandbox's pids limit. The
    kernel's own exit is left for Popen to collect."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == kernel_pid:
            return
        os.waitpid(info.si_pid, 0)


def _kill_leftovers() -> None:
    """A restarted kernel starts clean: kill what the old one left behind (its children, a fork bomb's
    processes). kill(-1) reaches every process in the sandbox but the agent itself."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while True:
            os.waitpid(-1, 0)


def _on_sigchld(signum: int, frame: object) -> None:
    """Nothing to do here: the signal's byte on the wakeup fd is what wakes the loop."""


def main(launched: KernelProcess, key: bytes, scheme: str, runtime_dir: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s agent %(levelname)s %(message)s")
    bridge = KernelBridge(key, scheme, runtime_dir)
    try:
        return bridge.run(launched)
    except BrokenPipeError:  # the shim is gone: nobody is left to talk to
        if bridge.kernel is not None:
            bridge.kernel.kill()
        return 0
