"""benchmarks/decode_layer.py's arithmetic and its CPU behaviour (the timing itself needs a GPU)."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decode_layer  # noqa: E402


def test_roofline_counts_used_expert_weights_and_activations():
    # Qwen3-30B-A3B at M=1 with 8 experts hit: 8 x 3 x 2048 x 768 x 2 B of weights = 75,497,472 B, plus x and
    # out (2 x 1 x 2048 x 2 B = 8,192 B): 75,505,664 B at 3e12 B/s = 25.1685 us.
    assert decode_layer.roofline_us(8, 1, 2048, 768, 3e12) == pytest.approx(25.168555, rel=1e-6)
    # twice the experts, twice the weight bytes; the activations grow with M only
    assert decode_layer.roofline_us(16, 1, 2048, 768, 3e12) == pytest.approx(
        (16 * 3 * 2048 * 768 * 2 + 8192) / 3e12 * 1e6)


def test_summary_geomean_and_max_per_model():
    rows = [{"model": "a", "ratio": 0.5}, {"model": "a", "ratio": 2.0}, {"model": "b", "ratio": 1.25},
            {"model": "b"}]  # a row without vLLM has no ratio and is left out
    s = decode_layer.summary(rows)
    assert s["a"] == {"geomean": pytest.approx(1.0), "max": 2.0, "n": 2}
    assert s["b"]["n"] == 1 and s["all"]["n"] == 3
    assert s["all"]["geomean"] == pytest.approx(math.exp((math.log(0.5) + math.log(2.0) + math.log(1.25)) / 3))


def test_rel_err_is_relative_to_the_reference_norm():
    ref = torch.tensor([[3.0, 4.0]])
    assert decode_layer.rel_err(ref, ref) == 0.0
    assert decode_layer.rel_err(torch.tensor([[3.0, 4.5]]), ref) == pytest.approx(0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_cpu_run_says_it_needs_a_gpu(capsys):
    assert decode_layer.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_rounds_alternate_the_order_and_report_the_median():
    calls = []
    seq = {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 9.0, 4.0])}

    def timer(name):
        def t():
            calls.append(name)
            return next(seq[name])
        return t

    medians, per_round = decode_layer.interleaved_medians({"a": timer("a"), "b": timer("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert medians == {"a": 3.0, "b": 4.0} and per_round == {"a": [5.0, 1.0, 3.0], "b": [2.0, 9.0, 4.0]}
    with pytest.raises(ValueError, match="rounds=0"):
        decode_layer.interleaved_medians({"a": timer("a")}, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_bad_rounds_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as info:
        decode_layer.main(["--rounds", "0"])
    assert info.value.code == 2 and "--rounds must be >= 1" in capsys.readouterr().err


def test_with_pdl_sets_the_switch_for_the_call_only(monkeypatch):
    seen = []
    monkeypatch.setenv("MOEKERN_PDL", "1")
    assert decode_layer._with_pdl(False, lambda a, b=0: seen.append(os.environ["MOEKERN_PDL"]) or a + b, 2, b=3) == 5
    assert decode_layer._with_pdl(True, lambda: seen.append(os.environ["MOEKERN_PDL"])) is None
    assert seen == ["0", "1"] and os.environ["MOEKERN_PDL"] == "1"
    monkeypatch.delenv("MOEKERN_PDL")
    with pytest.raises(ZeroDivisionError):
        decode_layer._with_pdl(True, lambda: 1 / 0)
    assert "MOEKERN_PDL" not in os.environ


def test_pdl_providers_time_the_settings_the_default_leaves_out(monkeypatch):
    """Small experts (whole chain by default): no PDL beside it; large experts (GEMM1 alone by default): no PDL and
    the whole chain; MOEKERN_PDL=gemm1 keeps 'none' only; a device without PDL: nothing."""
    import moekern.experts.triton_gemm as tg

    cuda = torch.device("cuda", 0)
    small = torch.empty(2, 1536, 2048, dtype=torch.bfloat16, device="meta")   # Qwen3-30B-A3B's w13
    large = torch.empty(2, 28672, 4096, dtype=torch.bfloat16, device="meta")  # Mixtral's
    monkeypatch.delenv("MOEKERN_PDL", raising=False)
    monkeypatch.setattr(tg, "_pdl_capable", lambda index: True)
    assert decode_layer.pdl_providers(cuda, small) == {"moekern-nopdl": False}
    assert decode_layer.pdl_providers(cuda, large) == {"moekern-nopdl": False, "moekern-pdl": True}
    monkeypatch.setenv("MOEKERN_PDL", "gemm1")
    assert decode_layer.pdl_providers(cuda, small) == {"moekern-nopdl": False}
    monkeypatch.setenv("MOEKERN_PDL", "0")
    assert decode_layer.pdl_providers(cuda, large) == {}
    monkeypatch.delenv("MOEKERN_PDL")
    monkeypatch.setattr(tg, "_pdl_capable", lambda index: False)
    assert decode_layer.pdl_providers(cuda, large) == {}
