"""The lifecycle states of a sandbox (`SandboxState`), grouped the way both sides read them."""

from __future__ import annotations

from snapkernel.protocol.v1 import backend_pb2 as pb

STATE_NAMES: dict[int, str] = {v: k.lower() for k, v in pb.SandboxState.items()}
ENDED = frozenset({pb.EXITED, pb.LOST, pb.FAILED, pb.DELETED})
# Hibernating, hibernated or waking: kernel messages are held, and the sandbox may be stopped meanwhile.
ASLEEP = frozenset({pb.HIBERNATING, pb.HIBERNATED, pb.WAKING})
# Kernel messages are held by the backend and delivered once the kernel runs again: asleep, or moving to other
# resources (its sandbox stops and starts again meanwhile, as in a hibernation).
HELD = ASLEEP | {pb.MOVING}
# The kernel lives or is on its way (a hibernated one comes back on the next message): not yet an exit code.
ALIVE = frozenset({pb.PENDING, pb.STARTING, pb.RUNNING, pb.STOPPING}) | HELD
