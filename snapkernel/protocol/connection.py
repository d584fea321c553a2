"""Where the backend listens and how calls to it authenticate, for the daemon and its clients alike.

ADDR is `unix:///path.sock` or `HOST:PORT`; clients find it in SNAPKERNEL_BACKEND (default: `backend.sock`
in the state dir) and the token in SNAPKERNEL_TOKEN, the file SNAPKERNEL_TOKEN_FILE or the state dir's `token`
file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from snapkernel.errors import InvalidSpecError, UnauthenticatedError

MAX_MESSAGE = 512 * 1024 * 1024
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE)]
METADATA_KEY = "authorization"


def default_state_dir() -> Path:
    env = os.environ.get("SNAPKERNEL_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "snapkernel"


def grpc_target(address: str) -> str:
    """Check an ADDR (`unix:///path.sock` or `HOST:PORT`) and return it as a gRPC target."""
    if address.startswith("unix://"):
        path = address[len("unix://"):]
        if not path.startswith("/"):
            raise InvalidSpecError(f"address {address!r} is not valid: unix sockets need an absolute "
                                   "path, as in unix:///run/snapkernel.sock")
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidSpecError(f"address {address!r} is not valid: use unix:///path.sock or HOST:PORT, "
                               "e.g. 127.0.0.1:7531")
    return address


def read_token(path: Path) -> str:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        with contextlib.suppress(OSError):  # a read-only mount (a Kubernetes Secret) is its admin's to guard
            os.chmod(path, 0o600)  # never leave a readable secret behind
    return path.read_text().strip()


def call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, f"Bearer {token}"),)


def default_address() -> str:
    return os.environ.get("SNAPKERNEL_BACKEND") or f"unix://{default_state_dir().absolute() / 'backend.sock'}"


def token_path(state_dir: Path) -> Path:
    """Where the token is: `SNAPKERNEL_TOKEN_FILE` (a file an admin gives every daemon, e.g. a Kubernetes
    Secret mounted read-only), else `token` in the state dir."""
    return Path(os.environ.get("SNAPKERNEL_TOKEN_FILE") or state_dir / "token")


def default_token(address: str) -> str:
    token = os.environ.get("SNAPKERNEL_TOKEN")
    if token:
        return token
    path = token_path(default_state_dir())
    try:
        return read_token(path)
    except OSError as e:
        raise UnauthenticatedError(
            f"no token for the backend at {address}: set SNAPKERNEL_TOKEN or make {path} readable ({e})"
        ) from e
