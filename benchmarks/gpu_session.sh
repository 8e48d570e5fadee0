#!/usr/bin/env bash
# The GPU machine's work, in stages that each fit one device call (< 10 min). Run from the repo root:
#   bash benchmarks/gpu_session.sh build-test     # build moekern._C (sm_90a), GPU tests, compute-sanitizer
#   bash benchmarks/gpu_session.sh bench-own      # moekern providers only (no vLLM needed) + EP kernels
#   bash benchmarks/gpu_session.sh bench-all      # after `source /tmp/gpuenv/env.sh`: vs vLLM and FlashInfer
#   bash benchmarks/gpu_session.sh e2e            # vLLM end-to-end A/B with the plugin
# Writes logs and results under ${OUT:-/tmp/moekern-out}.
set -uo pipefail
stage=${1:?stage}
OUT=${OUT:-/tmp/moekern-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}

build() {
  if python3 -c "import moekern._C, torch; assert torch.ops.moekern.has_device_kernels()" 2>/dev/null; then
    echo "moekern._C already built"; return 0
  fi
  MOEKERN_REQUIRE_EXTENSION=1 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -30
  python3 -c "import moekern._C, torch; print('device kernels:', torch.ops.moekern.has_device_kernels())"
}

case "$stage" in
  build-test)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    time build
    timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors --timeout 120 tests \
      2>&1 | tee "$OUT/gpu_tests.log" | tail -40
    timeout 100 compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/memcheck_smoke.py \
      2>&1 | tee "$OUT/memcheck.log" | tail -15
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
