# Sourced by the GPU scripts (gpu_check.sh, benchmarks/gpu/run_all.sh): the interpreter, the
# package imported from this tree, and the machine's description. Expects ROOT and OUT set.
# PYTHON picks the interpreter (default: the tree's .venv if present, else python3).
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3
fi
mkdir -p "$OUT"
cd "$ROOT"

# Import the package from this tree even where it is not pip-installed: setup.py maps the
# top-level kernels/ folder to rlipv2_scale.kernels, so the root joins the package's search path.
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BOOT="import sys, runpy, rlipv2_scale; rlipv2_scale.__path__.append('$ROOT')"

gpu_env_check() {
  if ! "$PY" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "$(basename "$0"): needs torch and triton with a visible CUDA device (PYTHON=$PY)" >&2
    exit 1
  fi
}

# card, driver, versions and commit into $1 (and on stdout); at most 15 s
gpu_env_describe() {
  {
    date -u
    timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    timeout 10 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "commit unknown"
  } > "$1" 2>&1
  cat "$1"
}

# the Triton kernels against the references on the device (forward, every gradient, fp32 to 1e-5)
gpu_env_gate() {  # $1: timeout in seconds
  timeout "$1" "$PY" -c "$BOOT; import pytest; sys.exit(pytest.main(['tests/kernels_triton_cases.py', '-q', '-x',
      '-p', 'no:cacheprovider', '-o', 'addopts=', '--junitxml=$OUT/kernels_gate.xml']))" 2>&1 | tee "$OUT/kernels_gate.txt"
  return "${PIPESTATUS[0]}"
}
