"""Words from the backend in the notebook: output under the cells that wait for a kernel (held while it
hibernates or moves), or under the next cell it is sent, signed with the kernel's session key so that the
notebook takes them as the kernel's own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jupyter_client.session import Session

from snapkernel.protocol.v1 import backend_pb2 as pb

if TYPE_CHECKING:
    from snapkernel.backend.sandbox import LiveSandbox


def tell_waiting(sb: LiveSandbox, text: str, fail: bool = False) -> bool:
    """Show `text` under the cells waiting for this kernel; with `fail`, end those cells with an error (the kernel
    that would have run them is gone). Whether a cell was waiting."""
    told = False
    for msg in list(sb.held):
        told = tell_cell(sb, msg, text, fail) or told
    if fail:
        sb.held.clear()
    return told


def tell_cell(sb: LiveSandbox, msg: pb.AgentMessage, text: str, fail: bool = False) -> bool:
    """Show `text` under the cell that `msg` asks the kernel to run (False, nothing shown: not a cell's request)."""
    frame = msg.frame
    if msg.WhichOneof("kind") != "frame" or frame.channel != pb.SHELL:
        return False
    r = sb.record
    session = Session(key=r.kernel.key, signature_scheme=r.kernel.signature_scheme or "hmac-sha256",
                      username="snapkernel")
    try:
        idents, wire = session.feed_identities(list(frame.parts))
        request = session.deserialize(wire, content=False)
    except Exception:
        return False
    if request["header"].get("msg_type") != "execute_request":
        return False
    parent = request["header"]
    out: list[tuple[str, dict[str, object]]] = [("stream", {"name": "stderr", "text": text})]
    if fail:
        out.append(("error", {"ename": "KernelWakeError", "evalue": text.strip(), "traceback": [text]}))
        out.append(("status", {"execution_state": "idle"}))
    for msg_type, content in out:
        parts = session.serialize(session.msg(msg_type, content, parent=parent),
                                  ident=f"kernel.{r.id}.{msg_type}".encode())
        sb.to_clients(pb.KernelFrame(channel=pb.IOPUB, parts=parts))
    if fail:
        reply = session.msg("execute_reply", {"status": "error", "ename": "KernelWakeError", "evalue": text.strip(),
                                              "traceback": [text], "execution_count": None}, parent=parent)
        sb.to_clients(pb.KernelFrame(channel=pb.SHELL, parts=session.serialize(reply, ident=idents)))
    return True
