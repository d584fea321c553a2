"""`state.save` and `state.load` themselves, in this process: on a small file system (a short write
mid-snapshot is named and leaves nothing), and in a real IPython shell (closed files, where tensors land,
what lives on a GPU)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
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


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real IPython shell in this process (what `get_ipython()` returns in a kernel), in `tmp_path`, gone
    after the test (so no other test finds one)."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.chdir(tmp_path)
    config = Config()
    config.HistoryManager.enabled = False
    hooks = sys.displayhook, sys.excepthook
    ip = InteractiveShell.instance(config=config)
    try:
        yield ip
    finally:
        InteractiveShell.clear_instance()
        sys.displayhook, sys.excepthook = hooks


def cell(ip: Any, code: str) -> None:
    result = ip.run_cell(code)
    assert result.success, result.error_in_exec or result.error_before_exec


def round_trip(ip: Any, snap: Path) -> dict[str, Any]:
    """Save the shell's namespace, empty it (as a fresh kernel's), load it back; the load's report."""
    assert state.save(str(snap))["saved"] > 0
    ip.reset()
    return state.load(str(snap))


CLOSED_FILE_CALLS: list[Callable[[Any], object]] = [
    lambda f: f.read(), lambda f: f.readline(), lambda f: f.readlines(), lambda f: f.write("x"),
    lambda f: f.seek(0), lambda f: f.tell(), lambda f: f.fileno(), lambda f: f.flush(), next,
    list, lambda f: f.__enter__()]


def test_closed_files_come_back_as_closed_placeholders(shell: Any, tmp_path: Path) -> None:
    cell(shell, "import gzip\n"
                "with open('notes.txt', 'w') as text:\n    text.write('hi')\n"
                "with open('notes.txt', 'rb') as raw:\n    raw.read()\n"
                "with gzip.open('data.gz', 'wb') as packed:\n    packed.write(b'x')\n"
                "kept = [1, 2]")
    report = round_trip(shell, tmp_path / "snap")
    assert report == {"restored": 5, "failed": {}, "skipped_at_snapshot": {}}
    manifest = json.loads((tmp_path / "snap" / state.MANIFEST).read_text())
    assert manifest["closed_files"] == ["text", "raw", "packed"]
    ns = shell.user_ns
    assert (repr(ns["text"]), repr(ns["raw"]), repr(ns["packed"])) == (
        "<closed file 'notes.txt', mode 'w'>", "<closed file 'notes.txt', mode 'rb'>",
        "<closed file 'data.gz', mode 'wb'>")
    assert ns["text"].closed and ns["raw"].closed and ns["text"].name == "notes.txt" and ns["kept"] == [1, 2]
    real = open(tmp_path / "notes.txt")  # noqa: SIM115  (closed at once: what the placeholder imitates)
    real.close()
    for call in CLOSED_FILE_CALLS:
        for f in (real, ns["text"]):
            with pytest.raises(ValueError, match=r"I/O operation on closed file"):
                call(f)
    with pytest.raises(ValueError, match=r"I/O operation on closed file"), ns["raw"]:
        pass
    ns["text"].close()  # closing again does nothing, as for a real file


def test_an_open_file_is_skipped_with_its_reason_and_saved_once_closed(shell: Any, tmp_path: Path) -> None:
    cell(shell, "log = open('log.bin', 'wb')\nsource = open('log.bin')")
    try:
        report = state.save(str(tmp_path / "open"))
    finally:
        cell(shell, "log.close()\nsource.close()")
    assert report["saved"] == 0 and report["skipped"].keys() == {"log", "source"}
    assert report["skipped"]["log"] == ("an open file 'log.bin' (mode 'wb'): only closed files are saved (they "
                                        "come back closed); close it (`log.close()`) and snapshot again")
    assert report["skipped"]["source"].startswith("an open file 'log.bin' (mode 'r'): ")
    assert round_trip(shell, tmp_path / "closed")["restored"] == 2
    assert repr(shell.user_ns["log"]) == "<closed file 'log.bin', mode 'wb'>"


@pytest.mark.parametrize(("saved", "gpu_count", "target"), [
    ("cuda:0", 1, "cuda:0"), ("cuda:1", 2, "cuda:1"), ("cuda:1", 1, "cuda:0"), ("cuda:7", 4, "cuda:0"),
    ("cuda:1", 0, "cpu"), ("cuda:0", 0, "cpu"), ("cuda", 2, "cuda:0"), ("cpu", 0, "cpu"), ("cpu", 2, "cpu")])
def test_a_saved_gpu_maps_to_one_the_kernel_has(saved: str, gpu_count: int, target: str) -> None:
    assert state._target_device(saved, gpu_count) == target


def test_a_cuda_tensor_lands_on_the_gpu_this_kernel_has_or_the_cpu(shell: Any, tmp_path: Path) -> None:
    """A snapshot taken with the tensor on a second GPU, before the manifest named closed files."""
    torch = pytest.importorskip("torch")
    snap = tmp_path / "snap"
    snap.mkdir()
    np.save(snap / "t.npy", np.arange(6, dtype=np.float32))
    np.save(snap / "c.npy", np.ones(2, dtype=np.float32))
    (snap / state.MANIFEST).write_text(json.dumps({
        "arrays": {"t": "torch:cuda:1:True", "c": "torch:cpu:False"}, "pickles": [], "modules": {},
        "skipped": {}}))
    assert state.load(str(snap))["failed"] == {}
    t, c = shell.user_ns["t"], shell.user_ns["c"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert str(t.device) == state._target_device("cuda:1", gpus) and t.requires_grad and float(t.detach().sum()) == 15.0
    assert str(c.device) == "cpu" and not c.requires_grad


def test_gpu_variables_of_cpu_data_are_none(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cell(shell, "import numpy as np\narr = np.ones(4)\nwith open('f.txt', 'w') as f:\n    pass")
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        cell(shell, "import torch\nt = torch.ones(3)\nmodel = torch.nn.Linear(2, 2)")
    assert state.gpu_variables() == {}
    capsys.readouterr()
    cell(shell, state.gpu_variables_code())
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {}


@pytest.mark.gpu
def test_gpu_variables_names_cuda_tensors_and_modules_with_their_bytes(shell: Any,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch here has no CUDA")
    cell(shell, "import torch\nt = torch.ones(2, 3, device='cuda')\nmodel = torch.nn.Linear(4, 2).cuda()\n"
                "host = torch.ones(8)\nhost_model = torch.nn.Linear(4, 2)")
    expected = {"t": 6 * 4, "model": (4 * 2 + 2) * 4}
    assert state.gpu_variables() == expected
    capsys.readouterr()
    cell(shell, state.gpu_variables_code())
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == expected
