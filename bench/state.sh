#!/usr/bin/env bash
# Bounded state figures (issue 11, ADR 10): resident memory of a processor process holding
# ORDERS orders, during the run and after a restart; time from process start to the first
# accepted command after SIGTERM and after SIGKILL; and a takeover by a process with an
# EMPTY local store (aggregates restored per second from the compacted changelog), after a
# workload that writes about five versions of each order.
#
#   cargo build --release -p tally -p bench && bench/state.sh
#
# Needs Kafka and PostgreSQL up (scripts/services up). Prints one line per figure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ORDERS=${ORDERS:-2000000}
VERSIONED_ORDERS=${VERSIONED_ORDERS:-100000}
PARTITIONS=${PARTITIONS:-4}
BIN=target/release/tally
BENCH=target/release/tally-bench
PORT=${PORT:-18181}
URL="http://127.0.0.1:$PORT"
export TALLY_KAFKA_BROKERS=${TALLY_KAFKA_BROKERS:-127.0.0.1:19092}
export DATABASE_URL=${DATABASE_URL:-postgres://tally:tally@127.0.0.1:15432/tally}
WORK=$(mktemp -d /tmp/tally-state-bench.XXXX)
PID=""
trap '[ -n "$PID" ] && kill -9 $PID 2>/dev/null; true' EXIT

now() { date +%s.%N; }
rss_mb() { awk '/VmRSS/ {printf "%.0f\n", $2/1024}' "/proc/$1/status"; }
threads() { awk '/Threads/ {print $2}' "/proc/$1/status"; }

# start NAME PREFIX STATE_DIR: a `tally serve --roles api,commands` in the background.
start() {
  "$BIN" serve --roles api,commands --topic-prefix "$2" --partitions "$PARTITIONS" \
    --listen "127.0.0.1:$PORT" --state-dir "$3" >>"$WORK/$1.log" 2>&1 &
  PID=$!
}

# Seconds from `since` until a restock is accepted (the first command the process takes).
first_accepted() {
  local since=$1
  until curl -sf -o /dev/null -X POST "$URL/v1/inventory/BENCH-SKU/restock" \
      -H 'content-type: application/json' -d '{"quantity":1}'; do
    sleep 0.05
  done
  echo "$(now) - $since" | bc
}

ready() { until curl -sf -o /dev/null "$URL/readyz"; do sleep 0.1; done; }

restored_records() {
  grep -h "partition state restored" "$WORK/$1.log" | grep -o 'records=[0-9]*' | cut -d= -f2 | paste -sd+ | bc
}

# ---- 1. memory with ORDERS orders
P1="state-bench-$(date +%s)"
start a "$P1" "$WORK/a"
ready
MAX=0
( while kill -0 $PID 2>/dev/null; do rss_mb $PID; sleep 1; done ) >"$WORK/rss.txt" &
SAMPLER=$!
"$BENCH" --url "$URL" --workload create-only --orders "$ORDERS" -c 64 --duration-secs 100000 >"$WORK/create.json"
kill $SAMPLER 2>/dev/null || true
MAX=$(sort -n "$WORK/rss.txt" | tail -1)
echo "orders: $ORDERS ($(cat "$WORK/create.json"))"
echo "rss during the run (max): ${MAX} MB; after the run: $(rss_mb $PID) MB; threads: $(threads $PID)"

# ---- 2. graceful restart (SIGTERM), same store
kill -TERM $PID; wait $PID || true
T0=$(now); start a "$P1" "$WORK/a"
echo "restart after SIGTERM: first accepted command $(first_accepted "$T0") s after start"
ready; sleep 2
echo "rss after restart: $(rss_mb $PID) MB"

# ---- 3. restart after SIGKILL, same store
kill -9 $PID; wait $PID 2>/dev/null || true
T0=$(now); start a "$P1" "$WORK/a"
echo "restart after SIGKILL: first accepted command $(first_accepted "$T0") s after start (session timeout 10 s)"
kill -TERM $PID; wait $PID || true

# ---- 4. takeover with an empty store after ~5 versions per order
P2="state-bench-v-$(date +%s)"
start v "$P2" "$WORK/v"
ready
"$BENCH" --url "$URL" --workload orders-v1 --orders "$VERSIONED_ORDERS" -c 64 --duration-secs 100000 >"$WORK/v1.json"
echo "versioned workload: $(cat "$WORK/v1.json")"
kill -TERM $PID; wait $PID || true
sleep "${COMPACTION_WAIT:-30}"   # let the log cleaner compact the closed segments
T0=$(now); start empty "$P2" "$WORK/empty"
ready
T=$(echo "$(now) - $T0" | bc)
N=$(restored_records empty)
echo "takeover with an empty store: $N state records restored, ready ${T} s after start: $(echo "$N / $T" | bc) aggregates/s (whole start included)"
grep -h "partition state restored" "$WORK/empty.log" | grep 'stream="order"' | sed 's/.*partition=/  order partition=/'
kill -TERM $PID; wait $PID || true
PID=""
echo "logs: $WORK"
