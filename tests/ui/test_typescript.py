"""The front end's TypeScript unit tests (jest, labextension/test/), run as part of the Python suite."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT

LABEXTENSION = ROOT / "labextension"


def test_typescript_unit_tests_pass() -> None:
    jest = LABEXTENSION / "node_modules" / ".bin" / "jest"
    if not jest.exists() or shutil.which("node") is None:
        pytest.skip("jest is not installed: run `make install` (it installs the labextension's npm packages)")
    result = subprocess.run([str(jest), "--ci"], cwd=LABEXTENSION, capture_output=True, text=True, timeout=240,
                            check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stderr, result.stderr[-4000:]  # jest's summary: some tests ran
