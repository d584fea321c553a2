"""What is shipped to workers: the function, the notebook globals it refers to (by value, through
cloudpickle), and the source lines of notebook cells so remote tracebacks quote them.

cloudpickle (3.1.3 on) ships every code object with `co_filename` set to "<dynamic-code>", so a worker's
traceback could not find the cell's lines: code from a notebook cell is shipped with its file name, which
the worker puts back (`_stamped`) and under which it registers the cell's lines.

A capture over 256 KiB warns and names the largest variables; one over 64 MiB is refused.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import hashlib
import io
import linecache
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cloudpickle

from snapkernel.errors import InvalidSpecError

WARN_BYTES = 256 * 1024
MAX_BYTES = 64 * 1024 * 1024
# IPython's own names in the user namespace: never worth shipping.
_IPYTHON_NAMES = re.compile(r"^(In|Out|get_ipython|exit|quit|_+|_i+|_i?\d+|_oh|_dh|_ih)$")


class CaptureWarning(UserWarning):
    """The variables a fan-out call captures are large (they are sent to every worker)."""


warnings.filterwarnings("always", category=CaptureWarning)  # every run of the cell, not just the first


@dataclass
class Payload:
    data: bytes   # cloudpickled (function, {filename: source lines})
    digest: str   # sha256 of data


def code_names(code: types.CodeType) -> Iterator[str]:
    """Every global (or attribute) name the code and its nested functions mention."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from code_names(const)


def referenced(code: types.CodeType, namespace: dict[str, Any]) -> dict[str, Any]:
    """The namespace's variables the code refers to, by name, in a stable order."""
    return {n: namespace[n] for n in sorted(set(code_names(code)))
            if n in namespace and not _IPYTHON_NAMES.match(n) and not isinstance(namespace[n], types.ModuleType)}


def _format(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB" if n >= 1024**2 else f"{n / 1024:.0f} KiB"


def check_sizes(captured: dict[str, Any], what: str) -> None:
    """Warn over 256 KiB, refuse over 64 MiB, naming the largest variables."""
    sizes: dict[str, int] = {}
    for name, value in captured.items():
        if isinstance(value, types.FunctionType) and value.__module__ not in ("__main__", None):
            continue  # importable functions travel by reference
        try:
            sizes[name] = len(cloudpickle.dumps(value))
        except Exception as e:
            raise InvalidSpecError(f"{what} refers to {name!r} ({type(value).__name__}), which cannot be sent to "
                                   f"workers: {e}. Create it inside the function or cell instead") from e
    total = sum(sizes.values())
    if total <= WARN_BYTES:
        return
    largest = ", ".join(f"{n} ({_format(s)})" for n, s in sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
    if total > MAX_BYTES:
        raise InvalidSpecError(
            f"{what} captures {_format(total)} of notebook variables, over the {_format(MAX_BYTES)} limit; the "
            f"largest: {largest}. Load large data inside the cell (from a file every worker can read), pass it "
            "in pieces as the items, or use --clone")
    warnings.warn(f"{what} captures {_format(total)} of notebook variables, sent to every worker; the largest: "
                  f"{largest}", CaptureWarning, stacklevel=3)


def _sources(fns: list[Any]) -> dict[str, list[str]]:
    """Source lines of notebook cells (files that do not exist on disk) the functions come from."""
    out: dict[str, list[str]] = {}
    for fn in fns:
        code = getattr(fn, "__code__", None)
        if code is None:
            continue
        name = code.co_filename
        if name not in out and not os.path.exists(name):
            lines = linecache.getlines(name)
            if lines:
                out[name] = lines
    return out


def _stamped(make: Callable[..., types.CodeType], args: tuple[Any, ...], filename: str) -> types.CodeType:
    """Unpickling: the code object cloudpickle builds, under the notebook file name it came from."""
    return make(*args).replace(co_filename=filename)


class _CellPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, keeping the file name of code from the given notebook cells."""

    def __init__(self, file: io.BytesIO, filenames: set[str]) -> None:
        super().__init__(file)
        self.filenames = filenames

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.CodeType) and obj.co_filename in self.filenames:
            make, args = self.dispatch_table[types.CodeType](obj)
            return _stamped, (make, args, obj.co_filename)  # nested code objects come through here too
        return super().reducer_override(obj)


def _dumps(value: Any, filenames: set[str]) -> bytes:
    buf = io.BytesIO()
    _CellPickler(buf, filenames).dump(value)
    return buf.getvalue()


def pack(fn: Callable[..., Any], extra_sources: dict[str, list[str]] | None = None, what: str = "") -> Payload:
    code = getattr(fn, "__code__", None)
    globs = getattr(fn, "__globals__", {})
    captured = referenced(code, globs) if code is not None else {}
    for name, cell in zip(getattr(code, "co_freevars", ()), getattr(fn, "__closure__", None) or (), strict=False):
        with contextlib.suppress(ValueError):  # a cell not filled yet
            captured[name] = cell.cell_contents
    what = what or f"function {getattr(fn, '__qualname__', fn)!r}"
    check_sizes(captured, what)
    sources = _sources([fn, *captured.values()])
    sources.update(extra_sources or {})
    try:
        data = _dumps((fn, sources), set(sources))
    except Exception as e:
        raise InvalidSpecError(f"{what} cannot be sent to workers: {e}") from e
    if len(data) > MAX_BYTES:
        raise InvalidSpecError(f"the function pickles to {_format(len(data))}, over the {_format(MAX_BYTES)} limit")
    return Payload(data, hashlib.sha256(data).hexdigest())


def cell_function(body: str, name: str, namespace: dict[str, Any]) -> Payload:
    """The cell body as a function of NAME whose value is the body's last expression; the notebook
    variables it refers to are captured by value."""
    fn_code, filename, lines = _cell_code(body, name)
    captured = referenced(fn_code, namespace)
    globs: dict[str, Any] = {"__name__": "__fanout__", "__builtins__": builtins, **captured}
    fn = types.FunctionType(fn_code, globs, "fanout_cell")
    return pack(fn, {filename: lines}, what="the %%fanout cell")


def local_cell_function(body: str, name: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    """The cell body as a function of NAME over the namespace itself, nothing captured (--clone: it runs
    in a clone of this kernel, whose namespace is the notebook's)."""
    fn_code, _, _ = _cell_code(body, name)
    return types.FunctionType(fn_code, namespace, "fanout_cell")


def _cell_code(body: str, name: str) -> tuple[types.CodeType, str, list[str]]:
    if not name.isidentifier():
        raise InvalidSpecError(f"--as {name!r} is not a Python name: use an identifier such as `x`")
    try:
        tree = ast.parse(body)
    except SyntaxError as e:
        raise InvalidSpecError(f"the %%fanout cell does not parse: {e}") from e
    stmts: list[ast.stmt] = list(tree.body) or [ast.Pass()]
    if isinstance(stmts[-1], ast.Expr):
        stmts[-1] = ast.copy_location(ast.Return(value=stmts[-1].value), stmts[-1])
    module = ast.parse(f"def fanout_cell({name}):\n    pass\n")
    func = module.body[0]
    assert isinstance(func, ast.FunctionDef)
    func.body = stmts
    filename = f"<fanout-cell-{hashlib.sha256(body.encode()).hexdigest()[:12]}>"
    code = compile(module, filename, "exec")
    fn_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    lines = body.splitlines(True)
    linecache.cache[filename] = (len(body), None, lines, filename)  # local tracebacks too
    return fn_code, filename, lines


def versions() -> tuple[str, str]:
    return sys.version.split()[0], str(cloudpickle.__version__)
