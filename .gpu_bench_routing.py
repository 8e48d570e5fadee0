import torch, triton, moekern
from triton.testing import do_bench
from moekern.models.registry import get_model
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
for name in ("mixtral", "qwen3-30b-a3b", "deepseek-v3"):
    spec = get_model(name); kw = spec.routing_kwargs()
    if spec.correction_bias: kw["correction_bias"] = torch.randn(spec.num_experts, device="cuda") * 0.1
    for M in (1, 256, 4096, 16384):
        x = torch.randn(M, spec.num_experts, device="cuda", dtype=torch.bfloat16)
        t = do_bench(lambda: moekern.fused_topk(x, spec.top_k, backend="triton", **kw)) * 1e3
        r = do_bench(lambda: moekern.fused_topk(x, spec.top_k, backend="torch", **kw)) * 1e3
        print(f"{name:14s} M={M:6d} triton {t:8.1f} us  torch-ref {r:8.1f} us")
