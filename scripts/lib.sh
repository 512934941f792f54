# Shared settings and helpers for scripts/*. Sourced, not run.
# Every setting can be overridden from the environment (see .env.example).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${TALLY_DATA_DIR:-$ROOT/.data}"

KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/scripts/kafka/pom.xml")"
KAFKA_PORT="${TALLY_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${TALLY_KAFKA_CONTROLLER_PORT:-19093}"
KAFKA_HEAP="${TALLY_KAFKA_HEAP:-512m}"
# Brokers of the local Kafka: 1 (the default) or a KRaft cluster of N (scripts/services
# up --brokers N). Broker i listens on KAFKA_PORT + (i-1)*KAFKA_PORT_STEP, its controller
# on KAFKA_CONTROLLER_PORT + (i-1)*KAFKA_PORT_STEP. The count `up` started is remembered.
KAFKA_BROKER_COUNT="${TALLY_KAFKA_BROKER_COUNT:-$(cat "$DATA/kafka.brokers" 2>/dev/null || echo 1)}"
KAFKA_PORT_STEP="${TALLY_KAFKA_PORT_STEP:-10}"
PG_PORT="${TALLY_PG_PORT:-15432}"
PG_CLUSTER="${TALLY_PG_CLUSTER:-tally}"
PG_USER="${TALLY_PG_USER:-tally}"
PG_PASSWORD="${TALLY_PG_PASSWORD:-tally}"
PG_DB="${TALLY_PG_DB:-tally}"
READY_TIMEOUT="${TALLY_READY_TIMEOUT:-90}"

# Ports of broker $1 (1-based): its client port and its controller port.
kafka_port() { echo $((KAFKA_PORT + ($1 - 1) * KAFKA_PORT_STEP)); }
kafka_controller_port() { echo $((KAFKA_CONTROLLER_PORT + ($1 - 1) * KAFKA_PORT_STEP)); }
_bootstrap=""
for ((_i = 1; _i <= KAFKA_BROKER_COUNT; _i++)); do
  _bootstrap="${_bootstrap:+$_bootstrap,}127.0.0.1:$(kafka_port "$_i")"
done
export TALLY_KAFKA_BROKERS="${TALLY_KAFKA_BROKERS:-$_bootstrap}"
unset _bootstrap _i
# A cluster replicates what Tally creates 3 ways (or over every broker, if fewer).
if [ "$KAFKA_BROKER_COUNT" -gt 1 ]; then
  export TALLY_REPLICATION_FACTOR="${TALLY_REPLICATION_FACTOR:-$((KAFKA_BROKER_COUNT < 3 ? KAFKA_BROKER_COUNT : 3))}"
fi
export DATABASE_URL="${DATABASE_URL:-postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB}"

log() { printf '\033[1m[tally]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[tally] error:\033[0m %s\n' "$*" >&2; exit 1; }

# Runs apt-get install for the packages given, once per script run updating the lists.
apt_install() {
  command -v apt-get >/dev/null || die "need $* but apt-get is not available: install them by hand"
  if [ -z "${_APT_UPDATED:-}" ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    _APT_UPDATED=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
    || die "apt-get install $* failed"
}

# Waits until "$@" succeeds, up to $READY_TIMEOUT seconds; $1 of the message names the thing.
wait_until() {
  local what="$1"; shift
  local deadline=$((SECONDS + READY_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
  log "$what is ready"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Makes sure the Rust toolchain and the C toolchain that librdkafka builds with are here.
ensure_build_tools() {
  local missing=()
  command -v cc >/dev/null || missing+=(gcc)
  command -v make >/dev/null || missing+=(make)
  command -v g++ >/dev/null || missing+=(g++)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs), then run this again"
}
