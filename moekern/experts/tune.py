"""Tune the grouped-GEMM tiles of moekern.fused_moe on this GPU and print rows for configs.TUNED.

    python -m moekern.experts.tune [--models mixtral,olmoe] [--tokens 1,64,1024] [--json out.json]

For each (model, M) it routes random logits with the model's routing, aligns once per candidate block_m,
times each GEMM's candidates separately with triton.testing.do_bench (the two GEMMs are independent given
block_m), and keeps the block_m whose best pair is fastest. It also times the whole layer with the tuned
pair and with the heuristic default, and reports the decode roofline: bytes of the experts' weights that
must be read (used experts only) over the time, against the device's copy bandwidth. GPU only.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch


def _candidates(block_m: int, gemm: int):
    from moekern.experts.configs import BlockConfig

    warps = (4, 8) if block_m >= 64 else (4,)
    group = (1, 8) if block_m >= 128 else (1,)
    for bn, bk, stages, nw, gm in itertools.product((32, 64, 128), (64, 128), (3, 4), warps, group):
        if gemm == 1 and block_m >= 128 and bn >= 128 and stages == 4:
            continue  # two accumulators of 128x128 plus 4 stages exceed shared memory
        yield BlockConfig(block_m, bn, bk, gm, nw, stages)


def tune_one(name: str, num_tokens: int, w13, w2, spec, rep_ms: int = 20) -> dict:
    import triton
    import triton.testing

    import moekern
    from moekern.experts.configs import default_configs
    from moekern.experts.triton_gemm import _launch

    E, k, H, inter = spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size
    torch.manual_seed(0)
    x = torch.randn(num_tokens, H, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(num_tokens, E, device="cuda")
    w, ids, counts = moekern.fused_topk(logits, k, **spec.routing_kwargs())
    wf = w.reshape(-1).contiguous()
    per_expert = num_tokens * k / E
    block_ms = [bm for bm in (16, 32, 64, 128) if bm <= max(16, 2 * triton.next_power_of_2(int(per_expert) + 1))]
    inter_buf = torch.empty(num_tokens * k, inter, dtype=torch.bfloat16, device="cuda")
    out_buf = torch.empty(num_tokens * k, H, dtype=torch.bfloat16, device="cuda")
    best = None
    for bm in block_ms:
        al = moekern.align(ids, E, bm, expert_counts=counts, check_ids=False)
        picks = []
        for gemm in (1, 2):
            times = []
            for cfg in _candidates(bm, gemm):
                if gemm == 1:
                    fn = lambda cfg=cfg: _launch(x, w13, inter_buf, wf, *al, n=inter, k=H, num_slots=num_tokens * k,  # noqa: E731
                                                 a_div=k, fuse_silu=True, mul_weight=False, cfg=cfg)
                else:
                    fn = lambda cfg=cfg: _launch(inter_buf, w2, out_buf, wf, *al, n=H, k=inter, num_slots=num_tokens * k,  # noqa: E731
                                                 a_div=1, fuse_silu=False, mul_weight=True, cfg=cfg)
                try:
                    times.append((triton.testing.do_bench(fn, warmup=5, rep=rep_ms), cfg))
                except Exception as exc:  # out of resources for this tile: skip it  # noqa: BLE001
                    if "OutOfResources" not in type(exc).__name__ and "resources" not in str(exc):
                        raise
            picks.append(min(times, key=lambda t: t[0]))
        total = picks[0][0] + picks[1][0]
        if best is None or total < best[0]:
            best = (total, picks[0][1], picks[1][1])
    _, c1, c2 = best

    def layer(cfgs):
        return lambda: moekern.fused_moe(x, w13, w2, topk_weights=w, topk_ids=ids, block_config=cfgs, check_ids=False)

    t_tuned = triton.testing.do_bench(layer((c1, c2)), warmup=10, rep=100)
    t_default = triton.testing.do_bench(layer(default_configs(num_tokens, E, k, inter, H, torch.bfloat16)),
                                        warmup=10, rep=100)
    used = int((counts > 0).sum())
    weight_bytes = used * (3 * inter * H) * 2
    return dict(model=name, M=num_tokens, E=E, I=inter, H=H, top_k=k, experts_used=used,
                gemm1=c1.__dict__, gemm2=c2.__dict__, layer_ms_tuned=t_tuned, layer_ms_default=t_default,
                weight_GBps_tuned=weight_bytes / t_tuned / 1e6,
                tflops_tuned=2 * num_tokens * k * 3 * inter * H / t_tuned / 1e9)


def main(argv=None) -> None:
    from moekern.models import get_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral,qwen3-30b-a3b,deepseek-v3,olmoe")
    ap.add_argument("--tokens", default="1,64,1024")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    rows = []
    for name in args.models.split(","):
        spec = get_model(name)
        E, H, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size
        torch.manual_seed(0)
        w13 = torch.randn(E, 2 * inter, H, dtype=torch.bfloat16, device="cuda").mul_(H**-0.5)
        w2 = torch.randn(E, H, inter, dtype=torch.bfloat16, device="cuda").mul_(inter**-0.5)
        for m in (int(t) for t in args.tokens.split(",")):
            row = tune_one(name, m, w13, w2, spec)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
