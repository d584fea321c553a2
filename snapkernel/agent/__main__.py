"""`python -m snapkernel.agent`: the sandbox's entry point.

The kernel is launched before anything heavy is imported, so its start-up overlaps the agent's.
With SNAPKERNEL_AGENT_MODE=worker it runs fan-out calls instead (snapkernel.agent.worker), importing only
what a worker needs: a cold fan-out waits for its first worker's hello.
"""

import os
import signal
import sys

from snapkernel.agent.sandbox_user import become_sandbox_user

become_sandbox_user()

if os.environ.get("SNAPKERNEL_AGENT_MODE") == "worker":
    from snapkernel.agent.worker import main as worker_main

    sys.exit(worker_main())

import tempfile  # noqa: E402 - a worker does without these

from snapkernel.agent.kernel_process import KernelProcess  # noqa: E402

signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are for the kernel, not the agent
key = os.environ.pop("SNAPKERNEL_KERNEL_KEY", "").encode()
scheme = os.environ.pop("SNAPKERNEL_SIGNATURE_SCHEME", "hmac-sha256")
# Short: unix socket paths are limited to 107 bytes, and a process sandbox's TMPDIR is deep in a state dir that
# may be deep itself (a cluster node's, DIR/nodes/NAME/sandboxes/ID/...).
base = tempfile.gettempdir()
runtime_dir = tempfile.mkdtemp(prefix="ska-", dir=base if len(base) <= 60 else "/tmp")
# Fan-out calls of the kernel's code reach the backend through this socket of the agent's.
os.environ["SNAPKERNEL_FANOUT_SOCKET"] = os.path.join(runtime_dir, "fanout.sock")
launched = KernelProcess.launch(key, scheme, runtime_dir, generation=1)

from snapkernel.agent.kernel_bridge import main  # noqa: E402 - after the launch, on purpose

sys.exit(main(launched, key, scheme, runtime_dir))
