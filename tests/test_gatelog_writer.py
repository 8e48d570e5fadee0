"""The plugin's gate-log recorder: exact counts, schema round-trip, flushing, bounded memory (CPU)."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from moekern.gatelog import SCHEMA, read_gate_log
from moekern.gatelog.schema import line_pieces
from moekern.gatelog.writer import GateLogRecorder, step_lines


def _wait_for_lines(path, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            if len(lines) >= n:
                return lines
        time.sleep(0.02)
    return [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


SNAPSHOTS = pytest.mark.parametrize("snapshot", ["auto", "torch"])  # auto: moekern._C's op where built


class _SlowFile:
    """The recorder's file, whose writes wait for `release` (after saying `entered`): a writer stuck on disk."""

    def __init__(self, f, entered, release):
        self.f, self.entered, self.release = f, entered, release

    def write(self, data):
        self.entered.set()
        self.release.wait(10)
        return self.f.write(data)

    def flush(self):
        return self.f.flush()

    def close(self):
        return self.f.close()


def _recorder(tmp_path, **kw):
    rec = GateLogRecorder(tmp_path, rank=3, model="m", **kw)
    rec.register_layer("model.layers.0.mlp.experts", 4, 2)
    rec.register_layer("model.layers.1.mlp.experts", 3, 1)
    rec.ensure_buffer("cpu")
    return rec


@SNAPSHOTS
def test_round_trip_exact_counts_and_schema(tmp_path, snapshot):
    rec = _recorder(tmp_path, snapshot=snapshot)
    g = torch.Generator().manual_seed(0)
    expected = []
    for step in range(5):
        rec.begin_step()
        M = 3 + step
        ids0 = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(M)]).to(torch.int32)
        counts0 = torch.bincount(ids0.flatten().long(), minlength=4).to(torch.int32)
        rec.add_counts(0, counts0)
        ids1 = torch.randint(0, 3, (M, 1), generator=g, dtype=torch.int32)
        rec.add_ids(1, ids1)
        assert rec.end_step("decode" if step % 2 else "prefill", scheduled_tokens=M) == step
        expected.append((counts0.tolist(), torch.bincount(ids1.flatten().long(), minlength=3).tolist(), M))
    rec.close()
    records, skipped = read_gate_log(tmp_path)
    assert skipped == []
    assert len(records) == 10
    by_key = {(r.step, r.layer): r for r in records}
    for step, (c0, c1, M) in enumerate(expected):
        r0, r1 = by_key[(step, 0)], by_key[(step, 1)]
        assert r0.expert_counts == c0 and r1.expert_counts == c1
        assert r0.num_tokens == M and r1.num_tokens == M  # sum(counts) == num_tokens * top_k
        assert sum(r0.expert_counts) == r0.num_tokens * r0.top_k
        assert r0.rank == 3 and r0.model == "m" and r0.extra["scheduled_tokens"] == M
        assert r0.phase == ("decode" if step % 2 else "prefill")
    meta = json.loads((tmp_path / "gate_log.rank3.meta.json").read_text())
    assert meta["schema"] == SCHEMA and meta["steps"] == 5 and meta["dropped_steps"] == 0
    assert [l["name"] for l in meta["layers"]] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


@SNAPSHOTS
def test_steps_are_isolated_and_outside_steps_ignored(tmp_path, snapshot):
    rec = _recorder(tmp_path, snapshot=snapshot)
    rec.add_counts(0, torch.tensor([5, 5, 5, 5], dtype=torch.int32))  # a warm-up forward outside any step
    assert rec.end_step() is None  # no step open: nothing written
    rec.begin_step()  # wipes the warm-up counts
    rec.add_counts(0, torch.tensor([1, 0, 1, 0], dtype=torch.int32))
    rec.end_step("decode", 1)
    rec.begin_step()
    rec.add_counts(0, torch.tensor([0, 2, 0, 0], dtype=torch.int32))
    rec.end_step("decode", 1)
    rec.close()
    records, _ = read_gate_log(tmp_path)
    layer0 = sorted((r for r in records if r.layer == 0), key=lambda r: r.step)
    assert [r.expert_counts for r in layer0] == [[1, 0, 1, 0], [0, 2, 0, 0]]


def test_flush_per_steps_without_close(tmp_path):
    rec = _recorder(tmp_path, flush_steps=1, flush_seconds=3600)
    rec.begin_step()
    rec.add_counts(0, torch.tensor([1, 1, 0, 0], dtype=torch.int32))
    rec.end_step("prefill", 1)
    lines = _wait_for_lines(rec.path, 2)  # visible on disk with the recorder still open
    assert len(lines) == 2
    rec.close()


def test_flush_per_seconds_without_close(tmp_path):
    rec = _recorder(tmp_path, flush_steps=10_000, flush_seconds=0.1)
    for _ in range(3):
        rec.begin_step()
        rec.end_step("decode", 1)
    lines = _wait_for_lines(rec.path, 6)
    assert len(lines) == 6
    rec.close()


@SNAPSHOTS
def test_bounded_queue_drops_and_counts(tmp_path, snapshot):
    rec = GateLogRecorder(tmp_path, rank=0, queue_slots=2, flush_steps=1, snapshot=snapshot)
    rec.register_layer("l0", 2, 1)
    entered, release = threading.Event(), threading.Event()
    rec.ensure_buffer("cpu")
    rec._file = _SlowFile(rec._file, entered, release)  # the writer blocks in its first write (slot freed)
    rec.begin_step(); rec.end_step("decode", 1)  # step 0: the writer takes it and blocks (slot freed)
    assert entered.wait(5)
    for _ in range(4):  # steps 1, 2 fill both slots; 3, 4 are dropped, not waited for
        rec.begin_step(); rec.end_step("decode", 1)
    assert rec.stats.dropped_steps == 2
    release.set()
    rec.close()
    records, _ = read_gate_log(tmp_path)
    assert sorted(r.step for r in records) == [0, 1, 2]  # the gap shows the drops
    split = rec.stats.host_split_us_per_step  # a dropped step's hand-off is charged to "end" as well
    assert set(split) == {"begin", "end"} and all(0 <= v < 1e5 for p in split.values() for v in p.values())
    meta = json.loads(rec.meta_path.read_text())
    assert meta["dropped_steps"] == 2 and meta["steps"] == 5


