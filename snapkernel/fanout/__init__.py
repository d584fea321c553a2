"""Fan-out from a notebook: `remote` functions and the `%%fanout` cell magic, run by worker sandboxes."""

from snapkernel.fanout.remote import RemoteFunction, remote

__all__ = ["RemoteFunction", "remote"]
