"""`moekern metrics | steptimes | datasets | predict | validate | placement | sweep | report`.

Heavy imports (numpy, pandas, matplotlib, sentencepiece) happen inside the command functions, so building
the parser stays cheap.
"""

from __future__ import annotations

import json
import math
import sys

from moekern.cliargs import (existing_dir, existing_file, existing_path, fraction, model_name, nonneg_int, phase,
                             positive_int, positive_int_list)
from moekern.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("metrics", help="imbalance metrics of gate logs, or serving metrics of bench results")
    p.add_argument("path", type=existing_path,
                   help="gate-log file/dir, per-step JSON dir, or (with --bench) bench results dir/file")
    p.add_argument("--bench", action="store_true", help="read vllm bench serve result JSON instead of gate logs")
    p.add_argument("--max-tokens", type=positive_int, default=1000,
                   help="drop steps with more tokens (warm-up); default 1000")
    p.add_argument("--no-filter", action="store_true", help="keep every step (no max-tokens filter)")
    p.add_argument("--phase", type=phase, default=None, help="only records of this phase (prefill, decode, ...)")
    p.add_argument("--ep-size", type=positive_int, default=None, help="also report per-rank load for this EP size")
    p.add_argument("--placement", default="contiguous",
                   help="contiguous | round_robin | a JSON file with expert_to_rank [E] or physical_to_logical")
    p.add_argument("--per-run", action="store_true",
                   help="one result per run (each folder of gate-log files under PATH), as {run: metrics}; "
                        "without it several runs are pooled into one result, and the output says so")
    p.add_argument("--definition", choices=("moekern", "seed"), default="moekern",
                   help="moekern: per-layer CVs, the max-tokens filter on both (default); seed: the prior study's "
                        "two CVs exactly (per-step unfiltered, aggregated over steps and layers <= 1000 tokens)")
    add_combine_ranks(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_metrics)

    p = sub.add_parser("steptimes", help="step wall time by batch size from gate-log time stamps (A vs B)")
    p.add_argument("path", type=existing_path, help="gate-log file or folder (plain or .gz)")
    p.add_argument("--vs", type=existing_path, default=None, metavar="PATH",
                   help="a second run's gate logs: per-bucket ratio to it")
    p.add_argument("--label", default=None, help="name of PATH's run in the table (default: its folder name)")
    p.add_argument("--vs-label", default=None, help="name of --vs's run (default: its folder name)")
    p.add_argument("--phase", type=phase, default=None, help="only steps of this phase (prefill, decode, mixed)")
    p.add_argument("--gap-s", type=float, default=1.0,
                   help="a longer pause between two steps is not a step (pass boundary, warm-up); default 1.0")
    p.add_argument("--plot", default=None, metavar="PNG", help="bar chart of median step time per bucket")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_steptimes)

    p = sub.add_parser("datasets", help="prompt datasets with a spread of predicted imbalance")
    dsub = p.add_subparsers(dest="datasets_command", metavar="ACTION")
    g = dsub.add_parser("generate", help="write N JSONL prompt datasets named {index:03d}_{score:.4f}.jsonl")
    g.add_argument("--num", type=positive_int, required=True, help="how many datasets to write")
    g.add_argument("--out", required=True, metavar="DIR", help="folder for the datasets (created if missing)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the prompt mixes (default 0)")
    g.add_argument("--prompts", type=positive_int, default=100, help="prompts per dataset (default 100)")
    g.add_argument("--fallback-tokenizer", action="store_true",
                   help="score with the whitespace tokenizer instead of Mixtral's (no mistral-common needed)")
    g.set_defaults(func=_datasets_generate)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    p = sub.add_parser("predict", help="predicted routing imbalance of prompt files (JSONL or text)")
    p.add_argument("files", nargs="+", type=existing_file, metavar="FILE",
                   help="prompt files: .jsonl with {\"prompt\": ..., \"domain\": ...} per line, or any other "
                        "text file, one prompt per line")
    p.add_argument("--json", action="store_true", help="print {file: score and components} as JSON")
    p.add_argument("--fallback-tokenizer", action="store_true",
                   help="score with the whitespace tokenizer instead of Mixtral's (no mistral-common needed)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("validate", help="Spearman of predicted scores vs measured CV (bootstrap CI)")
    p.add_argument("datasets_dir", type=existing_dir,
                   help="folder of datasets named NNN_SCORE.jsonl (what `moekern datasets generate` writes)")
    p.add_argument("gate_logs_dir", type=existing_dir,
                   help="one sub-folder/file per dataset, named by its stem or index")
    p.add_argument("--max-tokens", type=positive_int, default=1000,
                   help="drop steps with more tokens (warm-up) from the measured CV; default 1000")
    p.add_argument("--n-boot", type=positive_int, default=1000,
                   help="bootstrap resamples for rho's confidence interval (default 1000)")
    add_combine_ranks(p)
    p.add_argument("--json", action="store_true", help="print the pairs, rho, its CI and p as JSON")
    p.set_defaults(func=_validate)

    p = sub.add_parser("placement", help="expert->rank placement advice for expert parallelism")
    p.add_argument("path", type=existing_path, help="gate-log file/dir or per-step JSON dir")
    p.add_argument("--ep-size", type=positive_int, required=True, help="expert-parallel ranks (must divide E)")
    p.add_argument("--redundant", type=nonneg_int, default=None,
                   help="redundant slots for replication (default ep-size)")
    p.add_argument("--model", type=model_name, default=None, help="registry model for memory per GPU (e.g. mixtral)")
    p.add_argument("--train-frac", type=fraction, default=0.5,
                   help="share of steps the placement is fitted on; the rest score it (default 0.5)")
    p.add_argument("--max-tokens", type=positive_int, default=1000,
                   help="drop steps with more tokens (warm-up); default 1000")
    p.add_argument("--out", default=None, help="write the advice + physical_to_logical map JSON here")
    add_combine_ranks(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_placement)

    p = sub.add_parser("sweep", help="run a grid of end-to-end benchmarks from a YAML spec (resumable)")
    p.add_argument("spec", type=existing_file, help="sweep YAML spec (analysis/specs/sweep_example.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--budget-s", type=float, metavar="S",
                   help="start no point with less than the spec's min_point_s of S seconds left (the rest stays for "
                        "the next invocation); {budget_left_s} in the command gets the seconds left")
    p.add_argument("--only", action="append", metavar="KEY=V1,V2",
                   help="run only the points whose grid KEY is one of these values (repeatable)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="HTML/Markdown report of a results directory")
    p.add_argument("results_dir", nargs="?", default=None, type=existing_dir,
                   help="default: the shipped real sample (moekern/data/sample_results: one H100 run, dummy "
                        "weights; see its README)")
    p.add_argument("--out", default="report.html", help="report path; .md gives Markdown")
    p.add_argument("--n-boot", type=positive_int, default=1000)
    p.add_argument("--ep-size", type=positive_int_list, default=None,
                   help="EP size(s) for the per-rank sections, e.g. 4 or 2,4,8 "
                                                   "(default: metadata, else 2, 4, 8 where they divide E)")
    p.add_argument("--metadata", type=existing_file, default=None,
                   help="metadata.json to use instead of RESULTS_DIR/metadata.json")
    add_combine_ranks(p)
    p.set_defaults(func=_report)


def add_combine_ranks(p) -> None:
    """`--combine-ranks`, for every command that reads gate logs."""
    p.add_argument("--combine-ranks", choices=("auto", "sum", "dedupe"), default="auto",
                   help="several ranks' records of one step: auto decides once per run from the ranks' metadata "
                        "(tensor-parallel replicas count once, data-parallel ranks are summed); sum; dedupe "
                        "(one copy: the lowest rank's)")


def _clean(obj):
    """Strict JSON: +-inf -> "inf"/"-inf" strings, NaN -> null (json.dumps would write Infinity/NaN)."""
    if isinstance(obj, float):
        return None if obj != obj else ("inf" if obj == math.inf else "-inf" if obj == -math.inf else obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _dumps(obj) -> str:
    return json.dumps(_clean(obj), indent=1, default=str, allow_nan=False)


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else ("nan" if x != x else f"{x:.4f}")


def _metrics(args) -> int:
    if args.bench:
        return _bench_metrics(args)
    from moekern.analysis.imbalance.metrics import load_runs, pool_runs

    max_tokens = None if args.no_filter else args.max_tokens
    if args.definition == "seed" and (args.no_filter or args.max_tokens != 1000):
        raise UsageError("--definition seed fixes its own token filter (none for the per-step CV, > 1000 tokens "
                         "left out of the aggregated CV): drop --max-tokens / --no-filter")
    placement = _placement_arg(args.placement, args.ep_size)
    runs = load_runs(args.path, combine_ranks=args.combine_ranks, phase=args.phase)
    if args.per_run:
        results = {name: _metrics_of(t, args, max_tokens, placement) for name, t in runs.items()}
        if args.json:
            print(_dumps(results))
            return 0
        first = next(iter(runs.values()))
        print(f"{args.path}: {len(runs)} run(s); definition {args.definition}; "
              f"{len(first.skipped)} corrupt or duplicate lines skipped")
        print(f"{'run':30s} {'steps':>6s} {'used':>6s} {'step CV':>9s} {'agg CV':>9s}  ranks")
        for name, out in results.items():
            print(f"{name:30s} {out['num_steps']:6d} {out['steps_used']:6d} {_fmt(out['overall']['step_cv']):>9s} "
                  f"{_fmt(out['overall']['agg_cv']):>9s}  {out['rank_combine'].get(name, '')}")
        return 0
    table = pool_runs(runs, str(args.path))
    out = _metrics_of(table, args, max_tokens, placement)
    if args.json:
        print(_dumps(out))
        return 0
    s_used, s_dropped = out["steps_used"], out["steps_dropped"]
    pooled = (f"{len(runs)} runs POOLED ({', '.join(runs)}; --per-run for one result each): "
              if len(runs) > 1 else "")
    filt = ("steps with > 1000 tokens left out of the aggregated CV only" if args.definition == "seed"
            else f"num_tokens > {max_tokens}")
    print(f"{table.source}: {pooled}{table.num_steps} steps x {table.num_layers} layers x {table.num_experts} "
          f"experts; {s_used} used, {s_dropped} dropped ({filt}); {len(table.skipped)} corrupt or duplicate "
          f"lines skipped")
    for run, how in table.rank_combine.items():
        if how != "1 rank":
            print(f"ranks ({run}): {how}")
    if args.definition == "seed":
        print(f"seed definition: per-step CV {_fmt(out['overall']['step_cv'])} (every (step, layer) record, "
              f"unfiltered), aggregated CV {_fmt(out['overall']['agg_cv'])} (one CV of the loads summed over "
              f"steps and layers)")
        return 0
    names = ("cv", "max_min", "max_mean", "entropy", "gini")
    print(f"{'':10s}" + "".join(f"{n:>11s}" for n in names))
    for kind in ("step", "agg"):
        print(f"{kind:10s}" + "".join(f"{_fmt(out['overall'][f'{kind}_{n}']):>11s}" for n in names))
    print("per-layer per-step CV: " + " ".join(_fmt(x) for x in out["per_layer"]["step_cv"]))
    if "rank_load" in out:
        r = out["rank_load"]
        print(f"EP={r['ep_size']} ({args.placement}): rank tokens {[round(x) for x in r['rank_tokens']]}, "
              f"max/mean per step {_fmt(r['step_max_mean'])}, aggregated {_fmt(r['agg_max_mean'])}")
    return 0


def _placement_arg(placement: str, ep_size: int | None):
    """--placement checked before any log is read: "contiguous", "round_robin" or a placement JSON's
    (expert_to_rank, physical_to_logical); a placement other than contiguous needs --ep-size."""
    from pathlib import Path

    if placement not in ("contiguous", "round_robin"):
        p = Path(placement)
        if not p.is_file():
            raise UsageError(f"--placement {placement!r} must be contiguous, round_robin or a placement JSON file "
                             "(moekern placement --out)")
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
            rec = obj.get("recommended", obj)
            e2r, p2l = rec.get("expert_to_rank"), rec.get("physical_to_logical")
        except (ValueError, AttributeError) as exc:
            raise UsageError(f"--placement {placement!r}: not a placement JSON ({exc})") from None
        if (e2r is None) == (p2l is None):
            raise UsageError(f"--placement {placement!r} must hold exactly one of expert_to_rank or "
                             "physical_to_logical (at the top or under 'recommended')")
        if ep_size is None:
            raise UsageError(f"--placement {placement!r} needs --ep-size (the per-rank load it places experts for)")
        return e2r, p2l
    if placement == "round_robin" and ep_size is None:
        raise UsageError(f"--placement {placement!r} needs --ep-size (the per-rank load it places experts for)")
    return placement


def _metrics_of(table, args, max_tokens, placement) -> dict:
    from moekern.analysis.imbalance.metrics import rank_load_summary, round_robin_map, summarize_as

    s = summarize_as(table, args.definition, max_tokens)
    out = {"source": table.source, "skipped_lines": len(table.skipped), "num_steps": table.num_steps,
           "rank_combine": table.rank_combine, **s.to_dict()}
    if args.ep_size:
        e2r = p2l = None
        if placement == "round_robin":
            e2r = round_robin_map(table.num_experts, args.ep_size)
        elif placement != "contiguous":
            e2r, p2l = placement
        try:
            out["rank_load"] = rank_load_summary(table, args.ep_size, e2r, p2l, max_tokens)
        except ValueError as exc:
                raise UsageError(f"--ep-size {args.ep_size} / --placement {args.placement!r}: {exc}") from None
    return out


def _steptimes(args) -> int:
    from pathlib import Path

    from moekern.analysis.serving import steptimes as stt

    if args.gap_s <= 0:
        print(f"moekern steptimes: --gap-s={args.gap_s} must be > 0", file=sys.stderr)
        return 2
    runs = []
    for path, label in ((args.path, args.label), (args.vs, args.vs_label)):
        if path is None:
            continue
        skipped = []
        try:
            times = stt.step_times(path, args.gap_s, args.phase, skipped)
        except FileNotFoundError as exc:
            print(f"moekern steptimes: {exc}", file=sys.stderr)
            return 2
        if not times:
            print(f"moekern steptimes: no timed steps in {path} (records need 'time'; consecutive steps at most "
                  f"--gap-s={args.gap_s} s apart{'; phase ' + args.phase if args.phase else ''})", file=sys.stderr)
            return 1
        runs.append((label or Path(path).resolve().name, stt.summarize(times), len(skipped), stt.recorder_cost(path),
                     times))
    (label, rows, bad, cost, times), vs = runs[0], (runs[1] if len(runs) > 1 else None)
    cmp = stt.compare(vs[1], rows) if vs else None
    if args.plot:
        stt.plot(rows, args.plot, label, vs[1] if vs else None, vs[0] if vs else "")
    if args.json:
        print(_dumps({"label": label, "buckets": rows, "skipped_lines": bad, "recorder": cost,
                      **({"vs": {"label": vs[0], "buckets": vs[1], "skipped_lines": vs[2], "recorder": vs[3]},
                          "compare": cmp} if vs else {})}))
        return 0
    if vs:
        print(stt.format_table(vs[1], label=vs[0]) + "\n")
        if vs[3]:
            print(stt.format_cost(vs[3], vs[4]) + "\n")
    print(stt.format_table(rows, cmp, label, vs[0] if vs else ""))
    if cost:
        print(stt.format_cost(cost, times))
    if bad or (vs and vs[2]):
        print(f"corrupt lines skipped: {bad}" + (f" ({label}), {vs[2]} ({vs[0]})" if vs else ""))
    if args.plot:
        print("plot:", args.plot)
    return 0


def _bench_metrics(args) -> int:
    from pathlib import Path

    from moekern.analysis.serving.metrics import group_runs, load_runs, parse_bench_result

    p = Path(args.path)
    if p.is_file():
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"path {str(p)!r} is not a bench result JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise UsageError(f"path {str(p)!r} is not a bench result JSON (a JSON object)")
        runs = [parse_bench_result(obj, p.stem, str(p))]
    else:
        runs, skipped = load_runs(p)
        for f, why in skipped:
            print(f"skipped {f}: {why}", file=sys.stderr)
    if args.json:
        print(_dumps([r.row() for r in runs]))
        return 0
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(group_runs(runs).to_string(index=False))
    return 0


def _datasets_generate(args) -> int:
    from moekern.analysis.datasets.generate import generate_datasets
    from moekern.analysis.datasets.predictor import ImbalancePredictor

    pred = ImbalancePredictor(force_fallback=args.fallback_tokenizer)
    if pred.tokenizer.is_fallback:
        print(f"note: whitespace tokenizer ({pred.tokenizer.reason or 'mistral-common/sentencepiece missing'})",
              file=sys.stderr)
    infos = generate_datasets(args.num, args.out, args.seed, args.prompts, predictor=pred)
    print(f"tokenizer: {pred.tokenizer.name}")
    for i in infos:
        print(f"{i.path}  strategy={i.strategy:25s} t={i.intensity:.2f} domains={i.num_domains:2d} score={i.score:.4f}")
    return 0


def _predict(args) -> int:
    from moekern.analysis.datasets.predictor import ImbalancePredictor, read_prompts

    pred = ImbalancePredictor(force_fallback=args.fallback_tokenizer)
    results = {}
    for f in args.files:
        bad: list = []
        prompts, domains = read_prompts(f, bad)
        shown = "; ".join(f"line {i}: {why}" for i, why in bad[:5]) + ("; ..." if len(bad) > 5 else "")
        if not prompts:  # one line: the bad lines' summary goes into the error, not a line of its own
            raise UsageError(f"FILE {f!r} holds no prompts (expected .jsonl lines {{\"prompt\": ...}}, or a text "
                             f"file with one prompt per line)" + (f"; {len(bad)} bad line(s): {shown}" if bad else ""))
        if bad:
            print(f"{f}: skipped {len(bad)} bad line(s) ({shown})", file=sys.stderr)
        results[f] = {**pred.predict(prompts, domains).to_dict(),
                      "skipped_lines": [{"line": i, "reason": why} for i, why in bad]}
    if args.json:
        print(_dumps(results))
        return 0
    print(f"tokenizer: {pred.tokenizer.name}" + (" (FALLBACK)" if pred.tokenizer.is_fallback else ""))
    for f, r in results.items():
        comps = " ".join(f"{k}={v:.3f}" for k, v in r["components"].items())
        bad = f", {len(r['skipped_lines'])} bad lines skipped" if r["skipped_lines"] else ""
        print(f"{f}: score={r['score']:.4f} ({r['num_prompts']} prompts, {r['num_tokens']} tokens{bad}) {comps}")
    return 0 if results else 1


def _validate(args) -> int:
    from moekern.analysis.datasets.validate import validate

    res = validate(args.datasets_dir, args.gate_logs_dir, args.max_tokens, n_boot=args.n_boot,
                   combine_ranks=args.combine_ranks)
    if args.json:
        print(_dumps(res.to_dict()))
        return 0
    for d, s, m in res.pairs:
        print(f"{d}: predicted {s:.4f}  measured {res.metric} {_fmt(m)}")
    if res.unmatched:
        print(f"no gate log for: {', '.join(res.unmatched)}")
    for d, why in res.unreadable.items():
        print(f"  {d}: {why}")
    print(f"Spearman rho = {res.rho.fmt()}  p = {_fmt(res.pvalue)}")
    return 0 if res.pairs else 1


def _placement(args) -> int:
    from moekern.analysis.imbalance.metrics import load_table
    from moekern.analysis.placement.advice import advise

    model = None
    if args.model:
        from moekern.models import get_model

        model = get_model(args.model)
    table = load_table(args.path, combine_ranks=args.combine_ranks)
    if len(table.run_names) > 1:
        print(f"note: {len(table.run_names)} runs pooled ({', '.join(table.run_names)}), {table.num_steps} steps",
              file=sys.stderr)
    adv = advise(table, args.ep_size, args.redundant, args.train_frac, args.max_tokens, model=model)
    obj = adv.to_json()
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as fh:
                fh.write(_dumps(obj))
        except OSError as exc:
            raise UsageError(f"--out {args.out!r} cannot be written: {exc.strerror}") from None
    if args.json:
        print(_dumps(obj))
        return 0
    print(f"EP={adv.ep_size}; fitted on {adv.train_steps} steps, scored on {adv.test_steps} held-out steps")
    for s in adv.scores:
        mem = f"  {s.memory['total_bytes'] / 2**30:.2f} GiB/GPU" if s.memory else ""
        print(f"  {s.strategy:12s} R={s.num_redundant:<3d} max/mean per step {s.test_step_max_mean:.4f}  "
              f"aggregated {s.test_agg_max_mean:.4f}{mem}")
    print(f"recommended: {adv.best.strategy}" + (f" with {adv.best.num_redundant} redundant slots"
                                                 if adv.best.num_redundant else ""))
    print("vLLM: " + " ".join(adv.vllm_args))
    print(adv.note)
    if args.out:
        print(f"map written to {args.out}")
    return 0


def _sweep(args) -> int:
    from moekern.analysis.study.sweep import load_spec
    from moekern.analysis.study.sweep_run import parse_only, run_sweep

    summary = run_sweep(load_spec(args.spec), dry_run=args.dry_run, progress=not args.no_progress,
                        budget_s=args.budget_s, only=parse_only(args.only))
    if not args.dry_run:
        print(json.dumps(summary))
    return 1 if summary["failed"] else 0


def _report(args) -> int:
    from pathlib import Path

    from moekern.analysis.report.html import write_report

    src = args.results_dir
    if src is None:
        src = str(Path(__file__).resolve().parents[1] / "data" / "sample_results")
        print(f"no RESULTS_DIR given: using the shipped real sample {src} (one H100 run, dummy weights)",
              file=sys.stderr)
    eps = list(args.ep_size) if args.ep_size else None
    out = write_report(src, args.out, n_boot=args.n_boot, ep_size=eps, metadata=args.metadata,
                       combine_ranks=args.combine_ranks)
    print(f"report written to {out}")
    return 0
