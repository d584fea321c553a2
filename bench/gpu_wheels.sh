#!/usr/bin/env bash
# Run HERE, on a machine that reaches PyPI, before a device session: downloads into .whl/ (git-ignored) the
# wheels that the snapkernel stack needs on the GPU machine's Python 3.12 (its image has torch, cupy and pytest
# but not Jupyter's packages): the daemon, the kernel (ipykernel), the benches and the
# test fixtures (pytest-jupyter), at the versions constraints.txt pins. About 30 MB; a device run carries
# them with `carry: [".whl"]` and bench/gpu_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -c constraints.txt -d .whl \
  grpcio grpcio-health-checking protobuf jupyter_client ipykernel pyzmq traitlets cloudpickle nvidia-ml-py \
  "pytest-jupyter[server]" pytest-timeout
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/: carry \".whl\" in the device run"
