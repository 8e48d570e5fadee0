"""Shared fakes and helpers of the tests/test_e2e_*.py files: parsed runner arguments without files, a fake
`vllm serve` (health checks answered, stops recorded), a finished fake child process, and verbatim vLLM 0.26 log
lines of JIT compiles."""

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from moekern.e2e import procs
from moekern.e2e.args import parse_args

@pytest.fixture
def dataset(tmp_path):
    p = tmp_path / "003_0.4125.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": t, "domain": "x"}) for t in ("ab", "cde", "f")) + "\n")
    return p


def ready_args(argv):
    """parse_args plus the model dir main() would set, without copying files."""
    args = parse_args(argv)
    args.model_dir = Path("/models/m")
    return args


def flag_value(cmd, name):
    return cmd[cmd.index(name) + 1]


class Healthy:
    """A healthy /health response for the fake `vllm serve`."""
    status = 200

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def fake_server(monkeypatch, popen, stopped=None):
    """Route the runner's subprocesses through `popen`, answer its health checks, record server stops."""
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Healthy())
    monkeypatch.setattr(procs, "kill_group",
                        lambda proc: (stopped.append(proc) if stopped is not None else None)
                        or setattr(proc, "returncode", -15))


class FakeProc:
    """A finished child: what it writes to its stdout happened before wait() returns."""

    def __init__(self, rc=0):
        self.returncode, self.pid = rc, -1

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        return self.returncode


# Verbatim lines of benchmarks/results/e2e/h100-2026-11-23/offline/offline_vllm.log (vLLM 0.26, default
# non-verbose monitor) and the verbose form of the same warning (vllm/utils/jit_monitor.py, "(<details>)").
JIT_ATTN = ("(EngineCore pid=1963) WARNING 11-23 17:51:58 [jit_monitor.py:135] Triton kernel JIT compilation "
             "during inference: kernel_unified_attention. This causes a latency spike; consider extending warmup "
             "to cover this shape/config.")


JIT_MOE_VERBOSE = ("(EngineCore pid=1963) WARNING 11-23 17:52:01 [jit_monitor.py:131] Triton kernel JIT compilation "
                    "during inference: fused_moe_kernel (constexprs={BLOCK_SIZE_M=64, top_k=2}; signature={a_ptr="
                    "'*bf16'}; extra_compile_info={}; key='x'). This causes a latency spike; consider extending "
                    "warmup to cover this shape/config.")


AUTOTUNE = ("Triton autotuning for function _fused_topk_kernel,\nwith key as (8, 'torch.float32'),\n"
             "finished after 0.41s,\nbest config selected: BLOCK_M: 16, num_warps: 4;")


def log_text(*parts):
    return "\n".join(parts) + "\n"


# the vLLM 0.26 source tree some tests read (skipped where it is absent)
VLLM_REF = Path(__import__("os").environ.get("MOEKERN_VLLM_REF", "/work/ref/vllm"))
