"""vLLM's own fused_experts, tuned for this GPU over vLLM's tuner search space: the strongest vLLM baseline.

    python benchmarks/tune_vllm.py run --jsonl R.jsonl [--models ...] [--ms ...] [--budget-s 480]   # GPU, resumable
    python benchmarks/tune_vllm.py write R.jsonl --out DIR                                           # CPU
    python benchmarks/tune_vllm.py plan [--jsonl R.jsonl] [--models ...] [--ms ...]                  # CPU
    VLLM_TUNED_CONFIG_FOLDER=DIR python benchmarks/decode_layer.py ...    # vLLM with those configs

vLLM 0.26 ships no bf16 H100 fused_moe config for our TP=1 shapes, so without one it runs its default rule. This
tunes vLLM's Triton fused_experts the way vLLM's tuner does (benchmarks/kernels/benchmark_moe.py --tune of
vllm-project/vllm at commit 71acd375e8b6, get_configs_compute_bound; re-implemented in vllm_tuned_configs.py:
1920 configs, of which vLLM's tuner prunes none on CUDA for bf16), and writes
the winners as the files vLLM reads from VLLM_TUNED_CONFIG_FOLDER (E={E},N={I},device_name={GPU}.json).

`run`, per model (mixtral, qwen3-30b-a3b, olmoe, deepseek-v3 by default; TP=1, bf16) and config, for every M of
--ms (default 1,2,4,8,16,32,64,256,1024,4096):
  inputs     benchmarks/decode_layer.py's (bench_inputs: the same tensors as decode_layer.py run with the same
             --ms list), routed once by the model's reference routing (decode_layer.reference_layer; vLLM's
             tuner times its routing with each call, a cost no config changes, left out here);
  call       vllm.model_executor.layers.fused_moe.fused_experts under vLLM's override_config(config), the hook
             vLLM's tuner uses, so the config goes through vLLM's own launch code;
  check      once per (config, M), before timing: ||out - ref|| / ||ref|| < 1e-2 against
             moekern.experts.reference.fused_moe_reference (decode_layer.py's test); a wrong output is recorded
             "wrong", an exception (e.g. out of shared memory) "error", and neither is timed;
  screen     moekern.bench.timing.time_calls: back-to-back calls in a CUDA graph, short (SCREEN_TIMING);
  final      the --finalists (3) fastest configs of each complete M are timed again with time_calls' defaults
             (decode_layer.py's timing); the fastest of them is the pick.
Every measurement is one JSONL line, appended as made: a rerun skips what the file has for this GPU (resume),
--budget-s stops before a config that would not fit, and a run cut off loses at most one line.
Triton compiles each config's kernels (seconds each, far longer than their timings): --compile-workers processes
(default: CPUs - 1) compile the configs ahead of the timing into Triton's disk cache (tune_vllm_gpu.py); the
"first_s" of each record (its first call) shows whether the cache hit.

`write` keeps only complete M rows (every config of the space measured, on one GPU) and names the missing ones;
vLLM picks the entry nearest the call's M, so a file with decode M only also serves larger M (with a decode config):
compare against it only at the M it holds.

Device time (estimates, not measurements; `plan` prints them for a selection, `run` prints measured rates):
  compile  1920 configs x ~4 kernels (2 GEMMs x ~2 specializations over the M list) x ~1.5 s / 15 workers
           ~ 13 min per model;
  timing   1920 configs x 10 M x ~0.06 s (graph capture + short screen) ~ 19 min per model, plus finals;
compile and timing overlap, so ~20 min per model and ~80 min for the four models at the ten M. With the gpuenv
staged first on a fresh machine, a 30-minute session tunes ~20-25 min: about four sessions, more than two.
Reduced mode (tools/gpu/README.md): the decode M (1-64) first, ~14 min per model and ~55 min for the four
(2-3 sessions), then the larger M. The space itself is never pruned: a file gets an M only once every one of
the 1920 configs was measured there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vllm_tuned_configs import (  # noqa: E402
    MODELS,
    TUNE_MS,
    VLLM_TUNER,
    UsageError,
    config_file_name,
    coverage,
    done_keys,
    moe_shape,
    parse_models,
    parse_ms,
    rank_screen,
    read_results,
    search_space,
    write_configs,
)
from tune_vllm_gpu import CompileWorkers, VllmExperts, gpu_device, one_line  # noqa: E402

REL_TOL = 1e-2
# plan's assumptions (seconds), to be replaced by the rates `run` prints
ASSUMED_COMPILE_S, ASSUMED_KERNELS_PER_CONFIG, ASSUMED_SCREEN_S, ASSUMED_FINAL_S = 1.5, 4, 0.06, 0.4
GPU_MACHINE_WORKERS = 15  # the device machine's 16 cores, one left to the timing process


# ------------------------------------------------------------------ the loop (GPU parts behind `backend`)


def measure(backend, model: str, M: int, cfg, phase: str, device: str) -> dict:
    """One JSONL record: a screen checks the output against the reference, then times it (if right); a final
    only times (its config was checked when screened)."""
    rec = {"model": model, "M": M, "cfg": list(cfg), "phase": phase, "device": device}
    try:
        if phase == "screen":
            c0 = time.perf_counter()
            err = float(backend.check(M, cfg))
            rec.update(first_s=round(time.perf_counter() - c0, 3), rel_err=float(f"{err:.4g}"))
            if not err < REL_TOL:  # NaN included
                rec["status"] = "wrong"
                return rec
        t = backend.time(M, cfg, phase == "final")
        rec.update(status="ok", us=round(t.median_us, 3), method=t.method)
    except Exception as exc:  # noqa: BLE001  (out of resources, compile error: recorded, the run goes on)
        rec.update(status="error", error=one_line(exc))
    return rec


@dataclass
class _Run:
    """One run's state: the results file (appended to), this device's records and what they cover, the budget."""

    out: object
    records: list
    device: str
    budget_s: float
    clock: object
    log: object
    t0: float = 0.0
    measured: int = 0
    per_config: float | None = None  # seconds per config at all M (a moving average)
    per_final: float = ASSUMED_FINAL_S
    stopped: str | None = None

    def __post_init__(self):
        self.t0 = self.clock()
        self.done = done_keys(self.records, self.device)

    def used(self) -> float:
        return self.clock() - self.t0

    def emit(self, rec: dict) -> None:
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()  # a run cut off loses at most the line being written
        self.records.append(rec)
        self.done.add((rec["model"], rec["M"], tuple(rec["cfg"]), rec["phase"]))
        self.measured += 1


def tune(models, ms, jsonl: str, open_backend, device: str, *, budget_s: float, finalists: int = 3,
         progress_every: int = 50, warmer=None, space=None, meta=None, clock=time.monotonic, log=None) -> dict:
    """Measure every (model, M, config) the results file lacks for this device, then the finals. open_backend(model,
    ms) gives an object with check(M, cfg) -> rel. error, time(M, cfg, final) -> Timing, healthy() -> bool and
    close(). Stops before a config (or a final) when the time used plus its expected time would pass budget_s.
    Returns {"stopped": reason or None, "measured": n, "left": (model, M, config) screens not measured}."""
    log = log or (lambda msg: print(msg, flush=True))
    space = search_space() if space is None else list(space)
    records = [r for r in read_results(jsonl)[1] if r["device"] == device]  # another GPU's results do not count
    os.makedirs(os.path.dirname(os.path.abspath(jsonl)), exist_ok=True)
    drop_cut_off_line(jsonl)
    with open(jsonl, "a") as out:
        run = _Run(out, records, device, budget_s, clock, log)
        out.write(json.dumps({"meta": dict(meta or {}, device=device, models=list(models), ms=list(ms),
                                           space=VLLM_TUNER, space_size=len(space), budget_s=budget_s)}) + "\n")
        for mi, model in enumerate(models):
            todo = _todo(records, model, ms, space, device)
            finals = [(M, c) for M, c in _finalists(records, model, ms, space, finalists)
                      if (model, M, c, "final") not in run.done]
            if not todo and not finals:
                log(f"{model}: every config measured at M={','.join(map(str, ms))}")
                continue
            backend = open_backend(model, ms)
            try:
                _screen(run, model, ms, todo, backend, warmer, progress_every,
                        later=lambda: sum(len(_todo(records, m, ms, space, device)) for m in models[mi + 1:]))
                if not run.stopped:
                    _finals(run, model, ms, space, backend, finalists)
            finally:
                backend.close()
            if run.stopped:
                break
    left = sum(len(_todo(records, m, ms, space, device)) * len(ms) for m in models)
    log(f"measured {run.measured} in {run.used():.0f} s; "
        + (f"stopped ({run.stopped}); rerun to resume" if run.stopped else "selection complete"))
    return {"stopped": run.stopped, "measured": run.measured, "left": left}


def drop_cut_off_line(path: str) -> None:
    """Truncate a last line without its newline (a run killed while writing it), so appending continues whole lines."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _screen(run: _Run, model, ms, todo, backend, warmer, progress_every, later) -> None:
    """Check and screen-time each config of todo at every M it lacks; stop before a config past the budget."""
    if warmer is not None:
        warmer.start(model, [(c, [M for M in ms if (model, M, c, "screen") not in run.done]) for c in todo])
    for i, cfg in enumerate(todo):
        if run.per_config is not None and run.used() + run.per_config > run.budget_s:
            run.stopped = (f"budget: {run.used():.0f} s used, a config takes ~{run.per_config:.1f} s, "
                           f"--budget-s {run.budget_s:g}")
            return
        c0 = run.clock()
        if warmer is not None:
            warmer.wait(model, cfg)
        for M in ms:
            if (model, M, cfg, "screen") in run.done:
                continue
            run.emit(measure(backend, model, M, cfg, "screen", run.device))
            if not backend.healthy():
                raise RuntimeError(f"{model} M={M} config {list(cfg)} left the CUDA context unusable "
                                   "(recorded; rerun to resume without it)")
        dt = run.clock() - c0
        run.per_config = dt if run.per_config is None else 0.8 * run.per_config + 0.2 * dt
        if (i + 1) % progress_every == 0 or i + 1 == len(todo):
            left = len(todo) - i - 1 + later()
            bad = sum(1 for r in run.records if r["model"] == model and r["status"] != "ok")
            run.log(f"{model}: {i + 1}/{len(todo)} configs this run, {bad} (config, M) wrong or failed | "
                    f"{run.per_config:.2f} s/config | ~{left * run.per_config / 60:.0f} min of configs left in "
                    f"this selection | {run.used():.0f}/{run.budget_s:g} s used")


