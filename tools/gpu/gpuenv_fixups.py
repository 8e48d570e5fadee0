"""Repairs to the unpacked ../shared/gpu-env tree that vLLM 0.26 needs on the GPU machine; idempotent.

1. `vllm.vllm_flash_attn` raises ImportError when FlashAttention's binaries are absent, and the pack drops
   them (a bf16 MoE study runs attention on TRITON_ATTN). vLLM 0.26 imports it on every model load
   (model_executor/layers/attention -> mm_encoder_attention -> v1/attention/backends/fa_utils), so no model
   loaded: every end-to-end arm of the 2026-11-23 run died there. The fix turns that raise into a no-op; the
   FA functions stay defined (flash_attn_interface reports FA2/FA3 unavailable) and are never called with
   TRITON_ATTN.

    python3 tools/gpu/gpuenv_fixups.py [SITE]     # SITE default /tmp/gpuenv/site
"""

from __future__ import annotations

import sys
from pathlib import Path

FA_RAISE = "if not (FA2_AVAILABLE or FA3_AVAILABLE):\n    raise ImportError("
FA_PATCHED = "if False:  # moekern gpuenv_fixups: FA binaries not packed; attention runs on TRITON_ATTN\n    raise ImportError("


def patch_flash_attn(site: Path) -> str:
    path = site / "vllm" / "vllm_flash_attn" / "__init__.py"
    if not path.is_file():
        return f"skip: {path} not found"
    text = path.read_text()
    if FA_PATCHED in text:
        return f"already patched: {path}"
    if FA_RAISE not in text:
        return f"unexpected content, left alone: {path}"
    path.write_text(text.replace(FA_RAISE, FA_PATCHED))
    return f"patched: {path}"


def main(argv: list[str]) -> int:
    site = Path(argv[1]) if len(argv) > 1 else Path("/tmp/gpuenv/site")
    print("gpuenv_fixups:", patch_flash_attn(site))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
