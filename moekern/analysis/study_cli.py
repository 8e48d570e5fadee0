"""`moekern profile | coactivation | factorial | recommend | project`. Heavy imports happen inside the
command functions, so building the parser stays cheap."""

from __future__ import annotations

import json
import math
import sys

from moekern.analysis.cli import add_combine_ranks
from moekern.cliargs import (existing_dir, existing_file, existing_path, model_name, positive_float, positive_int,
                             positive_int_list)
from moekern.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="per-kernel time shares (torch.profiler, traces, ncu, nsys, rocprofv3)")
    ps = p.add_subparsers(dest="profile_tool", metavar="TOOL")
    for name, helptext in (("torch", "torch.profiler around a workload: trace.json + per-kernel table"),
                           ("run", "run the workload only (the target that ncu/nsys/rocprofv3 wrap)"),
                           ("ncu", "Nsight Compute metrics of moekern's kernels (CSV parsed)"),
                           ("nsys", "Nsight Systems timeline (where nsys works)"),
                           ("rocprof", "rocprofv3 kernel trace (AMD GPUs)")):
        q = ps.add_parser(name, help=helptext)
        q.add_argument("--kind", default="fused_moe", choices=("fused_moe", "routing"))
        q.add_argument("--model", type=model_name, default="mixtral")
        q.add_argument("--tokens", type=positive_int, default=256)
        q.add_argument("--backend", default="auto")
        q.add_argument("--device", default=None)
        q.add_argument("--scale-hidden", type=positive_int, default=1, help="divide H and I (tiny CPU runs)")
        q.add_argument("--iters", type=positive_int, default=5)
        q.add_argument("--warmup", type=int, default=2)
        q.add_argument("--out", default="profile_out")
        q.add_argument("--json", action="store_true")
        q.set_defaults(func=_profile)
    q = ps.add_parser("trace", help="per-kernel table of an existing Chrome-trace JSON (e.g. vLLM's profiler)")
    q.add_argument("trace", type=existing_file)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_profile_trace)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    p = sub.add_parser("coactivation", help="expert co-activation, hot/cold experts, placements scored by fan-out")
    p.add_argument("path", type=existing_path, help="gate-log file/dir whose records carry topk_sample")
    p.add_argument("--ep-size", type=positive_int, required=True)
    p.add_argument("--max-tokens", type=positive_int, default=1000)
    p.add_argument("--no-filter", action="store_true")
    p.add_argument("--out", default=None, help="write the JSON (maps included) here")
    p.add_argument("--plot", default=None, help="write a co-activation heatmap PNG (first sampled layer)")
    add_combine_ranks(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_coactivation)

    p = sub.add_parser("factorial", help="factorial design over serving factors + type-II ANOVA")
    p.add_argument("spec", type=existing_file, help="factorial YAML spec")
    p.add_argument("--dry-run", action="store_true", help="plan only; run nothing")
    p.add_argument("--analyze", type=existing_dir, default=None, metavar="DIR",
                   help="only the ANOVA, of the results under DIR; runs nothing (without it the factorial runs "
                        "what is not done yet, then fits the ANOVA of the spec's out_dir/runs)")
    p.add_argument("--reps", type=positive_int, default=None,
                   help="repetitions of every bench instead of the spec's `reps` (a shorter first run; a later "
                        "run with more resumes and adds the missing ones)")
    p.add_argument("--include-unsteady", action="store_true",
                   help="keep benches that JIT-compiled kernels while measured (steady_state false; dropped by "
                        "default, and listed)")
    p.add_argument("--analysis-out", default=None,
                   help="where anova.png and anova.tex go (default: the spec's out_dir)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_factorial)

    p = sub.add_parser("recommend", help="layout + placement advice: analytic scores and the learned predictor")
    p.add_argument("--model", type=model_name, required=True,
                   help="registry model (`moekern models` lists them), e.g. mixtral")
    p.add_argument("--gpus", type=positive_int, default=8, help="GPUs to lay the model out on (default 8)")
    p.add_argument("--gate-log", type=existing_path, default=None,
                   help="gate-log file/dir of this model: placement scores use its measured expert loads")
    p.add_argument("--max-num-seqs", type=positive_int, default=64,
                   help="vLLM --max-num-seqs the predictor assumes (default 64)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=8192,
                   help="vLLM --max-num-batched-tokens the predictor assumes (default 8192)")
    p.add_argument("--moe-backend", default="moekern", help="MoE kernel backend the predictor assumes (default "
                                                             "moekern; also vllm, flashinfer)")
    p.add_argument("--gpu-mem-gb", type=positive_float, default=80.0,
                   help="memory per GPU; layouts whose weights do not fit are flagged (default 80)")
    p.add_argument("--predictor", default=None,
                   help="a .joblib predictor (default: the shipped one); with --retrain, where to write it")
    add_combine_ranks(p)
    p.add_argument("--retrain", type=existing_dir, default=None, metavar="RESULTS_DIR",
                   help="train a predictor on RESULTS_DIR, write it to --predictor (or the shipped path), exit")
    p.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    p.set_defaults(func=_recommend)

    p = sub.add_parser("project", help="PROJECTED EP dispatch/combine and step time on 1-4 nodes of 8 GPUs")
    p.add_argument("gate_log", type=existing_path)
    p.add_argument("--model", type=model_name, required=True)
    p.add_argument("--nodes", type=positive_int_list, default=(1, 2, 3, 4), help="node counts, e.g. 1,2,4")
    p.add_argument("--tokens-per-gpu", type=positive_int, default=256)
    p.add_argument("--intra-bw-gbs", type=positive_float, default=None,
                   help="default: measured file, else 350 (assumed)")
    p.add_argument("--inter-bw-gbs", type=positive_float, default=50.0, help="per GPU; 50 = one 400 Gb/s NIC")
    p.add_argument("--gemm-tflops", type=positive_float, default=400.0)
    p.add_argument("--dispatch-bytes", type=positive_float, default=2.0, help="2 = bf16, 1 = fp8 dispatch")
    p.add_argument("--plot", default=None)
    add_combine_ranks(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_project)


def _clean(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) else (str(obj) if math.isinf(obj) else obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _profile(args) -> int:
    from moekern.analysis.study import profile as P

    wl = ["--kind", args.kind, "--model", args.model, "--tokens", str(args.tokens), "--backend", args.backend,
          "--scale-hidden", str(args.scale_hidden), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    if args.profile_tool in ("torch", "run"):
        fn, desc = P.make_workload(args.kind, args.model, args.tokens, args.backend, args.device,
                                   scale_hidden=args.scale_hidden)
        if args.profile_tool == "run":
            for _ in range(args.warmup + args.iters):
                fn()
            print(json.dumps(desc))
            return 0
        table = P.profile_callable(fn, args.out, args.warmup, args.iters, desc["device"])
        print(json.dumps({**desc, **table.to_dict()}, indent=1) if args.json else table.format())
        if not args.json:
            print(f"trace (open in ui.perfetto.dev): {table.trace_path}")
        return 0
    from pathlib import Path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = P.workload_argv(wl)
    if args.profile_tool == "ncu":
        rc, text = P.run_tool(P.ncu_command(target, None), out / "ncu.log")
        if rc == 127:
            print(text)
            return 0
        try:
            rows = P.parse_ncu_csv(text)
        except ValueError as exc:
            print(f"ncu exit code {rc}; {exc}; see {out / 'ncu.log'}", file=sys.stderr)
            return 1
        (out / "ncu_metrics.json").write_text(json.dumps(_clean(rows), indent=1), encoding="utf-8")
        for r in rows:
            print(f"{r['kernel'][:60]:60s} " + " ".join(f"{r.get(m, float('nan')):7.1f}" for m in P.METRICS))
        print(f"columns: {', '.join(P.METRICS)}; wrote {out / 'ncu_metrics.json'}")
        return 0 if rc == 0 else 1
    if args.profile_tool == "nsys":
        rc, text = P.run_tool(P.nsys_command(target, out / "moekern"), out / "nsys.log")
        reports = sorted(out.glob("moekern*.nsys-rep"))
        if rc == 127:
            print(text)
        elif not reports:
            print(f"nsys ran (exit {rc}) but wrote no report: this machine's nsys does not produce reports "
                  f"(see {out / 'nsys.log'}); use `moekern profile torch` instead")
        else:
            print(f"nsys report: {reports[0]}")
        return 0
    rc, text = P.run_tool(P.rocprof_command(target, out / "rocprof"), out / "rocprof.log")
    print(text if rc == 127 else f"rocprofv3 exit {rc}; output in {out / 'rocprof'}")
    return 0


def _profile_trace(args) -> int:
    from moekern.analysis.study.profile import read_trace

    t = read_trace(args.trace)
    print(json.dumps(t.to_dict(), indent=1) if args.json else t.format())
    return 0


def _coactivation(args) -> int:
    from moekern.analysis.imbalance.coactivation import hot_cold, placement_study

    res = placement_study(args.path, args.ep_size, max_tokens=None if args.no_filter else args.max_tokens,
                          combine_ranks=args.combine_ranks)
    data = res["coact"]
    sampled = [l for l in data.layers if data.samples.get(l)]
    if args.plot and not sampled:  # a heatmap of nothing is not a plot: refuse before writing anything
        raise UsageError(f"--plot {args.plot!r}: no record under {args.path!r} carries topk_sample, so there is no "
                         f"co-activation to draw (record one with MOEKERN_GATE_LOG_TOPK_SAMPLE=N on the vLLM "
                         f"plugin, or leave out --plot for the load-only scores)")
    out = {"ep_size": args.ep_size, "train_steps": res["train_steps"], "test_steps": res["test_steps"],
           "sampled_tokens_test": res["sampled_tokens_test"], "layers_with_samples": sampled,
           "hot_cold_rule": "hot: load > mean + 1 std; cold: load < mean - 1 std (population std)",
           "layers": {str(l): {"hot": hot_cold(data.load[l])[0].tolist(), "cold": hot_cold(data.load[l])[1].tolist()}
                      for l in data.layers},
           "placements": [{"strategy": r.strategy, "num_redundant": r.num_redundant,
                           "test_step_max_mean": r.step_max_mean, "fan_out": r.fan_out} for r in res["rows"]]}
    if args.out:
        full = dict(out, physical_to_logical={r.strategy: r.physical_to_logical.tolist() for r in res["rows"]},
                    coactivation={str(l): data.coact[l].tolist() for l in data.layers})
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(_clean(full), fh)
    if args.plot and sampled:
        from pathlib import Path

        from moekern.analysis.report.study import coactivation_heatmap

        Path(args.plot).write_bytes(coactivation_heatmap(data.coact[sampled[0]], f"layer {sampled[0]}"))
    if args.json:
        print(json.dumps(_clean(out), indent=1))
        return 0
    if not sampled:
        print("note: no record carries topk_sample; fan-out cannot be scored (NaN)")
    print(f"EP={args.ep_size}: {res['train_steps']} train / {res['test_steps']} test steps, "
          f"{res['sampled_tokens_test']} sampled test tokens")
    print(f"{'strategy':14s} {'max/mean':>8s} {'fan-out':>8s}")
    for r in res["rows"]:
        name = r.strategy + (f"+{r.num_redundant}" if r.num_redundant else "")
        print(f"{name:14s} {r.step_max_mean:8.3f} {r.fan_out:8.3f}")
    for l, v in out["layers"].items():
        print(f"layer {l}: hot {v['hot']} cold {v['cold']}")
    return 0


def _factorial(args) -> int:
    from moekern.analysis.study.factorial import (FACTORS, anova_all, anova_latex, anova_plot, collect_results,
                                         load_factorial_spec, run_factorial, steady_rows, with_reps)
    from pathlib import Path

    spec = load_factorial_spec(args.spec)
    if args.reps is not None:
        spec = with_reps(spec, args.reps)
    if not args.analyze:  # --analyze only analyzes: it runs nothing
        summary = run_factorial(spec, dry_run=args.dry_run)
        if args.dry_run:
            print(json.dumps(summary))
            return 0
    df = collect_results(args.analyze or spec.out_dir / "runs")
    if df.empty:
        print(f"no results yet under {args.analyze or spec.out_dir / 'runs'}; nothing to analyze")
        return 0
    if not args.include_unsteady:
        n_all = len(df)
        df, unsteady = steady_rows(df)
        if unsteady:
            print(f"left out {len(unsteady)} of {n_all} benches that JIT-compiled kernels while measured "
                  f"(--include-unsteady keeps them): {', '.join(unsteady)}", file=sys.stderr)
    res = anova_all(df, [f for f in spec.factors if f in FACTORS or f in df], spec.responses, spec.interactions)
    if not res:
        print("ANOVA not possible: too few results or no factor varies")
        return 0
    out_dir = Path(args.analysis_out) if args.analysis_out else spec.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    anova_plot(res, out_dir / "anova.png")
    (out_dir / "anova.tex").write_text(anova_latex(res), encoding="utf-8")
    if args.json:
        print(json.dumps(_clean({k: v.to_dict() for k, v in res.items()}), indent=1))
    else:
        for k, v in res.items():
            print(v.formula)
            print(v.table.to_string(float_format=lambda x: f"{x:.4g}"))
        print(f"wrote {out_dir / 'anova.png'} and {out_dir / 'anova.tex'}")
    return 0


def _recommend(args) -> int:
    from pathlib import Path

    from moekern.analysis.placement.recommend import format_recommendation, recommend
    from moekern.analysis.study import learned

    if args.retrain:
        from importlib import resources

        table, left_out = learned.training_table(args.retrain)
        pred = learned.train(args.retrain, table=(table, left_out))
        path = args.predictor or str(resources.files("moekern").joinpath(learned.SHIPPED))
        learned.save(pred, path)
        rows = Path(path).with_name(Path(learned.TRAINING_ROWS).name)
        learned.table_csv(table, rows)
        if left_out:
            print(f"left out {len(left_out)} runs that JIT-compiled kernels while measured: {', '.join(left_out)}",
                  file=sys.stderr)
        print(f"wrote {rows} ({len(table)} rows trained on)")
        for a in pred.accuracy():
            print(json.dumps(_clean(a)))
        print(f"wrote {path}" + (" (trained on SYNTHETIC data)" if pred.synthetic else ""))
        return 0
    if args.predictor and not Path(args.predictor).is_file():
        raise UsageError(f"--predictor {args.predictor!r} does not exist (a .joblib file; `moekern recommend "
                         f"--retrain RESULTS_DIR --predictor PATH` writes one)")
    rec = recommend(args.model, args.gpus, args.gate_log, args.max_num_seqs, args.max_num_batched_tokens,
                    args.moe_backend, args.gpu_mem_gb, predictor_path=args.predictor,
                    combine_ranks=args.combine_ranks)
    print(json.dumps(_clean(rec), indent=1, default=str) if args.json else format_recommendation(rec))
    return 0


def _project(args) -> int:
    from moekern.analysis.placement.project import measured_ep_rows, project_from_gate_log, projection_plot

    kw = {"inter_bw": args.inter_bw_gbs * 1e9, "gemm_tflops": args.gemm_tflops, "dispatch_bytes": args.dispatch_bytes}
    if args.intra_bw_gbs:
        kw["intra_bw"] = args.intra_bw_gbs * 1e9
    from moekern.analysis.placement.project import GPUS_PER_NODE
    from moekern.models import get_model

    nodes = tuple(args.nodes)
    rows, info = project_from_gate_log(args.gate_log, args.model, nodes, args.tokens_per_gpu,
                                       combine_ranks=args.combine_ranks, **kw)
    # Each GPU holds E / GPUs experts (no replication here): a node count whose GPUs do not divide E has no
    # placement, so it gets no point; say which and why rather than draw fewer points without a word.
    num_experts = get_model(args.model).num_experts
    left_out = [n for n in nodes if not any(r.nodes == n for r in rows)]
    note = (f"no projection for {', '.join(f'{n} node(s) = {n * GPUS_PER_NODE} GPUs' for n in left_out)}: "
            f"{info['model']} has E={num_experts} experts, and every GPU must hold E / GPUs of them (GPUs must "
            f"divide E; expert replication is not modelled)") if left_out else ""
    if not rows:
        raise UsageError(f"--nodes {','.join(map(str, nodes))}: {note}")
    info["nodes_left_out"] = left_out
    measured = measured_ep_rows()
    if args.plot:
        projection_plot(rows, f"{info['model']}, {info['routing']}"
                        + (f"\nnodes {','.join(map(str, left_out))} left out: {GPUS_PER_NODE} x nodes GPUs must divide "
                           f"E={num_experts}" if left_out else ""), args.plot)
    if args.json:
        print(json.dumps(_clean({"info": info, "rows": [r.__dict__ for r in rows], "measured": measured}), indent=1))
        if note:
            print(f"note: {note}", file=sys.stderr)
        return 0
    print(f"{info['status']}: {info['model']}, routing {info['routing']}, intra {info['intra_bw'] / 1e9:.0f} GB/s "
          f"({info['intra_bw_source']}), inter {info['inter_bw'] / 1e9:.0f} GB/s/GPU")
    if note:
        print(f"note: {note}")
    print(f"{'GPUs':>4s} {'placement':13s} {'disp us':>8s} {'gemm us':>8s} {'comb us':>8s} {'step ms':>8s} "
          f"{'fan-out':>7s} {'inter%':>6s} {'hot rank':>8s}")
    for r in rows:
        print(f"{r.gpus:4d} {r.placement:13s} {r.dispatch_us:8.1f} {r.gemm_us:8.1f} {r.combine_us:8.1f} "
              f"{r.step_ms:8.2f} {r.fan_out:7.2f} {100 * r.inter_node_fraction:6.1f} {r.max_rank_share:8.2f}")
    if measured:
        print(f"measured (bench_ep.py, {measured[0].get('device')}; single-GPU emulation = kernel-side cost, not "
              f"NVLink): " + "; ".join(f"{m.get('phase')} H={m.get('hidden')} E={m.get('num_experts')} "
                                        f"{m.get('skew')}: dispatch {m.get('peer_dispatch_us', float('nan')):.0f} us, "
                                        f"combine {m.get('peer_combine_us', float('nan')):.0f} us" for m in measured[:6]))
    else:
        print("no measured EP results (benchmarks/results/ep/*.json): every number above is projected")
    return 0
