"""benchmarks/tune_vllm.py and benchmarks/vllm_tuned_configs.py on CPU: vLLM's tuner space, vLLM's file naming and
format (through a stand-in of vLLM 0.26's loader), resume, the budget stop, wrong and failing configs, user errors.
The GPU parts sit behind a backend object; here a fake one answers. The gpu test runs vLLM's real kernel."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tune_vllm  # noqa: E402
import vllm_tuned_configs as vtc  # noqa: E402

H100 = "NVIDIA_H100_80GB_HBM3"


# ------------------------------------------------------------------ the space


def test_search_space_is_vllm_tuners_cuda_space():
    # vLLM's get_configs_compute_bound (CUDA branch) crosses these ranges in this key order; written out here
    # by hand from that file, not from the module under test.
    expected = []
    for bm in [16, 32, 64, 128, 256]:
        for bn in [32, 64, 128, 256]:
            for bk in [64, 128, 256]:
                for gm in [1, 16, 32, 64]:
                    for nw in [4, 8]:
                        for ns in [2, 3, 4, 5]:
                            expected.append((bm, bn, bk, gm, nw, ns))
    space = vtc.search_space()
    assert len(space) == 1920 == 5 * 4 * 3 * 4 * 2 * 4
    assert space == expected
    assert len(set(space)) == 1920
    assert space[0] == (16, 32, 64, 1, 4, 2) and space[-1] == (256, 256, 256, 64, 8, 5)
    assert (64, 128, 128, 16, 4, 3) in space  # a member vLLM's H200 Mixtral file uses
    assert not any(c[2] == 32 or c[4] == 2 for c in space)  # BLOCK_SIZE_K 32 and 2 warps: ROCm/older spaces only


def test_config_dict_uses_vllms_keys_in_its_order():
    d = vtc.config_dict((16, 64, 128, 1, 4, 3))
    assert list(d) == ["BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"]
    assert d == {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4,
                 "num_stages": 3}


# ------------------------------------------------------------------ naming


@pytest.mark.parametrize("model,name", [
    # N is the expert intermediate size (w2.shape[2]), not w1.shape[1] = 2I; E all experts (TP=1)
    ("mixtral", "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3.json"),
    ("qwen3-30b-a3b", "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json"),
    ("olmoe", "E=64,N=1024,device_name=NVIDIA_H100_80GB_HBM3.json"),
    ("deepseek-v3", "E=256,N=2048,device_name=NVIDIA_H100_80GB_HBM3.json"),
])
def test_file_name_per_model(model, name):
    s = vtc.moe_shape(model)
    assert vtc.config_file_name(s.E, s.N, vtc.device_file_name("NVIDIA H100 80GB HBM3")) == name


@pytest.mark.parametrize("raw,part", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA_H100_80GB_HBM3"),
    ("NVIDIA H100 PCIe", "NVIDIA_H100_PCIe"),
    ("NVIDIA H200", "NVIDIA_H200"),
    ("NVIDIA H200 NVL", "NVIDIA_H200"),  # vLLM folds the H200 family into one name
    ("NVIDIA GH200 480GB", "NVIDIA_GH200_480GB"),  # "GH200" is not an "H200" part
    ("Some/GPU  Name", "Some_GPU_Name"),  # runs of blanks and slashes become one '_'
])
def test_device_file_name(raw, part):
    assert vtc.device_file_name(raw) == part


# ------------------------------------------------------------------ a fake backend and a stand-in of vLLM's loader


class FakeTiming:
    def __init__(self, us):
        self.median_us, self.method = us, "cuda-graph"


class FakeBackend:
    """check -> rel. error, time -> us from tables keyed by config; a clock advanced by every call."""

    def __init__(self, clock, errs=None, raises=None, us=None, final_us=None, poison=None):
        self.clock, self.errs, self.raises = clock, errs or {}, raises or {}
        self.us, self.final_us, self.poison = us or {}, final_us or {}, poison
        self.calls, self.ok = [], True

    def check(self, M, cfg):
        self.clock.t += 1
        self.calls.append(("check", M, cfg))
        if cfg in self.raises:
            raise self.raises[cfg]
        if cfg == self.poison:
            self.ok = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.errs.get(cfg, 1e-3)

    def time(self, M, cfg, final):
        self.clock.t += 1
        self.calls.append(("final" if final else "time", M, cfg))
        table = self.final_us if final else self.us
        return FakeTiming(table.get(cfg, 100.0 + sum(cfg) / 1000) + M)

    def healthy(self):
        return self.ok

    def close(self):
        pass


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


SPACE = [(16, 32, 64, 1, 4, 2), (16, 64, 128, 1, 4, 3), (32, 64, 64, 16, 8, 4), (64, 128, 64, 1, 8, 5)]


def run(tmp_path, backend, models=("olmoe",), ms=(1, 2), budget_s=1e9, device=H100, finalists=2, space=SPACE):
    path = str(tmp_path / "r.jsonl")
    res = tune_vllm.tune(list(models), list(ms), path, lambda m, ms_: backend, device, budget_s=budget_s,
                         finalists=finalists, space=space, clock=backend.clock, log=lambda m: None)
    return path, res


def vllm_get_moe_configs(folder, E, N, device):
    """vLLM 0.26's get_moe_configs for bf16 (dtype None, no block shape), reduced to the lines that read a user
    folder: the file name, json.load, the triton_version key dropped, keys to int."""
    path = os.path.join(folder, f"E={E},N={N},device_name={device}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tuned = json.load(f)
    tuned.pop("triton_version", None)
    return {int(k): v for k, v in tuned.items()}


def vllm_lookup(configs, M):
    """try_get_optimal_moe_config: the entry of the nearest M (the first of two as near)."""
    return configs[min(configs.keys(), key=lambda x: abs(x - M))]


# ------------------------------------------------------------------ the loop


def test_every_config_checked_then_timed_once(tmp_path):
    b = FakeBackend(Clock())
    path, res = run(tmp_path, b, finalists=0)
    assert res == {"stopped": None, "measured": 8, "left": 0}
    checks = [c for c in b.calls if c[0] == "check"]
    assert sorted((M, cfg) for _, M, cfg in checks) == sorted((M, c) for c in SPACE for M in (1, 2))
    for i, call in enumerate(b.calls):  # each time right after its own check
        if call[0] == "time":
            assert b.calls[i - 1] == ("check", call[1], call[2])
    metas, recs = vtc.read_results(path)
    assert len(metas) == 1 and metas[0]["device"] == H100 and metas[0]["space_size"] == 4
    assert all(r["status"] == "ok" and r["us"] > 0 and r["phase"] == "screen" for r in recs)


def test_compile_workers_get_the_missing_m_and_each_config_waits_for_its_compile(tmp_path):
    class Warmer:
        def __init__(self, calls):
            self.calls, self.work = calls, None

        def start(self, model, work):
            self.work = work

        def wait(self, model, cfg):
            self.calls.append(("wait", None, cfg))

    path = str(tmp_path / "r.jsonl")
    _write_jsonl(path, _records("olmoe", (1,), space=SPACE[:1]))  # config 0 done at M=1 (on this device)
    b = FakeBackend(Clock())
    warmer = Warmer(b.calls)
    tune_vllm.tune(["olmoe"], [1, 2], path, lambda m, ms: b, H100, budget_s=1e9, finalists=0, space=SPACE,
                   warmer=warmer, clock=b.clock, log=lambda m: None)
    assert warmer.work == [(SPACE[0], [2])] + [(c, [1, 2]) for c in SPACE[1:]]
    firsts = [i for i, c in enumerate(b.calls) if c[0] == "check" and (c[1] == 1 or c[2] == SPACE[0])]
    assert [b.calls[i - 1] for i in firsts] == [("wait", None, c) for c in SPACE]


def test_wrong_and_failing_configs_are_recorded_and_never_picked(tmp_path):
    wrong, oor, nan = SPACE[0], SPACE[1], SPACE[2]
    b = FakeBackend(Clock(), errs={wrong: 0.5, nan: float("nan")},
                    raises={oor: RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: "
                                              "232448\nsecond line")},
                    us={wrong: 1.0, nan: 1.0, oor: 1.0, SPACE[3]: 50.0})
    path, res = run(tmp_path, b, finalists=0)
    assert res["stopped"] is None and res["measured"] == 8
    recs = {(r["M"], tuple(r["cfg"])): r for r in vtc.read_results(path)[1]}
    assert recs[(1, wrong)]["status"] == "wrong" and "us" not in recs[(1, wrong)]
    assert recs[(1, nan)]["status"] == "wrong"
    assert recs[(1, oor)]["status"] == "error" and "us" not in recs[(1, oor)]
    assert recs[(1, oor)]["error"].startswith("RuntimeError: out of resource") and "\n" not in recs[(1, oor)]["error"]
    assert not any(c[0] == "time" and c[2] in (wrong, oor, nan) for c in b.calls)  # never timed
    out = vtc.write_configs(path, str(tmp_path / "cfg"), finalists=0, space=SPACE)
    got = vllm_get_moe_configs(str(tmp_path / "cfg"), 64, 1024, H100)
    assert out[0]["written"] == [1, 2] and got[1] == vtc.config_dict(SPACE[3])


def test_all_configs_wrong_at_an_m_writes_no_entry_and_says_so(tmp_path):
    b = FakeBackend(Clock(), errs={c: 1.0 for c in SPACE})
    path, _ = run(tmp_path, b, ms=(4,), finalists=0)
    out = vtc.write_configs(path, str(tmp_path / "cfg"), space=SPACE)
    assert out[0]["written"] == [] and out[0]["no_valid"] == [4]
    assert not (tmp_path / "cfg" / "E=64,N=1024,device_name=NVIDIA_H100_80GB_HBM3.json").exists()


def test_budget_stops_before_a_config_and_resume_measures_the_rest_once(tmp_path):
    clock = Clock()
    b = FakeBackend(clock)  # 2 s per (config, M): check + time; 4 s per config at two M
    path, res = run(tmp_path, b, budget_s=9, finalists=0)
    # config 1 ends at 4 s, config 2 at 8 s; config 3 would end at ~12 s > 9: not started
    assert res["stopped"].startswith("budget") and res["measured"] == 4 and res["left"] == 4
    lines = Path(path).read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line whole
    b2 = FakeBackend(Clock())
    path, res = run(tmp_path, b2, finalists=0)
    assert res == {"stopped": None, "measured": 4, "left": 0}
    assert {c[2] for c in b2.calls} == set(SPACE[2:])  # only what the first run left
    recs = vtc.read_results(path)[1]
    keys = [(r["M"], tuple(r["cfg"])) for r in recs]
    assert len(keys) == len(set(keys)) == 8


def test_a_line_cut_off_by_a_kill_is_dropped_before_the_resume_appends(tmp_path):
    path, first = run(tmp_path, FakeBackend(Clock()), budget_s=5, finalists=0)  # one config at two M: 4 s
    assert first["measured"] == 2
    text = Path(path).read_text()
    Path(path).write_text(text + text.splitlines()[-1][:25])  # a kill in the middle of a fifth line
    path, res = run(tmp_path, FakeBackend(Clock()), finalists=0)
    assert res["measured"] == 6
    assert len(vtc.read_results(path)[1]) == 8  # every line whole again, none lost or doubled


def test_another_gpus_results_do_not_count_as_done(tmp_path):
    run(tmp_path, FakeBackend(Clock()), finalists=0)
    b = FakeBackend(Clock())
    path, res = run(tmp_path, b, device="NVIDIA_H200", finalists=0)
    assert res["measured"] == 8
    files = vtc.write_configs(path, str(tmp_path / "cfg"), space=SPACE, finalists=0)
    assert sorted(f["file"] for f in files) == ["E=64,N=1024,device_name=NVIDIA_H100_80GB_HBM3.json",
                                                "E=64,N=1024,device_name=NVIDIA_H200.json"]


def test_finals_retime_the_fastest_and_decide(tmp_path):
    a, b_, c = SPACE[0], SPACE[1], SPACE[2]
    be = FakeBackend(Clock(), us={a: 10.0, b_: 11.0, c: 12.0, SPACE[3]: 90.0}, final_us={a: 30.0, b_: 20.0})
    path, res = run(tmp_path, be, ms=(8,), finalists=2)
    finals = [call for call in be.calls if call[0] == "final"]
    assert sorted(f[2] for f in finals) == sorted([a, b_])  # the two fastest screened, nothing else
    assert vtc.pick(vtc.read_results(path)[1], "olmoe", 8, 2)["cfg"] == list(b_)
    # a rerun has nothing left to re-time
    be2 = FakeBackend(Clock())
    _, res = run(tmp_path, be2, ms=(8,), finalists=2)
    assert res["measured"] == 0 and be2.calls == []


def test_poisoned_cuda_context_is_recorded_then_stops(tmp_path):
    b = FakeBackend(Clock(), poison=SPACE[1])
    with pytest.raises(RuntimeError, match="unusable"):
        run(tmp_path, b, finalists=0)
    recs = vtc.read_results(str(tmp_path / "r.jsonl"))[1]
    assert recs[-1]["cfg"] == list(SPACE[1]) and recs[-1]["status"] == "error"
    b2 = FakeBackend(Clock())  # the resume skips the config that broke the context
    run(tmp_path, b2, finalists=0)
    assert ("check", 1, SPACE[1]) not in b2.calls


# ------------------------------------------------------------------ writing vLLM's files


def _records(model, ms, device=H100, space=None, us=lambda M, c: 100.0 + M + c[0] / 1000):
    space = vtc.search_space() if space is None else space
    return [{"model": model, "M": M, "cfg": list(c), "phase": "screen", "device": device, "status": "ok",
             "us": us(M, c)} for M in ms for c in space]


def _write_jsonl(path, records, triton="3.6.0"):
    with open(path, "w") as f:
        f.write(json.dumps({"meta": {"device": H100, "triton": triton}}) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_write_round_trips_through_vllms_loader_and_keeps_only_complete_rows(tmp_path):
    space = vtc.search_space()
    fastest = {1: (16, 64, 128, 1, 4, 3), 4: (32, 64, 256, 1, 8, 4), 64: (64, 128, 64, 16, 8, 5)}
    recs = _records("mixtral", (1, 4, 64), us=lambda M, c: 1.0 if c == fastest[M] else 200.0 + M)
    recs += _records("mixtral", (256,), space=space[:1000])  # M=256: a run cut off after 1000 configs
    path = str(tmp_path / "r.jsonl")
    _write_jsonl(path, recs)
    out = vtc.write_configs(path, str(tmp_path / "cfg"), finalists=0)
    assert out[0]["written"] == [1, 4, 64] and out[0]["missing"] == {256: "1000/1920 configs"}
    text = (tmp_path / "cfg" / "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3.json").read_text()
    assert text.endswith("}\n") and '    "1": {' in text  # vLLM's json.dump(indent=4) + newline
    raw = json.loads(text)
    assert list(raw) == ["triton_version", "1", "4", "64"] and raw["triton_version"] == "3.6.0"
    got = vllm_get_moe_configs(str(tmp_path / "cfg"), 8, 14336, H100)
    assert got == {M: vtc.config_dict(fastest[M]) for M in (1, 4, 64)}
    assert vllm_lookup(got, 2) == got[1] and vllm_lookup(got, 3) == got[4] and vllm_lookup(got, 4096) == got[64]
    summary = json.loads((tmp_path / "cfg" / "tune_vllm_summary.json").read_text())
    assert summary["space_size"] == 1920 and summary["files"][0]["missing"] == {"256": "1000/1920 configs"}


def test_write_cli_names_missing_rows(tmp_path, capsys):
    path = str(tmp_path / "r.jsonl")
    _write_jsonl(path, _records("olmoe", (1,), space=vtc.search_space()[:5]))
    assert tune_vllm.main(["write", path, "--out", str(tmp_path / "cfg")]) == 0
    out = capsys.readouterr().out
    assert "E=64,N=1024,device_name=NVIDIA_H100_80GB_HBM3.json (olmoe): not written" in out
    assert "M=1 5/1920 configs" in out


def test_results_file_cut_off_mid_line_reads_and_a_bad_middle_line_is_named(tmp_path):
    p = tmp_path / "r.jsonl"
    good = json.dumps(_records("olmoe", (1,), space=[(16, 32, 64, 1, 4, 2)])[0])
    p.write_text(good + "\n" + good[:30])
    assert len(vtc.read_results(str(p))[1]) == 1
    p.write_text(good[:30] + "\n" + good + "\n")
    with pytest.raises(vtc.UsageError, match=r"r.jsonl:1: not a JSON line"):
        vtc.read_results(str(p))


# ------------------------------------------------------------------ user mistakes: one line each


@pytest.mark.parametrize("argv,needle", [
    (["plan", "--models", "nope"], "model='nope' is not in the registry"),
    (["plan", "--models", "llada-8b"], "is dense"),
    (["plan", "--ms", "1,x,0"], "--ms='1,x,0' must be batch sizes >= 1"),
    (["plan", "--ms", ""], "--ms='' must be batch sizes"),
    (["run", "--jsonl", "x.jsonl", "--budget-s", "0"], "--budget-s=0 must be > 0"),
    (["write", "/nonexistent/r.jsonl", "--out", "d"], "no measurements to write"),
])
def test_user_mistakes_are_one_line_errors(argv, needle, capsys):
    assert tune_vllm.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and err.startswith("tune_vllm.py: error: ")


def test_plan_counts_what_is_left_and_estimates(tmp_path):
    path = str(tmp_path / "r.jsonl")
    _write_jsonl(path, _records("olmoe", (1,)))
    lines = []
    est = tune_vllm.plan(["olmoe"], [1, 2], path, workers=15, log=lines.append)
    assert any("olmoe: 1920 (config, M) left; incomplete M: 2: 0/1920" in line for line in lines)
    # every config still needs its compile (M=2 specializations) and 1920 screens: the larger of the two
    compile_s = 1920 * tune_vllm.ASSUMED_KERNELS_PER_CONFIG * tune_vllm.ASSUMED_COMPILE_S / 15
    assert est == pytest.approx(max(compile_s, 1920 * tune_vllm.ASSUMED_SCREEN_S) + 2 * 3 * tune_vllm.ASSUMED_FINAL_S)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_run_on_cpu_says_it_needs_a_gpu(tmp_path, capsys):
    assert tune_vllm.main(["run", "--jsonl", str(tmp_path / "r.jsonl")]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


# ------------------------------------------------------------------ GPU: vLLM's real kernel


@pytest.mark.gpu
def test_real_vllm_kernel_two_configs_and_vllms_file_name(tmp_path):
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name

    device, meta = tune_vllm.gpu_device()
    assert get_config_file_name(64, 1024, None) == vtc.config_file_name(64, 1024, device)
    space = [(16, 64, 128, 1, 4, 3), (256, 256, 256, 64, 8, 5)]  # the second may not fit shared memory
    path = str(tmp_path / "r.jsonl")
    res = tune_vllm.tune(["olmoe"], [1, 64], path, tune_vllm.VllmExperts, device, budget_s=300, finalists=1,
                         space=space, meta=meta, log=lambda m: None)
    assert res["stopped"] is None
    recs = vtc.read_results(path)[1]
    first = [r for r in recs if tuple(r["cfg"]) == space[0] and r["phase"] == "screen"]
    assert len(first) == 2 and all(r["status"] == "ok" and r["rel_err"] < 1e-2 and r["us"] > 0 for r in first)
    assert all(r["status"] in ("ok", "error") for r in recs)
    assert all(math.isfinite(r["us"]) for r in recs if r["status"] == "ok")


def test_compile_only_kernel_compiles_with_the_launch_grid_and_launches_nothing():
    import tune_vllm_gpu

    class Kernel:
        def __init__(self):
            self.calls = []

        def warmup(self, *args, grid, **kwargs):
            self.calls.append(("warmup", args, grid, kwargs))

        def run(self, *args, **kwargs):
            self.calls.append(("run",))

        def __getitem__(self, grid):
            return lambda *a, **k: self.run(*a, grid=grid, **k)

    k = Kernel()
    stand_in = tune_vllm_gpu._CompileOnly(k)
    grid = (lambda meta: (4,))
    stand_in[grid](1, 2, BLOCK_SIZE_M=16, num_warps=4)
    assert k.calls == [("warmup", (1, 2), grid, {"BLOCK_SIZE_M": 16, "num_warps": 4})]
    assert stand_in.calls is k.calls  # other attributes are the kernel's


@pytest.mark.gpu
def test_real_vllm_kernel_with_compile_workers(tmp_path):
    pytest.importorskip("vllm")
    import tune_vllm_gpu

    device, meta = tune_vllm.gpu_device()
    space = [(32, 64, 128, 16, 4, 4), (16, 128, 64, 1, 8, 3)]
    warmer = tune_vllm_gpu.CompileWorkers(2, [2])
    try:
        res = tune_vllm.tune(["qwen3-30b-a3b"], [2], str(tmp_path / "r.jsonl"), tune_vllm.VllmExperts, device,
                             budget_s=300, finalists=0, space=space, meta=meta, warmer=warmer, log=lambda m: None)
    finally:
        warmer.stop()
    recs = vtc.read_results(str(tmp_path / "r.jsonl"))[1]
    assert res["stopped"] is None and warmer.failed == 0
    assert [r["status"] for r in recs] == ["ok", "ok"] and all(r["rel_err"] < 1e-2 for r in recs)
    print("first call (s), compiled ahead:", [r["first_s"] for r in recs])


# ------------------------------------------------------------------ the device stage's resume plumbing


@pytest.mark.parametrize("carried", ["gz", "plain-cut-line", "stale-plain-and-gz", "nothing"])
def test_vllm_tune_stage_unpacks_the_carried_results_and_sends_them_back(tmp_path, carried):
    """gpu_session.sh vllm-tune in a copy of the checkout on a CPU, against a stand-in `vllm` package: the carried
    results (a finished call's .gz, a cut call's plain file ending in a cut line, or both, the newer one holding
    more lines) reach the runner (which says it needs a GPU here), the config files of its complete M are written
    under $OUT and the results go back as $OUT/tune_vllm.jsonl.gz; with nothing carried nothing goes back."""
    import gzip
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    work = tmp_path / "checkout"
    (work / "tools").mkdir(parents=True)
    shutil.copytree(repo / "tools" / "gpu", work / "tools" / "gpu")
    for name in ("benchmarks", "moekern"):
        (work / name).symlink_to(repo / name)
    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text("__version__ = 'stand-in'\n")
    lines = [json.dumps({"meta": {"device": H100, "triton": "3.6.0"}})]
    lines += [json.dumps(r) for r in _records("olmoe", (1,))]
    res = work / "results" / "vllm_tune"
    res.mkdir(parents=True)
    if carried in ("gz", "stale-plain-and-gz"):
        with gzip.open(res / "tune_vllm.jsonl.gz", "wt") as f:
            f.write("\n".join(lines) + "\n")
    if carried == "stale-plain-and-gz":  # an older cut call's file, fewer lines than the later .gz
        (res / "tune_vllm.jsonl").write_text("\n".join(lines[:2]) + "\n")
    if carried == "plain-cut-line":
        (res / "tune_vllm.jsonl").write_text("\n".join(lines) + '\n{"model": "olmo')
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), MOEKERN_OUT_TAR="0", PYTHONPATH=f"{tmp_path / 'fake'}:{repo}",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", "tools/gpu/gpu_session.sh", "vllm-tune"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert "needs a CUDA GPU" in proc.stdout + proc.stderr
    if carried == "nothing":
        assert not (out / "tune_vllm.jsonl.gz").exists() and not (out / "vllm_tune_configs").exists()
        return
    assert ("is newer than" in proc.stdout) == (carried == "stale-plain-and-gz")
    assert (out / "vllm_tune_configs" / "E=64,N=1024,device_name=NVIDIA_H100_80GB_HBM3.json").exists()
    with gzip.open(out / "tune_vllm.jsonl.gz", "rt") as f:
        back = f.read().splitlines()
    # the runner drops a cut-off last line before it appends (here it stops at once: no GPU), so only the whole
    # lines are sure to come back
    assert back[:len(lines)] == lines and len(back) <= len(lines) + 1
    # the runner appended to $OUT/tune_vllm.jsonl (what a call cut off by its time limit brings back); once the
    # stage ends it goes back packed only
    assert not (out / "tune_vllm.jsonl").exists()
