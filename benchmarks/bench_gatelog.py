"""The gate log's per-step host cost, its two hand-offs side by side in one process: moekern's one-kernel
`gatelog_snapshot` against torch calls (copy + resets + event). What the model thread pays per step, apart
from vLLM.

    python benchmarks/bench_gatelog.py                       # Mixtral-8x7B-4l shape (L=4, E=8), 2000 steps
    python benchmarks/bench_gatelog.py --layers 58 --experts 256 --topk-sample 16 --json out.json

Each "step" is what the plugin does around a forward: begin_step, one CUDA-graph replay that adds every
layer's counts (as the MoE layers do inside vLLM's graphs), end_step. The modes alternate in blocks of
`--block` steps (ABAB...), so a drift of the machine hits both; the host time per step is the recorder's own
accounting (begin + end, wall and thread CPU), the same numbers the plugin reports from inside vLLM. Each step
ends with a device sync outside that accounting, as a vLLM step does when it reads the sampled tokens: without
it the host can run ahead of the replays until the launch queue is full, and whichever call then blocks pays
for the GPU's backlog (the torch hand-off at the DeepSeek-V3 shape: 4.6 ms of wall against 107 us of CPU per step
in benchmarks/results/gatelog/h100-2026-12-06-s12/gatelog_handoff_dsv3_nosync.json); `--no-step-sync` keeps that
back-pressure in, to compare. After the
run every record is checked against the counts the graph added (exact). On a machine without CUDA it runs the
same loop on CPU tensors (a smoke run: CPU numbers say nothing about a GPU's driver calls).

It also times the writer thread's formatting of one step at the same shape, both ways on the same slot:
moekern._C's gatelog_format (runs with the GIL released) and Python's step_lines (holds the GIL throughout,
time the model's thread may wait for); `format_us_per_step`, median of `--format-reps` after a warm-up, and
whether both gave the same bytes. Tests check only that the C++ call releases the GIL, not these times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moekern.gatelog import read_gate_log  # noqa: E402
from moekern.gatelog.schema import line_pieces  # noqa: E402
from moekern.gatelog.writer import GateLogRecorder, step_lines  # noqa: E402

MODES = ("kernel", "torch")


def make_recorder(out: Path, mode: str, L: int, E: int, k: int, topk_sample: int, device) -> GateLogRecorder:
    rec = GateLogRecorder(out, rank=0, snapshot=mode, topk_sample=topk_sample, queue_slots=256)
    for i in range(L):
        rec.register_layer(f"model.layers.{i}.mlp.experts", E, k)
    rec.ensure_buffer(device)
    return rec


def _gatelog_format_op():
    """torch.ops.moekern.gatelog_format when moekern._C is built with it, else None."""
    try:
        import moekern._C  # noqa: F401  (registers torch.ops.moekern.*)

        return torch.ops.moekern.gatelog_format.default
    except (ImportError, AttributeError, RuntimeError):
        return None


def time_formatting(counts: torch.Tensor, ids: torch.Tensor, L: int, topk_sample: int, reps: int) -> dict:
    """The writer's formatting of one step ([L, E] counts, each layer the same; a top-k sample of the first
    `topk_sample` rows of `ids`), us per step: moekern._C's gatelog_format against Python's step_lines."""
    E, k = counts.shape[0], ids.shape[1]
    slot = counts.cpu().expand(L, E).contiguous()
    sample = None
    if topk_sample:
        sample = torch.full((L, topk_sample, k), -1, dtype=torch.int32)
        n = min(topk_sample, ids.shape[0])
        sample[:, :n] = ids[:n].cpu()
    pieces = line_pieces(1, phase="decode", time=1.7e9, model="bench", extra={"scheduled_tokens": ids.shape[0]})
    fmt = _gatelog_format_op()
    rows, samples = slot.tolist(), None if sample is None else sample.tolist()
    calls = {"python": lambda: step_lines(pieces, rows, [E] * L, [k] * L, samples, ids.shape[0])}
    if fmt is not None:
        calls["cpp"] = lambda: fmt(slot, [E] * L, [k] * L, pieces.head, pieces.mid, pieces.phase, pieces.tail,
                                   pieces.model, pieces.extra, sample, ids.shape[0]).numpy().tobytes()
    out = {}
    for name, call in calls.items():
        for _ in range(3):
            call()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times) * 1e6, 2)
    if "cpp" in out:
        out["cpp_vs_python"] = round(out["cpp"] / out["python"], 3)
        out["same_bytes"] = calls["cpp"]() == calls["python"]()
    return out


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    L, E, k = args.layers, args.experts, args.top_k
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.stack([torch.randperm(E, device=device, generator=g)[:k] for _ in range(args.tokens)]).to(torch.int32)
    counts = torch.bincount(ids.flatten().long(), minlength=E).to(torch.int32)
    tmp = Path(tempfile.mkdtemp(prefix="gatelog_handoff_"))
    recs = {m: make_recorder(tmp / m, m, L, E, k, args.topk_sample, device) for m in MODES}
    why = {m: r.snapshot_why for m, r in recs.items()}

    def forward(rec):  # what the MoE layers add inside vLLM's graphs
        for layer in range(L):
            rec.add_counts(layer, counts)
            rec.add_topk_sample(layer, ids)

    replays = {}
    if device.type == "cuda":
        for m, rec in recs.items():
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                forward(rec)  # warm-up outside a step: marks the buffer dirty, wiped by the first step
                with torch.cuda.graph(graph, stream=stream):
                    forward(rec)
            torch.cuda.current_stream().wait_stream(stream)
            replays[m] = graph.replay
    else:
        replays = {m: (lambda rec=rec: forward(rec)) for m, rec in recs.items()}
    per_block = {m: [] for m in MODES}
    sync = device.type == "cuda" and not args.no_step_sync
    steps = 0
    while steps < args.steps:
        for m in MODES:
            rec = recs[m]
            before = dict((p, list(v)) for p, v in rec.stats.host.items())
            n0 = rec.stats.steps
            for _ in range(args.block):
                rec.begin_step()
                replays[m]()
                rec.end_step("decode", args.tokens)
                if sync:
                    torch.cuda.synchronize()
            wall = sum(rec.stats.host[p][0] - before.get(p, [0, 0])[0] for p in ("begin", "end"))
            cpu = sum(rec.stats.host[p][1] - before.get(p, [0, 0])[1] for p in ("begin", "end"))
            n = rec.stats.steps - n0
            per_block[m].append((wall / n * 1e6, cpu / n * 1e6))
        steps += args.block
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "shape": {"layers": L, "experts": E, "top_k": k, "tokens": args.tokens, "topk_sample": args.topk_sample},
           "steps_per_mode": steps, "block": args.block, "step_sync": sync, "hand_off": why, "modes": {}}
    for m, rec in recs.items():
        rec.close()
        records, skipped = read_gate_log(tmp / m)
        want = counts.tolist()
        bad = [r.step for r in records if r.expert_counts != want]
        ok = not skipped and not bad and len(records) == rec.stats.written_steps * L
        walls = [w for w, _ in per_block[m]]
        cpus = [c for _, c in per_block[m]]
        out["modes"][m] = {"host_us_per_step_wall": round(statistics.median(walls), 2),
                           "host_us_per_step_cpu": round(statistics.median(cpus), 2),
                           "split": rec.stats.host_split_us_per_step, "steps": rec.stats.steps,
                           "written_steps": rec.stats.written_steps, "dropped_steps": rec.stats.dropped_steps,
                           "records_exact": ok, "wrong_steps": bad[:5]}
    out["format_us_per_step"] = time_formatting(counts, ids, L, args.topk_sample, args.format_reps)
    a, b = out["modes"]["kernel"], out["modes"]["torch"]
    if b["host_us_per_step_wall"]:
        out["kernel_vs_torch_wall"] = round(a["host_us_per_step_wall"] / b["host_us_per_step_wall"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256, help="routed rows per step (the decode batch)")
    p.add_argument("--topk-sample", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000, help="steps per mode")
    p.add_argument("--block", type=int, default=100, help="steps per mode before switching")
    p.add_argument("--cpu", action="store_true", help="CPU tensors even with a GPU")
    p.add_argument("--no-step-sync", action="store_true",
                   help="no device sync after each step (the launch queue fills; blocked launches count as host time)")
    p.add_argument("--format-reps", type=int, default=200, help="timed formatting calls per path")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    for name in ("layers", "experts", "top_k", "tokens", "steps", "block", "format_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.top_k > args.experts:
        p.error(f"--top-k {args.top_k} > --experts {args.experts}")
    if args.topk_sample < 0:
        p.error("--topk-sample must be >= 0")
    try:
        out = run(args)
    except RuntimeError as exc:  # e.g. MOEKERN_GATE_LOG_SNAPSHOT=kernel semantics: the op is not built here
        print(f"gatelog_handoff: {exc}", file=sys.stderr)
        return 2
    for m, r in out["modes"].items():
        print(f"{m:6s} host us/step wall {r['host_us_per_step_wall']:8.2f}  cpu {r['host_us_per_step_cpu']:8.2f}  "
              f"steps {r['steps']}  exact {r['records_exact']}  ({out['hand_off'][m]})")
    if "kernel_vs_torch_wall" in out:
        print(f"kernel / torch host time per step: {out['kernel_vs_torch_wall']:.3f}  ({out['device']})")
    f = out["format_us_per_step"]
    print(f"format one step (writer thread): python {f['python']:.2f} us (GIL held)"
          + (f", C++ {f['cpp']:.2f} us (GIL released), ratio {f['cpp_vs_python']:.3f}, same bytes {f['same_bytes']}"
             if "cpp" in f else ", no C++ gatelog_format in moekern._C"))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    ok = all(r["records_exact"] for r in out["modes"].values()) and out["format_us_per_step"].get("same_bytes", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
