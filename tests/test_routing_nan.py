"""NaN (and +-inf) router logits: one policy on every backend, checked against rows worked by hand.

The policy (moekern.fused_topk's docstring): a NaN score ranks as -inf (tied with -inf, ties to the lower
index), so ids stay distinct, in [0, E) and prefer finite experts; NaN is never hidden in the weights.
Softmax: a row with a NaN or +inf logit has NaN probabilities, so all k weights of that row are NaN (other
rows are untouched). Sigmoid: only a chosen NaN expert's weight is NaN; renormalize leaves a row whose sum
is NaN (or 0) as it is. A NaN correction_bias entry ranks that expert as -inf; its weight stays sigmoid.
On CPU the Triton backend runs in the interpreter (TRITON_INTERPRET=1, set by conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import moekern

NAN, INF = float("nan"), float("inf")
LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75

# The Triton interpreter evaluates NaN/inf rows with numpy, which warns; the results are what we check.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _route(backend, device, rows, k, **kw):
    out = moekern.fused_topk(torch.tensor(rows, dtype=torch.float32, device=device), k, backend=backend, **kw)
    return out.topk_ids.cpu().tolist(), out.topk_weights.cpu(), out.expert_counts.cpu().tolist()


def _same(weights, expected):
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-7,
                               equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_nan_ranks_last_and_poisons_only_its_row(backend, device):
    p = [0.1, 0.2, 0.3, 0.4]  # softmax(log p) = p
    ids, w, counts = _route(backend, device, [[NAN, 1.0, 3.0, 2.0], [math.log(x) for x in p]], 2)
    assert ids == [[2, 3], [3, 2]] and counts == [0, 0, 2, 2]
    _same(w, [[NAN, NAN], [4 / 7, 3 / 7]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_nan_ties_with_minus_inf_lower_index_first(backend, device):
    ids, w, counts = _route(backend, device, [[NAN, -INF, 0.0, 1.0], [-INF, NAN, NAN, 2.0]], 4)
    assert ids == [[3, 2, 0, 1], [3, 0, 1, 2]] and counts == [2, 2, 2, 2]
    assert torch.isnan(w).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_plus_inf_selects_it_and_gives_nan_weights(backend, device):
    # exp(inf - inf) is NaN: the row's probabilities are NaN, as torch.softmax gives; +inf still ranks first
    ids, w, counts = _route(backend, device, [[0.0, INF, 1.0]], 2)
    assert ids == [[1, 2]] and counts == [0, 1, 1] and torch.isnan(w).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_only_the_nan_expert_is_nan(backend, device, renormalize):
    ids, w, counts = _route(backend, device, [[NAN, 0.0, LN3]], 2, scoring="sigmoid", renormalize=renormalize)
    assert ids == [[2, 1]] and counts == [0, 1, 1]
    _same(w, [[0.6, 0.4]] if renormalize else [[0.75, 0.5]])
    # k = 3 must take the NaN expert: its weight is NaN; the NaN sum leaves the row unnormalized, then scaled
    ids, w, counts = _route(backend, device, [[NAN, 0.0, LN3]], 3, scoring="sigmoid", renormalize=renormalize,
                            routed_scaling_factor=2.0)
    assert ids == [[2, 1, 0]] and counts == [1, 1, 1]
    _same(w, [[1.5, 1.0, NAN]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_all_nan_row_takes_the_lowest_indices(backend, device, scoring):
    ids, w, counts = _route(backend, device, [[NAN, NAN, NAN, NAN]], 2, scoring=scoring)
    assert ids == [[0, 1]] and counts == [1, 1, 0, 0] and torch.isnan(w).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_correction_bias_ranks_the_expert_last_but_keeps_its_weight(backend, device):
    bias = torch.tensor([NAN, 0.1, 0.0, -0.1], device=device)
    # selection scores sigmoid(0) + bias = [NaN, 0.6, 0.5, 0.4]; weights are sigmoid(0) = 0.5 each
    ids, w, counts = _route(backend, device, [[0.0, 0.0, 0.0, 0.0]], 4, scoring="sigmoid", correction_bias=bias)
    assert ids == [[1, 2, 3, 0]] and counts == [1, 1, 1, 1]
    _same(w, [[0.25, 0.25, 0.25, 0.25]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_selection_ranks_nan_groups_last(backend, device):
    # sigmoid, 2 groups of 2, keep 1: group 0 = [NaN, NaN] scores -inf, group 1 = [~1, 0] is kept, and its
    # expert 3 (score 0) is chosen although group 0's NaN experts remain
    ids, w, counts = _route(backend, device, [[NAN, NAN, 20.0, -INF]], 2, scoring="sigmoid", num_expert_group=2,
                            topk_group=1, renormalize=False)
    assert ids == [[2, 3]] and counts == [0, 0, 1, 1]
    _same(w, [[1.0, 0.0]])
    # softmax: a NaN logit makes every probability, hence every group score, NaN: the groups tie and the lower
    # one is kept, so the ids come from group 0 (its logits 1 > NaN) and every weight is NaN
    ids, w, counts = _route(backend, device, [[1.0, NAN, 5.0, 6.0]], 2, num_expert_group=2, topk_group=1)
    assert ids == [[0, 1]] and counts == [1, 1, 0, 0] and torch.isnan(w).all()
