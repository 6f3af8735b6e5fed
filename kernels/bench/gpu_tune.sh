#!/usr/bin/env bash
# Tile search on a lent CUDA GPU (about 5 minutes, installs nothing): the correctness gate first,
# then every ALIF tile candidate timed at both ALIF shapes,
# then the MSDA tiles and the bf16 accuracy of both MSDA paths against fp64.
# Usage: OUT=DIR bash kernels/bench/gpu_tune.sh   (results under $OUT, default benchmarks/results/gpu)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$ROOT/benchmarks/results/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BOOT="import sys, runpy, rlipv2_scale; rlipv2_scale.__path__.append('$ROOT')"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
echo "== correctness gate"
timeout 150 "$PY" -c "$BOOT; import pytest; sys.exit(pytest.main(['tests/kernels_triton_cases.py', '-q', '-x',
    '-p', 'no:cacheprovider', '-o', 'addopts=']))" || { echo "gate failed: no timing"; exit 1; }
echo "== ALIF tiles"
timeout 300 "$PY" -c "$BOOT; sys.argv = ['alif_tiles', '--bits', '${BITS:-16}', '--out', '$OUT']
runpy.run_module('rlipv2_scale.kernels.bench.alif_tiles', run_name='__main__')"
echo "== MSDA tiles"
timeout 90 "$PY" -c "$BOOT; sys.argv = ['msda_tiles', '--out', '$OUT']
runpy.run_module('rlipv2_scale.kernels.bench.msda_tiles', run_name='__main__')"
