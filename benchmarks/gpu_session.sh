#!/usr/bin/env bash
# The GPU machine's work, in stages that each fit one device call (< 10 min). From the repo root:
#   bash benchmarks/gpu_session.sh build-test   # build moekern._C (sm_90a), all GPU tests, compute-sanitizer
#   bash benchmarks/gpu_session.sh own          # no vLLM needed: EP kernels, diffusion bench, profiler
#   bash benchmarks/gpu_session.sh bench-all    # moekern vs vLLM vs FlashInfer (needs the gpuenv staged)
#   bash benchmarks/gpu_session.sh e2e-offline  # vLLM end-to-end A/B with the plugin, LLM.generate
#   bash benchmarks/gpu_session.sh e2e-serve    # the same through `vllm serve` + `vllm bench serve`
# Every stage first stages a carried gpuenv part if one is there (../shared/gpu-env: three calls carrying
# .gpuenv/tools + .gpuenv/N back to back), sources the env once complete, and installs .whl/ extras
# (benchmarks/gpuenv_extra.sh). Logs and results go under ${OUT:-/tmp/moekern-out}.
set -uo pipefail
stage=${1:?stage}
OUT=${OUT:-/tmp/moekern-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
export FLASHINFER_CUDA_ARCH_LIST=9.0a VLLM_USE_FLASHINFER_SAMPLER=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if [ -f .gpuenv/tools/stage.sh ]; then bash .gpuenv/tools/stage.sh || true; fi
if [ -f /tmp/gpuenv/env.sh ]; then
  # shellcheck disable=SC1091
  source /tmp/gpuenv/env.sh
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpuextra .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH=/tmp/gpuextra:$PYTHONPATH
  fi
fi

build() {
  if python3 -c "import torch, moekern._C; assert torch.ops.moekern.has_device_kernels()" 2>/dev/null; then
    echo "moekern._C already built"; return 0
  fi
  MOEKERN_REQUIRE_EXTENSION=1 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -30
  python3 -c "import torch, moekern._C; print('device kernels:', torch.ops.moekern.has_device_kernels())"
}

versions() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import importlib, torch, triton
print("torch", torch.__version__, "triton", triton.__version__)
for name in ("vllm", "flashinfer"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # report, don't fail: the stage says what it needs
        print(name, "not importable:", type(exc).__name__, exc)
PY
}

case "$stage" in
  build-test)
    versions
    time build
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors --timeout 120 tests \
      2>&1 | tee "$OUT/gpu_tests.log" | tail -40
    timeout 100 compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/memcheck_smoke.py \
      2>&1 | tee "$OUT/memcheck.log" | tail -15
    ;;
  own)
    versions; build
    timeout 150 python3 benchmarks/bench_ep.py --out "$OUT/ep" 2>&1 | tail -20
    timeout 240 python3 -m moekern.cli diffusion bench --model llada-moe-7b --backend moekern,torch \
      --gen-lengths 128 --steps 32,128 --batch-sizes 1,8 --tag llada-moe-7b_h100 --out "$OUT/diffusion" 2>&1 | tail -20
    timeout 120 python3 -m moekern.cli profile torch --model mixtral --tokens 256 --out "$OUT/profile" 2>&1 | tail -20
    ;;
  bench-all)
    versions; build
    timeout 560 python3 -m moekern.cli bench --no-progress --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -80
    ;;
  e2e-offline)
    versions; build
    timeout 570 python3 benchmarks/e2e/run_e2e.py --quick --mode offline --budget-s 540 --out "$OUT/e2e" 2>&1 \
      | tee "$OUT/e2e_offline.log" | tail -40
    ;;
  e2e-serve)
    versions; build
    timeout 570 python3 benchmarks/e2e/run_e2e.py --quick --mode serve --budget-s 540 --out "$OUT/e2e" 2>&1 \
      | tee "$OUT/e2e_serve.log" | tail -40
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
