"""Snapshots across nodes through a real S3-compatible server (`rclone serve s3`): taken on one node, resumed on
the other; a tampered object is refused naming it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapkernel.errors import SnapshotCorruptError
from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.cluster.conftest import NODE_CPUS, Cluster, running_cluster
from tests.cluster.test_cluster import kernelspec, sandbox_of
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value
from tests.snapshots.shared_fixtures import BUCKET, S3Server, s3_server


@pytest.fixture
def s3_cluster(tmp_path: Path, kernelspec_dir: Path) -> Iterator[tuple[Cluster, S3Server]]:
    with s3_server(tmp_path) as s3:
        saved = {k: os.environ.get(k) for k in s3.env()}
        os.environ.update(s3.env())  # the nodes' daemons inherit it from their raylets
        try:
            with running_cluster(store=f"s3://{BUCKET}/cluster") as cluster:
                yield cluster, s3
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_a_snapshot_taken_on_one_node_resumes_on_the_other_and_tampering_is_refused(
        s3_cluster: tuple[Cluster, S3Server], kernelspec_dir: Path) -> None:
    cluster, s3 = s3_cluster
    name = kernelspec(kernelspec_dir, "cluster-s3")
    with running_kernel(name) as (km, kc):
        run(kc, "import numpy as np\nweights = np.arange(1000.0)")
        sb = sandbox_of(cluster, km)
        snap = cluster.call(lambda c: c.create_snapshot(sb.id, kind="state"))
        run(kc, "weights = weights * 2")
        other = cluster.call(lambda c: c.create_snapshot(sb.id, kind="state"))
    prefix = s3.root / BUCKET / "cluster"
    assert {p.parent.name for p in prefix.rglob("manifest.json")} >= {snap.id, other.id}
    with cluster.ray_holds(sb.node, NODE_CPUS):  # the node that took them is full: they resume on the other
        resumed = kernelspec(kernelspec_dir, "cluster-s3-resume", restore_from=snap.id)
        with running_kernel(resumed) as (km, kc):
            assert sandbox_of(cluster, km).node != sb.node
            assert value(kc, "float(weights.sum())") == "499500.0"
        # One byte of the other snapshot changed in the object store: the other node refuses it, naming it.
        other_dir = next(p.parent for p in prefix.rglob("manifest.json") if p.parent.name == other.id)
        data = max((p for p in other_dir.rglob("*") if p.is_file() and p.name != "manifest.json"),
                   key=lambda p: p.stat().st_size)
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        with pytest.raises(SnapshotCorruptError, match=data.name):
            cluster.call(lambda c: c.create_sandbox(pb.CreateSandboxRequest(
                spec=pb.SandboxSpec(restore_from=other.id, cpu=1, memory="512Mi"))))
    assert [s for s in cluster.call(lambda c: c.list_sandboxes()) if s.spec.restore_from == other.id] == []
