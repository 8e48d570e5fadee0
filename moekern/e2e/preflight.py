"""Preflight for the end-to-end runs: every vLLM 0.26 symbol the plugin and the runner rely on, without a model.

Run on the GPU machine after `source /tmp/gpuenv/env.sh` (`moekern e2e` runs it first, in a subprocess):

    python -m moekern.e2e.preflight [--arms vllm,flashinfer,moekern] [--mode offline|serve|both] [--model M]

It imports vLLM and checks its API as the plugin and the runner use it (preflight_vllm.py), and on a GPU
moekern's routing hook on a real vLLM router, the gate-log recorder and moekern.fused_moe
(preflight_gpu.py). Prints one PASS/FAIL/SKIP line per check and exits 1 on any FAIL. ~20-40 s (vLLM
imports dominate).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from moekern.e2e.arms import ARMS, OFFLINE_ARMS
from moekern.e2e.checklist import report, run_checks
from moekern.e2e.make_configs import MODELS, config_path


def build_checks(args) -> tuple[list, dict]:
    """The checks for preflight `args` (arms, mode, model), and the check whose failure skips the rest."""
    from moekern.e2e.args import parse_args
    from moekern.e2e.preflight_gpu import gpu_checks
    from moekern.e2e.preflight_vllm import vllm_checks

    # the runner's own parsed arguments for these arms: its engine kwargs and command lines are what we check
    ns = parse_args(["--model", args.model, "--arms", ",".join(args.arms), "--mode", args.mode])
    ns.model_dir = config_path(args.model).parent
    ns.dataset = None
    return vllm_checks(args, ns) + gpu_checks(args.arms), {"vllm imports": "vllm is not importable"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moekern.e2e.preflight", description=__doc__.splitlines()[0])
    p.add_argument("--arms", default=",".join(OFFLINE_ARMS),
                   help=f"comma list of the arms about to run (default: {','.join(OFFLINE_ARMS)})")
    p.add_argument("--mode", default="offline", choices=("offline", "serve", "both"))
    p.add_argument("--model", default="mixtral-8x7b-4l", choices=sorted(MODELS))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms:
        p.error(f"--arms: unknown arm(s) {bad} (or none given); known {sorted(ARMS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    checks, stops = build_checks(args)
    code = report(run_checks(checks, stops))
    print(f"preflight took {time.time() - t0:.1f}s (arms {','.join(args.arms)}, mode {args.mode}, model {args.model})")
    return code


if __name__ == "__main__":
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    sys.exit(main())
