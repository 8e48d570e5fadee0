#!/usr/bin/env bash
# FlashInfer's CUTLASS MoE module (fused_moe_90.so), built ahead of time on a CPU machine, to the GPU machine.
#   bash tools/gpu/fiaot.sh pack SO      # here: SO -> .fiaot/ (gzip'd parts of FIAOT_PART_MB MiB + manifest)
#   bash tools/gpu/fiaot.sh install      # there (gpu_session.sh runs it first in every call)
#   bash tools/gpu/fiaot.sh installed    # there: exit 0 (printing where) when every FlashInfer here has it
# The parts may come over several device calls (carry .fiaot/manifest with every part): install moves the
# carried parts to FIAOT_TMP (/tmp/fiaot), and once all have arrived and the checksum matches, copies the .so
# into the AOT directory (data/aot/fused_moe_90/) of every FlashInfer in FIAOT_TARGETS, which FlashInfer loads
# instead of JIT-compiling. Idempotent: a FlashInfer staged by a later call gets it in that call.
set -euo pipefail
src=${FIAOT_DIR:-.fiaot}
tmp=${FIAOT_TMP:-/tmp/fiaot}
targets=${FIAOT_TARGETS:-/tmp/fiearly/flashinfer /tmp/gpuenv/site/flashinfer}
name=fused_moe_90

field() { awk -v k="$1" '$1 == k {sub(/^[^ ]+ /, ""); print}' "$tmp/manifest"; }

pack() {
  local so=$1
  [ -f "$so" ] || { echo "fiaot: no $so" >&2; exit 1; }
  mkdir -p "$src" && rm -f "$src"/part.* "$src/manifest"
  # git-ignored, or the parts would travel in every device call
  if [ -d .git/info ]; then grep -qx "/$src/" .git/info/exclude 2>/dev/null || echo "/$src/" >> .git/info/exclude; fi
  gzip -c "$so" | split -b "${FIAOT_PART_MB:-24}M" -d -a 1 - "$src/part."
  {
    echo "name $name"
    echo "parts $(find "$src" -name 'part.*' | wc -l)"
    echo "sha256 $(sha256sum "$so" | cut -c1-64)"
    echo "built ${FIAOT_BUILT:-$(date -u +%F)}"
  } > "$src/manifest"
  ls -la "$src"; cat "$src/manifest"
}

install() {
  [ -f "$src/manifest" ] || [ -f "$tmp/manifest" ] || return 0
  mkdir -p "$tmp"
  if [ -f "$src/manifest" ]; then cp "$src/manifest" "$tmp/"; fi
  local p so=$tmp/$name.so
  for p in "$src"/part.*; do if [ -e "$p" ]; then mv -f "$p" "$tmp/"; fi; done
  if [ ! -f "$so" ]; then
    local want have
    want=$(field parts)
    have=$(find "$tmp" -name 'part.*' | wc -l)
    if [ "$have" -lt "$want" ]; then echo "fiaot: $have of $want parts here; carry the next"; return 0; fi
    if ! cat "$tmp"/part.* | gunzip > "$so.tmp" 2>/dev/null \
        || [ "$(sha256sum "$so.tmp" | cut -c1-64)" != "$(field sha256)" ]; then
      rm -f "$so.tmp" "$tmp"/part.*
      echo "fiaot: checksum mismatch (parts of different builds?); nothing installed, carry all parts again" >&2
      return 1
    fi
    mv "$so.tmp" "$so"; rm -f "$tmp"/part.*
  fi
  local fi
  for fi in $targets; do
    if [ -d "$fi" ] && ! cmp -s "$so" "$fi/data/aot/$name/$name.so"; then
      mkdir -p "$fi/data/aot/$name" && cp "$so" "$fi/data/aot/$name/$name.so"
      echo "fiaot: $name.so (built $(field built)) installed under $fi/data/aot"
    fi
  done
}

installed() {
  local fi found=0
  for fi in $targets; do
    [ -d "$fi" ] || continue
    [ -f "$fi/data/aot/$name/$name.so" ] || { echo "fiaot: $fi has no $name.so"; return 1; }
    echo "$fi/data/aot/$name/$name.so"; found=1
  done
  [ "$found" = 1 ] || { echo "fiaot: no FlashInfer here (none of: $targets)"; return 1; }
}

case "${1:-}" in
  pack) [ $# -eq 2 ] || { echo "usage: fiaot.sh pack SO" >&2; exit 2; }; pack "$2" ;;
  install) install ;;
  installed) installed ;;
  *) echo "usage: fiaot.sh pack SO | install | installed" >&2; exit 2 ;;
esac
