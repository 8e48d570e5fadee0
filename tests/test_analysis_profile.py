"""moekern.analysis.study.profile: classifier rules, torch.profiler path on CPU, trace reader, ncu CSV parser,
missing-tool messages."""

import json

import pytest

from moekern.analysis.study import profile as P


@pytest.mark.parametrize("name,cat", [
    ("_fused_topk_kernel", "routing"), ("moe_align_block_size_kernel", "align"), ("_align_scan_kernel", "align"),
    ("_grouped_gemm_kernel", "expert_gemm"), ("fused_moe_kernel", "expert_gemm"), ("aten::mm", "expert_gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "expert_gemm"), ("_unpermute_kernel", "combine"),
    ("_permute_kernel", "align"), ("moe_sum_kernel", "combine"), ("flash_fwd_splitkv_kernel", "attention"),
    ("ncclDevKernel_AllToAll_RING_LL", "communication"), ("_ep_dispatch_write_kernel", "communication"),
    ("_ep_combine_pull_kernel", "communication"), ("_ep_local_reduce_kernel", "combine"),
    ("aten::softmax", "routing"), ("aten::topk", "routing"), ("Memcpy DtoD", "other"), ("aten::add", "other"),
])
def test_classify(name, cat):
    assert P.classify_kernel(name) == cat


def test_profile_cpu_workload(tmp_path):
    fn, desc = P.make_workload("fused_moe", "dbrx", tokens=8, backend="torch", device="cpu", scale_hidden=192)
    assert desc["E"] == 16 and desc["H"] == 32
    table = P.profile_callable(fn, tmp_path, warmup=1, iters=2, device="cpu")
    assert table.time_kind == "cpu" and table.total_us > 0
    shares = table.shares()
    assert set(shares) == set(P.CATEGORIES) and sum(shares.values()) == pytest.approx(1.0)
    assert shares["expert_gemm"] > 0 and shares["routing"] > 0  # the reference runs aten::mm and topk
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["traceEvents"]
    back = P.read_trace(tmp_path / "trace.json")  # our own trace read back: cpu ops, same op names
    assert {r.name for r in back.rows} >= {"aten::mm"}


def test_read_trace_prefers_kernels(tmp_path):
    ev = [{"ph": "X", "cat": "kernel", "name": "_grouped_gemm_kernel", "dur": 30.0, "ts": 0},
          {"ph": "X", "cat": "kernel", "name": "_grouped_gemm_kernel", "dur": 10.0, "ts": 50},
          {"ph": "X", "cat": "kernel", "name": "_fused_topk_kernel", "dur": 10.0, "ts": 90},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 500.0, "ts": 0}]
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"traceEvents": ev}))
    t = P.read_trace(p)
    assert t.time_kind == "trace" and t.total_us == 50.0
    assert t.shares()["expert_gemm"] == pytest.approx(0.8) and t.shares()["routing"] == pytest.approx(0.2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"traceEvents": [{"ph": "i", "name": "x"}]}))
    with pytest.raises(ValueError, match="no complete"):
        P.read_trace(bad)


NCU_DETAILS = '''==PROF== Connected to process 1234
==PROF== Profiling "_fused_topk_kernel": 0%....50%....100% - 3 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1234","python","h","_fused_topk_kernel","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","41.25"
"0","1234","python","h","_fused_topk_kernel","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","lts__t_sector_hit_rate.pct","%","63.10"
"0","1234","python","h","_fused_topk_kernel","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","sm__warps_active.avg.pct_of_peak_sustained_active","%","1,012.5"
"1","1234","python","h","_grouped_gemm_kernel","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","88.00"
'''
NCU_RAW = '''"ID","Kernel Name","dram__throughput.avg.pct_of_peak_sustained_elapsed","lts__t_sector_hit_rate.pct","sm__warps_active.avg.pct_of_peak_sustained_active"
"","","%","%","%"
"0","_align_scan_kernel","12.5","80","33.3"
'''


def test_parse_ncu_csv():
    rows = P.parse_ncu_csv(NCU_DETAILS)
    assert [r["kernel"] for r in rows] == ["_fused_topk_kernel", "_grouped_gemm_kernel"]
    assert rows[0]["dram__throughput.avg.pct_of_peak_sustained_elapsed"] == 41.25
    assert rows[0]["sm__warps_active.avg.pct_of_peak_sustained_active"] == 1012.5  # thousands separator
    assert rows[1]["dram__throughput.avg.pct_of_peak_sustained_elapsed"] == 88.0
    raw = P.parse_ncu_csv(NCU_RAW)
    assert len(raw) == 1 and raw[0]["lts__t_sector_hit_rate.pct"] == 80.0
    with pytest.raises(ValueError, match="no ncu CSV header"):
        P.parse_ncu_csv("==PROF== nothing profiled\n")


def test_missing_tools(monkeypatch):
    monkeypatch.setattr(P.shutil, "which", lambda tool: None)
    for tool in ("ncu", "nsys", "rocprofv3"):
        msg = P.tool_missing(tool)
        assert msg.startswith(f"skipped: {tool!r} not found on PATH")
    assert "AMD" in P.tool_missing("rocprofv3")
    rc, text = P.run_tool(P.ncu_command(["python", "-c", "pass"], None))
    assert rc == 127 and "ncu" in text
    cmd = P.ncu_command(["python"], None)
    assert ",".join(P.METRICS) in cmd and "--csv" in cmd


def test_workload_bad_args():
    with pytest.raises(ValueError, match="dense"):
        P.make_workload(model="llada-8b")
    with pytest.raises(ValueError, match="kind="):
        P.make_workload(kind="nope")


@pytest.mark.gpu
def test_profile_gpu_fused_moe(tmp_path):
    fn, desc = P.make_workload("fused_moe", "mixtral", tokens=64, backend="auto")
    t = P.profile_callable(fn, tmp_path, device="cuda")
    assert t.time_kind == "device" and t.shares()["expert_gemm"] > 0.3
