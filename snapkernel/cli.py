"""The `snapkernel` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from google.protobuf.json_format import MessageToDict

from snapkernel import __version__
from snapkernel.errors import SnapkernelError
from snapkernel.protocol.kinds import DEFAULT_SNAPSHOT_KIND, SNAPSHOT_KINDS


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def _with_client(fn: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    from snapkernel.client import BackendClient

    client = BackendClient()
    try:
        return await fn(client)
    finally:
        await client.close()


def _sandbox_dict(sb: Any) -> dict[str, Any]:
    from snapkernel.protocol.states import STATE_NAMES

    d = MessageToDict(sb, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    d["state"] = STATE_NAMES[sb.state]
    return d


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())


def cmd_status(args: argparse.Namespace) -> int:
    from snapkernel.protocol.spec import format_bytes

    status = _run(_with_client(lambda c: c.status()))
    if args.json:
        print(json.dumps(MessageToDict(status, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), indent=1))
        return 0
    cap = status.capacity
    print(f"snapkernel backend {status.version}; default runtime: {status.default_runtime}")
    print("runtimes:")
    for r in status.runtimes:
        print(f"  {r.name:8} {'available' if r.available else 'unavailable':11} {r.version:12} {r.detail}")
    print("GPUs:" + ("" if status.gpus else f" none ({status.gpu_detail})"))
    for g in status.gpus:
        print(f"  {g.index}: {g.model} ({g.name}), {format_bytes(g.memory_total)}, "
              f"{format_bytes(g.memory_used)} used, {g.utilization}% busy")
    if status.driver_version:
        print(f"  driver {status.driver_version}")
    cpu_policy = (f"overcommit {cap.cpu_overcommit:g}x: up to {cap.cpu_limit:g}" if cap.cpu_overcommit > 1
                  else "no overcommit")
    memory_policy = (f"overcommit {cap.memory_overcommit:g}x: up to {format_bytes(cap.memory_limit)}"
                     if cap.memory_overcommit > 1 else "never overcommitted")
    print(f"capacity: cpu {cap.cpu_allocated:g}/{cap.cpu_total:g} cores given out ({cpu_policy}), memory "
          f"{format_bytes(cap.memory_allocated)}/{format_bytes(cap.memory_total)} ({memory_policy}), GPUs "
          f"{cap.gpus_allocated}/{cap.gpus_total} (never shared)")
    print(f"sandboxes: {status.sandboxes}")
    if status.nodes:
        print("nodes:")
    for n in status.nodes:
        c = n.capacity
        runtimes = ", ".join(r.name for r in n.runtimes if r.available) or "-"
        gpus = ", ".join(g.model for g in n.gpus) or "no GPU"
        print(f"  {n.name:10} {'alive' if n.alive else 'LOST':5} {n.address:22} cpu {c.cpu_allocated:g}/"
              f"{c.cpu_total:g}, memory {format_bytes(c.memory_allocated)}/{format_bytes(c.memory_total)}, {gpus}, "
              f"runtimes {runtimes}, {n.sandboxes} sandbox(es){': ' + n.message if n.message else ''}")
    pool = status.warm_pool
    print(f"warm pool: {pool.ready} of {pool.size} ready, {pool.handed_out} handed out" if pool.size
          else "warm pool: off")
    print("templates (new kernels and fan-out workers of their class restore one):"
          + ("" if status.templates else " none"))
    now = time.time()
    for t in status.templates:
        age = f", built {_age(now - t.created)} ago" if t.created and t.state == "ready" else ""
        what = ("worker" if t.mode == "worker" else "kernel") + ("" if t.used == 1 else "s")
        print(f"  {t.key}  {t.spec}: {t.state}{age}, {format_bytes(t.size)}, {t.used} {what} from it")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def cmd_sandboxes_list(args: argparse.Namespace) -> int:
    from snapkernel.protocol.states import STATE_NAMES

    sandboxes = _run(_with_client(lambda c: c.list_sandboxes(include_ended=args.all)))
    if args.json:
        print(json.dumps([_sandbox_dict(s) for s in sandboxes], indent=1))
        return 0
    rows = [[s.id, s.kernel_id or "-", s.runtime, STATE_NAMES[s.state], s.spec.gpu or "-",
             ",".join(map(str, s.gpu_indices)) or "-", s.message] for s in sandboxes]
    header = ["ID", "KERNEL", "RUNTIME", "STATE", "GPU", "GPU IDX", "MESSAGE"]
    if any(s.node for s in sandboxes):  # a cluster's front: where each runs
        rows = [[*row[:3], s.node or "-", *row[3:]] for row, s in zip(rows, sandboxes, strict=True)]
        header = [*header[:3], "NODE", *header[3:]]
    _print_table(rows, header)
    return 0


def _remove_each(ids: list[str], method: str) -> int:
    """Delete each id with the client's `method`, saying so as it goes (stops at the first error)."""
    async def rm(client: Any) -> None:
        for one in ids:
            await getattr(client, method)(one)
            print(f"removed {one}")

    _run(_with_client(rm))
    return 0


