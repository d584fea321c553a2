"""Process trees of the host, read from /proc: CPU time and resident memory of a process and its descendants."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class ProcessSample:
    pids: list[int]
    cpu_seconds: float
    memory: int  # bytes resident
    taken: float  # time.monotonic()


def _stat(pid: int) -> tuple[int, float, int] | None:
    """(parent pid, CPU seconds, resident bytes) of one process, or None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = text[text.rindex(")") + 2:].split()
    ppid, utime, stime, rss = int(fields[1]), int(fields[11]), int(fields[12]), int(fields[21])
    return ppid, (utime + stime) / _TICKS, rss * _PAGE


def sample_tree(root: int) -> ProcessSample:
    """CPU time and resident memory of `root` and all its descendants."""
    stats: dict[int, tuple[int, float, int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    pids: list[int] = []
    todo = [root] if root in stats else []
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return ProcessSample(pids=sorted(pids), cpu_seconds=sum(stats[p][1] for p in pids),
                         memory=sum(stats[p][2] for p in pids), taken=time.monotonic())
