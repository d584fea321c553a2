"""Parsing and checking of sandbox specs: GPU requests, memory sizes, runtimes.

Used on both sides: the provisioner checks a kernelspec's config before asking, the backend checks every
request again (it never trusts a client).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapkernel.errors import InvalidSpecError
from snapkernel.protocol.v1 import backend_pb2 as pb

# Runtimes are plug-ins (the backend's `snapkernel.runtimes` entry points): here a name's form is checked,
# and the backend says whether it has that runtime.
_RUNTIME_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_GPU_RE = re.compile(r"^(?P<model>[A-Za-z][A-Za-z0-9_-]*)(?::(?P<count>\d+))?$")
_MEM_RE = re.compile(r"^(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[KMGTPE]i?|[kmgtpe]i?|B)?$")
_UNITS = {
    None: 1, "B": 1,
    "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5, "E": 1000**6,
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6,
}
_SANDBOX_ID_RE = re.compile(r"^sb-[0-9a-f]{12}$")
_SNAPSHOT_ID_RE = re.compile(r"^snap-[0-9a-f]{12}$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MIN_MEMORY = 64 * 1024**2
MIN_DISK = 16 * 1024**2
MAX_CPU = 1024
MAX_SNAPSHOT_NAME = 200  # characters
CONFIG_KEYS = ("gpu", "cpu", "memory", "disk", "runtime", "image", "restore_from", "hibernate_after", "network",
               "env", "mount_notebook_dir")


@dataclass(frozen=True)
class GpuRequest:
    model: str  # "any" or a model name such as "H100" (compared case-insensitively)
    count: int


@dataclass
class ParsedSpec:
    gpu: GpuRequest | None
    cpu: float
    memory: int  # bytes
    disk: int  # bytes: the workspace quota
    runtime: str
    image: str
    restore_from: str
    hibernate_after: float | None  # None: the backend's default
    network: bool
    env: dict[str, str] = field(default_factory=dict)
    mount_dir: str = ""


def parse_gpu(value: str) -> GpuRequest | None:
    """`""` → None; `"H100"` → one H100; `"H100:2"`; `"any:1"`."""
    value = value.strip()
    if not value:
        return None
    m = _GPU_RE.match(value)
    count = int(m.group("count") or 1) if m else 0
    if not m or count < 1 or count > 64:
        raise InvalidSpecError(
            f"gpu spec {value!r} is not valid: use MODEL or MODEL:COUNT with COUNT from 1 to 64, "
            "for example 'H100', 'H100:2' or 'any:1'"
        )
    return GpuRequest(model=m.group("model"), count=count)


def parse_memory(value: str | int) -> int:
    """`"8Gi"` → bytes. Plain numbers are bytes; K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024."""
    return parse_size(value, "memory", MIN_MEMORY, "'512Mi', '8Gi' or '2G'")


def parse_disk(value: str | int) -> int:
    """A workspace quota, `"10Gi"` → bytes (units as for memory)."""
    return parse_size(value, "disk", MIN_DISK, "'512Mi', '10Gi' or '50G'")


def parse_size(value: str | int, what: str, minimum: int, examples: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        text = str(value).strip()
        m = _MEM_RE.match(text)
        unit = m.group("unit") if m else None
        if unit and unit not in _UNITS:
            unit = unit[0].upper() + unit[1:]
        if not m or unit not in _UNITS:
            raise InvalidSpecError(
                f"{what} size {value!r} is not valid: use a number of bytes or a number with a unit, "
                f"for example {examples}"
            )
        size = int(float(m.group("num")) * _UNITS[unit])
    if size < minimum:
        raise InvalidSpecError(f"{what} size {value!r} is too small: use at least {format_bytes(minimum)}")
    return size


def format_bytes(n: int) -> str:
    for unit, scale in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0" + unit, unit)
    return f"{n}B"


def check_cpu(cpu: float) -> float:
    """A number of cores: above 0, at most `MAX_CPU`. 0 is refused, never taken as "the default"."""
    if not math.isfinite(cpu) or cpu <= 0 or cpu > MAX_CPU:
        raise InvalidSpecError(
            f"cpu {cpu:g} is not valid: use a number of cores above 0 and at most {MAX_CPU}, e.g. 2 or 0.5 "
            "(leave cpu unset for the backend's default)"
        )
    return float(cpu)


def check_snapshot_name(name: str) -> str:
    if len(name) > MAX_SNAPSHOT_NAME:
        raise InvalidSpecError(
            f"snapshot name {name[:40]!r}... is {len(name)} characters long: names are at most "
            f"{MAX_SNAPSHOT_NAME} characters"
        )
    return name


def check_runtime_name(name: str) -> str:
    if not _RUNTIME_NAME.fullmatch(name):
        raise InvalidSpecError(f"runtime {name!r} is not a runtime's name: use gvisor, process or one a plug-in "
                               "adds (lowercase letters, digits, '-' and '_')")
    return name


def check_sandbox_id(value: str) -> str:
    if not _SANDBOX_ID_RE.match(value or ""):
        raise InvalidSpecError(
            f"sandbox id {value!r} is not valid: ids look like 'sb-' and 12 hex digits "
            "(see `snapkernel sandboxes list`)"
        )
    return value


def check_snapshot_id(value: str) -> str:
    if not _SNAPSHOT_ID_RE.match(value or ""):
        raise InvalidSpecError(f"snapshot id {value!r} is not valid: ids look like 'snap-' and 12 hex digits "
                               "(see `snapkernel snapshots list`)")
    return value


def check_image(image: str) -> str:
    """An `image` is a root filesystem directory with a Linux userland (the agent's Python goes in)."""
    real = os.path.realpath(image)
    if not os.path.isabs(image):
        raise InvalidSpecError(f"image {image!r} is not valid: give the absolute path of a root filesystem")
    if real == "/":
        raise InvalidSpecError(f"image {image!r} is the host's own root: that shows the whole host to the "
                               "kernel; leave image unset for the minimal root filesystem")
    if not os.path.isdir(real):
        raise InvalidSpecError(f"image {image!r} is not valid: it is not a directory (give the absolute path "
                               "of a root filesystem directory)")
    loaders = [p for d in ("lib64", "lib", "usr/lib64", "usr/lib")
               for p in (Path(real, d).glob("ld-linux*.so*") if os.path.isdir(Path(real, d)) else [])]
    if not loaders:
        raise InvalidSpecError(
            f"image {image!r} has no Linux userland to run Python in (no lib*/ld-linux*.so): give a root "
            "filesystem such as one made by debootstrap, or leave image unset"
        )
    return real


def parse_spec(spec: pb.SandboxSpec, *, default_runtime: str, default_cpu: float,
               default_memory: int, default_disk: int) -> ParsedSpec:
    """Check every field of a request's spec; the first bad value raises `InvalidSpecError`."""
    runtime = check_runtime_name(spec.runtime or default_runtime)
    # Absent: the backend's default. Present, 0 included: checked (0 used to become the default unseen).
    cpu = check_cpu(spec.cpu) if spec.HasField("cpu") else default_cpu
    hibernate = spec.hibernate_after if spec.HasField("hibernate_after") else None
    if hibernate is not None and (not math.isfinite(hibernate) or hibernate < 0):
        raise InvalidSpecError(
            f"hibernate_after {hibernate!r} is not valid: use idle seconds (0 turns hibernation off)"
        )
    for key in spec.env:
        if not _ENV_KEY_RE.match(key):
            raise InvalidSpecError(f"environment variable name {key!r} is not valid: use letters, digits, _")
    if spec.mount_dir and (not os.path.isabs(spec.mount_dir) or not os.path.isdir(spec.mount_dir)):
        raise InvalidSpecError(f"mount_dir {spec.mount_dir!r} is not valid: give the absolute path of an existing "
                               "directory")
    if spec.mount_dir and os.path.realpath(spec.mount_dir) == "/":
        raise InvalidSpecError(f"mount_dir {spec.mount_dir!r} is the host's own root: that shows the whole host to "
                               "the kernel; open the notebook from a directory of its own")
    return ParsedSpec(
        gpu=parse_gpu(spec.gpu),
        cpu=float(cpu),
        memory=parse_memory(spec.memory) if spec.memory else default_memory,
        disk=parse_disk(spec.disk) if spec.disk else default_disk,
        runtime=runtime,
        image=check_image(spec.image) if spec.image else "",
        restore_from=spec.restore_from,
        hibernate_after=hibernate,
        network=spec.network,
        env=dict(spec.env),
        mount_dir=os.path.realpath(spec.mount_dir) if spec.mount_dir else "",
    )


def spec_from_config(config: Mapping[str, Any]) -> pb.SandboxSpec:
    """A kernelspec's `kernel_provisioner.config` (or a REST body) as a `SandboxSpec`, type-checked."""
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise InvalidSpecError(
            f"unknown snapkernel config key(s) {', '.join(map(repr, unknown))}: accepted keys are "
            f"{', '.join(CONFIG_KEYS)}"
        )
    spec = pb.SandboxSpec()
    for key in ("gpu", "memory", "disk", "runtime", "image", "restore_from"):
        value = config.get(key)
        if value is None:
            continue
        if key in ("memory", "disk") and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise InvalidSpecError(f"{key} {value!r} is not valid: expected a string")
        setattr(spec, key, value)
    for key in ("cpu", "hibernate_after"):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidSpecError(f"{key} {value!r} is not valid: expected a number")
        if key == "cpu":
            check_cpu(float(value))
        setattr(spec, key, float(value))
    if "network" in config:
        if not isinstance(config["network"], bool):
            raise InvalidSpecError(f"network {config['network']!r} is not valid: expected true or false")
        spec.network = config["network"]
    if not isinstance(config.get("mount_notebook_dir", False), bool):
        raise InvalidSpecError(f"mount_notebook_dir {config['mount_notebook_dir']!r} is not valid: expected true "
                               "or false")
    env = config.get("env") or {}
    if not isinstance(env, Mapping) or not all(isinstance(v, str) for v in env.values()):
        raise InvalidSpecError(f"env {env!r} is not valid: expected a mapping of names to strings")
    spec.env.update(env)
    # Parse what can be parsed without the backend's defaults, so errors show before anything starts.
    parse_gpu(spec.gpu)
    if spec.memory:
        parse_memory(spec.memory)
    if spec.disk:
        parse_disk(spec.disk)
    if spec.runtime:
        check_runtime_name(spec.runtime)
    return spec


def describe_spec(spec: ParsedSpec) -> str:
    """A spec's resources for people: "gvisor, cpu 2, memory 2Gi, disk 10Gi" (with "gpu H100:2" first if any)."""
    gpu = f"gpu {spec.gpu.model}:{spec.gpu.count}, " if spec.gpu else ""
    return (f"{spec.runtime}, {gpu}cpu {spec.cpu:g}, memory {format_bytes(spec.memory)}, "
            f"disk {format_bytes(spec.disk)}")
