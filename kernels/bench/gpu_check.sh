#!/usr/bin/env bash
# Prepared check for a lent CUDA GPU (under 8 minutes, installs nothing):
#   1. correctness gate: the Triton kernels against the PyTorch references on the device
#      (tests/kernels_triton_cases.py: forward and every gradient, fp32 to 1e-5, fp16/bf16);
#   2. only if the gate passes: `rlipv2 bench kernels` at 800x1333 in bf16, then in fp32.
# Usage, from anywhere: bash kernels/bench/gpu_check.sh   (results: $OUT, default benchmarks/results)
# PYTHON picks the interpreter (default: the tree's .venv if present, else python3).
# benchmarks/gpu/run_all.sh does all of this and more (dispatch table, tiles, training step).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$ROOT/benchmarks/results}"
source "$ROOT/kernels/bench/gpu_env.sh"
gpu_env_check
gpu_env_describe "$OUT/gpu_check_env.txt"

echo "== correctness gate"
gpu_env_gate 200
gate=$?
if [ "$gate" -ne 0 ]; then
  echo "correctness gate failed (status $gate): no benchmark run; see $OUT/kernels_gate.txt"
  exit 1
fi

status=0
for dtype in bf16 fp32; do
  echo "== benchmark $dtype"
  timeout 150 "$PY" -c "$BOOT
from rlipv2_scale.kernels.bench.microbench import write_report
write_report('cuda', '$dtype', '$OUT', reduced=False)" 2>&1 | tee "$OUT/kernels_bench_$dtype.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "benchmark $dtype failed (status $rc)"; status=1; }
done
exit $status
