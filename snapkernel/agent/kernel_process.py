"""Launching the ipykernel process. Kept free of heavy imports: the agent starts the kernel first thing,
so the kernel's own start-up (the slow part, above all under gVisor) overlaps the agent's imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


@dataclass
class KernelProcess:
    proc: subprocess.Popen[bytes]
    addresses: dict[str, str]  # channel -> the unix socket it is bound to
    generation: int

    @classmethod
    def launch(cls, key: bytes, signature_scheme: str, runtime_dir: str, generation: int) -> KernelProcess:
        """Start ipykernel with the Jupyter session's key, on unix sockets in `runtime_dir`.

        Unix sockets, not loopback TCP: no port races, nothing listening on the network, and under
        gVisor they are several times faster than its network stack's loopback.
        """
        base = os.path.join(runtime_dir, f"kernel-{generation}")
        ports = {name: i + 1 for i, name in enumerate(CHANNELS)}  # ipykernel binds ipc://BASE-PORT
        path = base + ".json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({**{f"{n}_port": p for n, p in ports.items()}, "ip": base, "transport": "ipc",
                       "key": key.decode(), "signature_scheme": signature_scheme, "kernel_name": ""}, f)
        env = dict(os.environ)
        env.pop("SNAPKERNEL_KERNEL_KEY", None)
        _make_user_site()
        # The kernel writes to the agent's log (fd 2), never to fd 1, which carries the frames.
        proc = subprocess.Popen([sys.executable, "-m", "ipykernel_launcher", "-f", path,
                                 "--IPKernelApp.extra_extensions=snapkernel"],
                                stdin=subprocess.DEVNULL, stdout=2, stderr=2, env=env)
        return cls(proc, {name: f"{base}-{port}" for name, port in ports.items()}, generation)


def _make_user_site() -> None:
    """Python puts the user site (in HOME, the workspace) on sys.path only if it exists when the kernel starts:
    made now, `pip install --user` in a cell is importable at once, without a restart."""
    import site

    if site.ENABLE_USER_SITE:
        try:
            os.makedirs(site.getusersitepackages(), exist_ok=True)
        except OSError as e:
            print(f"agent: no user site directory ({e})", file=sys.stderr)
