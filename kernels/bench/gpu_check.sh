#!/usr/bin/env bash
# Prepared check for a lent CUDA GPU (under 8 minutes, installs nothing):
#   1. correctness gate: the Triton kernels against the PyTorch references on the device
#      (tests/kernels_triton_cases.py: forward and every gradient, fp32 to 1e-5, fp16/bf16);
#   2. only if the gate passes: `rlipv2 bench kernels` at 800x1333 in bf16, then in fp32.
# Usage, from anywhere: bash kernels/bench/gpu_check.sh   (results: $OUT, default benchmarks/results)
# PYTHON picks the interpreter (default: the tree's .venv if present, else python3).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3
fi
cd "$ROOT"

# Import the package from this tree even where it is not pip-installed: setup.py maps the
# top-level kernels/ folder to rlipv2_scale.kernels, so the root joins the package's search path.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BOOT="import sys, rlipv2_scale; rlipv2_scale.__path__.append('$ROOT')"

if ! "$PY" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: needs torch and triton with a visible CUDA device (PYTHON=$PY)" >&2
  exit 1
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "commit unknown"
} > "$OUT/gpu_check_env.txt" 2>&1
cat "$OUT/gpu_check_env.txt"

echo "== correctness gate"
timeout 200 "$PY" -c "$BOOT; import pytest; sys.exit(pytest.main(['tests/kernels_triton_cases.py', '-q', '-x',
    '-p', 'no:cacheprovider', '-o', 'addopts=', '--junitxml=$OUT/kernels_gate.xml']))" 2>&1 | tee "$OUT/kernels_gate.txt"
gate=${PIPESTATUS[0]}
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