def test_reader_reports_corrupt_lines(tmp_path):
    rec = _recorder(tmp_path)
    rec.begin_step(); rec.add_counts(0, torch.tensor([1, 1, 0, 0], dtype=torch.int32)); rec.end_step("decode", 1)
    rec.close()
    with open(rec.path, "a") as fh:
        fh.write('{"schema": "moekern.gatelog/1", "step": 1, "layer": 0, "num_tok\n')  # a torn last line
    records, skipped = read_gate_log(tmp_path)
    assert len(records) == 2 and len(skipped) == 1 and skipped[0].line == 3


def test_bad_use_raises(tmp_path):
    rec = GateLogRecorder(tmp_path)
    with pytest.raises(RuntimeError, match="no MoE layer"):
        rec.ensure_buffer("cpu")
    with pytest.raises(ValueError, match="num_experts=0"):
        rec.register_layer("x", 0, 1)
    rec.register_layer("x", 4, 2)
    rec.ensure_buffer("cpu")
    with pytest.raises(RuntimeError, match="after the gate-log buffer"):
        rec.register_layer("y", 4, 2)
    rec.close()
    with pytest.raises(ValueError, match="queue_slots=0"):
        GateLogRecorder(tmp_path, queue_slots=0)


@SNAPSHOTS
def test_topk_sample_rate_limited_and_exact(tmp_path, snapshot):
    """MOEKERN_GATE_LOG_TOPK_SAMPLE: the first min(N, M) rows' ids per layer, every `topk_every` steps,
    padding rows (beyond scheduled_tokens) left out; the counts are unchanged by sampling."""
    rec = _recorder(tmp_path, topk_sample=3, topk_every=2, snapshot=snapshot)
    assert rec.sample.shape == (2, 3, 2) and rec._host_sample.shape == (rec.queue_slots, 2, 3, 2)
    g = torch.Generator().manual_seed(1)
    sent = []
    for step, (M, sched) in enumerate([(5, 5), (4, 4), (2, 2), (6, 6), (4, 3)]):
        rec.begin_step()
        ids0 = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(M)]).to(torch.int32)
        ids1 = torch.randint(0, 3, (M, 1), generator=g, dtype=torch.int64)  # vLLM's ids may be int64
        rec.add_counts(0, torch.bincount(ids0.flatten().long(), minlength=4).to(torch.int32))
        rec.add_topk_sample(0, ids0)
        rec.add_ids(1, ids1)
        rec.add_topk_sample(1, ids1)
        rec.end_step("decode", scheduled_tokens=sched)
        sent.append((ids0, ids1, sched))
    rec.close()
    records, skipped = read_gate_log(tmp_path)
    assert skipped == [] and len(records) == 10
    by_key = {(r.step, r.layer): r for r in records}
    for step, (ids0, ids1, sched) in enumerate(sent):
        r0, r1 = by_key[(step, 0)], by_key[(step, 1)]
        assert r0.expert_counts == torch.bincount(ids0.flatten().long(), minlength=4).tolist()
        if step % 2:
            assert r0.topk_sample is None and r1.topk_sample is None
            continue
        n = min(3, ids0.shape[0], sched)
        assert r0.topk_sample == ids0[:n].tolist() and r1.topk_sample == ids1[:n].tolist()
    assert len(by_key[(2, 0)].topk_sample) == 2  # M=2 < N: the unwritten row (-1) is not reported
    assert len(by_key[(4, 0)].topk_sample) == 3  # M=4 rows, 3 scheduled: the padding row is dropped
    meta = json.loads(rec.meta_path.read_text())
    assert meta["topk_sample"] == 3 and meta["topk_every"] == 2


def test_topk_sample_off_by_default_and_feeds_the_study(tmp_path):
    rec = _recorder(tmp_path / "off")
    assert rec.sample is None
    rec.begin_step()
    rec.add_topk_sample(0, torch.zeros(4, 2, dtype=torch.int32))  # a no-op when off
    rec.end_step("decode", 4)
    rec.close()
    records, _ = read_gate_log(tmp_path / "off")
    assert all(r.topk_sample is None for r in records)
    assert "topk_sample" not in rec.path.read_text()

    from moekern.analysis.imbalance.coactivation import load_coactivation

    rec = _recorder(tmp_path / "on", topk_sample=8)
    ids = torch.tensor([[0, 1], [0, 1], [2, 3]], dtype=torch.int32)
    rec.begin_step()
    rec.add_counts(0, torch.bincount(ids.flatten().long(), minlength=4).to(torch.int32))
    rec.add_topk_sample(0, ids)
    rec.end_step("decode", 3)
    rec.close()
    data = load_coactivation(tmp_path / "on")
    c = data.coact[0]
    assert (c[0, 1], c[1, 0], c[2, 3], c[0, 2], c[1, 3]) == (2, 2, 1, 0, 0)  # pairs routed together
    with pytest.raises(ValueError, match="topk_sample=-1"):
        GateLogRecorder(tmp_path, topk_sample=-1)
    with pytest.raises(ValueError, match="topk_every=0"):
        GateLogRecorder(tmp_path, topk_sample=4, topk_every=0)


