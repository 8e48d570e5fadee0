"""tools/gpu/route_align_probe.py's routing check (the target ncu and compute-sanitizer wrap): it accepts the
reference's own output and names what differs otherwise. CPU only (the probe itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from moekern.routing.reference import fused_topk_reference

_PATH = os.path.join(os.path.dirname(__file__), "..", "tools", "gpu", "route_align_probe.py")


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("route_align_probe", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("grouped", [False, True])
def test_routing_check_accepts_the_reference_and_names_each_difference(probe, grouped):
    torch.manual_seed(0)
    E, k = (256, 8) if grouped else (64, 8)
    x = torch.randn(16, E).to(torch.bfloat16)
    kw = dict(scoring="sigmoid", correction_bias=torch.randn(E) * 0.1, num_expert_group=8, topk_group=4,
              routed_scaling_factor=2.5) if grouped else dict(scoring="softmax")
    w, ids, counts = fused_topk_reference(x, k, **kw)
    assert probe._check_routing((w, ids, counts), x, k, kw) is None

    swapped = ids.clone()
    swapped[3, [0, 1]] = swapped[3, [1, 0]]  # same set, other order: the order is part of the contract
    assert probe._check_routing((w, swapped, counts), x, k, kw) == "topk_ids differ"
    fewer = counts.clone()
    fewer[int(ids[0, 0])] -= 1
    assert probe._check_routing((w, ids, fewer), x, k, kw) == "expert_counts differ"
    assert probe._check_routing((w * (1 + 1e-3), ids, counts), x, k, kw) == "topk_weights differ"
