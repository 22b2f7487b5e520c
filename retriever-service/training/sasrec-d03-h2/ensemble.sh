#!/usr/bin/env bash
# Issue #17: more seeds of the sasrec-d03-h2 recipe (run.sh beside this file), trained side by
# side as one ensemble by `llamarec train retriever --seeds` (members on one compute thread each,
# two at a time). Checkpoints in runs/sasrec-d03-h2-ens (git-ignored); the log and report here.
#
#   nice -n 10 retriever-service/training/sasrec-d03-h2/ensemble.sh &     # from the repository root
#   SEEDS=1,2,3,4,5,6,7,8 retriever-service/training/sasrec-d03-h2/ensemble.sh   # members already
#                                  # trained in OUT are reused (resumed); FRESH=1 retrains them all
set -euo pipefail
cd "$(dirname "$0")/../../.."
here=retriever-service/training/sasrec-d03-h2
bin="${LLAMAREC:-./target/release/llamarec}"
seeds="${SEEDS:-1,2,3,4}"
out="${OUT:-runs/sasrec-d03-h2-ens}"
source "$here/recipe.sh"
"$bin" train retriever --out "$out" --seeds "$seeds" ${FRESH:+--fresh} >"$here/ensemble-${seeds//,/-}.log" 2>&1
cp "$out/report.json" "$here/ensemble-${seeds//,/-}.report.json"
