"""Hop marks for profiling the message path (`bench/message_path.py`): off unless SNAPKERNEL_TRACE_HOPS is set.

Each process on a kernel message's way (relay, backend, shim, agent) writes one line to its log per frame it
passes on: `snapkernel-hop TIME_NS NAME`. The bench sets the variable for the backend, which passes it on to
shims and agents, and lines the marks up by time (one wall clock: gVisor's is the host's). Callers test
`ENABLED` first, so the path pays one attribute read when profiling is off.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

ENV = "SNAPKERNEL_TRACE_HOPS"
PREFIX = "snapkernel-hop"
ENABLED = bool(os.environ.get(ENV))
out: TextIO = sys.stderr  # where this process writes its marks (the bench points its own at a file)


def mark(name: str) -> None:
    out.write(f"{PREFIX} {time.time_ns()} {name}\n")
    out.flush()
