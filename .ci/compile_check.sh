#!/usr/bin/env bash
# Compile-check every csrc/**/*.cu without a GPU: nvcc for sm_80 and sm_90a, hipcc (ROCm) for gfx90a; and
# the torch-free host sources beside them (csrc/**/*.cpp but bindings.cpp, e.g. csrc/gatelog/format.cpp)
# with the host compiler as C++17 and without torch's headers, which keeps them torch-free. No torch install
# is needed. Exits non-zero if any compile fails and names each failing file and target.
#
#   .ci/compile_check.sh            # every toolchain; a missing one is a failure
#   NVCC=/path/nvcc HIPCC=/path/hipcc CXX=/path/c++ .ci/compile_check.sh
#   MOEKERN_SKIP_HIP=1 / MOEKERN_SKIP_NVCC=1 to leave one toolchain out (reported as skipped)
set -u
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
HIPCC="${HIPCC:-$(command -v hipcc || echo /opt/rocm/bin/hipcc)}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

CXX="${CXX:-$(command -v c++ || echo /usr/bin/c++)}"
mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "compile_check: no csrc/**/*.cu found" >&2
  exit 1
fi
mapfile -t HOST_SOURCES < <(find csrc -name '*.cpp' ! -path csrc/bindings.cpp | sort)

failures=()
check() {  # label, source, command...
  local label="$1" src="$2"
  shift 2
  local log="$OUT/$(echo "$src-$label" | tr '/' '_').log"
  if "$@" >"$log" 2>&1; then
    echo "ok    $label  $src"
  else
    echo "FAIL  $label  $src"
    sed 's/^/      /' "$log" | head -40
    failures+=("$label $src")
  fi
}

if [ "${#HOST_SOURCES[@]}" -ne 0 ]; then
  if [ ! -x "$CXX" ]; then
    echo "FAIL  host C++ compiler not found (set CXX=...)"
    failures+=("c++ missing")
  else
    for src in "${HOST_SOURCES[@]}"; do
      check "c++17" "$src" "$CXX" -std=c++17 -O2 -c -Icsrc -Wall -Wextra -Werror "$src" \
        -o "$OUT/$(basename "$src").o"
    done
  fi
fi

if [ "${MOEKERN_SKIP_NVCC:-0}" = "1" ]; then
  echo "skip  nvcc (MOEKERN_SKIP_NVCC=1)"
elif [ ! -x "$NVCC" ]; then
  echo "FAIL  nvcc not found (set NVCC=...)"
  failures+=("nvcc missing")
else
  "$NVCC" --version | tail -1
  for src in "${SOURCES[@]}"; do
    for arch in 80 90a; do
      check "nvcc:sm_$arch" "$src" "$NVCC" -std=c++17 -O2 -c -Icsrc -Xcompiler -Wall \
        -gencode "arch=compute_$arch,code=sm_$arch" "$src" -o "$OUT/$(basename "$src").sm_$arch.o"
    done
  done
fi

if [ "${MOEKERN_SKIP_HIP:-0}" = "1" ]; then
  echo "skip  hipcc (MOEKERN_SKIP_HIP=1)"
elif [ ! -x "$HIPCC" ]; then
  echo "FAIL  hipcc not found (set HIPCC=...)"
  failures+=("hipcc missing")
else
  "$HIPCC" --version 2>/dev/null | head -1
  for src in "${SOURCES[@]}"; do
    check "hipcc:gfx90a" "$src" env HIP_PLATFORM=amd "$HIPCC" --offload-arch=gfx90a -std=c++17 -O2 -c -Icsrc \
      -x hip "$src" -o "$OUT/$(basename "$src").gfx90a.o"
  done
fi

if [ "${#failures[@]}" -ne 0 ]; then
  echo "compile_check: ${#failures[@]} failure(s):"
  printf '  %s\n' "${failures[@]}"
  exit 1
fi
echo "compile_check: all ${#SOURCES[@]} device and ${#HOST_SOURCES[@]} host sources compiled for every target"
