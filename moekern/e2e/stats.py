"""Numbers from an arm's timed repetitions: medians and spreads, bootstrap intervals of ratios, the paired
gate-log passes, rounds pooled into one result, and whether a mode was measured at steady state."""

from __future__ import annotations

import math
import statistics


def arm_stats(values) -> dict | None:
    """median, min, max, n and spread = (max - min) / median of one arm's timed repetitions (spread None
    for one repetition); None for no values."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    med = statistics.median(vals)
    spread = (vals[-1] - vals[0]) / med if len(vals) > 1 and med else None
    return {"median": med, "min": vals[0], "max": vals[-1], "n": len(vals), "spread": spread}


def median_run(runs: list[dict], key: str = "output_throughput") -> int:
    """Index of the run holding the (lower) median of `key`: the run an arm reports in full."""
    order = sorted(range(len(runs)), key=lambda i: runs[i][key])
    return order[(len(order) - 1) // 2]


def merge_rounds(rounds: list[dict]) -> dict:
    """One offline arm's result from its --rounds runs (each a fresh process; the arms alternate round by round,
    so a slow drift of the machine hits every arm alike): the timed passes of every round pooled (median and
    spread over all of them), JIT counts summed (unknown if any round's is), each round's own median under
    "rounds". A round that failed is listed and left out; all failed: the first failure."""
    ok = [r for r in rounds if "error" not in r and r.get("runs")]
    if not ok:
        return dict(rounds[0])
    runs = [x for r in ok for x in r["runs"]]
    stats = arm_stats([x["output_tok_s"] for x in runs])
    jits = [r.get("jit_during_measurement") for r in ok]
    kernels: dict[str, int] = {}
    for r in ok:
        for k, n in (r.get("jit_kernels") or {}).items():
            kernels[k] = kernels.get(k, 0) + n
    merged = {**ok[-1], "runs": runs, "output_tok_s": stats["median"], "output_tok_s_stats": stats,
              "seconds_stats": arm_stats([x["seconds"] for x in runs]),
              "wall_s": round(sum(r.get("wall_s", 0) for r in rounds), 1),
              "jit_during_measurement": None if None in jits else sum(jits),
              "autotune_during_measurement": sum(r.get("autotune_during_measurement") or 0 for r in ok),
              "jit_kernels": kernels,
              "plugin_check": next((r["plugin_check"] for r in ok if not (r.get("plugin_check") or {}).get("ok", True)),
                                   ok[-1].get("plugin_check")),
              "rounds": [{"round": i, "output_tok_s": r.get("output_tok_s"), "jit": r.get("jit_during_measurement"),
                          "wall_s": r.get("wall_s"), "log": r.get("log"), "gate_log": r.get("gate_log"),
                          **({"error": r["error"][-400:]} if "error" in r else {})}
                         for i, r in enumerate(rounds)]}
    merged.pop("token_ids", None)
    merged["gate_log_cost"] = [gate_log_cost(r) for r in ok]
    pairs = [pr for r in ok for pr in (r.get("gate_log_paired") or {}).get("pairs", [])]
    if pairs:
        merged["gate_log_paired"] = {"pairs": pairs, **(paired_overhead(pairs) or {})}
    if None in jits:
        merged["jit_note"] = "a round's JIT count is unknown"
    return merged


def gate_log_cost(result: dict | None) -> dict | None:
    """The gate log's own cost in one arm run, from its workers' plugin summaries: host us per step on the
    model thread (mean over workers) and the hand-off used. None without a gate log."""
    plugin = (result or {}).get("plugin")
    logs = [w.get("gate_log") for w in plugin if isinstance(w, dict)] if isinstance(plugin, list) else []
    logs = [g for g in logs if g and g.get("host_us_per_step") is not None]
    if not logs:
        return None
    return {"host_us_per_step": round(statistics.fmean(g["host_us_per_step"] for g in logs), 2),
            "hand_off": sorted({g.get("snapshot") or "torch calls" for g in logs})}


def round_ratios(mine: list | None, base: list | None, ndigits: int | None = 4) -> list | None:
    """Each round's own output tok/s of one arm over the base arm's (the same comparison within each round,
    merge_rounds' "rounds" lists), rounded to ndigits (None: not rounded); None unless both ran the same
    number of rounds; a round without a value on either side: None in its place."""
    if not mine or not base or len(mine) != len(base):
        return None
    ratios = [a["output_tok_s"] / b["output_tok_s"] if a.get("output_tok_s") and b.get("output_tok_s") else None
              for a, b in zip(mine, base)]
    return ratios if ndigits is None else [None if x is None else round(x, ndigits) for x in ratios]


def steady_state(results: dict, mode: str) -> tuple[bool, dict]:
    """(steady, why per arm): a mode is steady state when every arm that ran logged zero JIT compilations
    and zero Triton autotune runs in its timed part. An arm with an unknown count (no marker: older run,
    crash) makes the mode not steady too; skipped and failed arms are left out."""
    why = {}
    for arm, r in (results.get(mode) or {}).items():
        if not r or "skipped" in r or "error" in r:
            continue
        jit = r.get("jit_during_measurement")
        if jit is None:
            why[arm] = r.get("jit_note") or "JIT count unknown"
        elif jit or r.get("autotune_during_measurement"):
            kernels = ", ".join(f"{k} x{n}" for k, n in sorted((r.get("jit_kernels") or {}).items()))
            why[arm] = (f"{jit} JIT compilation(s) and {r.get('autotune_during_measurement', 0)} autotune run(s) "
                        f"while timed" + (f": {kernels}" if kernels else ""))
    return not why, why


def ratio_ci(base: list[float], other: list[float], n_boot: int = 10000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float] | None:
    """Bootstrap confidence interval of median(other) / median(base): both samples resampled with replacement,
    n_boot times, from a seeded generator (the same inputs give the same interval). None with fewer than two
    values on a side (nothing to resample)."""
    import random

    base, other = [float(x) for x in base if x], [float(x) for x in other if x]
    if len(base) < 2 or len(other) < 2:
        return None
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(other, k=len(other)))
                    / statistics.median(rng.choices(base, k=len(base))) for _ in range(n_boot))
    lo = ratios[int((1 - level) / 2 * n_boot)]
    hi = ratios[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return round(lo, 4), round(hi, 4)


def paired_plan(reps: int) -> list[bool]:
    """--gate-log-paired: gate log on (True) or paused for each timed pass, in ABBA blocks (on, off, off, on,
    on, off, ...), so a drift that is linear over a block hits both sides alike."""
    return [i % 4 in (0, 3) for i in range(reps)]


def paired_passes(runs: list[dict]) -> list[list[float]]:
    """[on, off] output tok/s of adjacent passes: the k-th gate-log-on pass with the k-th paused one (with
    paired_plan's order: passes (0, 1), (3, 2), (4, 5), ...); an unmatched last pass is left out."""
    on = [r["output_tok_s"] for r in runs if r.get("gate_log") is True]
    off = [r["output_tok_s"] for r in runs if r.get("gate_log") is False]
    return [[a, b] for a, b in zip(on, off)]


def paired_overhead(pairs: list, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict | None:
    """Gate-log overhead from paired passes of one engine: 1 - geometric mean of on/off over the pairs, with a
    bootstrap interval over pairs (seeded). None without a pair; no interval with one pair."""
    from moekern.analysis.stats import bootstrap_ci

    logs = [math.log(a / b) for a, b in pairs if a and b]
    if not logs:
        return None
    est = bootstrap_ci(logs, n_boot=n_boot, level=level, seed=seed)  # mean log(on / off), percentile interval
    out = {"n_pairs": len(logs), "overhead": round(1 - math.exp(est.value), 4)}
    if len(logs) >= 2:
        out["ci95"] = [round(1 - math.exp(est.high), 4), round(1 - math.exp(est.low), 4)]
    return out


def tok_s(runs) -> list[float]:
    return [r["output_tok_s"] for r in runs or [] if r.get("output_tok_s")]


def rep_spread(runs) -> float | None:
    """(max - min) / median of the repetitions' output tok/s (arm_stats' spread); None for fewer than two."""
    stats = arm_stats(r.get("output_tok_s") for r in runs or [])
    return stats["spread"] if stats else None
