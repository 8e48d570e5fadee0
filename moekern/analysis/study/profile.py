"""`moekern profile`: where an MoE step's time goes, per kernel class.

Three sources, one table:
- torch.profiler around a workload (a fused_moe call at a registry shape, or routing alone): writes a
  Chrome-trace JSON (Perfetto opens it: ui.perfetto.dev) and a per-kernel table. On a GPU the table holds
  device kernels and their self device time; on CPU (tests, no GPU) it holds the aten ops' self CPU time.
- an existing trace (`moekern profile trace FILE.json[.gz]`, e.g. vLLM's VLLM_TORCH_PROFILER_DIR output):
  events with cat "kernel" (or "gpu_op"), else "cpu_op", summed by name.
- Nsight Compute (`ncu`) metrics of moekern's kernels: DRAM throughput, achieved occupancy and L2 hit rate
  (METRICS below), from ncu's CSV. Wrappers for Nsight Systems (`nsys`) and ROCm (`rocprofv3`) run the tool
  where it exists and say plainly when it does not (nsys produces no report on the lent H100 machines;
  rocprofv3 needs an AMD GPU).

Kernel classes (`classify_kernel`): the first rule (in order) whose regex matches the lower-cased name:
  communication  nccl | all_to_all / alltoall | all_reduce / allreduce | all_gather | reduce_scatter |
                 deep_ep | pplx | nvshmem | moekern.ep, _ep_dispatch*, _ep_combine_pull (moekern's EP
                 write/pull kernels) | peer_(write|send|pull) | c10d | send/recv kernels
  combine        unpermute | combine | moe_sum | scatter_add | index_add | _moe_reduce | _ep_local_reduce
  routing        topk | top_k | router | gating | gate_ | softmax | sigmoid | grouped_topk
  align          align | moe_align | sort | histogram | bincount | cumsum | permute | count_and_sort | radix
  attention      flash | attn | attention | fmha | sdpa | paged | mla | scaled_dot_product
  expert_gemm    grouped_gemm | fused_moe | moe_gemm | gemm | matmul | aten::mm | aten::bmm | aten::addmm |
                 aten::linear | cutlass | cublas | nvjet | xmma | wgmma | sm\\d+_ | triton_.*mm
  other          everything else (copies, elementwise, norms, memsets).
Order matters: "unpermute" is combine before "permute" is align; "softmax" counts as routing, so an
attention kernel named only "softmax" would be misfiled; real attention kernels carry flash/attn/fmha in
their names. In a whole-model trace the GEMM class also holds attention projections and the LM head:
read it as "GEMMs", and use a fused_moe-only workload to isolate the experts.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from moekern.errors import UsageError

CATEGORIES = ("routing", "align", "expert_gemm", "combine", "attention", "communication", "other")
_RULES = [
    ("communication", r"nccl|all_?to_?all|all_?reduce|all_?gather|reduce_?scatter|deep_?ep|pplx|nvshmem|"
                      r"moekern[._]ep|_ep_dispatch|_ep_combine_pull|peer_(write|send|pull)|c10d|sendrecv|_send_kernel|"
                      r"_recv_kernel"),
    ("combine", r"unpermute|combine|moe_sum|scatter_add|index_add|_moe_reduce|_ep_local_reduce"),
    ("routing", r"topk|top_k|router|gating|\bgate_|softmax|sigmoid"),
    ("align", r"align|sort|histogram|bincount|cumsum|permute|count_and_sort|radix"),
    ("attention", r"flash|attn|attention|fmha|sdpa|paged|\bmla\b|_mla_|scaled_dot_product"),
    ("expert_gemm", r"grouped_gemm|fused_moe|moe_gemm|gemm|matmul|aten::mm\b|aten::bmm|aten::addmm|aten::linear|"
                    r"cutlass|cublas|nvjet|xmma|wgmma|sm\d+_|triton_.*mm"),
]
_COMPILED = [(c, re.compile(r)) for c, r in _RULES]

# DRAM bandwidth, occupancy and L2 hit rate (what the study asks for), plus the kernel's own duration and
# registers per thread: for latency-bound kernels (routing at small M) those two say more than bandwidth.
METRICS = ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "sm__warps_active.avg.pct_of_peak_sustained_active",
           "lts__t_sector_hit_rate.pct", "gpu__time_duration.sum", "launch__registers_per_thread")
MOEKERN_KERNELS = r"regex:_.*_kernel|moekern|topk|align|moe"


def classify_kernel(name: str) -> str:
    """The kernel class of `name` (module docstring for the rules)."""
    n = name.lower()
    for cat, rx in _COMPILED:
        if rx.search(n):
            return cat
    return "other"


@dataclass
class KernelRow:
    name: str
    category: str
    count: int
    time_us: float  # self device time on GPU; self CPU time on CPU; trace durations for a trace


@dataclass
class ProfileTable:
    rows: list[KernelRow]
    time_kind: str  # "device" | "cpu" | "trace"
    trace_path: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_us(self) -> float:
        return sum(r.time_us for r in self.rows)

    def shares(self) -> dict[str, float]:
        """{category: share of total time} over CATEGORIES (zeros included)."""
        tot = self.total_us
        out = {c: 0.0 for c in CATEGORIES}
        for r in self.rows:
            out[r.category] += r.time_us
        return {c: (v / tot if tot > 0 else 0.0) for c, v in out.items()}

    def to_dict(self) -> dict:
        return {"time_kind": self.time_kind, "trace": self.trace_path, "total_us": self.total_us,
                "shares": self.shares(), "notes": self.notes,
                "kernels": [r.__dict__ for r in sorted(self.rows, key=lambda r: -r.time_us)]}

    def format(self, top: int = 25) -> str:
        lines = [f"time: {self.time_kind}; total {self.total_us:.1f} us"]
        lines += [f"  {c:14s} {100 * s:6.2f} %" for c, s in self.shares().items()]
        lines.append(f"{'kernel':70s} {'class':13s} {'calls':>6s} {'us':>10s}")
        for r in sorted(self.rows, key=lambda r: -r.time_us)[:top]:
            lines.append(f"{r.name[:70]:70s} {r.category:13s} {r.count:6d} {r.time_us:10.1f}")
        return "\n".join(lines + self.notes)


def _merge(rows: dict[str, list]) -> list[KernelRow]:
    return [KernelRow(n, classify_kernel(n), int(c), float(t)) for n, (c, t) in rows.items() if t > 0]


# ------------------------------------------------------------------------------------------ torch.profiler
def profile_callable(fn, out_dir, warmup: int = 2, iters: int = 5, device: str = "cpu") -> ProfileTable:
    """Run `fn()` `warmup` times, then `iters` times under torch.profiler; write out_dir/trace.json
    (Chrome trace, Perfetto-readable) and return the per-kernel table (module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if iters < 1 or warmup < 0:
        raise ValueError(f"iters={iters} must be >= 1 and warmup={warmup} >= 0")
    gpu = device != "cpu" and torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if gpu:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        if gpu:
            torch.cuda.synchronize()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    rows: dict[str, list] = {}
    for ev in prof.key_averages():
        if gpu:
            dt = str(getattr(ev, "device_type", ""))
            if "CUDA" not in dt and "PrivateUse1" not in dt:
                continue
            t = float(getattr(ev, "self_device_time_total", 0.0) or getattr(ev, "self_cuda_time_total", 0.0))
        else:
            t = float(ev.self_cpu_time_total)
        r = rows.setdefault(ev.key, [0, 0.0])
        r[0] += ev.count
        r[1] += t
    table = ProfileTable(_merge(rows), "device" if gpu else "cpu", str(trace))
    if not gpu:
        table.notes.append("CPU run: times are aten ops' self CPU time, not GPU kernels")
    return table


def read_trace(path) -> ProfileTable:
    """Per-kernel table of a Chrome-trace JSON (optionally .gz): kernel/gpu_op events if any, else cpu_op."""
    p = Path(path)
    try:
        raw = gzip.open(p, "rt", encoding="utf-8").read() if p.suffix == ".gz" else p.read_text(encoding="utf-8")
        obj = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:  # gzip.BadGzipFile is an OSError
        raise UsageError(f"trace {str(p)!r} is not a Chrome-trace JSON: {exc}") from None
    events = obj.get("traceEvents", obj) if isinstance(obj, dict) else obj
    if not isinstance(events, list):
        raise UsageError(f"trace {str(p)!r} has no traceEvents list")
    complete = [e for e in events if isinstance(e, dict) and e.get("ph") == "X" and "dur" in e]
    for cats in (("kernel", "gpu_op"), ("cpu_op",)):
        sel = [e for e in complete if str(e.get("cat", "")).lower() in cats]
        if sel:
            rows: dict[str, list] = {}
            for e in sel:
                r = rows.setdefault(str(e.get("name", "?")), [0, 0.0])
                r[0] += 1
                r[1] += float(e["dur"])
            kind = "trace" if cats[0] == "kernel" else "trace-cpu"
            tab = ProfileTable(_merge(rows), kind, str(p))
            if kind == "trace-cpu":
                tab.notes.append("no GPU kernel events in the trace: cpu_op durations (inclusive, nested ops "
                                 "overlap) are shown instead")
            return tab
    raise UsageError(f"trace {str(p)!r} has no complete ('X') kernel, gpu_op or cpu_op events")


# --------------------------------------------------------------------------------------------- workloads
def make_workload(kind: str = "fused_moe", model: str = "mixtral", tokens: int = 256, backend: str = "auto",
                  device: str | None = None, dtype: str = "bfloat16", scale_hidden: int = 1, seed: int = 0):
    """A zero-argument callable running one MoE op at a registry shape, and a description dict.

    kind: "fused_moe" (routing + align + expert GEMMs + combine) or "routing" (fused_topk alone).
    scale_hidden divides H and I (tiny CPU runs); 1 is the real shape.
    """
    import torch

    import moekern
    from moekern.models import get_model

    spec = get_model(model)
    if not spec.is_moe:
        raise ValueError(f"model={model!r} is dense; profile an MoE model")
    if kind not in ("fused_moe", "routing"):
        raise ValueError(f"kind={kind!r} must be 'fused_moe' or 'routing'")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = getattr(torch, dtype) if dev != "cpu" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, inter, e = spec.hidden_size // scale_hidden, spec.intermediate_size // scale_hidden, spec.num_experts
    logits = torch.randn(tokens, e, generator=g).to(dev)
    kw = spec.routing_kwargs()
    if spec.correction_bias:
        kw["correction_bias"] = torch.zeros(e, device=dev)
    desc = {"kind": kind, "model": spec.name, "tokens": tokens, "H": h, "I": inter, "E": e, "top_k": spec.top_k,
            "backend": backend, "device": dev, "dtype": str(dt)}
    if kind == "routing":
        return (lambda: moekern.fused_topk(logits, spec.top_k, backend=backend, **kw)), desc
    x = (torch.randn(tokens, h, generator=g) * 0.1).to(dev, dt)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) * 0.02).to(dev, dt)
    w2 = (torch.randn(e, h, inter, generator=g) * 0.02).to(dev, dt)
    return (lambda: moekern.fused_moe(x, w13, w2, logits, spec.top_k, backend=backend, **kw)), desc


