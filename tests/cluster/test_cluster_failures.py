"""A node that dies (its raylet and daemon SIGKILLed): a fan-out job running over it completes on the other
node, its kernel turns `lost` naming it within seconds, and the other node's kernel keeps running."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.cluster.conftest import Cluster, running_cluster
from tests.cluster.test_cluster import kernelspec, sandbox_of
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value


@pytest.fixture
def own_cluster(kernelspec_dir: Path) -> Iterator[Cluster]:
    with running_cluster() as c:
        yield c


def test_a_node_lost_mid_job_the_job_completes_its_kernel_is_lost_the_other_runs(own_cluster: Cluster,
                                                                                kernelspec_dir: Path) -> None:
    cluster = own_cluster
    name = kernelspec(kernelspec_dir, "cluster-big", cpu=1.5)  # one per node: 0.5 CPU left on each
    with running_kernel(name) as (km_a, kc_a), running_kernel(name) as (km_b, _):
        a, b = sandbox_of(cluster, km_a), sandbox_of(cluster, km_b)
        assert {a.node, b.node} == {"node-1", "node-2"}
        run(kc_a, "kept = 'alive'")
        cell = ("%%fanout --over range(40) --as x --workers 4 --cpu 0.25 --memory 128Mi --retries 1 --out res\n"
                "import time\ntime.sleep(0.1)\nx * 3")
        done: dict[str, Any] = {}
        job = threading.Thread(target=lambda: done.update(zip(("content", "outputs"), run(kc_a, cell, 180),
                                                              strict=True)))
        job.start()
        time.sleep(4)  # workers up on both nodes, items running
        killed = time.monotonic()
        cluster.kill_node(b.node)
        job.join(200)
        assert done["content"]["status"] == "ok", done
        assert value(kc_a, "res == [x * 3 for x in range(40)]") == "True"
        # B's kernel is lost, naming its node, within seconds (test settings: Ray notices in about 2 s).
        while (lost := cluster.call(lambda c: c.get_sandbox(b.id))).state != pb.LOST:
            assert time.monotonic() - killed < 20, lost
            time.sleep(0.2)
        assert b.node in lost.message, lost.message
        assert value(kc_a, "kept") == "'alive'"
        listed = {s.id: s for s in cluster.call(lambda c: c.list_sandboxes(include_ended=True))}
        assert listed[b.id].state == pb.LOST and listed[a.id].state == pb.RUNNING
        status = cluster.call(lambda c: c.status())
        assert [n.alive for n in status.nodes if n.name == b.node] == [False]


def test_with_replace_lost_a_sandbox_of_a_lost_node_starts_again_elsewhere_from_its_snapshot(
        kernelspec_dir: Path) -> None:
    with running_cluster(["--BackendApp.replace_lost=True"]) as cluster:
        sb = cluster.call(lambda c: c.create_sandbox(pb.CreateSandboxRequest(spec=pb.SandboxSpec(cpu=1))))
        while (sb := cluster.call(lambda c: c.get_sandbox(sb.id))).state != pb.RUNNING:
            time.sleep(0.1)
        snap = cluster.call(lambda c: c.create_snapshot(sb.id, kind="state"))
        cluster.kill_node(sb.node)
        deadline = time.monotonic() + 60
        while (back := cluster.call(lambda c: c.get_sandbox(sb.id))).node == sb.node or back.state != pb.RUNNING:
            assert back.state != pb.LOST and time.monotonic() < deadline, back
            time.sleep(0.2)
        assert back.spec.restore_from == snap.id
