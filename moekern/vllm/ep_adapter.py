"""vLLM 0.26's modular prepare/finalize (FusedMoEPrepareAndFinalizeModular) backed by moekern.ep.

    pf = make_prepare_finalize(group=ep_group)              # needs vllm importable
    kernel = mk.FusedMoEKernel(pf, TritonExperts(moe_config, quant_config))
    out = kernel.apply(x, w13, w2, topk_weights, topk_ids, activation=..., global_num_experts=E,
                       expert_map=layer.expert_map, apply_router_weight_on_input=False)

prepare: moekern.ep.dispatch(group_by_expert=False) sends each token once to every rank owning one of its
  experts and returns (recv_x, None, ExpertTokensMetadata(expert counts), recv_topk_ids, recv_topk_weights).
  The ids are handed back in vLLM's *global* expert space, as DeepEP-HT's prepare does
  (prepare_finalize/deepep_ht.py:215-231): local id + rank * E/W, and a slot whose expert lives on another
  rank gets a global id that the layer's expert_map sends to -1 (E-1 on rank 0, 0 elsewhere). So the
  experts class (TritonExperts) needs no change: with expert_map it skips those slots (zero rows), and
  their weights are 0 anyway. At W = 1 there are no such slots and expert_map is None.
finalize: the experts' weight-and-reduce (TritonExperts: TopKWeightAndReduceNoOP, its output is already
  [R, H] weighted and summed over k; a Delegate becomes TopKWeightAndReduceContiguous) gives one partial
  row per received token; moekern.ep.combine(layout="token") sends it back and sums it onto the source
  token (fp32, rank order), written into `output`.

Scope: activations unquantized (quant_config.quant_dtype None; weights may be anything the experts
accept), apply_router_weight_on_input False, vLLM's linear expert placement with E divisible by W
(checked against expert_map), no DBO/async (supports_async False, so vLLM runs prepare/finalize
synchronously and asserts DBO is off), one prepare in flight per object, eager mode only (dispatch
reads counts on the host, so the layer cannot be captured in a CUDA graph: run vLLM with --enforce-eager).
Rows whose topk_ids vLLM marks -1 (VLLM_MOE_SKIP_PADDING=1) are rejected by dispatch's range check.
The pure-torch pieces (ids conversion, expert_map check, ep_prepare / ep_finalize) import no vLLM and are
tested on CPU; vLLM is imported only inside make_prepare_finalize / check_adapter_matches_no_ep.

vLLM 0.26.0 interface this implements, read in /work/ref/vllm/model_executor/layers/fused_moe/
(file:line, for a reviewer to check):
  modular_kernel.py:181  class FusedMoEPrepareAndFinalize(ABC); :258 class
                         FusedMoEPrepareAndFinalizeModular(FusedMoEPrepareAndFinalize), no __init__ args.
  modular_kernel.py:200  @property @abstractmethod activation_format(self) -> FusedMoEActivationFormat
                         (must equal the experts' activation_format(), asserted at :1605; TritonExperts
                         is Standard, experts/triton_moe.py:78).
  modular_kernel.py:210  topk_indices_dtype(self) -> torch.dtype | None  (None: no restriction)
  modular_kernel.py:220  max_num_tokens_per_rank(self) -> int | None      (None: not batched)
  modular_kernel.py:231  num_dispatchers(self) -> int
  modular_kernel.py:235  output_is_reduced(self) -> bool   (True: finalize already holds the sum over all
                         ranks' experts, so runner/moe_runner.py:458-464 skips its TP all-reduce; as
                         DeepEP-HT, deepep_ht.py:83-84)
  modular_kernel.py:242  supports_async(self) -> bool  (default False; then :1163 prepare and :1338
                         finalize are called, prepare_async/finalize_async never)
  modular_kernel.py:191  post_init_setup(self, fused_experts), :249 on_commit(self): defaults kept.
  modular_kernel.py:265  prepare(self, a1, topk_weights, topk_ids, num_experts, expert_map,
                         apply_router_weight_on_input, quant_config, defer_input_quant) -> PrepareResultType
                         (:152: (a1q, a1q_scale | None, ExpertTokensMetadata | None, topk_ids | None,
                         topk_weights | None); None ids/weights mean "unchanged", :1224-1227).
                         Called at :1174 with defer_input_quant as keyword.
  modular_kernel.py:97   ExpertTokensMetadata(expert_num_tokens: Tensor, expert_num_tokens_cpu: Tensor | None)
  modular_kernel.py:355  finalize(self, output, fused_expert_output, topk_weights, topk_ids,
                         apply_router_weight_on_input, weight_and_reduce_impl) -> None; output [M, H]
                         written in place; topk_ids/weights are the ones prepare returned (:1224).
  modular_kernel.py:1258 R == 0 received rows: the experts are skipped and fused_expert_output is
                         empty_like(a1q) = [0, H]; finalize must still join the combine.
  topk_weight_and_reduce.py:11 TopKWeightAndReduceDelegate (apply raises: the P/F chooses), :44 NoOP
                         (apply(output=None, ...) returns fused_expert_output), :80 Contiguous
                         ([R, k, H] -> weights applied in place, moe_sum -> [R, H]).
  modular_kernel.py:1538 FusedMoEKernel(prepare_finalize, fused_experts); :1649 apply(hidden_states, w1, w2,
                         topk_weights, topk_ids, activation, global_num_experts, expert_map,
                         apply_router_weight_on_input, ...). (0.26 has no class named FusedMoEModularKernel.)
  expert_map_manager.py:22 determine_expert_map: ep_size 1 -> None; "linear" placement gives rank r the
                         experts [r*E/W, (r+1)*E/W) when W divides E (our layout), "round_robin" does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekern.ep.api import combine, dispatch
from moekern.ep.common import EpHandle, group_info

# ---------------------------------------------------------------------------------- pure torch pieces


def linear_expert_map(num_experts: int, rank: int, world_size: int, device=None) -> torch.Tensor | None:
    """[E] int32 global -> local expert id, -1 off-rank: vLLM's "linear" placement when W divides E.

    None at W = 1 (vLLM passes no expert_map then).
    """
    if world_size == 1:
        return None
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} must be divisible by the world size W={world_size}")
    El = num_experts // world_size
    m = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    m[rank * El:(rank + 1) * El] = torch.arange(El, dtype=torch.int32, device=device)
    return m


def check_expert_map(expert_map: torch.Tensor | None, num_experts: int, rank: int, world_size: int) -> None:
    """Raise unless expert_map is the placement moekern.ep assumes (rank r owns [r*E/W, (r+1)*E/W)).

    expert_map: [E] int (vLLM layer.expert_map) or None (allowed only at W = 1). Syncs the device once.
    """
    want = linear_expert_map(num_experts, rank, world_size)
    if expert_map is None:
        if want is not None:
            raise ValueError(f"expert_map is None but the EP group has W={world_size} ranks; moekern.ep needs "
                             "vLLM's linear placement map")
        return
    if want is None:
        want = torch.arange(num_experts, dtype=torch.int32)
    if expert_map.dim() != 1 or expert_map.numel() != num_experts:
        raise ValueError(f"expert_map must have shape [num_experts={num_experts}]; got {tuple(expert_map.shape)}")
    if not torch.equal(expert_map.detach().cpu().to(torch.int32), want):
        raise ValueError(
            f"expert_map on rank {rank} of W={world_size} is not the linear placement moekern.ep uses "
            f"(experts [{rank * (num_experts // world_size)}, {(rank + 1) * (num_experts // world_size)}) "
            "local, in order); --expert-placement-strategy round_robin and EPLB remapping are not supported")


def to_vllm_topk_ids(local_ids: torch.Tensor, rank: int, world_size: int, num_experts: int,
                     dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """[R, k] local ids (-1 off-rank) -> [R, k] global ids in vLLM's convention for dispatched ids.

    On-rank slots: local + rank * E/W. Off-rank slots: a global expert owned by another rank, so vLLM's
    expert_map sends it to -1 (E-1 on rank 0, 0 on the others; W = 1 has no off-rank slots).
    """
    El = num_experts // world_size
    off = num_experts - 1 if rank == 0 else 0
    ids = local_ids.long()
    return torch.where(ids >= 0, ids + rank * El, torch.full_like(ids, off)).to(dtype)


@dataclass
class EpPrepared:
    """What prepare hands to the experts, plus the handle finalize needs.

    recv_x: [R, H] a1's dtype; topk_ids: [R, k] global ids (to_vllm_topk_ids), a1's topk_ids dtype;
    topk_weights: [R, k] the input weights' dtype, 0 off-rank; expert_counts: [E/W] int32.
    """

    recv_x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    expert_counts: torch.Tensor
    handle: EpHandle


def ep_prepare(a1, topk_weights, topk_ids, num_experts: int, *, group=None, backend: str = "nccl",
               world=None) -> EpPrepared:
    """moekern.ep.dispatch with the received ids and weights put in vLLM's convention.

    a1: [M, H] bf16|fp16|fp32; topk_weights: [M, k] float; topk_ids: [M, k] int32|int64 global ids.
    """
    rank, W = group_info(group)
    out, handle = dispatch(a1, topk_ids, topk_weights, num_experts, group=group, backend=backend, world=world,
                           group_by_expert=False)
    ids = to_vllm_topk_ids(out.recv_topk_ids, rank, W, num_experts, topk_ids.dtype)
    return EpPrepared(out.recv_x, ids, out.recv_topk_weights.to(topk_weights.dtype), out.expert_counts, handle)


def ep_finalize(partial: torch.Tensor, handle: EpHandle, output: torch.Tensor) -> torch.Tensor:
    """Combine per-received-token partials back onto the source tokens, into output.

    partial: [R, H], each received row already weighted and summed over this rank's experts (any float
    dtype; cast to the dispatched dtype, which is what travels); output: [M, H], written in place.
    """
    if partial.dim() != 2:
        raise ValueError(f"partial must be [R, H]; got shape {tuple(partial.shape)}")
    output.copy_(combine(partial.to(handle.dtype).contiguous(), handle, layout="token"))
    return output


# ------------------------------------------------------------------------------------ the vLLM class


def make_prepare_finalize(num_experts: int | None = None, *, group=None, backend: str = "nccl", world=None):
    """A vLLM FusedMoEPrepareAndFinalizeModular instance backed by moekern.ep (needs vllm importable).

    num_experts: E (None: take the global_num_experts vLLM passes to prepare). group: the EP process group
    (vLLM: get_ep_group().device_group; None: the default group, or W = 1 without torch.distributed).
    backend/world: as moekern.ep.dispatch ("nccl" is the portable all_to_all path).
    """
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceContiguous,
        TopKWeightAndReduceDelegate,
    )

    rank, world_size = group_info(group)

    class MoekernEPPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
        def __init__(self):
            super().__init__()
            self._handle = None
            self._checked_map = None  # (data_ptr, E) of the expert_map already checked

        @property
        def activation_format(self):
            return mk.FusedMoEActivationFormat.Standard

        def topk_indices_dtype(self):
            return None  # dispatch takes int32 and int64; ids come back in the input's dtype

        def max_num_tokens_per_rank(self):
            return None

        def num_dispatchers(self) -> int:
            return world_size

        def output_is_reduced(self) -> bool:
            return True

        def supports_async(self) -> bool:
            return False

        def prepare(self, a1, topk_weights, topk_ids, num_experts_arg, expert_map, apply_router_weight_on_input,
                    quant_config, defer_input_quant=False):
            if apply_router_weight_on_input:
                raise NotImplementedError("moekern.ep adapter: apply_router_weight_on_input=True is not supported")
            quant_dtype = getattr(quant_config, "quant_dtype", None)
            if quant_dtype is not None:
                raise NotImplementedError(
                    f"moekern.ep adapter: activation quant_dtype={quant_dtype} is not supported (unquantized only)")
            if num_experts is not None and num_experts_arg != num_experts:
                raise ValueError(f"num_experts={num_experts_arg} differs from the adapter's num_experts={num_experts}")
            if self._handle is not None:
                raise RuntimeError("prepare called twice without finalize (one dispatch in flight per adapter)")
            key = None if expert_map is None else (expert_map.data_ptr(), num_experts_arg)
            if key is None or key != self._checked_map:
                check_expert_map(expert_map, num_experts_arg, rank, world_size)
                self._checked_map = key
            p = ep_prepare(a1, topk_weights, topk_ids, num_experts_arg, group=group, backend=backend, world=world)
            self._handle = p.handle
            meta = mk.ExpertTokensMetadata(expert_num_tokens=p.expert_counts, expert_num_tokens_cpu=None)
            return p.recv_x, None, meta, p.topk_ids, p.topk_weights

        def finalize(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                     weight_and_reduce_impl):
            if self._handle is None:
                raise RuntimeError("finalize called before prepare")
            handle, self._handle = self._handle, None
            if fused_expert_output.numel() == 0:  # no rows reached this rank; still join the combine
                partial = output.new_empty(0, output.shape[-1])
            else:
                if isinstance(weight_and_reduce_impl, TopKWeightAndReduceDelegate):
                    weight_and_reduce_impl = TopKWeightAndReduceContiguous()
                partial = weight_and_reduce_impl.apply(
                    output=None, fused_expert_output=fused_expert_output, topk_weights=topk_weights,
                    topk_ids=topk_ids, apply_router_weight_on_input=apply_router_weight_on_input)
            ep_finalize(partial, handle, output)

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

    def experts(a, topk_ids):  # [M', k, H]: expert e multiplies by (e + 1)
        s = scale[topk_ids.long()]
        return (a.float().unsqueeze(1) * s.unsqueeze(2)).to(a.dtype)

    outs = []
    for pf in (MoEPrepareAndFinalizeNoDPEPModular(), make_prepare_finalize(E)):
        a, _, _, pids, pw = pf.prepare(x, w, ids, E, None, False, FUSED_MOE_UNQUANTIZED_CONFIG,
                                       defer_input_quant=False)
        pids = ids if pids is None else pids
        pw = w if pw is None else pw
        out = torch.empty_like(x)
        pf.finalize(out, experts(a, pids), pw, pids, False, TopKWeightAndReduceContiguous())
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
