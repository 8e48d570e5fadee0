"""vLLM's fused-MoE tuner search space, vLLM's config-file naming, and the tuning results (JSONL) turned into the
JSON files vLLM 0.26 reads from VLLM_TUNED_CONFIG_FOLDER. No GPU and no vLLM import: benchmarks/tune_vllm.py
measures, this module decides what the measurements mean.

The search space is our re-implementation of the CUDA branch of get_configs_compute_bound in vLLM's tuner,
benchmarks/kernels/benchmark_moe.py of github.com/vllm-project/vllm at commit 71acd375e8b6 (the newest version of
that file we could read; vLLM's wheel does not ship it). There every axis below is crossed with every other
(5 x 4 x 3 x 4 x 2 x 4 = 1920 configs), in this axis order. On CUDA that tuner prunes nothing for bf16: its
pruning (prune_rocm_search_space) runs on ROCm only, and its BLOCK_SIZE_N/K filter applies to block-quantized fp8
only. A config that does not fit the GPU (shared memory) fails when launched; vLLM's tuner skips it, we record it
as failed. (Some 2026 vLLM pull requests tuned with their own harnesses over smaller spaces, e.g. BLOCK_SIZE_M up
to 128 and num_stages 3-5; we follow the tuner's code, not those descriptions.)

File naming, from vLLM 0.26's fused_moe.py (get_config_file_name, try_get_optimal_moe_config):
  E={E},N={N},device_name={device}.json   for bf16/fp16 weights (dtype None: no ",dtype=" part, no block shape)
  N = w2.shape[2], the expert's intermediate size I (not w1.shape[1] = 2I); E = the number of experts (TP=1,
  no expert parallelism); device = the NVML device name with runs of blanks and '/' turned into '_'
  (get_device_name_as_file_name), except that any name with an "H200" part becomes NVIDIA_H200.
Format, as vLLM's get_moe_configs reads it: one JSON object, keys the batch sizes M as strings, each value
{BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps, num_stages}, plus "triton_version" (vLLM drops
that key; any other non-integer key would break its int(key)). vLLM uses the entry whose M is nearest the call's M.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass

VLLM_TUNER = ("vllm-project/vllm benchmarks/kernels/benchmark_moe.py @ 71acd375e8b6, get_configs_compute_bound "
              "(CUDA branch)")
SPACE_AXES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("BLOCK_SIZE_M", (16, 32, 64, 128, 256)),
    ("BLOCK_SIZE_N", (32, 64, 128, 256)),
    ("BLOCK_SIZE_K", (64, 128, 256)),
    ("GROUP_SIZE_M", (1, 16, 32, 64)),
    ("num_warps", (4, 8)),
    ("num_stages", (2, 3, 4, 5)),
)
CONFIG_KEYS = tuple(k for k, _ in SPACE_AXES)
MODELS = ("mixtral", "qwen3-30b-a3b", "olmoe", "deepseek-v3")
DECODE_MS = (1, 2, 4, 8, 16, 32, 64)
TUNE_MS = DECODE_MS + (256, 1024, 4096)  # the decode sizes, then the moe bench's larger M


class UsageError(ValueError):
    """A user mistake (bad model, bad M list, unreadable results file): reported as one line."""


def search_space() -> list[tuple[int, ...]]:
    """Every config of vLLM's tuner, as (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps,
    num_stages) tuples, in the tuner's order."""
    return list(itertools.product(*(values for _, values in SPACE_AXES)))


def config_dict(cfg) -> dict:
    """A config tuple (or list) as the dict vLLM's override_config and its JSON files hold, in vLLM's key order."""
    return dict(zip(CONFIG_KEYS, (int(v) for v in cfg)))


@dataclass(frozen=True)
class MoeShape:
    model: str
    E: int  # experts
    N: int  # vLLM's N: w2.shape[2], the expert intermediate size
    H: int  # hidden size (w1.shape[2])
    top_k: int


def moe_shape(model: str) -> MoeShape:
    from moekern.models.registry import get_model

    try:
        spec = get_model(model)
    except KeyError as exc:
        raise UsageError(str(exc).strip("\"'")) from None
    if not spec.is_moe:
        raise UsageError(f"model={model!r} is dense (no experts): nothing to tune")
    return MoeShape(spec.name, spec.num_experts, spec.intermediate_size, spec.hidden_size, spec.top_k)


def device_file_name(device_name: str) -> str:
    """vLLM's device part of a config file name, from the NVML device name (e.g. 'NVIDIA H100 80GB HBM3')."""
    name = re.sub(r"[\s/]+", "_", device_name)
    return "NVIDIA_H200" if "H200" in name.split("_") else name


def config_file_name(E: int, N: int, device: str) -> str:
    """The bf16 config file name vLLM 0.26 looks up; device is already a file name part (device_file_name)."""
    return f"E={E},N={N},device_name={device}.json"


def parse_models(text: str) -> list[str]:
    names = [m.strip() for m in (text or "").split(",") if m.strip()]
    if not names:
        raise UsageError(f"--models={text!r} names no model; known: {', '.join(MODELS)}")
    return list(dict.fromkeys(moe_shape(m).model for m in names))


