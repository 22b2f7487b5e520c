#!/usr/bin/env bash
# Issue #16 item 2: the project's prefill (bf16 and f32) and PyTorch's (f32 and bf16 autocast),
# interleaved round by round on the same 623-token prompt with 2 threads, so the ratio comes from
# one sitting. Needs ./target/release/llamarec, `llamarec fetch` and `bash bench/peers/setup.sh`.
#
#   bash bench/peers/prefill_side_by_side.sh OUT_DIR [ROUNDS]     # e.g. docs/bench/bf16/s10-epyc 2
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:?usage: prefill_side_by_side.sh OUT_DIR [ROUNDS]}"
rounds="${2:-2}"
mkdir -p "$out"
grep -o -m1 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ' > "$out/cpu-bf16-features.txt" || true
for round in $(seq 1 "$rounds"); do
  for prec in bf16 f32; do
    LLAMAREC_RANKER__PRECISION=$prec ./target/release/llamarec bench ranker --threads 2 --iters 5 \
      --no-generation --json "$out/project-$prec-r$round.json" > "$out/project-$prec-r$round.log" 2>&1
    grep -o 'prefill [0-9]* tok/s' "$out/project-$prec-r$round.log" | sed "s/^/round $round project $prec: /"
  done
  target/peer-venv/bin/python bench/peers/torch_peer.py --threads 2 --iters 5 --modes prefill_f32,prefill_bf16 \
    --json "$out/torch-r$round.json" > "$out/torch-r$round.log" 2>&1
  python3 -c "import json,sys; m=json.load(open(sys.argv[1]))['modes']; [print(f'round {sys.argv[2]} torch {k}: {v[\"tok_per_s\"]:.0f} tok/s') for k,v in m.items()]" "$out/torch-r$round.json" "$round"
done
