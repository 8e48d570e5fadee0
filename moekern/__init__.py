"""moekern: fused Mixture-of-Experts kernels (routing, dispatch, experts, expert-parallel all-to-all).

Data flows one way: routing -> dispatch -> experts -> combine. Each op is one public function with a
`backend=` argument ("auto", "torch", "triton", "cuda"):

    import moekern
    out = moekern.fused_topk(router_logits, top_k=8)          # RoutingOutput(weights, ids, counts)
    y = moekern.fused_moe(x, w13, w2, router_logits, top_k=8)  # a whole MoE layer
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Parts load on first use, so `import moekern` stays cheap and the analysis (moekern.analysis,
# moekern.gatelog) runs without importing torch.
_LAZY = {
    "fused_topk": "moekern.routing",
    "fused_topk_reference": "moekern.routing",
    "RoutingOutput": "moekern.routing",
    "align": "moekern.dispatch",
    "permute": "moekern.dispatch",
    "unpermute": "moekern.dispatch",
    "AlignOutput": "moekern.dispatch",
    "route_and_align": "moekern.dispatch",
    "RouteOutput": "moekern.dispatch",
    "PermuteLayout": "moekern.dispatch",
    "fused_moe": "moekern.experts",
    "ep": "moekern.ep",
    "diffusion": "moekern.diffusion",
    "models": "moekern.models",
    "gatelog": "moekern.gatelog",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moekern' has no attribute {name!r}")
