"""Offline arms: LLM.generate in a fresh subprocess per arm (so its environment applies), output tokens/s.

The parent (run_offline_arm) writes a spec JSON and starts `python -m moekern.e2e.offline SPEC`; the child
(child_offline) builds the engine, runs the warm-up plan and the shape sweep, marks its log, times the passes
and writes the result JSON the parent reads back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from moekern.e2e import procs
from moekern.e2e.arms import ARMS, PACKAGE_ROOT, arm_env, engine_kwargs, fresh_gate_dir, plugin_check
from moekern.e2e.stats import arm_stats, paired_overhead, paired_passes, paired_plan
from moekern.e2e.warmup import (MEASURE_MARKER, jit_fields, new_jit_lines, sweep_batches, sweep_spec,
                                warm_again, warmup_plan)


def read_dataset_prompts(path, encode, num_prompts: int) -> list[list[int]]:
    """Token ids of the first `num_prompts` prompts of a `moekern datasets generate` JSONL file (cycled when
    the file has fewer), `encode(text) -> list[int]` being the model's tokenizer (with its BOS, as the server
    adds it). Raises ValueError naming the line for a line without a "prompt" string."""
    texts = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--dataset {str(path)!r} line {i}: not JSON ({exc})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"--dataset {str(path)!r} line {i}: expected an object with a \"prompt\" string")
        texts.append(row["prompt"])
    if not texts:
        raise ValueError(f"--dataset {str(path)!r} holds no prompts")
    return [list(encode(texts[i % len(texts)])) for i in range(num_prompts)]


def hf_encode(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return lambda text: tok(text).input_ids


def offline_spec(args, arm: str, res_path: Path, prompt_token_ids: list[list[int]] | None = None) -> dict:
    """What the offline child runs: engine kwargs and the workload (random token prompts of input_len from
    `seed`, or the given prompt token ids)."""
    spec = {"engine": engine_kwargs(args, arm), "seed": 0, "vocab": args.vocab, "input_len": args.input_len,
            "output_len": args.output_len, "num_prompts": args.num_prompts, "reps": args.reps,
            "warmup_reps": getattr(args, "warmup_reps", 1),
            "warmup_max_reps": getattr(args, "warmup_max_reps", None) or getattr(args, "warmup_reps", 1),
            "shape_sweep": sweep_spec(args, "offline"), "ignore_eos": True, "result": str(res_path),
            "gate_log_paired": bool(getattr(args, "gate_log_paired", False)) and ARMS[arm][2]}
    if prompt_token_ids is not None:
        spec["prompt_token_ids"] = prompt_token_ids
        spec["num_prompts"] = len(prompt_token_ids)
    return spec


def child_offline(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t_init = time.perf_counter()
    llm = LLM(skip_tokenizer_init=True, **spec["engine"])
    init_s = time.perf_counter() - t_init
    ids = spec.get("prompt_token_ids")
    if ids is None:
        rng = np.random.default_rng(spec["seed"])
        ids = [rng.integers(100, spec["vocab"] - 100, spec["input_len"]).tolist() for _ in range(spec["num_prompts"])]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
    n_in = sum(len(p) for p in ids)
    sp = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=spec["ignore_eos"],
                        detokenize=False)
    warmup, pass_jit = [], []
    warmup_reps = spec.get("warmup_reps", 1)
    max_reps = max(warmup_reps, spec.get("warmup_max_reps", warmup_reps))
    plan = warmup_plan(len(prompts), spec["output_len"], warmup_reps)[:1]  # the small pre-warm pass, if any

    def discard(n: int, max_tokens: int) -> None:
        t0 = time.perf_counter()
        llm.generate(prompts[:n], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                                 detokenize=False), use_tqdm=False)
        warmup.append({"prompts": n, "max_tokens": max_tokens, "seconds": time.perf_counter() - t0})

    for n, max_tokens in plan:
        discard(n, max_tokens)
    sys.stdout.flush()
    _, offset = new_jit_lines(spec.get("log"), 0)  # compiles are counted from here on, per warm-up step
    sweep = None
    if spec.get("shape_sweep") and warmup_reps > 0:
        sw = spec["shape_sweep"]
        t0 = time.perf_counter()
        rng = np.random.default_rng(spec["seed"] + 1)
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
        batches = sweep_batches(sw["cap"], sw["max_model_len"], sw["max_num_seqs"])
        try:
            for lens in batches:
                llm.generate([TokensPrompt(prompt_token_ids=rng.integers(100, spec["vocab"] - 100, k).tolist())
                              for k in lens], one, use_tqdm=False)
            err = None
        except Exception as exc:  # the timed part still counts its compiles; say why the sweep stopped
            err = f"{type(exc).__name__}: {exc}"[:500]
        time.sleep(0.5)
        jit, offset = new_jit_lines(spec.get("log"), offset)
        sweep = {"steps": len(batches), "cap": sw["cap"], "seconds": time.perf_counter() - t0, "jit": jit,
                 "error": err}
    while warm_again(pass_jit, warmup_reps, max_reps):
        discard(len(prompts), spec["output_len"])
        time.sleep(0.5)  # the engine process's warnings reach the shared log file
        jit, offset = new_jit_lines(spec.get("log"), offset)
        warmup[-1]["jit"] = jit
        pass_jit.append(jit)
    print(MEASURE_MARKER, flush=True)  # the engine's own logs share this file: later JIT warnings are ours
    runs, token_ids = [], None
    plan = paired_plan(spec["reps"]) if spec.get("gate_log_paired") else [None] * spec["reps"]
    for on in plan:
        if on is not None:  # between passes, outside the timing: every worker's gate log on or paused
            got = llm.collective_rpc("moekern_gate_log", args=(on,))
            if any(g.get("gate_log") is not on for g in got):
                raise RuntimeError(f"--gate-log-paired: workers answered {got} to gate_log={on}")
        wall0, t0 = time.time(), time.perf_counter()  # wall clock: to line passes up with gpu_clocks.csv
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        runs.append({"start": wall0, "seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
                     "total_tok_s": (n_out + n_in) / dt, **({} if on is None else {"gate_log": on})})
        token_ids = [list(o.outputs[0].token_ids) for o in outs]
    paired = None
    if spec.get("gate_log_paired"):
        llm.collective_rpc("moekern_gate_log", args=(True,))
        paired = {"pairs": paired_passes(runs)}
        paired.update(paired_overhead(paired["pairs"]) or {})
        runs = [r for r in runs if r["gate_log"]]  # the arm's own numbers: gate log on, as its name says
    try:
        # By method name: vLLM 0.26 msgpack-encodes collective_rpc's method and refuses a function unless
        # VLLM_ALLOW_INSECURE_SERIALIZATION=1; the plugin adds Worker.moekern_plugin_summary (hooks.py).
        summary = llm.collective_rpc("moekern_plugin_summary")
    except Exception as exc:  # plugin off (the vllm/flashinfer arms): no such method
        summary = f"unavailable: {exc!r}"
    stats = arm_stats([r["output_tok_s"] for r in runs])
    result = {"init_s": init_s, "warmup": warmup, "shape_sweep": sweep, "runs": runs, "output_tok_s": stats["median"],
              "output_tok_s_stats": stats, "seconds_stats": arm_stats([r["seconds"] for r in runs]),
              "plugin": summary}
    if paired is not None:
        result["gate_log_paired"] = paired
    if spec.get("save_tokens"):
        result["token_ids"] = token_ids
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_offline_arm(args, arm: str, out: Path, extra_spec: dict | None = None, round_no: int | None = None) -> dict:
    """One offline arm in a fresh process (files offline_<arm>[.r<round>].*; with a round number its gate log
    goes to a round<k> folder of the arm's gate-log directory)."""
    tag = arm if round_no is None else f"{arm}.r{round_no}"
    res_path = out / f"offline_{tag}.json"
    res_path.unlink(missing_ok=True)
    ids = read_dataset_prompts(args.dataset, hf_encode(args.model_dir), args.num_prompts) if args.dataset else None
    spec = {**offline_spec(args, arm, res_path, ids), **(extra_spec or {})}
    spec_path = out / f"offline_{tag}.spec.json"
    log = out / f"offline_{tag}.log"
    spec["log"] = str(log)
    spec_path.write_text(json.dumps(spec))
    gdir = fresh_gate_dir(args, arm, out, round_no)
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moekern.e2e.offline", str(spec_path)],
                                env=arm_env(arm, out, gdir, router_seed=args.dummy_router_seed,
                                            moe_configs=getattr(args, "moe_configs", None)),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=PACKAGE_ROOT)
        rc = procs.wait_group(proc, args.arm_timeout)
    r = {"arm": arm, "rc": rc, "wall_s": round(time.time() - t0, 1), "log": str(log)}
    if rc == 0 and res_path.exists():
        r.update(json.loads(res_path.read_text()))
        r["plugin_check"] = plugin_check(arm, r.get("plugin"))
        r.update(jit_fields(log.read_text(errors="replace")))
    else:
        r["error"] = procs.tail(log)
    return r


if __name__ == "__main__":
    sys.exit(child_offline(sys.argv[1]))
