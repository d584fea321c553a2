"""Fan-out's wire format beyond the messages: how one item runs and comes back as a `MapResult`, and where
payloads too large for a message lie as files. Shared by the worker agent, a `--clone` kernel serving items
and the backend, which must read both the same way.
"""

from __future__ import annotations

import contextlib
import io
import os
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from snapkernel.protocol.v1 import backend_pb2 as pb

MAX_FUNCTIONS = 16    # functions a worker keeps by hash, the oldest received dropped first (the backend mirrors this)
BLOB_DIR = ".snapkernel-blobs"  # in the worker's workspace: large payloads as files
BLOB_THRESHOLD = 4 * 1024 * 1024
MAX_OUTPUT = 64 * 1024  # characters an item may print that are sent back


def blob_path(name: str) -> str:
    """Where large payloads lie as files: the sandbox's workspace (HOME), which the backend reaches too."""
    return os.path.join(os.environ.get("HOME", "."), BLOB_DIR, os.path.basename(name))


def read_blob(name: str) -> bytes:
    """An item's payload the backend left as a file (removed once read)."""
    path = blob_path(name)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def spill(result: pb.MapResult, job: int) -> pb.MapResult:
    """A result too large for a message is left as a file for the backend to take."""
    if len(result.data) > BLOB_THRESHOLD:
        result.blob = f"r{job}-{result.index}"
        path = blob_path(result.blob)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(result.data)
        os.replace(path + ".tmp", path)
        result.data = b""
    return result


class ItemTimeout(TimeoutError):
    """An item ran past the `timeout` it was given."""


def run_one(fn: Callable[..., Any], data: bytes, index: int = 0) -> pb.MapResult:
    """Call fn on one pickled (args, kwargs): its pickled value, or its pickled exception and traceback, and
    what it printed."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            args, kwargs = cloudpickle.loads(data)
            value = fn(*args, **kwargs)
    except Exception as e:
        return pb.MapResult(index=index, ok=False, data=pickled_exception(e), error=format_remote(e),
                            output=_cut(printed.getvalue()))
    try:
        return pb.MapResult(index=index, ok=True, data=cloudpickle.dumps(value), output=_cut(printed.getvalue()))
    except Exception as e:
        err = TypeError(f"the result ({type(value).__name__}) cannot be pickled to send it back: {e}")
        return pb.MapResult(index=index, ok=False, data=pickled_exception(err), error=format_remote(err),
                            output=_cut(printed.getvalue()))


def _cut(text: str) -> str:
    if len(text) <= MAX_OUTPUT:
        return text
    return text[:MAX_OUTPUT] + f"\n[... {len(text) - MAX_OUTPUT} more characters of output dropped]\n"


def pickled_exception(e: BaseException) -> bytes:
    try:
        data = bytes(cloudpickle.dumps(e))
        cloudpickle.loads(data)  # some exceptions pickle but do not unpickle (required init args)
        return data
    except Exception:
        return b""


def format_remote(e: BaseException) -> str:
    """The traceback from the user's code down, without this module's frames."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb))
