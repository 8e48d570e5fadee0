"""Run providers over shapes on identical inputs: check each against the reference, then time it.

A provider whose answer is wrong is reported with the reason and never timed; one whose package is
missing (or that does not cover the shape) is reported as skipped with the reason; one that raises is
reported as an error. Inputs are built once per (op, model) and freed before the next model.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from moekern.bench.providers import Provider, check_output, get_providers, reference_output
from moekern.bench.shapes import Inputs, Shape, make_inputs
from moekern.bench.timing import measure_hbm_bandwidth, measure_matmul_flops, rotating_copies, time_calls

_SKIP_MARKERS = ("is unavailable on this machine", "covers num_experts")


@dataclass
class Ceilings:
    """Measured once per run: device-to-device copy bandwidth and bf16 matmul throughput."""

    hbm_bytes_per_s: float | None = None
    matmul_flops_per_s: float | None = None

    def to_dict(self) -> dict:
        return {"hbm_GBps": None if self.hbm_bytes_per_s is None else self.hbm_bytes_per_s / 1e9,
                "bf16_matmul_TFLOPs": None if self.matmul_flops_per_s is None else self.matmul_flops_per_s / 1e12,
                "how": "HBM: 1 GiB device-to-device copy, read+write bytes / median time; "
                       "matmul: bf16 torch.mm 8192^3, 2*n^3 / median time"}


def measure_ceilings(device) -> Ceilings:
    device = torch.device(device)
    if device.type != "cuda":
        return Ceilings()
    return Ceilings(measure_hbm_bandwidth(device), measure_matmul_flops(device))


def roofline(shape: Shape, inp: Inputs, median_us: float, ceilings: Ceilings) -> tuple[float | None, str | None]:
    """(fraction of the roofline time reached, "memory"|"compute"); (None, None) without ceilings.

    routing/align: minimum bytes moved / HBM bandwidth. moe: max(weight bytes of the distinct experts
    hit x 3*H*I*2 / bandwidth, 2*M*k*3*H*I FLOPs / bf16 matmul peak).
    """
    if not ceilings.hbm_bytes_per_s or not median_us:
        return None, None
    M, E, k = shape.num_tokens, shape.num_experts, shape.top_k
    if shape.op == "routing":
        nbytes = M * E * 2 + M * k * 8 + E * 4 + (E * 4 if shape.correction_bias else 0)
        t_mem, t_flop = nbytes / ceilings.hbm_bytes_per_s, 0.0
    elif shape.op == "align":
        from moekern.dispatch.reference import align_sizes

        padded, blocks = align_sizes(M * k, E, shape.block_size)
        nbytes = M * k * 4 + padded * 4 + blocks * 4 + 4
        t_mem, t_flop = nbytes / ceilings.hbm_bytes_per_s, 0.0
    else:
        H, inter = shape.hidden_size, shape.intermediate_size
        experts_hit = int(torch.unique(inp.topk_ids).numel())
        nbytes = experts_hit * 3 * H * inter * 2 + 2 * M * H * 2
        t_mem = nbytes / ceilings.hbm_bytes_per_s
        t_flop = 2 * M * k * 3 * H * inter / ceilings.matmul_flops_per_s if ceilings.matmul_flops_per_s else 0.0
    t_roof = max(t_mem, t_flop)
    return t_roof / (median_us * 1e-6), "memory" if t_mem >= t_flop else "compute"


def short_error(exc: BaseException) -> str:
    """'Type: message' on one line; for multi-line messages (Triton's CompilationError quotes source) the
    first and the last line, where the actual complaint is."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text}"[:400]


def blank_row(shape: Shape, provider: Provider) -> dict:
    return {**shape.to_dict(), "shape": shape.key, "provider": provider.name, "status": None, "reason": "",
            "median_us": None, "min_us": None, "max_us": None, "error": None, "timing": None,
            "roofline_fraction": None, "bound": None, "speedup_vs_vllm": None}


def measure_one(shape: Shape, provider: Provider, inp: Inputs, ref, device, *, ceilings: Ceilings | None = None,
                time_it: bool = True, timing_kwargs: dict | None = None) -> dict:
    """One result row: check provider's output on inp against ref, then (if right) time it."""
    device = torch.device(device)
    row = blank_row(shape, provider)
    reason = provider.unavailable(shape, device)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    try:
        fn = provider.prepare(shape, inp)
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        got = provider.normalize(out, shape)
    except Exception as exc:
        msg = short_error(exc)
        return {**row, "status": "skipped" if any(m in msg for m in _SKIP_MARKERS) else "error", "reason": msg}
    del out
    check = check_output(shape, inp, ref, got)
    row["error"] = check.error
    if not check.ok:
        return {**row, "status": "wrong", "reason": check.detail}
    row["status"], row["reason"] = "ok", "" if check.detail == "ok" else check.detail
    if not time_it:
        return row
    fns = [fn]
    if shape.op in ("routing", "align"):
        for _ in range(rotating_copies(device, inp.activation_bytes(shape.op)) - 1):
            fns.append(provider.prepare(shape, inp.copy_activations()))
    try:
        t = time_calls(fns, device, use_graph=provider.graph_ok, **(timing_kwargs or {}))
    except Exception as exc:
        return {**row, "status": "error", "reason": "timing failed: " + short_error(exc)}
    finally:
        del fns
    row.update(median_us=t.median_us, min_us=t.min_us, max_us=t.max_us, timing=t.to_dict())
    if ceilings is not None:
        row["roofline_fraction"], row["bound"] = roofline(shape, inp, t.median_us, ceilings)
    return row


def add_vllm_ratios(rows: list[dict]) -> None:
    """speedup_vs_vllm = vLLM median / provider median, for rows whose shape vLLM ran correctly."""
    vllm = {r["shape"]: r["median_us"] for r in rows if r["provider"] == "vllm" and r["status"] == "ok"}
    for r in rows:
        base = vllm.get(r["shape"])
        if r["status"] == "ok" and base and r["median_us"]:
            r["speedup_vs_vllm"] = base / r["median_us"]


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device, ceilings: Ceilings | None = None) -> dict:
    """GPU, driver and library versions, date: what a result needs to be compared with another."""
    device = torch.device(device)
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type, "gpu": None, "capability": None, "driver": None,
        "cuda": torch.version.cuda, "torch": torch.__version__, "triton": _version("triton"),
        "vllm": _version("vllm"), "flashinfer": _version("flashinfer-python") or _version("flashinfer"),
        "moekern": _version("moekern") or __import__("moekern").__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            env["driver"] = None
    if ceilings is not None:
        env["ceilings"] = ceilings.to_dict()
    return env


