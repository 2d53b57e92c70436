#!/usr/bin/env bash
# On a CUDA machine: build engine._C for sm_90, run the CUDA test cases and compute-sanitizer.
# Logs (and the built extension, so later runs can skip the build) go to $OUT (default /tmp/gpu-out).
#
#   bash bench/gpu/checks.sh            # build, tests, sanitizer
#   SKIP_BUILD=1 bash bench/gpu/checks.sh   # engine/_C*.so already in place
#   SKIP_BENCH=1, SKIP_SANITIZER=1, SANITIZER_TOOLS="memcheck initcheck", PYTEST_EXTRA=...: parts of it
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
nvcc --version | tail -2 | tee -a "$OUT/device.txt"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  start=$(date +%s)
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
  cp engine/_C*.so "$OUT/"
fi
python3 -c "from engine import ops; print('cuda kernels:', [op for op in ('rms_norm', 'decode_attention',
  'prefill_attention', 'rope_append', 'value_norm', 'select_victim', 'compact', 'merge_value') if ops.has_kernel(op, 'cuda')])" 2>&1 \
  | tee -a "$OUT/device.txt"

start=$(date +%s)
# test_model_through_ops_equals_reference needs the real default model, which cannot be fetched offline
python3 -m pytest -q -p no:cacheprovider -n 16 --maxfail=30 tests/test_ops.py tests/test_ops_cuda.py tests/test_graphs.py \
  --deselect tests/test_ops.py::test_model_through_ops_equals_reference ${PYTEST_EXTRA:-} \
  >"$OUT/pytest.log" 2>&1 || status=1
echo "pytest: $(( $(date +%s) - start )) s"; tail -25 "$OUT/pytest.log"

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  start=$(date +%s)
  PYTHONUNBUFFERED=1 python3 -m engine.bench gpu --steps 48 >"$OUT/bench.log" 2>&1 || status=1
  PYTHONUNBUFFERED=1 python3 -m engine.bench gpu --preset smollm2-135m --contexts 512 4096 \
    --policies full,h2o,weightedkv --budgets 1024 --steps 48 >>"$OUT/bench.log" 2>&1 || status=1
  cp bench/results/gpu-decode-*.json "$OUT/" 2>/dev/null
  echo "bench: $(( $(date +%s) - start )) s"; cat "$OUT/bench.log" | grep -v Warning | tail -40
fi

if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  start=$(date +%s)
  bash tests/run_cuda_sanitizer.sh ${SANITIZER_TOOLS:-} >"$OUT/sanitizer.log" 2>&1 || status=1
  echo "sanitizer: $(( $(date +%s) - start )) s"; grep -E "^==|ERROR SUMMARY|no errors|Error" "$OUT/sanitizer.log" | head -30
fi
exit $status