def test_reader_reads_gzipped_logs_and_reports_a_truncated_one(tmp_path):
    """Archived logs (gate_log*.jsonl.gz, how committed results keep them small) read like the plain ones;
    a .gz cut off mid-stream keeps its readable records and reports the rest as skipped."""
    import gzip

    rec = _recorder(tmp_path / "plain")
    for step in range(40):
        rec.begin_step(); rec.add_counts(0, torch.tensor([step, 1, step, 1], dtype=torch.int32))
        rec.add_counts(1, torch.tensor([1, step, 0], dtype=torch.int32)); rec.end_step("decode", step + 3)
    rec.close()
    plain, _ = read_gate_log(tmp_path / "plain")
    data = rec.path.read_bytes()
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "gate_log.rank3.jsonl.gz").write_bytes(gzip.compress(data))
    got, skipped = read_gate_log(tmp_path / "gz")
    assert [r.to_json() for r in got] == [r.to_json() for r in plain] and not skipped
    (tmp_path / "cut").mkdir()
    whole = gzip.compress(data)
    (tmp_path / "cut" / "gate_log.rank3.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    got, skipped = read_gate_log(tmp_path / "cut")
    assert 0 < len(got) < len(plain) and [r.to_json() for r in got] == [r.to_json() for r in plain[: len(got)]]
    assert len(skipped) >= 1 and "unreadable from here on" in skipped[-1].reason


# ---- the serialized lines: the writer's Python path against an independent reference, C++ against Python ----
def _reference_step(step, rank, phase, time_, model, extra, rows, layers, samples, max_rows):
    """What a step's lines must be, built apart from moekern.gatelog: one dict per layer, json.dumps'd, keys in
    the schema's order; the top-k sample keeps each row's first k ids, drops rows with any id < 0, keeps at
    most max_rows (None: all) and is left out when empty."""
    lines = []
    for li, (E, k) in enumerate(layers):
        counts = [int(c) for c in rows[li][:E]]
        obj = {"schema": "moekern.gatelog/1", "step": step, "layer": li, "rank": rank,
               "num_tokens": sum(counts) // k, "phase": phase, "top_k": k, "expert_counts": counts}
        if time_ is not None:
            obj["time"] = time_
        if model is not None:
            obj["model"] = model
        if samples is not None:
            kept = []
            for ids in samples[li]:
                ids = list(ids[:k])
                if all(i >= 0 for i in ids) and (max_rows is None or len(kept) < max_rows):
                    kept.append(ids)
            if kept:
                obj["topk_sample"] = kept
        if extra:
            obj["extra"] = extra
        lines.append(json.dumps(obj, separators=(",", ":")) + "\n")
    return "".join(lines).encode("utf-8")


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)  # JSON-escaped characters too


@st.composite
def _steps(draw, counts=st.integers(0, 10 ** 6)):
    """A step as the writer formats it: shared fields, per-layer (num_experts, top_k), the slot's rows, and an
    optional [L, N, K] top-k sample with unfilled/padding rows (ids < 0) and more rows than scheduled."""
    layers = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 4)), min_size=1, max_size=4))
    W = max(E for E, _ in layers)
    rows = [draw(st.lists(counts, min_size=W, max_size=W)) for _ in layers]
    samples = None
    if draw(st.booleans()):
        K = max(k for _, k in layers) + draw(st.integers(0, 1))
        N = draw(st.integers(0, 5))
        ids = st.integers(-2, 2 ** 31 - 1) | st.integers(-1, 3)
        samples = [[draw(st.lists(ids, min_size=K, max_size=K)) for _ in range(N)] for _ in layers]
    return dict(step=draw(st.integers(0, 2 ** 62)), rank=draw(st.sampled_from([0, 3, 7])),
                phase=draw(st.sampled_from(["decode", "prefill", "mixed"]) | _TEXT),
                time_=draw(st.none() | st.floats(0, 2e9, allow_nan=False)), model=draw(st.none() | _TEXT),
                extra=draw(st.sampled_from([{}, {"tp_rank": 1}, {"note": "é\"x", "scheduled_tokens": 3}])),
                rows=rows, layers=layers, samples=samples, max_rows=draw(st.none() | st.integers(0, 5)))


def _python_step(c):
    pieces = line_pieces(c["step"], rank=c["rank"], phase=c["phase"], time=c["time_"], model=c["model"],
                         extra=c["extra"])
    return step_lines(pieces, c["rows"], [E for E, _ in c["layers"]], [k for _, k in c["layers"]], c["samples"],
                      c["max_rows"])


def _cpp_step(fmt, c):
    pieces = line_pieces(c["step"], rank=c["rank"], phase=c["phase"], time=c["time_"], model=c["model"],
                         extra=c["extra"])
    L = len(c["layers"])
    sample = None
    if c["samples"] is not None:
        N, K = len(c["samples"][0]), max(k for _, k in c["layers"])
        K = len(c["samples"][0][0]) if N else K
        sample = torch.tensor(c["samples"], dtype=torch.int32).reshape(L, N, K)
    out = fmt(torch.tensor(c["rows"], dtype=torch.int32), [E for E, _ in c["layers"]], [k for _, k in c["layers"]],
              pieces.head, pieces.mid, pieces.phase, pieces.tail, pieces.model, pieces.extra, sample,
              -1 if c["max_rows"] is None else c["max_rows"])
    return out.numpy().tobytes()


def _cpp_format():
    pytest.importorskip("moekern._C")
    from moekern.gatelog.writer import _format_op

    try:  # whether the op exists is asked of torch directly: _format_op() is what is being judged
        torch.ops.moekern.gatelog_format.default
    except (AttributeError, RuntimeError):
        pytest.skip("moekern._C without gatelog_format")
    fmt = _format_op()
    assert fmt is not None, "moekern._C has gatelog_format, but _format_op() did not find it"
    return fmt


@settings(max_examples=200, deadline=None)
@given(case=_steps())
def test_python_step_lines_equal_an_independent_reference(case):
    """The writer's Python path (the schema's serializer, format_line) writes what json.dumps of the record's
    dict writes: key order, JSON escapes in phase/model/extra, time, the filtered top-k sample."""
    assert _python_step(case) == _reference_step(**case)


@settings(max_examples=300, deadline=None)
@given(case=_steps(counts=st.integers(-2 ** 31, 2 ** 31 - 1) | st.integers(-5, 5)))
def test_cpp_formatter_equals_the_python_serializer(case):
    """moekern._C's gatelog_format (the writer's path, GIL released) gives byte for byte the Python lines: any
    JSON text around the counts, int32 extremes, negative sums (floor division), and a top-k sample with
    unfilled or padding rows (any id < 0), more rows than the step scheduled, no row kept."""
    fmt = _cpp_format()
    assert _cpp_step(fmt, case) == _python_step(case)


