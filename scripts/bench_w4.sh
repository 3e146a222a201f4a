#!/usr/bin/env bash
# W4 (shared/bench/WORKLOADS.md) with a draft made here by `spruce distill`:
#
#   bash scripts/bench_w4.sh [DRAFT_DIR] [OUT_DIR] [SPECULATOR_DIR]
#   # defaults: drafts/smollm2-135m, bench_results/w4, drafts/smollm2-135m-mlp
#
# Builds the draft model and the MLP speculator first where they do not exist yet (~28 minutes
# each on the 2-core machine).
# Batch 1 runs a chain of 4 from each proposer, the SpecInfer tree and the merged tree; batches 4
# and 16 (where speculation must not slow things down; the engine's load adaptation is on) the
# main ones. MODES_B1 / MODES_B16 override
# (every mode: none,ngram-4,ngram-8,early_exit-4,early_exit-8,draft-4,draft-8,draft-specinfer,
# draft-tree4,draft-beam4,merged,mlp-4,mlp-8,mlp-tree4,mlp-specinfer,mlp-beam4,merged-mlp).
set -euo pipefail
cd "$(dirname "$0")/.."
DRAFT=${1:-drafts/smollm2-135m}
OUT=${2:-bench_results/w4}
SPEC=${3:-drafts/smollm2-135m-mlp}
MODES_B1=${MODES_B1:-none,ngram-4,ngram-8,early_exit-4,draft-4,draft-tree4,draft-beam4,merged,mlp-4,mlp-tree4,mlp-beam4,merged-mlp}
MODES_B16=${MODES_B16:-none,ngram-4,draft-4,draft-tree4,merged,mlp-beam4,merged-mlp}
mkdir -p "$OUT"
if [ ! -f "$DRAFT/config.json" ]; then
  .venv/bin/spruce distill --target smollm2-135m --out "$DRAFT" 2>&1 | tee "$OUT/distill.log"
fi
if [ ! -f "$SPEC/config.json" ]; then
  .venv/bin/spruce distill --kind mlp_speculator --target smollm2-135m --out "$SPEC" 2>&1 | tee "$OUT/distill_mlp.log"
fi
# `bench spec` exits 1 when a mode was not lossless; the other batch sizes still run, and the
# script exits 1 at the end.
status=0
.venv/bin/spruce bench spec --modes "$MODES_B1" --draft "$DRAFT" --speculator "$SPEC" --batch-sizes 1 \
  --output-json "$OUT/w4-b1.json" 2>&1 | tee "$OUT/w4-b1.log" || status=1
.venv/bin/spruce bench spec --modes "$MODES_B16" --draft "$DRAFT" --speculator "$SPEC" --batch-sizes 4,16 \
  --output-json "$OUT/w4-b4-16.json" 2>&1 | tee "$OUT/w4-b4-16.log" || status=1
exit $status
