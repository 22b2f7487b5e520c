# Sourced by cpu_per_request.sh and grpc_floor.sh: open-loop replays at fixed rates against a
# running gateway, with the user+system CPU time of the gateway, the retriever and the load
# generator per completed request, read from /proc before and after each rate.
#
#   measure_cpu_per_request GATEWAY_ADDR RATES SECONDS LABEL OUT
#
# Needs `bin` (the llamarec binary, for `replay` and `traffic synth`) and the process ids in
# `gateway` and `retriever`. Appends one JSON line per rate to OUT/cpu_per_request.jsonl.

# utime + stime in clock ticks (fields 14 and 15 of /proc/PID/stat; the name has no spaces here).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# The load generator's CPU arrives in this shell's cutime + cstime once it is reaped.
children() { awk '{print $16 + $17}' "/proc/$$/stat"; }

measure_cpu_per_request() {
  local addr=$1 rates=$2 seconds=$3 label=$4 out=$5
  local traffic="$out/traffic.jsonl" hz g0 r0 load0 g1 r1 load1
  [ -f "$traffic" ] || "$bin" traffic synth --out "$traffic" --rate 100 --duration 30 --skip-ranker-share 1 >/dev/null
  # Warm-up: every user's history and retriever state cached, connections open.
  "$bin" replay --traffic "$traffic" --gateway "$addr" --rate 1000 --duration 4 >/dev/null
  hz=$(getconf CLK_TCK)
  for r in ${rates//,/ }; do
    g0=$(ticks "$gateway"); r0=$(ticks "$retriever")
    load0=$(children)
    "$bin" replay --traffic "$traffic" --gateway "$addr" --rate "$r" --duration "$seconds" --json "$out/replay-$label-$r.json" >/dev/null &
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
}
