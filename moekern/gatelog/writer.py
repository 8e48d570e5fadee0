"""The plugin's gate-log recorder: counts on the GPU, drained once per step, written by a thread.

Why this shape. Under CUDA graphs the MoE layer's Python runs once, at capture; every replay only
re-runs the recorded kernels. So accumulation must itself be a recorded GPU op: each MoE layer adds its
routing's expert_counts ([E] int32, made by fused_topk anyway) into row `layer` of one persistent device
buffer `counts` [L, E_max] int32 (`counts[layer, :E] += expert_counts`, one tiny kernel per layer; vLLM's
own routing, when a layer falls back to it, adds its ids with one index_add_). The buffer's address never
changes, so captured graphs keep writing to it.

A *step* is one call of the worker's execute_model that runs a forward pass (scheduled tokens > 0): the
host side (moekern.vllm.hooks) calls `begin_step()` before it and `end_step(...)` after it returns. Every
torch or CUDA call on the model's thread costs there (on the H100 e2e runs: ~90 us of CPU for a memset and
as much for a copy, while the whole gate log must stay under 2 % of a ~10 ms step), so a step costs one:
end_step() launches moekern's `gatelog_snapshot` op on the current stream, one kernel that copies the
counts (and top-k sample) straight into a pinned host slot, resets the device buffers for the next step
and then publishes the step number as the slot's mark; the writer thread reads the mark, not an event.
Stream order alone makes this correct: the kernel follows the step's MoE kernels, the next step's follow
it, and the host never waits. begin_step() touches the device only when the buffer may hold counts from
outside a step (`mark_dirty`: before the first step, after a dropped step, after a forward outside a step,
which the hooks report: the dummy batches of data parallelism, eager forwards): then it zeroes it.
Graph replays within one step (one per forward; two micro-batches are two) accumulate into the same rows.
Without the op (moekern._C older than it, or pinned memory the device cannot address, or
MOEKERN_GATE_LOG_SNAPSHOT=torch) end_step() does the same with torch calls: a non-blocking copy, the
resets, an event record.

The writer thread works in batches, not per step: end_step() only appends the slot to a deque and wakes
the writer once `flush_steps` steps are waiting (or half the slots are in flight); otherwise the writer
wakes on its own every `flush_seconds`. Each wake-up drains what is waiting: waits for each slot's mark
(or event: blocking-sync, so the thread sleeps instead of spinning a core; by then the copies are long done),
turns rows into moekern.gatelog/1 records (moekern._C's gatelog_format builds the JSON text with the GIL
released; Python's own formatting of a 58-layer, 256-expert step held it ~1 ms; builds without the op use
`step_lines`, over the schema's one serializer, moekern.gatelog.schema.format_line), appends them to
gate_log.rank{R}.jsonl and flushes. So a crash
loses at most `flush_steps` steps or `flush_seconds` seconds, and the thread that runs the model meets the
writer a few times a second instead of at every step (the writer shares its GIL: every wake-up can take
the GIL from the step loop for one switch interval). Memory is bounded: `queue_slots` pinned slots;
when all are in flight the step is dropped (never waited for) and counted in `dropped_steps` (written to
the .meta.json sidecar); step indices keep counting, so a gap in `step` shows a drop.

What it costs is measured where it is spent, per step, in the sidecar (rewritten by the writer every few
seconds: the engine's process may end without running exit handlers) and the plugin summary:
`host_us_per_step` is the step hooks' own wall time on the model's thread, `host_split_us_per_step` splits
it by part (phase: the caller's step classification, via `add_host_time`; begin: the step's start; end:
the hand-off) into wall and thread-CPU time (wall well above CPU: the thread waited, for the GIL its
torch calls release or for the driver); `writer_cpu_seconds` is the writer thread's CPU time.

num_tokens is sum(expert_counts) / top_k: the rows the layer routed, which under CUDA graphs includes
the batch padding to the captured size. The scheduler's unpadded count is in extra.scheduled_tokens.

Top-k sample (opt-in, `topk_sample=N`, for co-activation studies): each MoE layer also copies the ids of
its first min(N, M) routed rows into a second persistent buffer `sample` [L, N, k_max] int32 (one slice
copy, recorded in the graph like the counts; M is fixed per captured graph, so the slice is too). Every
`topk_every`-th step begin_step() fills it with -1 and end_step() copies it to a pinned slot next to the
counts, same stream, same event: no extra sync. Other steps skip both (the in-graph copy still runs, a
few hundred bytes). The writer keeps the rows a layer actually wrote (no -1) and, since CUDA-graph
padding sits at the end of the batch, at most scheduled_tokens of them; they become the record's
`topk_sample`. Pinned memory: queue_slots * L * N * k_max * 4 bytes (256 * 48 * 16 * 8 * 4 = 6 MiB).
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekern import _ext
from moekern.gatelog.schema import SCHEMA, LinePieces, format_line, line_pieces


@dataclass
class LayerInfo:
    name: str
    num_experts: int
    top_k: int


@dataclass
class _Pending:
    step: int
    slot: int
    event: object  # torch.cuda.Event, or None: the slot's mark says when the copy landed (or it was synchronous)
    phase: str
    scheduled_tokens: int | None
    time: float
    sampled: bool = False  # a top-k sample was copied with the counts


@dataclass
class RecorderStats:
    steps: int = 0
    written_steps: int = 0
    dropped_steps: int = 0
    records: int = 0
    write_errors: int = 0
    last_error: str | None = None
    host: dict = field(default_factory=dict)  # part -> [wall s (perf_counter), CPU s (thread_time)], model's thread
    writer_cpu_seconds: float = 0.0  # the writer thread's CPU time (thread_time)
    wakeups: int = 0  # times the writer thread woke to drain
    extra: dict = field(default_factory=dict)

    def charge(self, part: str, wall: float, cpu: float) -> None:
        acc = self.host.get(part)
        if acc is None:
            self.host[part] = [wall, cpu]
        else:
            acc[0] += wall
            acc[1] += cpu

    @property
    def host_seconds(self) -> float:
        return sum(w for w, _ in list(self.host.values()))

    @property
    def host_us_per_step(self) -> float | None:
        return round(self.host_seconds / self.steps * 1e6, 2) if self.steps else None

    @property
    def host_split_us_per_step(self) -> dict | None:
        if not self.steps:
            return None
        return {part: {"wall": round(w / self.steps * 1e6, 2), "cpu": round(c / self.steps * 1e6, 2)}
                for part, (w, c) in list(self.host.items())}  # list(): one step, under the GIL


class GateLogRecorder:
    """One per process. Host-side methods run on the thread that runs the model; `_run` is the writer."""

    def __init__(self, out_dir: str | os.PathLike, *, rank: int | None = None, flush_steps: int = 64,
                 flush_seconds: float = 1.0, queue_slots: int = 256, model: str | None = None,
                 extra: dict | None = None, meta: dict | None = None, topk_sample: int = 0, topk_every: int = 1,
                 snapshot: str = "auto"):
        if snapshot not in ("auto", "kernel", "torch"):
            raise ValueError(f"snapshot={snapshot!r}: expected 'auto', 'kernel' or 'torch'")
        if flush_steps < 1:
            raise ValueError(f"flush_steps={flush_steps} must be >= 1")
        if queue_slots < 1:
            raise ValueError(f"queue_slots={queue_slots} must be >= 1")
        if topk_sample < 0 or topk_every < 1:
            raise ValueError(f"topk_sample={topk_sample} must be >= 0 and topk_every={topk_every} >= 1")
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.flush_steps = flush_steps
        self.flush_seconds = flush_seconds
        self.queue_slots = queue_slots
        self.model = model
        self.extra = dict(extra or {})
        self.meta = dict(meta or {})
        self.topk_sample = topk_sample
        self.topk_every = topk_every
        self.layers: list[LayerInfo] = []
        self.stats = RecorderStats()
        self.counts: torch.Tensor | None = None  # [L, E_max] int32 on the model's device
        self._host: torch.Tensor | None = None  # [S, L, E_max] int32, pinned when on CUDA
        self.sample: torch.Tensor | None = None  # [L, N, k_max] int32 on the device (topk_sample = N > 0)
        self._host_sample: torch.Tensor | None = None  # [S, L, N, k_max] int32, pinned when on CUDA
        self._marks: torch.Tensor | None = None  # [S] int64 pinned: step number of the copy in each slot
        self._events: list = []
        self._views: list = []  # per slot: (host counts, host mark, host sample or None), made once
        self._snapshot = None  # torch.ops.moekern.gatelog_snapshot.default when usable, else None (torch calls)
        self._format = None  # torch.ops.moekern.gatelog_format.default when moekern._C has it
        self.snapshot_mode = snapshot
        self.snapshot_why = ""
        self._dirty = True  # the device buffer may hold counts from outside a step
        self._paused = False
        self._free: list[int] = []
        self._free_lock = threading.Lock()
        self._pending: collections.deque = collections.deque()  # _Pending items for the writer
        self._wake = threading.Event()
        # wake the writer when this many steps wait: flush_steps (its promise), sooner if the slots run low;
        # flush_seconds == 0 means flush every step
        self._wake_at = 1 if flush_seconds <= 0 else max(1, min(flush_steps, queue_slots // 2))
        self._thread: threading.Thread | None = None
        self._file = None
        self._closed = False
        self._step = 0
        self._in_step = False
        self._sampling = False  # the open step is a sample step

    # ---- set-up -------------------------------------------------------------------------------------------
    def register_layer(self, name: str, num_experts: int, top_k: int) -> int:
        """Index (0-based, in registration = model order) of a new MoE layer. Before the buffer exists only."""
        if self.counts is not None:
            raise RuntimeError(f"layer {name!r} registered after the gate-log buffer was allocated")
        if num_experts < 1 or top_k < 1:
            raise ValueError(f"layer {name!r}: num_experts={num_experts} and top_k={top_k} must be >= 1")
        self.layers.append(LayerInfo(name, num_experts, top_k))
        return len(self.layers) - 1

    @property
    def ready(self) -> bool:
        return self.counts is not None and not self._closed

    def ensure_buffer(self, device) -> torch.Tensor:
        """Allocate the device buffer and the pinned ring (once; before any CUDA graph is captured)."""
        if self.counts is not None:
            return self.counts
        if not self.layers:
            raise RuntimeError("no MoE layer registered with the gate-log recorder")
        device = torch.device(device)
        L, W = len(self.layers), max(li.num_experts for li in self.layers)
        pin = device.type == "cuda"
        # Normal (not inference) tensors: in-place updates then work both inside vLLM's inference_mode
        # forward and in the step hooks outside it.
        with torch.inference_mode(False):
            self.counts = torch.zeros(L, W, dtype=torch.int32, device=device)
            self._host = torch.zeros(self.queue_slots, L, W, dtype=torch.int32, device="cpu", pin_memory=pin)
            if self.topk_sample:
                K = max(li.top_k for li in self.layers)
                self.sample = torch.full((L, self.topk_sample, K), -1, dtype=torch.int32, device=device)
                self._host_sample = torch.full((self.queue_slots, L, self.topk_sample, K), -1, dtype=torch.int32,
                                               device="cpu", pin_memory=pin)
            self._marks = torch.full((self.queue_slots,), -1, dtype=torch.int64, device="cpu", pin_memory=pin)
        self._snapshot, self.snapshot_why = self._pick_snapshot(device)
        self._format = _format_op()
        self._num_experts = [li.num_experts for li in self.layers]
        self._top_ks = [li.top_k for li in self.layers]
        self._events = [torch.cuda.Event(blocking=True) if pin and self._snapshot is None else None
                        for _ in range(self.queue_slots)]
        self._views = [(self._host[i], self._marks[i], self._host_sample[i] if self._host_sample is not None else None)
                       for i in range(self.queue_slots)]
        self._free = list(range(self.queue_slots - 1, -1, -1))
        if self.rank is None:
            self.rank = _global_rank()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # UTF-8 bytes (see _step_bytes)
        self._write_meta()
        self._thread = threading.Thread(target=self._run, name=f"moekern-gatelog-r{self.rank}", daemon=True)
        self._thread.start()
        return self.counts

    def _pick_snapshot(self, device: torch.device):
        """moekern's one-kernel hand-off when it can run here, else None; and why."""
        if self.snapshot_mode == "torch":
            return None, "torch calls (MOEKERN_GATE_LOG_SNAPSHOT=torch)"
        op, why = _ext_op("gatelog_snapshot")
        if op is not None and device.type == "cuda":
            if not _ext.cuda_kernels_available():
                op, why = None, "moekern._C was built without device kernels"
            else:
                hosts = [t for t in (self._host, self._marks, self._host_sample) if t is not None]
                if not all(torch.ops.moekern.gatelog_host_mapped(t) for t in hosts):
                    op, why = None, "the pinned host ring is not addressable from the device"
        if op is None:
            if self.snapshot_mode == "kernel":
                raise RuntimeError(f"MOEKERN_GATE_LOG_SNAPSHOT=kernel, but {why}")
            return None, f"torch calls: {why}"
        return op, "moekern gatelog_snapshot kernel"

    @property
    def in_step(self) -> bool:
        return self._in_step

    @property
    def paused(self) -> bool:
        return self._paused

    def set_paused(self, paused: bool) -> None:
        """Paused: the step hooks skip the gate log entirely (no classification, no hand-off, no record; the
        layers' in-graph adds still run). For a paired A/B within one engine (moekern e2e --gate-log-paired).
        Counts added while paused are wiped before the first step after."""
        if paused and self._in_step:
            raise RuntimeError("set_paused(True) inside a step")
        self._paused = bool(paused)
        self._dirty = True

    def mark_dirty(self) -> None:
        """Something may have added counts outside a step: the next begin_step() zeroes the buffer."""
        self._dirty = True

    @property
    def path(self) -> Path:
        return self.out_dir / f"gate_log.rank{self.rank if self.rank is not None else 0}.jsonl"

    @property
    def meta_path(self) -> Path:
        return self.out_dir / f"gate_log.rank{self.rank if self.rank is not None else 0}.meta.json"

    # ---- accumulation (inside the model's forward; recorded into CUDA graphs) ------------------------------
    def add_counts(self, layer: int, expert_counts: torch.Tensor) -> None:
        """counts[layer, :E] += expert_counts ([E] int32, fused_topk's): one kernel, graph-capturable."""
        buf = self.counts if self.counts is not None else self.ensure_buffer(expert_counts.device)
        if not self._in_step:
            self._dirty = True  # a forward outside a step (warm-up, capture): wiped before the next step
        E = expert_counts.shape[0]
        buf[layer, :E].add_(expert_counts)

    def add_ids(self, layer: int, topk_ids: torch.Tensor) -> None:
        """For layers routed by vLLM itself: count ids [M, k] with one index_add_ (no host sync)."""
        buf = self.counts if self.counts is not None else self.ensure_buffer(topk_ids.device)
        if not self._in_step:
            self._dirty = True
        flat = topk_ids.reshape(-1).to(torch.int64)
        buf[layer].index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))

    def add_topk_sample(self, layer: int, topk_ids: torch.Tensor) -> None:
        """sample[layer, :n, :k] = topk_ids[:n, :k], n = min(N, M): one slice copy, graph-capturable (M is
        static within a captured graph). No-op unless topk_sample > 0."""
        if not self.topk_sample:
            return
        if self.sample is None:
            self.ensure_buffer(topk_ids.device)
        if not self._in_step:
            self._dirty = True  # as for the counts: a sample from outside a step must not reach the next one
        n = min(self.topk_sample, topk_ids.shape[0])
        k = min(topk_ids.shape[1], self.sample.shape[2])
        if n:
            self.sample[layer, :n, :k].copy_(topk_ids[:n, :k])

    # ---- step boundaries (host side, outside any captured region) ------------------------------------------
    def _reset_device(self) -> None:
        """Zero the counts and refill the top-k sample with -1 (rows a layer does not write in a step stay -1
        and are left out), with torch calls on the current stream."""
        self.counts.zero_()
        if self.sample is not None:
            self.sample.fill_(-1)

    def add_host_time(self, wall: float, cpu: float = 0.0, part: str = "phase") -> None:
        """Charge time the caller spent on the model's thread for the gate log (e.g. classifying the step)."""
        self.stats.charge(part, wall, cpu)

    def begin_step(self) -> None:
        if self.counts is None or self._closed:
            return
        t0, c0 = time.perf_counter(), time.thread_time()
        self._sampling = self.sample is not None and self._step % self.topk_every == 0
        if self._dirty:
            self._reset_device()
            self._dirty = False
        self._in_step = True
        self.stats.charge("begin", time.perf_counter() - t0, time.thread_time() - c0)

    def end_step(self, phase: str = "unknown", scheduled_tokens: int | None = None) -> int | None:
        """Hand this step's counts to the writer; returns the step index (None if no step was open).
        `scheduled_tokens`: the scheduler's (unpadded) token count, >= 0, or None if unknown; it caps the
        top-k sample's rows and goes to extra.scheduled_tokens."""
        if scheduled_tokens is not None and scheduled_tokens < 0:
            raise ValueError(f"scheduled_tokens={scheduled_tokens} must be >= 0 (or None when unknown)")
        if not self._in_step or self.counts is None or self._closed:
            return None
        t0, c0 = time.perf_counter(), time.thread_time()
        self._in_step = False
        step = self._step
        self._step += 1
        self.stats.steps += 1
        with self._free_lock:
            slot = self._free.pop() if self._free else None
        if slot is None:
            self.stats.dropped_steps += 1
            self._dirty = True  # this step's counts stay in the buffer
            self._wake.set()
            self.stats.charge("end", time.perf_counter() - t0, time.thread_time() - c0)
            return step
        host, mark, host_sample = self._views[slot]
        event = self._events[slot]
        if self._snapshot is not None:  # one launch: copy, reset, publish `step` as the slot's mark
            self._snapshot(self.counts, host, mark, step, self.sample, host_sample if self._sampling else None)
        else:
            host.copy_(self.counts, non_blocking=True)
            if self._sampling:
                host_sample.copy_(self.sample, non_blocking=True)
            self._reset_device()
            if event is not None:
                event.record()
            else:
                mark.fill_(step)  # CPU tensors: the copy above was synchronous
        self._pending.append(_Pending(step, slot, event, phase, scheduled_tokens, time.time(), self._sampling))
        if len(self._pending) >= self._wake_at:
            self._wake.set()
        self.stats.charge("end", time.perf_counter() - t0, time.thread_time() - c0)
        return step

    # ---- writer thread ------------------------------------------------------------------------------------
    def _pieces(self, item: _Pending) -> LinePieces:
        """The JSON text the step's lines share (moekern.gatelog.schema.line_pieces)."""
        extra = dict(self.extra)
        if item.scheduled_tokens is not None:
            extra["scheduled_tokens"] = int(item.scheduled_tokens)
        return line_pieces(item.step, rank=int(self.rank or 0), phase=item.phase, time=round(item.time, 6),
                           model=self.model, extra=extra)

    def _step_bytes(self, item: _Pending) -> bytes:
        """The step's lines as UTF-8 bytes, newline-terminated. moekern._C's gatelog_format builds them from
        the pinned slot (counts and top-k sample) with the GIL released: for 58 layers x 256 experts Python
        held it ~1 ms per step, time the model's thread waits for (1.0-1.2 ms of its wall per step with a
        16-token sample on an H100, benchmarks/results/gatelog/h100-2026-12-06-s12). Builds without the op
        use `step_lines`, the same bytes (property-tested)."""
        host = self._host[item.slot]
        pieces = self._pieces(item)
        sample = self._host_sample[item.slot] if item.sampled else None
        if self._format is not None:
            max_rows = -1 if item.scheduled_tokens is None else int(item.scheduled_tokens)
            return self._format(host, self._num_experts, self._top_ks, pieces.head, pieces.mid, pieces.phase,
                                pieces.tail, pieces.model, pieces.extra, sample, max_rows).numpy().tobytes()
        return step_lines(pieces, host.tolist(), self._num_experts, self._top_ks,
                          None if sample is None else sample.tolist(), item.scheduled_tokens)

    MARK_TIMEOUT_S = 60.0  # a slot whose mark never comes is written as an error, not waited for forever

    def _wait_mark(self, item: _Pending) -> None:
        """Wait (sleeping) until the device published this step's mark in its slot."""
        mark = self._marks[item.slot]
        if int(mark) == item.step:
            return
        deadline = time.monotonic() + self.MARK_TIMEOUT_S
        while int(mark) != item.step:
            if time.monotonic() > deadline:
                raise TimeoutError(f"step {item.step}: the device did not publish its counts in "
                                   f"{self.MARK_TIMEOUT_S:.0f} s")
            time.sleep(0.0005)

    META_EVERY_S = 5.0  # the writer rewrites the sidecar (steps, drops, costs) at most this often

    def _run(self) -> None:
        timeout = self.flush_seconds if self.flush_seconds > 0 else None
        last_meta = time.monotonic()
        while True:
            self._wake.wait(timeout)
            self._wake.clear()
            stopping = self._closed
            self.stats.wakeups += 1
            written = 0
            while self._pending:
                written += self._drain_one(self._pending.popleft())
            if written:
                self._flush()
            self.stats.writer_cpu_seconds = time.thread_time()
            if written and time.monotonic() - last_meta >= self.META_EVERY_S:
                last_meta = time.monotonic()
                try:
                    self._write_meta()
                except Exception as exc:
                    self.stats.write_errors += 1
                    self.stats.last_error = repr(exc)
            if stopping and not self._pending:
                break

    def _drain_one(self, item: _Pending) -> int:
        """Write one step's records; 1 if written."""
        try:
            if item.event is not None:
                item.event.synchronize()
            else:
                self._wait_mark(item)
            data = self._step_bytes(item)  # reads the slot: before it is handed back
        except Exception as exc:  # the thread must live on
            self.stats.write_errors += 1
            self.stats.last_error = repr(exc)
            return 0
        finally:
            with self._free_lock:
                self._free.append(item.slot)
        try:
            self._file.write(data)
            self.stats.records += len(self.layers)
            self.stats.written_steps += 1
            return 1
        except Exception as exc:  # a full disk must not kill the engine
            self.stats.write_errors += 1
            self.stats.last_error = repr(exc)
            return 0

    def _flush(self) -> None:
        try:
            self._file.flush()
        except Exception as exc:
            self.stats.write_errors += 1
            self.stats.last_error = repr(exc)

    def _write_meta(self) -> None:
        meta = {"schema": SCHEMA, "rank": self.rank, "model": self.model, "extra": self.extra,
                "layers": [{"layer": i, "name": li.name, "num_experts": li.num_experts, "top_k": li.top_k}
                           for i, li in enumerate(self.layers)],
                "topk_sample": self.topk_sample, "topk_every": self.topk_every,
                "steps": self.stats.steps, "written_steps": self.stats.written_steps,
                "dropped_steps": self.stats.dropped_steps, "write_errors": self.stats.write_errors,
                "last_error": self.stats.last_error, "host_seconds": round(self.stats.host_seconds, 6),
                "host_us_per_step": self.stats.host_us_per_step,
                "host_split_us_per_step": self.stats.host_split_us_per_step,
                "writer_cpu_seconds": round(self.stats.writer_cpu_seconds, 6), "writer_wakeups": self.stats.wakeups,
                "snapshot": self.snapshot_why,
                **self.meta}
        tmp = self.meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.meta_path)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, flush, stop the thread (bounded wait), and update the sidecar."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._wake.set()
            self._thread.join(timeout)
        if self._file is not None:
            self._flush()
            try:
                self._write_meta()
            except OSError:
                pass
            self._file.close()


