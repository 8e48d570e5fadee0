"""`moekern models`: the registry's models, their parameter counts and weight bytes per GPU."""

from __future__ import annotations

from moekern.cliargs import model_name, positive_float, positive_int
from moekern.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the registered MoE model shapes, sizes and memory per GPU")
    p.add_argument("--json", action="store_true", help="print the registry (with sizes) as JSON")
    p.add_argument("--gpus", type=positive_int, default=8, help="GPUs for the TP / EP / hybrid columns (default 8)")
    p.add_argument("--dtype-bytes", type=positive_float, default=2.0, help="bytes per weight (2 = bf16, 1 = fp8)")
    p.add_argument("--write-config", metavar="DIR", default=None,
                   help="with --model: write a dummy-weight HF config.json into DIR (for vLLM --load-format dummy)")
    p.add_argument("--model", type=model_name, default=None,
                   help="only this model: a registry key or alias (e.g. mixtral, deepseek-v3)")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="with --write-config: number of layers (fewer than the model's: a faster dummy model)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import json
    import sys

    from moekern.models import MODELS, get_model, param_counts, standard_layouts, weight_bytes_per_gpu
    from moekern.models.hf import write_hf_config

    specs = [get_model(args.model)] if args.model else list(MODELS.values())
    if args.write_config:
        if not args.model:
            raise UsageError(f"--write-config {args.write_config!r} needs --model (which model's config to write)")
        try:
            print(write_hf_config(specs[0], args.write_config, args.layers))
        except ValueError as exc:
            raise UsageError(f"--write-config: {exc}") from None
        return 0
    rows = []
    for m in specs:
        pc = param_counts(m)
        mem = {}
        for name, (tp, ep) in standard_layouts(m, args.gpus).items():
            mem[name] = weight_bytes_per_gpu(m, tp, ep, args.dtype_bytes)["total_bytes"]
        rows.append((m, pc, mem))
    if args.json:
        print(json.dumps({m.name: {**m.to_dict(), "params": pc.to_dict(), "weight_bytes_per_gpu": mem,
                                   "gpus": args.gpus, "dtype_bytes": args.dtype_bytes}
                          for m, pc, mem in rows}, indent=1))
        return 0
    g = args.gpus
    print(f"weights per GPU in GB at {args.dtype_bytes:g} B/param on {g} GPUs: TP{g} | EP{g} (data-parallel "
          f"attention) | TP{g}+EP{g} (TP attention, EP experts)")
    print(f"{'model':18s} {'H':>5s} {'I':>6s} {'E':>4s} {'k':>2s} {'sh':>2s} {'L':>3s} {'total':>7s} {'active':>7s}"
          f" {'TP':>7s} {'EP':>7s} {'hybrid':>7s}  scoring")
    for m, pc, mem in rows:
        vals = list(mem.values()) + [float("nan")] * (3 - len(mem))
        print(f"{m.name:18s} {m.hidden_size:5d} {m.intermediate_size:6d} {m.num_experts:4d} {m.top_k:2d} "
              f"{m.num_shared_experts:2d} {m.num_layers:3d} {pc.total / 1e9:6.1f}B {pc.active / 1e9:6.2f}B "
              + " ".join(f"{v / 1e9:7.1f}" for v in vals)
              + f"  {m.scoring if m.is_moe else 'dense'}")
    return 0
