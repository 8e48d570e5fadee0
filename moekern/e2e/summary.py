"""The ratios an invocation reports (moekern / vllm output throughput from the arms' medians, with the
repetitions' spread and a bootstrap interval; gate-log overhead = 1 - routing-log / routing) and the printed
summary.

Targets: moekern / vllm >= 1.05, gate-log overhead <= 2 %. Across engines that overhead drowns in
pass-to-pass noise (passes of one arm spread 14-27 % on the H100 runs); --gate-log-paired measures it within
one engine instead (stats.paired_overhead).
"""

from __future__ import annotations

from moekern.e2e.stats import gate_log_cost, ratio_ci, rep_spread, round_ratios, steady_state, tok_s


# the number each mode compares arms by (higher is better), and where the arm keeps its repetitions' stats
MODE_METRIC = {"offline": ("output_tok_s", "output_tok_s_stats"), "serve": ("output_throughput",
                                                                          "output_throughput_stats")}


def summarize(results: dict) -> dict:
    """The "summary" block of e2e_<model>.json from its per-mode, per-arm results: "<mode>.<arm>_vs_vllm"
    ratios with their spread and interval, steady-state flags, plugin-check failures, gate-log overheads."""
    def thr(mode, arm, key):
        r = results.get(mode, {}).get(arm) or {}
        return r.get(key)

    s = {}
    for mode, (key, stats_key) in MODE_METRIC.items():
        if not any(r and "skipped" not in r for r in (results.get(mode) or {}).values()):
            continue
        def median(arm):  # over the timed repetitions; a single value for results without stats
            return (thr(mode, arm, stats_key) or {}).get("median") or thr(mode, arm, key)

        base = median("vllm")
        base_spread = (thr(mode, "vllm", stats_key) or {}).get("spread")
        for arm in ("flashinfer", "moekern", "moekern-routing"):
            v = median(arm)
            if base and v:
                s[f"{mode}.{arm}_vs_vllm"] = round(v / base, 4)  # from the arms' medians
                spread = (thr(mode, arm, stats_key) or {}).get("spread")
                if spread is not None and base_spread is not None:
                    # the wider of the two arms' (max - min) / median: a ratio closer to 1 than this is noise
                    s[f"{mode}.{arm}_vs_vllm_spread"] = round(max(spread, base_spread), 4)
                ci = ratio_ci(tok_s(thr(mode, "vllm", "runs")), tok_s(thr(mode, arm, "runs"))) \
                    if mode == "offline" else None
                if ci:
                    s[f"{mode}.{arm}_vs_vllm_ci95"] = list(ci)
            if mode == "serve" and v and base:
                # the median over timed runs of each run's median TPOT; < 1: the arm decodes faster than vllm
                st, stb = thr(mode, arm, "median_tpot_ms_stats") or {}, thr(mode, "vllm", "median_tpot_ms_stats") or {}
                t = st.get("median") or thr(mode, arm, "median_tpot_ms")
                tb = stb.get("median") or thr(mode, "vllm", "median_tpot_ms")
                if t and tb:
                    s[f"serve.{arm}_tpot_vs_vllm"] = round(t / tb, 4)
                    if st.get("spread") is not None and stb.get("spread") is not None:
                        s[f"serve.{arm}_tpot_vs_vllm_spread"] = round(max(st["spread"], stb["spread"]), 4)
        steady, why = steady_state(results, mode)
        s[f"{mode}.steady_state"] = steady
        if why:
            s[f"{mode}.not_steady"] = why
    for arm, r in (results.get("offline") or {}).items():
        check = (r or {}).get("plugin_check") or {}
        if not check.get("ok", True):  # its ratio above measures vLLM, not moekern
            s[f"offline.{arm}_plugin_check_failed"] = check.get("why")
    for arm in ("flashinfer", "moekern", "moekern-routing", "moekern-routing-log"):
        by_round = round_ratios(thr("offline", arm, "rounds"), thr("offline", "vllm", "rounds"))
        if by_round:
            s[f"offline.{arm}_vs_vllm_by_round"] = by_round
    for arm, r in (results.get("offline") or {}).items():
        costs = [c for c in ((r or {}).get("gate_log_cost") or [gate_log_cost(r)]) if c]
        if costs:  # per round
            s[f"offline.{arm}_gate_log_host_us_per_step"] = [c["host_us_per_step"] for c in costs]
            s[f"offline.{arm}_gate_log_hand_off"] = sorted({h for c in costs for h in c["hand_off"]})
        paired = (r or {}).get("gate_log_paired") or {}
        if paired.get("overhead") is not None:
            s[f"offline.{arm}_gate_log_overhead_paired"] = paired["overhead"]
            s[f"offline.{arm}_gate_log_overhead_paired_n"] = paired["n_pairs"]
            if paired.get("ci95"):
                s[f"offline.{arm}_gate_log_overhead_paired_ci95"] = paired["ci95"]
    # gate-log overhead = 1 - log arm / moekern-routing; the -torch arm's is the torch-call hand-off's
    for log_arm, key in (("moekern-routing-log", "offline.gate_log_overhead"),
                         ("moekern-routing-log-torch", "offline.gate_log_overhead_torch")):
        a, b = thr("offline", "moekern-routing", "output_tok_s"), thr("offline", log_arm, "output_tok_s")
        if not (a and b):
            continue
        s[key] = round(1 - b / a, 4)
        # How far apart one arm's repetitions are ((max - min) / median of output tok/s, the worse of the two
        # arms): an overhead smaller than this is not resolved by the run.
        spreads = [rep_spread(thr("offline", arm, "runs")) for arm in ("moekern-routing", log_arm)]
        if all(x is not None for x in spreads):
            s[f"{key}_noise"] = round(max(spreads), 4)
        ci = ratio_ci(tok_s(thr("offline", "moekern-routing", "runs")), tok_s(thr("offline", log_arm, "runs")))
        if ci:  # overhead = 1 - ratio, so the ratio's upper bound is the overhead's lower one
            s[f"{key}_ci95"] = [round(1 - ci[1], 4), round(1 - ci[0], 4)]
    return s


