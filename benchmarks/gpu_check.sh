#!/usr/bin/env bash
# One prepared call on a lent GPU machine, at most 8 minutes: environment, the CUDA correctness tests, then
# benchmarks/gpu.py (ceilings, Llama-8B layers, host time per call, decode steps) and its summary table.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]         # OUTDIR defaults to $OUT, else out/
#   DRY_RUN=1 bash benchmarks/gpu_check.sh DIR     # the same steps on the CPU: the tests only collected,
#                                                  # gpu.py --dry-run (tiny shapes, placeholder times)
#
# The machine runs its own python3 (its own torch and Triton), so qcompile is installed there from a wheel built
# on the development machine (`pip wheel --no-deps --no-build-isolation -w .whl .`) when .whl/ holds one, else
# from this checkout. Each step keeps going when the one before failed; logs and JSON go to OUTDIR.
# Time: install ~20 s, tests <= TEST_SECONDS (140), benchmark <= BENCH_BUDGET (240) + 60 s to finish the section
# it is in and write the table.
set -u
OUTDIR=${1:-${OUT:-out}}
mkdir -p "$OUTDIR"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
TEST_SECONDS=${TEST_SECONDS:-140}
BENCH_BUDGET=${BENCH_BUDGET:-240}
BENCH_RECIPES=${BENCH_RECIPES:-nvfp4_weight_only,int4_awq,fp8_dynamic,int8_dynamic}
WORKERS=${WORKERS:-8}  # test processes: compiling the kernels for every configuration is the slow part
TESTS=("$ROOT/tests/test_triton_cuda.py" "$ROOT/tests/test_triton_host.py" "$ROOT/tests/test_triton_kernels.py")

{
    date -u
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: no GPU used"
    else
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    fi
    "$PYTHON" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
} 2>&1 | tee "$OUTDIR/env.txt"

if [ "$DRY_RUN" != 1 ]; then  # a dry run uses the environment it is started in
    SITE=/tmp/qcompile-site
    if ls "$ROOT"/.whl/qcompile-*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/qcompile-*.whl
    else
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$SITE" "$ROOT"
    fi
    export PYTHONPATH=$SITE
fi
(cd /tmp && "$PYTHON" -c "import qcompile, qcompile.lowering.triton as t; print(qcompile.__file__, t.available())") 2>&1 | tee -a "$OUTDIR/env.txt"

if [ "$DRY_RUN" = 1 ]; then
    PYTEST_MODE=(--collect-only)
else
    XDIST=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n $WORKERS")
    PYTEST_MODE=($XDIST)
fi
# From outside the checkout, so that `import qcompile` finds the installed package, not the source folder.
(cd /tmp && timeout "$TEST_SECONDS" "$PYTHON" -m pytest -p no:cacheprovider -q -ra ${PYTEST_MODE[@]+"${PYTEST_MODE[@]}"} \
    --rootdir "$ROOT" -c "$ROOT/pyproject.toml" "${TESTS[@]}" -k "cuda or register" 2>&1) \
    > "$OUTDIR/gpu_tests.log"
TEST_STATUS=$?
tail -40 "$OUTDIR/gpu_tests.log"
SUMMARY=$(grep -E "(passed|failed|error|tests? collected|no tests ran)" "$OUTDIR/gpu_tests.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
[ "$TEST_STATUS" = 124 ] && SUMMARY="timed out after ${TEST_SECONDS} s: ${SUMMARY}"
[ -z "$SUMMARY" ] && SUMMARY="no summary (exit status $TEST_STATUS)"
[ "$DRY_RUN" = 1 ] && SUMMARY="dry run, collected only: $SUMMARY"

BENCH_ARGS=(--json "$OUTDIR/gpu_benchmark.json" --budget "$BENCH_BUDGET" --recipes "$BENCH_RECIPES" --tests "$SUMMARY")
[ "$DRY_RUN" = 1 ] && BENCH_ARGS+=(--dry-run)
(cd /tmp && timeout $((${BENCH_BUDGET%.*} + 60)) "$PYTHON" "$ROOT/benchmarks/gpu.py" "${BENCH_ARGS[@]}" 2>&1) \
    | tee "$OUTDIR/gpu_benchmark.log" | tail -75
