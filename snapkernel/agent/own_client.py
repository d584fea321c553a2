"""The agent as a Jupyter client of its own kernel: runs snapkernel's code (state snapshots) in it.

Its requests carry a session id of their own, so their output is captured here and never reaches the
notebook's clients.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from snapkernel.protocol.wire import DELIM


@dataclass
class Pending:
    request_id: str
    output: list[str] = field(default_factory=list)
    error: str = ""


class OwnClient:
    def __init__(self, key: bytes) -> None:
        self.key = key
        self.session = uuid.uuid4().hex
        self.session_bytes = self.session.encode()
        self.pending: dict[str, Pending] = {}  # msg_id -> request

    def _sign(self, parts: list[bytes]) -> bytes:
        if not self.key:
            return b""
        h = hmac.new(self.key, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.hexdigest().encode()

    def execute_request(self, request_id: str, code: str) -> list[bytes]:
        """The wire parts of an execute_request (without routing identity)."""
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": "execute_request", "username": "snapkernel", "session": self.session,
                  "date": datetime.now(UTC).isoformat(), "version": "5.3"}
        content = {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": False}
        parts = [json.dumps(x).encode() for x in (header, {}, {}, content)]
        self.pending[msg_id] = Pending(request_id)
        return [DELIM, self._sign(parts), *parts]

    def owns(self, parts: list[bytes]) -> bool:
        """Whether an iopub message answers one of our requests (cheap check first)."""
        return any(self.session_bytes in p for p in parts[:6])

    def on_iopub(self, parts: list[bytes]) -> None:
        header, parent, content = self.decode(parts)
        pending = self.pending.get(parent.get("msg_id", ""))
        if pending is None:
            return
        if header.get("msg_type") == "stream":
            pending.output.append(content.get("text", ""))
        elif header.get("msg_type") == "error":
            pending.error = f"{content.get('ename')}: {content.get('evalue')}"

    def on_reply(self, parts: list[bytes]) -> tuple[str, bool, str, str] | None:
        """(request id, ok, output, error) once the execute_reply arrives."""
        _, parent, content = self.decode(parts)
        pending = self.pending.pop(parent.get("msg_id", ""), None)
        if pending is None:
            return None
        ok = content.get("status") == "ok"
        error = pending.error or ("" if ok else f"{content.get('ename')}: {content.get('evalue')}")
        return pending.request_id, ok, "".join(pending.output), error

    @staticmethod
    def decode(parts: list[bytes]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        i = parts.index(DELIM)
        header, parent, _meta, content = (json.loads(p) for p in parts[i + 2:i + 6])
        return header, parent, content
