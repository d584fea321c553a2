"""The staged copy's plan (snapshots/staging.py): where each byte goes and in which order, run for real on bytes.

`Machine` below carries out the steps the way gpu_offload does, on bytearrays instead of GPU storages, with
the GPU's copies in flight from the step that queues them to the WAIT for their event: a CPU step that
touches a buffer the GPU is still copying, or a GPU copy into a buffer not yet drained, is an error here,
as it would be a race there."""

from __future__ import annotations

import itertools
import random

import pytest

from snapkernel.snapshots.staging import (
    ALIGN,
    D2H,
    DRAIN,
    FILL,
    H2D,
    WAIT,
    Layout,
    Step,
    check_staging,
    layout,
    offload_steps,
    reload_steps,
)

MiB = 1 << 20


def covered(plan: Layout) -> list[list[tuple[int, int]]]:
    """For each storage, the (offset, length) of its pieces, in batch order."""
    out: list[list[tuple[int, int]]] = [[] for _ in plan.sizes]
    for batch in plan.batches:
        for p in batch.pieces:
            out[p.item].append((p.offset, p.length))
    return out


def check_layout(plan: Layout) -> None:
    b = plan.buffer_bytes
    assert plan.nbytes == sum(plan.sizes)
    assert len(plan.batches) == -(-plan.size // b)  # ceil: a batch per buffer-sized window, none empty
    for item, pieces in enumerate(covered(plan)):
        at = 0
        for offset, length in pieces:  # each storage exactly once, in order, no gap, no overlap
            assert offset == at and length > 0
            at += length
        assert at == plan.sizes[item]
    for i, start in enumerate(plan.offsets):
        assert start % ALIGN == 0
        if i:
            assert start >= plan.offsets[i - 1] + plan.sizes[i - 1]  # storages do not overlap in the arena
    for k, batch in enumerate(plan.batches):
        assert batch.start == k * b and 0 < batch.length <= b and batch.pieces
        for p in batch.pieces:
            assert p.at == plan.offsets[p.item] + p.offset - batch.start  # its place in the arena
            assert p.at >= 0 and p.at + p.length <= batch.length
            assert p.offset % ALIGN == 0 and p.at % ALIGN == 0
        last = batch.pieces[-1]
        assert batch.length == last.at + last.length
        ats = [(p.at, p.at + p.length) for p in batch.pieces]
        assert all(a1 <= b0 for (_, a1), (b0, _) in itertools.pairwise(ats))
    assert plan.batches[-1].start + plan.batches[-1].length == plan.size if plan.batches else plan.size == 0


@pytest.mark.parametrize("sizes", [
    [],
    [0],
    [0, 0, 5, 0],
    [1],
    [MiB],  # exactly one buffer
    [2 * MiB],  # exactly two
    [MiB - 1, 1, MiB + 1],  # not multiples, straddling windows
    [5 * MiB + 3],  # one storage over several buffers, the last part short
    [1, 2, 3, 255, 256, 257, 511, 513],  # many tiny ones packed into one batch, gaps between them
    [300] * 10_000,  # 10,000 small storages: packed, and the gaps push some across windows
])
def test_the_layout_covers_every_byte_of_every_storage_once_aligned(sizes: list[int]) -> None:
    plan = layout(sizes, MiB)
    check_layout(plan)
    assert plan.nbytes == sum(sizes)


def test_random_layouts_hold() -> None:
    rng = random.Random(14)
    for _ in range(200):
        sizes = [rng.choice([0, rng.randrange(1, 600), rng.randrange(1, 3 * 4096)]) for _ in range(rng.randrange(30))]
        check_layout(layout(sizes, 4096))


def test_small_storages_share_a_batch_and_a_large_one_is_cut() -> None:
    plan = layout([100, 100, 3 * MiB], MiB)
    assert plan.offsets == (0, 256, 512)
    first = plan.batches[0]
    assert [(p.item, p.offset, p.length, p.at) for p in first.pieces] == [
        (0, 0, 100, 0), (1, 0, 100, 256), (2, 0, MiB - 512, 512)]
    assert [(p.item, p.offset, p.length) for b in plan.batches[1:] for p in b.pieces] == [
        (2, MiB - 512, MiB), (2, 2 * MiB - 512, MiB), (2, 3 * MiB - 512, 512)]
    assert plan.batches[-1].length == 512 and plan.size == 3 * MiB + 512


def test_layout_refuses_what_it_cannot_place() -> None:
    with pytest.raises(ValueError, match="-1 bytes"):
        layout([1, -1], MiB)
    with pytest.raises(ValueError, match="multiple of align"):
        layout([1], MiB + 1)


def test_staging_settings_are_checked_with_what_is_accepted() -> None:
    check_staging(4, 64 * MiB)
    check_staging(1, MiB)
    check_staging(16, 1 << 30)
    for buffers, nbytes, says in [(0, 64 * MiB, "use 1 to 16"), (17, 64 * MiB, "use 1 to 16"),
                                  (2, MiB - 256, "1 MiB to 1 GiB"), (2, (1 << 30) + 256, "1 MiB to 1 GiB"),
                                  (2, MiB + 1, "multiple of 256")]:
        with pytest.raises(ValueError, match=says):
            check_staging(buffers, nbytes)


class Machine:
    """Storages ("GPU"), staging buffers and an arena as bytearrays; GPU copies complete at their WAIT."""

    def __init__(self, plan: Layout, buffers: int, storages: list[bytearray]) -> None:
        self.plan = plan
        self.storages = storages
        self.staging = [bytearray(plan.buffer_bytes) for _ in range(buffers)]
        self.arena = bytearray(plan.size)
        self.in_flight: dict[int, tuple[str, int]] = {}  # batch -> (kind, buffer)
        self.holds: dict[int, int | None] = dict.fromkeys(range(buffers))  # buffer -> batch not yet drained

    def busy(self, buffer: int) -> bool:
        return any(b == buffer for _, b in self.in_flight.values())

    def do(self, step: Step) -> None:
        batch = self.plan.batches[step.batch]
        buf = self.staging[step.buffer]
        if step.kind == D2H:
            assert not self.busy(step.buffer), f"{step}: the GPU writes a buffer it is still copying"
            assert self.holds[step.buffer] is None, f"{step}: buffer holds batch {self.holds[step.buffer]} undrained"
            for p in batch.pieces:  # the storages do not change meanwhile: copying now is the same
                buf[p.at:p.at + p.length] = self.storages[p.item][p.offset:p.offset + p.length]
            self.in_flight[step.batch] = (D2H, step.buffer)
            self.holds[step.buffer] = step.batch
        elif step.kind == H2D:
            assert not self.busy(step.buffer)
            self.in_flight[step.batch] = (H2D, step.buffer)  # reads the buffer when it completes
        elif step.kind == WAIT:
            kind, b = self.in_flight.pop(step.batch)
            assert b == step.buffer
            if kind == H2D:
                for p in batch.pieces:
                    self.storages[p.item][p.offset:p.offset + p.length] = self.staging[b][p.at:p.at + p.length]
        elif step.kind == DRAIN:
            assert not self.busy(step.buffer), f"{step}: the CPU reads a buffer the GPU is still writing"
            assert self.holds[step.buffer] == step.batch
            self.arena[batch.start:batch.start + batch.length] = buf[:batch.length]
            self.holds[step.buffer] = None
        elif step.kind == FILL:
            assert not self.busy(step.buffer), f"{step}: the CPU overwrites a buffer the GPU is still reading"
            buf[:batch.length] = self.arena[batch.start:batch.start + batch.length]
        else:
            raise AssertionError(step)

    def run(self, steps: list[Step]) -> None:
        for step in steps:
            self.do(step)
        assert not self.in_flight, f"never waited for: {self.in_flight}"


def once_each(steps: list[Step], batches: int, kinds: tuple[str, ...]) -> None:
    """Each batch gets each of `kinds` once, in that order, all on one buffer."""
    for i in range(batches):
        mine = [(n, s) for n, s in enumerate(steps) if s.batch == i]
        assert [s.kind for _, s in mine] == list(kinds), mine
        assert len({s.buffer for _, s in mine}) == 1


@pytest.mark.parametrize("buffers", [1, 2, 3, 4])
@pytest.mark.parametrize("sizes", [[1], [MiB], [100, 3 * MiB + 7, 0, 9], [MiB - 1] * 9, [4099] * 700])
def test_offload_then_reload_puts_every_byte_back_without_a_race(buffers: int, sizes: list[int]) -> None:
    rng = random.Random(sum(sizes) + buffers)
    plan = layout(sizes, MiB)
    original = [bytearray(rng.randbytes(n)) for n in sizes]
    storages = [bytearray(s) for s in original]
    out = offload_steps(len(plan.batches), buffers)
    once_each(out, len(plan.batches), (D2H, WAIT, DRAIN))
    machine = Machine(plan, buffers, storages)
    machine.run(out)
    for item, start in enumerate(plan.offsets):  # the arena holds each storage at its place
        assert machine.arena[start:start + sizes[item]] == original[item]
    for s in storages:  # the GPU's memory is freed; waking grows it back, with other contents
        s[:] = bytes(len(s))
    machine.staging = [bytearray(b"\xee" * plan.buffer_bytes) for _ in range(buffers)]
    back = reload_steps(len(plan.batches), buffers)
    once_each(back, len(plan.batches), (FILL, H2D, WAIT))
    machine.run(back)
    assert storages == original


@pytest.mark.parametrize("buffers", [2, 3, 4])
def test_the_gpu_and_the_cpu_copies_overlap(buffers: int) -> None:
    n = 10
    out = offload_steps(n, buffers)
    where = {(s.kind, s.batch): i for i, s in enumerate(out)}
    for i in range(n - 1):  # the GPU copies batch i + 1 (already queued) while the CPU drains batch i
        assert where[(D2H, i + 1)] < where[(DRAIN, i)]
    assert [s.kind for s in out[:buffers]] == [D2H] * buffers  # the GPU starts on as many as there are buffers
    back = reload_steps(n, buffers)
    where = {(s.kind, s.batch): i for i, s in enumerate(back)}
    for i in range(n - 1):  # the CPU fills batch i + 1 while the GPU copies batch i in
        assert where[(FILL, i + 1)] < where[(WAIT, i)]


def test_one_buffer_still_works_in_turn() -> None:
    assert offload_steps(2, 1) == [Step(D2H, 0, 0), Step(WAIT, 0, 0), Step(DRAIN, 0, 0), Step(D2H, 1, 0),
                                   Step(WAIT, 1, 0), Step(DRAIN, 1, 0)]
    assert reload_steps(2, 1) == [Step(FILL, 0, 0), Step(H2D, 0, 0), Step(WAIT, 0, 0), Step(FILL, 1, 0),
                                  Step(H2D, 1, 0), Step(WAIT, 1, 0)]
    assert offload_steps(0, 4) == reload_steps(0, 4) == []