def parse_ms(text: str) -> list[int]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    bad = [t for t in items if not t.isdigit() or int(t) < 1]
    if not items or bad:
        raise UsageError(f"--ms={text!r} must be batch sizes >= 1 separated by commas (e.g. 1,2,4,64); "
                         f"bad: {', '.join(bad) or 'empty'}")
    return list(dict.fromkeys(int(t) for t in items))


# ------------------------------------------------------------------ the results file (JSONL)
# One line per measurement: {"model", "M", "cfg": [6 ints], "phase": "screen"|"final", "status": "ok"|"wrong"|
# "error", "us", "rel_err", "first_s", "error", "device"}; one {"meta": {...}} line at the start of each run.


def read_results(path: str) -> tuple[list[dict], list[dict]]:
    """(metas, records) of a results file; a missing file is empty. A last line cut off (a run killed while
    writing) is dropped; a bad line elsewhere is an error naming its line."""
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        lines = f.read().splitlines()
    metas, records = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise UsageError(f"{path}:{i}: not a JSON line (a results file of benchmarks/tune_vllm.py?)") from None
        if "meta" in obj:
            metas.append(obj["meta"])
        else:
            records.append(obj)
    return metas, records


def done_keys(records, device: str) -> set[tuple]:
    """(model, M, cfg tuple, phase) of every measurement made on this device, whatever its status."""
    return {(r["model"], r["M"], tuple(r["cfg"]), r["phase"]) for r in records if r["device"] == device}


def rank_screen(records, model: str, M: int) -> list[dict]:
    """The ok screening records of (model, M), fastest first."""
    ok = [r for r in records if r["model"] == model and r["M"] == M and r["phase"] == "screen" and r["status"] == "ok"]
    return sorted(ok, key=lambda r: r["us"])


def pick(records, model: str, M: int, finalists: int) -> dict | None:
    """The config for (model, M): among the `finalists` fastest screened configs, the fastest re-timed one when all
    of them were re-timed (phase final), else the fastest screened one. None if no config ran correctly."""
    top = rank_screen(records, model, M)[:max(finalists, 1)]
    if not top:
        return None
    finals = {tuple(r["cfg"]): r for r in records if r["model"] == model and r["M"] == M and r["phase"] == "final"
              and r["status"] == "ok"}
    if finalists and all(tuple(r["cfg"]) in finals for r in top):
        return min((finals[tuple(r["cfg"])] for r in top), key=lambda r: r["us"])
    return top[0]


def coverage(records, model: str, ms, space=None) -> dict[int, int]:
    """Configs of the space measured (screened, any status) per M of ms."""
    space = set(search_space() if space is None else space)
    seen: dict[int, set] = {M: set() for M in ms}
    for r in records:
        if r["model"] == model and r["M"] in seen and r["phase"] == "screen":
            seen[r["M"]].add(tuple(r["cfg"]))
    return {M: len(s & space) for M, s in seen.items()}


def config_json(picks: dict[int, dict], triton_version: str | None) -> str:
    """vLLM's file text: {"triton_version": ..., "M": {six keys}, ...}, M ascending, 4-space indent, newline."""
    body = {"triton_version": triton_version} if triton_version else {}
    body.update({str(M): config_dict(picks[M]["cfg"]) for M in sorted(picks)})
    return json.dumps(body, indent=4) + "\n"


def write_configs(path: str, out_dir: str, models=None, finalists: int = 3, space=None) -> list[dict]:
    """Turn a results file into vLLM config files in out_dir, one per (device, model) measured: only the M whose
    every config of the space was measured (complete rows); the others are reported as missing. Returns one
    summary per file considered: {file, device, model, written: [M], missing: {M: "n/1920 configs"}, no_valid: [M]}.
    Writes tune_vllm_summary.json beside the files (vLLM reads only the E=...json names)."""
    metas, records = read_results(path)
    if not records:
        raise UsageError(f"{path}: no measurements to write (run benchmarks/tune_vllm.py on a GPU first)")
    space = search_space() if space is None else space
    triton_by_device = {m.get("device"): m.get("triton") for m in metas}
    out = []
    for device, model in dict.fromkeys((r["device"], r["model"]) for r in records):
        if models and model not in models:
            continue
        shape = moe_shape(model)
        mine = [r for r in records if r["device"] == device and r["model"] == model]
        ms = sorted({r["M"] for r in mine})
        cov = coverage(mine, model, ms, space)
        picks, no_valid, missing = {}, [], {}
        for M in ms:
            if cov[M] < len(space):
                missing[M] = f"{cov[M]}/{len(space)} configs"
                continue
            best = pick(mine, model, M, finalists)
            if best is None:
                no_valid.append(M)
            else:
                picks[M] = best
        name = config_file_name(shape.E, shape.N, device)
        if picks:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(config_json(picks, triton_by_device.get(device)))
        out.append({"file": name, "device": device, "model": model, "written": sorted(picks),
                    "us": {M: round(p["us"], 3) for M, p in sorted(picks.items())},
                    "phase": {M: p["phase"] for M, p in sorted(picks.items())},
                    "missing": missing, "no_valid": no_valid})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tune_vllm_summary.json"), "w") as f:
        json.dump({"source": VLLM_TUNER, "space_size": len(space), "results": path, "files": out}, f, indent=1)
    return out
