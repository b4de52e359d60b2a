#!/usr/bin/env bash
# The GPU checks of the project as one prepared run, for a session that is lent
# a GPU machine (see benchmarks/RESULTS.md, section 9).
#
# It needs no install: the package is imported from the checkout (PYTHONPATH),
# with the machine's own python3, torch, numpy, scipy, tqdm and pytest.
# array-api-compat (a required dependency) is not in the GPU image: carry its
# wheel in .whl/ and put it on PYTHONPATH before this script, e.g.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine (budget: timeout_s=560)
#   DEVICE=cpu bash benchmarks/gpu_session.sh --smoke   # dry run of every step on a CPU
#
# What it writes under $OUT (or benchmarks/results/gpu when OUT is unset), at
# most 8 files so that the device tool brings every one back:
#   gpu.txt               the card, driver and library versions
#   cuda_tests.log        the CUDA tests of the suite (pytest -k cuda)
#   gpufit.log + JSON     Gpufit's benchmark, 10^4 ... 10^7 fits, float32 and float64
#   batch.log + JSON + PNG  the 20,000-peak benchmark against a scipy loop (cost
#                         agreement), and fits/s and GPU memory vs batch size
set -u -o pipefail
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
SMOKE=0
# Each step has its own limit so that all three fit one 560 s device call.
T_TESTS=${T_TESTS:-140}
T_GPUFIT=${T_GPUFIT:-190}
T_BATCH=${T_BATCH:-210}
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" - <<'EOF'
import platform, numpy, scipy, torch
print("python", platform.python_version(), "| torch", torch.__version__,
      "| numpy", numpy.__version__, "| scipy", scipy.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 2**30:.1f} GiB,", p.multi_processor_count, "SMs")
else:
    print("device: no CUDA device visible")
EOF
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

rc=0
echo "== CUDA tests"
timeout "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -k cuda tests 2>&1 | tee "$OUT/cuda_tests.log" \
  || rc=1

echo "== Gpufit benchmark"
if [ "$SMOKE" = 1 ]; then gpufit_args=(--quick --scipy-subset 200); else gpufit_args=(); fi
timeout "$T_GPUFIT" "$PY" benchmarks/bench_gpufit.py --device "$DEVICE" --dtype both \
  --out-dir "$OUT" "${gpufit_args[@]}" 2>&1 | tee "$OUT/gpufit.log" || rc=1

echo "== 20,000-peak batch benchmark, and fits/s vs batch size up to 10^6"
if [ "$SMOKE" = 1 ]; then
  batch_args=(--quick --batch 2000 --scipy-subset 100 --repeat 1 --scaling-max 1000)
else
  batch_args=()
fi
timeout "$T_BATCH" "$PY" benchmarks/bench_batch.py --device "$DEVICE" --dtype float64 --no-chunk-sweep --scipy-repeat 1 \
  --out-dir "$OUT" --plot "$OUT/batch_scaling_gpu.png" "${batch_args[@]}" 2>&1 \
  | tee "$OUT/batch.log" || rc=1

ls -l "$OUT"
exit $rc
