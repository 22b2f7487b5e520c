#!/usr/bin/env bash
# Issue #17: the session-8 SASRec probe's two best changes together (dropout .3 and 2 heads),
# over three seeds, selected by validation Recall@10 as the trainer does. Each seed's checkpoint
# goes to runs/sasrec-d03-h2-s<seed> (git-ignored); its log and final metrics here.
#
#   nice -n 10 retriever-service/training/sasrec-d03-h2/run.sh &        # from the repository root
#   SEEDS="7" retriever-service/training/sasrec-d03-h2/run.sh            # one seed
#
# A seed whose log already ends with the trainer's summary is skipped (rerun with FRESH=1).
set -euo pipefail
cd "$(dirname "$0")/../../.."
here=retriever-service/training/sasrec-d03-h2
bin="${LLAMAREC:-./target/release/llamarec}"
source "$here/recipe.sh"
for seed in ${SEEDS:-42 7 1234}; do
  log="$here/seed-$seed.log"
  if [[ "${FRESH:-0}" != 1 && -f "$log" ]] && grep -q "best epoch" "$log"; then
    echo "seed $seed: done ($log)"; continue
  fi
  echo "seed $seed: training -> runs/sasrec-d03-h2-s$seed ($(date -u +%H:%M:%S))"
  LLAMAREC_RETRIEVER__TRAIN__SEED="$seed" \
    "$bin" train retriever --out "runs/sasrec-d03-h2-s$seed" --fresh >"$log" 2>&1
done