# ---------------------------------------------------------------------------------------- Nsight Compute
def _num(v: str) -> float:
    try:
        return float(str(v).replace(",", "").strip())
    except ValueError:
        return float("nan")


def parse_ncu_csv(text: str) -> list[dict]:
    """ncu `--csv` output (the default "details" page: one row per kernel x metric, or `--page raw`: one
    row per kernel, metrics as columns, a units row second) -> [{"id", "kernel", metric: value, ...}], one
    dict per profiled kernel launch. Lines before the CSV header (==PROF== messages, program output) are
    skipped."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"') or l.startswith("ID,")), None)
    if start is None:
        raise ValueError("no ncu CSV header (a line starting with \"ID\") in the text")
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    out: dict[str, dict] = {}
    if rows and "Metric Name" in rows[0]:
        for r in rows:
            d = out.setdefault(r["ID"], {"id": int(_num(r["ID"])), "kernel": r.get("Kernel Name", "")})
            d[r["Metric Name"]] = _num(r.get("Metric Value", ""))
        return list(out.values())
    res = []
    for r in rows:
        if not str(r.get("ID", "")).strip().isdigit():
            continue  # the units row of --page raw
        d = {"id": int(r["ID"]), "kernel": r.get("Kernel Name", r.get("Function Name", ""))}
        for m in METRICS:
            if m in r:
                d[m] = _num(r[m])
        res.append(d)
    return res


def tool_missing(tool: str) -> str | None:
    """None when `tool` is on PATH, else a plain sentence saying it is not and what that means."""
    if shutil.which(tool):
        return None
    why = {"ncu": "Nsight Compute is not installed here (it ships with the CUDA toolkit on NVIDIA machines)",
           "nsys": "Nsight Systems is not installed here (note: on the lent H100 machines nsys runs but writes "
                   "no report; use `moekern profile torch` there)",
           "rocprofv3": "rocprofv3 is ROCm's profiler and needs an AMD GPU with ROCm installed"}
    return f"skipped: {tool!r} not found on PATH. {why.get(tool, '')}".strip()


def ncu_command(target: list[str], out_csv, kernel_regex: str = MOEKERN_KERNELS, launch_count: int = 20,
                metrics=METRICS) -> list[str]:
    """The ncu command line profiling `target` (an argv list) for `metrics`, CSV to stdout."""
    return ["ncu", "--metrics", ",".join(metrics), "--csv", "--kernel-name", kernel_regex,
            "--launch-count", str(launch_count), "--target-processes", "all", *target]


def run_tool(cmd: list[str], log_path=None, timeout: float | None = 1800) -> tuple[int, str]:
    """Run a profiler command; returns (exit code, combined output). A missing tool gives (127, message)."""
    miss = tool_missing(cmd[0])
    if miss:
        return 127, miss
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    text = proc.stdout + ("\n" + proc.stderr if proc.stderr else "")
    if log_path:
        Path(log_path).write_text(text, encoding="utf-8")
    return proc.returncode, text


def nsys_command(target: list[str], out_prefix) -> list[str]:
    return ["nsys", "profile", "--trace", "cuda,nvtx,osrt", "--force-overwrite", "true", "-o", str(out_prefix),
            *target]


def rocprof_command(target: list[str], out_dir) -> list[str]:
    return ["rocprofv3", "--kernel-trace", "--stats", "--output-format", "csv", "-d", str(out_dir), "--", *target]


def workload_argv(args_list: list[str]) -> list[str]:
    """argv that runs `moekern profile run ARGS` in a fresh interpreter (the profilers' target)."""
    import sys

    return [sys.executable, "-m", "moekern.cli", "profile", "run", *args_list]
