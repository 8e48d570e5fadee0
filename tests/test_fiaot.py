"""tools/gpu/fiaot.sh: FlashInfer's prebuilt MoE module packed here, reassembled and installed on the GPU machine.

Runs the script itself (bash, gzip, split, sha256sum) on a stand-in .so: the parts arriving over two device
calls, a corrupted part, and the install into every FlashInfer directory present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu" / "fiaot.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("split") is None,
                                reason="needs bash and coreutils")


def _run(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def packed(tmp_path):
    """A 3 MiB stand-in module (incompressible) packed into 1 MiB parts under tmp_path/here/.fiaot."""
    here = tmp_path / "here"
    here.mkdir()
    so = tmp_path / "fused_moe_90.so"
    so.write_bytes(os.urandom(3 << 20))
    r = _run(here, "pack", str(so), env={"FIAOT_PART_MB": "1", "FIAOT_BUILT": "2026-12-05 test"})
    assert r.returncode == 0, r.stderr
    parts = sorted((here / ".fiaot").glob("part.*"))
    assert len(parts) == 4  # 3 MiB of random bytes gzip to a little over 3 MiB
    manifest = (here / ".fiaot" / "manifest").read_text()
    assert "parts 4" in manifest and "built 2026-12-05 test" in manifest
    return so, here, parts, tmp_path


def _there(tmp_path: Path) -> tuple[Path, dict[str, str], list[Path]]:
    """The GPU machine's side: a checkout, FIAOT_TMP, and two FlashInfer installs (one absent)."""
    there = tmp_path / "there"
    (there / ".fiaot").mkdir(parents=True)
    fis = [tmp_path / "fiearly" / "flashinfer", tmp_path / "site" / "flashinfer"]
    fis[0].mkdir(parents=True)
    env = {"FIAOT_TMP": str(tmp_path / "stage"), "FIAOT_TARGETS": " ".join(str(f) for f in fis)}
    return there, env, fis


def _carry(here: Path, there: Path, parts: list[Path]) -> None:
    """One device call: the manifest plus some parts land in the checkout's .fiaot/."""
    shutil.copy(here / ".fiaot" / "manifest", there / ".fiaot" / "manifest")
    for p in parts:
        shutil.copy(p, there / ".fiaot" / p.name)


def test_parts_over_two_calls_install_into_every_flashinfer(packed):
    so, here, parts, tmp_path = packed
    there, env, fis = _there(tmp_path)
    _carry(here, there, parts[:2])
    r = _run(there, "install", env=env)
    assert r.returncode == 0 and "2 of 4 parts" in r.stdout, r.stdout + r.stderr
    assert not (fis[0] / "data").exists()

    r = _run(there, "installed", env=env)  # what e2e-offline asks before it keeps the flashinfer arm
    assert r.returncode == 1 and "has no fused_moe_90.so" in r.stdout

    _carry(here, there, parts[2:])
    r = _run(there, "install", env=env)
    assert r.returncode == 0, r.stderr
    q = _run(there, "installed", env=env)
    assert q.returncode == 0 and q.stdout.strip() == str(fis[0] / "data" / "aot" / "fused_moe_90" / "fused_moe_90.so")
    installed = fis[0] / "data" / "aot" / "fused_moe_90" / "fused_moe_90.so"
    assert installed.read_bytes() == so.read_bytes()
    assert "built 2026-12-05 test" in r.stdout
    assert not fis[1].exists()  # a FlashInfer that is not there is not created

    fis[1].mkdir(parents=True)  # a later call stages the full environment's FlashInfer: it gets the module too
    r = _run(there, "install", env=env)
    assert r.returncode == 0 and r.stdout.count("installed under") == 1, r.stdout
    assert (fis[1] / "data" / "aot" / "fused_moe_90" / "fused_moe_90.so").read_bytes() == so.read_bytes()
    assert _run(there, "installed", env=env).stdout.count("fused_moe_90.so") == 2


def test_installed_without_any_flashinfer(tmp_path):
    r = _run(tmp_path, "installed", env={"FIAOT_TARGETS": str(tmp_path / "none")})
    assert r.returncode == 1 and "no FlashInfer here" in r.stdout


def test_corrupt_part_installs_nothing(packed):
    _, here, parts, tmp_path = packed
    there, env, fis = _there(tmp_path)
    _carry(here, there, parts)
    bad = there / ".fiaot" / parts[1].name
    data = bytearray(bad.read_bytes())
    data[1000] ^= 0xFF
    bad.write_bytes(bytes(data))
    r = _run(there, "install", env=env)
    assert r.returncode != 0
    assert "checksum mismatch" in r.stderr
    assert not (fis[0] / "data").exists()


def test_nothing_carried_is_a_no_op(tmp_path):
    there, env, fis = _there(tmp_path)
    r = _run(there, "install", env=env)
    assert r.returncode == 0 and r.stdout == ""
    assert not (tmp_path / "stage").exists()


def test_usage_errors(tmp_path):
    assert _run(tmp_path, env={}).returncode == 2
    assert _run(tmp_path, "pack", env={}).returncode == 2
    r = _run(tmp_path, "pack", str(tmp_path / "missing.so"), env={})
    assert r.returncode == 1 and "no " in r.stderr


def test_pack_git_ignores_the_parts(tmp_path):
    """In a checkout, pack adds .fiaot/ to .git/info/exclude once: untracked parts would travel in every call."""
    (tmp_path / ".git" / "info").mkdir(parents=True)
    so = tmp_path / "m.so"
    so.write_bytes(b"x" * 1000)
    for _ in range(2):
        assert _run(tmp_path, "pack", str(so), env={}).returncode == 0
    assert (tmp_path / ".git" / "info" / "exclude").read_text().splitlines().count("/.fiaot/") == 1
