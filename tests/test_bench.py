"""moekern bench on CPU: the demo command, skipped providers, the result checker, report and plots."""

from __future__ import annotations

import json
import os

import pytest
import torch

from moekern.bench import providers as P
from moekern.bench import report, runner
from moekern.bench.shapes import bench_shapes, make_inputs, make_shape, resolve_model


def _routing_setup(model="mixtral", m=40):
    shape = make_shape("routing", resolve_model(model, tiny=True), m)
    inp = make_inputs(shape, m, "cpu", seed=1)
    return shape, inp, P.reference_output(shape, inp)


def _fake(op, fn, name="fake"):
    return P.Provider(name, op, lambda s, d: None, lambda s, inp: (lambda: fn(s, inp)),
                      P._routing_norm if op == "routing" else (P._align_exact if op == "align" else P._moe_norm),
                      graph_ok=False)


def test_cli_demo_runs_and_writes_json(tmp_path):
    from moekern.cli import main

    out = tmp_path / "res"
    code = main(["bench", "--demo", "--ops", "routing,align", "--models", "mixtral,deepseek-v3", "--tokens", "3",
                 "--providers", "torch,vllm,flashinfer", "--out", str(out), "--no-progress"])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert data["environment"]["demo"] is True and data["environment"]["torch"] == torch.__version__
    torch_rows = [r for r in rows if r["provider"] == "torch"]
    assert len(torch_rows) == 4 and all(r["status"] == "ok" and r["median_us"] > 0 for r in torch_rows)
    assert {r["model"] for r in rows} == {"tiny-mixtral", "tiny-deepseek-v3"}
    skipped = [r for r in rows if r["provider"] in ("vllm", "flashinfer")]
    assert skipped and all(r["status"] == "skipped" and r["reason"] and r["median_us"] is None for r in skipped)
    assert (out / "table.txt").read_text().startswith("median")
    assert (out / "routing_time.png").stat().st_size > 1000


def test_cli_rejects_unknown_names(capsys):
    from moekern.cli import main

    assert main(["bench", "--providers", "cutlass"]) == 2
    assert main(["bench", "--ops", "gemm"]) == 2
    assert main(["bench", "--models", "llama-70b"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("moekern bench: error: --providers cutlass unknown") and len(err) == 3
    assert "--ops gemm" in err[1] and "--models" in err[2] and "llama-70b" in err[2]


def test_missing_packages_are_skipped_with_reason(monkeypatch):
    P._import_error.cache_clear()
    monkeypatch.setattr(P.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("vllm", "flashinfer") else _real_find_spec(name, *a))
    try:
        cpu, cuda = torch.device("cpu"), torch.device("cuda")
        for op in ("routing", "align", "moe"):
            shape = make_shape(op, resolve_model("deepseek-v3"), 4, 64 if op == "align" else 0)
            for prov in P.get_providers(op, ("vllm", "flashinfer")):
                reason = prov.unavailable(shape, cuda)  # a GPU is not needed to find the package missing
                assert reason and ("not installed" in reason or "no moe_align" in reason), (op, prov.name, reason)
                assert prov.unavailable(shape, cpu)
        mixtral = make_shape("routing", resolve_model("mixtral"), 4)
        assert "softmax" in P.get_providers("routing", ("flashinfer",))[0].unavailable(mixtral, cuda)
    finally:
        P._import_error.cache_clear()


_real_find_spec = P.importlib.util.find_spec


def test_runner_reports_skipped_rows_without_error():
    shape = make_shape("routing", resolve_model("olmoe", tiny=True), 2)
    rows = runner.run([shape], ("vllm", "torch"), "cpu", progress=False).rows
    assert [r["status"] for r in rows] == ["skipped", "ok"]
    assert rows[0]["reason"] == "needs a CUDA GPU"


def test_checker_flags_wrong_routing_and_is_never_timed():
    shape, inp, ref = _routing_setup()

    def worse(s, i):  # replace each row's last choice by an expert outside the reference's top-k
        w, ids, _ = _ref_tuple(s, i)
        ids = ids.clone()
        order = torch.argsort(i.logits.float(), dim=1, descending=True)
        ids[:, -1] = order[:, s.top_k].to(ids.dtype)
        return w, ids

    row = runner.measure_one(shape, _fake("routing", worse), inp, ref, "cpu")
    assert row["status"] == "wrong" and "worse expert set" in row["reason"] and row["median_us"] is None

    def bad_weights(s, i):
        w, ids, _ = _ref_tuple(s, i)
        return w * 1.1, ids

    row = runner.measure_one(shape, _fake("routing", bad_weights), inp, ref, "cpu")
    assert row["status"] == "wrong" and "weights differ" in row["reason"]

    def bad_counts(s, i):
        w, ids, counts = _ref_tuple(s, i)
        return w, ids, counts.flip(0) + 1

    row = runner.measure_one(shape, _fake("routing", bad_counts), inp, ref, "cpu")
    assert row["status"] == "wrong" and "expert_counts" in row["reason"]

    row = runner.measure_one(shape, _fake("routing", lambda s, i: _ref_tuple(s, i)), inp, ref, "cpu")
    assert row["status"] == "ok" and row["median_us"] > 0


def _ref_tuple(s, i):
    from moekern.routing.reference import fused_topk_reference

    return fused_topk_reference(i.logits, s.top_k, correction_bias=i.correction_bias, **s.routing_kwargs())


def test_routing_check_accepts_a_different_tie_break_only():
    shape = make_shape("routing", resolve_model("mixtral", tiny=True), 3)
    inp = make_inputs(shape, 3, "cpu")
    inp.logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0]] * 3, dtype=torch.bfloat16)
    ref = P.reference_output(shape, inp)
    assert ref.ids[0].tolist() == [0, 1]  # ties go to the lower index in the reference
    other = ref.ids.clone()
    other[:, 1] = 2  # expert 2 ties with expert 1: an equally good choice
    ok = P.check_output(shape, inp, ref, P.RoutingResult(ref.weights, other, None))
    assert ok.ok and "tie" in ok.detail
    other[:, 1] = 3  # expert 3 scores lower: wrong
    assert not P.check_output(shape, inp, ref, P.RoutingResult(ref.weights, other, None)).ok
    dup = ref.ids.clone()
    dup[:, 1] = 0
    assert "repeat" in P.check_output(shape, inp, ref, P.RoutingResult(ref.weights, dup, None)).detail


