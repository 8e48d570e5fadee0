#!/usr/bin/env bash
# Build FlashInfer 0.6.14's CUTLASS fused-MoE module for Hopper (fused_moe_90.so, sm_90a) on THIS machine, with
# no GPU, so that the GPU machine loads it ahead of time instead of JIT-compiling it there: that build (~180
# CUTLASS translation units) outlasts a whole device session (> 15 min on 16 cores, unfinished).
# Needs nvcc 13.0 (the GPU machine's), ninja, and a Python with torch and filelock (PYTHON=..., e.g. the CI
# venv); fetches the cuBLAS/cuRAND/NVRTC 13.0 headers that a compiler-only CUDA install lacks.
# From the repo root (resumable: ninja keeps finished objects; ~100 s of one core per translation unit):
#   bash tools/gpu/flashinfer_aot.sh [WORKDIR]     # default WORKDIR ~/.cache/moekern-fi
# Writes .fiaot/ (git-ignored): fused_moe_90.so.gz split into parts of FIAOT_PART_MB (default 24) MiB and a
# manifest. Carry .fiaot (or its parts over several calls: .fiaot/manifest plus .fiaot/part.N) to the GPU
# machine; gpu_session.sh installs it into FlashInfer's AOT directory (flashinfer/data/aot/fused_moe_90/).
set -euo pipefail
work=$(mkdir -p "${1:-$HOME/.cache/moekern-fi}" && cd "${1:-$HOME/.cache/moekern-fi}" && pwd)
repo=$(pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
"$CUDA_HOME/bin/nvcc" --version | grep -q "release 13.0" || { echo "need nvcc 13.0 at $CUDA_HOME" >&2; exit 1; }
command -v ninja >/dev/null || { echo "need ninja" >&2; exit 1; }

# 1. FlashInfer and apache-tvm-ffi, unpacked (the same wheels gpu_session.sh installs on the GPU machine)
if ! ls .fiwhl/flashinfer_python-0.6.14-*.whl >/dev/null 2>&1; then bash tools/gpu/gpuenv_extra.sh; fi
if [ ! -f "$work/src/flashinfer/jit/fused_moe.py" ]; then
  mkdir -p "$work/src"
  for w in .fiwhl/flashinfer_python-0.6.14-*.whl .fiwhl/apache_tvm_ffi-*.whl; do unzip -q -o "$w" -d "$work/src"; done
fi

# 2. cuBLASLt, cuRAND and NVRTC headers of CUDA 13.0 (+ libnvrtc to link against), as the GPU machine has them
cx=$work/cuda13
if [ ! -f "$cx/nvidia/cu13/include/cublasLt.h" ] || [ ! -f "$cx/nvidia/cu13/include/curand_kernel.h" ] \
    || [ ! -f "$cx/nvidia/cu13/lib/libnvrtc.so" ]; then
  mkdir -p "$cx/wheels"
  python3 -m pip download -q --no-deps -d "$cx/wheels" "nvidia-cublas==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-curand==10.4.0.*" 2>&1 | grep -v "^WARNING: Location" || true
  # headers of all three; of the libraries only NVRTC's (linked, -lnvrtc)
  for w in "$cx"/wheels/*.whl; do unzip -q -o "$w" 'nvidia/cu13/include/*' -d "$cx"; done
  unzip -q -o "$cx"/wheels/nvidia_cuda_nvrtc-*.whl 'nvidia/cu13/lib/*' -d "$cx"
  rm -rf "$cx/wheels"
  ln -sf libnvrtc.so.13 "$cx/nvidia/cu13/lib/libnvrtc.so"
fi

# The link step takes -lcuda; a CPU machine has no driver library. An empty libcuda.so with the driver's soname
# satisfies the linker (the .so then names libcuda.so.1, which the GPU machine's driver provides at load time).
if ! ls "$CUDA_HOME"/lib64/stubs/libcuda.so "$CUDA_HOME"/lib64/libcuda.so >/dev/null 2>&1 \
    && [ ! -f "$cx/nvidia/cu13/lib/libcuda.so" ]; then
  echo | cc -x c -shared -Wl,-soname,libcuda.so.1 -o "$cx/nvidia/cu13/lib/libcuda.so" -
fi

# 3. FlashInfer's own build.ninja for the module, then ninja
export FLASHINFER_WORKSPACE_BASE=$work/ws
export FLASHINFER_EXTRA_CUDAFLAGS="-isystem $cx/nvidia/cu13/include"
export FLASHINFER_EXTRA_CFLAGS="-isystem $cx/nvidia/cu13/include"
export FLASHINFER_EXTRA_LDFLAGS="-L$cx/nvidia/cu13/lib"
ninja_file=$("${PYTHON:-python3}" "$repo/tools/gpu/flashinfer_aot_ninja.py" "$work/src" | tail -1)
build_dir=$(dirname "$ninja_file")
echo "flashinfer_aot: $(grep -c '^build ' "$ninja_file") build steps in $build_dir; log $work/build.log"
(cd "$build_dir" && nice -n "${FIAOT_NICE:-10}" ninja -k 0 -f "$ninja_file" -j "${MAX_JOBS:-$(nproc)}") 2>&1 \
  | tee "$work/build.log" | grep -E "^\[[0-9]+/[0-9]+\]|FAILED|error" | cut -c1-160
so=$build_dir/fused_moe_90.so
[ -f "$so" ] || { echo "flashinfer_aot: no $so (see $work/build.log)" >&2; exit 1; }

# 4. .fiaot/: gzip'd .so in parts that fit next to a gpuenv part in one device call
FIAOT_BUILT="$(date -u +%F) nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'V[0-9][0-9.]*' | tail -1) flashinfer 0.6.14 sm_90a" \
  bash "$repo/tools/gpu/fiaot.sh" pack "$so"
