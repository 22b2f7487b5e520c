#!/usr/bin/env bash
# Retriever-only open-loop sweep (`llamarec bench replay`) against the whole local cluster, once
# per retriever checkpoint, one after the other on the same machine: the shipped ensemble against
# the single LRURec it replaced. Results: docs/bench/retriever_mixed/replay-<name>.json.
# Run from the repository root after `cargo build --release --workspace` and `llamarec fetch`.
set -euo pipefail
out=docs/bench/retriever_mixed
mkdir -p "$out"
for pair in ensemble:retriever-service/checkpoints/ml-100k-ensemble lrurec:retriever-service/checkpoints/ml-100k; do
  name=${pair%%:*}; checkpoint=${pair#*:}
  log=$(mktemp)
  LLAMAREC_RETRIEVER__CHECKPOINT=$checkpoint ./target/release/llamarec up > "$log" 2>&1 &
  up=$!
  for _ in $(seq 1 300); do grep -q "cluster is up" "$log" && break; sleep 1; done
  grep -q "cluster is up" "$log" || { cat "$log"; kill -TERM $up; exit 1; }
  echo "== $name ($checkpoint)"
  ./target/release/llamarec bench replay --two-stage-rates --json "$out/replay-$name.json" 2>&1 | grep -v "^\s*$" | tail -12
  kill -TERM $up; wait $up || true
done