def test_align_check_exact_and_order_free():
    from moekern.dispatch.reference import align_reference

    shape = make_shape("align", resolve_model("mixtral", tiny=True), 16, 4)
    inp = make_inputs(shape, 16, "cpu")
    ref_raw = align_reference(inp.topk_ids, shape.num_experts, shape.block_size)
    ref = P.reference_output(shape, inp)
    # Swap two slots inside the first expert's segment: a vLLM-style order, same slots.
    sorted_ids = ref_raw.sorted_token_ids.clone()
    counts = torch.bincount(inp.topk_ids.flatten().long(), minlength=shape.num_experts)
    e = int(torch.nonzero(counts >= 2)[0])  # 32 slots over 8 experts: some expert has two
    start = int(torch.nonzero(ref_raw.block_expert_ids == e)[0]) * shape.block_size
    sorted_ids[[start, start + 1]] = sorted_ids[[start + 1, start]]
    swapped = (sorted_ids, ref_raw.block_expert_ids, ref_raw.num_tokens_post_padded)
    assert not P.check_output(shape, inp, ref, P.canonical_align(swapped, shape, exact=True)).ok
    assert P.check_output(shape, inp, ref, P.canonical_align(swapped, shape, exact=False)).ok
    moved = sorted_ids.clone()
    moved[start] = shape.num_tokens * shape.top_k  # a slot lost to padding: wrong under either rule
    bad = (moved, ref_raw.block_expert_ids, ref_raw.num_tokens_post_padded)
    assert not P.check_output(shape, inp, ref, P.canonical_align(bad, shape, exact=False)).ok
    post = ref_raw.num_tokens_post_padded + shape.block_size
    assert "num_tokens_post_padded" in P.check_output(
        shape, inp, ref, P.canonical_align((sorted_ids, ref_raw.block_expert_ids, post), shape, exact=False)).detail


def test_checker_flags_wrong_moe():
    from moekern.experts.reference import fused_moe_reference

    shape = make_shape("moe", resolve_model("mixtral", tiny=True), 3)
    inp = make_inputs(shape, 3, "cpu")
    ref = P.reference_output(shape, inp)

    def ref_fn(s, i):
        return fused_moe_reference(i.hidden, i.w13, i.w2, i.topk_weights, i.topk_ids)

    def swapped_gate_up(s, i):  # the classic layout mistake ([up; gate] read as [gate; up])
        inter = s.intermediate_size
        w31 = torch.cat([i.w13[:, inter:], i.w13[:, :inter]], dim=1)
        return fused_moe_reference(i.hidden, w31, i.w2, i.topk_weights, i.topk_ids)

    good = runner.measure_one(shape, _fake("moe", ref_fn), inp, ref, "cpu", time_it=False)
    assert good["status"] == "ok" and good["error"] == 0.0
    bad = runner.measure_one(shape, _fake("moe", swapped_gate_up), inp, ref, "cpu")
    assert bad["status"] == "wrong" and "relative error" in bad["reason"] and bad["median_us"] is None
    nan = runner.measure_one(shape, _fake("moe", lambda s, i: ref_fn(s, i) * float("nan")), inp, ref, "cpu")
    assert nan["status"] == "wrong" and "NaN" in nan["reason"]


