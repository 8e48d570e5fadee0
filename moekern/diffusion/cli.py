"""`moekern diffusion generate|bench`: masked-diffusion inference on moekern kernels (see README.md here)."""

from __future__ import annotations

import sys
from pathlib import Path

from moekern.cliargs import existing_dir, existing_path, model_name, phase, positive_int


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of ints; got {text!r}") from None


def _add_model_args(p) -> None:
    p.add_argument("--model", type=model_name, default="llada-moe-7b", help="registry model (llada-moe-7b, llada-8b)")
    p.add_argument("--checkpoint", type=existing_dir, metavar="DIR", default=None,
                   help="load safetensors weights from DIR (names: see moekern/diffusion/checkpoint.py); "
                        "default: random weights")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (tiny test models)")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--rope-theta", type=float, default=None)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--backend", default="moekern", help="MoE backend: moekern | vllm | torch"
                   " (bench: a comma list, default moekern,vllm,torch)")
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "cuda"),
                   help="moekern kernels for --backend moekern (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0: Gumbel noise")


def add_parser(sub) -> None:
    p = sub.add_parser("diffusion", help="LLaDA-style masked-diffusion LM: generate, bench")
    dsub = p.add_subparsers(dest="diffusion_command", metavar="SUBCOMMAND")
    g = dsub.add_parser("generate", help="generate from token-id prompts by block-wise masked diffusion")
    _add_model_args(g)
    g.add_argument("--prompt-ids", action="append", required=True, metavar="IDS",
                   help="comma-separated token ids; repeat for a batch (left-padded)")
    g.add_argument("--gen-length", type=positive_int, default=32)
    g.add_argument("--block-length", type=positive_int, default=8)
    g.add_argument("--steps", type=positive_int, default=32)
    g.add_argument("--gate-log", metavar="PATH", default=None, help="append moekern.gatelog/1 records here")
    g.add_argument("--ar", action="store_true", help="decode autoregressively (causal) instead")
    g.set_defaults(func=_generate)
    b = dsub.add_parser("bench", help="tokens/s, step latency, MoE share, routing CV vs (L, B, S, batch)")
    _add_model_args(b)
    b.set_defaults(backend="moekern,vllm,torch")
    b.add_argument("--gen-lengths", default="128,256", help="comma list of L")
    b.add_argument("--block-lengths", default="32", help="comma list of B")
    b.add_argument("--steps", default="32,64,128", help="comma list of S (invalid (L, B, S) are skipped)")
    b.add_argument("--batch-sizes", default="1,8", help="comma list of N")
    b.add_argument("--prompt-length", type=int, default=64)
    b.add_argument("--no-ar", action="store_true", help="skip the autoregressive baseline")
    b.add_argument("--out", default="benchmarks/results/diffusion", help="output directory (JSON + PNG)")
    b.add_argument("--tag", default=None, help="file name stem (default diffusion_<model>_<device>)")
    b.add_argument("--gate-logs", action="store_true",
                   help="write each timed diffusion run's gate log under OUT/<tag>_gate_logs/<backend>_<case>/")
    b.add_argument("--ar-gate-log", default=None, metavar="PATH",
                   help="an end-to-end (vLLM) gate log of the same-shape model: its decode steps are put next to "
                        "the first diffusion case's denoising steps (implies --gate-logs; refuses an E/top-k "
                        "mismatch unless --allow-shape-mismatch)")
    b.add_argument("--allow-shape-mismatch", action="store_true",
                   help="compare anyway when E or top-k differ (every output is labelled SHAPE MISMATCH)")
    b.set_defaults(func=_bench)
    c = dsub.add_parser("compare", help="routing imbalance: AR decode (e2e gate log) vs diffusion denoising steps")
    c.add_argument("--ar", type=existing_path, required=True, metavar="PATH",
                   help="AR gate log (file or folder), e.g. moekern e2e's")
    c.add_argument("--diffusion", type=existing_path, required=True, metavar="PATH",
                   help="diffusion gate log (file or folder)")
    c.add_argument("--ar-phase", type=phase, default="decode", help="phase kept from the AR log (default decode)")
    c.add_argument("--max-tokens", type=positive_int, default=None, help="drop steps above N tokens (both sides)")
    c.add_argument("--allow-shape-mismatch", action="store_true",
                   help="compare anyway when E or top-k differ (every output is labelled SHAPE MISMATCH)")
    c.add_argument("--out", default="benchmarks/results/diffusion", help="output directory")
    c.add_argument("--tag", default="ar_vs_diffusion", help="file name stem")
    c.set_defaults(func=_compare)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _build_model(args):
    import torch

    from moekern.diffusion import config_from_registry, config_overrides_from_hf, init_random, load_checkpoint

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    over = config_overrides_from_hf(args.checkpoint) if args.checkpoint else {}
    cli = dict(num_layers=args.layers, hidden_size=args.hidden_size, num_heads=args.num_heads,
               num_experts=args.num_experts, top_k=args.top_k, intermediate_size=args.intermediate_size,
               vocab_size=args.vocab_size, rope_theta=args.rope_theta)
    over.update({k: v for k, v in cli.items() if v is not None})
    cfg = config_from_registry(args.model, **over)
    if args.checkpoint:
        return load_checkpoint(args.checkpoint, cfg, device=dev, dtype=dtype)
    return init_random(cfg, device=dev, dtype=dtype, seed=args.seed)


