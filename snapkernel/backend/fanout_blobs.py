"""Fan-out payloads over a few MiB: input blobs assembled from the client's chunks in the job's directory and
handed to workers as files in their workspace; result blobs a worker left as files, read back and sent as
chunks. Files in a worker's workspace are the worker's code's to plant: nothing there is followed as a link.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from snapkernel.backend.workspace import WORKSPACE
from snapkernel.errors import InvalidSpecError
from snapkernel.protocol.fanout import BLOB_DIR
from snapkernel.protocol.v1 import backend_pb2 as pb

CHUNK = 1024 * 1024
MAX_BLOB = 2 * 1024**3
BLOB_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def blob_dir(sandbox_dir: str, owner: tuple[int, int] | None = None) -> int:
    """A worker's blob directory, opened without following links: the worker's code could plant them to make
    the backend read or write host files. Made for `owner`, the user the worker runs as."""
    workspace = os.open(Path(sandbox_dir) / WORKSPACE, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            os.mkdir(BLOB_DIR, 0o700, dir_fd=workspace)
            if owner is not None:
                os.chown(BLOB_DIR, *owner, dir_fd=workspace, follow_symlinks=False)
        except FileExistsError:
            pass
        return os.open(BLOB_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=workspace)
    finally:
        os.close(workspace)


def put_blob(src: Path, d: int, name: str) -> None:
    """An input blob into a worker's blob directory: a hard link, or a copy where the worker's workspace is a
    file system of its own (its disk quota). Readable by the worker's user either way."""
    os.chmod(src, 0o644)  # the job's blob directory is the backend's (0700): only workers get to see this
    try:
        os.link(src, name, dst_dir_fd=d)
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=d)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, CHUNK)


def take_blob(sandbox_dir: str, name: str) -> bytes:
    """Read and remove a result a worker left as a file (a plain file of a checked name, nothing else)."""
    if not BLOB_NAME.match(name):
        raise InvalidSpecError(f"result blob name {name!r} is not accepted")
    d = blob_dir(sandbox_dir)
    try:
        with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=d), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BLOB:
                raise InvalidSpecError(f"result blob {name!r} is not a plain file of at most {MAX_BLOB} bytes")
            data = f.read()
        os.unlink(name, dir_fd=d)
        return data
    finally:
        os.close(d)


def chunks(name: str, data: bytes) -> Iterator[pb.BlobChunk]:
    for i in range(0, len(data), CHUNK):
        yield pb.BlobChunk(name=name, data=data[i:i + CHUNK], last=i + CHUNK >= len(data))


class InputBlobs:
    """A job's input blobs: chunks in, whole files in the job's own directory (the backend's, 0700) out."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.parts: dict[str, list[bytes]] = {}

    async def receive(self, chunk: pb.BlobChunk) -> None:
        if not BLOB_NAME.match(chunk.name):
            raise InvalidSpecError(f"blob name {chunk.name!r} is not accepted: use 1-64 letters, digits, - or _")
        parts = self.parts.setdefault(chunk.name, [])
        parts.append(chunk.data)
        if sum(map(len, parts)) > MAX_BLOB:
            raise InvalidSpecError(f"blob {chunk.name!r} is over the {MAX_BLOB} byte limit of one payload")
        if chunk.last:
            data = b"".join(self.parts.pop(chunk.name))
            self.dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread((self.dir / chunk.name).write_bytes, data)

    def link(self, name: str, sandbox_dir: str, owner: tuple[int, int] | None) -> None:
        """Blob `name` into a worker's blob directory, for the item that names it."""
        d = blob_dir(sandbox_dir, owner)
        try:
            put_blob(self.dir / name, d, name)
        finally:
            os.close(d)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
