"""The compiled extension moekern._C: op schemas, has_device_kernels, fake (meta) implementations, and the
error a CPU-only build gives when a device op is called. Runs on CPU; skipped when _C is not built
(`pip install --no-build-isolation -e .` builds it, CPU-only on a machine without CUDA)."""

from __future__ import annotations

import pytest
import torch

from moekern import _ext
from moekern.dispatch.reference import align_sizes

# Without a GPU, a missing _C skips this file. With one, nothing here skips: a GPU machine must have built it.
pytestmark = pytest.mark.skipif(_ext.extension_error() is not None and not torch.cuda.is_available(),
                                reason=f"skipped: {_ext.extension_error()}")

SCHEMAS = {
    "has_device_kernels": "moekern::has_device_kernels() -> bool",
    "align_plan": "moekern::align_plan(int num_slots, int num_experts, int block_size=16) -> int[]",
    "fused_topk": (
        "moekern::fused_topk(Tensor logits, int top_k, int scoring, bool renormalize, Tensor? bias, "
        "int num_groups, int topk_group, float scale) -> (Tensor weights, Tensor ids, Tensor counts)"
    ),
    "moe_align": (
        "moekern::moe_align(Tensor topk_ids, int num_experts, int block_size, Tensor? expert_counts) -> "
        "(Tensor sorted_token_ids, Tensor block_expert_ids, Tensor num_tokens_post_padded)"
    ),
    "moe_align_variant": (
        "moekern::moe_align_variant(Tensor topk_ids, int num_experts, int block_size, Tensor? expert_counts, "
        "int slots_per_thread, bool ballot_match, bool thread_pads=False) -> "
        "(Tensor sorted_token_ids, Tensor block_expert_ids, Tensor num_tokens_post_padded)"
    ),
    "permute": (
        "moekern::permute(Tensor hidden, Tensor topk_ids, int num_experts, Tensor? expert_counts) -> "
        "(Tensor permuted, Tensor sorted_slots, Tensor slot_to_row, Tensor expert_offsets)"
    ),
    "unpermute": "moekern::unpermute(Tensor expert_output, Tensor slot_to_row, Tensor topk_weights) -> Tensor",
}


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_schema_registered(op):
    assert str(getattr(torch.ops.moekern, op).default._schema) == SCHEMAS[op]


def test_has_device_kernels_matches_torch_build():
    has = torch.ops.moekern.has_device_kernels()
    assert isinstance(has, bool)
    assert _ext.cuda_kernels_available() == has  # the probe reports the op, read once at import
    if torch.version.cuda is None and torch.version.hip is None:
        assert has is False  # a CPU torch can only have built the bindings alone
    if torch.cuda.is_available():
        # setup.py builds the bindings alone when it finds no nvcc; on a GPU machine that build would make
        # every cuda-backend test skip, so it fails here.
        assert has is True, "a GPU is present but moekern._C was built without device kernels; rebuild it"


@pytest.mark.gpu
def test_gpu_machine_has_device_kernels():
    """On a GPU machine the device kernels are built and run: fused_topk on a CUDA tensor gives the reference's
    ids (ties broken to the lower index), which neither a CPU-only build nor a stub could."""
    from moekern.routing.reference import fused_topk_reference

    assert _ext.extension_error() is None, _ext.extension_error()
    assert _ext.cuda_kernels_available(), "moekern._C was built without device kernels on a GPU machine"
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0, 0.1, 3.0, 0.0, -2.0]] * 3, device="cuda")
    w, ids, counts = torch.ops.moekern.fused_topk(logits, 3, 0, True, None, 0, 0, 1.0)
    ref = fused_topk_reference(logits.cpu(), 3)
    assert ids.cpu().tolist() == [[5, 1, 3]] * 3 == ref[1].tolist()
    assert counts.cpu().tolist() == ref[2].tolist()
    torch.testing.assert_close(w.cpu(), ref[0], rtol=1e-5, atol=1e-6)