def cmd_sandboxes_rm(args: argparse.Namespace) -> int:
    return _remove_each(args.ids, "delete_sandbox")


def _each(ids: list[str], method: str, as_json: bool) -> int:
    """Call the client's `method` on each sandbox id, printing the sandbox it returns."""
    async def go(client: Any) -> list[Any]:
        done = []
        for one in ids:
            sb = await getattr(client, method)(one)
            done.append(sb)
            if not as_json:
                print(f"{sb.id}: {_sandbox_dict(sb)['state']}{' (' + sb.message + ')' if sb.message else ''}")
        return done

    done = _run(_with_client(go))
    if as_json:
        print(json.dumps([_sandbox_dict(s) for s in done], indent=1))
    return 0


def _spec_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The resources given on the command line (--gpu, --cpu, --memory, --disk, --runtime)."""
    return {key: getattr(args, key) for key in ("gpu", "cpu", "memory", "disk", "runtime")
            if getattr(args, key, None) is not None}


def cmd_sandboxes_move(args: argparse.Namespace) -> int:
    """Move a running kernel to other resources, showing the move's steps as it goes."""
    from snapkernel.protocol.v1 import backend_pb2 as pb

    overrides = _spec_overrides(args)
    if not overrides:
        raise SnapkernelError("give the resources to move to: --gpu, --cpu, --memory, --disk or --runtime "
                              "(e.g. `snapkernel sandboxes move sb-... --memory 8Gi`)")
    request = pb.MoveSandboxRequest(id=args.id, allow_cpu_fallback=args.allow_cpu_fallback, timeout=args.timeout,
                                    **overrides)

    async def go(client: Any) -> Any:
        async def steps() -> None:
            async for event in client.watch(args.id):
                if event.progress.step == "move" and not args.json:
                    print(f"  {event.progress.message}", file=sys.stderr, flush=True)

        watching = asyncio.ensure_future(steps())
        try:
            return await client.move_sandbox(request)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, SnapkernelError):
                await watching

    sb = _run(_with_client(go))
    if args.json:
        print(json.dumps(_sandbox_dict(sb), indent=1))
    else:
        print(f"{sb.id}: {sb.message}")
    return 0


def cmd_sandboxes_hibernate(args: argparse.Namespace) -> int:
    return _each(args.ids, "hibernate_sandbox", args.json)


def cmd_sandboxes_wake(args: argparse.Namespace) -> int:
    return _each(args.ids, "wake_sandbox", args.json)


