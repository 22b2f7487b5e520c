#!/usr/bin/env bash
# The floor under a retriever-only Recommend on this machine: the same open-loop replay and CPU
# accounting as cpu_per_request.sh, against `gateway/examples/grpc_floor.rs` (a pass-through
# gateway and a fixed-answer retriever: the two tonic hops with none of our work behind them).
#
#   deploy/local/grpc_floor.sh [RATES=2500] [SECONDS=10] [LABEL=floor] [OUT=runs/bench/cpu]
#
# Appends one JSON line per rate to OUT/cpu_per_request.jsonl, comparable line for line with
# cpu_per_request.sh's. Ports 50450 (gateway) and 50451 (retriever).
set -euo pipefail
cd "$(dirname "$0")/../.."

rate=${1:-2500}
seconds=${2:-10}
label=${3:-floor}
out=${4:-runs/bench/cpu}
bin=${BIN:-./target/release/llamarec}
floor=./target/release/examples/grpc_floor
mkdir -p "$out"
[ -x "$floor" ] || cargo build --release --locked -p gateway --example grpc_floor

"$floor" retriever 127.0.0.1:50451 & retriever=$!
"$floor" gateway 127.0.0.1:50450 127.0.0.1:50451 & gateway=$!
trap 'kill $gateway $retriever 2>/dev/null || true' EXIT
sleep 1

source deploy/local/cpu_measure.sh
measure_cpu_per_request 127.0.0.1:50450 "$rate" "$seconds" "$label" "$out"
