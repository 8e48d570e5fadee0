"""The end-to-end A/B runner behind `moekern e2e`: vLLM 0.26 with dummy weights, vLLM's Triton MoE vs
FlashInfer CUTLASS MoE vs moekern.

One invocation runs the same workload through each arm (arms.py), offline (offline.py: LLM.generate, output
tokens/s; every arm in a fresh subprocess so its environment applies) and served (serve.py: `vllm serve` on
127.0.0.1 + `vllm bench serve` with random token prompts: TTFT, TPOT, ITL, request and output throughput from
vLLM's result JSON; grid.py: many benches against one server), and writes everything to --out (default
benchmarks/results/e2e/<date>/). Every arm is measured at steady state (warmup.py), its repetitions reduced
to medians, spreads and intervals (stats.py), the arms compared (summary.py).

Steady state: every arm runs with prefix caching off (the same prompts every repetition would otherwise skip
prefill from the second one on) and vLLM's JIT monitor in verbose mode (it logs every Triton compile after
warm-up, not only the first per kernel); an arm that compiled anything while timed makes its mode's ratios
no valid A/B (warmup.py says how the warm-up avoids that).

The moekern arms need the plugin's entry point, i.e. moekern pip-installed (`pip install -e .`); the runner
checks and refuses to report plugin arms that did not load it.

    source /tmp/gpuenv/env.sh
    python -m moekern.e2e.preflight                  # ~20-40 s, no model: every vLLM hook target
    moekern e2e --quick --mode offline --arms vllm,moekern-routing,moekern-routing-log,moekern
                                                      # ~7 min on one H100 (estimate printed first)
    moekern e2e --quick --mode serve --arms vllm,moekern   # ~7 min
Every invocation runs the preflight first (once, in a subprocess) and starts no arm when it reports a FAIL
(--no-preflight skips it). `python -m moekern.e2e ...` takes the same flags as `moekern e2e ...`.
Real checkpoint: --model-dir /path/to/Mixtral-8x7B-Instruct --load-format auto (the directory holds the
config, weights and tokenizer; --model then only names the result files).

Entry points besides `moekern e2e` (each a module of this package, run with `python -m`):
    python -m moekern.e2e.preflight [--arms A,B] [--mode offline|serve|both] [--model M]
    python -m moekern.e2e.check_equal --model mixtral-8x7b-4l --out /tmp/eq   # routing == plugin off, token for token
    python -m moekern.e2e.pool_runs RESULT_DIR [RESULT_DIR ...]               # pool offline passes of several runs
    python -m moekern.e2e.make_configs                                         # rewrite configs/*/config.json
The runner starts its own children as `python -m moekern.e2e.offline SPEC` (one offline arm) and
`python -m moekern.e2e.grid_child SPEC` (one server's bench grid).

This package imports neither vLLM nor torch at import time: `moekern e2e --help` works without them.
"""
