"""Jupyter messages as a `KernelFrame` carries them: routing identities, the delimiter, then the signature,
header, parent header, metadata and content parts (jupyter_client's wire format)."""

from __future__ import annotations

import json
from collections.abc import Sequence

DELIM = b"<IDS|MSG>"


def message_parts(parts: Sequence[bytes]) -> Sequence[bytes]:
    """The parts after the routing identities and delimiter; empty when the frame is not a whole message."""
    for i in range(min(len(parts), 4)):
        if parts[i] == DELIM:
            return parts[i + 1:] if len(parts) > i + 5 else []
    return []


def msg_type(parts: Sequence[bytes]) -> str:
    """The message's `msg_type`, or "?" when its header cannot be read."""
    header = (message_parts(parts) or [b"", b"{}"])[1]
    try:
        return str(json.loads(header).get("msg_type", "?"))
    except (ValueError, AttributeError):
        return "?"


def kernel_status(parts: Sequence[bytes]) -> str | None:
    """For an iopub `status` message, "busy" or "idle" (any other execution state); None for any other
    message. Read without parsing JSON: every iopub message passes through here."""
    wire = message_parts(parts)
    if not wire or (b'"msg_type": "status"' not in wire[1] and b'"msg_type":"status"' not in wire[1]):
        return None
    return "busy" if b'"busy"' in wire[4] else "idle"
