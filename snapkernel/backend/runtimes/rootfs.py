"""The minimal root filesystem of a gvisor sandbox.

A sandbox sees, read-only, the host's system directories (`/usr`, `/bin`, `/sbin`, `/lib*`), the exact
Python installation and virtualenv the agent runs from (not their parents: an interpreter under
`/root/.pyenv/...` must not show the rest of `/root`), the directories an admin lists, and an `/etc`
generated for it. Its root is a skeleton directory of mount points in the sandbox's own directory, so
nothing else of the host is there to be found.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapkernel.errors import InvalidSpecError

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Host files in /etc that programs read and that tell nothing about the host: copied as they are.
ETC_FILES = ("ld.so.cache", "nsswitch.conf", "host.conf", "services", "protocols", "os-release", "localtime",
             "mime.types")
# Host directories of /etc shown read-only: CA certificates, and the symlinks Debian's tools go through.
ETC_DIRS = ("/etc/ssl/certs", "/etc/alternatives")


@dataclass(frozen=True)
class SandboxUser:
    """Who the kernel runs as inside the sandbox."""

    uid: int = 1000
    gid: int = 1000
    name: str = "snapkernel"


def bind(path: str, mode: str, source: str = "") -> dict[str, Any]:
    return {"destination": path, "type": "bind", "source": source or path, "options": ["rbind", mode]}


def under(path: str, parents: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


def python_dirs() -> list[str]:
    """The agent's interpreter and packages: its prefixes and snapkernel's own package directory.

    sys.path entries outside the prefixes (an editable install's checkout) are not shown: only the
    snapkernel package in them is, so the rest of the checkout stays out of sight.
    """
    import snapkernel

    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    dirs.add(str(Path(snapkernel.__file__).resolve().parent))
    system = [os.path.realpath(d) for d in SYSTEM_DIRS]
    dirs = {d for d in dirs if os.path.isdir(d) and not under(d, system)}
    return sorted(d for d in dirs if not under(os.path.dirname(d), dirs))


def check_ro_paths(paths: Iterable[str]) -> list[str]:
    """An admin's extra read-only paths: absolute, existing, and never the whole host."""
    checked = []
    for p in paths:
        real = os.path.realpath(p) if os.path.isabs(p) else ""
        if not real or not os.path.exists(real) or real == "/":
            raise InvalidSpecError(
                f"sandbox_ro_paths entry {p!r} is not valid: give the absolute path of an existing file or "
                "directory other than /"
            )
        checked.append(real)
    return checked


def system_mounts(image: str) -> list[dict[str, Any]]:
    """Read-only mounts of the host's system directories and the agent's Python (only Python with an image,
    which brings its own system)."""
    mounts = []
    if not image:
        mounts += [bind(d, "ro") for d in SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d)]
        mounts += [bind(d, "ro") for d in ETC_DIRS if os.path.isdir(d)]
    return mounts + [bind(d, "ro") for d in python_dirs()]


def venv_config_mount(sandbox_dir: Path) -> list[dict[str, Any]]:
    """Where the agent runs from a virtualenv: its pyvenv.cfg with the user site turned on, so that
    `pip install --user` works in the kernel and lands in HOME (the workspace). The host's file is unchanged."""
    cfg = Path(sys.prefix, "pyvenv.cfg")
    if sys.prefix == sys.base_prefix or not cfg.is_file():
        return []
    lines = [line for line in cfg.read_text().splitlines() if not line.startswith("include-system-site-packages")]
    mine = sandbox_dir / "pyvenv.cfg"
    mine.write_text("\n".join([*lines, "include-system-site-packages = true", ""]))
    return [bind(str(cfg.resolve()), "ro", str(mine))]


def build(root: Path, mounts: list[dict[str, Any]], *, user: SandboxUser, home: str, hostname: str,
          network: bool) -> None:
    """Make `root` the skeleton of a minimal root filesystem: the host's symlinks for merged-/usr directories,
    the generated /etc, and a mount point for every mount."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(mode=0o755)
    for d in SYSTEM_DIRS:  # /bin -> usr/bin on a merged-/usr host
        if os.path.islink(d):
            os.symlink(os.readlink(d), root / d.lstrip("/"))
    _write_etc(root / "etc", user=user, home=home, hostname=hostname, network=network)
    search_path = {os.path.realpath(p) for p in sys.path if p}
    for mount in mounts:
        point = root / mount["destination"].lstrip("/")
        # Never through one of the skeleton's symlinks: on the host it would lead out of the skeleton.
        if point.exists() or any(p.is_symlink() for p in (point, *point.parents) if root in p.parents):
            continue
        for parent in reversed([p for p in point.parents if root in p.parents]):
            if not parent.exists():  # only passed through: /root above a pyenv interpreter is not listable,
                # but Python lists the sys.path entries it imports from (an editable install's checkout).
                listable = "/" + str(parent.relative_to(root)) in search_path
                parent.mkdir(mode=0o755 if listable else 0o711)
        if mount["type"] == "bind" and os.path.isfile(mount["source"]):
            point.touch(mode=0o644)
        else:
            point.mkdir(mode=0o755)


def _write_etc(etc: Path, *, user: SandboxUser, home: str, hostname: str, network: bool) -> None:
    etc.mkdir(mode=0o755)
    (etc / "ssl").mkdir(mode=0o755)  # for the host's certs/
    for name in ETC_FILES:
        src = Path("/etc", name)
        if src.is_symlink():
            os.symlink(os.readlink(src), etc / name)
        elif src.is_file():
            shutil.copyfile(src, etc / name)
    if network and Path("/etc/resolv.conf").exists():
        shutil.copyfile("/etc/resolv.conf", etc / "resolv.conf")
    root_home = home if user.uid == 0 else "/nonexistent"
    users = [f"root:x:0:0:root:{root_home}:/bin/sh", "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"]
    groups = ["root:x:0:", "nogroup:x:65534:"]
    if user.uid != 0:
        users.insert(1, f"{user.name}:x:{user.uid}:{user.gid}:{user.name}:{home}:/bin/sh")
    if user.gid != 0:
        groups.insert(1, f"{user.name}:x:{user.gid}:")
    (etc / "passwd").write_text("\n".join(users) + "\n")
    (etc / "group").write_text("\n".join(groups) + "\n")
    (etc / "hostname").write_text(f"{hostname}\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t{hostname}\n")
