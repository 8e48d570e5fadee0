"""A skeleton mapping vLLM 0.26's modular prepare/finalize (FusedMoEPrepareAndFinalizeModular) onto moekern.ep.

prepare: moekern.ep.dispatch -> (recv_x, None, ExpertTokensMetadata(expert counts), recv_topk_ids (local,
  -1 off-rank), recv_topk_weights (0 off-rank)); the experts run on the received tokens only.
finalize: vLLM's weight-and-reduce turns the experts' [R, k, H] output into [R, H] partials (weights are
  0 off-rank), and moekern.ep.combine(layout="token") sums them back onto the source tokens.
Scope of the skeleton: unquantized activations (quant_config.quant_dtype None), apply_router_weight_on_input
False, one dispatch in flight per object. Off-rank slots rely on the experts kernel leaving finite values in
their rows (weight 0 then removes them); vLLM's expert_map path is not wired in.
vLLM is imported only when make_prepare_finalize is called.
"""

from __future__ import annotations

import torch


def make_prepare_finalize(num_experts: int, *, group=None, backend: str = "nccl", world=None):
    """A vLLM FusedMoEPrepareAndFinalizeModular instance backed by moekern.ep (needs vllm importable)."""
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceContiguous,
        TopKWeightAndReduceDelegate,
    )

    from moekern.ep.api import _group_info, combine, dispatch

    _, world_size = _group_info(group)

    class MoekernEPPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
        def __init__(self):
            super().__init__()
            self._handle = None

        @property
        def activation_format(self):
            return mk.FusedMoEActivationFormat.Standard

        def topk_indices_dtype(self):
            return torch.int32

        def max_num_tokens_per_rank(self):
            return None

        def num_dispatchers(self) -> int:
            return world_size

        def output_is_reduced(self) -> bool:
            return False

        def prepare(self, a1, topk_weights, topk_ids, num_experts_arg, expert_map, apply_router_weight_on_input,
                    quant_config, defer_input_quant=False):
            if apply_router_weight_on_input:
                raise NotImplementedError("moekern.ep adapter: apply_router_weight_on_input=True is not supported")
            if quant_config is not None and quant_config.quant_dtype is not None:
                raise NotImplementedError(
                    f"moekern.ep adapter: quant_dtype={quant_config.quant_dtype} is not supported (bf16 only)")
            if num_experts_arg != num_experts:
                raise ValueError(f"num_experts={num_experts_arg} differs from the adapter's {num_experts}")
            out, self._handle = dispatch(a1, topk_ids, topk_weights, num_experts, group=group, backend=backend,
                                         world=world, group_by_expert=False)
            meta = mk.ExpertTokensMetadata(expert_num_tokens=out.expert_counts, expert_num_tokens_cpu=None)
            return out.recv_x, None, meta, out.recv_topk_ids, out.recv_topk_weights

        def finalize(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                     weight_and_reduce_impl):
            if self._handle is None:
                raise RuntimeError("finalize called before prepare")
            if isinstance(weight_and_reduce_impl, TopKWeightAndReduceDelegate):
                weight_and_reduce_impl = TopKWeightAndReduceContiguous()
            partial = weight_and_reduce_impl.apply(
                output=None, fused_expert_output=fused_expert_output, topk_weights=topk_weights,
                topk_ids=topk_ids, apply_router_weight_on_input=apply_router_weight_on_input)
            output.copy_(combine(partial.to(output.dtype), self._handle, layout="token"))
            self._handle = None

    return MoekernEPPrepareAndFinalize()


def check_adapter_matches_no_ep(device="cuda", M=37, H=256, E=16, k=4, seed=0) -> None:
    """W = 1: prepare/finalize through the adapter equals vLLM's no-EP prepare/finalize (raises if not)."""
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import MoEPrepareAndFinalizeNoDPEPModular
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceContiguous

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g).to(torch.bfloat16).to(device)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]).to(torch.int32).to(device)
    w = torch.rand(M, k, generator=g).to(device)
    scale = torch.arange(1, E + 1, dtype=torch.float32, device=device)

    def experts(a, topk_ids):  # [M', k, H]: expert e multiplies by (e + 1); off-rank (-1) slots give 0
        s = torch.where(topk_ids >= 0, scale[topk_ids.long().clamp(min=0)], 0.0)
        return (a.float().unsqueeze(1) * s.unsqueeze(2)).to(a.dtype)

    outs = []
    for pf in (MoEPrepareAndFinalizeNoDPEPModular(), make_prepare_finalize(E)):
        a, _, _, pids, pw = pf.prepare(x, w, ids, E, None, False, FUSED_MOE_UNQUANTIZED_CONFIG)
        pids = ids if pids is None else pids
        pw = w if pw is None else pw
        out = torch.empty_like(x)
        pf.finalize(out, experts(a, pids), pw, pids, False, TopKWeightAndReduceContiguous())
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
