"""Which item runs where: a fan-out job's item queue, batches per worker, items in flight, retries and blame
after a worker's death, settled results and done detection.

Pure bookkeeping, driven by method calls and answering with what to send: no sandboxes, no streams, no event
loop. Workers are any hashable handles (the job's `Worker`s; strings in tests). Items and results are the
wire's plain messages (`MapItem`, `MapResult`), passed through as they are. Results settle in completion
order; the client restores input order by `index`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from snapkernel.protocol.v1 import backend_pb2 as pb

BATCH_SECONDS = 0.02                # a batch for a worker holds about this much work
MAX_BATCH = 256
FIRST_BATCH = 8                     # until an item's time is measured

W = TypeVar("W", bound=Hashable)


@dataclass
class _Slot:
    """One ready worker's share of the job."""
    inflight: dict[int, pb.MapItem] = field(default_factory=dict)  # in the order sent: the order it runs them
    mark: float = 0.0                                              # when it last became busy or returned results


class Dispatcher(Generic[W]):
    def __init__(self, retries: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.retries = retries
        self.clock = clock
        self.queue: deque[pb.MapItem] = deque()
        self.attempts: dict[int, int] = {}
        self.died_on: set[int] = set()       # items whose worker died under them (retried once)
        # Items in flight when a worker died, and items retried after their worker died: each runs alone on a
        # worker, so that a death is known to be its own (results of a batch come back only now and then).
        self.suspects: set[int] = set()
        self.out: list[pb.MapResult] = []    # settled, not yet sent (take_results)
        self.fetching = 0                    # settled results whose payload is still being read back
        self.item_seconds = 0.0
        self.input_ended = False
        self.cancelled = False
        self._slots: dict[W, _Slot] = {}     # workers that were ready, until lost or timed out

    # --- input ----------------------------------------------------------------------------------
    def add(self, items: Iterable[pb.MapItem]) -> None:
        self.queue.extend(items)

    def end_input(self) -> None:
        self.input_ended = True

    # --- workers --------------------------------------------------------------------------------
    def worker_ready(self, w: W) -> None:
        """`w` takes items from the next plain `pump()` on."""
        self._slots.setdefault(w, _Slot())

    def inflight(self, w: W) -> list[int]:
        slot = self._slots.get(w)
        return list(slot.inflight) if slot is not None else []

    @property
    def busy(self) -> bool:
        return any(s.inflight for s in self._slots.values())

    def batch_size(self) -> int:
        """About BATCH_SECONDS of work, by the measured time per item."""
        if self.item_seconds > 0:
            return max(1, min(MAX_BATCH, int(BATCH_SECONDS / self.item_seconds)))
        return FIRST_BATCH

    def pump(self, ready: Iterable[W] | None = None) -> list[tuple[W, list[pb.MapItem]]]:
        """Queued items for the workers that can take them now (`ready`, in order; by default every worker made
        ready), up to each one's window: the batches to send, in order. The items count as sent (in flight,
        one more attempt) from here on."""
        workers = list(self._slots) if ready is None else list(ready)
        if self.cancelled or not workers:
            return []
        batch = self.batch_size()
        window = 2 * batch  # the next batch waits on the worker while it runs this one
        sends: list[tuple[W, list[pb.MapItem]]] = []
        for w in workers:
            slot = self._slots.setdefault(w, _Slot())
            while self.queue and len(slot.inflight) < window:
                if self.suspects and any(i in self.suspects for i in slot.inflight):
                    break  # a suspect runs alone
                if self.queue[0].index in self.suspects:
                    if slot.inflight:
                        break
                    sends.append((w, self._assign(slot, [self.queue.popleft()])))
                    break
                fair = -(-len(self.queue) // len(workers))  # the last items are spread over all workers
                n = min(batch, window - len(slot.inflight), fair)
                items: list[pb.MapItem] = []
                while self.queue and len(items) < n and self.queue[0].index not in self.suspects:
                    items.append(self.queue.popleft())
                sends.append((w, self._assign(slot, items)))
        return sends

    def _assign(self, slot: _Slot, items: list[pb.MapItem]) -> list[pb.MapItem]:
        for item in items:
            slot.inflight[item.index] = item
            self.attempts[item.index] = self.attempts.get(item.index, 0) + 1
        if not slot.mark:
            slot.mark = self.clock()
        return items

    # --- outcomes -------------------------------------------------------------------------------
    def results(self, w: W, results: Iterable[pb.MapResult]) -> list[pb.MapResult]:
        """A worker's results, in any order. Failed ones with retries left go back to the queue; the rest
        settle. Returns those that settled with their payload in a blob: call `fetched` with each once read."""
        slot = self._slots.get(w)
        if slot is None:  # not (or no longer) one of this job's ready workers
            return []
        results = list(results)
        now = self.clock()
        if results and slot.mark:
            per_item = (now - slot.mark) / len(results)
            self.item_seconds = per_item if not self.item_seconds else 0.7 * self.item_seconds + 0.3 * per_item
        slot.mark = now if slot.inflight else 0.0
        to_fetch = []
        for r in results:
            item = slot.inflight.pop(r.index, None)
            self.suspects.discard(r.index)
            if item is not None and self.settle(item, r):
                to_fetch.append(r)
        if not slot.inflight:
            slot.mark = 0.0
        return to_fetch

    def settle(self, item: pb.MapItem, r: pb.MapResult) -> bool:
        """An item's outcome: back to the queue while it has retries left, else on its way to the client.
        True where its payload is a blob still to read back (it counts as pending until `fetched`)."""
        r.attempts = self.attempts.get(r.index, 1)
        if not r.ok and r.attempts <= self.retries:
            self.queue.appendleft(item)
            return False
        if r.blob:
            self.fetching += 1
            return True
        self.out.append(r)
        return False

    def fetched(self, r: pb.MapResult | None) -> None:
        """A blob result read back (or, replaced by an error, not); None: dropped (the job is going away)."""
        self.fetching -= 1
        if r is not None:
            self.out.append(r)

    def take_results(self) -> list[pb.MapResult]:
        out, self.out = self.out, []
        return out

    def worker_lost(self, w: W, name: str, how: str) -> list[pb.MapItem]:
        """A worker died (`how`: "exited with code 1"...): which of its batch ran is not known, so each item it
        held goes back to the queue, ahead of the rest, to run alone, its attempt not counted. An item that
        ran alone and whose worker died under it a second time fails as the death's cause. Returns the
        items it held."""
        slot = self._slots.pop(w, None)
        lost = list(slot.inflight.values()) if slot is not None else []
        if self.cancelled:
            return lost
        requeue = []
        for item in lost:
            if len(lost) == 1 and item.index in self.died_on:
                # It ran alone (a suspect) and its worker died: the second death under it is its own.
                self.suspects.discard(item.index)
                self.out.append(pb.MapResult(index=item.index, ok=False, worker=name, died=how,
                                             attempts=self.attempts.get(item.index, 1) + 1, error=(
                    f"WorkerDied: worker {name} {how} while running item {item.index} (an earlier "
                    "worker had died with it in flight too)\n")))
            else:
                self.died_on.add(item.index)
                self.suspects.add(item.index)
                self.attempts[item.index] = self.attempts.get(item.index, 1) - 1  # not the item's fault
                requeue.append(item)
        self.queue.extendleft(reversed(requeue))  # in their order, ahead of the rest
        return lost

    def forget(self, w: W) -> None:
        """A worker leaves without consequence for its items (the job has ended or is cancelled)."""
        self._slots.pop(w, None)

    def overdue(self, limit: float) -> list[W]:
        """Workers whose current item has run for more than `limit` seconds without a word from them."""
        now = self.clock()
        return [w for w, s in self._slots.items() if s.inflight and s.mark and now - s.mark >= limit]

    def time_out(self, w: W) -> pb.MapItem | None:
        """`w` is stuck in its current item (the first sent, as items run in order) and is being replaced: that
        item is returned for the caller to settle as timed out; the others go back to the queue, their attempt
        not counted. `w` takes no more items."""
        slot = self._slots.pop(w, None)
        if slot is None or not slot.inflight:
            return None
        index, item = next(iter(slot.inflight.items()))
        del slot.inflight[index]
        for other in slot.inflight:
            self.attempts[other] -= 1  # not their fault
        self.queue.extendleft(reversed(slot.inflight.values()))
        return item

    # --- ending ---------------------------------------------------------------------------------
    def cancel(self) -> list[W]:
        """Drop the queue and what is in flight; no more batches. Returns the workers that had items in flight
        (they are to be told to stop)."""
        self.cancelled = True
        self.queue.clear()
        busy = [w for w, s in self._slots.items() if s.inflight]
        for s in self._slots.values():
            s.inflight.clear()
        return busy

    @property
    def done(self) -> bool:
        """All input in, and every item settled and taken."""
        return (self.input_ended and not self.queue and not self.busy and not self.fetching and not self.out)
