"""`remote`: run a function in fan-out worker sandboxes.

    from snapkernel import remote

    @remote(cpu=1, retries=1, timeout=30)
    def score(x): ...

    score.map(items, ordered=True, return_exceptions=False)  # a list of results
    score.remote(*args, **kwargs)                            # one call, its result
    score.spawn(*args, **kwargs)                             # one call in the background: a Future
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from snapkernel.errors import InvalidSpecError
from snapkernel.fanout.capture import pack
from snapkernel.fanout.client import Call, MapCall, Options, short_repr
from snapkernel.protocol.spec import check_cpu, parse_gpu, parse_memory

_background: list[ThreadPoolExecutor] = []  # made on the first spawn


def check_options(options: Options) -> None:
    """Refuse bad values here, before any worker starts (the backend checks them again)."""
    if not 1 <= options.workers <= 256:
        raise InvalidSpecError(f"workers {options.workers} is not accepted: use 1 to 256")
    if options.retries < 0:
        raise InvalidSpecError(f"retries {options.retries} is not accepted: use 0 or more")
    if options.timeout < 0:
        raise InvalidSpecError(f"timeout {options.timeout:g} is not accepted: use seconds > 0 (or 0 for none)")
    if options.cpu is not None:
        check_cpu(options.cpu)  # 0 too: leave it out for 1 core per worker
    parse_gpu(options.gpu)
    if options.memory:
        parse_memory(options.memory)


class RemoteFunction:
    def __init__(self, fn: Callable[..., Any], options: Options) -> None:
        check_options(options)
        self.fn = fn
        self.options = options
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """A plain local call."""
        return self.fn(*args, **kwargs)

    def _call(self, calls: list[Call], ordered: bool, return_exceptions: bool, single: bool = False) -> list[Any]:
        o = Options(**{**self.options.__dict__, "ordered": ordered, "return_exceptions": return_exceptions})
        o.workers = 1 if single else min(o.workers, max(1, len(calls)))
        o.progress = o.progress and not single  # no bar for one call (nor from spawn's thread)
        name = getattr(self.fn, "__name__", "remote")

        def describe(item: Any) -> str:  # how a worker's death names the call: `score(3)`
            args, kwargs = item if single else ((item,), {})
            shown = [*map(short_repr, args), *(f"{k}={short_repr(v)}" for k, v in kwargs.items())]
            return f"{name}({', '.join(shown)})"

        call = MapCall(pack(self.fn), o, len(calls), name, describe=describe)
        return [value for _, value in call.run(calls)]

    def map(self, items: Iterable[Any], ordered: bool = True, return_exceptions: bool = False) -> list[Any]:
        """fn(item) for every item, in worker sandboxes; in input order unless `ordered=False`."""
        calls: list[Call] = [(item, (item,), {}) for item in items]
        return self._call(calls, ordered, return_exceptions)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """One call in a worker sandbox; its result (or its exception, re-raised here)."""
        return self._call([((args, kwargs), args, kwargs)], True, False, single=True)[0]

    def spawn(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """One call in a worker sandbox, in the background: a Future of its result."""
        if not _background:
            _background.append(ThreadPoolExecutor(max_workers=8, thread_name_prefix="snapkernel-spawn"))
        return _background[0].submit(self.remote, *args, **kwargs)


def remote(fn: Callable[..., Any] | None = None, *, gpu: str = "", cpu: float | None = None, memory: str = "",
           retries: int = 0, timeout: float = 0.0, workers: int = 4, progress: bool = True) -> Any:
    """Decorator: `@remote` or `@remote(gpu=..., cpu=..., memory=..., retries=..., timeout=...)`."""
    options = Options(workers=workers, gpu=gpu, cpu=cpu, memory=memory, retries=retries, timeout=timeout,
                      progress=progress)
    if fn is not None:
        return RemoteFunction(fn, options)
    return lambda f: RemoteFunction(f, options)
