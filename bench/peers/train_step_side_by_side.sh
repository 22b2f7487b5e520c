#!/usr/bin/env bash
# Seconds per LoRA training example, this project's native step and PyTorch+PEFT f32, interleaved
# round by round in one run so that a noisy machine moves both alike (ratios hold, absolute times
# do not). On a CPU with AVX-512 BF16 also the native step with bf16 frozen products and PyTorch
# under bf16 autocast. Needs a release build and `bash bench/peers/setup.sh`. Pause background
# work first.
#
#   bash bench/peers/train_step_side_by_side.sh OUT_DIR [ROUNDS] [LLAMAREC]    # PEER_PYTHON=... another venv
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: $0 OUT_DIR [ROUNDS] [LLAMAREC]}
rounds=${2:-2}
llamarec=${3:-./target/release/llamarec}
python=${PEER_PYTHON:-target/peer-venv/bin/python}
mkdir -p "$out"
ours=native
theirs=train_f32
if grep -qw avx512_bf16 /proc/cpuinfo; then
  ours=native,native-bf16
  theirs=train_f32,train_bf16
fi
for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds: llamarec $ours"
  "$llamarec" bench train-step --backprop "$ours" --iters 4 --json "$out/rust-$r.json" | grep -E '^native' || true
  echo "round $r/$rounds: PyTorch+PEFT $theirs"
  "$python" bench/peers/torch_peer.py --threads 2 --warmup 1 --iters 3 --modes "$theirs" \
    --json "$out/torch-$r.json" | grep -iE 'train_|s per' || true
done
python3 - "$out" "$rounds" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
rows = []
for r in range(1, rounds + 1):
    rust = json.load(open(f"{out}/rust-{r}.json"))
    torch = json.load(open(f"{out}/torch-{r}.json"))
    ours = {x["backprop"]: x["seconds_per_example"] for x in rust["results"]}
    theirs = {m: v["median_s"] for m, v in torch["modes"].items()}
    rows.append((r, ours, theirs))
pairs = [("native", "train_f32")] + ([("native_bf16", "train_bf16")] if "native_bf16" in rows[0][1] else [])
head = "| round |" + "".join(f" {o} s | PyTorch {t} s | ratio |" for o, t in pairs)
print(head)
print("|---|" + "---|---|---|" * len(pairs))
cells = lambda o, t: (o, t, o / t)
for r, ours, theirs in rows:
    print(f"| {r} |" + "".join(" %.2f | %.2f | %.2f |" % cells(ours[o], theirs[t]) for o, t in pairs))
med = lambda xs: statistics.median(list(xs))
print("| median |" + "".join(" %.2f | %.2f | %.2f |" % (med(x[1][o] for x in rows), med(x[2][t] for x in rows), med(x[1][o] / x[2][t] for x in rows)) for o, t in pairs))
PY
