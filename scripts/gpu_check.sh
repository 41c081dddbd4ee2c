#!/usr/bin/env bash
# Every GPU check and benchmark of the steering kernels in one run (< 6 minutes on an H100/H200), for a lent
# GPU machine that has torch, triton and pytest but no vLLM, no pydantic and no network, and only this
# repository's working tree (nothing installed):
#
#   0. wheels: pydantic (the table's spec parser) installed from .whl/ when it is there (see below)
#   1. imports: sae_steer and sae_steer.kernels resolve to this tree, and the table imports no vLLM
#   2. pytest tests/kernels on the GPU (real Triton launches, no interpreter)
#   3. the CUDA-graph capture of the whole steering path (tests/kernels/test_table_cuda_graph.py)
#   4. python benchmarks/gpu_decode.py: decode tokens/s of a Llama-3.1-8B-shaped loop with and without the op
#   5. python benchmarks/op_overhead.py: the op's cost per layer inside CUDA graphs, per case
#   6. python benchmarks/kernels.py --quick: the kernels against torch and the roofline
#
# Usage, from anywhere:   OUT=/some/dir scripts/gpu_check.sh      (OUT defaults to a fresh /tmp folder)
#   Results (named after the device) go to $RESULTS (default $OUT/results), the logs to $OUT, and
#   $RESULTS/gpu-check-<date>-<device>.txt summarises the run (steps, exit codes, test results).
#                         PYTHON=.venv/bin/python scripts/gpu_check.sh --cpu   (a local dry run of the logic:
#   the kernels in Triton's interpreter, the GPU-only tests skipped, gpu_decode.py --smoke, no GPU benchmark)
# The pydantic wheels for the GPU machine's Python 3.12 (made where pip works, carried with the run's tree):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# Every step runs under a time limit, all of them within BUDGET seconds (default 340), and the script goes on
# when one fails; $OUT/summary.txt lists each step's exit code and the script exits non-zero when any failed.
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/sae-steer-gpu-check.XXXXXX)}
RESULTS=${RESULTS:-$OUT/results}
BUDGET=${BUDGET:-340}
CPU=0
[ "${1:-}" = "--cpu" ] && CPU=1
mkdir -p "$OUT" "$RESULTS"
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
SITE=""
if [ "$CPU" = 0 ] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  SITE="$FARM/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$REPO"/.whl/*.whl \
    || echo "could not install the carried wheels: the table's tests and op_overhead.py need pydantic"
fi
export PYTHONPATH="$FARM:$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"  # $REPO for `tests.*` and `benchmarks`
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
if [ "$CPU" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi

: > "$OUT/summary.txt"
FAILED=0
START=$SECONDS
step() {  # step NAME SECONDS COMMAND...: run it with a time limit (and within the budget), log it, record its exit code
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 5 ]; then
    echo "$name skipped: the budget of ${BUDGET}s is spent" | tee -a "$OUT/summary.txt" "$OUT/gpu_check.log"
    FAILED=1
    return
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
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
step kernel_tests 150 "${PYTEST[@]}" tests/kernels --ignore=tests/kernels/test_table_cuda_graph.py
step cuda_graph 90 "${PYTEST[@]}" -v tests/kernels/test_table_cuda_graph.py
if [ "$CPU" = 0 ]; then
  step gpu_decode 170 "$PYTHON" -P benchmarks/gpu_decode.py --results "$RESULTS"
  step op_overhead 100 "$PYTHON" -P benchmarks/op_overhead.py --results "$RESULTS"
  step kernels_bench 80 "$PYTHON" -P benchmarks/kernels.py --quick --results "$RESULTS"
else
  step gpu_decode_smoke 120 "$PYTHON" -P benchmarks/gpu_decode.py --smoke
fi

DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
DEVICE=${DEVICE:-cpu}
REPORT="$RESULTS/gpu-check-$(date +%F)-$(echo "$DEVICE" | sed -E 's/[^A-Za-z0-9]+/-/g; s/^-|-$//g').txt"
{ echo "# scripts/gpu_check.sh$([ "$CPU" = 1 ] && echo " --cpu") on $DEVICE, $(date -u +%FT%TZ), $((SECONDS - START)) s"
  cat "$OUT/device.txt"
  echo; echo "## steps (exit code, seconds)"; cat "$OUT/summary.txt"
  for name in kernel_tests cuda_graph; do
    [ -f "$OUT/$name.log" ] && { echo; echo "## $name"; tail -n 15 "$OUT/$name.log"; }
  done
  for name in gpu_decode gpu_decode_smoke op_overhead kernels_bench; do
    [ -f "$OUT/$name.log" ] && { echo; echo "## $name"; grep -v "^USDT" "$OUT/$name.log" | tail -n 60; }
  done; } > "$REPORT"
echo "--- summary (also in $REPORT)"
cat "$OUT/summary.txt"
exit $FAILED
