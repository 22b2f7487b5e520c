#!/usr/bin/env bash
# CPU time per retriever-only Recommend, per process: the local cluster (`llamarec up`) under an
# open-loop replay at a fixed rate, with each process's user+system CPU read from /proc before
# and after. On a machine where the load generator shares the cores with the cluster, the sum
# of the three columns bounds the throughput (cores / CPU per request).
#
#   deploy/local/cpu_per_request.sh [RATES=2500] [SECONDS=10] [LABEL=current] [OUT=runs/bench/cpu]
#
# RATES: requests per second, or a comma-separated list run one after another on one cluster.
# BIN=path/to/llamarec picks another build (to compare builds side by side); LLAMAREC_* variables
# override the configuration as usual (e.g. LLAMAREC_GATEWAY__RETRIEVE_DENSE_INDICES=false).
# Appends one JSON line to OUT/cpu_per_request.jsonl and prints it. Ports are offset (+200) from
# the shipped defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."

rate=${1:-2500}  # one rate or a comma-separated list
seconds=${2:-10}
label=${3:-current}
out=${4:-runs/bench/cpu}
bin=${BIN:-./target/release/llamarec}
mkdir -p "$out"

source deploy/local/cluster.sh
start_cluster 200 "$out" "$out/cluster-$label.log"
source deploy/local/cpu_measure.sh
measure_cpu_per_request "$LLAMAREC_GATEWAY__LISTEN" "$rate" "$seconds" "$label" "$out"
