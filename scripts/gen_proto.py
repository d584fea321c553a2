"""Generate snapkernel/protocol/v1 from protos/ (run by `make proto`; CI checks the result is current)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "snapkernel" / "protocol" / "v1"


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    proto = ROOT / "protos" / "snapkernel" / "v1" / "backend.proto"
    tmp = out / "_gen"
    tmp.mkdir(exist_ok=True)
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        f"--python_out={tmp}",
        f"--grpc_python_out={tmp}",
        f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
        f"--mypy_out={tmp}",
        f"--plugin=protoc-gen-mypy_grpc={Path(sys.executable).parent / 'protoc-gen-mypy_grpc'}",
        f"--mypy_grpc_out={tmp}",
        str(proto),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    for f in (tmp / "snapkernel" / "v1").iterdir():
        text = f.read_text()
        # protoc emits absolute imports from the proto package; make them package-relative.
        text = re.sub(r"^from snapkernel\.v1 import", "from . import", text, flags=re.M)
        (out / f.name).write_text(text)
    for f in sorted(tmp.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    tmp.rmdir()
    (out / "__init__.py").write_text('"""Generated from protos/snapkernel/v1/backend.proto; do not edit."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
