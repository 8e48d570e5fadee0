#!/usr/bin/env bash
# The GPU machine's work, in stages that each fit one device call (< 10 min). From the repo root:
#   bash tools/gpu/gpu_session.sh build-test   # build moekern._C (sm_90a), all GPU tests (~8 min)
#   bash tools/gpu/gpu_session.sh memcheck     # compute-sanitizer memcheck over every device kernel
#   bash tools/gpu/gpu_session.sh probe        # a C++ argument check that crashes: native backtrace (cuda-gdb)
#   bash tools/gpu/gpu_session.sh own          # no vLLM needed: ep + diffusion + profile + ncu below
#   bash tools/gpu/gpu_session.sh ep|diffusion|profile|ncu   # one of those
#   bash tools/gpu/gpu_session.sh tune         # fused_moe tiles for the losing shapes vs vLLM, then re-bench moe
#   bash tools/gpu/gpu_session.sh decode-tune  # no vLLM needed: decode tiles (TUNE_SHAPES, default Qwen3/OLMoE M <= 4), then the layer
#   bash tools/gpu/gpu_session.sh ep-vllm      # the EP adapter inside vLLM's modular kernel at W=1
#   bash tools/gpu/gpu_session.sh ep-multi     # issue 11 on a multi-GPU kind: EP bench W=2/4/8 + tests
#   bash tools/gpu/gpu_session.sh e2e-multi    # the plugin at tensor / expert parallelism 2 (multi-GPU kind, vLLM)
#   bash tools/gpu/gpu_session.sh routing-variants  # CUDA routing paths (auto/legacy/single/multi) + one-node floor vs vLLM
#   bash tools/gpu/gpu_session.sh fastpath-check    # no vLLM: build, routing / route_and_align / split-K / PDL GPU tests
#   bash tools/gpu/gpu_session.sh fastpath-memcheck # no vLLM: fused_moe GPU tests, compute-sanitizer memcheck
#   bash tools/gpu/gpu_session.sh fastpath-bench    # routing (graphs), route_and_align, decode layer vs vLLM
#   bash tools/gpu/gpu_session.sh fastpath-eager    # eager routing vs vLLM, the plugin's token-for-token check
#   bash tools/gpu/gpu_session.sh fastpath-race     # no vLLM: racecheck + ncu stall sections of route_and_align
#   bash tools/gpu/gpu_session.sh fastpath-profile  # no vLLM: per-kernel ncu + torch.profiler of the M=1 layer
#   bash tools/gpu/gpu_session.sh align-plans       # every plan of the cuda align (slots per thread, matcher) timed
#   bash tools/gpu/gpu_session.sh fastpath-source   # no vLLM: ncu per-instruction stalls of route_and_align's kernels
#                                                   #   and of the routing kernel alone (FASTPATH_SOURCE_TARGETS)
#   bash tools/gpu/gpu_session.sh gpu-mutants       # no vLLM: planted .cu bugs, each must fail the GPU tests
#   bash tools/gpu/gpu_session.sh fi-warmup    # start FlashInfer's JIT builds detached (tens of minutes of nvcc)
#   bash tools/gpu/gpu_session.sh fi-status    # how far that build is
#   bash tools/gpu/gpu_session.sh bench-all    # moekern vs vLLM, every op and model (needs the gpuenv staged)
#   bash tools/gpu/gpu_session.sh bench-fi     # FlashInfer vs vLLM vs moekern, once fi-warmup has built it
#   bash tools/gpu/gpu_session.sh gatelog      # no vLLM needed: the gate-log recorder's GPU tests + its hand-off bench
#   bash tools/gpu/gpu_session.sh e2e-offline  # vLLM end-to-end A/B with the plugin, LLM.generate (E2E_ARMS, E2E_ARGS)
#   bash tools/gpu/gpu_session.sh e2e-serve    # the same through `vllm serve` + `vllm bench serve` (SERVE_ARMS, E2E_ARGS)
#   bash tools/gpu/gpu_session.sh e2e-olmoe    # AR gate logs of the LLaDA-MoE-shaped model (diffusion comparison)
#   bash tools/gpu/gpu_session.sh gpu-tests-vllm  # GPU tests that need vLLM (token-for-token check, EP adapter)
#   bash tools/gpu/gpu_session.sh diffusion-vllm  # diffusion bench incl. vLLM's fused_experts backend
#   bash tools/gpu/gpu_session.sh factorial    # issue 12's small real factorial through the serve grid (~8 min)
#   bash tools/gpu/gpu_session.sh knob-grid    # issue 31's imbalance grid, resumable: as many servers as fit (~8.5 min)
#   bash tools/gpu/gpu_session.sh vllm-tune    # vLLM's fused_experts over its tuner's 1920 configs, resumable (~8 min)
#   bash tools/gpu/gpu_session.sh vllm-tuned-bench  # decode_layer.py vs vLLM shipped configs, then vs the tuned ones
# Several stages run in order in one call: `bash tools/gpu/gpu_session.sh build-test probe ep`.
# FlashInfer's CUTLASS MoE module takes longer to build than a device session lasts (> 15 min of nvcc on 16
# cores): build it on the CPU machine instead (bash tools/gpu/flashinfer_aot.sh, hours on 2 cores, resumable)
# and carry .fiaot/ (manifest + parts): either one 34 MB part beside .fiwhl in a first call, or
# FIAOT_PART_MB=9 parts riding with the three gpuenv parts (the manifest in each call; part.0 with part 1,
# part.1 with 2, part.2 + part.3 with 3: each call stays under the 64 MiB that travels, no call spent on it); every
# stage installs it (tools/gpu/fiaot.sh) and FlashInfer loads it ahead of time. `fi-warmup` checks it in seconds.
# Every stage first stages a carried gpuenv part if one is there (../shared/gpu-env: three calls carrying
# .gpuenv/tools + .gpuenv/N back to back), sources the env once complete, and installs .whl/ extras
# (tools/gpu/gpuenv_extra.sh). Logs and results go under ${OUT:-/tmp/moekern-out}; folders there are packed
# into FOLDER.tgz at the end (the device returns 8 files at most; MOEKERN_OUT_TAR=0 keeps them as folders).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: gpu_session.sh STAGE [STAGE...]"; exit 2; }
OUT=${OUT:-/tmp/moekern-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
export FLASHINFER_CUDA_ARCH_LIST=9.0a FLASHINFER_JIT_DEBUG=0 VLLM_USE_FLASHINFER_SAMPLER=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if [ -f .gpuenv/tools/stage.sh ]; then bash .gpuenv/tools/stage.sh || true; fi
# FlashInfer alone, carried as .fiwhl/ in the first call (tools/gpu/gpuenv_extra.sh): installed once to
# /tmp/fiearly and imported from there by every stage, so `fi-warmup` can start its nvcc builds in call 1.
if [ ! -d /tmp/fiearly/flashinfer ] && ls .fiwhl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fiearly .fiwhl/*.whl 2>&1 | tail -2
fi
if [ -f /tmp/gpuenv/env.sh ]; then
  # shellcheck disable=SC1091
  source /tmp/gpuenv/env.sh
  python3 tools/gpu/gpuenv_fixups.py  # vLLM imports FlashAttention's missing binaries on every model load
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpuextra .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH=/tmp/gpuextra:$PYTHONPATH
  fi
fi
if [ -d /tmp/fiearly/flashinfer ]; then export PYTHONPATH=/tmp/fiearly${PYTHONPATH:+:$PYTHONPATH}; fi
# FlashInfer's CUTLASS MoE module built ahead of time on a CPU machine (tools/gpu/flashinfer_aot.sh), carried as
# .fiaot/: installed into every FlashInfer here once all its parts have arrived (tools/gpu/fiaot.sh).
bash tools/gpu/fiaot.sh install || true

unpack_tune_results() {
  # vllm-tune's results file: the carried plain file (from a call cut off by its time limit) or the carried .gz
  # (a finished call), whichever holds more lines (the file is only ever appended to, so that one is newer)
  mkdir -p "$1"
  local plain="$1/tune_vllm.jsonl" gz="$1/tune_vllm.jsonl.gz" n_plain=0 n_gz
  [ -s "$gz" ] || return 0
  [ -s "$plain" ] && n_plain=$(wc -l < "$plain")
  n_gz=$(gunzip -c "$gz" | wc -l)
  if [ "$n_gz" -gt "$n_plain" ]; then
    [ "$n_plain" -gt 0 ] && echo "vllm-tune: $gz ($n_gz lines) is newer than $plain ($n_plain lines): using it"
    gunzip -c "$gz" > "$plain"
  fi
}

build() {
  # (a build older than the newest op is rebuilt: the check names it)
  if python3 -c "import torch, moekern._C; assert torch.ops.moekern.has_device_kernels(); torch.ops.moekern.moe_align_variant" 2>/dev/null; then
    echo "moekern._C already built"; return 0
  fi
  MOEKERN_REQUIRE_EXTENSION=1 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -30
  python3 -c "import torch, moekern._C; print('device kernels:', torch.ops.moekern.has_device_kernels())"
}

probe() {
  # A failing TORCH_CHECK in a device build must raise RuntimeError; if it kills the process instead, print
  # where (cuda-gdb doubles as a host gdb; plain gdb is not on the image) and the toolchain facts that matter.
  cat > /tmp/moekern_probe.py <<'PY'
import torch, moekern._C
x = torch.randn(4, 8, device="cuda")
try:
    torch.ops.moekern.fused_topk_variant(x, 2, 0, True, None, 0, 0, 1.0, 99)
except RuntimeError as e:
    print("RAISED:", str(e).splitlines()[0])
PY
  python3 /tmp/moekern_probe.py && return 0
  echo "probe crashed (rc=$?); toolchain:"
  g++ --version | head -1; python3 -c "import torch; print(torch.__config__.show())" | head -12
  ldd moekern/_C*.so | grep -E "stdc|gcc_s|c10|torch" || true
  timeout 120 cuda-gdb -q -batch -ex run -ex bt --args python3 /tmp/moekern_probe.py 2>&1 | tail -60
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

# need_vllm STAGE: stop the stage, saying why, when vLLM does not import (a stage that compares against vLLM
# would otherwise measure without it: a diffusion-vllm run once ran with .whl/ not carried).
need_vllm() {
  local why
  why=$(python3 -c "import vllm" 2>&1 | tail -1) && return 0
  echo "$1: vLLM does not import (${why:-no output}); stage skipped. Stage all gpuenv parts and carry .whl/."
  return 1
}

run_stage() {
  case "$1" in  # the stages that compare against (or run inside) vLLM
  tune|routing-variants|ep-vllm|bench-all|e2e-offline|e2e-serve|e2e-multi|e2e-olmoe|gpu-tests-vllm|diffusion-vllm|factorial|knob-grid|vllm-tune|vllm-tuned-bench)
    need_vllm "$1" || return 0 ;;
  esac
  case "$1" in
  build-test)
    # Every GPU test in two runs: the ~190 tests outside test_cuda_ops.py first (dispatch, EP, moe, routing,
    # diffusion, study, and the vLLM ones when the gpuenv is staged), then test_cuda_ops.py's ~1140
    # parametrizations (40 s with 8 xdist workers on an H200). Both on xdist workers: in one process the first
    # run reached only 41 tests in 240 s (Triton compiles of test_dispatch's align boundary cases,
    # which workers share through Triton's disk cache). -v logs every test's outcome as it ends, so a run cut
    # off by the timeout still says which passed and which was running.
    versions
    time build
    timeout 330 python3 -m pytest -v -m gpu -p no:cacheprovider --continue-on-collection-errors --timeout 200 -rfE \
      -n "${TEST_WORKERS:-4}" --ignore tests/test_cuda_ops.py tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 120 -rfE -n 8 tests/test_cuda_ops.py \
      2>&1 | tee "$OUT/gpu_tests_cuda_ops.log" | tail -15
    ;;
  memcheck)
    build
    timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 python3 tools/gpu/memcheck_smoke.py \
      2>&1 | tee "$OUT/memcheck.log" | tail -15
    ;;
  probe) build; probe 2>&1 | tee "$OUT/probe.log" ;;
  ep)
    build
    timeout 150 python3 benchmarks/bench_ep.py --out "$OUT/ep" 2>&1 | tail -20
    ;;
  diffusion)
    build
    timeout 240 python3 -m moekern.cli diffusion bench --model llada-moe-7b --backend moekern,torch \
      --gen-lengths 128 --steps 32,128 --batch-sizes 1,8 --tag llada-moe-7b_h100 --out "$OUT/diffusion" 2>&1 | tail -20
    ;;
  profile)
    build
    for model in ${PROFILE_MODELS:-mixtral qwen3-30b-a3b deepseek-v3 olmoe}; do
      timeout 150 python3 -m moekern.cli profile torch --model "$model" --tokens 256 --out "$OUT/profile/$model" \
        2>&1 | tail -12
    done
    ;;
  ncu)
    build
    for kind in routing fused_moe; do
      timeout 150 python3 -m moekern.cli profile ncu --kind "$kind" --model mixtral --tokens 4096 \
        --out "$OUT/ncu/$kind" 2>&1 | tail -25
    done
    ;;
  own) versions; for s in ep diffusion profile ncu; do run_stage "$s"; done ;;
  tune)
    # fused_moe tiles for the shapes we lose to vLLM, timed side by side with vLLM's fused_experts; --apply
    # writes the winners into moekern/experts/tiles/sm90.json here, and the re-bench measures them in the same call
    # (edits on the device machine do not come back: commit the JSON, then `python benchmarks/tune_moe.py
    # apply JSON` on the CPU machine).
    versions; build
    # TUNE_SHAPES=MODEL:M,... picks the shapes (default: the 10 that lost in the 2026-11-23 bench)
    timeout 330 python3 benchmarks/tune_moe_shapes.py --out "$OUT/tune" --budget-s "${TUNE_BUDGET_S:-280}" --apply \
      ${TUNE_SHAPES:+--shapes "$TUNE_SHAPES"} \
      2>&1 | tee "$OUT/tune.log" | tail -40
    timeout 240 python3 -m moekern.cli bench --no-progress --ops moe --budget-s 200 \
      --providers moekern-triton,vllm --out "$OUT/bench-moe-tuned" 2>&1 | tee "$OUT/bench-moe-tuned.log" | tail -35
    ;;
  decode-tune)
    # No vLLM needed (its column is filled when staged): fused_moe's decode tiles at M <= 4 (split-K GEMM1s, GEMM1's
    # N tile alone, ... among the candidates), the winners written into this checkout's tile table (--apply), then
    # the decode layer timed with them in the same call. Edits here do not come back: commit the returned
    # tune/tune_moe_shapes.json with `python benchmarks/tune_moe.py apply` on the CPU machine.
    # TUNE_SHAPES (model:M,...) picks the shapes; the layer is then timed for every model of it at every M of it.
    local shapes=${TUNE_SHAPES:-qwen3-30b-a3b:1,qwen3-30b-a3b:2,qwen3-30b-a3b:4,olmoe:1,olmoe:2,olmoe:4}
    local models ms
    if echo "$shapes" | tr ',' '\n' | grep -qv '^[a-z0-9.-]*:[0-9][0-9]*$'; then
      echo "decode-tune: TUNE_SHAPES=$shapes: each entry must be model:M (e.g. mixtral:2)"; return 2
    fi
    versions; build
    models=$(echo "$shapes" | tr ',' '\n' | cut -d: -f1 | awk '!seen[$0]++' | paste -sd, -)
    ms=$(echo "$shapes" | tr ',' '\n' | cut -d: -f2 | sort -n | uniq | paste -sd, -)
    timeout 220 python3 benchmarks/tune_moe_shapes.py --out "$OUT/tune" --budget-s 170 --max-candidates 12 --apply \
      --shapes "$shapes" 2>&1 | tee "$OUT/tune.log" | tail -30
    timeout 200 python3 benchmarks/decode_layer.py --models "$models" --ms "$ms" \
      --json "$OUT/decode_tuned.json" 2>&1 | tee "$OUT/decode_tuned.log" | tail -12
    ;;
  routing-variants)
    # Every CUDA routing path (auto, compact, legacy) side by side with vLLM and the Triton kernel (needs vLLM).
    build
    timeout 240 python3 benchmarks/routing_variants.py --variants auto,compact,legacy,single_block,multi_block \
      --json "$OUT/routing_variants.json" 2>&1 | tee "$OUT/routing_variants.log" | tail -45
    ;;
  fastpath-check)
    # The decode fast path's correctness on this GPU, no vLLM: every routing kernel path, route_and_align, every
    # align plan and permute/unpermute against the torch reference; then the layer's split-K and PDL paths and the
    # backend choice past the kernels' limits (all of fused_moe and compute-sanitizer: fastpath-memcheck).
    versions; build
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_route_align.py tests/test_cuda_ops.py \
      -k "topk or route or align or permute" 2>&1 | tee "$OUT/fastpath_tests.log" | tail -25
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_moe.py tests/test_routing.py \
      tests/test_dispatch.py -k "split_k or pdl or beyond_the_kernel_limits" 2>&1 | tee "$OUT/fastpath_layer_tests.log" \
      | tail -12
    ;;
  fastpath-memcheck)
    build
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_moe.py 2>&1 | tee "$OUT/moe_tests.log" | tail -6
    timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 python3 tools/gpu/memcheck_smoke.py \
      2>&1 | tee "$OUT/memcheck.log" | tail -6
    ;;
  fastpath-bench)
    # Side by side with vLLM in one process per script (needs the gpuenv): routing at the issue's 28 shapes in CUDA
    # graphs, route_and_align vs vLLM's routing + moe_align_block_size, the decode layer with its routing.
    # FASTPATH_SKIP_ROUTING=1 leaves out the routing table (for a change that touches align alone);
    # FASTPATH_ROUTING_VARIANTS picks its moekern paths (default auto,compact,legacy; `auto` alone is the quickest).
    versions; build
    if [ "${FASTPATH_SKIP_ROUTING:-0}" != "1" ]; then
      timeout 180 python3 benchmarks/routing_variants.py \
        --variants "${FASTPATH_ROUTING_VARIANTS:-auto,compact,legacy}" --json "$OUT/routing_graph.json" 2>&1 \
        | tee "$OUT/routing_graph.log" | tail -40
    fi
    timeout 120 python3 benchmarks/bench_route_align.py --json "$OUT/route_align.json" 2>&1 \
      | tee "$OUT/route_align.log" | tail -28
    timeout 300 python3 benchmarks/decode_layer.py --json "$OUT/decode_layer.json" 2>&1 \
      | tee "$OUT/decode_layer.log" | tail -30
    ;;
  align-plans)
    # No vLLM needed (its column is filled when staged): every plan of the cuda align (slots per thread 1-16, one
    # CTA or a histogram launch + several, hardware or ballot match, pads by warp or thread) beside the default
    # plan, 8 to 32K slots.
    build
    timeout 300 python3 benchmarks/align_variants.py --plans --block-sizes 16 64 --reps 100 \
      --json "$OUT/align_plans.json" 2>&1 | tee "$OUT/align_plans.log" | tail -80
    ;;
  fastpath-source)
    # No vLLM: where route_and_align's one launch (M=1) and align's scatter (M=256) spend their cycles, per
    # SASS instruction (ncu's PC sampling: warp stall reasons and executed instructions per line); and the routing
    # kernel alone (redux_topk) for DeepSeek-V3 at M=1 (one warp's chain) and M=16 (16 warps on one SM).
    # FASTPATH_SOURCE_TARGETS ("kernel model M" per line) replaces the list (each target is ~30 s of ncu, at most
    # 120; trim the list when the call has other work).
    build
    mkdir -p "$OUT/prof"
    local targets=${FASTPATH_SOURCE_TARGETS:-"route_align qwen3-30b-a3b 1
route_align deepseek-v3 1
align_scatter qwen3-30b-a3b 256
redux_topk deepseek-v3 1
redux_topk deepseek-v3 16"}
    while read -r kname model m; do
      [ -n "$kname" ] || continue
      rep="$OUT/prof/src_${kname}_${model}_m$m"
      local probe_args=()
      if [ "$kname" = redux_topk ]; then probe_args=(--routing); fi
      timeout 120 ncu --kernel-name "regex:$kname" --launch-count 1 --section SourceCounters --section WarpStateStats \
        --section SpeedOfLight --import-source yes -f -o "$rep" python3 tools/gpu/route_align_probe.py \
        --models "$model" --ms "$m" --iters 1 ${probe_args[@]+"${probe_args[@]}"} < /dev/null > "$rep.log" 2>&1 \
        || tail -5 "$rep.log"
      ncu -i "$rep.ncu-rep" --page source --csv --print-source sass < /dev/null > "$rep.sass.csv" 2>&1 \
        || ncu -i "$rep.ncu-rep" --page details < /dev/null > "$rep.details.txt" 2>&1
      ls -la "$rep".* | awk '{print $5, $9}'
    done <<< "$targets"
    ;;
  gpu-mutants)
    # No vLLM: planted bugs in the .cu kernels, each judged by the GPU tests (tools/mutation/kernel_mutants.py), in
    # a scratch copy with its own build, so this checkout's moekern._C is never touched.
    timeout 420 python3 tools/mutation/kernel_mutants.py --json "$OUT/kernel_mutants.json" \
      --log "$OUT/kernel_mutants.log" 2>&1 | tail -12
    ;;
  fastpath-race)
    # No vLLM: compute-sanitizer racecheck of route_and_align's one launch (routing teams, then align's scatter
    # in shared memory) at decode shapes, and ncu's stall sections of that kernel at M=1.
    versions; build
    mkdir -p "$OUT/prof"
    timeout 200 compute-sanitizer --tool racecheck --error-exitcode 9 python3 tools/gpu/route_align_probe.py \
      --ms 1,16,64,256 --iters 1 2>&1 | tee "$OUT/racecheck.log" | tail -22
    timeout 150 ncu --kernel-name regex:"route_align|align_scatter|redux_topk" --launch-count 12 \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
      --section SchedulerStats python3 tools/gpu/route_align_probe.py --models qwen3-30b-a3b,deepseek-v3 --ms 1,64 \
      --iters 2 > "$OUT/prof/ncu_route_align.txt" 2>&1
    grep -E "_kernel|Duration|Warp Cycles Per Issued|Issued Warp" "$OUT/prof/ncu_route_align.txt" | head -60
    ;;
  fastpath-profile)
    # No vLLM: where the decode layer's time goes at M=1 (per-kernel ncu table and a torch.profiler timeline).
    # FASTPATH_PROFILE_MODELS: a comma list (default qwen3-30b-a3b,olmoe).
    build
    for model in $(echo "${FASTPATH_PROFILE_MODELS:-qwen3-30b-a3b,olmoe}" | tr ',' ' '); do
      timeout 120 python3 -m moekern.cli profile ncu --kind fused_moe --model "$model" --tokens 1 \
        --out "$OUT/prof/ncu-$model-m1" 2>&1 | tail -12
      timeout 90 python3 -m moekern.cli profile torch --kind fused_moe --model "$model" --tokens 1 \
        --out "$OUT/prof/torch-$model-m1" 2>&1 | tail -14
    done
    ;;
  fastpath-eager)
    # Eager routing (host launch cost included) against vLLM's, then the plugin's token-for-token check on the
    # route_and_align path (needs the gpuenv).
    build
    timeout 120 python3 benchmarks/routing_variants.py --variants auto --no-triton --ms 1,16,64,256 --eager \
      --json "$OUT/routing_eager.json" 2>&1 | tee "$OUT/routing_eager.log" | tail -12
    need_vllm fastpath-eager || return 0
    timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 400 -rfEs tests/test_vllm_plugin.py 2>&1 \
      | tee "$OUT/plugin_tests.log" | tail -15
    ;;
  ep-multi)
    # Issue 11: real ranks, one process per GPU (nvidia-h200-x2/-x4/-x8; multicast off, exported above): the
    # NCCL and peer-write paths timed side by side with the peer bandwidth, the scaling report, the exactness tests.
    build
    n=$(nvidia-smi -L | wc -l); [ "$n" -gt 8 ] && n=8
    if [ "$n" -lt 2 ]; then echo "ep-multi: needs >= 2 GPUs, found $n"; return 0; fi
    mkdir -p "$OUT/ep-multi"
    for w in 2 4 8; do
      [ "$w" -le "$n" ] || continue
      timeout 170 python3 -m torch.distributed.run --standalone --nproc-per-node "$w" \
        benchmarks/bench_ep.py --distributed --out "$OUT/ep-multi" 2>&1 | tail -22
    done
    python3 benchmarks/ep_report.py "$OUT/ep-multi" 2>&1 | tail -45
    timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_ep_multigpu.py 2>&1 | tail -15
    ;;
  e2e-multi)
    # The plugin on 2 ranks (a multi-GPU kind): greedy tokens with MOEKERN_KERNELS=routing equal plugin-off ones
    # under tensor parallelism and under expert parallelism, every rank writing gate_log.rank{R}.jsonl (checked);
    # then vllm vs moekern offline at TP=2 + EP with gate logs on (one round, the ranks' logs kept). ~8 min.
    versions; build
    n=$(nvidia-smi -L | wc -l)
    if [ "$n" -lt 2 ]; then echo "e2e-multi: needs >= 2 GPUs, found $n"; return 0; fi
    for ep in "" "--enable-expert-parallel"; do
      tag=tp2${ep:+-ep}
      timeout 300 python3 -m moekern.e2e.check_equal --model mixtral-8x7b-4l --no-baseline \
        --tensor-parallel-size 2 $ep --out "$OUT/check_equal_$tag" 2>&1 | tee "$OUT/check_equal_$tag.log" | tail -25
    done
    timeout 300 python3 -m moekern.e2e --quick --mode offline --arms vllm,moekern \
      --tensor-parallel-size 2 --enable-expert-parallel --budget-s 260 ${E2E_ARGS:-} --out "$OUT/e2e-tp2-ep" 2>&1 \
      | tee "$OUT/e2e_tp2_ep.log" | tail -30
    ;;
  ep-vllm)
    # moekern.ep's prepare/finalize inside vLLM's modular kernel at W=1 vs vLLM's own path (needs vLLM).
    build
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_ep_vllm.py tests/test_ep.py -k "vllm" 2>&1 \
      | tee "$OUT/ep_vllm.log" | tail -15
    ;;
  fi-warmup)
    # Detached (setsid): FlashInfer's nvcc builds run on after this call returns, for as long as the machine is
    # held, so the next call finds them in ~/.cache/flashinfer. Its log: /tmp/fi_warmup.log (bench-fi prints it).
    # Carry .fiwhl/ in the first call (gpuenv_extra.sh) and run this stage first: the CUTLASS MoE build takes
    # longer than one call. Ninja's [k/N] progress lines go to the log (FLASHINFER_JIT_VERBOSE=1). FlashInfer
    # 0.6.14 also reads VERBOSE as "debug build" (-O0 --device-debug) unless FLASHINFER_JIT_DEBUG says otherwise:
    # an earlier warm-up built FlashInfer's router that way; the FLASHINFER_JIT_DEBUG=0 exported above keeps
    # builds optimized.
    if pgrep -f flashinfer_warmup.py >/dev/null; then echo "FlashInfer JIT warm-up already running"; return 0; fi
    if ! python3 -c "import flashinfer" 2>/dev/null; then
      echo "fi-warmup: flashinfer not importable (carry .fiwhl or the full gpuenv)"; return 0
    fi
    FLASHINFER_JIT_VERBOSE=1 setsid nohup python3 tools/gpu/flashinfer_warmup.py > /tmp/fi_warmup.log 2>&1 \
      < /dev/null &
    echo "FlashInfer JIT warm-up started (pid $!) at $(date +%T)"
    ;;
  fi-status)
    # Where the warm-up is: its result lines and ninja's last progress line.
    grep -E "^(fused_topk_deepseek|cutlass_fused_moe|FLASHINFER)" /tmp/fi_warmup.log 2>/dev/null
    grep -oE "^\[[0-9]+/[0-9]+\]" /tmp/fi_warmup.log 2>/dev/null | tail -1
    pgrep -f flashinfer_warmup.py >/dev/null && echo "warm-up still running" || echo "warm-up not running"
    cp /tmp/fi_warmup.log "$OUT/fi_warmup.log" 2>/dev/null || true
    ;;
  bench-all)
    # Everything but FlashInfer (its JIT build would stall the run; bench-fi times it once built).
    versions; build
    timeout 560 python3 -m moekern.cli bench --no-progress --budget-s "${BENCH_BUDGET_S:-470}" \
      --providers moekern-cuda,moekern-triton,vllm,torch --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -80
    ;;
  bench-fi)
    # FlashInfer side by side with vLLM and moekern (routing: DeepSeek-V3 only, FlashInfer's one sm90 router).
    versions; build
    cat /tmp/fi_warmup.log 2>/dev/null
    timeout 120 python3 -m moekern.cli bench --no-progress --ops routing --models deepseek-v3 \
      --providers flashinfer,vllm,moekern-cuda,moekern-triton --out "$OUT/bench-fi-routing" 2>&1 \
      | tee "$OUT/bench-fi-routing.log" | tail -25
    # Without a finished CUTLASS MoE build the bench would sit in FlashInfer's JIT for the whole call:
    # wait up to FI_WAIT_S for the warm-up, then time the MoE only if it built.
    for _ in $(seq "$(( ${FI_WAIT_S:-60} / 10 ))"); do
      grep -q "^cutlass_fused_moe:" /tmp/fi_warmup.log 2>/dev/null && break; sleep 10
    done
    if grep -q "^cutlass_fused_moe: build+first call .*: ok" /tmp/fi_warmup.log 2>/dev/null; then
      timeout 330 python3 -m moekern.cli bench --no-progress --budget-s "${BENCH_BUDGET_S:-270}" --ops moe \
        --providers flashinfer,vllm,moekern-triton --out "$OUT/bench-fi-moe" 2>&1 | tee "$OUT/bench-fi-moe.log" | tail -40
    else
      echo "bench-fi: FlashInfer's cutlass_fused_moe is not built and checked yet (fi-warmup): MoE rows not timed"
      run_stage fi-status
    fi
    ;;
  gatelog)
    # The recorder's CUDA tests (both hand-offs, CUDA-graph replays, exact records) and the host cost per step of
    # the two hand-offs side by side (benchmarks/bench_gatelog.py; Mixtral-4l and DeepSeek-V3 shapes), ~1 min.
    versions; build
    python3 -m pytest -q -m gpu tests/test_gatelog_writer.py 2>&1 | tee "$OUT/gatelog_tests.log" | tail -5
    python3 benchmarks/bench_gatelog.py --json "$OUT/gatelog_handoff_mixtral4l.json" 2>&1 | tee "$OUT/gatelog_handoff.log"
    python3 benchmarks/bench_gatelog.py --layers 58 --experts 256 --top-k 8 --topk-sample 16 \
      --json "$OUT/gatelog_handoff_dsv3.json" 2>&1 | tee -a "$OUT/gatelog_handoff.log"
    # the same without the per-step sync: does the host's run-ahead (a full launch queue) land in the hand-off?
    python3 benchmarks/bench_gatelog.py --layers 58 --experts 256 --top-k 8 --topk-sample 16 --no-step-sync \
      --json "$OUT/gatelog_handoff_dsv3_nosync.json" 2>&1 | tee -a "$OUT/gatelog_handoff.log"
    ;;
  e2e-offline)
    versions; build
    # 4 arms, ~7-8.5 min; a fifth fits only a smaller workload. E2E_ARMS picks the arms, E2E_ARGS adds flags (it
    # comes after --budget-s, so it may override it), e.g. E2E_ARMS=vllm,moekern,moekern-routing,moekern-routing-log,
    # flashinfer E2E_ARGS="--reps 3 --num-prompts 384 --budget-s 480" (~9 min). FlashInfer's arm needs its CUTLASS
    # MoE module ahead of time (.fiaot carried): built inside the arm, nvcc would outlast --arm-timeout, so without
    # it the arm is dropped here, saying so. Passes of one arm spread 10-18 % even without compiles (H200 and
    # H100 runs in benchmarks/results/e2e/): compare two arms per call over alternating rounds, e.g.
    # E2E_ARMS=vllm,moekern E2E_ARGS="--rounds 2 --reps 4 --budget-s 370" and
    # E2E_ARMS=moekern-routing,moekern-routing-log (gate-log overhead): ~6 min each on an H100, steady (the shape
    # sweep covers the compiles). Add --max-num-seqs 256 for the larger decode batch (~3 min per round).
    # The gate-log overhead within one engine, both hand-offs: E2E_ARMS=moekern-routing,moekern-routing-log,
    # moekern-routing-log-torch E2E_ARGS="--rounds 2 --reps 8 --max-num-seqs 256 --gate-log-paired --budget-s 500".
    local arms=${E2E_ARMS:-vllm,moekern-routing,moekern-routing-log,moekern}
    if [[ ",$arms," == *,flashinfer,* ]] && ! bash tools/gpu/fiaot.sh installed; then
      echo "e2e-offline: FlashInfer's fused_moe_90.so is not installed (carry all .fiaot parts): flashinfer arm dropped"
      arms=$(echo ",$arms," | sed 's/,flashinfer,/,/; s/^,//; s/,$//')
    fi
    # The GPU's clocks, throttle reasons, temperature and power once a second while the arms run: offline passes
    # have spread 10-18 % without compiles (benchmarks/results/e2e/h200-2026-12-06-*), and this says whether the
    # GPU itself changed speed.
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,clocks_throttle_reasons.active,temperature.gpu,power.draw,utilization.gpu \
      --format=csv -l 1 > "$OUT/gpu_clocks.csv" 2>/dev/null &
    local smi=$!
    # shellcheck disable=SC2086  # E2E_ARGS is a list of flags
    timeout 590 python3 -m moekern.e2e --quick --mode offline --arms "$arms" \
      --budget-s 470 ${E2E_ARGS:-} --out "$OUT/e2e" 2>&1 \
      | tee "$OUT/e2e_offline.log" | tail -40
    kill "$smi" 2>/dev/null || true
    ;;
  e2e-serve)
    versions; build
    # Single-stream decode on the full-depth Qwen3-30B-A3B (issue 29's TPOT target; ~61 GB of dummy weights):
    # E2E_ARGS="--model qwen3-30b-a3b-48l --max-num-seqs 1 --concurrency 1 --serve-prompts 16 --output-len 128
    # --gpu-mem 0.92"; the summary gives serve.moekern_tpot_vs_vllm.
    # shellcheck disable=SC2086  # E2E_ARGS is a list of flags (e.g. --max-num-seqs 256)
    timeout 590 python3 -m moekern.e2e --quick --mode serve --arms "${SERVE_ARMS:-vllm,moekern}" \
      --budget-s 470 ${E2E_ARGS:-} --out "$OUT/e2e" 2>&1 \
      | tee "$OUT/e2e_serve.log" | tail -40
    ;;
  e2e-olmoe)
    # The autoregressive gate logs of the LLaDA-MoE-7B-shaped (= OLMoE-1B-7B MoE shape) model, for the
    # diffusion-vs-AR routing comparison (issue 13): one pass, gate logs only (~3-4 min).
    versions; build
    timeout 400 python3 -m moekern.e2e --model olmoe-1b-7b --mode offline --arms moekern-routing-log --quick \
      --warmup-reps 0 --reps 1 --input-len 64 --output-len 128 --max-num-seqs 8 --num-prompts 64 --budget-s 300 \
      --dummy-router-seed 0 \
      --out "$OUT/e2e-olmoe" 2>&1 | tee "$OUT/e2e_olmoe.log" | tail -25
    ;;
  gpu-tests-vllm)
    # The GPU tests that need vLLM staged: the plugin's greedy token-for-token check (routing vs off), the EP
    # adapter, the diffusion engine's vLLM backend.
    build
    timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 400 -rfEs tests/test_vllm_plugin.py \
      tests/test_ep_vllm.py tests/test_ep.py tests/test_diffusion.py 2>&1 | tee "$OUT/gpu_tests_vllm.log" | tail -25
    ;;
  diffusion-vllm)
    # The diffusion bench with all three MoE backends (vLLM's fused_experts column; needs vLLM staged).
    build
    timeout 300 python3 -m moekern.cli diffusion bench --model llada-moe-7b --backend moekern,vllm,torch \
      --gen-lengths 128 --steps 32,128 --batch-sizes 1,8 --tag llada-moe-7b_3backends --out "$OUT/diffusion" \
      --ar-gate-log benchmarks/results/e2e/h200-2026-12-05-olmoe-ar/gate_logs 2>&1 | tail -20
    ;;
  factorial)
    # Issue 12's small real factorial (analysis/specs/factorial_h100_small.yaml): 2 servers (vllm, moekern), each
    # serving a grid of 3 concurrencies x 3 datasets x 2 reps; ~7-8 min. Resumable: rerun to fill skipped points.
    # FACTORIAL_REPS=1 runs one rep of every point (`moekern factorial --reps 1`, ~5.5 min; a later run with the
    # spec's 2 adds the second rep and skips what is done).
    # PREFLIGHT=0 skips the hook check when an e2e stage of the same machine has just passed it.
    versions; build
    if [ "${PREFLIGHT:-1}" != 0 ]; then
      timeout 80 python3 -m moekern.e2e.preflight --arms vllm,moekern --mode serve --model mixtral-8x7b-4l 2>&1 | tail -3
    fi
    timeout 500 python3 -m moekern.cli factorial analysis/specs/factorial_h100_small.yaml \
      ${FACTORIAL_REPS:+--reps "$FACTORIAL_REPS"} 2>&1 | tee "$OUT/factorial.log" | tail -30
    cp -r results/factorial_h100_small "$OUT/factorial" 2>/dev/null || true
    ;;
  knob-grid)
    # Issue 31's grid (analysis/specs/imbalance_grid.yaml): 48 servers (4 max_num_seqs x 4 max_num_batched_tokens x
    # 3 backends), each running 3 routing skews as benches; ~2 min per server, ~95 min in all over ~12 calls.
    # Each call runs the servers that fit in KNOB_GRID_BUDGET_S (default 450 s, counted from this stage's start,
    # so build and preflight come out of it) and stops cleanly: `moekern sweep --budget-s` starts no server with
    # less than the spec's min_point_s left and hands each server the seconds left (its own --budget-s), and
    # `timeout` only backs that up (its SIGTERM makes moekern e2e stop its server before it exits). Results accumulate in results/imbalance_grid (the spec's out_dir, git-ignored)
    # and go back as $OUT/knob_grid.tgz (runs/ with cards, gate_logs/, logs/, sweep_status.jsonl, work/ without
    # model copies and server logs). Resume in the next call or session: unpack each returned knob_grid.tgz over
    # results/imbalance_grid here (tar xzf knob_grid.tgz --strip-components 1 -C results/imbalance_grid) and carry
    # results/imbalance_grid/runs (run's carry; the result files are what resume reads); on a machine still warm
    # everything is already there. Finished benches are skipped, a server whose benches all exist is not started.
    # KNOB_GRID_BACKENDS (default vllm,moekern, plus flashinfer when FlashInfer's CUTLASS MoE module is installed
    # ahead of time or built by fi-warmup) limits the backends; PREFLIGHT=0 skips the hook check.
    local t0=$SECONDS budget=${KNOB_GRID_BUDGET_S:-450}
    versions; build
    local backends=${KNOB_GRID_BACKENDS:-}
    if [ -z "$backends" ]; then
      backends=vllm,moekern
      if bash tools/gpu/fiaot.sh installed >/dev/null 2>&1 || \
         grep -q "^cutlass_fused_moe: build+first call .*: ok" /tmp/fi_warmup.log 2>/dev/null; then
        backends=vllm,moekern,flashinfer
      else
        echo "knob-grid: FlashInfer's CUTLASS MoE module is not installed (carry .fiaot/ or run fi-warmup): flashinfer points wait"
      fi
    fi
    if [ "${PREFLIGHT:-1}" != 0 ]; then
      timeout 80 python3 -m moekern.e2e.preflight --arms "$backends" --mode serve --model mixtral-8x7b-4l 2>&1 | tail -3
    fi
    local left=$(( budget - (SECONDS - t0) ))
    if [ "$left" -lt 200 ]; then echo "knob-grid: ${left} s left after build/preflight; nothing started"; return 0; fi
    echo "knob-grid: backends $backends, ${left} s of budget"
    # a server overruns its budget by its stop (<= 30 s): the backstop stays inside a 600 s device call
    timeout -k 20 $(( left + 60 )) python3 -m moekern.cli sweep analysis/specs/imbalance_grid.yaml --no-progress \
      --budget-s "$left" --only "backend=$backends" 2>&1 | tee "$OUT/knob_grid.log" | tail -20
    python3 -m moekern.cli sweep analysis/specs/imbalance_grid.yaml --dry-run 2>/dev/null | head -1
    mkdir -p "$OUT/knob_grid"
    (cd results/imbalance_grid && tar cf - --exclude='work/*/models' --exclude='*.server.log' . ) | tar xf - -C "$OUT/knob_grid"
    ;;
  vllm-tune)
    # vLLM's own fused_experts timed over every config of vLLM's tuner (benchmarks/tune_vllm.py; 1920 configs per
    # model and M, checked against the reference first), the best per M written as the files vLLM reads from
    # VLLM_TUNED_CONFIG_FOLDER. Resumable over many calls: results/vllm_tune/tune_vllm.jsonl (git-ignored) gains a
    # line per measurement and a rerun skips what it holds for this GPU. It goes back as $OUT/tune_vllm.jsonl.gz,
    # with the config files of the complete M so far ($OUT/vllm_tune_configs.tgz). Resume in a later call or
    # session: put the returned tune_vllm.jsonl.gz at results/vllm_tune/tune_vllm.jsonl.gz (or, from a call cut
    # off by its time limit, the returned plain tune_vllm.jsonl at results/vllm_tune/tune_vllm.jsonl) and carry
    # results/vllm_tune (a few MB; this stage uses whichever of the two holds more lines). On a machine still warm
    # after a finished call it is already there; after a cut call, carry the returned file even there. VLLM_TUNE_MODELS and VLLM_TUNE_MS pick
    # the selection (default: the four models, M 1,2,4,8,16,32,64,256,1024,4096; the decode M first is the reduced
    # mode of tools/gpu/README.md), VLLM_TUNE_BUDGET_S the seconds (default 480, from this stage's start, vLLM's
    # import included). Run it with the call's timeout_s 600. No moekern build needed (the reference is torch).
    local t0=$SECONDS budget=${VLLM_TUNE_BUDGET_S:-480} res=results/vllm_tune
    versions
    unpack_tune_results "$res"
    local left=$(( budget - (SECONDS - t0) ))
    # The runner appends to a copy under $OUT: a call cut off by its time limit still brings back every line measured
    # (as $OUT/tune_vllm.jsonl; a cut-off last line is dropped on resume). The runner stops itself before
    # --budget-s; timeout only backs that up (its SIGTERM stops the compile workers).
    if [ -s "$res/tune_vllm.jsonl" ]; then cp "$res/tune_vllm.jsonl" "$OUT/tune_vllm.jsonl"; fi
    timeout -k 20 $(( left + 60 )) python3 benchmarks/tune_vllm.py run --jsonl "$OUT/tune_vllm.jsonl" \
      --budget-s "$left" ${VLLM_TUNE_MODELS:+--models "$VLLM_TUNE_MODELS"} ${VLLM_TUNE_MS:+--ms "$VLLM_TUNE_MS"} \
      2>&1 | tee "$OUT/vllm_tune.log" | tail -40
    if [ -s "$OUT/tune_vllm.jsonl" ]; then
      cp "$OUT/tune_vllm.jsonl" "$res/tune_vllm.jsonl"
      python3 benchmarks/tune_vllm.py write "$res/tune_vllm.jsonl" --out "$OUT/vllm_tune_configs" 2>&1 | tail -8
      gzip -c "$res/tune_vllm.jsonl" > "$OUT/tune_vllm.jsonl.gz" && rm "$OUT/tune_vllm.jsonl"
    fi
    ;;
  vllm-tuned-bench)
    # benchmarks/decode_layer.py twice in one call on one GPU: vLLM with its shipped configs (none for our bf16
    # H100 shapes: its default rule), then vLLM with the tuned files (VLLM_TUNED_CONFIG_FOLDER). The files:
    # VLLM_TUNED_DIR if set, else written here from results/vllm_tune/tune_vllm.jsonl(.gz) (left by vllm-tune in
    # this call, or carried). VLLM_BENCH_MS (default 1,2,4,8,16,32,64) should be a prefix of the tuning's M list:
    # decode_layer.py then draws the very tensors the configs were tuned on. Compare only M that the files hold.
    versions; build
    local res=results/vllm_tune dir=${VLLM_TUNED_DIR:-$OUT/vllm_tuned_configs} ms=${VLLM_BENCH_MS:-1,2,4,8,16,32,64}
    if [ -z "${VLLM_TUNED_DIR:-}" ]; then
      unpack_tune_results "$res"
      python3 benchmarks/tune_vllm.py write "$res/tune_vllm.jsonl" --out "$dir" 2>&1 | tail -8
    fi
    if ! ls "$dir"/E=*.json >/dev/null 2>&1; then
      echo "vllm-tuned-bench: no tuned config file in $dir (run vllm-tune until some M is complete)"; return 0
    fi
    dir=$(cd "$dir" && pwd)  # vLLM joins the folder with the file name: make it absolute
    mkdir -p "$OUT/vllm_tuned_bench"
    timeout 270 env -u VLLM_TUNED_CONFIG_FOLDER python3 benchmarks/decode_layer.py --ms "$ms" \
      --json "$OUT/vllm_tuned_bench/shipped.json" 2>&1 | tee "$OUT/vllm_tuned_bench/shipped.log" | tail -32
    timeout 270 env VLLM_TUNED_CONFIG_FOLDER="$dir" python3 benchmarks/decode_layer.py --ms "$ms" \
      --json "$OUT/vllm_tuned_bench/tuned.json" 2>&1 | tee "$OUT/vllm_tuned_bench/tuned.log" | tail -32
    ;;
  *) echo "unknown stage $1"; return 2 ;;
  esac
}

for stage in "$@"; do
  echo "=== stage $stage ($(date +%T))"
  run_stage "$stage"
done

# The device brings back at most 8 files from $OUT, none more than 2 folders down: each folder a stage left
# there (e2e/, tune/, ...) goes back as one FOLDER.tgz (MOEKERN_OUT_TAR=0 keeps the folders, e.g. on a CPU box).
if [ "${MOEKERN_OUT_TAR:-1}" != 0 ]; then
  for d in "$OUT"/*/; do
    [ -d "$d" ] || continue
    name=$(basename "$d")
    tar czf "$OUT/$name.tgz" -C "$OUT" "$name" && rm -rf "${OUT:?}/$name" && echo "packed $OUT/$name.tgz"
  done
  n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
  [ "$n" -le 8 ] || echo "warning: $n files in $OUT; the device brings back 8"
fi
