"""What a node offers Ray and what a sandbox asks of it: the Ray resources of placement (one accountant: Ray).

A node running a daemon carries `snapkernel_node` and one `snapkernel_runtime_<name>` per working runtime, plus
`snapkernel_gpu_<MODEL>` per GPU model beside Ray's own `GPU` count; a sandbox's placement group bundle asks for
its cores (`CPU`), its memory (`memory`, bytes), its GPUs and a sliver of the markers, so Ray only puts it on a
node that runs its runtime and has its GPU model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from snapkernel.protocol.spec import ParsedSpec, format_bytes

NODE = "snapkernel_node"
MARKER = 1000.0  # how much of each marker resource a node has: a sandbox takes a sliver
SLIVER = 0.001
_NAME = re.compile(r"[^A-Za-z0-9_]")


def runtime_resource(runtime: str) -> str:
    return f"snapkernel_runtime_{_NAME.sub('_', runtime)}"


def gpu_resource(model: str) -> str:
    return f"snapkernel_gpu_{_NAME.sub('_', model)}"


def node_resources(runtimes: list[str], gpu_models: Mapping[str, int]) -> dict[str, float]:
    """The custom resources a node with these runtimes and GPUs starts its raylet with (`ray start
    --resources`)."""
    found = {NODE: MARKER, **{runtime_resource(r): MARKER for r in runtimes}}
    found.update({gpu_resource(m): float(n) for m, n in gpu_models.items()})
    return found


def bundle(spec: ParsedSpec) -> dict[str, float]:
    """The one placement group bundle a sandbox of this spec reserves."""
    wants = {"CPU": spec.cpu, "memory": float(spec.memory), NODE: SLIVER, runtime_resource(spec.runtime): SLIVER}
    if spec.gpu is not None:
        wants["GPU"] = float(spec.gpu.count)
        if spec.gpu.model.lower() != "any":
            wants[gpu_resource(spec.gpu.model)] = float(spec.gpu.count)
    return wants


def describe(resources: Mapping[str, float]) -> str:
    """A node's (or a bundle's) resources for people: '2 CPU, 8Gi, GPUs 2 H100, runtimes gvisor, process'."""
    parts = [f"{resources.get('CPU', 0):g} CPU", format_bytes(int(resources.get("memory", 0)))]
    mine = {k: v for k, v in resources.items() if "_group_" not in k}  # not Ray's own per placement group
    gpus = [f"{n:g} {k[len('snapkernel_gpu_'):]}" for k, n in sorted(mine.items()) if k.startswith("snapkernel_gpu_")]
    if gpus or resources.get("GPU"):
        parts.append("GPUs " + (", ".join(gpus) or f"{resources.get('GPU', 0):g}"))
    runtimes = [k[len("snapkernel_runtime_"):] for k in sorted(mine) if k.startswith("snapkernel_runtime_")]
    parts.append("runtimes " + (", ".join(runtimes) or "none"))
    return ", ".join(parts)


def fits(wants: Mapping[str, float], has: Mapping[str, float]) -> bool:
    return all(has.get(k, 0.0) + 1e-9 >= v for k, v in wants.items())
