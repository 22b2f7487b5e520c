#!/usr/bin/env bash
# CPU time per retriever-only Recommend, per process: the local cluster (`llamarec up`) under an
# open-loop replay at a fixed rate, with each process's user+system CPU read from /proc before
# and after. On a machine where the load generator shares the cores with the cluster, the sum
# of the three columns bounds the throughput (cores / CPU per request).
#
#   deploy/local/cpu_per_request.sh [RATES=2500] [SECONDS=10] [LABEL=current] [OUT=runs/bench/cpu]
#
# RATES: requests per second, or a comma-separated list run one after another on one cluster.
# BIN=path/to/llamarec picks another build (to compare builds side by side); LLAMAREC_* variables
# override the configuration as usual (e.g. LLAMAREC_GATEWAY__RETRIEVE_DENSE_INDICES=false).
# Appends one JSON line to OUT/cpu_per_request.jsonl and prints it. Ports are offset (+200) from
# the shipped defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."

rate=${1:-2500}  # one rate or a comma-separated list
seconds=${2:-10}
label=${3:-current}
out=${4:-runs/bench/cpu}
bin=${BIN:-./target/release/llamarec}
mkdir -p "$out"

source deploy/local/cluster.sh
start_cluster 200 "$out" "$out/cluster-$label.log"
# utime + stime in clock ticks (fields 14 and 15 of /proc/PID/stat; the name has no spaces here).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

traffic="$out/traffic.jsonl"
[ -f "$traffic" ] || "$bin" traffic synth --out "$traffic" --rate 100 --duration 30 --skip-ranker-share 1 >/dev/null
# Warm-up: every user's retriever state and history cached, connections open.
"$bin" replay --traffic "$traffic" --gateway "$LLAMAREC_GATEWAY__LISTEN" --rate 1000 --duration 4 >/dev/null

# The load generator's CPU arrives in this shell's cutime + cstime once it is reaped.
children() { awk '{print $16 + $17}' "/proc/$$/stat"; }
hz=$(getconf CLK_TCK)
for r in ${rate//,/ }; do
  g0=$(ticks "$gateway"); r0=$(ticks "$retriever")
  load0=$(children)
  "$bin" replay --traffic "$traffic" --gateway "$LLAMAREC_GATEWAY__LISTEN" --rate "$r" --duration "$seconds" --json "$out/replay-$label-$r.json" >/dev/null &
  wait $!
  g1=$(ticks "$gateway"); r1=$(ticks "$retriever")
  load1=$(children)
  python3 - "$out/replay-$label-$r.json" "$label" "$r" "$hz" "$((g1 - g0))" "$((r1 - r0))" "$((load1 - load0))" <<'PY' | tee -a "$out/cpu_per_request.jsonl"
import json, sys
report, label, rate, hz, g, r, l = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), *map(int, sys.argv[5:8])
rep = json.load(open(report))
done = rep.get("completed") or 1
us = lambda ticks: round(ticks / hz / done * 1e6, 1)
lat = rep["latency"]
print(json.dumps({"label": label, "offered_rps": rate, "completed": done, "errors": rep.get("errors"),
  "throughput_rps": round(rep["throughput"], 1), "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
  "cpu_us_per_request": {"gateway": us(g), "retriever": us(r), "load_generator": us(l)}}))
PY
done
