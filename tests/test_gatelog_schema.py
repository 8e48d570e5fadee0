"""moekern.gatelog.schema: the one serializer (against json.dumps of the record's dict, written here) and
parse_record's checks, each fed a line that breaks that check alone, so removing the check fails a test."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekern.gatelog import GateRecord, SkippedLine, parse_record, read_gate_log, write_records

SCHEMA = "moekern.gatelog/1"


def _reference_json(r: GateRecord) -> str:
    """The record's line as the schema describes it, built apart from the code under test."""
    obj = {"schema": SCHEMA, "step": r.step, "layer": r.layer, "rank": r.rank, "num_tokens": r.num_tokens,
           "phase": r.phase, "top_k": r.top_k, "expert_counts": list(r.expert_counts)}
    for key in ("time", "model", "topk_sample"):
        if getattr(r, key) is not None:
            obj[key] = getattr(r, key)
    if r.extra:
        obj["extra"] = r.extra
    return json.dumps(obj, separators=(",", ":"))


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)


@st.composite
def _records(draw):
    k = draw(st.integers(1, 4))
    counts = draw(st.lists(st.integers(0, 10 ** 6), min_size=1, max_size=8))
    tokens = -(-sum(counts) // k)  # the fewest tokens the counts fit in: sum(counts) <= tokens * k
    counts[0] += tokens * k - sum(counts)  # now sum(counts) == num_tokens * top_k, as a valid record has
    return GateRecord(step=draw(st.integers(0, 2 ** 62)), layer=draw(st.integers(0, 200)), expert_counts=counts,
                      num_tokens=tokens, rank=draw(st.integers(0, 64)),
                      phase=draw(st.sampled_from(["prefill", "decode", "mixed", "diffusion", "unknown"])),
                      top_k=k, time=draw(st.none() | st.floats(0, 2e9, allow_nan=False)),
                      model=draw(st.none() | _text),
                      extra=draw(st.sampled_from([{}, {"tp_rank": 1}, {"note": "é\"x\n", "n": [1, None]}])),
                      topk_sample=draw(st.none() | st.lists(st.lists(st.integers(0, 255), min_size=k, max_size=k),
                                                            max_size=3)))


@settings(max_examples=200, deadline=None)
@given(rec=_records())
def test_serializer_equals_the_reference_and_round_trips(rec):
    line = rec.to_json()
    assert line == _reference_json(rec)
    assert parse_record(line) == rec


def test_serializer_writes_ints_and_rejects_floats():
    import numpy as np

    r = GateRecord(np.int64(3), 1, list(np.array([2, 2], dtype=np.int32)), np.int32(2), top_k=2)
    assert r.to_json() == ('{"schema":"moekern.gatelog/1","step":3,"layer":1,"rank":0,"num_tokens":2,'
                           '"phase":"unknown","top_k":2,"expert_counts":[2,2]}')
    with pytest.raises(TypeError):
        GateRecord(0, 0, [2, 2], 2.0, top_k=2).to_json()  # would be a line the reader rejects


# ---- parse_record: one broken field per line, everything else valid ---------------------------------------
def _line(**fields) -> str:
    obj = {"schema": SCHEMA, "step": 4, "layer": 1, "rank": 0, "num_tokens": 2, "phase": "decode", "top_k": 2,
           "expert_counts": [3, 1, 0]}
    obj.update(fields)
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


def test_the_base_line_is_valid():
    r = parse_record(_line())  # the lines below differ from it in one field only
    assert (r.step, r.layer, r.num_tokens, r.top_k, r.expert_counts) == (4, 1, 2, 2, [3, 1, 0])
    assert parse_record(_line(top_k=..., num_tokens=5)).top_k is None  # no top_k: nothing to check the sum by


@pytest.mark.parametrize("key", ["step", "layer"])
def test_negative_step_or_layer_rejected(key):
    with pytest.raises(ValueError, match=f"{key} must be a non-negative int; got -1"):
        parse_record(_line(**{key: -1}))


def test_negative_num_tokens_rejected():
    # without top_k the sum invariant says nothing: only the sign check can catch it
    with pytest.raises(ValueError, match="num_tokens must be a non-negative int; got -1"):
        parse_record(_line(num_tokens=-1, top_k=...))


def test_negative_count_rejected():
    # the right length and sum(expert_counts) == num_tokens * top_k (-1 + 5 + 0 == 2 * 2): only the sign is wrong
    with pytest.raises(ValueError, match="expert_counts must be a non-empty list of non-negative ints"):
        parse_record(_line(expert_counts=[-1, 5, 0]))


@pytest.mark.parametrize("fields,match", [
    (dict(step=1.0), "step must be a non-negative int"),
    (dict(layer=True), "layer must be a non-negative int"),
    (dict(expert_counts=[]), "expert_counts must be a non-empty list"),
    (dict(expert_counts=[3.0, 1, 0]), "expert_counts must be a non-empty list"),
    (dict(top_k=0, num_tokens=0, expert_counts=[0, 0]), "top_k must be a positive int"),
    (dict(top_k="2"), "top_k must be a positive int"),
    (dict(phase="warmup"), "phase='warmup' must be one of"),
    (dict(schema="moekern.gatelog/2"), "schema='moekern.gatelog/2'"),
])
def test_wrong_types_rejected(fields, match):
    with pytest.raises(ValueError, match=match):
        parse_record(_line(**fields))


@pytest.mark.parametrize("counts,tokens,k", [([3, 1, 1], 2, 2), ([3, 1, 0], 3, 2), ([4, 0], 2, 1), ([0, 0], 1, 1)])
def test_counts_that_break_the_sum_invariant_rejected(counts, tokens, k):
    with pytest.raises(ValueError, match=rf"sum\(expert_counts\)={sum(counts)} != num_tokens\*top_k="
                                         rf"{tokens}\*{k}={tokens * k}"):
        parse_record(_line(expert_counts=counts, num_tokens=tokens, top_k=k))


def test_reader_skips_and_reports_invariant_breaking_records(tmp_path):
    """Records whose counts do not add up to num_tokens * top_k are not averaged in: the reader leaves them out
    and reports each one like a corrupt line (path, line number, reason)."""
    path = tmp_path / "gate_log.rank0.jsonl"
    write_records(path, [GateRecord(0, 0, [3, 1], 2, top_k=2), GateRecord(0, 1, [2, 2], 2, top_k=2)])
    with open(path, "a") as fh:
        fh.write(_line(step=1, layer=0, expert_counts=[3, 1, 1]) + "\n")  # sum 5, num_tokens * top_k 4
        fh.write("{torn\n")
        fh.write(_line(step=1, layer=1, expert_counts=[1, 3, 0]) + "\n")  # valid
        fh.write(_line(step=2, layer=0, expert_counts=[9, 0, 0], num_tokens=4) + "\n")  # 9 != 8
    records, skipped = read_gate_log(tmp_path)
    assert [(r.step, r.layer) for r in records] == [(0, 0), (0, 1), (1, 1)]
    assert [(s.path, s.line) for s in skipped] == [(str(path), 3), (str(path), 4), (str(path), 6)]
    assert all(isinstance(s, SkippedLine) for s in skipped)
    invariant = [s for s in skipped if s.reason.startswith("schema invariant broken")]
    assert [s.line for s in invariant] == [3, 6]
    assert "sum(expert_counts)=9 != num_tokens*top_k=4*2=8" in invariant[1].reason


# ---- survivors of the gate-log schema's mutation run (tools/mutation/survivors.md), each pinned here


def test_line_defaults_are_rank_0_and_phase_unknown():
    from moekern.gatelog.schema import format_line, line_pieces

    obj = json.loads(format_line(line_pieces(3), 1, 2, None, [1, 1]))
    assert (obj["step"], obj["layer"], obj["rank"], obj["phase"], obj["num_tokens"]) == (3, 1, 0, "unknown", 2)
    assert obj["top_k"] is None  # unknown top_k is JSON null, and reads back as None
    assert parse_record(json.dumps(obj)).top_k is None


def test_missing_rank_and_phase_read_as_0_and_unknown():
    line = json.dumps({"schema": "moekern.gatelog/1", "step": 0, "layer": 0, "num_tokens": 1, "top_k": 1,
                       "expert_counts": [1, 0]})
    r = parse_record(line)
    assert (r.rank, r.phase) == (0, "unknown")


@pytest.mark.parametrize("gz", [False, True])
def test_undecodable_bytes_are_replaced_not_fatal(tmp_path, gz):
    import gzip

    good = GateRecord(0, 0, [1, 1], 1, top_k=2).to_json().encode()
    bad = GateRecord(1, 0, [1, 1], 1, top_k=2, model="m").to_json().encode().replace(b'"m"', b'"\xff\xfe"')
    data = good + b"\n" + bad + b"\n" + good.replace(b'"step":0', b'"step":2') + b"\n"
    path = tmp_path / ("gate_log.rank0.jsonl" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    records, skipped = read_gate_log(path)
    assert [r.step for r in records] == [0, 1, 2] and not skipped
    assert records[1].model == "\ufffd\ufffd"


def test_blank_lines_are_passed_over_not_the_end(tmp_path):
    path = tmp_path / "gate_log.rank0.jsonl"
    lines = [GateRecord(s, 0, [1, 1], 1, top_k=2).to_json() for s in range(2)]
    path.write_text(lines[0] + "\n\n   \n" + lines[1] + "\n")
    assert [r.step for r in read_gate_log(path)[0]] == [0, 1]


def test_cut_off_gzip_names_its_file_and_the_first_lost_line(tmp_path):
    import gzip

    lines = "".join(GateRecord(s, 0, [1, 1], 1, top_k=2).to_json() + "\n" for s in range(400)).encode()
    blob = gzip.compress(lines)
    cut = tmp_path / "gate_log.rank0.jsonl.gz"
    cut.write_bytes(blob[: len(blob) // 2])
    records, skipped = read_gate_log(cut)
    assert len(skipped) == 1 and skipped[0].path == str(cut)
    assert skipped[0].line == len(records) + 1 and "unreadable from here on" in skipped[0].reason
    nothing = tmp_path / "empty" / "gate_log.rank0.jsonl.gz"
    nothing.parent.mkdir()
    nothing.write_bytes(blob[:12])  # not even one line
    records, skipped = read_gate_log(nothing)
    assert records == [] and [(s.path, s.line) for s in skipped] == [(str(nothing), 1)]
