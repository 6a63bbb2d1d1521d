#!/usr/bin/env bash
# The one check to run on a GPU machine for impl="pallas" (docs/pallas.md), from the repo
# root, in a venv made by `make setup` plus a CUDA jax (pip install -U "jax[cuda12]"):
#
#   bash scripts/gpu_check.sh            # PY=path/to/python to use another interpreter
#
# Steps, each bounded by a timeout so that one hang cannot eat a short GPU lease; together
# at most 570 s, so that one run fits a 10-minute command with a rerun left in a 15-minute
# device budget:
#   1. tests/test_pallas.py: the kernel's numbers, compiled for the GPU (not interpret mode);
#   2. the whole test suite once (its failures are listed by name: -rfE);
#   3. python -m gru_jax.bench --quick on all four configs, forward and training, XLA vs
#      Pallas vs torch cuDNN vs flax, in float32 and then in bfloat16 (no T sweep/compile/
#      memory extras), reports written to gpu_check_out/bench_float32 and .../bench_bfloat16.
# Everything printed also goes to gpu_check_out/log.txt; the last lines are a summary with
# each step's exit status (0: passed; 124: timed out).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

"$PY" -c 'import jax; print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())'
if [ "$("$PY" -c 'import jax; print(jax.default_backend())')" != "gpu" ]; then
    echo "no GPU backend: install a CUDA jax in this venv first"
    exit 2
fi

declare -A status
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (timeout ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@"
    status[$name]=$?
    echo "=== $name: exit ${status[$name]} after $((SECONDS - start)) s"
}

# Two pytest workers share the one GPU: no preallocation of 75% of its memory by each.
step test_pallas 90 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest -q -p no:xdist -rfE tests/test_pallas.py
step suite 240 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest -q -n 4 -rfE tests
for dtype in float32 bfloat16; do
    step "bench_$dtype" 120 "$PY" -m gru_jax.bench --quick --no-extras --peers flax,torch,pallas \
        --dtype "$dtype" --out "$OUT/bench_$dtype"
done

echo
echo "=== summary (exit status per step; reports in $OUT/bench_*/results.md)"
for name in test_pallas suite bench_float32 bench_bfloat16; do
    echo "$name: ${status[$name]:-not run}"
done
