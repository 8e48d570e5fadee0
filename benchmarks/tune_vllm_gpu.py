"""The GPU side of benchmarks/tune_vllm.py: vLLM's fused_experts under a forced config on decode_layer.py's inputs,
and the worker processes that compile configs ahead of the timing.

Triton compiles each config's two GEMM kernels (per specialization of M) before its first call, seconds each,
far longer than its timings: ~4 compiles of ~1.5 s per config against ~0.6 s of screening at ten M, so a serial
run would spend ~90 % of its time compiling. CompileWorkers runs configs in other processes first, so Triton's disk cache holds
them when the timing process calls them. The workers launch vLLM's small align, activation and sum ops but not
the GEMMs (_CompileOnly: Triton's JITFunction.warmup compiles without launching), so they barely touch the GPU
being timed (and they are idle by the time the finals are re-timed: those come after a model's last compile).
Their weights are one expert seen as E (stride 0): the kernel's arguments specialize the same way
as with E real experts, at a fraction of the memory.
"""

from __future__ import annotations

import sys

import torch

from vllm_tuned_configs import config_dict, device_file_name, moe_shape

FINAL_TIMING: dict = {}  # time_calls' defaults, as decode_layer.py times
SCREEN_TIMING = dict(warmup=2, target_ms=0.5, budget_s=0.03, min_repeats=5, max_repeats=20)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


class VllmExperts:
    """vLLM's fused_experts on one model's decode_layer.py inputs, each call under override_config(config)."""

    def __init__(self, model: str, ms):
        import decode_layer
        from vllm.model_executor.layers.fused_moe import fused_experts, override_config

        self._fused, self._override, self._rel_err = fused_experts, override_config, decode_layer.rel_err
        self.w13, self.w2, bias, steps = decode_layer.bench_inputs(model, ms)
        self.steps = {}
        for M, (x, logits) in steps.items():
            rw, rids, ref = decode_layer.reference_layer(model, bias, x, logits, self.w13, self.w2)
            self.steps[M] = (x, rw.float().contiguous(), rids.to(torch.int32).contiguous(), ref)

    def _call(self, M):
        x, w, ids, _ = self.steps[M]
        return lambda: self._fused(x, self.w13, self.w2, w, ids)

    def check(self, M, cfg) -> float:
        with self._override(config_dict(cfg)):
            out = self._call(M)()
            torch.cuda.synchronize()
        return self._rel_err(out, self.steps[M][3])

    def time(self, M, cfg, final: bool):
        from moekern.bench.timing import time_calls

        # override_config is read while the graph is captured (the config is baked into the launches)
        with self._override(config_dict(cfg)):
            return time_calls([self._call(M)], "cuda", **(FINAL_TIMING if final else SCREEN_TIMING))

    def healthy(self) -> bool:
        try:
            torch.cuda.synchronize()
            return True
        except Exception:  # noqa: BLE001  (an illegal address poisons the context)
            return False

    def close(self):
        self.steps.clear()
        del self.w13, self.w2
        torch.cuda.empty_cache()


class _CompileOnly:
    """Stands in for vLLM's fused_moe_kernel in a compile worker: `kernel[grid](...)` compiles (JITFunction.warmup)
    into Triton's disk cache and launches nothing."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel.warmup(*args, grid=grid, **kwargs)

    def __getattr__(self, name):
        return getattr(self.kernel, name)


_WORKER: dict = {}


def _worker_init(ms):
    import vllm.model_executor.layers.fused_moe.fused_moe as fm

    fm.fused_moe_kernel = _CompileOnly(fm.fused_moe_kernel)
    _WORKER["ms"] = list(ms)


def _worker_compile(model: str, cfg, ms) -> str | None:
    """Compile one config's kernels for the M given (their specializations follow M): weights of one expert seen as
    E (stride 0: the same Triton specialization as E real experts, a fraction of the memory), random routing."""
    from vllm.model_executor.layers.fused_moe import fused_experts, override_config

    if _WORKER.get("model") != model:
        _WORKER.pop("state", None)
        torch.cuda.empty_cache()
        s = moe_shape(model)
        w13 = torch.randn(1, 2 * s.N, s.H, device="cuda", dtype=torch.bfloat16).expand(s.E, -1, -1)
        w2 = torch.randn(1, s.H, s.N, device="cuda", dtype=torch.bfloat16).expand(s.E, -1, -1)
        steps = {M: (torch.randn(M, s.H, device="cuda", dtype=torch.bfloat16),
                     torch.rand(M, s.top_k, device="cuda"),
                     torch.randint(0, s.E, (M, s.top_k), device="cuda", dtype=torch.int32)) for M in _WORKER["ms"]}
        _WORKER.update(model=model, state=(w13, w2, steps))
    w13, w2, steps = _WORKER["state"]
    errors = []
    for M in ms:
        x, w, ids = steps[M]
        try:
            with override_config(config_dict(cfg)):
                fused_experts(x, w13, w2, w, ids)
        except Exception as exc:  # noqa: BLE001  (the timing process records it)
            errors.append(one_line(exc))
    torch.cuda.synchronize()
    return "; ".join(errors) or None


class CompileWorkers:
    """A pool of processes compiling configs ahead of the timing (Triton's disk cache is shared by processes)."""

    def __init__(self, n: int, ms):
        import multiprocessing

        self.n, self.ms, self.pool, self.jobs, self.failed = n, list(ms), None, {}, 0
        self._ctx = multiprocessing.get_context("spawn")  # CUDA in workers needs spawn

    def start(self, model, work):
        """work: (config, the M it still lacks), in the order the timing will ask for them."""
        if self.pool is None:
            self.pool = self._ctx.Pool(self.n, initializer=_worker_init, initargs=(self.ms,))
        self.jobs = {(model, c): self.pool.apply_async(_worker_compile, (model, c, ms)) for c, ms in work}

    def wait(self, model, cfg, timeout_s: float = 300):
        job = self.jobs.pop((model, cfg), None)
        if job is None:
            return
        try:
            if job.get(timeout_s):
                self.failed += 1
        except Exception:  # noqa: BLE001  (a worker's failure only costs a compile in the timing process)
            self.failed += 1

    def stop(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        self.jobs = {}


def gpu_device() -> tuple[str, dict]:
    """(vLLM's device file name part, versions) on this GPU, checked against vLLM's own get_config_file_name."""
    import triton
    import vllm
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name
    from vllm.platforms import current_platform

    raw = current_platform.get_device_name()
    ours = device_file_name(raw)
    theirs = get_config_file_name(8, 14336, None).split("device_name=", 1)[1][: -len(".json")]
    if theirs != ours:
        print(f"note: vLLM names this device {theirs!r}, our reading gives {ours!r}: using vLLM's", file=sys.stderr)
    return theirs, {"device_name": raw, "vllm": vllm.__version__, "triton": triton.__version__,
                    "torch": torch.__version__}