def test_runner_with_injected_wrong_provider_marks_it_wrong():
    shapes = bench_shapes(("moe",), ("olmoe",), (2,), tiny=True)
    wrong = _fake("moe", lambda s, i: torch.zeros_like(i.hidden), name="zeros")
    result = runner.run(shapes, ("torch",), "cpu", progress=False, extra_providers=[wrong])
    status = {r["provider"]: r["status"] for r in result.rows}
    assert status == {"torch": "ok", "zeros": "wrong"}


def _synthetic():
    rows = []
    for op, models, B in (("routing", ("mixtral", "deepseek-v3"), 0), ("align", ("olmoe",), 64), ("moe", ("mixtral",), 0)):
        for model in models:
            for m in (1, 64, 1024):
                for prov, t in (("vllm", 10.0), ("moekern-triton", 8.0), ("torch", 50.0)):
                    us = t * (1 + m / 64)
                    rows.append({"op": op, "model": model, "num_tokens": m, "block_size": B, "provider": prov,
                                 "shape": f"{op}/{model}/M={m}" + (f"/B={B}" if op == "align" else ""),
                                 "status": "ok", "reason": "", "median_us": us, "min_us": us * 0.9,
                                 "max_us": us * 1.2, "roofline_fraction": 0.3, "speedup_vs_vllm": None})
            rows.append({**rows[-1], "provider": "flashinfer", "status": "skipped", "reason": "not installed",
                         "median_us": None, "min_us": None, "max_us": None, "roofline_fraction": None})
    runner.add_vllm_ratios(rows)
    return {"environment": {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-01-02T00:00:00+00:00"}, "rows": rows}


def test_report_and_plots_render_from_synthetic_results(tmp_path):
    data = _synthetic()
    path = report.write_json(data, str(tmp_path))
    loaded = report.load(str(tmp_path))
    assert loaded["rows"] == json.loads(open(path).read())["rows"]
    r = next(x for x in loaded["rows"] if x["provider"] == "moekern-triton")
    assert r["speedup_vs_vllm"] == pytest.approx(10.0 / 8.0)
    timed, rest = report.tables(loaded)
    assert "moekern-triton" in timed and "1.25x" in timed and "30%" in timed
    assert "skipped" in rest and "not installed" in rest
    paths = report.plot(loaded, str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(f"{op}_{k}.png" for op in ("routing", "align", "moe") for k in ("time", "vs_vllm"))
    assert all(os.path.getsize(p) > 5000 for p in paths)
    assert timed.splitlines()[0] == "median µs per call  [speedup over vLLM, x; roofline fraction, %]"


def test_default_out_dir_is_outside_the_source_tree(monkeypatch, tmp_path):
    env = {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-01-02T03:04:05+00:00"}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert report.default_out_dir(env) == str(tmp_path / "cache" / "moekern" / "bench"
                                              / "nvidia-h100-80gb-hbm3-2026-01-02T030405")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert report.default_out_dir({"date": env["date"]}) == str(tmp_path / "home" / ".cache" / "moekern" / "bench"
                                                                / "cpu-demo-2026-01-02T030405")


def test_table_header_names_only_the_numbers_its_cells_carry():
    rows = [{"op": "routing", "model": "m", "num_tokens": 4, "block_size": 0, "provider": p, "status": "ok",
             "shape": "routing/m/M=4", "median_us": t, "min_us": t, "max_us": t, "speedup_vs_vllm": None,
             "roofline_fraction": None, "reason": ""} for p, t in (("torch", 3.0), ("moekern-triton", 5.0))]
    timed, _ = report.tables({"environment": {}, "rows": rows})
    assert timed.splitlines()[0] == "median µs per call"  # the CPU demo: no vLLM, no roofline
    rows[1] = {**rows[1], "roofline_fraction": 0.25}
    timed, _ = report.tables({"environment": {}, "rows": rows})
    assert timed.splitlines()[0] == "median µs per call  [roofline fraction, %]" and "25%" in timed


def test_cli_demo_default_output_leaves_the_working_tree_clean(tmp_path, monkeypatch, capsys):
    from moekern.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code = main(["bench", "--demo", "--ops", "routing", "--models", "mixtral", "--tokens", "3",
                 "--providers", "torch", "--no-progress", "--no-plots"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing written where it ran
    out_dirs = list((tmp_path / "cache" / "moekern" / "bench").iterdir())
    assert len(out_dirs) == 1 and out_dirs[0].name.startswith("cpu-demo-")
    assert (out_dirs[0] / "results.json").is_file()
    assert f"output folder: {out_dirs[0]}" in capsys.readouterr().out


def test_shapes_cover_the_standard_models_and_tokens():
    shapes = bench_shapes()
    ops = {(s.op, s.model) for s in shapes}
    assert len(ops) == 12 and len({s.key for s in shapes}) == len(shapes)
    ds = next(s for s in shapes if s.model == "deepseek-v3" and s.op == "routing")
    assert (ds.num_experts, ds.top_k, ds.num_expert_group, ds.topk_group, ds.scoring, ds.correction_bias,
            ds.routed_scaling_factor) == (256, 8, 8, 4, "sigmoid", True, 2.5)
    assert {s.num_tokens for s in shapes if s.op == "moe"} == {1, 8, 64, 128, 256, 1024, 4096, 8192}
    with pytest.raises(ValueError, match="op="):
        bench_shapes(("gemm",))
    with pytest.raises(ValueError, match="dense"):
        resolve_model("llada-8b")


def test_runner_budget_skips_later_groups_and_reports_each_row():
    # A zero budget still measures nothing after the first check: every group is skipped, each row said so,
    # and on_row saw every row in order (what `moekern bench` streams to rows.partial.jsonl).
    shapes = bench_shapes(("moe", "routing"), ("olmoe",), (2,), tiny=True)
    seen = []
    result = runner.run(shapes, ("torch",), "cpu", progress=False, on_row=seen.append, budget_s=0.0)
    assert seen == result.rows and len(seen) == len(shapes)
    assert all(r["status"] == "skipped" and "time budget" in r["reason"] for r in seen)
    full = runner.run(shapes, ("torch",), "cpu", progress=False, budget_s=3600)
    assert [r["status"] for r in full.rows] == ["ok"] * len(shapes)


def test_cli_streams_partial_rows(tmp_path):
    from moekern import cli

    out = tmp_path / "bench"
    rc = cli.main(["bench", "--ops", "moe", "--models", "olmoe", "--tokens", "2", "--providers", "torch", "--no-plots",
                   "--no-progress", "--out", str(out)])
    assert rc == 0
    lines = (out / "rows.partial.jsonl").read_text().splitlines()
    assert [json.loads(ln)["provider"] for ln in lines] == ["torch"]


# ---------------------------------------------------------------- FlashInfer providers against a fake flashinfer
#
# The fake enforces FlashInfer 0.6.14's contract as its sources state it (argument order and names, dtypes,
# shapes, in-place outputs, return types) and computes the result its own way from that contract, so a wrong
# mapping in moekern.bench.providers fails here on CPU, before any GPU call:
#   cutlass_fused_moe  fused_moe/core.py:814-845 (signature), :1008-1017 (output check), :633-642 (returns a
#                      list), flashinfer_cutlass_fused_moe_binding.cu:260-318 (dtypes/shapes), Swiglu with fc1 =
#                      [up; gate] (cutlass_fused_moe_kernels.cuh:2164, 2250-2265), routing weights applied.
#   fused_topk_deepseek fused_moe/fused_routing_dsv3.py:142-153 (signature), :63-96 (limits),
#                      noAuxTcKernels.cu:314-351 (dtypes/shapes), :26 and :252-270 (fp32 math, tanh sigmoid,
#                      renormalize x scale, ids by score).

import contextlib
import importlib.machinery
import inspect
import sys
import types

_FI_MOE_CALLS: list = []
_FI_ROUTING_CALLS: list = []
_FI_AUTOTUNE: list = []


def _fi_require(cond, msg):
    if not cond:
        raise RuntimeError(f"fake flashinfer: {msg}")


def _fake_cutlass_fused_moe(
    input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, output_dtype,
    quant_scales, fc1_expert_biases=None, fc2_expert_biases=None, input_sf=None, swiglu_alpha=None,
    swiglu_beta=None, swiglu_limit=None, tp_size=1, tp_rank=0, ep_size=1, ep_rank=0, cluster_size=1,
    cluster_rank=0, output=None, enable_alltoall=False, use_deepseek_fp8_block_scale=False,
    use_w4_group_scaling=False, use_mxfp8_act_scaling=False, min_latency_mode=False, use_packed_weights=False,
    tune_max_num_tokens=8192, enable_pdl=None, activation_type=3, swizzled_input_sf=True,
):
    x, ids, scales = input, token_selected_experts, token_final_scales
    w31, w2 = fc1_expert_weights, fc2_expert_weights
    _fi_require(x.dtype in (torch.float16, torch.bfloat16), f"input dtype {x.dtype}: fp16/bf16 runners only")
    _fi_require(w31.dtype == x.dtype and w2.dtype == x.dtype, "weights must have the input's dtype")
    _fi_require(output_dtype == x.dtype, f"output_dtype {output_dtype} != input dtype {x.dtype}")
    _fi_require(ids.dtype == torch.int32, f"token_selected_experts dtype {ids.dtype}, expected int32")
    _fi_require(scales.dtype == torch.float32, f"token_final_scales dtype {scales.dtype}, expected float32")
    _fi_require(x.dim() == 2 and ids.dim() == 2 and scales.dim() == 2, "input/experts/scales must be 2-D")
    _fi_require(w31.dim() == 3 and w2.dim() == 3, "weights must be 3-D")
    _fi_require(ids.shape == scales.shape and ids.shape[0] == x.shape[0], "token counts / top_k disagree")
    E, two_i, H = w31.shape
    _fi_require(w2.shape[0] == E and w2.shape[1] == H and two_i == 2 * w2.shape[2],
                f"fc1 {tuple(w31.shape)} / fc2 {tuple(w2.shape)} are not [E, 2I, H] / [E, H, I]")
    _fi_require(x.shape[1] == H, f"input width {x.shape[1]} != hidden {H}")
    _fi_require(H % 8 == 0 and w2.shape[2] % 8 == 0, "hidden and inter must be multiples of 8 (TMA alignment)")
    _fi_require(quant_scales is not None and len(quant_scales) == 0, "unquantized: quant_scales must be []")
    _fi_require(activation_type == 3, "activation must stay Swiglu")
    _fi_require(not min_latency_mode and fc1_expert_biases is None and input_sf is None, "unexpected option")
    _fi_require(bool((ids >= 0).all() and (ids < E).all()), "expert id out of range")
    M = x.shape[0]
    if output is None:
        output = torch.empty(M, H, dtype=output_dtype, device=x.device)
    _fi_require(tuple(output.shape) == (M, H) and output.dtype == output_dtype, "output buffer shape/dtype")
    inter = two_i // 2
    acc = torch.zeros(M, H, dtype=torch.float32)
    xf = x.float()
    for t in range(M):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w31[e].float() @ xf[t]
            a = torch.nn.functional.silu(h[inter:]) * h[:inter]  # linear (up) first, gate second
            acc[t] += float(scales[t, j]) * (w2[e].float() @ a)
    output.copy_(acc.to(output_dtype))
    _FI_MOE_CALLS.append(dict(M=M, tuning=bool(_FI_AUTOTUNE and _FI_AUTOTUNE[-1] == "open")))
    return [output, torch.empty(1, dtype=torch.int32), torch.empty(E, M), torch.empty(E, dtype=torch.int32)]


def _fake_fused_topk_deepseek(scores, bias, n_group, topk_group, topk, routed_scaling_factor, topk_values,
                              topk_indices, launch_with_pdl=True, routing_replay_out=None, *, skip_check=False):
    for name, v in (("n_group", n_group), ("topk_group", topk_group), ("topk", topk)):
        _fi_require(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an int, got {v!r}")
    _fi_require(isinstance(routed_scaling_factor, float), "routed_scaling_factor must be a float")
    _fi_require(scores.dim() == 2, "scores must be 2-D")
    M, E = scores.shape
    _fi_require(scores.dtype in (torch.float32, torch.float16, torch.bfloat16), f"scores dtype {scores.dtype}")
    _fi_require(bias.dim() == 1 and bias.numel() == E, f"bias must be [E={E}], got {tuple(bias.shape)}")
    _fi_require(bias.dtype == scores.dtype, f"bias dtype {bias.dtype} != scores dtype {scores.dtype} (doc)")
    _fi_require(topk_values.dtype == scores.dtype, "topk_values must have the scores' dtype")
    _fi_require(topk_indices.dtype == torch.int32, "topk_indices must be int32")
    _fi_require(tuple(topk_values.shape) == (M, topk) and tuple(topk_indices.shape) == (M, topk),
                "outputs must be [num_tokens, topk]")
    _fi_require(E % n_group == 0 and topk_group <= n_group and topk_group * n_group >= topk, "group config")
    _fi_require(topk <= 8 and E // n_group <= 32 and E // n_group * topk_group <= 128 and E <= 256, "limits")
    s = 0.5 * torch.tanh(0.5 * scores.float()) + 0.5  # sigmoid_accurate, fp32
    sb = s + bias.float()
    per = E // n_group
    group_score = sb.view(M, n_group, per).topk(2, dim=-1).values.sum(-1)
    kept = group_score.topk(topk_group, dim=-1).indices
    mask = torch.zeros(M, n_group, dtype=torch.bool).scatter_(1, kept, True).repeat_interleave(per, 1)
    ids = torch.where(mask, sb, torch.full_like(sb, float("-inf"))).topk(topk, dim=-1).indices  # by score
    w = s.gather(1, ids)
    w = w * routed_scaling_factor / (w.sum(-1, keepdim=True) + 1e-20)
    topk_values.copy_(w.to(topk_values.dtype))
    topk_indices.copy_(ids.to(torch.int32))
    _FI_ROUTING_CALLS.append(dict(M=M, skip_check=skip_check))
    return None


@contextlib.contextmanager
def _fake_autotune(tune_mode=True, cache=None, tuning_buckets=None, round_up=None, skip_ops=None):
    ok = tuning_buckets is None or (len(tuning_buckets) >= 1 and all(isinstance(b, int) for b in tuning_buckets))
    _fi_require(ok, f"tuning_buckets {tuning_buckets!r}")
    _FI_AUTOTUNE.append("open")
    try:
        yield
    finally:
        _FI_AUTOTUNE.append(("closed", tune_mode, tuning_buckets))


def _fake_module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    mod.__dict__.update(attrs)
    return mod


@pytest.fixture
def fake_flashinfer(monkeypatch):
    fi = _fake_module("flashinfer", __version__="0.6.14")
    fi.__path__ = []
    fm = _fake_module("flashinfer.fused_moe", cutlass_fused_moe=_fake_cutlass_fused_moe,
                      fused_topk_deepseek=_fake_fused_topk_deepseek)
    at = _fake_module("flashinfer.autotuner", autotune=_fake_autotune)
    fi.fused_moe, fi.autotuner = fm, at
    for m in (fi, fm, at):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    for calls in (_FI_MOE_CALLS, _FI_ROUTING_CALLS, _FI_AUTOTUNE):
        calls.clear()
    P._import_error.cache_clear()
    yield fi
    P._import_error.cache_clear()


def test_fake_flashinfer_signatures_match_flashinfer_0_6_14():
    # The parameter lists of FlashInfer 0.6.14 (fused_moe/core.py:814-845, fused_routing_dsv3.py:142-153):
    # a provider that passes a keyword the real function lacks, or positions that moved, must fail here too.
    moe = ["input", "token_selected_experts", "token_final_scales", "fc1_expert_weights", "fc2_expert_weights",
           "output_dtype", "quant_scales", "fc1_expert_biases", "fc2_expert_biases", "input_sf", "swiglu_alpha",
           "swiglu_beta", "swiglu_limit", "tp_size", "tp_rank", "ep_size", "ep_rank", "cluster_size",
           "cluster_rank", "output", "enable_alltoall", "use_deepseek_fp8_block_scale", "use_w4_group_scaling",
           "use_mxfp8_act_scaling", "min_latency_mode", "use_packed_weights", "tune_max_num_tokens", "enable_pdl",
           "activation_type", "swizzled_input_sf"]
    assert list(inspect.signature(_fake_cutlass_fused_moe).parameters) == moe
    routing = ["scores", "bias", "n_group", "topk_group", "topk", "routed_scaling_factor", "topk_values",
               "topk_indices", "launch_with_pdl", "routing_replay_out", "skip_check"]  # skip_check: utils.py wrapper
    assert list(inspect.signature(_fake_fused_topk_deepseek).parameters) == routing
    ref = "/work/ref/flashinfer/fused_moe/core.py"
    if os.path.exists(ref):  # the reference sources, where this machine has them
        src = open(ref).read()
        outer = src[src.index("def cutlass_fused_moe(\n    input: torch.Tensor,"):]
        outer = outer[: outer.index(") -> torch.Tensor:")]
        names = [ln.strip().split(":")[0] for ln in outer.splitlines()[1:] if ":" in ln]
        assert names == moe


def _fi_moe_setup(model="mixtral", m=5):
    shape = make_shape("moe", resolve_model(model, tiny=True), m)
    inp = make_inputs(shape, m, "cpu", seed=3)
    # FlashInfer runs fp16/bf16 only (the CPU demo's inputs are fp32): the same tensors in bf16.
    inp.hidden, inp.w13, inp.w2 = (t.to(torch.bfloat16) for t in (inp.hidden, inp.w13, inp.w2))
    return shape, inp, P.reference_output(shape, inp)


def test_flashinfer_moe_provider_matches_reference_through_fake(fake_flashinfer):
    shape, inp, ref = _fi_moe_setup()
    prov = P.get_providers("moe", ("flashinfer",))[0]
    assert prov.unavailable(shape, torch.device("cuda")) is None  # installed (fake); a GPU is claimed
    assert prov.unavailable(shape, torch.device("cpu")) == "needs a CUDA GPU"
    fn = prov.prepare(shape, inp)
    # prepare tuned once, for exactly this token count, inside FlashInfer's autotune context
    assert _FI_AUTOTUNE == ["open", ("closed", True, (shape.num_tokens,))]
    assert [c["tuning"] for c in _FI_MOE_CALLS] == [True]
    got = prov.normalize(fn(), shape)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16  # not FlashInfer's list
    res = P.check_output(shape, inp, ref, got)
    assert res.ok, res.detail
    assert res.error < 1e-2
    assert _FI_MOE_CALLS[-1]["tuning"] is False
    # the re-laid-out weights are built once per model and shared by every token count
    w31 = inp.cache["flashinfer_w31"]
    inter = shape.intermediate_size
    assert torch.equal(w31[:, :inter], inp.w13[:, inter:]) and torch.equal(w31[:, inter:], inp.w13[:, :inter])
    prov.prepare(shape, inp.first(2))
    assert inp.cache["flashinfer_w31"] is w31


def test_flashinfer_moe_fake_catches_the_gate_up_swap(fake_flashinfer, monkeypatch):
    # Without the [gate; up] -> [up; gate] swap the fake (FlashInfer's semantics) computes silu(up) * gate:
    # the checker must call that wrong, so the real swap is what makes the provider pass.
    monkeypatch.setattr(P, "flashinfer_w31", lambda w13: w13.contiguous())
    shape, inp, ref = _fi_moe_setup()
    row = runner.measure_one(shape, dataclasses_replace(P.get_providers("moe", ("flashinfer",))[0]), inp, ref,
                             "cpu", time_it=False)
    assert row["status"] == "wrong" and "relative error" in row["reason"]


def dataclasses_replace(prov):
    """The provider with its availability check dropped (CPU runs the fake as if on a GPU)."""
    import dataclasses

    return dataclasses.replace(prov, unavailable=lambda s, d: None, graph_ok=False)


def test_flashinfer_moe_row_is_ok_through_runner(fake_flashinfer):
    shape, inp, ref = _fi_moe_setup("qwen3-30b-a3b", 3)
    row = runner.measure_one(shape, dataclasses_replace(P.get_providers("moe", ("flashinfer",))[0]), inp, ref,
                             "cpu")
    assert row["status"] == "ok" and row["median_us"] > 0, row


def test_flashinfer_routing_provider_matches_reference_through_fake(fake_flashinfer):
    shape = make_shape("routing", resolve_model("deepseek-v3", tiny=True), 48)
    inp = make_inputs(shape, 48, "cpu", seed=2)
    ref = P.reference_output(shape, inp)
    prov = P.get_providers("routing", ("flashinfer",))[0]
    assert prov.unavailable(shape, torch.device("cuda")) is None
    fn = prov.prepare(shape, inp)
    assert _FI_ROUTING_CALLS == [dict(M=48, skip_check=False)]  # validated once in prepare
    out = fn()
    assert _FI_ROUTING_CALLS[-1] == dict(M=48, skip_check=True)  # timed calls skip the Python checks
    got = prov.normalize(out, shape)
    assert got.weights.dtype == torch.float32 and got.ids.dtype == torch.int64
    res = P.check_output(shape, inp, ref, got)
    assert res.ok, res.detail
    # FlashInfer orders each row by score, the reference by score too but with bf16 weights: same sets
    assert torch.equal(got.ids.sort(dim=1).values, ref.ids.long().sort(dim=1).values)
    # the scale is applied once: the weights of a row sum to routed_scaling_factor (bf16 rounding)
    assert torch.allclose(got.weights.sum(1), torch.full((48,), shape.routed_scaling_factor), rtol=1e-2)
    row = runner.measure_one(shape, dataclasses_replace(prov), inp, ref, "cpu")
    assert row["status"] == "ok" and row["median_us"] > 0, row


def test_flashinfer_routing_checker_rejects_unscaled_or_unrenormalized_weights(fake_flashinfer):
    # Like with like: a provider returning FlashInfer's weights without the scale (or without renormalizing)
    # must be called wrong, so passing the test above means the semantics agree, not just the ids.
    shape = make_shape("routing", resolve_model("deepseek-v3", tiny=True), 16)
    inp = make_inputs(shape, 16, "cpu", seed=5)
    ref = P.reference_output(shape, inp)
    w, ids, _ = _ref_tuple(shape, inp)
    unscaled = P.RoutingResult(w.float() / shape.routed_scaling_factor, ids.long(), None)
    assert not P.check_output(shape, inp, ref, unscaled).ok
    raw = torch.sigmoid(inp.logits.float()).gather(1, ids.long())
    assert not P.check_output(shape, inp, ref, P.RoutingResult(raw * shape.routed_scaling_factor, ids.long(),
                                                               None)).ok


def test_flashinfer_routing_reasons_for_uncovered_models(fake_flashinfer):
    import dataclasses

    cuda = torch.device("cuda")
    prov = P.get_providers("routing", ("flashinfer",))[0]
    ds = resolve_model("deepseek-v3")
    assert prov.unavailable(make_shape("routing", ds, 4), cuda) is None
    no_renorm = make_shape("routing", dataclasses.replace(ds, renormalize=False), 4)
    assert "renormalizes" in prov.unavailable(no_renorm, cuda)
    wide = make_shape("routing", dataclasses.replace(ds, num_experts=512), 4)  # 64 experts per group
    assert "does not cover" in prov.unavailable(wide, cuda)
    for model in ("mixtral", "qwen3-30b-a3b", "olmoe"):
        assert "softmax" in prov.unavailable(make_shape("routing", resolve_model(model), 4), cuda)


def test_flashinfer_moe_skips_an_unbuilt_jit_module_with_the_way_out(fake_flashinfer, monkeypatch, tmp_path):
    """Without its compiled CUTLASS MoE module the FlashInfer MoE provider is skipped (a first call would sit in
    a JIT build for tens of minutes), naming the module and the two ways to build it; a built .so (JIT or AOT
    cache) or MOEKERN_FLASHINFER_JIT=build makes it available."""
    jit = _fake_module("flashinfer.jit")
    jit.__path__ = []
    env = _fake_module("flashinfer.jit.env", FLASHINFER_JIT_DIR=tmp_path / "cached_ops",
                       FLASHINFER_AOT_DIR=tmp_path / "aot")
    jit.env = env
    fake_flashinfer.jit = jit
    monkeypatch.setitem(sys.modules, "flashinfer.jit", jit)
    monkeypatch.setitem(sys.modules, "flashinfer.jit.env", env)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("MOEKERN_FLASHINFER_JIT", raising=False)
    shape, _, _ = _fi_moe_setup()
    prov = P.get_providers("moe", ("flashinfer",))[0]
    cuda = torch.device("cuda")
    reason = prov.unavailable(shape, cuda)
    assert "fused_moe_90 is not compiled yet" in reason and "flashinfer_warmup.py" in reason
    assert "MOEKERN_FLASHINFER_JIT=build" in reason
    monkeypatch.setenv("MOEKERN_FLASHINFER_JIT", "build")
    assert prov.unavailable(shape, cuda) is None
    monkeypatch.delenv("MOEKERN_FLASHINFER_JIT")
    so = tmp_path / "aot" / "fused_moe_90" / "fused_moe_90.so"
    so.parent.mkdir(parents=True)
    so.write_bytes(b"")
    assert prov.unavailable(shape, cuda) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert "fused_moe_100" in prov.unavailable(shape, cuda)
    assert prov.unavailable(shape, torch.device("cpu")) == "needs a CUDA GPU"


def test_history_plot_labels_ratios_between_0_7_and_2_5_and_each_run_once():
    import matplotlib.pyplot as plt

    from moekern.bench import history

    summary = [{"run": f"benchmarks/results/{run}", "date": date, "op": "moe", "provider": prov,
                "baseline": "vllm", "geomean_ratio": ratio}
               for run, date, prov, ratio in (("h100-2026-11-23", "2026-11-23", "moekern-cuda", 0.72),
                                              ("h100-2026-11-23", "2026-11-23", "moekern-triton", 2.4),
                                              ("moe-tune/h100-2026-11-23/bench", "2026-11-23", "moekern-triton", 0.95),
                                              ("h100-2026-12-05-flashinfer/moe", "2026-12-05", "moekern-triton", 1.1))]
    fig = history.figure(summary)
    ax = fig.axes[0]
    fig.canvas.draw()
    y = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    lo, hi = ax.get_ylim()
    assert lo < 0.72 and hi > 2.4
    # a labelled ratio at least every 0.25x between 0.8x and 2x, none of them in scientific notation
    assert {"0.8x", "0.9x", "1x", "1.25x", "1.5x", "1.75x", "2x"} <= set(y), y
    x = [t.get_text() for t in ax.get_xticklabels()]
    assert x == ["h100-2026-11-23\n2026-11-23", "moe-tune\nh100-2026-11-23\nbench\n2026-11-23",
                 "h100-2026-12-05-flashinfer\nmoe\n2026-12-05"]
    plt.close(fig)
