"""The client side (provisioner, server extension, magics, fan-out, CLI) loads none of the daemon.

`make lint` checks the import contract statically (lint-imports); this checks what importing and running
the client side actually loads, in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DAEMON = ("snapkernel.backend", "snapkernel.snapshots", "snapkernel.host", "snapkernel.agent")
CLIENT_SIDE = ("snapkernel", "snapkernel.kernel_provisioner", "snapkernel.kernel_provisioner.provisioner",
               "snapkernel.jupyter_ext", "snapkernel.jupyter_ext.app", "snapkernel.jupyter_ext.magics",
               "snapkernel.fanout", "snapkernel.fanout.client", "snapkernel.fanout.transport", "snapkernel.client",
               "snapkernel.cli", "snapkernel.lab")


def loaded_after(code: str, **env: str) -> list[str]:
    """The daemon's modules that are in sys.modules once `code` has run in a new interpreter."""
    report = f"import json, sys; print(json.dumps(sorted(m for m in sys.modules if m.startswith({DAEMON!r}))))"
    out = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)
    result: list[str] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_importing_the_client_side_loads_no_daemon_module() -> None:
    code = "\n".join(f"import {m}" for m in CLIENT_SIDE)
    # The entry points Jupyter and IPython call, too.
    code += ("\nimport snapkernel\nsnapkernel._jupyter_server_extension_points()\nsnapkernel.remote"
             "\nfrom snapkernel.kernel_provisioner import SnapKernelProvisioner")
    assert loaded_after(code) == []


def test_cli_client_commands_load_no_daemon_module(tmp_path: Path) -> None:
    # Against a backend that is not there: each command fails at its call, after importing what it needs.
    code = ("import contextlib, io\nfrom snapkernel.cli import main\n"
            "for argv in (['status'], ['sandboxes', 'list'], ['snapshots', 'list'], ['kernels', 'list']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "        main(argv)")
    assert loaded_after(code, SNAPKERNEL_BACKEND=f"unix://{tmp_path}/none.sock", SNAPKERNEL_TOKEN="t") == []


def test_no_import_cycles_in_the_package_not_even_for_type_checking() -> None:
    import grimp

    graph = grimp.build_graph("snapkernel", exclude_type_checking_imports=False, cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:  # module -> imported -> ... -> module
                cycles.append((module, *chain))
    assert cycles == []