def _snapshot_dict(snap: Any) -> dict[str, Any]:
    d = MessageToDict(snap, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    d.pop("kernel_key", None)  # a secret: never printed
    d["size"] = int(d.get("size", 0))  # proto3 JSON writes 64-bit integers as strings
    for f in d.get("files", []):
        f["size"] = int(f["size"])
    return d


def _print_snapshots(snaps: list[Any]) -> None:
    from snapkernel.protocol.spec import format_bytes

    rows = [[s.id, "DAMAGED", "-", "-", "-", "-", "-"] if s.damaged else
            [s.id, s.kind, s.name or "-", s.sandbox_id, format_bytes(s.size),
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created)), s.notebook_path or "-"] for s in snaps]
    _print_table(rows, ["ID", "KIND", "NAME", "SANDBOX", "SIZE", "CREATED", "NOTEBOOK"])
    for s in snaps:
        if s.damaged:
            print(f"{s.id}: damaged: {s.damaged}")


def cmd_snapshots_create(args: argparse.Namespace) -> int:
    snap = _run(_with_client(lambda c: c.create_snapshot(args.sandbox, args.kind, args.name or "")))
    if args.json:
        print(json.dumps(_snapshot_dict(snap), indent=1))
    else:
        _print_snapshots([snap])
    return 0


def cmd_snapshots_list(args: argparse.Namespace) -> int:
    snaps = _run(_with_client(lambda c: c.list_snapshots(args.notebook or "")))
    if args.json:
        print(json.dumps([_snapshot_dict(s) for s in snaps], indent=1))
    else:
        _print_snapshots(snaps)
    return 0


def cmd_snapshots_show(args: argparse.Namespace) -> int:
    snap = _run(_with_client(lambda c: c.get_snapshot(args.id)))
    d = _snapshot_dict(snap)
    if args.json:
        print(json.dumps(d, indent=1))
    else:
        files = d.pop("files", [])
        for key, val in d.items():
            print(f"{key}: {val}")
        for f in files:
            print(f"  {f['name']}  {f['size']} bytes  sha256 {f['sha256']}")
    return 0


def cmd_snapshots_rm(args: argparse.Namespace) -> int:
    return _remove_each(args.ids, "delete_snapshot")


def cmd_resume(args: argparse.Namespace) -> int:
    """Start a kernel from a snapshot and keep it until interrupted; print how to connect to it."""
    import signal
    import tempfile
    from pathlib import Path

    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    from snapkernel.kernel_provisioner.kernelspec import kernel_json

    config: dict[str, Any] = {"restore_from": args.snapshot, **_spec_overrides(args)}
    with tempfile.TemporaryDirectory(prefix="snapkernel-resume-") as tmp:
        spec_dir = Path(tmp) / "kernels" / "snapkernel-resume"
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps(kernel_json(f"resumed {args.snapshot}", config)))
        km = KernelManager(kernel_name="snapkernel-resume",
                           kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(Path(tmp) / "kernels")]))
        km.start_kernel()
        try:
            sandbox = getattr(km.provisioner, "sandbox_id", "")
            if args.json:
                print(json.dumps({"id": sandbox, "snapshot": args.snapshot,
                                  "connection_file": km.connection_file}), flush=True)
            else:
                print(f"resumed {args.snapshot} in sandbox {sandbox}; connect with:\n"
                      f"  jupyter console --existing {km.connection_file}\n(Ctrl-C here stops it)", flush=True)
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            while not stop.wait(1.0) and km.is_alive():
                pass
        finally:
            km.shutdown_kernel(now=True)
    return 0


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from snapkernel.backend.cluster import local_cluster as lc
    from snapkernel.protocol.connection import default_state_dir

    state_dir = args.state_dir or str(default_state_dir() / "cluster")
    runtimes = [args.runtime] if args.runtime else lc.host_runtimes()
    nodes = [lc.NodeConfig(f"node-{i + 1}", args.cpus_per_node, args.memory_per_node, runtimes)
             for i in range(args.nodes)]
    print(f"starting a Ray head, {args.nodes} node(s) and the front in {state_dir} ...", file=sys.stderr)
    state = lc.up(lc.ClusterConfig(state_dir, nodes, [f"--runtime={args.runtime}"] if args.runtime else []))
    if args.json:
        print(json.dumps(state, indent=1))
        return 0
    print(f"cluster up: Ray at {state['address']}, nodes {', '.join(n['name'] for n in state['nodes'])}")
    print(f"  export SNAPKERNEL_BACKEND=unix://{state_dir}/backend.sock SNAPKERNEL_TOKEN=$(cat {state_dir}/token)")
    print(f"  stop it: snapkernel cluster down --state-dir {state_dir}")
    return 0


