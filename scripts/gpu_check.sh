#!/usr/bin/env bash
# The GPU checks of issue 10, for a lent GPU machine that has torch, triton and pytest but no vLLM and
# no network, and only this repository's working tree (nothing installed):
#
#   0. imports: sae_steer and sae_steer.kernels resolve to this tree, and the table imports no vLLM
#   1. pytest tests/kernels on the GPU (real Triton launches, no interpreter)
#   2. the CUDA-graph capture of the whole steering path (tests/kernels/test_table_cuda_graph.py)
#   3. python benchmarks/kernels.py --quick, results (named after the device) under $OUT/benchmarks-results
#   4. python benchmarks/op_overhead.py: the steering op's cost per layer inside a CUDA graph
#
# Usage, from anywhere:   OUT=/some/dir scripts/gpu_check.sh          (OUT defaults to a fresh /tmp folder)
#                         PYTHON=.venv/bin/python scripts/gpu_check.sh --cpu   (a local dry run of the logic:
#                         the kernels in Triton's interpreter, the GPU-only test skipped, no benchmark)
# Every step runs under a time limit and the script goes on when one fails; $OUT/summary.txt lists each
# step's exit code, $OUT/<step>.log its output, and the script exits non-zero when any step failed.
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/sae-steer-gpu-check.XXXXXX)}
CPU=0
[ "${1:-}" = "--cpu" ] && CPU=1
mkdir -p "$OUT"
cd "$REPO"

# pyproject maps the package sae_steer.kernels to kernels/ (and sae_steer.server to server/), which only
# an install sets up. Without one: a package folder of symlinks that has both, first on the path, and
# python -P so that the working directory (which holds the bare sae_steer/) is not put before it.
FARM=$(mktemp -d /tmp/sae-steer-path.XXXXXX)
trap 'rm -rf "$FARM"' EXIT
mkdir "$FARM/sae_steer"
for entry in "$REPO"/sae_steer/*; do ln -s "$entry" "$FARM/sae_steer/"; done
ln -s "$REPO/kernels" "$FARM/sae_steer/kernels"
ln -s "$REPO/server" "$FARM/sae_steer/server"
export PYTHONPATH="$FARM:$REPO${PYTHONPATH:+:$PYTHONPATH}"  # $REPO for `tests.*` and `benchmarks`; then carried wheels
export PYTHONDONTWRITEBYTECODE=1
if [ "$CPU" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi

: > "$OUT/summary.txt"
FAILED=0
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, record its exit code
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name: $*" | tee -a "$OUT/gpu_check.log"
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log" >> "$OUT/gpu_check.log") 2>&1
  local rc=$?
  wait  # the tee of the process substitution
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt" "$OUT/gpu_check.log"
  [ "$rc" = 0 ] || FAILED=1
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  git -C "$REPO" log -1 --oneline 2>/dev/null || echo "(not a git checkout)"; } > "$OUT/device.txt"
cat "$OUT/device.txt"

step imports 60 "$PYTHON" -P -c '
import sys, torch
import sae_steer, sae_steer.kernels
from sae_steer.registry import Registry
from sae_steer.tiny_model import random_sae
from sae_steer.vllm_plugin.table import SteeringTable
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("no triton:", e)
print("sae_steer from", sae_steer.__file__, "| kernels from", sae_steer.kernels.__file__)
assert "vllm" not in sys.modules, "importing the table imported vllm"
'

PYTEST=("$PYTHON" -P -m pytest -p no:cacheprovider -q -rs)
step kernel_tests 180 "${PYTEST[@]}" tests/kernels --ignore=tests/kernels/test_table_cuda_graph.py
step cuda_graph 90 "${PYTEST[@]}" -v tests/kernels/test_table_cuda_graph.py
if [ "$CPU" = 0 ]; then
  step benchmark 150 "$PYTHON" -P benchmarks/kernels.py --quick --results "$OUT/benchmarks-results"
  step op_overhead 120 "$PYTHON" -P benchmarks/op_overhead.py --results "$OUT/benchmarks-results"
fi

echo "--- summary (also in $OUT/summary.txt)"
cat "$OUT/summary.txt"
exit $FAILED
