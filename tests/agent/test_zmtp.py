"""The agent's ZMTP connections against real libzmq sockets (pyzmq's ROUTER and XPUB, as ipykernel binds them)."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from snapkernel.agent.zmtp import Peer, ZmtpError


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(linger=0)


def pump(peers: list[Peer], until: float = 0.3) -> list[tuple[Peer, list[bytes]]]:
    """Read from the peers for `until` seconds; what they received, in order."""
    got: list[tuple[Peer, list[bytes]]] = []
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        live = [p for p in peers if p.sock is not None]
        ready, _, _ = select.select(live, [], [], max(deadline - time.monotonic(), 0))
        for peer in ready:
            messages = peer.receive()
            got += [(peer, m) for m in messages or []]
    return got


def test_a_dealer_is_routed_by_its_identity_both_ways(ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path) -> None:
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"ipc://{tmp_path}/shell")
    peer = Peer(f"{tmp_path}/shell", b"DEALER", b"client-1")
    peer.send([b"<IDS|MSG>", b"sig", b"x" * 1000, b""])  # held until the handshake: long and empty frames too
    assert peer.connect()
    pump([peer], 0.2)
    assert peer.ready
    assert router.poll(2000)
    assert router.recv_multipart() == [b"client-1", b"<IDS|MSG>", b"sig", b"x" * 1000, b""]
    big = bytes(range(256)) * 4096  # 1 MiB: many reads
    router.send_multipart([b"client-1", b"reply", big])
    got = pump([peer], 1.0)
    assert [m for _, m in got] == [[b"reply", big]]


def test_a_sub_is_subscribed_to_everything(ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path) -> None:
    xpub = ctx.socket(zmq.XPUB)
    xpub.bind(f"ipc://{tmp_path}/iopub")
    peer = Peer(f"{tmp_path}/iopub", b"SUB")
    assert peer.connect()
    pump([peer], 0.2)
    assert xpub.poll(2000) and xpub.recv() == b"\x01"  # the subscription to every topic
    for i in range(100):
        xpub.send_multipart([b"kernel.status", str(i).encode()])
    got = pump([peer], 0.5)
    assert [m for _, m in got] == [[b"kernel.status", str(i).encode()] for i in range(100)]


def test_messages_wait_for_a_socket_that_is_not_bound_yet(ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path) -> None:
    peer = Peer(f"{tmp_path}/shell", b"DEALER", b"early")
    peer.send([b"first"])
    assert not peer.connect()  # nothing bound: the kernel is still starting
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"ipc://{tmp_path}/shell")
    assert peer.connect()
    peer.send([b"second"])
    pump([peer], 0.2)
    assert router.poll(2000)
    assert [router.recv_multipart(), router.recv_multipart()] == [[b"early", b"first"], [b"early", b"second"]]


def test_a_closed_kernel_socket_ends_the_peer(ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path) -> None:
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"ipc://{tmp_path}/shell")
    peer = Peer(f"{tmp_path}/shell", b"DEALER", b"c")
    assert peer.connect()
    pump([peer], 0.2)
    router.close(linger=0)
    assert select.select([peer], [], [], 2)[0]
    assert peer.receive() is None
    assert peer.closed and peer.sock is None
    peer.send([b"after"])  # dropped, not raised: the kernel is gone


def test_a_peer_that_is_not_zmtp_is_refused(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "s"))
    server.listen(1)
    peer = Peer(str(tmp_path / "s"), b"DEALER", b"c")
    assert peer.connect()
    conn, _ = server.accept()
    conn.sendall(b"HTTP/1.1 200 OK\r\n" + b"x" * 64)
    assert select.select([peer], [], [], 2)[0]
    with pytest.raises(ZmtpError, match="not a ZMTP 3 peer"):
        peer.receive()
    conn.close()
    server.close()
