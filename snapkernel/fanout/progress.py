"""The progress bar of a fan-out job: done/total, rate, failures and workers, updated in place in the
notebook (an IPython display that is updated a few times a second); nothing outside IPython."""

from __future__ import annotations

import time
from typing import Any

UPDATE_SECONDS = 0.25
WIDTH = 30


def _ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


class Progress:
    def __init__(self, label: str, total: int | None, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.failed = 0
        self.workers = (0, 0)
        self.started = time.monotonic()
        self.shown = 0.0
        self.handle: Any = None
        self.notes: list[str] = []
        self.status = ""  # the backend's latest word: workers starting, one replaced, fewer than asked
        self.enabled = enabled and _ipython() is not None

    def add(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.show(force=True)

    def text(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        if self.total:
            filled = int(WIDTH * self.done / self.total)
            bar = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total}"
        else:
            bar = f"{self.done} done"
        ready, workers = self.workers
        parts = [f"{self.label}: {bar}", f"{rate:,.0f}/s", f"{elapsed:.1f}s"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if workers:
            parts.append(f"workers {ready}/{workers}")
        if self.status:
            parts.append(f"({self.status})")
        return "  ".join(parts) + "".join(f"\n{n}" for n in self.notes)

    def show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.shown < UPDATE_SECONDS:
            return
        self.shown = now
        from IPython.display import display  # type: ignore[attr-defined]

        data = {"text/plain": self.text()}
        if self.handle is None:
            self.handle = display(data, raw=True, display_id=True)  # type: ignore[no-untyped-call]
        else:
            self.handle.update(data, raw=True)

    def close(self) -> None:
        self.show(force=True)
