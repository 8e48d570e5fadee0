"""The warm-up filter of moekern.analysis.imbalance.metrics at its boundary: a step of exactly
`max_tokens` tokens is kept, one more token drops it, and every public entry point's default is 1000.

Each table holds three one-layer steps whose loads tell them apart:
  step 0: 1000 tokens, counts [1000, 0]  (kept: 1000 <= 1000)
  step 1: 1001 tokens, counts [0, 1001]  (dropped: 1001 > 1000; a default of 1024 would keep it)
  step 2:   10 tokens, counts [5, 5]     (kept)
"""

from __future__ import annotations

import numpy as np
import pytest

from moekern.analysis.imbalance import metrics as M


def _table():
    counts = np.array([[1000.0, 0.0], [0.0, 1001.0], [5.0, 5.0]])
    return M.table_from_counts(counts, num_tokens=[1000, 1001, 10])


def test_step_mask_keeps_exactly_max_tokens():
    t = _table()
    assert t.step_mask(1000).tolist() == [True, False, True]  # `<` instead of `<=` drops step 0
    assert t.step_mask(1001).tolist() == [True, True, True]
    assert t.step_mask(999).tolist() == [False, False, True]
    assert t.step_mask(None).tolist() == [True, True, True]


def test_step_mask_default_is_1000():
    assert M.DEFAULT_MAX_TOKENS == 1000
    assert _table().step_mask().tolist() == [True, False, True]


def test_summarize_default_drops_1001_keeps_1000():
    s = M.summarize(_table())
    assert (s.steps_used, s.steps_dropped, s.max_tokens) == (2, 1, 1000)
    # Kept steps 0 and 2: aggregated counts [1005, 5], mean 505, max/mean = 1005 / 505.
    assert s.overall["agg_max_mean"] == pytest.approx(1005 / 505)
    # Per-step max/mean: step 0 -> 1000 / 500 = 2, step 2 -> 1; averaged: 1.5.
    assert s.overall["step_max_mean"] == pytest.approx(1.5)
    # With step 1 wrongly kept the aggregate would be [1005, 1006]: max/mean ~ 1.0005.
    s_all = M.summarize(_table(), max_tokens=None)
    assert (s_all.steps_used, s_all.steps_dropped) == (3, 0)
    assert s_all.overall["agg_max_mean"] == pytest.approx(1006 / 1005.5)


def test_per_step_metric_default():
    vals = M.per_step_metric(_table(), "max_mean")
    np.testing.assert_allclose(vals, [[2.0], [1.0]])


def test_rank_load_summary_default():
    # Two experts on two ranks (contiguous: expert e on rank e): kept steps put 1005 tokens on rank 0, 5 on 1.
    out = M.rank_load_summary(_table(), ep_size=2)
    assert out["rank_tokens"] == [1005.0, 5.0]
