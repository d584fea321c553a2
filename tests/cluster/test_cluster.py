"""Kernels through a cluster's front on a real Ray cluster (conftest.py): placement over two nodes, listings
naming the node, refusals naming what exists, hibernation on one node and waking on the other, fan-out over
both nodes, a restarted front or node daemon taking every sandbox back."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

from snapkernel.errors import NoCapacityError
from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.cluster.conftest import NODE_CPUS, Cluster
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec


def kernelspec(kernelspec_dir: Path, name: str, **config: object) -> str:
    return write_kernelspec(kernelspec_dir, name, {"cpu": 1, "memory": "512Mi", **config})


def sandbox_of(cluster: Cluster, km: KernelManager) -> pb.Sandbox:
    found = [s for s in cluster.call(lambda c: c.list_sandboxes()) if s.kernel_id == km.kernel_id]
    assert len(found) == 1, found
    return found[0]


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapkernel.cli", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **cluster.env()}, timeout=120)


@contextlib.contextmanager
def kernels(name: str, count: int) -> Iterator[list[tuple[KernelManager, object]]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_kernel(name)) for _ in range(count)]


def test_four_kernels_land_two_per_node_and_listings_name_the_node(cluster: Cluster, kernelspec_dir: Path) -> None:
    name = kernelspec(kernelspec_dir, "cluster-cpu1")
    with kernels(name, 4) as started:
        for i, (_, kc) in enumerate(started):
            assert value(kc, f"{i} * 7") == str(i * 7)  # type: ignore[arg-type]
        nodes = sorted(sandbox_of(cluster, km).node for km, _ in started)
        assert nodes == ["node-1", "node-1", "node-2", "node-2"]
        listing = cli(cluster, "sandboxes", "list")
        assert listing.returncode == 0 and "NODE" in listing.stdout.splitlines()[0], listing
        assert listing.stdout.count("node-1") == 2 and listing.stdout.count("node-2") == 2, listing.stdout
        status = cli(cluster, "status")
        assert "node-1" in status.stdout and "node-2" in status.stdout and "cpu 2/2" in status.stdout, status
        # Both nodes full (Ray's accounting): the next kernel is refused, naming what each node has free.
        with pytest.raises(NoCapacityError, match=r"no node has room .*node-1: 0 CPU.*node-2: 0 CPU"):
            cluster.call(lambda c: c.create_sandbox(pb.CreateSandboxRequest(spec=pb.SandboxSpec(cpu=1))))
    assert [s for s in cluster.call(lambda c: c.list_sandboxes()) if s.kernel_id] == []


@pytest.mark.gvisor
def test_a_kernel_asking_for_what_only_node_2_has_lands_there(cluster: Cluster, kernelspec_dir: Path) -> None:
    name = kernelspec(kernelspec_dir, "cluster-gvisor", runtime="gvisor")
    for _ in range(2):  # not by chance
        with running_kernel(name) as (km, kc):
            assert value(kc, "6 * 7") == "42"
            assert sandbox_of(cluster, km).node == "node-2"


def test_a_request_no_node_can_meet_is_refused_naming_what_exists(cluster: Cluster) -> None:
    with pytest.raises(NoCapacityError) as e:
        cluster.call(lambda c: c.create_sandbox(pb.CreateSandboxRequest(spec=pb.SandboxSpec(cpu=16))))
    assert "16 CPU" in str(e.value) and "node-1: 2 CPU" in str(e.value) and "node-2: 2 CPU" in str(e.value)
    with pytest.raises(NoCapacityError, match=r"runtimes imaginary.*node-1: .*runtimes process"):
        cluster.call(lambda c: c.create_sandbox(pb.CreateSandboxRequest(spec=pb.SandboxSpec(runtime="imaginary"))))
    assert cluster.call(lambda c: c.list_sandboxes()) == []


def test_a_kernel_hibernated_on_a_node_that_is_full_wakes_on_the_other(cluster: Cluster,
                                                                        kernelspec_dir: Path) -> None:
    name = kernelspec(kernelspec_dir, "cluster-sleep")
    with running_kernel(name) as (km, kc):
        run(kc, "kept = [1, 2, 3]\nword = 'here'")
        sb = sandbox_of(cluster, km)
        cluster.call(lambda c: c.hibernate_sandbox(sb.id))
        assert cluster.call(lambda c: c.get_sandbox(sb.id)).state == pb.HIBERNATED
        with cluster.ray_holds(sb.node, NODE_CPUS):  # its node is full now (its room went back at hibernation)
            assert value(kc, "word + str(sum(kept))", timeout=120) == "'here6'"
        woke = sandbox_of(cluster, km)
        assert woke.id == sb.id and woke.node != sb.node and woke.state == pb.RUNNING
        assert value(kc, "kept.append(4); sum(kept)") == "10"


def test_fanout_from_a_kernel_spreads_over_both_nodes_in_order(cluster: Cluster, kernelspec_dir: Path) -> None:
    name = kernelspec(kernelspec_dir, "cluster-fanout")
    with running_kernel(name) as (_, kc):
        cell = ("%%fanout --over range(40) --as x --workers 4 --cpu 0.5 --memory 256Mi --out res\n"
                "import os, time\ntime.sleep(0.05)\n(x, os.getcwd())")
        content, _ = run(kc, cell, timeout=180)
        assert content["status"] == "ok", content
        assert value(kc, "[x for x, _ in res] == list(range(40))") == "True"
        used = value(kc, "sorted({cwd.split('/nodes/')[1].split('/')[0] for _, cwd in res})")
        assert used == "['node-1', 'node-2']", used


def test_a_restarted_front_takes_every_sandbox_back(cluster: Cluster, kernelspec_dir: Path) -> None:
    name = kernelspec(kernelspec_dir, "cluster-restart")
    with kernels(name, 2) as started:
        for _, kc in started:
            run(kc, "kept = 'still here'")  # type: ignore[arg-type]
        before = {s.id: s.node for s in cluster.call(lambda c: c.list_sandboxes())}
        cluster.restart_front(signal.SIGKILL)
        assert {s.id: s.node for s in cluster.call(lambda c: c.list_sandboxes())} == before
        for _, kc in started:
            assert value(kc, "kept", timeout=60) == "'still here'"  # type: ignore[arg-type]


def test_a_killed_node_daemon_is_restarted_and_takes_its_sandboxes_back(cluster: Cluster,
                                                                          kernelspec_dir: Path) -> None:
    name = kernelspec(kernelspec_dir, "cluster-daemon")
    with running_kernel(name) as (km, kc):
        run(kc, "kept = 41")
        node = sandbox_of(cluster, km).node
        old = cluster.daemon_pid(node)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while cluster.daemon_pid(node) == old:
            assert time.monotonic() < deadline, cluster.log("front.log")
            time.sleep(0.1)
        assert value(kc, "kept + 1", timeout=60) == "42"
        assert sandbox_of(cluster, km).node == node
