#!/usr/bin/env bash
# Wheels that ../shared/gpu-env's pack lacks for vLLM 0.26.0 to import on the GPU machine: its packed
# `openai` imports httpx2 (which needs httpcore2 and truststore). Run here, in the repo root, once:
#   bash benchmarks/gpuenv_extra.sh          # writes .whl/ (git-ignored; carry it: carry [".whl", ...])
# gpu_session.sh installs whatever is in .whl/ into /tmp/gpuextra before the vLLM stages.
set -euo pipefail
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 2>&1 | grep -v "^WARNING: Location" || true
ls .whl
