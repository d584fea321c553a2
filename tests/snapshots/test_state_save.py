"""`state.save` itself on a small file system: a short write mid-snapshot is named and leaves nothing."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from snapkernel.snapshots import state
from tests.snapshots.test_store import small_fs  # noqa: F401  (a fixture)


def test_a_short_write_is_named_as_the_workspace_quota_and_leaves_nothing(small_fs: Path,  # noqa: F811
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "_namespace", lambda: {"big": np.ones(80 * 2**20, dtype=np.uint8), "x": [1, 2]})
    real = shutil.disk_usage
    lying = iter([real(small_fs)._replace(free=2**40)])  # the check passes; the disk then fills up
    monkeypatch.setattr(shutil, "disk_usage", lambda p: next(lying, None) or real(p))
    with pytest.raises(OSError, match=r"no space left in the sandbox's workspace: its disk quota is full \(.* free, "
                       r"the state snapshot needs 80\.\dMi\)"):
        state.save(str(small_fs / "snap"))
    assert not (small_fs / "snap").exists()
    assert real(small_fs).free > 60 * 2**20


def test_save_refuses_what_the_host_cannot_hold_before_writing(small_fs: Path,  # noqa: F811
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data: dict[str, Any] = {"big": np.ones(8 * 2**20, dtype=np.uint8)}
    monkeypatch.setattr(state, "_namespace", lambda: data)
    with pytest.raises(OSError, match=r"no space left on the state dir's file system: 10\.0Mi free, the snapshot "
                       r"needs 16\.\dMi"):
        state.save(str(small_fs / "snap"), host_free=10 * 2**20, copies=2)
    assert not (small_fs / "snap").exists()
    report = state.save(str(small_fs / "snap"), host_free=20 * 2**20, copies=2)
    assert report == {"saved": 1, "skipped": {}} and (small_fs / "snap" / "big.npy").is_file()
