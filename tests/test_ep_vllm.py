"""moekern.vllm.ep_adapter: vLLM 0.26's modular prepare/finalize routed through moekern.ep.

CPU (no vLLM): the adapter's pure-torch pieces against moekern.ep.reference, at W = 1 in process and
W = 2 on gloo (ids handed back in vLLM's global convention must map, through vLLM's linear expert_map,
exactly onto this rank's slots; combine must equal combine_reference bit for bit, with test_ep's exact
integer inputs). The adapter class itself also runs against a stand-in for the few vLLM names it imports,
when vLLM is absent (checks the abstract interface is complete and the error paths).
GPU (vLLM importable): W = 1 on one GPU in a one-rank torch.distributed group, vLLM's
FusedMoEKernel(our prepare/finalize, TritonExperts) against vLLM's own no-EP kernel (bit-exact: the same
experts kernel runs on the same rows, and a one-rank combine is a copy), vLLM's fused_experts and
moekern's fused_moe_reference (bf16 norm-relative error < 1e-2, as tests/test_moe.py).
"""

from __future__ import annotations

import abc
import datetime
import enum
import os
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekern.ep.reference import apply_experts, combine_reference, dispatch_reference
from moekern.vllm.ep_adapter import (
    check_expert_map,
    ep_finalize,
    ep_prepare,
    linear_expert_map,
    make_prepare_finalize,
    to_vllm_topk_ids,
)
from test_ep import SKEWS, _free_port, expert_fn, make_inputs


def _vllm_available() -> bool:
    try:
        import vllm.model_executor.layers.fused_moe.modular_kernel  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no usable vLLM here"
        return False
    return True


HAS_VLLM = _vllm_available()

# ----------------------------------------------------------------------------------- pure torch pieces


@pytest.mark.parametrize("W", [1, 2, 4])
def test_to_vllm_topk_ids_round_trips_through_expert_map(W):
    E = 8
    El = E // W
    g = torch.Generator().manual_seed(W)
    for rank in range(W):
        local = torch.randint(-1, El, (33, 3), generator=g, dtype=torch.int32)
        if W == 1:
            local = local.clamp(min=0)  # one rank owns every expert: no off-rank slots exist
        ids = to_vllm_topk_ids(local, rank, W, E, torch.int64)
        assert ids.dtype == torch.int64
        assert bool(((ids >= 0) & (ids < E)).all()), "every id must index vLLM's expert_map"
        on = local >= 0
        assert torch.equal(ids[on], local[on].long() + rank * El)
        emap = linear_expert_map(E, rank, W)
        back = ids if emap is None else emap[ids].long()
        assert torch.equal(back, local.long()), f"rank {rank}: expert_map(ids) must give the local id or -1"


def test_linear_expert_map_and_check():
    assert linear_expert_map(8, 0, 1) is None
    assert linear_expert_map(8, 1, 2).tolist() == [-1] * 4 + [0, 1, 2, 3]
    check_expert_map(None, 8, 0, 1)
    check_expert_map(torch.arange(8, dtype=torch.int32), 8, 0, 1)
    check_expert_map(linear_expert_map(8, 1, 4).long(), 8, 1, 4)  # dtype does not matter
    with pytest.raises(ValueError, match="expert_map is None"):
        check_expert_map(None, 8, 0, 2)
    round_robin = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32)
    with pytest.raises(ValueError, match="round_robin"):
        check_expert_map(round_robin, 8, 0, 2)
    with pytest.raises(ValueError, match="num_experts=8"):
        check_expert_map(torch.arange(4, dtype=torch.int32), 8, 0, 1)
    with pytest.raises(ValueError, match="divisible"):
        linear_expert_map(9, 0, 2)