def cmd_cluster_down(args: argparse.Namespace) -> int:
    from pathlib import Path

    from snapkernel.backend.cluster import local_cluster as lc
    from snapkernel.protocol.connection import default_state_dir

    state_dir = Path(args.state_dir or default_state_dir() / "cluster").absolute()
    if not lc.down(state_dir):
        print(f"no cluster runs in {state_dir}", file=sys.stderr)
        return 1
    print(f"cluster in {state_dir} stopped")
    return 0


def cmd_cluster_resources(args: argparse.Namespace) -> int:
    from snapkernel.backend.cluster import local_cluster as lc

    print(json.dumps(lc.host_resources()))
    return 0


def cmd_kernels_install(args: argparse.Namespace) -> int:
    from snapkernel.kernel_provisioner import kernelspec

    models: dict[str, int] = {}
    if not args.no_gpu:
        try:
            status = _run(_with_client(lambda c: c.status()))
            for g in status.gpus:
                models[g.model] = models.get(g.model, 0) + 1
        except SnapkernelError as e:
            print(f"note: backend not reachable ({e}); installing the CPU kernel only", file=sys.stderr)
    done = kernelspec.install(models, user=args.user, prefix=args.prefix)
    if args.json:
        print(json.dumps([{"id": n, "path": p} for n, p in done], indent=1))
    else:
        for name, path in done:
            print(f"installed {name} in {path}")
    return 0


