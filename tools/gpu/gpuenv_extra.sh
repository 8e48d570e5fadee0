#!/usr/bin/env bash
# Wheels that ../shared/gpu-env's pack lacks for vLLM 0.26.0 to import on the GPU machine: its packed
# `openai` imports httpx2 (which needs httpcore2 and truststore). Run here, in the repo root, once:
#   bash tools/gpu/gpuenv_extra.sh          # writes .whl/ (git-ignored; carry it: carry [".whl", ...])
# gpu_session.sh installs whatever is in .whl/ into /tmp/gpuextra before the vLLM stages.
set -euo pipefail

# ignored_dir DIR: DIR exists and git ignores it (an untracked file would travel in every device call)
ignored_dir() {
  mkdir -p "$1"
  grep -qx "/$1/" .git/info/exclude 2>/dev/null || echo "/$1/" >> .git/info/exclude
}

# fetch DIR PKG==VER...: wheels for the GPU machine's CPython 3.12 / manylinux x86_64, into DIR (git-ignored)
fetch() {
  local dir=$1; shift
  ignored_dir "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}

fetch .whl httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
ls .whl

# FlashInfer alone (flashinfer-python + apache-tvm-ffi, ~17 MiB; the rest of its imports are on the image), for
# carrying in the FIRST call next to gpuenv part 1: gpu_session.sh installs it to /tmp/fiearly and `fi-warmup`
# can start FlashInfer's CUTLASS MoE nvcc build (tens of minutes) before the full gpuenv is staged. Every later
# stage imports flashinfer from /tmp/fiearly, so the build's source paths (and its cache) stay the same.
# With .fiwhl carried in call 1 the parts must be smaller: GPUENV_PART_MB=30 bash ../shared/gpu-env/pack.sh .gpuenv
# pack.sh's wheel cache already holds both (pip download finds them there too, but only with an index to ask).
ignored_dir .fiwhl
cache=${MOEKERN_GPUENV_WHEELS:-$HOME/.cache/moekern-gpuenv/wheels-py3.12}
cp "$cache"/flashinfer_python-0.6.14-*.whl "$cache"/apache_tvm_ffi-0.1.10-*.whl .fiwhl/ 2>/dev/null || true
if ! ls .fiwhl/flashinfer_python-*.whl .fiwhl/apache_tvm_ffi-*.whl >/dev/null 2>&1; then
  fetch .fiwhl flashinfer-python==0.6.14 apache-tvm-ffi==0.1.10
fi
ls .fiwhl
