"""Timing: CUDA graphs of back-to-back calls, CUDA events, and the two measured ceilings for rooflines.

How one provider call is timed on a GPU (time_calls):
  1. warm-up: every callable runs `warmup` times (the correctness call before it already paid for JIT);
  2. a rough per-call time from CUDA events picks n_inner, the calls per measured unit (about
     target_ms of work, at least one pass over the rotating inputs);
  3. if the provider allows it, n_inner back-to-back calls are captured in one CUDA graph, so launch
     overhead and Python are out of the measurement (as in a graph-captured serving step); if capture
     fails, the same n_inner calls run eagerly between CUDA events, and the row says so;
  4. `repeats` units are timed with events (no sync in between); per-call time = unit / n_inner;
     median, min and max over the repeats are reported.
Small ops (routing, align) rotate over several copies of their inputs (different addresses, same
values) whose total is about twice the L2 cache, so back-to-back calls do not all hit a warm L2
(rotating inputs, not an L2 flush: a flush inside a graph would be timed with the op). Tiny inputs
(M=1) stay L2-resident whatever we do; there the time is launch/latency-bound anyway.

On a CPU (the demo) calls are timed with time.perf_counter: that measures the Triton interpreter, not
a kernel, and the result rows say so.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

ROTATE_L2_MULTIPLE = 2
MAX_ROTATING_COPIES = 16


@dataclass(frozen=True)
class Timing:
    median_us: float
    min_us: float
    max_us: float
    n_inner: int  # calls per timed unit
    repeats: int  # timed units
    method: str  # "cuda-graph" | "cuda-events" | "cpu-wallclock"
    note: str = ""  # why a graph was not used, etc.

    def to_dict(self) -> dict:
        return asdict(self)


def rotating_copies(device: torch.device, input_bytes: int) -> int:
    """How many copies of a small op's inputs to cycle through (1 on CPU or for big inputs)."""
    if device.type != "cuda" or input_bytes <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(MAX_ROTATING_COPIES, math.ceil(ROTATE_L2_MULTIPLE * l2 / input_bytes)))


def time_calls(
    fns: Sequence[Callable[[], object]],
    device,
    *,
    use_graph: bool = True,
    warmup: int = 3,
    target_ms: float = 1.0,
    budget_s: float = 0.25,
    min_repeats: int = 5,
    max_repeats: int = 100,
) -> Timing:
    """Per-call time of cycling through fns (each a zero-argument provider call). See the module docstring."""
    device = torch.device(device)
    fns = list(fns)
    if not fns:
        raise ValueError("fns must hold at least one callable")
    if device.type != "cuda":
        return _time_cpu(fns, budget_s=budget_s, max_repeats=20)
    for _ in range(warmup):
        for f in fns:
            f()
    torch.cuda.synchronize(device)
    probe = max(len(fns), 3)
    est_ms = _events_ms(lambda: [fns[i % len(fns)]() for i in range(probe)]) / probe
    n_inner = max(1, min(256, math.ceil(target_ms / max(est_ms, 1e-4))))
    n_inner = math.ceil(n_inner / len(fns)) * len(fns)
    calls = [fns[i % len(fns)] for i in range(n_inner)]

    def unit():
        for f in calls:
            f()

    run, method, note, graph = unit, "cuda-events", "", None
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # allocator warm-up on a side stream, as torch recommends
                unit()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                unit()
            graph.replay()
            torch.cuda.synchronize(device)
            run, method = graph.replay, "cuda-graph"
        except Exception as exc:  # e.g. a host sync inside the call: time it eagerly instead
            graph = None
            note = f"graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); eager calls"
            try:
                torch.cuda.synchronize(device)
            except Exception:
                pass
    else:
        note = "eager calls (provider not graph-capturable)"
    unit_ms = _events_ms(run)
    repeats = max(min_repeats, min(max_repeats, int(budget_s * 1e3 / max(unit_ms, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record()
        run()
        e.record()
    torch.cuda.synchronize(device)
    per_call = [s.elapsed_time(e) * 1e3 / n_inner for s, e in zip(starts, ends)]
    del graph
    return Timing(statistics.median(per_call), min(per_call), max(per_call), n_inner, repeats, method, note)


def _events_ms(fn: Callable[[], object]) -> float:
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e)


def _time_cpu(fns, *, budget_s: float, max_repeats: int) -> Timing:
    # The interpreter can take seconds per call: the first call is a sample too, and a slow call is
    # not repeated (the demo must stay under a minute on two cores).
    t0 = time.perf_counter()
    fns[0]()
    est = time.perf_counter() - t0
    per_call = [est * 1e6]
    repeats = min(max_repeats, int(budget_s / max(est, 1e-6)))
    for i in range(1, repeats):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        per_call.append((time.perf_counter() - t0) * 1e6)
    return Timing(statistics.median(per_call), min(per_call), max(per_call), 1, len(per_call), "cpu-wallclock",
                  "CPU wall clock (torch on CPU / Triton interpreter): not kernel performance")


def measure_hbm_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), the memory roofline's ceiling."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = time_calls([lambda: b.copy_(a)], device, use_graph=False, target_ms=0.1, min_repeats=10, max_repeats=30)
    del a, b
    return 2 * nbytes / (t.median_us * 1e-6)


def measure_matmul_flops(device, n: int = 8192) -> float:
    """bf16 torch.mm FLOP/s of an n x n x n product, the compute roofline's ceiling."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    t = time_calls([lambda: torch.mm(a, b, out=c)], device, use_graph=False, target_ms=0.1, min_repeats=10,
                   max_repeats=30)
    del a, b, c
    return 2 * n ** 3 / (t.median_us * 1e-6)
