"""A Jupyter server with the snapkernel extension (pytest-jupyter), behind a token and an odd base URL."""

from __future__ import annotations

from typing import Any

import pytest

PRICES = {"gpu_price_per_second": {"H100": 0.001}, "cpu_price_per_second": 0.00002, "currency": "EUR"}


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"snapkernel": True}},
            "IdentityProvider": {"token": "secret-token"},
            "SnapKernelApp": PRICES}


@pytest.fixture
def jp_base_url() -> str:
    return "/a%40b/"  # an odd base URL catches handlers that forget it
