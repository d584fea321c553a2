"""Sandbox workspaces: the one host directory a sandbox writes to, with its `disk` quota.

Where the backend runs as root and the host has loop devices, each workspace is an ext4 file system in a
sparse image file in the sandbox's directory, loop-mounted on `workspace/`: writing past the quota fails
in the kernel with ENOSPC while the host's disk, other sandboxes and the backend carry on, and removing the
sandbox removes the image. Elsewhere the workspace is a plain directory and `snapkernel status` says the
quota is not enforced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from snapkernel.errors import InvalidSpecError, SandboxFailedError
from snapkernel.protocol.spec import format_bytes

log = logging.getLogger(__name__)

WORKSPACE = "workspace"
IMAGE = "workspace.img"
MOUNT_OPTIONS = "loop,nosuid,nodev,discard"  # discard: files deleted inside give their space back to the host
Owner = tuple[int, int] | None  # (uid, gid) the sandbox's user writes as; None: the backend's own


def _run(argv: list[str]) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise OSError(f"`{' '.join(argv)}` exited {out.returncode}: {(out.stderr or out.stdout).strip()[-300:]}")


def _make_image(image: Path, size: int, owner: Owner) -> None:
    with open(image, "wb") as f:
        f.truncate(size)  # sparse: the host's disk holds only what is written
    uid, gid = owner or (os.geteuid(), os.getegid())
    # No reserved blocks (the quota is the user's), lazy init (a 10Gi image is made in milliseconds).
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
          f"lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner={uid}:{gid}", str(image)])


def _probe(state_dir: Path) -> str:
    """Why workspace quotas cannot be enforced here ("" when they can): tried once, on a small image."""
    if os.geteuid() != 0:
        return "the backend does not run as root (loop mounts need root)"
    missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (Debian: apt-get install e2fsprogs mount)"
    probe = state_dir / ".quota-probe"
    shutil.rmtree(probe, ignore_errors=True)
    try:
        (probe / WORKSPACE).mkdir(parents=True)
        _make_image(probe / IMAGE, 8 << 20, None)
        _run(["mount", "-o", MOUNT_OPTIONS, str(probe / IMAGE), str(probe / WORKSPACE)])
        _run(["umount", "--lazy", str(probe / WORKSPACE)])
    except OSError as e:
        return f"no loop-mounted ext4 images here: {e}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return ""


class Workspaces:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.problem = _probe(state_dir)

    @property
    def enforced(self) -> bool:
        return not self.problem

    def describe(self) -> str:
        """How the `disk` quota is enforced, for `snapkernel status`."""
        if self.enforced:
            return "workspace quota (disk): enforced, an ext4 image per sandbox, loop-mounted"
        return f"workspace quota (disk): not enforced: {self.problem}"

    def check(self, disk: int, value: str) -> None:
        """Refuse a quota this host's disk cannot give (the images are sparse, but one must fit)."""
        free = shutil.disk_usage(self.state_dir).free
        if disk > free:
            raise InvalidSpecError(f"disk {value!r} is more than this host has: {format_bytes(free)} free where "
                                   "sandboxes live; ask for less, e.g. '10Gi'")

    def prepare(self, sandbox_dir: Path, disk: int, owner: Owner, quota: bool = True) -> Path:
        """The sandbox's workspace, mounted with its quota (again, after a host reboot), owned by `owner`; a plain
        directory where quotas are not enforced or its runtime takes none (`quota`)."""
        workspace = sandbox_dir / WORKSPACE
        workspace.mkdir(parents=True, exist_ok=True)
        if quota and self.enforced and not os.path.ismount(workspace):
            image = sandbox_dir / IMAGE
            try:
                if not image.exists():
                    _make_image(image, disk, owner)
                _run(["mount", "-o", MOUNT_OPTIONS, str(image), str(workspace)])
            except OSError as e:
                raise SandboxFailedError(f"the sandbox's workspace could not be mounted with its disk quota: {e}; "
                                         f"see `snapkernel status`") from e
            with contextlib.suppress(FileNotFoundError):
                (workspace / "lost+found").rmdir()
        if owner is not None:
            os.chown(workspace, *owner)
        return workspace

    def grow(self, sandbox_dir: Path, disk: int) -> None:
        """Give a stopped sandbox's workspace a larger quota (a kernel moved to more `disk`): its image and file
        system grow, files and all. Offline: growing a mounted ext4 needs CAP_SYS_RESOURCE, which a backend in a
        container may not have."""
        workspace, image = sandbox_dir / WORKSPACE, sandbox_dir / IMAGE
        if not (self.enforced and image.exists()):
            return  # a plain directory: no quota to change
        try:
            if os.path.ismount(workspace):
                _run(["umount", str(workspace)])
            with open(image, "r+b") as f:
                f.truncate(disk)
            # resize2fs wants a file system checked since it was last mounted; 1 is "errors corrected".
            check = subprocess.run(["e2fsck", "-f", "-p", str(image)], capture_output=True, text=True, timeout=300,
                                   check=False)
            if check.returncode not in (0, 1):
                raise OSError(f"e2fsck exited {check.returncode}: {(check.stderr or check.stdout).strip()[-300:]}")
            _run(["resize2fs", str(image)])
        except (OSError, subprocess.SubprocessError) as e:
            raise SandboxFailedError(f"the workspace could not grow to {format_bytes(disk)}: {e}") from e
        finally:
            if not os.path.ismount(workspace):  # mounted again, grown or not
                _run(["mount", "-o", MOUNT_OPTIONS, str(image), str(workspace)])

    @staticmethod
    def give(path: Path, owner: Owner) -> None:
        """Hand what the backend wrote into a workspace (restored files) to the sandbox's user."""
        if owner is None:
            return
        os.lchown(path, *owner)
        for parent, dirs, files in os.walk(path):
            for name in dirs + files:
                os.lchown(os.path.join(parent, name), *owner)

    @staticmethod
    def release(sandbox_dir: Path) -> None:
        """Unmount a removed sandbox's workspace (lazily: a process still in it lets go when it ends)."""
        workspace = sandbox_dir / WORKSPACE
        if os.path.ismount(workspace):
            try:
                _run(["umount", "--lazy", str(workspace)])
            except OSError as e:
                log.warning("workspace %s not unmounted: %s", workspace, e)
