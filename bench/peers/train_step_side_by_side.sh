#!/usr/bin/env bash
# Seconds per LoRA training example, this project's native step and PyTorch+PEFT f32, interleaved
# round by round in one run so that a noisy machine moves both alike (ratios hold, absolute times
# do not). Needs a release build and `bash bench/peers/setup.sh`. Pause background work first.
#
#   bash bench/peers/train_step_side_by_side.sh OUT_DIR [ROUNDS] [LLAMAREC]    # PEER_PYTHON=... another venv
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: $0 OUT_DIR [ROUNDS] [LLAMAREC]}
rounds=${2:-2}
llamarec=${3:-./target/release/llamarec}
python=${PEER_PYTHON:-target/peer-venv/bin/python}
mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds: llamarec native"
  "$llamarec" bench train-step --backprop native --iters 4 --json "$out/rust-$r.json" | grep -E '^native' || true
  echo "round $r/$rounds: PyTorch+PEFT f32"
  "$python" bench/peers/torch_peer.py --threads 2 --warmup 1 --iters 3 --modes train_f32 \
    --json "$out/torch-$r.json" | grep -iE 'train_f32|s per' || true
done
python3 - "$out" "$rounds" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
rows = []
for r in range(1, rounds + 1):
    rust = json.load(open(f"{out}/rust-{r}.json"))
    torch = json.load(open(f"{out}/torch-{r}.json"))
    rs = next(x["seconds_per_example"] for x in rust["results"] if x["backprop"] == "native")
    ts = torch["modes"]["train_f32"]["median_s"]
    rows.append((r, rs, ts, rs / ts))
print("| round | native s/example | PyTorch+PEFT f32 s/example | ratio |")
print("|---|---|---|---|")
for r, rs, ts, q in rows:
    print(f"| {r} | {rs:.2f} | {ts:.2f} | {q:.2f} |")
print(f"| median | {statistics.median(x[1] for x in rows):.2f} | {statistics.median(x[2] for x in rows):.2f} | {statistics.median(x[3] for x in rows):.2f} |")
PY
