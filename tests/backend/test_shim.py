"""The shim's outbox: frames kept until acknowledged, in memory and then in a spool file, bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

from snapkernel.backend.shim import Outbox


def test_outbox_spills_to_its_file_and_gives_frames_back_in_order(tmp_path: Path) -> None:
    async def go() -> None:
        box = Outbox(str(tmp_path / "spool"), memory_limit=10, spool_limit=18, first=100)
        frames = [bytes([i]) * 4 for i in range(7)]
        for f in frames[:5]:
            assert box.fits(len(f))
            box.add(f)
        assert len(box.memory) == 2 and len(box.spooled) == 3 and (tmp_path / "spool").stat().st_size == 12
        assert [box.get(100 + i) for i in range(5)] == frames[:5] and box.get(105) is None
        box.add(frames[5])  # 16 bytes spooled: one more of 4 goes over the file's limit
        assert not box.fits(len(frames[6]))
        box.ack(101)
        assert box.first == 102 and box.get(101) is None and box.get(102) == frames[2]
        box.ack(105)
        assert box.next == 106 and not (tmp_path / "spool").exists()
        assert box.fits(4) and box.add(frames[6]) == 106 and box.get(106) == frames[6]

    asyncio.run(go())
