"""snapkernel: Jupyter kernels in isolated (GPU) sandboxes that hibernate with their memory intact."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from snapkernel.jupyter_ext import _jupyter_server_extension_points as points

    return points()


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext snapkernel`: the `%snapshot` magic (loaded in snapkernel kernels by default)."""
    from snapkernel.jupyter_ext.magics import SnapKernelMagics

    ipython.register_magics(SnapKernelMagics)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "snapkernel"}]
