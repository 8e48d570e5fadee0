#!/usr/bin/env bash
# Mutation campaign over a scratch copy of the repository (the checkout itself is never modified).
#   tools/mutation/run.sh [CONFIG] [MUTMUT ARGS...]
# CONFIG: a [mutmut] config, default tools/mutation/setup.cfg (the whole campaign);
#         tools/mutation/routing-reference.cfg is the small one behind survivors.md.
# MOEKERN_MUTATION_DIR: the scratch folder (default /tmp/moekern-mutation); results stay there
#   (`cd $MOEKERN_MUTATION_DIR && mutmut results`, `mutmut show NAME`).
set -euo pipefail
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cfg=$(realpath "${1:-$repo/tools/mutation/setup.cfg}")
shift || true
dest=${MOEKERN_MUTATION_DIR:-/tmp/moekern-mutation}
rm -rf "$dest"
mkdir -p "$dest"
cd "$repo"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$dest"
cp moekern/_C*.so "$dest/moekern/" 2>/dev/null || echo "note: no moekern/_C*.so built; tests needing it skip"
cp "$cfg" "$dest/setup.cfg"
cd "$dest"
export TRITON_INTERPRET=1
# One intra-op thread: a worker forked while torch's OpenMP pool holds a lock deadlocks; 2 cores anyway.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec python -m mutmut run "$@"
