#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests of the Triton lowering, then benchmarks/gpu.py.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]          # OUTDIR defaults to $OUT, else out/
#
# The machine runs its own python3 (its own torch and Triton), so qcompile is installed there from a wheel built
# on the development machine (`pip wheel --no-deps --no-build-isolation -w .whl .`) when .whl/ holds one, else
# from this checkout. Each step keeps going when the one before failed, and logs go to OUTDIR.
set -u
OUTDIR=${1:-${OUT:-out}}
mkdir -p "$OUTDIR"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1
TEST_SECONDS=${TEST_SECONDS:-150}
BENCH_BUDGET=${BENCH_BUDGET:-200}
BENCH_RECIPES=${BENCH_RECIPES:-nvfp4_weight_only,int4_awq,fp8_dynamic,int8_dynamic}
WORKERS=${WORKERS:-8}  # test processes: compiling the kernels for every configuration is the slow part

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUTDIR/env.txt"

SITE=/tmp/qcompile-site
if ls "$ROOT"/.whl/qcompile-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/qcompile-*.whl
else
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$SITE" "$ROOT"
fi
export PYTHONPATH=$SITE
(cd /tmp && python3 -c "import qcompile, qcompile.lowering.triton as t; print(qcompile.__file__, t.available())") 2>&1 | tee -a "$OUTDIR/env.txt"

XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n $WORKERS")
# From outside the checkout, so that `import qcompile` finds the installed package, not the source folder.
(cd /tmp && timeout "$TEST_SECONDS" python3 -m pytest -p no:cacheprovider -q -ra $XDIST --rootdir "$ROOT" \
    -c "$ROOT/pyproject.toml" "$ROOT/tests/test_triton_kernels.py" -k "cuda or register" 2>&1) \
    | tee "$OUTDIR/gpu_tests.log" | tail -40

timeout $((${BENCH_BUDGET%.*} + 130)) python3 "$ROOT/benchmarks/gpu.py" --json "$OUTDIR/gpu_benchmark.json" \
    --budget "$BENCH_BUDGET" --recipes "$BENCH_RECIPES" 2>&1 | tee "$OUTDIR/gpu_benchmark.log" | tail -60