def _generate(args) -> int:
    import json

    from moekern.diffusion import ar_generate, generate, write_gate_log

    try:
        prompts = [_ints(t) for t in args.prompt_ids]
        model = _build_model(args)
        kw = dict(gen_length=args.gen_length, temperature=args.temperature, seed=args.seed,
                  moe_backend=args.backend, kernels=args.kernels)
        if args.ar:
            res = ar_generate(model, prompts, **kw)
        else:
            res = generate(model, prompts, block_length=args.block_length, steps=args.steps, **kw)
    except (ValueError, TypeError, KeyError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = {"generated": res.generated.tolist(), "prompt_length": res.prompt_length, "num_forwards": len(res.steps),
           "weights": args.checkpoint or "random (tokens are noise)"}
    if args.gate_log and model.config.is_moe:
        out["gate_log_records"] = write_gate_log(res, args.gate_log, model.config.top_k, model=model.config.name)
        out["gate_log"] = args.gate_log
    print(json.dumps(out))
    return 0


def _bench(args) -> int:
    from moekern.diffusion.bench import make_cases, run_bench, write_results

    try:
        backends = [b.strip() for b in args.backend.split(",") if b.strip()]
        from moekern.diffusion import MOE_BACKENDS

        bad = [b for b in backends if b not in MOE_BACKENDS]
        if bad:
            raise ValueError(f"--backend {bad} must be among {MOE_BACKENDS}")
        cases, skipped = make_cases(_ints(args.gen_lengths), _ints(args.block_lengths), _ints(args.steps),
                                    _ints(args.batch_sizes))
        for s in skipped:
            print(f"[diffusion bench] skipped case {s}", file=sys.stderr)
        if not cases:
            raise ValueError("no valid (L, B, S) case: see the skipped cases above")
        model = _build_model(args)
    except (ValueError, TypeError, KeyError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tag = args.tag or f"diffusion_{model.config.name}_{model.device.type}"
    result = None
    # One backend at a time, results rewritten after each: a run cut short (a time limit) keeps what it did.
    for backend in backends:
        gdir = Path(args.out) / f"{tag}_gate_logs" if (args.gate_logs or args.ar_gate_log) else None
        part = run_bench(model, cases, backends=(backend,), kernels=args.kernels, prompt_length=args.prompt_length,
                         ar=not args.no_ar, seed=args.seed, temperature=args.temperature, gate_log_dir=gdir)
        if result is None:
            result = part
            result["skipped"] = [f"case {s}" for s in skipped] + part["skipped"]
            result["weights"] = args.checkpoint or "random"
        else:
            for key in ("diffusion", "ar", "skipped"):
                result[key] += part[key]
        paths = write_results(result, args.out, tag)
        if not model.config.is_moe:
            break  # a dense model has one FFN, whatever the MoE backend
    if args.ar_gate_log:
        from moekern.analysis.diffusion import compare_routing, write_comparison

        logged = [r for r in result["diffusion"] if r.get("gate_log")]
        if not logged:
            print("error: --ar-gate-log: no diffusion gate log was written (dense model or no backend ran)",
                  file=sys.stderr)
            return 2
        try:
            comp = compare_routing(args.ar_gate_log, logged[0]["gate_log"],
                                   allow_shape_mismatch=args.allow_shape_mismatch)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: --ar-gate-log: {exc}", file=sys.stderr)
            return 2
        result["ar_vs_diffusion"] = {"diffusion_case": logged[0]["label"], **comp.to_json()}
        paths = write_results(result, args.out, tag)
        paths += write_comparison(comp, args.out, f"{tag}_ar_vs_diffusion")
        for lab in comp.labels:
            print(f"[diffusion bench] {lab}", file=sys.stderr)
    for p in paths:
        print(p)
    return 0


def _compare(args) -> int:
    from moekern.analysis.diffusion import compare_routing, write_comparison

    try:
        comp = compare_routing(args.ar, args.diffusion, ar_phase=args.ar_phase, max_tokens=args.max_tokens,
                               allow_shape_mismatch=args.allow_shape_mismatch)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for lab in comp.labels:
        print(lab, file=sys.stderr)
    print(comp.table_markdown())
    for p in write_comparison(comp, args.out, args.tag):
        print(p)
    return 0
