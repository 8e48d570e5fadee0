"""The flags of `moekern e2e` (and `python -m moekern.e2e`): defined once here, defaulted and checked by
check_args; a mistake exits 2 naming the flag (argparse's own error)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from moekern.e2e.arms import ARMS, OFFLINE_ARMS, SERVE_ARMS
from moekern.e2e.make_configs import MODELS, attention_backend, config_path
from moekern.e2e.plan import FULL, QUICK, Workload


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints; got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1; got {text!r}")
    return list(dict.fromkeys(vals))


def _path_list(text: str) -> list[Path]:
    vals = [Path(x.strip()) for x in text.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated files; got {text!r}")
    return vals


def _skew_list(text: str) -> list[tuple[str, str]]:
    """`NAME=SKEW,...` (SKEW in MOEKERN_ROUTING_SKEW's syntax) as [(name, skew)], each skew checked."""
    from moekern.vllm.config import SKEW_NAME, parse_skew

    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, eq, skew = item.partition("=")
        if not eq or not SKEW_NAME.fullmatch(name) or not skew.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=SKEW items (NAME of letters, digits, '.', '+', '-'); "
                                             f"got {item!r}")
        try:
            parse_skew(skew, name=name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        out.append((name, skew.strip()))
    if not out:
        raise argparse.ArgumentTypeError(f"expected NAME=SKEW[,NAME=SKEW...]; got {text!r}")
    if len({n for n, _ in out}) != len(out):
        raise argparse.ArgumentTypeError(f"skew names must differ; got {[n for n, _ in out]}")
    return out


DESCRIPTION = ("End-to-end A/B on vLLM 0.26 with dummy weights: vLLM's Triton MoE vs FlashInfer CUTLASS MoE vs "
               "moekern, offline (LLM.generate) and served (vllm serve + vllm bench serve)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """A parser of the runner's flags alone (`python -m moekern.e2e`)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag of the runner, on `p` (a parser of its own, or `moekern e2e`'s sub-parser)."""
    p.add_argument("--model", default="mixtral-8x7b-4l", choices=sorted(MODELS))
    p.add_argument("--model-dir", help="a real checkpoint directory (use with --load-format auto)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--tokenizer", help="tokenizer directory for serve mode (default: $GPUENV_MIXTRAL_TOKENIZER)")
    p.add_argument("--mode", default="both", choices=("offline", "serve", "both"))
    p.add_argument("--arms", help=f"comma list (default offline {OFFLINE_ARMS}, serve {SERVE_ARMS})")
    p.add_argument("--quick", action="store_true",
                   help=f"the workload sized for one ~8-minute GPU call: {QUICK} (default {FULL})")
    p.add_argument("--out", type=Path)
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--serve-prompts", type=int)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int)
    p.add_argument("--output-len", type=int)
    p.add_argument("--reps", type=int, help="timed offline passes per arm")
    p.add_argument("--warmup-reps", type=int,
                   help="discarded full offline passes before the timed ones (0: none, not even the 16-prompt one)")
    p.add_argument("--warmup-max-reps", type=int, default=4,
                   help="offline: after --warmup-reps passes, more discarded full passes while the last one "
                        "JIT-compiled a kernel, up to this many in all (default 4; each arm's JSON lists the "
                        "compiles per warm-up pass)")
    p.add_argument("--rounds", type=int, default=1,
                   help="offline: run the arms this many times in turn (A B A B ...), each run a fresh process, and "
                        "pool every round's timed passes per arm: a drift of the machine over the call then hits "
                        "every arm alike; the per-round ratios are reported too (default 1)")
    p.add_argument("--gate-log-paired", action="store_true",
                   help="offline, arms with gate logs: the timed passes alternate gate log on / paused in one "
                        "engine (ABBA blocks; Worker.moekern_gate_log between passes) and the arm reports the "
                        "overhead over adjacent pairs with a bootstrap interval; its own numbers are the on "
                        "passes. Needs an even --reps >= 2. Measures the per-step host side; the layers' "
                        "in-graph count adds run in both halves")
    p.add_argument("--shape-sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="before the warm-up passes (offline) or the warm-up bench (serve), one forward step of "
                        "each size M that meets every fused-MoE tile config and divisibility variant up to the "
                        "batch-token budget (MOE_CONFIG_KEYS; ~300 one-token requests); on by default")
    p.add_argument("--serve-reps", type=int, help="timed `vllm bench serve` runs per arm (after one warm-up run)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-mem", type=float, default=0.85)
    p.add_argument("--max-num-seqs", type=int, default=128,
                   help="vLLM max_num_seqs (CUDA graphs are captured up to it); default 128")
    p.add_argument("--max-num-batched-tokens", type=int, help="vLLM max_num_batched_tokens (default: vLLM's)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="vLLM expert parallelism: the MoE layers' experts split over the --tensor-parallel-size "
                        "ranks (each rank's gate log then holds its own routed tokens; needs "
                        "--tensor-parallel-size > 1)")
    p.add_argument("--enable-eplb", action="store_true",
                   help="vLLM expert-parallel load balancing (turns on expert parallelism; needs "
                        "--tensor-parallel-size > 1)")
    p.add_argument("--dataset", type=Path,
                   help="JSONL of prompts from `moekern datasets generate` instead of random tokens: tokenized "
                        "with the model's tokenizer offline, vLLM's custom dataset in serve mode")
    p.add_argument("--dummy-router-seed", type=int, default=None, metavar="SEED",
                   help="study tool for dummy weights: re-draw each MoE layer's router from its own seed in every "
                        "arm (MOEKERN_DUMMY_ROUTER_SEED; vLLM's dummy loader gives all layers the same router)")
    p.add_argument("--gate-log-dir", type=Path,
                   help="gate logs of every arm go here (one arm) or to DIR/<arm> (several)")
    p.add_argument("--result", type=Path,
                   help="copy the serve bench JSON here with a 'moekern' block describing the run "
                        "(needs --mode serve and one arm; what `moekern sweep` and `moekern report` read)")
    p.add_argument("--concurrency-grid", type=_int_list, metavar="C1,C2,...",
                   help="serve grid: per arm, ONE server, one warm-up bench, then a bench per (rep, dataset, "
                        "concurrency); the concurrency is the client's --max-concurrency (client-side queue depth; "
                        "the server keeps --max-num-seqs); one result JSON per bench in --result-dir")
    p.add_argument("--datasets", type=_path_list, metavar="A.jsonl,B.jsonl",
                   help="serve grid: the datasets (`moekern datasets generate` files); default random tokens")
    p.add_argument("--grid-reps", type=int, default=1, help="serve grid: repetitions of every point (default 1)")
    p.add_argument("--skews", type=_skew_list, metavar="NAME=SKEW,...",
                   help="serve grid: routing skews run inside each server (e.g. uniform=uniform,hot=hot:0:0.5): it "
                        "starts with the first, then the plugin re-draws its routers' skew between benches through "
                        "vLLM's POST /collective_rpc (VLLM_SERVER_DEV_MODE=1), the gate log paused around each switch")
    p.add_argument("--grid-prefix", help="serve grid: result-name prefix (default ARM_sMAXNUMSEQS[...]; one arm only)")
    p.add_argument("--result-dir", type=Path, help="serve grid: where the per-bench result JSON files go")
    p.add_argument("--plan-only", action="store_true", help="print the plan and its time estimate; run nothing")
    p.add_argument("--moe-configs", metavar=f"A.json[{os.pathsep}B.json]",
                   help="tune_moe_shapes.py result files laid over moekern.fused_moe's tile table in every arm "
                        "(MOEKERN_MOE_CONFIGS; copied to OUT/moe_configs/ and named in the results)")
    p.add_argument("--arm-timeout", type=float, default=300)
    p.add_argument("--server-timeout", type=float, default=300)
    p.add_argument("--budget-s", type=float, default=560, help="skip arms that would start after this many seconds")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the preflight (python -m moekern.e2e.preflight; run first by default, a FAIL "
                        "there stops the run)")


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed, defaulted and checked arguments; argparse errors (exit 2) name the bad flag. Touches no
    files except reading the model's committed config.json for its vocab size."""
    p = build_parser()
    return check_args(p, p.parse_args(argv))


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Default and check `args` parsed by `p` (whose error() reports a bad flag: exit 2); returns args."""
    if args.dummy_router_seed is not None and args.dummy_router_seed < 0:
        p.error(f"--dummy-router-seed must be >= 0; got {args.dummy_router_seed}")
    base = QUICK if args.quick else FULL
    for field in ("num_prompts", "serve_prompts", "input_len", "output_len", "reps", "serve_reps", "warmup_reps"):
        v = getattr(args, field)
        if v is None:
            setattr(args, field, getattr(base, field))
        elif v < (0 if field == "warmup_reps" else 1):
            p.error(f"--{field.replace('_', '-')}={v} must be >= {0 if field == 'warmup_reps' else 1}")
    if args.warmup_max_reps < 0:
        p.error(f"--warmup-max-reps={args.warmup_max_reps} must be >= 0")
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds} must be >= 1")
    if args.gate_log_paired and (args.reps < 2 or args.reps % 2):
        p.error(f"--gate-log-paired needs an even --reps >= 2 (on/off pairs); got --reps {args.reps}")
    args.workload = Workload(**{f: getattr(args, f) for f in Workload.__dataclass_fields__})
    args.attention_backend = attention_backend(args.model)
    args.vocab = json.loads(config_path(args.model).read_text())["vocab_size"]
    args.has_tokenizer = False
    modes = ["offline", "serve"] if args.mode == "both" else [args.mode]
    args.arm_plan = {m: (args.arms.split(",") if args.arms else (OFFLINE_ARMS if m == "offline" else SERVE_ARMS))
                     for m in modes}
    for arms in args.arm_plan.values():
        for arm in arms:
            if arm not in ARMS:
                p.error(f"--arms: unknown arm {arm!r}; known {sorted(ARMS)}")
    args.num_arms = len({a for arms in args.arm_plan.values() for a in arms})
    for flag in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size", "concurrency"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')}={v} must be >= 1")
    if args.enable_expert_parallel and args.tensor_parallel_size < 2:
        p.error(f"--enable-expert-parallel needs --tensor-parallel-size > 1 (the ranks the experts are split over); "
                f"got --tensor-parallel-size={args.tensor_parallel_size}")
    if args.enable_eplb and args.tensor_parallel_size < 2:
        p.error(f"--enable-eplb needs --tensor-parallel-size > 1 (vLLM's EPLB balances across the EP group); "
                f"got --tensor-parallel-size={args.tensor_parallel_size}")
    args.enable_expert_parallel = args.enable_expert_parallel or args.enable_eplb  # EPLB balances EP ranks
    if args.dataset is not None and not args.dataset.is_file():
        p.error(f"--dataset {str(args.dataset)!r} is not a file")
    if args.result is not None and (modes != ["serve"] or len(args.arm_plan["serve"]) != 1):
        p.error(f"--result holds one serve run: it needs --mode serve and one arm in --arms; got --mode "
                f"{args.mode} and arms {args.arm_plan}")
    _check_grid_args(p, args, modes)
    if args.moe_configs:
        from moekern.experts.configs import table_from_files

        try:
            table_from_files(args.moe_configs)
        except ValueError as exc:
            p.error(f"--moe-configs: {exc}")
    if args.input_len + args.output_len > args.max_model_len:
        p.error(f"--input-len {args.input_len} + --output-len {args.output_len} must be <= --max-model-len "
                f"{args.max_model_len}")
    return args


def _check_grid_args(p, args, modes) -> None:
    grid_only = [f for f in ("datasets", "grid_prefix", "result_dir", "skews") if getattr(args, f, None) is not None]
    if args.concurrency_grid is None:
        if grid_only or args.grid_reps != 1:
            p.error(f"--{(grid_only or ['grid_reps'])[0].replace('_', '-')} belongs to a serve grid: it needs "
                    f"--concurrency-grid")
        return
    if modes != ["serve"]:
        p.error(f"--concurrency-grid needs --mode serve; got --mode {args.mode}")
    if args.result is not None or args.dataset is not None:
        p.error("--concurrency-grid writes one result per bench to --result-dir and takes --datasets: drop "
                f"{'--result' if args.result is not None else '--dataset'}")
    if args.result_dir is None:
        p.error("--concurrency-grid needs --result-dir (one result JSON per bench goes there)")
    if args.grid_reps < 1:
        p.error(f"--grid-reps={args.grid_reps} must be >= 1")
    if args.grid_prefix is not None and len(args.arm_plan["serve"]) != 1:
        p.error(f"--grid-prefix names one arm's results: it needs one arm in --arms; got {args.arm_plan['serve']}")
    for d in args.datasets or []:
        if not d.is_file():
            p.error(f"--datasets: {str(d)!r} is not a file")
    if len({d.stem for d in args.datasets or []}) != len(args.datasets or []):
        p.error("--datasets: two files share a name stem (the result names would collide)")
