#!/usr/bin/env bash
# Issue #15's recipe comparison: the paper's training data (every training prefix; the ground
# truth plus 19 random negatives not in the history, shuffled) against ../ml-100k (the retriever's
# hard negatives), everything else equal (LoRA r 8 / alpha 32 / dropout .05 on q,v, answer-token
# loss, lr 2e-4, 25 warm-up steps, 8 examples per step, the same 200 validation users, validated on
# the retriever's top 20 as served). Resumes from ./checkpoint unless FRESH=1.
#
#   nice -n 10 ranker-service/training/ml-100k-random/run.sh &    # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=ranker-service/training/ml-100k-random
fresh=()
[[ "${FRESH:-0}" == 1 ]] && fresh=(--fresh)
exec "${LLAMAREC:-./target/release/llamarec}" train ranker --out "$out" "${fresh[@]}" \
  --max-examples 0 --max-minutes 0 \
  --lr 0.0002 --warmup-steps 25 --grad-accum 8 \
  --eval-every 25 --val-users 200 --negatives random --loss answer_token \
  >>"$out/train.log" 2>&1
