"""The first thing the agent does in a gvisor sandbox, before any of the user's code can run.

The sandbox's process starts as root (with only CAP_SETUID and CAP_SETGID) for one reason: to set the
sandbox's own pids limit in gVisor's cgroupfs, which the Sentry enforces (a fork bomb gets EAGAIN from
`fork`). The host's pids cgroup cannot do that: under gVisor it counts the Sentry's threads and stub
processes, so reaching it kills the whole sandbox. Then the agent becomes the sandbox user for good, and the
limit file, owned by root, is out of the user's reach.
"""

from __future__ import annotations

import os
import sys

PIDS_MAX = "/sys/fs/cgroup/pids/pids.max"  # gVisor binds the sandbox's own cgroup here


def become_sandbox_user() -> None:
    """Apply SNAPKERNEL_PIDS_LIMIT, then switch to SNAPKERNEL_RUN_AS ("uid:gid"); nothing where unset
    (the process runtime, or a sandbox restored from a snapshot, which already runs as its user)."""
    run_as = os.environ.pop("SNAPKERNEL_RUN_AS", "")
    limit = os.environ.pop("SNAPKERNEL_PIDS_LIMIT", "")
    if not run_as:
        return
    try:
        if limit:
            with open(PIDS_MAX, "w") as f:
                f.write(limit)
        uid, gid = (int(part) for part in run_as.split(":"))
        os.setgroups([gid])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except (OSError, ValueError) as e:  # never run the user's code with more rights or fewer limits
        print(f"agent: cannot set up the sandbox user {run_as} with pids limit {limit}: {e}", file=sys.stderr)
        sys.exit(3)
