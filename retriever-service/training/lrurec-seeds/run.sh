#!/usr/bin/env bash
# Issue #17: seeds of the shipped LRURec recipe ([retriever.train] of deploy/local/llamarec.toml)
# as one `--seeds` ensemble, for mixed LRURec + SASRec ensembles (validation only so far).
# Checkpoints in runs/lrurec-ens (git-ignored); log and report here.
#
#   nice -n 5 retriever-service/training/lrurec-seeds/run.sh &       # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../../.."
here=retriever-service/training/lrurec-seeds
seeds="${SEEDS:-1,2,3,4}"
out="${OUT:-runs/lrurec-ens}"
"${LLAMAREC:-./target/release/llamarec}" train retriever --out "$out" --seeds "$seeds" ${FRESH:+--fresh} >"$here/ensemble-${seeds//,/-}.log" 2>&1
cp "$out/report.json" "$here/ensemble-${seeds//,/-}.report.json"
