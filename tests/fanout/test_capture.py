"""What a fan-out call ships: the cell or function with the notebook variables it refers to, by value."""

from __future__ import annotations

import linecache
import threading
import warnings

import cloudpickle
import pytest

from snapkernel.agent.worker import load_function
from snapkernel.errors import InvalidSpecError
from snapkernel.fanout.capture import CaptureWarning, cell_function, pack
from snapkernel.jupyter_ext.magics import _flag_words
from snapkernel.protocol.fanout import run_one


def call(payload_data: bytes, *args: object) -> object:
    r = run_one(load_function(payload_data), cloudpickle.dumps((args, {})))
    assert r.ok, r.error
    return cloudpickle.loads(r.data)


def test_a_cell_captures_what_it_refers_to_and_returns_its_last_expression() -> None:
    ns = {"offset": 10, "unused": object(), "helper": lambda v: v * 2, "In": ["history"]}
    payload = cell_function("y = helper(x)\ny + offset", "x", ns)
    fn, sources = cloudpickle.loads(payload.data)
    assert set(fn.__globals__) >= {"offset", "helper"} and "unused" not in fn.__globals__
    assert "In" not in fn.__globals__
    assert call(payload.data, 5) == 20
    assert list(sources.values()) == [["y = helper(x)\n", "y + offset"]]


def test_the_digest_follows_the_cell_and_its_values() -> None:
    a = cell_function("x + k", "x", {"k": 1})
    assert cell_function("x + k", "x", {"k": 1}).digest == a.digest  # re-running ships nothing
    assert cell_function("x + k", "x", {"k": 2}).digest != a.digest
    assert cell_function("x - k", "x", {"k": 1}).digest != a.digest


def test_a_remote_traceback_quotes_the_cell() -> None:
    payload = cell_function("z = x - 3\n1 / z", "x", {})
    linecache.clearcache()  # a worker knows the cell only from the payload
    r = run_one(load_function(payload.data), cloudpickle.dumps(((3,), {})))
    assert not r.ok and "line 2" in r.error and "1 / z" in r.error and "ZeroDivisionError" in r.error
    assert "<dynamic-code>" not in r.error and '"<fanout-cell-' in r.error


def test_functions_of_a_notebook_cell_keep_their_file_and_lines_nested_ones_too() -> None:
    # As IPython compiles a cell: a file name that is not on disk, its lines in linecache only.
    cell, ns = "/tmp/ipykernel_0/1234.py", {"__name__": "__main__"}
    source = "def outer(v):\n    inner = lambda w: 1 / w\n    return inner(v)\n"
    linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
    exec(compile(source, cell, "exec"), ns)
    payload = pack(ns["outer"])
    linecache.clearcache()
    fn = load_function(payload.data)
    assert fn.__code__.co_filename == cell
    r = run_one(fn, cloudpickle.dumps(((0,), {})))
    assert not r.ok and r.error.count(f'File "{cell}"') == 2, r.error
    assert "return inner(v)" in r.error and "inner = lambda w: 1 / w" in r.error, r.error


def test_large_captures_warn_and_huge_ones_are_refused_naming_them() -> None:
    with pytest.warns(CaptureWarning, match=r"the largest: table \(\d+ KiB\)"):
        cell_function("len(table) + x", "x", {"table": b"x" * 300_000})
    with pytest.raises(InvalidSpecError, match=r"over the 64.0 MiB limit; the largest: huge .*Load large data"):
        cell_function("len(huge)", "x", {"huge": b"x" * (65 * 1024 * 1024)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cell_function("len(small)", "x", {"small": b"x" * 1000})


def test_what_cannot_be_shipped_is_named() -> None:
    lock = threading.Lock()
    with pytest.raises(InvalidSpecError, match="refers to 'lock'"):
        cell_function("with lock:\n    x", "x", {"lock": lock})
    with pytest.raises(InvalidSpecError, match="does not parse"):
        cell_function("x +", "x", {})
    with pytest.raises(InvalidSpecError, match="--as '1x' is not a Python name"):
        cell_function("x", "1x", {})

    def uses_lock() -> bool:
        return lock.locked()

    with pytest.raises(InvalidSpecError, match="refers to 'lock'"):
        pack(uses_lock)


def test_flag_values_keep_spaces_and_quotes() -> None:
    assert _flag_words("--over [1, 'a b'] --as x --unordered -o res") == [
        "--over", "[1, 'a b']", "--as", "x", "--unordered", "-o", "res"]
    assert _flag_words("--over range(0, -5, -1) --as x") == ["--over", "range(0, -5, -1)", "--as", "x"]
