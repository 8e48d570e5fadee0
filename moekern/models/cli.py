"""`moekern models`: the registry's models and their sizes."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the registered MoE model shapes")
    p.add_argument("--json", action="store_true", help="print the registry as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import json

    from moekern.models import MODELS

    if args.json:
        print(json.dumps({k: v.to_dict() for k, v in MODELS.items()}, indent=1))
        return 0
    print(f"{'model':20s} {'H':>6s} {'I':>6s} {'E':>4s} {'k':>3s} {'layers':>6s}  scoring")
    for m in MODELS.values():
        print(f"{m.name:20s} {m.hidden_size:6d} {m.intermediate_size:6d} {m.num_experts:4d} {m.top_k:3d} "
              f"{m.num_layers:6d}  {m.scoring if m.is_moe else 'dense'}")
    return 0