@pytest.mark.parametrize("counts,k,tokens", [([-3, 0], 2, -2), ([-4, 0], 2, -2), ([3, 0], 2, 1), ([-1], 3, -1),
                                             ([2 ** 31 - 1] * 3, 1, 3 * (2 ** 31 - 1)),
                                             ([-2 ** 31] * 2, 3, -(2 ** 32) // 3)])
def test_cpp_formatter_floor_divides_like_python(counts, k, tokens):
    """num_tokens = sum(counts) // top_k, Python's floor division, for negative and int32-extreme sums (a slot
    read back is not trusted to hold counts)."""
    fmt = _cpp_format()
    p = line_pieces(0)
    got = fmt(torch.tensor([counts], dtype=torch.int32), [len(counts)], [k], p.head, p.mid, p.phase, p.tail,
              p.model, p.extra).numpy().tobytes()
    assert f',"num_tokens":{tokens},'.encode() in got


def test_cpp_formatter_rejects_bad_input():
    fmt = _cpp_format()
    c = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="2 rows but 1 num_experts"):
        fmt(c, [3], [1, 1], "", "", "", "", "", "")
    with pytest.raises(RuntimeError, match="num_experts=4"):
        fmt(c, [3, 4], [1, 1], "", "", "", "", "", "")
    with pytest.raises(RuntimeError, match="top_k=0"):
        fmt(c, [3, 3], [1, 0], "", "", "", "", "", "")
    with pytest.raises(RuntimeError, match="int32"):
        fmt(c.long(), [3, 3], [1, 1], "", "", "", "", "", "")
    with pytest.raises(RuntimeError, match=r"sample must be a \[2, N, K\] int32"):
        fmt(c, [3, 3], [1, 1], "", "", "", "", "", "", torch.zeros(1, 2, 1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="top_k=2 > the sample's 1 ids"):
        fmt(c, [3, 3], [1, 2], "", "", "", "", "", "", torch.zeros(2, 2, 1, dtype=torch.int32))


def _other_thread_runs_during(call, max_calls):
    """Whether another Python thread gets the GIL while `call()` runs (called up to `max_calls` times, until it
    has). The switch interval is set so long that a thread waiting for the GIL never forces a switch: the
    other thread can only run when `call` itself releases the GIL. No timing is compared."""
    ran = []
    gate = threading.Lock()
    gate.acquire()

    def other():
        with gate:  # blocks, GIL released, until the main thread opens the gate
            pass
        ran.append(True)  # needs the GIL

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)  # before the thread exists: its every wait for the GIL uses this interval
    th = threading.Thread(target=other, daemon=True)
    try:
        th.start()
        gate.release()  # from here the other thread waits for the GIL
        for _ in range(max_calls):
            call()
            if ran:
                break
        return bool(ran)
    finally:
        sys.setswitchinterval(interval)
        th.join(10)


def test_writer_formats_without_holding_the_gil():
    """What the C++ formatter is for: while it formats a step, another Python thread (the model's) can run;
    while Python's step_lines formats the same step, it cannot."""
    fmt = _cpp_format()
    L, E, k = 64, 256, 8
    counts = torch.randint(0, 1000, (L, E), dtype=torch.int32)
    p = line_pieces(1, phase="decode", time=1.5, extra={"scheduled_tokens": 1})
    rows = counts.tolist()
    assert not _other_thread_runs_during(lambda: step_lines(p, rows, [E] * L, [k] * L), max_calls=3)
    assert _other_thread_runs_during(
        lambda: fmt(counts, [E] * L, [k] * L, p.head, p.mid, p.phase, p.tail, p.model, p.extra), max_calls=100_000)


@SNAPSHOTS
def test_writer_formats_in_cpp_when_built_else_in_python(tmp_path, monkeypatch, snapshot):
    """The writer thread formats every step with moekern._C's gatelog_format when the op exists (Python's
    step_lines is never called) and with step_lines, once per step, when it does not; the files are equal."""
    import moekern.gatelog.writer as writer

    _cpp_format()
    python_calls = []
    real = writer.step_lines

    def counted(*a, **kw):
        python_calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(writer, "step_lines", counted)

    def run(out, with_op):
        if not with_op:
            monkeypatch.setattr(writer, "_format_op", lambda: None)
        rec = _recorder(out, snapshot=snapshot, topk_sample=2)
        for step in range(5):
            rec.begin_step()
            ids = torch.tensor([[0, 1], [2, 3], [1, 3]][: step % 3 + 1], dtype=torch.int32)
            rec.add_counts(0, torch.bincount(ids.flatten().long(), minlength=4).to(torch.int32))
            rec.add_topk_sample(0, ids)
            rec.end_step("decode", scheduled_tokens=step % 3 + 1)
        rec.close()
        return [json.loads(ln) for ln in rec.path.read_text().splitlines()]

    with_op = run(tmp_path / "cpp", True)
    assert python_calls == []
    without_op = run(tmp_path / "py", False)
    assert len(python_calls) == 5
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert drop_time(with_op) == drop_time(without_op) and len(with_op) == 10


def test_end_step_rejects_negative_scheduled_tokens(tmp_path):
    """scheduled_tokens caps the top-k sample's rows: a negative count is a caller's bug, not 'no rows'."""
    rec = _recorder(tmp_path, topk_sample=2)
    rec.begin_step()
    with pytest.raises(ValueError, match=r"scheduled_tokens=-1 must be >= 0"):
        rec.end_step("decode", scheduled_tokens=-1)
    assert rec.in_step and rec.stats.steps == 0  # the step is still open: nothing was handed over
    assert rec.end_step("decode", scheduled_tokens=0) == 0
    rec.close()
    records, skipped = read_gate_log(tmp_path)
    assert skipped == [] and len(records) == 2 and all(r.topk_sample is None for r in records)
    assert all(r.extra["scheduled_tokens"] == 0 for r in records)


def test_writer_wakes_per_batch_not_per_step(tmp_path):
    """The model's thread hands steps over without waking the writer each time: with flush_steps=8 the
    writer wakes about once per 8 steps (GIL hand-offs), and every step still lands, in order."""
    rec = _recorder(tmp_path, flush_steps=8, flush_seconds=3600)
    for step in range(64):
        rec.begin_step()
        rec.add_counts(0, torch.tensor([step, step, 0, 0], dtype=torch.int32))  # sum = num_tokens * top_k
        rec.end_step("decode", 1)
    lines = _wait_for_lines(rec.path, 2 * (64 - 7))
    assert len(lines) >= 2 * (64 - 7)  # without close, at most flush_steps - 1 steps wait unwritten
    wakeups = rec.stats.wakeups
    rec.close()
    assert 1 <= wakeups <= 64 // 4  # about one per 8 steps (a wake-up during a drain can add one), not 64
    records, _ = read_gate_log(tmp_path)
    assert [r.expert_counts[0] for r in sorted(records, key=lambda r: r.step) if r.layer == 0] == list(range(64))
    meta = json.loads(rec.meta_path.read_text())
    assert meta["steps"] == 64 and meta["host_seconds"] > 0 and meta["host_us_per_step"] > 0
    assert meta["writer_wakeups"] >= wakeups and meta["writer_cpu_seconds"] >= 0


def test_host_time_counts_the_callers_share_by_part(tmp_path):
    rec = _recorder(tmp_path)
    rec.add_host_time(0.5, 0.25)  # e.g. the hook's phase classification: wall, CPU
    rec.begin_step(); rec.end_step("decode", 1)
    assert rec.stats.host_seconds >= 0.5 and rec.stats.host_us_per_step >= 0.5e6
    split = rec.stats.host_split_us_per_step
    assert set(split) == {"phase", "begin", "end"}
    assert split["phase"] == {"wall": 0.5e6, "cpu": 0.25e6}
    assert all(v["wall"] >= 0 and v["cpu"] >= 0 for v in split.values())
    rec.close()
    meta = json.loads(rec.meta_path.read_text())
    assert meta["host_split_us_per_step"]["phase"] == {"wall": 0.5e6, "cpu": 0.25e6}


def test_sidecar_kept_current_without_close(tmp_path, monkeypatch):
    """The engine's process may end without exit handlers: the writer rewrites the sidecar as it goes."""
    monkeypatch.setattr(GateLogRecorder, "META_EVERY_S", 0.0)
    rec = _recorder(tmp_path, flush_steps=1)
    for _ in range(3):
        rec.begin_step(); rec.end_step("decode", 1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        meta = json.loads(rec.meta_path.read_text())
        if meta["written_steps"] == 3:
            break
        time.sleep(0.02)
    assert meta["steps"] == 3 and meta["written_steps"] == 3 and meta["host_us_per_step"] > 0
    rec.close()


@pytest.mark.gpu
@pytest.mark.parametrize("snapshot", ["kernel", "torch"])
def test_cuda_recorder_round_trip(tmp_path, snapshot):
    """On CUDA: pinned ring; moekern's one-kernel hand-off (marks) or torch copies + blocking-sync events,
    drained by the batched writer; the counts made on the device come back exact, including steps recorded
    inside a CUDA graph, and a forward outside a step never leaks into the next step."""
    rec = GateLogRecorder(tmp_path, rank=0, flush_steps=4, snapshot=snapshot)
    rec.register_layer("l0", 8, 2)
    rec.ensure_buffer("cuda")
    assert rec._host.is_pinned()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 8, (64, 2), device="cuda", generator=g, dtype=torch.int32)
    counts = torch.bincount(ids.flatten().long(), minlength=8).to(torch.int32)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rec.add_counts(0, counts)  # warm-up outside a step: wiped by the next begin_step
        with torch.cuda.graph(graph, stream=stream):
            rec.add_counts(0, counts)
    torch.cuda.current_stream().wait_stream(stream)
    for step in range(10):
        rec.begin_step()
        for _ in range(step % 3 + 1):
            graph.replay()
        rec.end_step("decode", 64)
        if step == 4:
            rec.add_counts(0, counts)  # an eager forward between steps: not step 5's
    assert ("kernel" in rec.snapshot_why) == (snapshot == "kernel")
    rec.close()
    records, skipped = read_gate_log(tmp_path)
    assert skipped == [] and len(records) == 10
    for r in sorted(records, key=lambda r: r.step):
        assert r.expert_counts == (counts * (r.step % 3 + 1)).tolist()
    assert rec.stats.dropped_steps == 0 and rec.stats.host_us_per_step > 0


@SNAPSHOTS
def test_dropped_step_and_between_step_forwards_never_leak(tmp_path, snapshot):
    """Counts reset at each step's end; a dropped step (no free slot) or a forward between steps leaves the
    buffer dirty, and the next begin_step() wipes it."""
    rec = GateLogRecorder(tmp_path, rank=0, queue_slots=1, flush_steps=1, snapshot=snapshot)
    rec.register_layer("l0", 2, 1)
    entered, release = threading.Event(), threading.Event()
    rec.ensure_buffer("cpu")
    rec._file = _SlowFile(rec._file, entered, release)  # the writer blocks in its first write (slot freed)
    one = torch.tensor([1, 0], dtype=torch.int32)
    rec.begin_step(); rec.add_counts(0, one); rec.end_step("decode", 1)  # step 0: the writer holds it
    assert entered.wait(5)
    rec.begin_step(); rec.add_counts(0, one * 5); rec.end_step("decode", 1)  # step 1 takes the slot
    rec.begin_step(); rec.add_counts(0, one * 7); rec.end_step("decode", 1)  # step 2: no slot, dropped
    assert rec.stats.dropped_steps == 1
    release.set()

    def written(n):  # one slot: wait for the writer to free it
        deadline = time.monotonic() + 5
        while rec.stats.written_steps < n and time.monotonic() < deadline:
            time.sleep(0.01)

    written(2)
    rec.begin_step(); rec.add_counts(0, torch.tensor([0, 2], dtype=torch.int32)); rec.end_step("decode", 2)
    written(3)
    rec.add_counts(0, one * 11)  # a forward between steps
    rec.begin_step(); rec.add_counts(0, torch.tensor([3, 0], dtype=torch.int32)); rec.end_step("decode", 3)
    rec.close()
    records, _ = read_gate_log(tmp_path)
    got = {r.step: r.expert_counts for r in records}
    assert got == {0: [1, 0], 1: [5, 0], 3: [0, 2], 4: [3, 0]}


def test_snapshot_kernel_required_but_missing_raises(tmp_path, monkeypatch):
    rec = GateLogRecorder(tmp_path, rank=0, snapshot="kernel")
    rec.register_layer("l0", 2, 1)
    monkeypatch.setattr(torch.ops.moekern, "gatelog_snapshot", None, raising=False)
    with pytest.raises(RuntimeError, match="MOEKERN_GATE_LOG_SNAPSHOT=kernel"):
        rec.ensure_buffer("cpu")
    with pytest.raises(ValueError, match="snapshot='fast'"):
        GateLogRecorder(tmp_path, snapshot="fast")


def test_snapshot_op_cpu_semantics():
    """moekern._C's gatelog_snapshot on CPU tensors: copy, reset (counts 0, sample -1), publish the mark."""
    pytest.importorskip("moekern._C")
    counts = torch.arange(6, dtype=torch.int32).view(2, 3)
    host = torch.zeros(2, 3, dtype=torch.int32)
    mark = torch.tensor(-1, dtype=torch.int64)
    sample = torch.arange(8, dtype=torch.int32).view(1, 4, 2)
    host_sample = torch.zeros(1, 4, 2, dtype=torch.int32)
    torch.ops.moekern.gatelog_snapshot(counts, host, mark, 12, sample, host_sample)
    assert host.tolist() == [[0, 1, 2], [3, 4, 5]] and counts.eq(0).all() and int(mark) == 12
    assert host_sample.flatten().tolist() == list(range(8)) and sample.eq(-1).all()
    sample.fill_(3)
    torch.ops.moekern.gatelog_snapshot(counts, host, mark, 13, sample, None)  # no host_sample: reset only
    assert sample.eq(-1).all() and host_sample.flatten().tolist() == list(range(8)) and int(mark) == 13
    with pytest.raises(RuntimeError, match="equal numel"):
        torch.ops.moekern.gatelog_snapshot(counts, torch.zeros(5, dtype=torch.int32), mark, 1, None, None)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.moekern.gatelog_snapshot(counts, host, torch.zeros(1, dtype=torch.int32), 1, None, None)
    assert torch.ops.moekern.gatelog_host_mapped(host) is False  # plain (unpinned) memory


def test_paused_recorder_writes_nothing_and_resumes_clean(tmp_path):
    rec = _recorder(tmp_path)
    rec.begin_step(); rec.add_counts(0, torch.tensor([1, 1, 0, 0], dtype=torch.int32)); rec.end_step("decode", 1)
    rec.set_paused(True)
    assert rec.paused
    rec.add_counts(0, torch.tensor([0, 9, 0, 0], dtype=torch.int32))  # in-graph adds keep running while paused
    rec.set_paused(False)
    rec.begin_step(); rec.add_counts(0, torch.tensor([0, 0, 2, 0], dtype=torch.int32)); rec.end_step("decode", 1)
    rec.begin_step()
    with pytest.raises(RuntimeError, match="inside a step"):
        rec.set_paused(True)
    rec.end_step("decode", 1)
    rec.close()
    records, _ = read_gate_log(tmp_path)
    assert [r.expert_counts for r in sorted(records, key=lambda r: r.step) if r.layer == 0] == [
        [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]


def test_handoff_benchmark_runs_both_modes_exactly(tmp_path):
    """benchmarks/bench_gatelog.py on CPU tensors: both hand-offs, every record exact, JSON written."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gatelog.py"
    spec = importlib.util.spec_from_file_location("gatelog_handoff", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if "kernel" not in GateLogRecorder(tmp_path / "probe", snapshot="auto")._pick_snapshot(torch.device("cpu"))[1]:
        pytest.skip("moekern._C without gatelog_snapshot")
    out_json = tmp_path / "h.json"
    assert mod.main(["--cpu", "--steps", "40", "--block", "10", "--topk-sample", "2", "--format-reps", "3",
                     "--json", str(out_json)]) == 0
    out = json.loads(out_json.read_text())
    assert set(out["modes"]) == {"kernel", "torch"} and out["steps_per_mode"] == 40
    assert all(m["records_exact"] and m["steps"] == 40 for m in out["modes"].values())
    assert "kernel" in out["hand_off"]["kernel"] and "torch" in out["hand_off"]["torch"]
    assert out["format_us_per_step"]["same_bytes"] is True  # the timed formatting paths agree (times not checked)
    with pytest.raises(SystemExit):
        mod.main(["--top-k", "9"])


# ------------------------------------------------------------------------- bookkeeping, sidecar, errors
def test_charge_adds_per_part():
    from moekern.gatelog.writer import RecorderStats

    s = RecorderStats(steps=2)
    s.charge("begin", 1.0, 0.5)
    s.charge("begin", 0.25, 0.125)
    s.charge("end", 2.0, 1.0)
    assert s.host == {"begin": [1.25, 0.625], "end": [2.0, 1.0]} and s.host_seconds == 3.25
    # per step, in microseconds: (1.25 + 2.0) / 2 s; parts split into wall and CPU
    assert s.host_us_per_step == 1625000.0
    assert s.host_split_us_per_step == {"begin": {"wall": 625000.0, "cpu": 312500.0},
                                        "end": {"wall": 1000000.0, "cpu": 500000.0}}


def test_host_time_is_the_hooks_own_and_phase_cpu_defaults_to_zero(tmp_path):
    rec = _recorder(tmp_path)
    rec.add_host_time(0.25)
    assert rec.stats.host["phase"] == [0.25, 0.0]
    for _ in range(3):
        rec.begin_step()
        rec.end_step()
    rec.close()
    split = rec.stats.host_split_us_per_step
    # begin and end cost microseconds each on CPU; a second per step would be a start time added, not subtracted
    for part in ("begin", "end"):
        assert 0 <= split[part]["wall"] < 1e5 and 0 <= split[part]["cpu"] < 1e5, split


def _sidecar_text(rec):
    return rec.meta_path.read_text()


@SNAPSHOTS
def test_sidecar_names_every_field(tmp_path, snapshot):
    from moekern import _ext

    rec = GateLogRecorder(tmp_path / "a" / "b", rank=0, model="m", extra={"tp": 2}, meta={"run": "x"},
                          snapshot=snapshot)  # a folder that does not exist yet, two levels deep
    rec.register_layer("l0", 4, 2)
    rec.register_layer("l1", 3, 1)
    rec.ensure_buffer("cpu")
    for _ in range(2):
        rec.begin_step()
        rec.end_step()
    rec.close()
    assert (rec.stats.records, rec.stats.written_steps) == (4, 2)
    text = _sidecar_text(rec)
    assert text.startswith('{\n "schema": ')  # indent=1: one space per level
    meta = json.loads(text)
    if snapshot == "torch":
        want_snapshot = "torch calls (MOEKERN_GATE_LOG_SNAPSHOT=torch)"
    elif _ext.extension_error() is None:
        want_snapshot = "moekern gatelog_snapshot kernel"  # moekern._C's op runs on CPU tensors too
    else:
        want_snapshot = f"torch calls: {_ext.extension_error()}"
    fixed = {"schema": SCHEMA, "rank": 0, "model": "m", "extra": {"tp": 2},
             "layers": [{"layer": 0, "name": "l0", "num_experts": 4, "top_k": 2},
                        {"layer": 1, "name": "l1", "num_experts": 3, "top_k": 1}],
             "topk_sample": 0, "topk_every": 1, "steps": 2, "written_steps": 2, "dropped_steps": 0,
             "write_errors": 0, "last_error": None, "snapshot": want_snapshot, "run": "x"}
    assert {k: meta[k] for k in fixed} == fixed
    timed = {"host_seconds", "host_us_per_step", "host_split_us_per_step", "writer_cpu_seconds", "writer_wakeups"}
    assert set(meta) == set(fixed) | timed
    for key in ("host_seconds", "writer_cpu_seconds"):
        assert isinstance(meta[key], float) and 0 <= meta[key] < 5 and meta[key] == round(meta[key], 6), key
    assert meta["writer_wakeups"] >= 1
    records, _ = read_gate_log(rec.path)
    assert {r.rank for r in records} == {0}  # rank 0 stays 0 in the records
    assert {r.phase for r in records} == {"unknown"}  # end_step()'s default phase
    now = time.time()
    for r in records:  # the drain time, to the microsecond
        assert now - 60 < r.time <= now and r.time == round(r.time, 6) and r.time != int(r.time)


class _FailingFile:
    def __init__(self, write_error=None, flush_error=None):
        self.write_error, self.flush_error, self.closed = write_error, flush_error, False

    def write(self, data):
        if self.write_error:
            raise self.write_error
        return len(data)

    def flush(self):
        if self.flush_error:
            raise self.flush_error

    def close(self):
        self.closed = True


def _one_step_then_close(rec):
    rec.begin_step()
    rec.end_step()
    rec.close()


def test_write_and_flush_errors_are_counted_and_named(tmp_path):
    # the write fails (nothing written, so no flush in the writer), then close()'s flush fails: two errors
    rec = _recorder(tmp_path / "w", flush_steps=1)
    rec._file = _FailingFile(OSError("disk full"), OSError("flush failed"))
    _one_step_then_close(rec)
    assert (rec.stats.write_errors, rec.stats.last_error) == (2, "OSError('flush failed')")
    assert (rec.stats.written_steps, rec.stats.records) == (0, 0)
    meta = json.loads(rec.meta_path.read_text())
    assert (meta["write_errors"], meta["last_error"]) == (2, "OSError('flush failed')")
    # only the writes fail, two steps: two errors, the last one named
    rec = _recorder(tmp_path / "w2", flush_steps=1)
    rec._file = _FailingFile(OSError("disk full"), None)
    for _ in range(2):
        rec.begin_step()
        rec.end_step()
    rec.close()
    assert (rec.stats.write_errors, rec.stats.last_error) == (2, "OSError('disk full')")
    # the write works, the flush fails: once in the writer (something was written), once in close()
    rec = _recorder(tmp_path / "f", flush_steps=1)
    rec._file = _FailingFile(None, OSError("flush failed"))
    _one_step_then_close(rec)
    assert (rec.stats.write_errors, rec.stats.written_steps, rec.stats.records) == (2, 1, 2)
    # formatting fails: counted and named, the slot handed back (one slot, and the next step is not dropped)
    rec = _recorder(tmp_path / "s", flush_steps=1, queue_slots=1)
    rec._file = _FailingFile(None, OSError("flush failed"))

    def bad_slot(item):
        raise ValueError("bad slot")

    rec._step_bytes = bad_slot
    rec.begin_step()
    rec.end_step()
    deadline = time.monotonic() + 5
    while rec.stats.write_errors < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert (rec.stats.write_errors, rec.stats.last_error) == (1, "ValueError('bad slot')")
    time.sleep(0.05)  # the writer would flush now if the failed step had counted as written
    assert rec.stats.write_errors == 1
    rec.begin_step()
    rec.end_step()
    assert rec.stats.dropped_steps == 0
    rec.close()
    assert rec.stats.write_errors == 3 and rec.stats.written_steps == 0  # the second step, close()'s flush


def test_sidecar_rewrites_are_rate_limited_and_their_errors_counted(tmp_path):
    calls = []
    rec = _recorder(tmp_path / "slow", flush_steps=1)  # META_EVERY_S = 5: no rewrite within a quick run
    real = rec._write_meta
    rec._write_meta = lambda: (calls.append(1), real())[1]
    for _ in range(3):
        rec.begin_step()
        rec.end_step()
    _wait_for_lines(rec.path, 6)
    assert calls == []
    rec.close()
    assert calls == [1]  # close() writes it once
    # every wake-up that wrote a step rewrites it when due; a failing rewrite is counted, the thread lives on
    rec = _recorder(tmp_path / "due", flush_steps=1)
    rec.META_EVERY_S = 0.0

    def failing_meta():
        raise OSError("sidecar")  # close() passes over an OSError of its own rewrite; the thread counts it

    rec._write_meta = failing_meta
    for n in (1, 2):
        rec.begin_step()
        rec.end_step()
        lines = _wait_for_lines(rec.path, 2 * n)
        assert len(lines) == 2 * n
        deadline = time.monotonic() + 5
        while rec.stats.write_errors < n and time.monotonic() < deadline:
            time.sleep(0.005)
    time.sleep(0.05)
    assert (rec.stats.write_errors, rec.stats.last_error) == (2, "OSError('sidecar')")
    rec.close()
    assert rec.stats.write_errors == 2  # close()'s wake-up wrote nothing: no rewrite from the thread


@pytest.mark.parametrize("env,want", [(None, 0), ("", 0), ("5", 5)])
def test_rank_from_the_environment_without_a_process_group(tmp_path, monkeypatch, env, want):
    if env is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", env)
    rec = GateLogRecorder(tmp_path)
    rec.register_layer("l0", 2, 1)
    rec.ensure_buffer("cpu")
    rec.close()
    assert rec.rank == want and rec.path.name == f"gate_log.rank{want}.jsonl"


def test_defaults_wake_per_64_steps_and_sample_every_step(tmp_path):
    rec = GateLogRecorder(tmp_path, topk_sample=2)
    assert (rec.flush_steps, rec.flush_seconds, rec.queue_slots, rec.topk_every) == (64, 1.0, 256, 1)
    assert rec.paused is False
    assert rec.register_layer("l0", 4, 2) == 0 and rec.register_layer("one expert", 1, 1) == 1
    rec.ensure_buffer("cpu")
    for _ in range(2):
        rec.begin_step()
        rec.add_topk_sample(0, torch.tensor([[1, 2]], dtype=torch.int32))
        rec.end_step("decode", 1)
    rec.close()
    records, _ = read_gate_log(tmp_path)
    assert [r.topk_sample for r in records if r.layer == 0] == [[[1, 2]], [[1, 2]]]


@pytest.mark.parametrize("python_format", [False, True])
def test_sample_rows_capped_by_scheduled_tokens_or_all_when_unknown(tmp_path, monkeypatch, python_format):
    import moekern.gatelog.writer as writer

    if python_format:
        monkeypatch.setattr(writer, "_format_op", lambda: None)
    rec = _recorder(tmp_path, topk_sample=4)
    ids = torch.tensor([[0, 1], [2, 3], [1, 3]], dtype=torch.int32)
    for sched in (None, 2):
        rec.begin_step()
        rec.add_topk_sample(0, ids)
        rec.end_step("decode", sched)
    rec.close()
    records, _ = read_gate_log(tmp_path)
    layer0 = sorted((r for r in records if r.layer == 0), key=lambda r: r.step)
    assert [len(r.topk_sample) for r in layer0] == [3, 2]  # unknown: every written row; else the first 2


def test_step_lines_caps_sample_rows():
    pieces = line_pieces(0)
    one = step_lines(pieces, [[1, 1]], [2], [1], samples=[[[0], [1], [-1]]], max_rows=1)
    every = step_lines(pieces, [[1, 1]], [2], [1], samples=[[[0], [1], [-1]]])
    assert json.loads(one)["topk_sample"] == [[0]] and json.loads(every)["topk_sample"] == [[0], [1]]


def test_marked_dirty_buffer_is_zeroed_before_the_next_step(tmp_path):
    # counts added by something outside a step (reported by the hooks with mark_dirty) are wiped
    rec = _recorder(tmp_path)
    rec.begin_step()
    rec.end_step()
    rec.counts[0, 0] += 7  # as a forward outside a step would, without add_counts noticing
    rec.mark_dirty()
    rec.begin_step()
    rec.add_counts(0, torch.tensor([0, 1, 1, 0], dtype=torch.int32))  # one token, top_k 2
    rec.end_step()
    rec.close()
    records, skipped = read_gate_log(tmp_path)
    assert skipped == [] and [r.expert_counts for r in records if r.layer == 0 and r.step == 1] == [[0, 1, 1, 0]]


def test_writer_wakes_when_flush_steps_or_half_the_slots_wait(tmp_path):
    # flush_seconds=3600: only the count of waiting steps wakes the writer. queue_slots=4: at 2 waiting steps
    # (half the slots), sooner than flush_steps=64
    rec = _recorder(tmp_path / "half", queue_slots=4, flush_seconds=3600)
    rec.begin_step()
    rec.end_step()
    time.sleep(0.2)
    assert not rec.path.read_text()  # one step waits
    rec.begin_step()
    rec.end_step()
    assert len(_wait_for_lines(rec.path, 4)) == 4
    rec.close()
    # flush_seconds=0: every step wakes it; one wake-up per step when each is waited for, one more to close
    rec = _recorder(tmp_path / "every", flush_steps=64, flush_seconds=0)
    for n in (1, 2):
        rec.begin_step()
        rec.end_step()
        assert len(_wait_for_lines(rec.path, 2 * n)) == 2 * n
    time.sleep(0.05)
    rec.close()
    assert rec.stats.wakeups == 3


def _ids_then_counts_recorder(tmp_path, first):
    """A recorder whose buffer is allocated by `first`, the first add of all, made outside any step."""
    rec = GateLogRecorder(tmp_path, rank=0, topk_sample=2)
    rec.register_layer("l0", 4, 2)
    assert rec.begin_step() is None and rec.end_step() is None  # no buffer yet: nothing to do
    first(rec)
    assert rec.counts is not None and rec.counts.device.type == "cpu"
    return rec


@pytest.mark.parametrize("first", ["add_counts", "add_ids", "add_topk_sample"])
def test_counts_before_the_buffer_and_outside_steps(tmp_path, first):
    # any add allocates the buffer on its tensor's device; what a forward outside a step adds is wiped, whichever
    # add made it (each step below uses the other add, which must not mark the buffer itself)
    adds = {"add_counts": lambda r: r.add_counts(0, torch.tensor([5, 5, 0, 0], dtype=torch.int32)),
            "add_ids": lambda r: r.add_ids(0, torch.tensor([[0, 1]])),
            "add_topk_sample": lambda r: r.add_topk_sample(0, torch.tensor([[3, 2]], dtype=torch.int32))}
    rec = _ids_then_counts_recorder(tmp_path, adds[first])
    inside = {"add_counts": lambda r: r.add_ids(0, torch.tensor([[2, 3]])),
              "add_ids": lambda r: r.add_counts(0, torch.tensor([0, 0, 1, 1], dtype=torch.int32)),
              "add_topk_sample": lambda r: r.add_counts(0, torch.tensor([0, 0, 1, 1], dtype=torch.int32))}[first]
    for _ in range(2):
        rec.begin_step()
        inside(rec)
        rec.end_step("decode", 1)
        adds[first](rec)  # between steps
    rec.begin_step()
    rec.close()
    assert rec.end_step() is None  # a step still open at close() is not handed over
    records, skipped = read_gate_log(tmp_path)
    assert skipped == [] and [r.expert_counts for r in records] == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert [r.topk_sample for r in records] == [None, None]  # a sample from outside the steps is gone


def test_close_before_the_buffer_is_a_no_op(tmp_path):
    rec = GateLogRecorder(tmp_path)
    rec.close()
    rec.close()
    assert not rec.path.exists() and rec.ready is False


def test_python_format_without_a_sample(tmp_path, monkeypatch):
    import moekern.gatelog.writer as writer

    monkeypatch.setattr(writer, "_format_op", lambda: None)
    rec = _recorder(tmp_path)
    rec.begin_step()
    rec.add_counts(0, torch.tensor([1, 1, 0, 0], dtype=torch.int32))
    rec.end_step("decode", 1)
    rec.close()
    records, skipped = read_gate_log(tmp_path)
    assert skipped == [] and rec.stats.write_errors == 0
    assert [(r.layer, r.expert_counts, r.topk_sample) for r in records] == [(0, [1, 1, 0, 0], None), (1, [0, 0, 0], None)]


def test_writer_thread_is_a_named_daemon(tmp_path):
    # a daemon: an engine that exits without close() is not held by it; named for thread dumps (py-spy)
    rec = _recorder(tmp_path)
    threads = [t for t in threading.enumerate() if t.name == "moekern-gatelog-r3"]
    assert len(threads) == 1 and threads[0].daemon
    rec.close()


def test_host_buffers_stay_on_the_cpu_under_a_default_device(tmp_path):
    """The host ring, the top-k sample's host ring and the marks are CPU (pinned on a GPU) whatever default
    device the caller set: a `with torch.device(...)` around the model must not move them."""
    with torch.device("meta"):
        rec = GateLogRecorder(tmp_path, rank=0, model="m", topk_sample=2)
        rec.register_layer("model.layers.0.mlp.experts", 4, 2)
        rec.ensure_buffer("cpu")
    try:
        assert rec._host.device.type == "cpu"
        assert rec._host_sample.device.type == "cpu"
        assert rec._marks.device.type == "cpu"
    finally:
        rec.close()
