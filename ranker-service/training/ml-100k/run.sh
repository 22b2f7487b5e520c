#!/usr/bin/env bash
# The long ranker training run (issue #15): LoRA r 8 / alpha 32 / dropout .05 on q,v, answer-token
# loss, retriever hard negatives (the candidates the ranker sees when serving), one epoch over
# every training prefix at most, native CPU backprop. Resumes from ./checkpoint (bit-exact on the
# same machine) unless FRESH=1; stop it any time (Ctrl-C, SIGTERM, the end of a session): at most
# checkpoint_every_steps (5 steps = 40 examples) are redone. Progress goes to ./train.log.
#
#   nice -n 10 ranker-service/training/ml-100k/run.sh &    # from the repository root
#
# LLAMAREC=path/to/llamarec runs another build of the CLI (default ./target/release/llamarec).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=ranker-service/training/ml-100k
fresh=()
[[ "${FRESH:-0}" == 1 ]] && fresh=(--fresh)
exec "${LLAMAREC:-./target/release/llamarec}" train ranker --out "$out" "${fresh[@]}" \
  --max-examples 0 --max-minutes 0 \
  --lr 0.0002 --warmup-steps 25 --grad-accum 8 \
  --eval-every 50 --val-users 200 --negatives retriever --loss answer_token \
  >>"$out/train.log" 2>&1
