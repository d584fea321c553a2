#!/usr/bin/env bash
# One shot, on a machine with an NVIDIA GPU (a lent device machine, or a GPU host): the GPU side of the
# tensor offload through staging buffers (issue 14 part 5). Done in under 8 minutes: the steps share a
# budget of BUDGET seconds (default 460), the most important first; a step that would not fit is skipped and
# says so.
#   1. a Python with torch that sees a GPU: $PYTHON, .venv/bin/python or python3; without one, torch is
#      installed into .venv with pip (where a package registry is reachable);
#   2. the offload's tests with torch alone (tests/snapshots/test_gpu_offload.py, test_staging.py);
#   3. bench/gpu_copy.py: capture bandwidth of GIB GiB (default 16) against the pinned device-to-host copy;
#   4. with the stack's packages (a `make install`ed .venv, or the wheels bench/gpu_wheels.sh downloads,
#      carried as .whl/): bench/hibernate.py --parts gpu, then the GPU hibernation tests.
# Logs and JSON go to $OUT (the device tool's folder) or bench/results/gpu_check/. Exit 0 when every step
# ran and passed.
#
#   here, once:  bench/gpu_wheels.sh                       (downloads .whl/, about 30 MB)
#   device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-460}
GIB=${GIB:-16}
OUTDIR=${OUT:-bench/results/gpu_check}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
summary=()
failed=0

say() { printf '\n=== %s  [%ss of %ss]\n' "$*" "$SECONDS" "$BUDGET"; }

step() {  # step NAME CAP COMMAND...: the command under a time cap (at most what the budget has left)
  local name=$1 t=$2 left=$((BUDGET - SECONDS)) rc
  shift 2
  ((left < t)) && t=$left
  if ((t < 30)); then
    summary+=("$name: SKIPPED, no time left in the ${BUDGET}s budget"); failed=1; return
  fi
  timeout -k 10 "$t" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  rc=${PIPESTATUS[0]}
  if ((rc == 0)); then summary+=("$name: ok")
  elif ((rc == 124 || rc == 137)); then summary+=("$name: STOPPED at its ${t}s cap (see $name.log)"); failed=1
  else summary+=("$name: FAILED, exit $rc (see $name.log)"); failed=1
  fi
}

has_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

say "the GPU and torch"
nvidia-smi -L 2>&1 || echo "nvidia-smi is not here"
PY=""
for cand in ${PYTHON:-} .venv/bin/python python3; do
  if command -v "$cand" >/dev/null && has_torch "$cand"; then PY=$cand; break; fi
done
if [[ -z $PY && -x .venv/bin/python ]]; then
  echo "no torch that sees a GPU: installing torch into .venv"
  timeout 240 .venv/bin/python -m pip install -q torch && has_torch .venv/bin/python && PY=.venv/bin/python
fi
if [[ -z $PY ]]; then
  echo "FAILED: no Python here has torch that sees a CUDA device, and torch could not be installed"
  exit 2
fi
"$PY" -c 'import os, sys, torch; print("python", sys.executable, "| torch", torch.__version__, "CUDA", torch.version.cuda,
"|", torch.cuda.get_device_name(0), "|", torch.get_num_threads(), "threads,", len(os.sched_getaffinity(0)), "cores")'
echo "kernel $(uname -r); transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo '?')"

say "offload tests, torch alone"
step tests-torch 120 env PYTHONPATH="$PWD" "$PY" -m pytest --noconftest -p no:cacheprovider -q -rs \
  tests/snapshots/test_gpu_offload.py tests/snapshots/test_staging.py

say "capture bandwidth: bench/gpu_copy.py --gib $GIB"
step gpu-copy 180 env PYTHONPATH="$PWD" "$PY" bench/gpu_copy.py --gib "$GIB" --out "$OUTDIR/gpu_copy.json"

say "the stack: bench/hibernate.py --parts gpu and the GPU hibernation tests"
export PYTHONPATH="$PWD"
if [[ -d .whl ]] && ! "$PY" -c 'import jupyter_client, ipykernel, pytest_jupyter' 2>/dev/null; then
  site=/tmp/snapkernel-site
  wheels=(.whl/*.whl)
  if "$PY" -m pytest --version >/dev/null 2>&1; then  # keep the image's pytest: its plugins are made for it
    wheels=($(printf '%s\n' "${wheels[@]}" | grep -v -E '/(pytest|pluggy|iniconfig)-[0-9]'))
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
  # snapkernel from this checkout, with its entry points (the provisioner, the runtimes), uninstalled.
  mkdir -p "$site/snapkernel-0.1.0.dist-info"
  printf 'Metadata-Version: 2.1\nName: snapkernel\nVersion: 0.1.0\n' >"$site/snapkernel-0.1.0.dist-info/METADATA"
  cat >"$site/snapkernel-0.1.0.dist-info/entry_points.txt" <<'EOT'
[console_scripts]
snapkernel = snapkernel.cli:main

[jupyter_client.kernel_provisioners]
snapkernel = snapkernel.kernel_provisioner:SnapKernelProvisioner

[snapkernel.runtimes]
process = snapkernel.backend.runtimes.process:ProcessRuntime
gvisor = snapkernel.backend.runtimes.gvisor:GvisorRuntime
EOT
  export PYTHONPATH="$PWD:$site"
fi
if "$PY" -c 'import snapkernel.backend.server, snapkernel.kernel_provisioner, jupyter_client, ipykernel, pytest_jupyter' \
    2>"$OUTDIR/stack-import.log"; then
  step hibernate 220 "$PY" bench/hibernate.py --parts gpu --gpu-gib "$GIB" --no-before --out "$OUTDIR/hibernate.json"
  step tests-stack 150 "$PY" -m pytest -p no:cacheprovider -q -rs tests/snapshots/test_gpu_offload.py \
    tests/backend/test_hibernation.py -k "gpu or offload or backends_cells"
else
  tail -1 "$OUTDIR/stack-import.log"
  summary+=("the stack: SKIPPED, its packages are not here: run bench/gpu_wheels.sh on a machine with PyPI and carry .whl")
  failed=1
fi

say "summary"
if [[ -s $OUTDIR/gpu_copy.json ]]; then
  "$PY" -c 'import json, sys; sys.path.insert(0, "bench"); import gpu_copy; print(gpu_copy.table(json.load(open(sys.argv[1]))))' \
    "$OUTDIR/gpu_copy.json"
fi
[[ -s $OUTDIR/hibernate.log ]] && sed -n '/^   path/,/^wrote/p' "$OUTDIR/hibernate.log"
printf '%s\n' "${summary[@]}"
exit $failed
