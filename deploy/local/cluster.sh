# Sourced by the local benchmark scripts (soak.sh, cpu_per_request.sh): starts the local cluster
# (`$bin up`) on ports offset from the shipped defaults, so it can run beside a cluster on the
# usual ports, waits for it, finds its three service processes, and stops it when the script
# exits.
#
#   start_cluster OFFSET OUT_DIR LOG_FILE
#
# Needs `bin` (the llamarec binary). Sets up_pid, gateway, retriever, ranker (process ids) and
# exports the LLAMAREC_* overrides (gateway address: $LLAMAREC_GATEWAY__LISTEN).
start_cluster() {
  local offset=$1 out=$2 log=$3
  export LLAMAREC_GATEWAY__LISTEN=127.0.0.1:$((50050 + offset)) LLAMAREC_GATEWAY__METRICS_LISTEN=127.0.0.1:$((9090 + offset))
  export LLAMAREC_GATEWAY__RETRIEVER=127.0.0.1:$((50051 + offset)) LLAMAREC_GATEWAY__RANKERS__ADDRESSES="[\"127.0.0.1:$((50052 + offset))\"]"
  export LLAMAREC_RETRIEVER__METRICS_LISTEN=127.0.0.1:$((9091 + offset)) LLAMAREC_RANKER__METRICS_LISTEN=127.0.0.1:$((9092 + offset))
  export LLAMAREC_GATEWAY__STORE__PATH="$out/histories.redb" LLAMAREC_TELEMETRY__LOG_LEVEL=warn

  "$bin" up >"$log" 2>&1 &
  up_pid=$!
  trap 'kill -INT $up_pid 2>/dev/null; wait $up_pid 2>/dev/null || true' EXIT
  for _ in $(seq 1 180); do
    grep -q "cluster is up" "$log" && break
    sleep 1
  done
  grep -q "cluster is up" "$log" || { echo "cluster did not come up; see $log" >&2; exit 1; }

  gateway=$(pgrep -P "$up_pid" -f "serve gateway" | head -n 1)
  retriever=$(pgrep -P "$up_pid" -f "serve retriever" | head -n 1)
  ranker=$(pgrep -P "$up_pid" -f "serve ranker" | head -n 1)
  [[ -n "$gateway" && -n "$retriever" && -n "$ranker" ]] || { echo "could not find the three service processes under pid $up_pid" >&2; pgrep -a -P "$up_pid" >&2; exit 1; }
}
