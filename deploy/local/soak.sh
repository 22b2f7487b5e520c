#!/usr/bin/env bash
# Soak: the local cluster (`llamarec up`) under a steady open-loop replay for a while, with the
# resident memory (VmRSS) of each service sampled every few seconds. Memory that keeps growing
# under constant traffic is a leak or an unbounded cache; it should rise while caches warm and
# then stay flat.
#
#   deploy/local/soak.sh [SECONDS=600] [RATE=50] [SKIP_RANKER_SHARE=0.998] [OUT=runs/bench/soak]
#
# Writes OUT/rss.csv (t_s, gateway_kb, retriever_kb, ranker_kb), OUT/replay.json (the replay
# report) and prints a table of RSS per minute. Ports are offset (+100) from the shipped
# defaults so a soak can run beside a cluster on the usual ports.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${1:-600}
rate=${2:-50}
skip_share=${3:-0.998}
out=${4:-runs/bench/soak}
interval=10
bin=./target/release/llamarec
mkdir -p "$out"

source deploy/local/cluster.sh
start_cluster 100 "$out" "$out/cluster.log"
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

"$bin" traffic synth --out "$out/traffic.jsonl" --rate "$rate" --duration 60 --skip-ranker-share "$skip_share" >/dev/null
"$bin" replay --traffic "$out/traffic.jsonl" --gateway "$LLAMAREC_GATEWAY__LISTEN" --rate "$rate" --duration "$seconds" --json "$out/replay.json" >"$out/replay.log" 2>&1 &
replay_pid=$!

echo "t_s,gateway_kb,retriever_kb,ranker_kb" >"$out/rss.csv"
start=$(date +%s)
while kill -0 "$replay_pid" 2>/dev/null; do
  echo "$(( $(date +%s) - start )),$(rss "$gateway"),$(rss "$retriever"),$(rss "$ranker")" >>"$out/rss.csv"
  sleep "$interval"
done
wait "$replay_pid"
echo "$(( $(date +%s) - start )),$(rss "$gateway"),$(rss "$retriever"),$(rss "$ranker")" >>"$out/rss.csv"

tail -n 12 "$out/replay.log"
echo
echo "| minute | gateway MB (max) | retriever MB (max) | ranker MB (max) |"
echo "|---|---|---|---|"
awk -F, 'NR > 1 { m = int($1 / 60); if (!(m in seen)) { seen[m] = 1; order[++n] = m }
                  if ($2 > g[m]) g[m] = $2; if ($3 > r[m]) r[m] = $3; if ($4 > k[m]) k[m] = $4 }
         END { for (i = 1; i <= n; i++) { m = order[i]; printf "| %d | %.1f | %.1f | %.1f |\n", m, g[m] / 1024, r[m] / 1024, k[m] / 1024 } }' "$out/rss.csv"