def vllm_like_experts(recv_x, topk_ids, topk_weights, expert_map, rank, E, W):
    """What TritonExperts computes, with expert e := x * (e + 1): ids through expert_map (-1: skipped),
    weights applied, summed over k in fp32, rounded once: [R, H]."""
    local = topk_ids.long() if expert_map is None else expert_map[topk_ids.long()].long()
    acc = torch.zeros(recv_x.shape, dtype=torch.float32)
    for j in range(topk_ids.shape[1]):
        on = local[:, j] >= 0
        if on.any():
            y = apply_experts(recv_x[on], local[on, j] + rank * (E // W), expert_fn)
            acc[on] += y.float() * topk_weights[on, j].float().unsqueeze(1)
    return acc.to(recv_x.dtype)


def _check_rank(rank, W, c, group):
    E = c["E_per_rank"] * W
    k = min(c["k"], E)
    dtype = torch.bfloat16 if c["bf16"] else torch.float32
    ids_dtype = torch.int64 if c["ids64"] else torch.int32
    xs, ids, ws = make_inputs(c["seed"], W, E, k, c["H"], c["Ms"][:W], c["skew"], dtype)
    ids = [i.to(ids_dtype) for i in ids]
    tag = f"rank {rank} W={W} case {c}"
    p = ep_prepare(xs[rank], ws[rank], ids[rank], E, group=group, backend="nccl")
    ref = dispatch_reference(xs, ids, ws, E, ranks=[rank])[rank]
    assert torch.equal(p.recv_x, ref.recv_x), tag
    assert p.topk_ids.dtype == ids_dtype, tag
    assert torch.equal(p.topk_ids, to_vllm_topk_ids(ref.recv_topk_ids, rank, W, E, ids_dtype)), tag
    assert p.topk_weights.dtype == ws[rank].dtype and torch.equal(p.topk_weights, ref.recv_topk_weights), tag
    on = ref.recv_topk_ids >= 0
    want_counts = torch.bincount(ref.recv_topk_ids[on].long(), minlength=E // W).to(torch.int32)
    assert torch.equal(p.expert_counts, want_counts), tag
    partial = vllm_like_experts(p.recv_x, p.topk_ids, p.topk_weights, linear_expert_map(E, rank, W), rank, E, W)
    out = torch.full_like(xs[rank], float("nan"))  # finalize must write every row
    ep_finalize(partial, p.handle, out)
    want = combine_reference(xs, ids, ws, E, expert_fn, ranks=[rank])[rank]
    assert torch.equal(out, want), f"{tag}: finalize differs from combine_reference"


CASE = st.fixed_dictionaries({
    "seed": st.integers(0, 2**20),
    "skew": st.sampled_from(SKEWS),
    "E_per_rank": st.sampled_from([1, 2, 4]),
    "k": st.integers(1, 4),
    "H": st.sampled_from([1, 8, 33]),
    "Ms": st.lists(st.integers(0, 9), min_size=2, max_size=2),
    "bf16": st.booleans(),
    "ids64": st.booleans(),
})


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(c=CASE)
def test_prepare_finalize_single_rank(c):
    """W = 1 without torch.distributed."""
    _check_rank(0, 1, c, None)


def _gloo_worker(rank, port, cases):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        for c in cases:
            _check_rank(rank, 2, c, None)
    finally:
        dist.destroy_process_group()


def test_prepare_finalize_gloo_w2():
    """W = 2 gloo processes; one spawn runs every case (process start-up dominates on 2 cores)."""
    import torch.multiprocessing as mp

    cases = [
        dict(seed=s, skew=skew, E_per_rank=epr, k=k, H=8, Ms=ms, bf16=bf16, ids64=ids64)
        for s, (skew, epr, k, ms, bf16, ids64) in enumerate([
            ("uniform", 2, 2, [5, 3], False, False),
            ("zipf", 4, 4, [7, 0], True, True),
            ("one_rank", 2, 2, [4, 4], True, False),  # rank 1 receives nothing: empty partial joins combine
            ("empty_rank", 1, 1, [0, 0], False, True),
            ("uniform", 1, 2, [9, 1], True, False),  # k = E: every token on both ranks
        ])
    ]
    mp.spawn(_gloo_worker, args=(_free_port(), cases), nprocs=2, join=True)


# ----------------------------------------------------------- the adapter class, against a vLLM stand-in


def _install_vllm_standin(monkeypatch):
    """The few vLLM 0.26 names the adapter imports, with the interface of modular_kernel.py:97-410 and
    topk_weight_and_reduce.py (abstract methods as there, so a missing method fails to instantiate)."""
    mk = types.ModuleType("vllm.model_executor.layers.fused_moe.modular_kernel")

    class FusedMoEActivationFormat(enum.Enum):
        Standard = ("standard",)
        BatchedExperts = ("batched_experts",)

    @dataclass
    class ExpertTokensMetadata:
        expert_num_tokens: torch.Tensor
        expert_num_tokens_cpu: torch.Tensor | None

    class FusedMoEPrepareAndFinalizeModular(abc.ABC):
        def supports_async(self):
            return False

        @property
        @abc.abstractmethod
        def activation_format(self): ...

        @abc.abstractmethod
        def topk_indices_dtype(self): ...

        @abc.abstractmethod
        def max_num_tokens_per_rank(self): ...

        @abc.abstractmethod
        def num_dispatchers(self): ...

        @abc.abstractmethod
        def output_is_reduced(self): ...

        @abc.abstractmethod
        def prepare(self, a1, topk_weights, topk_ids, num_experts, expert_map, apply_router_weight_on_input,
                    quant_config, defer_input_quant): ...

        @abc.abstractmethod
        def finalize(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                     weight_and_reduce_impl): ...

    mk.FusedMoEActivationFormat = FusedMoEActivationFormat
    mk.ExpertTokensMetadata = ExpertTokensMetadata
    mk.FusedMoEPrepareAndFinalizeModular = FusedMoEPrepareAndFinalizeModular

    twr = types.ModuleType("vllm.model_executor.layers.fused_moe.topk_weight_and_reduce")

    class TopKWeightAndReduceDelegate:
        def apply(self, **kw):
            raise RuntimeError("the prepare/finalize must choose")

    class TopKWeightAndReduceNoOP:
        def apply(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input):
            assert output is None
            return fused_expert_output

    class TopKWeightAndReduceContiguous:
        def apply(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input):
            m, k = topk_ids.shape
            y = fused_expert_output.view(m, k, -1).float() * topk_weights.float().view(m, k, 1)
            return y.sum(1).to(fused_expert_output.dtype)

    twr.TopKWeightAndReduceDelegate = TopKWeightAndReduceDelegate
    twr.TopKWeightAndReduceNoOP = TopKWeightAndReduceNoOP
    twr.TopKWeightAndReduceContiguous = TopKWeightAndReduceContiguous

    names = ["vllm", "vllm.model_executor", "vllm.model_executor.layers", "vllm.model_executor.layers.fused_moe"]
    mods = {n: types.ModuleType(n) for n in names}
    mods[mk.__name__] = mk
    mods[twr.__name__] = twr
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    return mk, twr


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is importable here: the GPU tests run the real classes")
def test_adapter_class_against_standin(monkeypatch):
    mk, twr = _install_vllm_standin(monkeypatch)
    E, k, H = 8, 2, 8
    xs, ids, ws = make_inputs(3, 1, E, k, H, [6], "zipf")
    x, i, w = xs[0], ids[0], ws[0]
    quant = types.SimpleNamespace(quant_dtype=None)
    pf = make_prepare_finalize(E)
    assert isinstance(pf, mk.FusedMoEPrepareAndFinalizeModular)
    assert pf.activation_format == mk.FusedMoEActivationFormat.Standard
    assert (pf.num_dispatchers(), pf.output_is_reduced(), pf.supports_async()) == (1, True, False)
    assert pf.max_num_tokens_per_rank() is None and pf.topk_indices_dtype() is None
    want = combine_reference(xs, ids, ws, E, expert_fn)[0]

    # experts that apply weights and reduce themselves (TritonExperts: NoOP) ...
    a, scale, meta, pids, pw = pf.prepare(x, w, i, E, None, False, quant, defer_input_quant=False)
    assert scale is None and isinstance(meta, mk.ExpertTokensMetadata)
    assert torch.equal(meta.expert_num_tokens, torch.bincount(i.flatten().long(), minlength=E).to(torch.int32))
    out = torch.empty_like(x)
    pf.finalize(out, vllm_like_experts(a, pids, pw, None, 0, E, 1), pw, pids, False, twr.TopKWeightAndReduceNoOP())
    assert torch.equal(out, want)

    # ... and experts that leave [R, k, H] unweighted to a Delegate (the adapter picks Contiguous)
    a, _, _, pids, pw = pf.prepare(x, w, i, E, None, False, quant, defer_input_quant=False)
    per_slot = torch.stack([apply_experts(a, pids[:, j].long(), expert_fn) for j in range(k)], dim=1)
    out = torch.empty_like(x)
    pf.finalize(out, per_slot, pw, pids, False, twr.TopKWeightAndReduceDelegate())
    assert torch.equal(out, want)

    # no tokens at all: the experts are skipped and fused_expert_output is [0, H]
    a, _, _, pids, pw = pf.prepare(x[:0], w[:0], i[:0], E, None, False, quant, defer_input_quant=False)
    out = torch.empty(0, H)
    pf.finalize(out, torch.empty(0, H), pw, pids, False, twr.TopKWeightAndReduceNoOP())

    with pytest.raises(NotImplementedError, match="apply_router_weight_on_input"):
        pf.prepare(x, w, i, E, None, True, quant, defer_input_quant=False)
    with pytest.raises(NotImplementedError, match="quant_dtype"):
        pf.prepare(x, w, i, E, None, False, types.SimpleNamespace(quant_dtype=torch.float8_e4m3fn), False)
    with pytest.raises(ValueError, match="num_experts=16"):
        pf.prepare(x, w, i, 16, None, False, quant, False)
    with pytest.raises(ValueError, match="not the linear placement"):
        pf.prepare(x, w, i, E, torch.arange(E - 1, -1, -1, dtype=torch.int32), False, quant, False)
    with pytest.raises(RuntimeError, match="before prepare"):
        pf.finalize(torch.empty_like(x), torch.empty_like(x), w, i, False, twr.TopKWeightAndReduceNoOP())
    pf.prepare(x, w, i, E, None, False, quant, False)
    with pytest.raises(RuntimeError, match="twice"):
        pf.prepare(x, w, i, E, None, False, quant, False)


# ------------------------------------------------------------------------------ GPU: inside real vLLM

LOWP_REL_TOL = 1e-2  # tests/test_moe.py's bf16 tolerance (norm-relative, reference in fp32)

GPU_SHAPES = {  # name: (E, k, H, I)
    "mixtral-like": (8, 2, 1024, 2048),
    "deepseek-like": (32, 4, 1024, 512),
}


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-rank torch.distributed group (gloo, FileStore) and vLLM's workspace manager on this GPU."""
    if not HAS_VLLM:
        pytest.skip("skipped: vllm is not importable")
    import torch.distributed as dist
    from vllm.v1.worker.workspace import init_workspace_manager, is_workspace_manager_initialized

    started = False
    if not dist.is_initialized():
        store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        started = True
    if not is_workspace_manager_initialized():
        init_workspace_manager(torch.device("cuda", torch.cuda.current_device()))
    yield dist.group.WORLD
    if started:
        dist.destroy_process_group()


def _vllm_kernels(E, k, H, I, group):
    """(ours, vLLM's no-EP) FusedMoEKernel, both with TritonExperts for unquantized bf16."""
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FUSED_MOE_UNQUANTIZED_CONFIG,
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import MoEPrepareAndFinalizeNoDPEPModular

    moe_config = FusedMoEConfig(
        num_experts=E, experts_per_token=k, hidden_dim=H, intermediate_size=I, num_local_experts=E,
        num_logical_experts=E, activation=MoEActivation.SILU, device=torch.device("cuda"),
        routing_method=RoutingMethodType.Renormalize, moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
        in_dtype=torch.bfloat16)

    def experts():
        return TritonExperts(moe_config, FUSED_MOE_UNQUANTIZED_CONFIG)

    ours = mk.FusedMoEKernel(make_prepare_finalize(E, group=group, backend="nccl"), experts())
    theirs = mk.FusedMoEKernel(MoEPrepareAndFinalizeNoDPEPModular(), experts())
    return ours, theirs, MoEActivation.SILU


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 64])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_vllm_modular_kernel_w1(shape, M, one_rank_group):
    from vllm.model_executor.layers.fused_moe import fused_experts

    from moekern.experts.reference import fused_moe_reference
    from moekern.routing import fused_topk_reference

    E, k, H, I = GPU_SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(M * 131 + E)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(torch.bfloat16).cuda()
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(torch.bfloat16).cuda()
    x = torch.randn(M, H, generator=g).to(torch.bfloat16).cuda()
    w, ids = fused_topk_reference(torch.randn(M, E, generator=g).cuda(), k)[:2]
    w, ids = w.float().contiguous(), ids.to(torch.int32).contiguous()

    ours, theirs, act = _vllm_kernels(E, k, H, I, one_rank_group)
    kw = dict(activation=act, global_num_experts=E, expert_map=None, apply_router_weight_on_input=False)
    out = ours.apply(x, w13, w2, w, ids, **kw)
    torch.cuda.synchronize()
    assert out.shape == (M, H) and out.dtype == torch.bfloat16
    want = theirs.apply(x, w13, w2, w, ids, **kw)
    assert torch.equal(out, want), (
        f"{shape} M={M}: adapter differs from vLLM's no-EP kernel, max abs {(out.float() - want.float()).abs().max()}")
    fe = fused_experts(x, w13, w2, w, ids)
    assert _rel_err(out, fe) < LOWP_REL_TOL, f"{shape} M={M}: vs vLLM fused_experts {_rel_err(out, fe)}"
    ref = fused_moe_reference(x.float(), w13, w2, w, ids)
    assert _rel_err(out, ref) < LOWP_REL_TOL, f"{shape} M={M}: vs fused_moe_reference {_rel_err(out, ref)}"
    assert ours.output_is_reduced() is True


@pytest.mark.gpu
def test_vllm_adapter_prepare_finalize_identity_w1(one_rank_group):
    """prepare/finalize alone (synthetic experts) equals vLLM's no-EP prepare/finalize, bit for bit."""
    from moekern.vllm.ep_adapter import check_adapter_matches_no_ep

    check_adapter_matches_no_ep(device="cuda")