def format_summary(results: dict, summary: dict) -> str:
    """The printed summary: per mode one line per arm (median, min-max, n, JIT while timed), the ratios
    with their spread, and a NOT STEADY STATE line naming the arms when the mode's ratios are no valid A/B."""
    lines = []
    for mode, (key, stats_key) in MODE_METRIC.items():
        arms = results.get(mode) or {}
        if not arms:
            continue
        unit = "output tok/s" if mode == "offline" else "output tok/s (served)"
        lines.append(f"{mode}: {unit}, median [min-max] over n timed repetitions")
        for arm, r in arms.items():
            r = r or {}
            if "skipped" in r or "error" in r:
                lines.append(f"  {arm:20s} {'skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED'}")
                continue
            st = r.get(stats_key) or ({"median": r[key], "min": r[key], "max": r[key], "n": 1}
                                      if r.get(key) else None)
            if st is None:
                lines.append(f"  {arm:20s} no result")
                continue
            extra = f"  median TPOT {r['median_tpot_ms']:.2f} ms" if r.get("median_tpot_ms") else ""
            jit = r.get("jit_during_measurement")
            lines.append(f"  {arm:20s} {st['median']:10.0f} [{st['min']:.0f}-{st['max']:.0f}] n={st['n']}"
                         f"  JIT while timed: {'?' if jit is None else jit}{extra}")
        for k, v in summary.items():
            if k.startswith(mode + ".") and k.endswith("_vs_vllm"):
                sp = summary.get(k + "_spread")
                ci = summary.get(k + "_ci95")
                lines.append(f"  {k.split('.', 1)[1]} = {v:.3f}" + (f" (rep spread {sp:.1%})" if sp is not None else
                                                                    " (spread unknown: one repetition)")
                             + (f", 95 % CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""))
                by_round = summary.get(k + "_by_round")
                if by_round:
                    lines.append("    by round: " + ", ".join("-" if x is None else f"{x:.3f}" for x in by_round))
        for name in ("gate_log_overhead", "gate_log_overhead_torch"):
            if mode != "offline" or summary.get(f"offline.{name}") is None:
                continue
            ov, ci = summary[f"offline.{name}"], summary.get(f"offline.{name}_ci95")
            noise = summary.get(f"offline.{name}_noise")
            lines.append(f"  {name} = {ov:.1%}" + (f" (rep spread {noise:.1%})" if noise is not None else "")
                         + (f", 95 % CI {ci[0]:.1%} to {ci[1]:.1%}" if ci else ""))
        for arm in arms if mode == "offline" else ():
            host = summary.get(f"offline.{arm}_gate_log_host_us_per_step")
            if host:
                lines.append(f"  {arm}: gate log on the model thread " + ", ".join(f"{x:.0f}" for x in host)
                             + " us/step (by round; " + "; ".join(summary[f"offline.{arm}_gate_log_hand_off"]) + ")")
            ov = summary.get(f"offline.{arm}_gate_log_overhead_paired")
            if ov is not None:
                ci = summary.get(f"offline.{arm}_gate_log_overhead_paired_ci95")
                lines.append(f"  {arm}: gate-log overhead, paired passes in one engine = {ov:.1%} over "
                             f"{summary[f'offline.{arm}_gate_log_overhead_paired_n']} pairs"
                             + (f", 95 % CI {ci[0]:.1%} to {ci[1]:.1%}" if ci else ""))
        if summary.get(f"{mode}.steady_state") is False:
            lines.append(f"  NOT STEADY STATE: the {mode} ratios above are not a valid A/B:")
            lines += [f"    {arm}: {why}" for arm, why in summary.get(f"{mode}.not_steady", {}).items()]
    return "\n".join(lines)