# (slots, experts) -> [slots per thread, chunks]: the boundaries of the measured table in csrc/dispatch/align_plan.h
ALIGN_PLANS = {
    (0, 8): [1, 1], (512, 512): [1, 1],                        # one slot per thread, one CTA
    (513, 128): [2, 1], (1024, 64): [2, 1],                    # two per thread while E <= 128
    (513, 256): [1, 2], (1024, 129): [1, 2],                   # E > 128: two 512-slot chunks
    (1025, 8): [4, 1], (2049, 8): [8, 1], (4096, 8): [8, 1],   # E <= 8: one CTA up to 4096 slots
    (4097, 8): [1, 9], (1025, 9): [1, 3], (1025, 128): [1, 3],
    (32768, 64): [1, 64], (32769, 64): [4, 17],                # past 32K slots: 2048-slot chunks ...
    (524288, 8): [4, 256], (524289, 8): [16, 65],              # ... while at most 256, then 8192-slot chunks
}


@pytest.mark.parametrize("n,E", sorted(ALIGN_PLANS))
def test_align_plan_table(n, E):
    assert torch.ops.moekern.align_plan(n, E)[:2] == ALIGN_PLANS[(n, E)]


def test_align_plan_holds_every_slot_in_the_fewest_chunks():
    for n in [*range(0, 3000, 7), 8191, 8192, 8193, 32767, 32768, 32769, 10**6, 2**31 - 1]:
        for E in (1, 8, 9, 64, 128, 129, 256, 512):
            ipt, chunks, _ = torch.ops.moekern.align_plan(n, E)
            per = 512 * ipt
            assert ipt in (1, 2, 4, 8, 16) and chunks >= 1, (n, E, ipt, chunks)
            assert chunks * per >= n and (chunks == 1 or (chunks - 1) * per < n), (n, E, ipt, chunks)
            assert n > 2**19 or chunks <= 256, (n, E, chunks)  # each CTA sums at most chunks x E counts


# (slots, experts, block size) -> pads and block ids by one thread per expert (1) or one warp (0): the measured rule
# of align_default_thread_pads (thread writer where E >= 64, <= 1024 slots, 2 <= B <= 16)
THREAD_PADS = {
    (8, 128, 16): 1, (1024, 64, 16): 1, (1024, 256, 2): 1, (0, 512, 16): 1,
    (8, 63, 16): 0, (8, 8, 16): 0,                    # few experts: the warp writer
    (1025, 128, 16): 0, (4096, 256, 16): 0,           # past 1024 slots
    (8, 128, 17): 0, (8, 128, 64): 0, (8, 128, 1): 0,  # other block sizes (B = 1: permute)
}


@pytest.mark.parametrize("n,E,B", sorted(THREAD_PADS))
def test_align_plan_thread_pads(n, E, B):
    plan = torch.ops.moekern.align_plan(n, E, B)
    assert plan[2] == THREAD_PADS[(n, E, B)] and plan[:2] == torch.ops.moekern.align_plan(n, E)[:2]


@pytest.mark.parametrize("n,E,B,match", [(-1, 8, 16, "num_slots=-1"), (8, 0, 16, "num_experts=0"),
                                         (8, 513, 16, "num_experts=513"), (8, 8, 0, "block_size=0")])
