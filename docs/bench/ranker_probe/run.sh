#!/usr/bin/env bash
# The runs behind docs/bench/ranker_probe/README.md, as they ran on 2026-12-07 (2 cores shared
# with other builds and tests, so one torch thread per run and the two models side by side).
# Prerequisites: bash bench/peers/setup.sh; ./target/release/llamarec fetch; the Gemma GGUF
# assembled at target/gemma3/gemma-3-270m-q4_k_m.gguf (README, "Gemma 3 270M").
# N = training examples per model (default 320), evaluations at 0, N/2 and N. On 2026-12-07 the
# Gemma run was stopped by hand after 216 examples (deadline): its last evaluation is at 160.
set -euo pipefail
cd "$(dirname "$0")/../../.."
N="${N:-320}"
out=docs/bench/ranker_probe
export_file=target/ranker-probe/export.jsonl
py=target/peer-venv/bin/python
state=ranker-service/training/ml-100k-all-linear/checkpoint/trainer_state.json
mkdir -p target/ranker-probe

# 1. The Rust trainer's own examples: the recipe of ranker-service/training/ml-100k-all-linear/run.sh,
#    the first 7,100 training examples (that run's checkpoint saw 7,040) and its 200 validation users.
[[ -s "$export_file" ]] || nice -n 5 ./target/release/llamarec train ranker --export-examples "$export_file" \
  --max-examples 7100 \
  --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --lr 0.001 --warmup-steps 10 --grad-accum 8 \
  --eval-every 50 --val-users 200 --negatives mixed --loss answer_token

# 2. SmolLM2-135M (the project's GGUF, the Rust tokenizer's exported ids) and 3. Gemma 3 270M (its
#    own GGUF tokenizer on the exported prompt text), side by side, one thread each: untuned
#    evaluation, then N examples of the run.sh recipe with evaluations at N/2 and N.
nice -n 5 $py bench/peers/ranker_probe.py --export "$export_file" \
  --gguf assets/models/SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2-135m --tokens export \
  --rust-state "$state" --train "$N" --eval-at "0,$((N / 2)),end" --precision bf16 --threads 1 \
  --json $out/smollm2-135m.json --md $out/smollm2-135m.md > target/ranker-probe/smollm2.log 2>&1 &
nice -n 5 $py bench/peers/ranker_probe.py --export "$export_file" \
  --gguf target/gemma3/gemma-3-270m-q4_k_m.gguf --name gemma3-270m --tokens hf \
  --train "$N" --eval-at "0,$((N / 2)),end" --precision bf16 --threads 1 \
  --json $out/gemma3-270m.json --md $out/gemma3-270m.md > target/ranker-probe/gemma3.log 2>&1 &

# 4. The Rust run's latest adapter (checkpoint/, step 880 = 7,040 examples) under PyTorch: the
#    forward-only loss of its last 80 training examples (6,960..7,039; the run logged steps
#    871-880 for them) and the validation it never ran.
nice -n 5 $py bench/peers/ranker_probe.py --export "$export_file" \
  --gguf assets/models/SmolLM2-135M-Instruct.Q4_1.gguf --name rust-checkpoint-step880 --tokens export \
  --adapter ranker-service/training/ml-100k-all-linear/checkpoint --loss-on 6960:7040 --eval-at 0 --threads 1 \
  --json $out/rust-adapter-step880.json --md $out/rust-adapter-step880.md > target/ranker-probe/rust880.log 2>&1
wait
#    ... and its best adapter (step 50), whose validation the Rust run logged.
nice -n 5 $py bench/peers/ranker_probe.py --export "$export_file" \
  --gguf assets/models/SmolLM2-135M-Instruct.Q4_1.gguf --name rust-best-step50 --tokens export \
  --adapter ranker-service/training/ml-100k-all-linear --eval-at 0 --threads 1 \
  --json $out/rust-adapter-step50.json --md $out/rust-adapter-step50.md

# 5. Tables.
python3 bench/peers/ranker_probe_report.py --rust "$state" \
  --rust-run smollm2-135m --export "$export_file" \
  --run smollm2-135m=$out/smollm2-135m.json --run gemma3-270m=$out/gemma3-270m.json \
  --run rust-step880-adapter=$out/rust-adapter-step880.json --run rust-step50-adapter=$out/rust-adapter-step50.json \
  --bucket 40 > $out/tables.md