def cmd_kernels_list(args: argparse.Namespace) -> int:
    from snapkernel.kernel_provisioner import kernelspec

    specs = kernelspec.installed()
    if args.json:
        print(json.dumps(specs, indent=1))
    else:
        _print_table([[s["id"], s["display_name"], json.dumps(s["config"])] for s in specs],
                     ["NAME", "DISPLAY NAME", "CONFIG"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapkernel", description="Jupyter kernels in sandboxes that hibernate.")
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("lab", help="embedded backend + JupyterLab (extra arguments go to JupyterLab)",
                   add_help=False)
    sub.add_parser("backend", help="the backend daemon alone (`snapkernel backend --help-all`)", add_help=False)

    s = sub.add_parser("status", help="runtimes, GPUs, capacity, sandboxes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    sb = sub.add_parser("sandboxes", help="list, remove, hibernate or wake sandboxes").add_subparsers(
        dest="action", required=True)
    s = sb.add_parser("list", help="list sandboxes")
    s.add_argument("--all", action="store_true", help="include ended sandboxes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sandboxes_list)
    s = sb.add_parser("rm", help="stop and remove sandboxes")
    s.add_argument("ids", nargs="+", metavar="SANDBOX")
    s.set_defaults(func=cmd_sandboxes_rm)
    for name, func, what in (("hibernate", cmd_sandboxes_hibernate, "hibernate running kernels now"),
                             ("wake", cmd_sandboxes_wake, "wake hibernated kernels now")):
        s = sb.add_parser(name, help=what)
        s.add_argument("ids", nargs="+", metavar="SANDBOX")
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=func)
    s = sb.add_parser("move", help="move a running kernel to other resources, its variables intact")
    s.add_argument("id", metavar="SANDBOX")
    _resource_args(s, "another runtime (state move)")
    s.add_argument("--allow-cpu-fallback", action="store_true",
                   help="a GPU kernel moving to no GPU: put its GPU tensors in host memory")
    s.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                   help="how long to wait in line for a GPU (default: the backend's wake_timeout)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sandboxes_move)

    sn = sub.add_parser("snapshots", help="create, list, show or remove snapshots").add_subparsers(
        dest="action", required=True)
    s = sn.add_parser("create", help="snapshot a running sandbox (memory: live, gvisor)")
    s.add_argument("sandbox", metavar="SANDBOX")
    s.add_argument("--kind", choices=SNAPSHOT_KINDS, default=DEFAULT_SNAPSHOT_KIND)
    s.add_argument("--name", help="a name to find it by")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_snapshots_create)
    s = sn.add_parser("list", help="list snapshots, newest first")
    s.add_argument("--notebook", help="this notebook's snapshots first")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_snapshots_list)
    s = sn.add_parser("show", help="one snapshot, with its files and checksums")
    s.add_argument("id", metavar="SNAPSHOT")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_snapshots_show)
    s = sn.add_parser("rm", help="delete snapshots")
    s.add_argument("ids", nargs="+", metavar="SNAPSHOT")
    s.set_defaults(func=cmd_snapshots_rm)

    s = sub.add_parser("resume", help="start a kernel from a snapshot and keep it until Ctrl-C")
    s.add_argument("snapshot", metavar="SNAPSHOT")
    _resource_args(s, "for state snapshots: where to resume (a runtime `snapkernel status` lists)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_resume)

    c = sub.add_parser("cluster", help="a local Ray cluster of snapkernel nodes, and its front").add_subparsers(
        dest="action", required=True)
    s = c.add_parser("up", help="start a Ray head, N nodes and the front on this machine")
    s.add_argument("--nodes", type=int, default=2, metavar="N")
    s.add_argument("--state-dir", default="", metavar="DIR", help="default: cluster/ in the state dir")
    s.add_argument("--cpus-per-node", type=float, default=2.0, metavar="N")
    s.add_argument("--memory-per-node", default="4Gi", metavar="M")
    s.add_argument("--runtime", default="", help="the nodes' runtime (default: gvisor where runsc works)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_cluster_up)
    s = c.add_parser("down", help="stop the cluster and remove its sandboxes (snapshots stay)")
    s.add_argument("--state-dir", default="", metavar="DIR")
    s.set_defaults(func=cmd_cluster_down)
    s = c.add_parser("resources", help="this host's `ray start --resources` (its runtimes and GPU models)")
    s.set_defaults(func=cmd_cluster_resources)

    k = sub.add_parser("kernels", help="install or list kernelspecs").add_subparsers(dest="action", required=True)
    s = k.add_parser("install", help="install snapkernel-python and one kernel per GPU model")
    s.add_argument("--user", action="store_true", help="install for this user, not in sys.prefix")
    s.add_argument("--prefix", help="install under this prefix")
    s.add_argument("--no-gpu", action="store_true", help="do not ask the backend for GPU models")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_kernels_install)
    s = k.add_parser("list", help="list snapkernel kernelspecs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_kernels_list)
    return p


def _resource_args(s: argparse.ArgumentParser, runtime_help: str) -> None:
    s.add_argument("--gpu", help='GPUs: "H100", "H100:2", "any:1", or "" for none')
    s.add_argument("--cpu", type=float, help="cores, e.g. 2 or 0.5")
    s.add_argument("--memory", help='e.g. "8Gi"')
    s.add_argument("--disk", help='workspace quota, e.g. "20Gi"')
    s.add_argument("--runtime", help=runtime_help)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["backend"]:
        from snapkernel.backend.server import main as backend_main

        backend_main(argv[1:])
        return 0
    if argv[:1] == ["lab"]:
        from snapkernel.lab import main as lab_main

        return lab_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except SnapkernelError as e:
        print(f"snapkernel: error ({e.reason}): {e}", file=sys.stderr)  # the reason REST gives too
        return 2


if __name__ == "__main__":
    sys.exit(main())