def test_align_plan_bad_arguments(n, E, B, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moekern.align_plan(n, E, B)


def _cpu_calls():
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    return {
        "fused_topk": lambda: torch.ops.moekern.fused_topk(torch.randn(2, 4), 2, 0, True, None, 0, 0, 1.0),
        "moe_align": lambda: torch.ops.moekern.moe_align(ids, 4, 16, None),
        "moe_align_variant": lambda: torch.ops.moekern.moe_align_variant(ids, 4, 16, None, 4, True),
        "permute": lambda: torch.ops.moekern.permute(torch.randn(2, 8), ids, 4, None),
        "unpermute": lambda: torch.ops.moekern.unpermute(
            torch.randn(4, 8), torch.arange(4, dtype=torch.int32), torch.ones(2, 2)
        ),
    }


@pytest.mark.parametrize("op", sorted(_cpu_calls()))
def test_device_op_on_cpu_raises_clear_error(op):
    expected = "CUDA/HIP tensors" if torch.ops.moekern.has_device_kernels() else "built without device kernels"
    with pytest.raises(RuntimeError, match=expected) as info:
        _cpu_calls()[op]()
    assert f"moekern::{op}" in str(info.value)  # the message names the op


def test_fake_fused_topk_shapes():
    from moekern.routing import cuda_topk  # noqa: F401  (registers the fake)

    w, ids, counts = torch.ops.moekern.fused_topk(
        torch.empty(5, 256, device="meta", dtype=torch.bfloat16), 8, 1, True,
        torch.empty(256, device="meta"), 8, 4, 2.5,
    )
    assert (w.shape, w.dtype) == ((5, 8), torch.float32)
    assert (ids.shape, ids.dtype) == ((5, 8), torch.int32)
    assert (counts.shape, counts.dtype) == ((256,), torch.int32)


@pytest.mark.parametrize("M,k,E,B", [(1, 2, 8, 16), (64, 8, 256, 64), (0, 8, 64, 128), (7, 3, 5, 1)])
def test_fake_moe_align_shapes(M, k, E, B):
    from moekern.dispatch import cuda_ops  # noqa: F401

    ids = torch.empty(M, k, device="meta", dtype=torch.int32)
    max_padded, max_blocks = align_sizes(M * k, E, B)
    for sorted_ids, blocks, post in (torch.ops.moekern.moe_align(ids, E, B, None),
                                     torch.ops.moekern.moe_align_variant(ids, E, B, None, 2, False)):
        assert sorted_ids.shape == (max_padded,) and blocks.shape == (max_blocks,) and post.shape == (1,)
        assert sorted_ids.dtype == blocks.dtype == post.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_permute_unpermute_shapes(dtype):
    from moekern.dispatch import cuda_ops  # noqa: F401

    M, k, E, H = 6, 4, 16, 40
    permuted, sorted_slots, slot_to_row, offsets = torch.ops.moekern.permute(
        torch.empty(M, H, device="meta", dtype=dtype), torch.empty(M, k, device="meta", dtype=torch.int32), E, None
    )
    assert (permuted.shape, permuted.dtype) == ((M * k, H), dtype)
    assert sorted_slots.shape == slot_to_row.shape == (M * k,)
    assert offsets.shape == (E + 1,)
    out = torch.ops.moekern.unpermute(permuted, slot_to_row, torch.empty(M, k, device="meta"))
    assert (out.shape, out.dtype) == ((M, H), dtype)


def test_wrappers_reject_bad_scoring():
    from moekern.routing.cuda_topk import fused_topk_cuda

    with pytest.raises(ValueError, match="scoring='tanh' must be one of"):
        fused_topk_cuda(torch.randn(2, 4), 2, "tanh", True, None, 0, 0, 1.0)


def test_extension_links_the_shared_cxx_runtime():
    # A compiler that finds only libstdc++.a (the H100 image's CXX wrapper) links a private, uninitialized
    # C++ runtime into moekern._C; the first error message formatting a number then segfaults instead of
    # raising. setup.py links torch's libstdc++.so.6 by path; the built library must need it.
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import moekern

    if not sys.platform.startswith("linux"):
        pytest.skip("ELF check: Linux only")
    libs = sorted(Path(moekern.__file__).parent.glob("_C*.so"))
    readelf = shutil.which("readelf")
    if not libs or readelf is None:
        pytest.skip("needs a built moekern._C and readelf (binutils)")
    dynamic = subprocess.run([readelf, "-d", str(libs[0])], capture_output=True, text=True, check=True).stdout
    needed = [ln.split("[")[-1].rstrip("]") for ln in dynamic.splitlines() if "(NEEDED)" in ln]
    assert "libstdc++.so.6" in needed, f"{libs[0].name} needs {needed}"
