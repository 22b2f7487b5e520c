#!/usr/bin/env bash
# Issue #17: SASRec (dropout .3, 2 heads, max_len 50) trained on every item once with (nearly) a
# full window of history (`each_target_once`, windows every STEP items), as RecBole trains on
# every prefix. One run per (step, batch, seed); checkpoint in runs/<name> (git-ignored), log and
# report here.
#
#   nice -n 10 retriever-service/training/sasrec-prefix/run.sh &            # from the repository root
#   STEP=5 BATCH=64 DROPOUT=0.5 ATTN=0.5 WD=0 SEEDS="42 7" retriever-service/training/sasrec-prefix/run.sh
#
# A run whose log already ends with the trainer's summary is skipped (rerun with FRESH=1).
set -euo pipefail
cd "$(dirname "$0")/../../.."
here=retriever-service/training/sasrec-prefix
bin="${LLAMAREC:-./target/release/llamarec}"
step="${STEP:-5}"; batch="${BATCH:-64}"; dropout="${DROPOUT:-0.3}"; attn="${ATTN:-0}"; wd="${WD:-0.01}"
for seed in ${SEEDS:-42}; do
  name="sasrec-prefix-st$step-b$batch-d$dropout-a$attn-wd$wd-s$seed"
  log="$here/$name.log"
  if [[ "${FRESH:-0}" != 1 && -f "$log" ]] && grep -q "best epoch" "$log"; then
    echo "$name: done ($log)"; continue
  fi
  echo "$name: training -> runs/$name ($(date -u +%H:%M:%S))"
  LLAMAREC_RETRIEVER__TRAIN__MODEL__KIND=sasrec \
  LLAMAREC_RETRIEVER__TRAIN__MODEL__MAX_LEN=50 \
  LLAMAREC_RETRIEVER__TRAIN__MODEL__NUM_HEADS=2 \
  LLAMAREC_RETRIEVER__TRAIN__MODEL__DROPOUT="$dropout" \
  LLAMAREC_RETRIEVER__TRAIN__MODEL__ATTENTION_DROPOUT="$attn" \
  LLAMAREC_RETRIEVER__TRAIN__OPTIMIZER__WEIGHT_DECAY="$wd" \
  LLAMAREC_RETRIEVER__TRAIN__FIRST_ITEM_TARGET=false \
  LLAMAREC_RETRIEVER__TRAIN__GROUP_BY_LENGTH=true \
  LLAMAREC_RETRIEVER__TRAIN__EACH_TARGET_ONCE=true \
  LLAMAREC_RETRIEVER__TRAIN__SLIDING_STEP="$step" \
  LLAMAREC_RETRIEVER__TRAIN__BATCH_SIZE="$batch" \
  LLAMAREC_RETRIEVER__TRAIN__SEED="$seed" \
    "$bin" train retriever --out "runs/$name" --fresh >"$log" 2>&1
  cp "runs/$name/report.json" "$here/$name.report.json"
done
