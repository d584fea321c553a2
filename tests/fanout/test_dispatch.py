"""The fan-out dispatcher alone, in-process: no sandbox, no stream, no event loop (each test well under 1 s).
Workers are plain strings; a fake clock stands in for time."""

from __future__ import annotations

from snapkernel.backend.fanout_dispatch import FIRST_BATCH, MAX_BATCH, Dispatcher
from snapkernel.protocol.v1 import backend_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def items(n: int, start: int = 0) -> list[pb.MapItem]:
    return [pb.MapItem(index=i, data=f"in{i}".encode()) for i in range(start, start + n)]


def ok(item: pb.MapItem) -> pb.MapResult:
    return pb.MapResult(index=item.index, ok=True, data=b"out" + item.data[2:])


def failed(item: pb.MapItem) -> pb.MapResult:
    return pb.MapResult(index=item.index, ok=False, error="ValueError: no\n")


def indexes(batch: list[pb.MapItem]) -> list[int]:
    return [i.index for i in batch]


def sent_to(sends: list[tuple[str, list[pb.MapItem]]], w: str) -> list[pb.MapItem]:
    return [item for who, batch in sends if who == w for item in batch]


def test_every_result_settles_once_whatever_order_the_workers_answer() -> None:
    d: Dispatcher[str] = Dispatcher(clock=Clock())
    d.add(items(40))
    d.end_input()
    d.worker_ready("a")
    d.worker_ready("b")
    settled: list[pb.MapResult] = []
    order: list[int] = []
    while not d.done:
        sends = d.pump()
        order += [i for _, batch in sends for i in indexes(batch)]
        assert sends or d.out, "nothing to send and nothing settled: stuck"
        for w, batch in reversed(sends):  # the later batch answers first, each backwards
            assert d.results(w, [ok(i) for i in reversed(batch)]) == []
        settled += d.take_results()
    assert order == list(range(40))  # items go out in input order
    assert sorted(r.index for r in settled) == list(range(40))  # each exactly once
    by_index = {r.index: r for r in settled}
    assert [by_index[i].data for i in range(40)] == [f"out{i}".encode() for i in range(40)]
    assert all(r.attempts == 1 for r in settled)
    assert not d.busy and not d.queue


def test_batches_fill_a_window_of_two_then_follow_the_measured_time_per_item() -> None:
    clock = Clock()
    d: Dispatcher[str] = Dispatcher(clock=clock)
    d.add(items(1000))
    d.worker_ready("a")
    d.worker_ready("b")
    sends = d.pump()
    assert [(w, len(b)) for w, b in sends] == [("a", FIRST_BATCH), ("a", FIRST_BATCH), ("b", FIRST_BATCH),
                                               ("b", FIRST_BATCH)]
    assert d.pump() == []  # every window is full
    assert d.inflight("a") == list(range(2 * FIRST_BATCH))
    clock.now += 0.008  # 8 results 8 ms after it became busy: 1 ms an item, so 20 ms of work is ~20 items
    d.results("a", [ok(i) for i in sends[0][1]])
    assert abs(d.item_seconds - 0.001) < 1e-9
    batch = d.batch_size()
    assert batch in (19, 20)
    more = d.pump()
    assert sum(len(b) for w, b in more if w == "a") == 2 * batch - FIRST_BATCH  # up to its new window
    assert all(len(b) <= batch for _, b in more)
    d.item_seconds = 1e-9
    assert d.batch_size() == MAX_BATCH


def test_the_last_items_go_one_a_batch_when_several_workers_are_ready() -> None:
    # A fast item is not held behind a slow one in one batch (its result would wait for the batch's end).
    d: Dispatcher[str] = Dispatcher(clock=Clock())
    d.add(items(2))
    assert [(w, indexes(b)) for w, b in d.pump(["a", "b"])] == [("a", [0]), ("a", [1])]
    d.add(items(2, start=2))
    assert [(w, indexes(b)) for w, b in d.pump(["b"])] == [("b", [2, 3])]  # alone: one batch
    assert d.inflight("a") == [0, 1]  # a, not ready now (going away), keeps what it holds


def test_a_failed_item_is_retried_while_it_has_retries_then_settles_as_failed() -> None:
    d: Dispatcher[str] = Dispatcher(retries=1, clock=Clock())
    d.add(items(2))
    d.end_input()
    d.worker_ready("a")
    (w, batch), = d.pump()
    d.results(w, [failed(batch[0]), ok(batch[1])])
    assert indexes(list(d.queue)) == [0]
    assert [(r.index, r.ok, r.attempts) for r in d.take_results()] == [(1, True, 1)]
    (_, again), = d.pump()
    assert indexes(again) == [0]
    d.results("a", [failed(again[0])])
    out = d.take_results()
    assert [(r.index, r.ok, r.attempts) for r in out] == [(0, False, 2)]
    assert d.done


def test_an_item_whose_worker_dies_is_retried_once_on_another_then_fails_as_the_cause() -> None:
    d: Dispatcher[str] = Dispatcher(retries=3, clock=Clock())  # deaths do not use up the item's retries
    d.add(items(1))
    d.end_input()
    d.worker_ready("a")
    assert indexes(sent_to(d.pump(), "a")) == [0]
    lost = d.worker_lost("a", "sb-a", "killed by SIGSEGV")
    assert indexes(lost) == [0] and d.out == [] and indexes(list(d.queue)) == [0]
    assert d.attempts[0] == 0  # the first death is not counted against it
    d.worker_ready("b")
    assert indexes(sent_to(d.pump(), "b")) == [0]
    assert indexes(d.worker_lost("b", "sb-b", "exited with code 1")) == [0]
    (r,) = d.take_results()
    assert (r.index, r.ok, r.worker, r.died, r.attempts) == (0, False, "sb-b", "exited with code 1", 2)
    assert r.error == ("WorkerDied: worker sb-b exited with code 1 while running item 0 (an earlier worker had "
                       "died with it in flight too)\n")
    assert d.done


