#!/usr/bin/env bash
# Everything issue #18 ("GPU speed") measures, in one run on a lent CUDA GPU, inside 8 minutes,
# installing nothing (torch + triton suffice for the kernel parts; the training step also needs
# transformers, timm, tokenizers and scipy, and reports a config it cannot build as an error):
#   1. correctness gate: the Triton kernels (both ms_deform_attn backwards, the fused ALIF block)
#      against the PyTorch references on the device, fp64 / fp32 to 1e-5 / fp16 / bf16;
#   2. only if it passes: the kernel benchmark at 800x1333 in bf16, then fp32 (eager, SDPA,
#      Triton and xformers ALIF rows; both MSDA backwards), each merging its fastest accurate
#      paths into $OUT/dispatch_table.json (a copy of kernels/dispatch_table.json);
#   3. the dense MSDA backward's settings (largest dense level, tile) timed at the encoder shape;
#   4. benchmarks/gpu_step.py: r50 and swin_l training steps, kernels (bf16, with the new table)
#      against the PyTorch references (fp32), and ALIF over all levels;
#   5. a summary (card, driver, versions, commit; each figure next to its target): $OUT/summary.md,
#      printed last.
# Usage: OUT=DIR bash benchmarks/gpu/run_all.sh   (default OUT: benchmarks/results/gpu/run_all)
# To keep the measured dispatch choices: copy $OUT/dispatch_table.json to kernels/ and commit it.
set -uo pipefail

# Time budget, seconds per part (the sum stays within 480; a part that overruns is killed and
# the summary names what is missing). T_STEP_BUDGET is gpu_step.py's own budget, leaving it
# time to start, build the models and write its report inside T_STEP.
T_ENV=15 T_GATE=100 T_BENCH=100 T_TILES=30 T_STEP=125 T_STEP_BUDGET=100 T_SUMMARY=10
TOTAL=$((T_ENV + T_GATE + 2 * T_BENCH + T_TILES + T_STEP + T_SUMMARY))

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$ROOT/benchmarks/results/gpu/run_all}"
source "$ROOT/kernels/bench/gpu_env.sh"
gpu_env_check
echo "== run_all: budget ${TOTAL} s; results in $OUT"
gpu_env_describe "$OUT/env.txt"   # bounded inside by T_ENV

summary() {
  echo "== summary"
  timeout "$T_SUMMARY" "$PY" -c "$BOOT; sys.argv = ['gpu_summary', '$OUT']
runpy.run_module('rlipv2_scale.kernels.bench.gpu_summary', run_name='__main__')"
}

echo "== 1. correctness gate (${T_GATE} s)"
gpu_env_gate "$T_GATE"
gate=$?
if [ "$gate" -ne 0 ]; then
  echo "correctness gate failed (status $gate): nothing timed; see $OUT/kernels_gate.txt"
  summary
  exit 1
fi

status=0
cp "$ROOT/kernels/dispatch_table.json" "$OUT/dispatch_table.json"
for dtype in bf16 fp32; do
  echo "== 2. kernel benchmark $dtype (${T_BENCH} s)"
  timeout "$T_BENCH" "$PY" -c "$BOOT
from rlipv2_scale.kernels.bench.microbench import write_report
write_report('cuda', '$dtype', '$OUT', reduced=False, table_path='$OUT/dispatch_table.json')" \
    2>&1 | tee "$OUT/kernels_bench_$dtype.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "benchmark $dtype failed (status $rc)"; status=1; }
done
# what "auto" picks from here on (the training step): the table just measured
export RLIPV2_DISPATCH_TABLE="$OUT/dispatch_table.json"

echo "== 3. dense MSDA backward settings (${T_TILES} s)"
timeout "$T_TILES" "$PY" -c "$BOOT; sys.argv = ['msda_tiles', '--dense-only', '--out', '$OUT']
runpy.run_module('rlipv2_scale.kernels.bench.msda_tiles', run_name='__main__')" 2>&1 | tee "$OUT/msda_tiles.txt"
[ "${PIPESTATUS[0]}" -ne 0 ] && { echo "dense MSDA settings failed"; status=1; }

echo "== 4. training step (${T_STEP} s)"
timeout "$T_STEP" "$PY" "$ROOT/benchmarks/gpu_step.py" --device cuda --configs r50,swin_l --max-batch 16 \
  --budget-s "$T_STEP_BUDGET" --out "$OUT" 2>&1 | tee "$OUT/gpu_step.txt"
[ "${PIPESTATUS[0]}" -ne 0 ] && { echo "training step failed or ran out of time"; status=1; }

summary
exit $status
