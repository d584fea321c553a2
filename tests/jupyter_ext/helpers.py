"""Helpers for REST tests: run code in a kernel over the Jupyter server's websocket, as JupyterLab does."""

from __future__ import annotations

import json
import uuid
from typing import Any


async def execute(jp_ws_fetch: Any, kernel_id: str, code: str) -> tuple[str, str]:
    """Run `code` in the kernel; returns (reply status, what it printed and displayed as text/plain)."""
    ws = await jp_ws_fetch("api", "kernels", kernel_id, "channels")
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        "channel": "shell",
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "t", "session": uuid.uuid4().hex,
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {},
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False},
    }))
    text, status, idle = "", None, False
    try:
        # Shell and iopub are separate streams: output may come after the reply, but always before `idle`.
        while status is None or not idle:
            msg = json.loads(await ws.read_message())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text += msg["content"]["text"]
            elif msg["msg_type"] == "execute_result":
                text += msg["content"]["data"]["text/plain"]
            elif msg["msg_type"] == "error":
                text += f"{msg['content']['ename']}: {msg['content']['evalue']}"
            elif msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
            elif msg["msg_type"] == "execute_reply":
                status = msg["content"]["status"]
    finally:
        ws.close()
    return status, text
