#!/usr/bin/env bash
# Two Tally builds side by side in one window: alternating rounds of tally-bench (orders-v1
# or fulfilment, C clients, every role in one process) against each, with the CPU each
# process used per command (from /proc, before and after each round).
#
#   bench/compare.sh OLD_TALLY_BIN NEW_TALLY_BIN [ROUNDS] [WORKLOAD] [C] [SECONDS]
#
# Needs Kafka and PostgreSQL up (scripts/services up) and target/release/tally-bench.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OLD=$1; NEW=$2; ROUNDS=${3:-3}; WORKLOAD=${4:-orders-v1}; C=${5:-64}; SECS=${6:-20}
BENCH=${BENCH:-target/release/tally-bench}
PORT=${PORT:-18282}
export TALLY_KAFKA_BROKERS=${TALLY_KAFKA_BROKERS:-127.0.0.1:19092}
export DATABASE_URL=${DATABASE_URL:-postgres://tally:tally@127.0.0.1:15432/tally}
WORK=$(mktemp -d /tmp/tally-compare.XXXX)

snap() { for p in /proc/[0-9]*; do n=$(cat $p/comm 2>/dev/null) || continue; set -- $(cut -d' ' -f14,15 $p/stat 2>/dev/null); echo "${p#/proc/} $n $(( ${1:-0} + ${2:-0} ))"; done; }

round() {
  local name=$1 bin=$2 n=$3
  local prefix="cmp-$name-$n-$(date +%s)"
  # (the state directory through the environment: an older build has no such flag)
  TALLY_STATE_DIR="$WORK/state-$prefix" "$bin" serve --topic-prefix "$prefix" \
    --listen "127.0.0.1:$PORT" >"$WORK/$prefix.log" 2>&1 &
  local pid=$!
  until curl -sf -o /dev/null "http://127.0.0.1:$PORT/readyz"; do sleep 0.2; done
  local a b out
  a=$(snap)
  out=$("$BENCH" --url "http://127.0.0.1:$PORT" --workload "$WORKLOAD" -c "$C" --duration-secs "$SECS")
  b=$(snap)
  kill -TERM $pid; wait $pid || true
  python3 - "$name" "$out" "$a" "$b" <<'PY'
import json, os, sys
name, out = sys.argv[1], json.loads(sys.argv[2])
tck = os.sysconf('SC_CLK_TCK')
def parse(s):
    d = {}
    for l in s.splitlines():
        pid, comm, t = l.split(' ', 2); d[pid] = (comm, int(t))
    return d
a, b = parse(sys.argv[3]), parse(sys.argv[4])
by = {}
for pid, (comm, t) in b.items():
    by[comm] = by.get(comm, 0) + t - a.get(pid, (comm, 0))[1]
n = max(out['commands'], 1)
cpu = {k: v * 1000 / tck / n for k, v in by.items() if v > 0}
serving = sum(v for k, v in cpu.items() if k in ('tally', 'java', 'postgres'))
extra = f" sagas/s {out['sagas_completed_per_s']}" if out.get('sagas_completed_per_s') else ""
print(f"{name:4s} commands/s {out['commands_per_s']:>6} p50 {out['p50_ms']} p99 {out['p99_ms']}{extra} "
      f"CPU ms/command: tally {cpu.get('tally', 0):.3f} kafka {cpu.get('java', 0):.3f} "
      f"postgres {cpu.get('postgres', 0):.3f} total {serving:.3f}")
PY
}

for n in $(seq 1 "$ROUNDS"); do
  round old "$OLD" "$n"
  round new "$NEW" "$n"
done
echo "logs: $WORK"
