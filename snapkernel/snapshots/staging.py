"""The plan for moving GPU memory out through a few pinned staging buffers, and back; no torch in it.

`gpu_offload` (inside a kernel) moves every CUDA storage into one pageable host *arena* through a small
fixed set of pinned *staging buffers*, allocated once per kernel: pinning GiBs of host memory on each
suspend (cudaHostAlloc) runs at about 2 GiB/s, a device-to-host copy into pinned memory at about 50.
This module decides where each byte goes and in which order the two sides run; `gpu_offload` only
carries the steps out, so what is tested here is what runs there.

The arena holds the storages one after another, each starting on an `ALIGN`-byte boundary. It is cut
into batches of one staging buffer each: batch k covers arena bytes [k * buffer_bytes, ...) and is made
of the pieces of the storages that fall in it. A batch moves in two copies: GPU side, one copy per
piece between the storage and the staging buffer (on a side CUDA stream, ordered by a CUDA event); CPU
side, ONE contiguous copy between the staging buffer and the arena (torch's CPU copy runs it on all
threads). With two or more buffers the copies overlap: the GPU fills one buffer while the CPU drains
another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

ALIGN = 256  # bytes; where each storage starts in the arena (and so in a staging buffer)
DEFAULT_BUFFERS = 4
DEFAULT_BUFFER_BYTES = 64 << 20  # a power of two: torch's pinned allocator rounds sizes up to one
MAX_BUFFERS = 16
MIN_BUFFER_BYTES = 1 << 20
MAX_BUFFER_BYTES = 1 << 30

# What a step does (gpu_offload carries each out):
D2H = "d2h"  # GPU: copy the batch's pieces from their storages into the staging buffer, record an event
DRAIN = "drain"  # CPU: copy the staging buffer into the batch's place in the arena
FILL = "fill"  # CPU: copy the batch's place in the arena into the staging buffer
H2D = "h2d"  # GPU: copy the batch's pieces from the staging buffer into their storages, record an event
WAIT = "wait"  # CPU: wait for the events the batch's GPU copies recorded


def check_staging(buffers: int, buffer_bytes: int) -> None:
    """Refuse a staging set-up that is not `buffers` (1 to 16) buffers of `buffer_bytes` bytes each, a
    multiple of 256 from 1 MiB to 1 GiB."""
    if not 1 <= buffers <= MAX_BUFFERS:
        raise ValueError(f"{buffers} staging buffers is not valid: use 1 to {MAX_BUFFERS} (2 or more overlap the "
                         "GPU's and the CPU's copies)")
    if not MIN_BUFFER_BYTES <= buffer_bytes <= MAX_BUFFER_BYTES or buffer_bytes % ALIGN:
        raise ValueError(f"a staging buffer of {buffer_bytes} bytes is not valid: use 1 MiB to 1 GiB, a multiple of "
                         f"{ALIGN} bytes (a power of two, e.g. 64 MiB, wastes nothing in torch's pinned allocator)")


@dataclass(frozen=True)
class Piece:
    """Part of one storage that travels in a batch."""
    item: int  # which storage: its index in the sizes given to `layout`
    offset: int  # where the part starts in that storage (bytes)
    length: int  # bytes
    at: int  # where it sits in the staging buffer (bytes)


@dataclass(frozen=True)
class Batch:
    """What one staging buffer carries at once: arena bytes [start, start + length)."""
    start: int
    length: int  # up to the end of the last piece; at most the buffer's size
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Layout:
    sizes: tuple[int, ...]  # bytes of each storage
    offsets: tuple[int, ...]  # where each storage starts in the arena
    size: int  # bytes of the arena
    buffer_bytes: int  # the staging buffer size the batches are cut for
    batches: tuple[Batch, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of storage that move (the arena's alignment gaps do not count)."""
        return sum(self.sizes)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def layout(sizes: list[int] | tuple[int, ...], buffer_bytes: int, align: int = ALIGN) -> Layout:
    """Place storages of `sizes` bytes in an arena and cut it into batches of at most `buffer_bytes`.

    Every batch starts on a multiple of `buffer_bytes` (so of `align`: it divides it), and storages start
    on multiples of `align`, so every piece starts aligned in its storage and in the staging buffer. A
    batch never starts in an alignment gap, so each has at least one piece. Empty storages get a place
    and no piece."""
    if align <= 0 or buffer_bytes <= 0 or buffer_bytes % align:
        raise ValueError(f"buffer_bytes ({buffer_bytes}) must be a positive multiple of align ({align})")
    offsets: list[int] = []
    end = 0
    for n in sizes:
        if n < 0:
            raise ValueError(f"a storage cannot have {n} bytes")
        start = _round_up(end, align)
        offsets.append(start)
        if n:  # an empty one takes no room, not even its gap
            end = start + n
    batches: list[Batch] = []
    first = 0  # the first storage that can reach into the current window
    for w0 in range(0, end, buffer_bytes):
        w1 = min(w0 + buffer_bytes, end)
        while first < len(sizes) and offsets[first] + sizes[first] <= w0:
            first += 1
        pieces: list[Piece] = []
        j = first
        while j < len(sizes) and offsets[j] < w1:
            a, b = max(offsets[j], w0), min(offsets[j] + sizes[j], w1)
            if b > a:
                pieces.append(Piece(j, a - offsets[j], b - a, a - w0))
            j += 1
        last = pieces[-1]
        batches.append(Batch(w0, last.at + last.length, tuple(pieces)))
    return Layout(tuple(sizes), tuple(offsets), end, buffer_bytes, tuple(batches))


class Step(NamedTuple):
    kind: str  # D2H, DRAIN, FILL, H2D or WAIT
    batch: int
    buffer: int  # which staging buffer


def offload_steps(batches: int, buffers: int) -> list[Step]:
    """GPU → staging → arena. The GPU copies of the first `buffers` batches go out at once; each buffer
    gets its next batch as soon as the CPU has drained it, so the GPU copies batch i + 1 while the CPU
    drains batch i. A GPU copy into a buffer is only ever queued after the CPU has drained that buffer, so
    no event is needed on that side."""
    steps = [Step(D2H, i, i % buffers) for i in range(min(buffers, batches))]
    for i in range(batches):
        steps += [Step(WAIT, i, i % buffers), Step(DRAIN, i, i % buffers)]
        if i + buffers < batches:
            steps.append(Step(D2H, i + buffers, (i + buffers) % buffers))
    return steps


def reload_steps(batches: int, buffers: int) -> list[Step]:
    """Arena → staging → GPU. The CPU fills a buffer, queues its GPU copy, and goes on with the next buffer;
    before filling a buffer again it waits for the GPU copy out of it. It ends by waiting for the rest."""
    steps: list[Step] = []
    for i in range(batches):
        if i >= buffers:
            steps.append(Step(WAIT, i - buffers, i % buffers))
        steps += [Step(FILL, i, i % buffers), Step(H2D, i, i % buffers)]
    steps += [Step(WAIT, i, i % buffers) for i in range(max(0, batches - buffers), batches)]
    return steps