def _finalists(records, model, ms, space, finalists) -> list[tuple[int, tuple]]:
    """(M, config) to re-time: the `finalists` fastest of each M whose row is complete."""
    out = []
    for M in ms:
        if coverage(records, model, [M], space)[M] == len(space):
            out += [(M, tuple(r["cfg"])) for r in rank_screen(records, model, M)[:finalists]]
    return out


def _finals(run: _Run, model, ms, space, backend, finalists) -> None:
    for M, cfg in _finalists(run.records, model, ms, space, finalists):
        if (model, M, cfg, "final") in run.done:
            continue
        if run.used() + run.per_final > run.budget_s:
            run.stopped = f"budget: finals of {model} from M={M} on left"
            return
        f0 = run.clock()
        run.emit(measure(backend, model, M, cfg, "final", run.device))
        run.per_final = max(run.per_final, run.clock() - f0)


def _todo(records, model, ms, space, device):
    done = done_keys(records, device)
    return [c for c in space if any((model, M, c, "screen") not in done for M in ms)]


# ------------------------------------------------------------------ CLI


def plan(models, ms, jsonl: str | None, workers: int, log=print) -> float:
    """Print the work of a selection (what the results file already holds, per device) and an estimate from the
    ASSUMED_* rates; returns the estimated seconds."""
    space = search_space()
    _, records = read_results(jsonl) if jsonl else ([], [])
    devices = sorted({r["device"] for r in records}) or ["(none yet)"]
    log(f"space: {len(space)} configs ({VLLM_TUNER}); M: {','.join(map(str, ms))}")
    total = 0.0
    for device in devices:
        mine = [r for r in records if r["device"] == device]
        for model in models:
            cov = coverage(mine, model, ms, space)
            left_pairs = sum(len(space) - n for n in cov.values())
            left_cfgs = len(_todo(mine, model, ms, space, device))
            s = moe_shape(model)
            compile_s = left_cfgs * ASSUMED_KERNELS_PER_CONFIG * ASSUMED_COMPILE_S / max(workers, 1)
            est = max(compile_s, left_pairs * ASSUMED_SCREEN_S) + len(ms) * 3 * ASSUMED_FINAL_S
            total += est
            missing = ", ".join(f"{M}: {n}/{len(space)}" for M, n in cov.items() if n < len(space)) or "none"
            log(f"{device} {config_file_name(s.E, s.N, '<GPU>')} {model}: {left_pairs} (config, M) left; "
                f"incomplete M: {missing}; ~{est / 60:.0f} min")
    log(f"estimated device time: ~{total / 60:.0f} min (assumed rates: {ASSUMED_COMPILE_S} s per kernel compile, "
        f"{ASSUMED_KERNELS_PER_CONFIG} kernels per config, {workers} compile workers, {ASSUMED_SCREEN_S} s per "
        "screen; `run` prints the measured rates)")
    return total


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="tune_vllm.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="GPU: measure vLLM's fused_experts over the tuner space (resumable)")
    w = sub.add_parser("write", help="CPU: the results file -> vLLM config JSONs (complete M rows only)")
    p = sub.add_parser("plan", help="CPU: the work of a selection, what is done, an estimate")
    for sp in (r, p):
        sp.add_argument("--models", default=",".join(MODELS))
        sp.add_argument("--ms", default=",".join(map(str, TUNE_MS)))
        sp.add_argument("--compile-workers", type=int, default=None,
                        help="processes compiling ahead (default: run, CPUs - 1; plan, 15 as on the GPU machine)")
    r.add_argument("--jsonl", required=True, help="results file: appended to, read to resume")
    r.add_argument("--budget-s", type=float, default=480.0, help="start nothing that would end after this")
    r.add_argument("--finalists", type=int, default=3)
    r.add_argument("--progress", type=int, default=50, metavar="N", help="a progress line every N configs")
    r.add_argument("--write", default=None, metavar="DIR", help="after the run, write the config files to DIR")
    p.add_argument("--jsonl", default=None)
    w.add_argument("jsonl")
    w.add_argument("--out", required=True)
    w.add_argument("--models", default=None)
    w.add_argument("--finalists", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "write":
            return _write(args.jsonl, args.out, parse_models(args.models) if args.models else None, args.finalists)
        models, ms = parse_models(args.models), parse_ms(args.ms)
        if args.compile_workers is None:
            args.compile_workers = GPU_MACHINE_WORKERS if args.cmd == "plan" else max(0, (os.cpu_count() or 1) - 1)
        if args.compile_workers < 0:
            raise UsageError(f"--compile-workers={args.compile_workers} must be >= 0")
        if args.cmd == "plan":
            plan(models, ms, args.jsonl, args.compile_workers)
            return 0
        if args.budget_s <= 0 or args.finalists < 0 or args.progress < 1:
            raise UsageError(f"--budget-s={args.budget_s:g} must be > 0, --finalists={args.finalists} >= 0, "
                             f"--progress={args.progress} >= 1")
        read_results(args.jsonl)  # a bad results file fails here, before any GPU work
    except UsageError as exc:
        print(f"tune_vllm.py: error: {exc}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("skipped: needs a CUDA GPU (plan and write run on a CPU)", file=sys.stderr)
        return 0
    device, meta = gpu_device()
    print(f"GPU {meta['device_name']} -> {device}; vLLM {meta['vllm']}, Triton {meta['triton']}; "
          f"{len(search_space())} configs x M {','.join(map(str, ms))}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: stop the compile workers on the way out
    warmer = CompileWorkers(args.compile_workers, ms) if args.compile_workers else None
    try:
        res = tune(models, ms, args.jsonl, VllmExperts, device, budget_s=args.budget_s, finalists=args.finalists,
                   progress_every=args.progress, warmer=warmer, meta=meta)
    except RuntimeError as exc:
        print(f"tune_vllm.py: {exc}", file=sys.stderr)
        return 3
    finally:
        if warmer is not None:
            print(f"compile workers: {warmer.failed} configs whose warm-up raised (timed anyway)", flush=True)
            warmer.stop()
    if args.write:
        _write(args.jsonl, args.write, models, args.finalists)
    return 0  # a budget stop is a normal end: the next call resumes


def _write(jsonl, out, models, finalists) -> int:
    try:
        files = write_configs(jsonl, out, models, finalists)
    except UsageError as exc:
        print(f"tune_vllm.py: error: {exc}", file=sys.stderr)
        return 2
    for f in files:
        miss = "; ".join(f"M={M} {v}" for M, v in f["missing"].items())
        print(f"{f['file']} ({f['model']}): " + (f"M {','.join(map(str, f['written']))} written" if f["written"]
                                                 else "not written (no complete M)")
              + (f"; missing M: {miss}" if miss else "") + (f"; no correct config at M {f['no_valid']}"
                                                            if f["no_valid"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
