"""Per-bench records of the serve grid beyond vLLM's result JSON: the bench's measured imbalance from the gate
log (both of the prior study's CV methods) and its workload card.

A workload card is a YAML file beside the result JSON (`RESULT.card.yaml`) with the fields the prior study
kept per experiment: model, framework, parallelism, knobs, skew, dataset, GPU, versions, date, and what
was measured. It repeats what the JSON's "moekern" block holds, grouped for a reader and with the versions
and the GPU, which the JSON does not record.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

CARD_SCHEMA = "moekern.workload_card/1"
VERSIONED = (("torch", "torch"), ("vllm", "vllm"), ("flashinfer", "flashinfer-python"), ("triton", "triton"),
             ("moekern", "moekern"))
DUMMY_NOISE = 1e-3  # router logit noise of dummy weights for expected_load_cv (far below the bias: an override)


def environment_info(run=subprocess.run) -> dict:
    """{"gpu": name(s) from nvidia-smi or None, "versions": {package: version or None}, "date": UTC ISO time}.
    Versions come from the installed distributions' metadata (nothing is imported); `run` replaces
    subprocess.run (tests)."""
    versions = {}
    for key, dist in VERSIONED:
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            # a package put on sys.path without its metadata (the GPU machine's staged vLLM): its __version__
            # when this process imported it already (the runner imports torch and vLLM for its own record)
            versions[key] = getattr(sys.modules.get(key), "__version__", None)
    gpu = None
    try:
        if run is subprocess.run and shutil.which("nvidia-smi") is None:
            raise FileNotFoundError("nvidia-smi")
        out = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                  capture_output=True, text=True, timeout=15)
        lines = [l.strip() for l in (out.stdout or "").splitlines() if l.strip()]
        gpu = "; ".join(lines) if out.returncode == 0 and lines else None
    except (OSError, subprocess.SubprocessError):
        gpu = None
    torch = sys.modules.get("torch")
    if gpu is None and torch is not None:
        try:
            gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # a broken CUDA setup must not cost the bench its card
            gpu = None
    return {"gpu": gpu, "versions": versions, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _finite(x):
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def window_cv(gate_dir, window: tuple[float, float], cache: dict | None = None) -> dict:
    """The measured CV of one bench from the gate-log records of `gate_dir` inside `window` (unix seconds):
    measured_cv_step and measured_cv_agg by the prior study's two methods (seed_summary: per-step CV of every
    (step, layer) record, unfiltered; one CV of the loads summed over steps <= 1000 tokens and over layers),
    moekern's two (per layer, then averaged) as measured_cv_moekern, and gate_log_steps. A log that cannot be
    read gives {"measured_cv_error": why} instead: the bench's timings stay usable."""
    from moekern.analysis.imbalance.metrics import load_table, seed_summary, summarize

    try:
        table = load_table(gate_dir, time_window=window, cache=cache)
        seed = seed_summary(table).overall
        own = summarize(table).overall
    except (ValueError, FileNotFoundError) as exc:
        return {"measured_cv_error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"measured_cv_step": _finite(seed["step_cv"]), "measured_cv_agg": _finite(seed["agg_cv"]),
            "measured_cv_methods": "seed: step = mean CV of every (step, layer) record; agg = CV of the loads "
                                   "summed over steps (<= 1000 tokens) and layers",
            "measured_cv_moekern": {"step_cv": _finite(own["step_cv"]), "agg_cv": _finite(own["agg_cv"])},
            "gate_log_steps": int(table.num_steps)}


def model_config(args) -> dict:
    """The served model's config.json: the checkpoint's (--model-dir) when it has one, else the committed shape."""
    own = Path(str(getattr(args, "model_dir", "") or "")) / "config.json"
    if own.is_file():
        return json.loads(own.read_text(encoding="utf-8"))
    from moekern.e2e.make_configs import config_path

    return json.loads(config_path(args.model).read_text(encoding="utf-8"))


def skew_card(name: str, spec: str, in_force, num_experts: int | None, top_k: int | None) -> dict:
    """The card's skew block: name, spec, what the workers reported, and the expected aggregated CV under
    the nominal model (router noise = the bias's beta) and under dummy weights (the bias overrides the router)."""
    card = {"name": name, "spec": spec, "in_force": in_force}
    if num_experts and top_k:
        from moekern.vllm.config import expected_load_cv, parse_skew

        sk = parse_skew(spec, name="skew")
        card["expected_agg_cv_nominal"] = round(expected_load_cv(sk, num_experts, top_k, tokens=50_000), 3)
        card["expected_agg_cv_dummy_weights"] = round(
            expected_load_cv(sk, num_experts, top_k, noise_scale=DUMMY_NOISE, tokens=50_000), 3)
    return card


def workload_card(args, arm: str, result: dict, env_info: dict) -> dict:
    """The workload card (module docstring) of one bench: `result` is its result JSON with the "moekern" block
    filled; `env_info` environment_info()'s."""
    from moekern.e2e.arms import ARMS

    m = result.get("moekern") or {}
    cfg = model_config(args)
    E, k = cfg.get("num_local_experts") or cfg.get("num_experts"), cfg.get("num_experts_per_tok")
    card = {
        "schema": CARD_SCHEMA,
        "run_id": m.get("run_id"),
        "date": env_info.get("date"),
        "model": {"name": args.model, "path": str(getattr(args, "model_dir", "")), "load_format": args.load_format,
                  "architecture": (cfg.get("architectures") or [None])[0], "layers": cfg.get("num_hidden_layers"),
                  "hidden_size": cfg.get("hidden_size"), "num_experts": E, "top_k": k,
                  "dummy_router_seed": getattr(args, "dummy_router_seed", None)},
        "framework": {"name": "vllm", "version": env_info["versions"].get("vllm"), "mode": "serve",
                      "moe_backend": arm, "plugin_env": ARMS[arm][0], "engine_overrides": ARMS[arm][1]},
        "parallelism": {"tensor_parallel_size": args.tensor_parallel_size,
                        "expert_parallel": bool(args.enable_expert_parallel), "eplb": bool(args.enable_eplb)},
        "knobs": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                  "max_model_len": args.max_model_len, "client_max_concurrency": m.get("max_concurrency"),
                  "num_prompts": args.serve_prompts, "output_len": args.output_len, "request_rate": "inf"},
        "skew": (skew_card(m["routing_skew"], m["routing_skew_spec"], m.get("routing_skew_in_force"), E, k)
                 if m.get("routing_skew") else None),
        "dataset": {"name": m.get("dataset") or "random", "path": m.get("dataset_path"),
                    "input_len": None if m.get("dataset") else args.input_len},
        "gpu": env_info.get("gpu"),
        "versions": env_info.get("versions"),
        "measured": {"bench_json": f"{m.get('run_id')}.json", "gate_log": m.get("gate_log"),
                     "gate_log_window": m.get("gate_log_window"), "gate_log_steps": m.get("gate_log_steps"),
                     "measured_cv_step": m.get("measured_cv_step"), "measured_cv_agg": m.get("measured_cv_agg"),
                     "steady_state": m.get("steady_state"),
                     "output_throughput": _finite(result.get("output_throughput")),
                     "mean_ttft_ms": _finite(result.get("mean_ttft_ms")),
                     "mean_tpot_ms": _finite(result.get("mean_tpot_ms"))},
    }
    return card


def card_path(result_path) -> Path:
    p = Path(result_path)
    return p.with_name(p.stem + ".card.yaml")


def write_card(result_path, card: dict) -> Path:
    """Write `card` as YAML beside `result_path` (temp file + rename); returns its path."""
    import yaml

    path = card_path(result_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path