@dataclass
class Task:
    shape: Shape
    provider: Provider


@dataclass
class BenchResult:
    rows: list[dict] = field(default_factory=list)
    env: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"environment": self.env, "rows": self.rows}


def plan(shapes: Iterable[Shape], provider_names) -> list[Task]:
    return [Task(s, p) for s in shapes for p in get_providers(s.op, provider_names)]


def run(shapes: list[Shape], provider_names, device, *, seed: int = 0, progress: bool = True,
        measure_ceilings_first: bool = True, on_row: Callable[[dict], None] | None = None,
        extra_providers: list[Provider] = (), budget_s: float | None = None) -> BenchResult:
    """Measure every (shape, provider). Shapes should come grouped by (op, model) (bench_shapes does).

    budget_s: once this many seconds have passed, the remaining (op, model) groups are not started; their
    rows say so (status "skipped"), so a run cut short on a time-limited machine still reports what it did.
    """
    import time

    from tqdm import tqdm

    t0 = time.monotonic()

    device = torch.device(device)
    ceilings = measure_ceilings(device) if measure_ceilings_first else Ceilings()
    result = BenchResult(env=environment(device, ceilings))
    tasks = plan(shapes, provider_names)
    tasks += [Task(s, p) for s in shapes for p in extra_providers if p.op == s.op]
    tasks.sort(key=lambda t: shapes.index(t.shape))  # stable: keeps provider order within a shape
    bar = tqdm(total=len(tasks), disable=not progress, unit="measurement", dynamic_ncols=True)
    groups: dict[tuple[str, str], list[Task]] = {}
    for t in tasks:
        groups.setdefault((t.shape.op, t.shape.model), []).append(t)
    try:
        for (op, model), group in groups.items():
            if budget_s is not None and time.monotonic() - t0 > budget_s:
                for t in group:
                    row = {**blank_row(t.shape, t.provider), "status": "skipped",
                           "reason": f"time budget of {budget_s:g} s spent"}
                    result.rows.append(row)
                    if on_row:
                        on_row(row)
                    bar.update(1)
                continue
            max_m = max(t.shape.num_tokens for t in group)
            bar.set_description(f"{op} {model}: building inputs")
            full = make_inputs(group[0].shape, max_m, device, seed)
            refs: dict[Shape, object] = {}
            for t in group:
                shape = t.shape
                bar.set_description(f"{op} {model} M={shape.num_tokens} {t.provider.name}")
                inp = full.first(shape.num_tokens)
                if shape not in refs:
                    refs.clear()
                    refs[shape] = reference_output(shape, inp)
                row = measure_one(shape, t.provider, inp, refs[shape], device, ceilings=ceilings)
                result.rows.append(row)
                if on_row:
                    on_row(row)
                bar.update(1)
            del full, refs, inp
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        bar.close()
    add_vllm_ratios(result.rows)
    return result
