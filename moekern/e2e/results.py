"""What an invocation leaves behind besides its e2e_<model>.json: the --result file with its "moekern" block
(what `moekern sweep` and `moekern report` read), the --moe-configs copies, and the check of each gate log."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path


def result_metadata(args, arm: str, gate_dir: Path | None) -> dict:
    """The 'moekern' block of a --result file, in the keys moekern.analysis.serving.metrics groups by
    (moe_backend, max_num_seqs, max_num_batched_tokens, eplb) plus dataset, predicted_score and gate_log
    (relative to the result file, so a results folder can move as a whole)."""
    from moekern.analysis.study.sweep import predicted_score_from_name

    meta = {"moe_backend": arm, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens, "eplb": bool(args.enable_eplb),
            "tensor_parallel_size": args.tensor_parallel_size,
            "expert_parallel": bool(args.enable_expert_parallel), "model": args.model,
            "load_format": args.load_format, "concurrency": args.concurrency, "num_prompts": args.serve_prompts,
            "output_len": args.output_len, "runner": "moekern e2e"}
    if args.dataset:
        meta["dataset"] = Path(args.dataset).name
        score = predicted_score_from_name(args.dataset)
        if score is not None:
            meta["predicted_score"] = score
    else:
        meta["input_len"] = args.input_len
    if gate_dir is not None and args.result is not None and Path(gate_dir).exists():
        meta["gate_log"] = os.path.relpath(Path(gate_dir).resolve(), Path(args.result).resolve().parent)
    return meta


def write_result(args, arm: str, bench_json: Path, gate_dir: Path | None) -> Path:
    """Copy a serve arm's bench JSON to --result with the run's 'moekern' block."""
    obj = json.loads(bench_json.read_text())
    obj["moekern"] = {**obj.get("moekern", {}), **result_metadata(args, arm, gate_dir)}
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(obj, indent=1))
    return args.result


def copy_moe_configs(paths: str | None, out: Path) -> dict | None:
    """Copy the --moe-configs files into OUT/moe_configs/ (what the arms ran with stays beside the results);
    returns {"files": [...], "rows": [(E, I, H, M) laid over the table]} or None."""
    if not paths:
        return None
    from moekern.experts.configs import TUNED, read_rows
    from moekern.experts.configs import merge_tuned

    dest = out / "moe_configs"
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for i, src in enumerate(p for p in paths.split(os.pathsep) if p):
        target = dest / f"{i}_{Path(src).name}"
        shutil.copyfile(src, target)
        files.append({"source": src, "copy": str(target)})
    _, applied = merge_tuned(TUNED, read_rows(paths), min_gain=-math.inf)
    return {"files": files, "rows": [list(r) for r in applied]}


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def check_gate_logs(path: Path) -> dict:
    from moekern.gatelog import read_gate_log

    try:
        records, skipped = read_gate_log(path)
    except FileNotFoundError:
        return {"ok": False, "error": f"no gate log under {path}"}
    bad = sum(1 for r in records if r.top_k and sum(r.expert_counts) != r.num_tokens * r.top_k)
    phases: dict = {}
    ranks: dict = {}
    for r in records:
        phases[r.phase] = phases.get(r.phase, 0) + 1
        ranks[r.rank] = ranks.get(r.rank, 0) + 1
    metas = [json.loads(m.read_text()) for m in sorted(path.glob("*.meta.json"))]
    return {"ok": bool(records) and not skipped and not bad, "records": len(records), "skipped_lines": len(skipped),
            "steps": len({(r.rank, r.step) for r in records}), "phases": phases, "ranks": ranks,
            "sum_mismatch": bad,
            "dropped_steps": sum(m.get("dropped_steps", 0) for m in metas),
            # the recorder's own cost, measured where it is spent (per rank: step hooks on the model's thread,
            # the writer thread's CPU time)
            "host_us_per_step": [m.get("host_us_per_step") for m in metas],
            "host_split_us_per_step": [m.get("host_split_us_per_step") for m in metas],
            "writer_cpu_seconds": [m.get("writer_cpu_seconds") for m in metas]}