def _ext_op(name: str):
    """(torch.ops.moekern.<name>.default, None) when moekern._C has that op, else (None, why)."""
    if _ext.extension_error():
        return None, _ext.extension_error()
    try:
        return getattr(torch.ops.moekern, name).default, None
    except (AttributeError, RuntimeError) as exc:  # a moekern._C built before the op
        return None, f"moekern._C has no {name} ({exc})"


def _format_op():
    """moekern._C's gatelog_format (formats a step's lines with the GIL released), or None."""
    return _ext_op("gatelog_format")[0]


def step_lines(pieces: LinePieces, rows, num_experts, top_ks, samples=None, max_rows: int | None = None) -> bytes:
    """One step's records as newline-terminated UTF-8 lines, in Python: what moekern._C's gatelog_format
    gives for the same arguments. Layer i: counts rows[i][:num_experts[i]], num_tokens their sum // top_ks[i]
    (floor division), and, with `samples` ([L][N][K] ids), the top-k sample: the first top_ks[i] ids of
    each row, rows with an id < 0 (unfilled, or CUDA-graph padding) left out, at most `max_rows` kept (None:
    all; padding rows come last), no key when none is kept."""
    out = []
    for li, (E, k) in enumerate(zip(num_experts, top_ks)):
        counts = rows[li][:E]
        kept = None
        if samples is not None:
            kept = [ids[:k] for ids in samples[li] if min(ids[:k]) >= 0]
            if max_rows is not None:
                kept = kept[:max_rows]
        out.append(format_line(pieces, li, sum(counts) // k, k, counts, kept or None))
    return ("\n".join(out) + "\n").encode("utf-8")


def _global_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:
        pass
    return int(os.environ.get("RANK", "0") or 0)
