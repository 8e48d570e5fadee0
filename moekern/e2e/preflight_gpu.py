"""The preflight's GPU checks (each skipped without CUDA): moekern's routing hook on a real vLLM
FusedTopKRouter of a Mixtral layer against vLLM's own routing, the gate-log recorder through that hook, and
moekern.fused_moe against its torch reference."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

from moekern.e2e.checklist import Skip, collector, resolve

ROUTER = "vllm.model_executor.layers.fused_moe.router"


def hooked_mixtral_router(config, recorder):
    """A real vLLM FusedTopKRouter (E=8, k=2 softmax) hooked by moekern as the engine would hook a layer:
    (its class, the router, the layer's moekern.vllm.hooks.LayerHook)."""
    from moekern.vllm import hooks

    cls = resolve(f"{ROUTER}.fused_topk_router", "FusedTopKRouter")
    router = cls(top_k=2, global_num_experts=8, scoring_func="softmax", renormalize=True)
    layer = SimpleNamespace(layer_name="preflight.layers.0.block_sparse_moe.experts", router=router,
                            routed_experts=None)
    return cls, router, hooks.hook_layer(layer, config, recorder)


def gpu_checks(arms: list[str]) -> list:
    """(name, fn) checks that need a GPU, for the arms about to run."""
    checks = []
    add = collector(checks)

    @add("moekern routing hook on a real vLLM FusedTopKRouter (Mixtral layer, GPU)")
    def _():
        import torch

        if not torch.cuda.is_available():
            raise Skip("no CUDA device")
        from moekern.vllm.config import PluginConfig

        cls, router, hook = hooked_mixtral_router(PluginConfig(kernels="routing"), None)
        if "_compute_routing" not in vars(router):
            raise AssertionError("the hook did not shadow router._compute_routing")
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        # distinct logits per row (a permutation of 8 levels, exact in bf16): no ties to break differently
        perm = torch.argsort(torch.rand(64, 8, device="cuda", generator=g), -1)
        logits = (perm.float() * 0.75 - 2.0).to(torch.bfloat16)
        w, ids = router.select_experts(x, logits, topk_indices_dtype=None)
        w_ref, ids_ref = cls._compute_routing(router, x, logits, None)  # vLLM's own kernel, same router
        if ids.dtype != ids_ref.dtype or tuple(ids.shape) != tuple(ids_ref.shape):
            raise AssertionError(f"ids {ids.dtype}{tuple(ids.shape)} vs vLLM {ids_ref.dtype}{tuple(ids_ref.shape)}")
        same = torch.equal(ids.sort(-1).values, ids_ref.sort(-1).values)
        if not same:
            raise AssertionError("expert sets differ from vLLM's routing")
        order = torch.argsort(ids, -1)
        order_ref = torch.argsort(ids_ref, -1)
        torch.testing.assert_close(w.gather(1, order), w_ref.float().gather(1, order_ref), rtol=1e-5, atol=1e-5)
        why = hook.plans.get(8)
        return f"ids equal, weights within 1e-5; plan: {why.why if why else None}"

    @add("gate-log recorder through the hook (GPU)")
    def _():
        import torch

        if not torch.cuda.is_available():
            raise Skip("no CUDA device")
        from moekern.gatelog import read_gate_log
        from moekern.vllm.config import PluginConfig
        from moekern.gatelog.writer import GateLogRecorder

        with tempfile.TemporaryDirectory() as d:
            rec = GateLogRecorder(d, flush_steps=1)
            _, router, _ = hooked_mixtral_router(PluginConfig(kernels="routing", gate_log_dir=d), rec)
            rec.ensure_buffer(torch.device("cuda"))
            want = []
            for M in (37, 5):  # two steps: the second must not see the first's counts
                logits = torch.randn(M, 8, device="cuda", dtype=torch.bfloat16)
                rec.begin_step()
                _, ids = router.select_experts(logits, logits, topk_indices_dtype=None)
                rec.end_step("prefill", M)
                want.append(torch.bincount(ids.flatten().long(), minlength=8).tolist())
            rec.close()
            records, skipped = read_gate_log(d)
        got = [r.expert_counts for r in sorted(records, key=lambda r: r.step)]
        if skipped or got != want:
            raise AssertionError(f"records={got} want={want} skipped={len(skipped)} ({rec.snapshot_why})")
        return f"2 records equal to the routed ids' counts, {got[0]}; hand-off: {rec.snapshot_why}"

    if "moekern" in arms:
        @add("moekern.fused_moe on the GPU (MOEKERN_KERNELS=all)")
        def _():
            import torch

            if not torch.cuda.is_available():
                raise Skip("no CUDA device")
            from moekern.experts.reference import fused_moe_reference
            from moekern.experts import fused_moe
            from moekern.routing import fused_topk

            g = torch.Generator(device="cuda").manual_seed(0)
            M, H, inter, E, k = 33, 256, 128, 8, 2
            x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g)
            w13 = torch.randn(E, 2 * inter, H, device="cuda", dtype=torch.bfloat16, generator=g) / H ** 0.5
            w2 = torch.randn(E, H, inter, device="cuda", dtype=torch.bfloat16, generator=g) / inter ** 0.5
            r = fused_topk(torch.randn(M, E, device="cuda", generator=g), k)
            out = fused_moe(x, w13, w2, topk_weights=r.topk_weights, topk_ids=r.topk_ids, check_ids=False)
            ref = fused_moe_reference(x, w13, w2, r.topk_weights, r.topk_ids)
            torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
            return "matches the torch reference (bf16, 2e-2)"

    return checks
