#!/usr/bin/env bash
# Issue #15, session 9: after `--overfit 8` showed the trainer memorizes 8 examples in ~20 steps
# at lr 1e-3 (loss 6.9 -> 0.001: the gradients reach the adapter), the flat ~ln 20 loss of the
# q,v runs at lr 2e-4 is a recipe limit, not a bug. This run gives the adapter more room and a
# faster rate: LoRA r 8 / alpha 32 on every linear projection (q,k,v,o,gate,up,down), lr 1e-3,
# mixed negatives (half the retriever's hard negatives, half uniform), 8 examples per step,
# validated every 50 steps on the same 200 users as ../ml-100k-random. Resumes unless FRESH=1.
#
#   nice -n 10 ranker-service/training/ml-100k-all-linear/run.sh &    # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=ranker-service/training/ml-100k-all-linear
fresh=()
[[ "${FRESH:-0}" == 1 ]] && fresh=(--fresh)
exec "${LLAMAREC:-./target/release/llamarec}" train ranker --out "$out" "${fresh[@]}" \
  --max-examples 0 --max-minutes 0 \
  --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --lr 0.001 --warmup-steps 10 --grad-accum 8 \
  --eval-every 50 --val-users 200 --negatives mixed --loss answer_token \
  >>"$out/train.log" 2>&1
