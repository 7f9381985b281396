#!/usr/bin/env bash
# The one GPU check a lent H100 runs (under 8 minutes): the GPU tests, then short tuning runs
# with a table of Triton against cuBLAS/cuDNN. Results go under $OUT (default ./results/).
#
#   bash benchmarks/gpu_check.sh                 # from the project root, carry ".whl"
#   GPU_CHECK_TESTS=tests/test_triton_conv.py GPU_CHECK_TOTAL_S=300 \
#     bash benchmarks/gpu_check.sh --only 'bwd_weight'   # a rerun of what a fix touched
#
# The GPU image has torch and triton but not Optuna (nor pytest): wheels in .whl/ (made by
# /work/shared/tools/device-wheels.sh, add "pytest iniconfig pluggy" to its arguments for the
# tests) are installed into /tmp/site first. On a machine without CUDA it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/results}
mkdir -p "$OUT"
export OUT
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python

if ls .whl/*.whl >/dev/null 2>&1; then
  # --no-deps: the wheels are exactly what the image lacks; --target keeps the image untouched.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || echo "gpu_check: installing .whl/ failed; going on"
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU here; skipping GPU tests and tuning runs."
  "$PY" benchmarks/gpu_check.py "$@"
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if "$PY" -c "import pytest" 2>/dev/null; then
  # The Triton tests in full on CUDA (no interpreter), then every other test marked gpu.
  # Output goes to a file; only the summary is printed, so the table below stays visible.
  # Most of their time is Triton compiling one config per test on the CPU: pytest-xdist (on the
  # GPU image) spreads that over the machine's cores.
  parallel=()
  "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)
  timeout 200 "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark "${parallel[@]}" --durations=10 \
    ${GPU_CHECK_TESTS:-tests/test_triton_gemm.py tests/test_triton_conv.py} >"$OUT/pytest_triton.txt" 2>&1
  echo "pytest triton (cuda): exit $? -- $(tail -n 1 "$OUT/pytest_triton.txt")"
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests \
    --ignore=tests/test_triton_gemm.py --ignore=tests/test_triton_conv.py >"$OUT/pytest_gpu.txt" 2>&1
  echo "pytest -m gpu (others): exit $? -- $(tail -n 1 "$OUT/pytest_gpu.txt")"
  grep -E "^(FAILED|ERROR)" "$OUT"/pytest_*.txt | head -20
else
  echo "gpu_check: pytest is not installed here; skipping the tests (see this script's header)."
fi

# The tuning runs get what is left of the 8 minutes (480 s), less a margin for the worker's
# start, the final re-timing of each shape's finalists and writing the report.
budget=$(( ${GPU_CHECK_TOTAL_S:-480} - SECONDS - 70 ))
(( budget < 60 )) && budget=60
echo "tuning budget: ${budget} s"
# Every shape's default and seed configs are compiled first, in all but two of the machine's
# cores (GPU_CHECK_PREWARM=0 turns it off, e.g. to compare with a run without it).
cores=$(nproc)
prewarm=${GPU_CHECK_PREWARM:-$(( cores > 3 ? cores - 2 : 0 ))}
timeout $(( budget + 60 )) "$PY" benchmarks/gpu_check.py --budget-s "$budget" --prewarm "$prewarm" "$@"
echo "gpu_check.py: exit $?"
