"""pytest-benchmark: permute (token rows grouped by expert) and unpermute (the weighted combine), moekern's
cuda and triton backends against the torch reference, one group per (op, model, M).

    pytest benchmarks/bench_permute.py --benchmark-json=bench_permute.json

Shapes: the standard models (moekern.models: E, k, H) at the token counts TOKENS, bf16 rows, the routing of
`moekern bench --ops align` (moekern.bench.shapes.make_inputs: the model's reference routing of random
logits). Every provider of a group gets the same inputs, and its output is checked against the torch
reference before it is timed (permute: rows and layout exact; unpermute: within one bf16 rounding of the
reference, which sums the same fp32 products in the same order). Timing is moekern.bench.timing.time_calls,
as for the other ops (CUDA graph of back-to-back calls, CUDA events; one copy of the inputs, so M=1 stays
in L2 and is latency-bound, as in a decode step); the cuda and triton
calls pass check_ids=False, so they hold no host sync and are graph-captured. extra_info holds the
shape, dtype, GPU and versions, the median/min/max µs, the fraction of the measured copy bandwidth
(bytes each call must move / time) and the speedup over the torch provider of the same group.
Without a GPU every benchmark is skipped (conftest.py).
"""

from __future__ import annotations

import gc

import pytest
import torch

from moekern.models import STANDARD_MODELS

OPS = ("permute", "unpermute")
TOKENS = (1, 64, 1024, 8192)
PROVIDERS = ("torch", "triton", "cuda")  # torch first in a group: the others report their speedup over it
DTYPE = torch.bfloat16

# model -> M outermost: the inputs of one (model, M) are built once and serve both ops
CASES = [(op, model, M, p) for model in STANDARD_MODELS for M in TOKENS for op in OPS for p in PROVIDERS]


class _Session:
    """Inputs of one (model, M) at a time, the torch reference and the torch time of each group."""

    def __init__(self):
        from moekern.bench.runner import environment
        from moekern.bench.timing import measure_hbm_bandwidth

        self.env = environment("cuda")
        self.copy_bytes_per_s = measure_hbm_bandwidth("cuda")  # read + write counted
        self.key = self.inp = None
        self.torch_us: dict[str, float] = {}

    def inputs(self, model: str, M: int) -> dict:
        if self.key != (model, M):
            from moekern.bench.shapes import make_inputs, make_shape, resolve_model
            from moekern.dispatch import permute, unpermute

            self.inp = None
            gc.collect()
            torch.cuda.empty_cache()
            spec = resolve_model(model)
            routed = make_inputs(make_shape("align", spec, M, 64), M, "cuda")
            gen = torch.Generator(device="cuda").manual_seed(1)
            x = torch.randn(M, spec.hidden_size, generator=gen, device="cuda").to(DTYPE)
            permuted, layout = permute(x, routed.topk_ids, spec.num_experts, backend="torch")
            y = torch.randn(permuted.shape, generator=gen, device="cuda").to(DTYPE)  # the experts' outputs
            self.inp = dict(spec=spec, x=x, ids=routed.topk_ids, w=routed.topk_weights, layout=layout, y=y,
                            permuted=permuted, combined=unpermute(y, layout, routed.topk_weights, backend="torch"))
            self.key = (model, M)
        return self.inp


@pytest.fixture(scope="session")
def permute_session():
    return _Session()


def _call(op: str, provider: str, inp: dict):
    """The zero-argument call to time and its output."""
    from moekern.dispatch import permute, unpermute

    kw = {} if provider == "torch" else {"check_ids": False}
    E = inp["spec"].num_experts
    if op == "permute":
        return lambda: permute(inp["x"], inp["ids"], E, backend=provider, **kw)
    return lambda: unpermute(inp["y"], inp["layout"], inp["w"], backend=provider)


def _check(op: str, out, inp: dict) -> None:
    if op == "permute":
        permuted, layout = out
        assert torch.equal(permuted, inp["permuted"]), "permuted rows differ from the torch reference"
        for name in ("sorted_slots", "slot_to_row", "expert_offsets"):
            assert torch.equal(getattr(layout, name), getattr(inp["layout"], name)), f"layout.{name} differs"
    else:
        torch.testing.assert_close(out.float(), inp["combined"].float(), rtol=2**-7, atol=2**-7)


def _bytes_moved(op: str, inp: dict) -> int:
    """What one call must read and write at least: the rows (and ids or the layout and weights)."""
    M, k = inp["ids"].shape
    row = inp["spec"].hidden_size * inp["x"].element_size()
    if op == "permute":
        return 2 * M * k * row + M * k * 4 + 2 * M * k * 4  # gather rows; ids in; sorted_slots, slot_to_row out
    return M * k * row + M * row + M * k * (4 + 4)  # expert rows in, combined rows out; slot_to_row, weights


@pytest.mark.parametrize("case", CASES, ids=[f"{op}/{m}/M={M}/{p}" for op, m, M, p in CASES])
def test_permute(benchmark, permute_session, case):
    from moekern._ext import backend_unavailable_reason
    from moekern.bench.timing import time_calls

    op, model, M, provider = case
    reason = backend_unavailable_reason(provider, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    inp = permute_session.inputs(model, M)
    fn = _call(op, provider, inp)
    _check(op, fn(), inp)  # correctness first: a wrong provider is never timed
    t = time_calls([fn], "cuda", use_graph=provider != "torch")
    group = f"{op}/{model}/M={M}"
    if provider == "torch":
        permute_session.torch_us[group] = t.median_us
    nbytes = _bytes_moved(op, inp)
    benchmark.group = group
    benchmark.extra_info.update(
        op=op, model=model, num_tokens=M, num_experts=inp["spec"].num_experts, top_k=inp["spec"].top_k,
        hidden_size=inp["spec"].hidden_size, dtype=str(DTYPE), provider=provider, timing=t.to_dict(),
        median_us=t.median_us, bytes_moved=nbytes,
        fraction_of_copy_bw=nbytes / (t.median_us * 1e-6) / permute_session.copy_bytes_per_s,
        speedup_vs_torch=(permute_session.torch_us[group] / t.median_us
                          if group in permute_session.torch_us else None),
        env=permute_session.env,
    )

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=2)
