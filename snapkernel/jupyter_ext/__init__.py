"""The Jupyter server extension (REST under /snapkernel/api) and the IPython magics."""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from snapkernel.jupyter_ext.app import SnapKernelApp

    return [{"module": "snapkernel.jupyter_ext", "app": SnapKernelApp}]
