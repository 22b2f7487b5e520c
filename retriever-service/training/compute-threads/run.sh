#!/usr/bin/env bash
# Issue #17: what the training step's thread count costs on this machine. The sasrec-d03-h2
# recipe for EPOCHS epochs (training + validation, process start included), three ways:
#   two   - one run, compute_threads = 0 (candle's default: one thread per core)
#   one   - one run, compute_threads = 1
#   pair  - two runs (seeds 42 and 7) side by side, compute_threads = 1 and one validation
#           thread each: what `llamarec train retriever --seeds` does
# Writes results.json beside this script (wall seconds, per epoch, and the CPU's SIMD flags).
#
#   retriever-service/training/compute-threads/run.sh      # from the repository root, idle machine
set -euo pipefail
cd "$(dirname "$0")/../../.."
here=retriever-service/training/compute-threads
bin="${LLAMAREC:-./target/release/llamarec}"
epochs="${EPOCHS:-4}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
source retriever-service/training/sasrec-d03-h2/recipe.sh
export LLAMAREC_RETRIEVER__TRAIN__MAX_EPOCHS="$epochs" LLAMAREC_RETRIEVER__TRAIN__PROGRESS=false
run() { # name threads seed eval_threads
  LLAMAREC_RETRIEVER__TRAIN__COMPUTE_THREADS="$2" LLAMAREC_RETRIEVER__TRAIN__SEED="$3" \
  LLAMAREC_RETRIEVER__TRAIN__EVAL_THREADS="$4" "$bin" train retriever --out "$tmp/$1-$3" --fresh >"$tmp/$1-$3.log" 2>&1
}
now() { date +%s.%N; }
t0=$(now); run two 0 42 2; t1=$(now); run one 1 42 2; t2=$(now)
run pair 1 42 1 & run pair 1 7 1; wait; t3=$(now)
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_bf16|amx_bf16)$' | paste -sd, -)
python3 - "$epochs" "$t0" "$t1" "$t2" "$t3" "$flags" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" "$(nproc)" >"$here/results.json" <<'PY'
import json, sys, datetime
e, t0, t1, t2, t3, flags, cpu, cores = int(sys.argv[1]), *map(float, sys.argv[2:6]), sys.argv[6], sys.argv[7], int(sys.argv[8])
rows = {"two threads, one run": t1 - t0, "one thread, one run": t2 - t1, "one thread each, two runs side by side": t3 - t2}
print(json.dumps({"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
                  "cpus": cores, "simd": flags, "recipe": "sasrec-d03-h2", "epochs": e,
                  "wall_s": rows, "runs_per_hour": {k: 3600 / v * (2 if "two runs" in k else 1) for k, v in rows.items()}}, indent=2))
PY
cat "$here/results.json"