def test_a_worker_lost_mid_batch_reruns_each_of_its_items_alone() -> None:
    d: Dispatcher[str] = Dispatcher(clock=Clock())
    d.add(items(40))
    d.end_input()
    d.worker_ready("a")
    d.worker_ready("b")
    sends = d.pump()
    held = indexes(sent_to(sends, "a"))
    assert held == list(range(16))
    d.results("a", [ok(pb.MapItem(index=0))])  # one came back before it died
    lost = d.worker_lost("a", "sb-a", "exited with code 1")
    assert indexes(lost) == list(range(1, 16))
    assert indexes(list(d.queue))[:15] == list(range(1, 16))  # ahead of the rest, in their order
    d.worker_ready("c")
    alone: list[int] = []
    settled: list[pb.MapResult] = list(d.take_results())
    for w in ("b", "c"):  # b's own batch finishes; then both workers take suspects, one at a time each
        d.results(w, [ok(i) for i in sent_to(sends, w)])
    while not d.done:
        sends = d.pump()
        for w, batch in sends:
            if batch[0].index in range(1, 16):
                assert len(batch) == 1, batch  # a suspect runs alone...
                assert d.inflight(w) == [batch[0].index]  # ...with nothing else on its worker
                alone.append(batch[0].index)
            d.results(w, [ok(i) for i in batch])
        settled += d.take_results()
    assert sorted(alone) == list(range(1, 16))
    assert sorted(r.index for r in settled) == list(range(40))
    assert all(r.ok and r.attempts == 1 for r in settled)  # nobody blamed, no attempt counted twice
    assert not d.suspects


def test_the_items_queued_behind_a_dying_suspect_are_not_blamed() -> None:
    d: Dispatcher[str] = Dispatcher(clock=Clock())
    d.add(items(4))
    d.end_input()
    d.worker_ready("a")
    d.pump()
    d.worker_lost("a", "sb-a", "killed by SIGSEGV")  # all four in flight: which one did it is not known
    d.worker_ready("b")
    for _ in range(4):
        (w, batch), = d.pump()
        assert len(batch) == 1
        if batch[0].index == 2:
            d.worker_lost(w, "sb-" + w, "killed by SIGSEGV")
            w = "c" if w == "b" else "b"
            d.worker_ready(w)
        else:
            d.results(w, [ok(i) for i in batch])
    out = {r.index: r for r in d.take_results()}
    assert sorted(out) == [0, 1, 2, 3]
    assert [out[i].ok for i in range(4)] == [True, True, False, True]
    assert out[2].died == "killed by SIGSEGV" and out[2].attempts == 2
    assert d.done


def test_a_stuck_worker_times_out_its_current_item_and_gives_the_rest_back() -> None:
    clock = Clock()
    d: Dispatcher[str] = Dispatcher(clock=clock)
    d.add(items(4))
    d.end_input()
    d.worker_ready("a")
    d.pump()
    clock.now += 5
    assert d.overdue(10) == []
    clock.now += 6
    assert d.overdue(10) == ["a"]
    item = d.time_out("a")
    assert item is not None and item.index == 0
    assert indexes(list(d.queue)) == [1, 2, 3] and [d.attempts[i] for i in (1, 2, 3)] == [0, 0, 0]
    d.settle(item, pb.MapResult(index=0, ok=False, error="ItemTimeout\n"))
    assert d.pump() == []  # it takes no more
    assert d.worker_lost("a", "sb-a", "killed by SIGKILL") == []  # and its death costs nobody
    assert [(r.index, r.attempts) for r in d.take_results()] == [(0, 1)]


def test_cancel_drops_the_queue_and_says_which_workers_to_stop() -> None:
    d: Dispatcher[str] = Dispatcher(clock=Clock())
    d.add(items(100))
    for w in "abc":
        d.worker_ready(w)
    d.pump()
    d.results("c", [ok(pb.MapItem(index=i)) for i in d.inflight("c")])
    d.take_results()
    assert sorted(d.cancel()) == ["a", "b"]  # c is idle
    assert not d.queue and not d.busy
    assert d.pump() == []
    assert d.worker_lost("a", "sb-a", "exited with code 1") == []  # nothing left to retry
    assert d.out == [] and not d.queue


def test_done_with_no_items_once_the_input_ends() -> None:
    d: Dispatcher[str] = Dispatcher(clock=Clock())
    assert not d.done
    d.worker_ready("a")
    assert d.pump() == []
    d.end_input()
    assert d.done


def test_a_blob_result_is_pending_until_it_is_read_back() -> None:
    d: Dispatcher[str] = Dispatcher(clock=Clock())
    d.add(items(1))
    d.end_input()
    d.worker_ready("a")
    assert len(d.pump()) == 1
    big = pb.MapResult(index=0, ok=True, blob="r0")
    assert d.results("a", [big]) == [big]
    assert not d.done and d.out == []
    d.fetched(big)
    assert not d.done  # settled but not yet taken
    assert d.take_results() == [big]
    assert d.done
