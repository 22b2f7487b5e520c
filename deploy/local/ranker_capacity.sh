#!/usr/bin/env bash
# Ranked Recommends per second of one 2-core ranker pod, f32 against bf16 projections: the local
# cluster (`llamarec up`, ranker on 2 threads) at [gateway] ranker_weight 0.5, swept by
# `llamarec bench replay` (two-stage only) once per [ranker] precision, one after the other on
# the same machine. Writes OUT/replay-<precision>.json and .png. Run on an idle machine.
#
#   deploy/local/ranker_capacity.sh [OUT_DIR] [RATES] [STEP_S]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-runs/bench/ranker_capacity}
rates=${2:-0.5,1,1.5,2,3}
step=${3:-30}
bin=${bin:-./target/release/llamarec}
mkdir -p "$out"
source deploy/local/cluster.sh
grep -m1 'model name' /proc/cpuinfo | sed 's/^/# /'
echo "# flags: $(grep -m1 -o -w 'avx512_bf16\|amx_bf16\|avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
for precision in f32 auto; do
  (
    export LLAMAREC_RANKER__PRECISION=$precision LLAMAREC_GATEWAY__RANKER_WEIGHT=0.5
    rm -f "$out/histories.redb"
    start_cluster 100 "$out" "$out/cluster-$precision.log"
    echo "# $precision: cluster up at $(date -u +%H:%M:%S)"
    "$bin" bench replay --gateway "$LLAMAREC_GATEWAY__LISTEN" --ranker-metrics 127.0.0.1:9192 \
      --retriever-rates --two-stage-rates "$rates" --two-stage-step-s "$step" \
      --json "$out/replay-$precision.json" --plot "$out/replay-$precision.png"
  )
done
echo "# done at $(date -u +%H:%M:%S)"
