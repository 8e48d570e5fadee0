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
    assert "cutlass" in capsys.readouterr().err


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
    from moekern.dispatch.reference import fused_moe_reference

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
    assert report.default_out_dir(loaded["environment"]) == os.path.join(
        "benchmarks", "results", "nvidia-h100-80gb-hbm3-2026-01-02")


def test_shapes_cover_the_standard_models_and_tokens():
    shapes = bench_shapes()
    ops = {(s.op, s.model) for s in shapes}
    assert len(ops) == 12 and len({s.key for s in shapes}) == len(shapes)
    ds = next(s for s in shapes if s.model == "deepseek-v3" and s.op == "routing")
    assert (ds.num_experts, ds.top_k, ds.num_expert_group, ds.topk_group, ds.scoring, ds.correction_bias,
            ds.routed_scaling_factor) == (256, 8, 8, 4, "sigmoid", True, 2.5)
    assert {s.num_tokens for s in shapes if s.op == "moe"} == {1, 8, 64, 256, 1024, 4096, 8192}
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
