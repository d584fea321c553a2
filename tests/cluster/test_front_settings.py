"""Bad settings of a cluster's front: each stops it at start, exit code 2, with a message naming the value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.snapshots.shared_fixtures import BUCKET, s3_server


def front(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapkernel.cli", "backend", "--state-dir", str(tmp_path / "front"),
                           "--listen", f"unix://{tmp_path / 'front.sock'}", *args], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("args", "named"), [
    (["--placement", "rays"], "placement 'rays' is not valid: use local"),
    (["--placement", "ray"], "--placement ray needs the Ray cluster's address"),
    (["--placement", "ray", "--ray-address", "nohost"], "--ray-address 'nohost' is not valid"),
    (["--placement", "ray", "--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster at --ray-address "
                                                              "'127.0.0.1:1'"),
    (["--placement", "ray", "--ray-address", "127.0.0.1:1", "--BackendApp.snapshot_store=ftp://x/y"], "ftp://x/y"),
    (["--placement", "ray", "--ray-address", "127.0.0.1:1", "--BackendApp.snapshot_store=s3://Bad_Bucket/p"],
     "Bad_Bucket"),
])
def test_a_bad_setting_stops_the_front_naming_it(tmp_path: Path, args: list[str], named: str) -> None:
    done = front(tmp_path, *args)
    assert done.returncode == 2, done
    assert named in done.stderr + done.stdout, done.stderr


def test_wrong_store_credentials_stop_the_front_naming_the_store(tmp_path: Path) -> None:
    with s3_server(tmp_path / "s3") as s3:
        done = front(tmp_path, "--placement", "ray", "--ray-address", "127.0.0.1:1",
                     f"--BackendApp.snapshot_store=s3://{BUCKET}/snaps",
                     env=s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret"))
    assert done.returncode == 2, done
    assert f"wrong credentials for s3://{BUCKET}/snaps" in done.stderr, done.stderr
