"""snapkernel: Jupyter kernels in isolated (GPU) sandboxes that hibernate with their memory intact."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from snapkernel.jupyter_ext import _jupyter_server_extension_points as points

    return points()


def __getattr__(name: str) -> Any:
    """`from snapkernel import remote`, imported on first use (the package itself stays light)."""
    if name == "remote":
        from snapkernel.fanout import remote

        return remote
    raise AttributeError(f"module 'snapkernel' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext snapkernel`: the `%snapshot` and `%%fanout` magics (loaded in snapkernel kernels by default)."""
    from snapkernel.jupyter_ext.magics import SnapKernelMagics

    ipython.register_magics(SnapKernelMagics)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "snapkernel"}]
