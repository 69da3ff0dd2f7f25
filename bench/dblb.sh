#!/usr/bin/env bash
# pgbench against one PostgreSQL server directly, through the DBLB and through PgBouncer, one
# after the other on this machine: select-only and TPC-B-like transactions on long-lived
# connections, and select-only with a new connection per transaction (-C). Each proxy runs in
# session mode and in transaction mode (POOL server connections shared by CLIENTS clients);
# trust authentication everywhere, so the figures are the proxies' own, not password hashing.
#
#   bench/dblb.sh            # needs: sudo apt-get install -y postgresql pgbouncer
#   CLIENTS=32 DURATION=30 bench/dblb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-16}
POOL=${POOL:-8}
DURATION=${DURATION:-15}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/marchproxy-target}"

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$pgbin" ] || { echo "PostgreSQL is missing; run: sudo apt-get install -y postgresql" >&2; exit 1; }
pgbouncer=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[ -x "$pgbouncer" ] || { echo "PgBouncer is missing; run: sudo apt-get install -y pgbouncer" >&2; exit 1; }
cargo build -q --release -p marchproxy-dblb
bin="$CARGO_TARGET_DIR/release/marchproxy-dblb"

work=$(mktemp -d)
chmod 755 "$work"
pids=()
# runuser does not pass signals on, so PostgreSQL and PgBouncer are stopped through their pid files.
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for file in "$work"/pgbouncer-*.pid; do [ -f "$file" ] && kill "$(cat "$file")" 2>/dev/null; done
  [ -f "$work/data/postmaster.pid" ] && kill -INT "$(head -1 "$work/data/postmaster.pid")" 2>/dev/null
  for _ in $(seq 100); do [ -f "$work/data/postmaster.pid" ] || break; sleep 0.1; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
# PostgreSQL and PgBouncer refuse to run as root.
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres: "$work"

as_owner "$pgbin/initdb" -D "$work/data" -U postgres --auth=trust --no-sync >/dev/null
as_owner "$pgbin/postgres" -D "$work/data" -p 19432 -c listen_addresses=127.0.0.1 -c unix_socket_directories="$work" \
  -c max_connections=300 -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off 2>"$work/postgres.log" & pids+=($!)
wait_port 19432
until "$pgbin/pg_isready" -q -h 127.0.0.1 -p 19432; do sleep 0.1; done
"$pgbin/pgbench" -h 127.0.0.1 -p 19432 -U postgres -i -q -s 10 postgres >/dev/null 2>&1

# The DBLB: session mode on 19433, transaction mode on 19437; like PgBouncer below, it checks
# no password (auth_type trust) and keeps its server logins for the next clients.
cat > "$work/dblb.toml" <<TOML
[module]
auth_type = "trust"
[[routes]]
route_id = "session"
protocol = "postgres"
destination_pattern = "127.0.0.1:19432"
metadata = { listener_port = "19433" }
[[routes]]
route_id = "transaction"
protocol = "postgres"
destination_pattern = "127.0.0.1:19432"
metadata = { listener_port = "19437", pool_mode = "transaction", max_connections = "$POOL" }
TOML
RUST_LOG=warn "$bin" --config "$work/dblb.toml" --listen postgres=127.0.0.1:19433 --listen postgres=127.0.0.1:19437 \
  --grpc-listen 127.0.0.1:19434 --admin-listen 127.0.0.1:19435 & pids+=($!)
wait_port 19433

# PgBouncer: session mode on 19436, transaction mode on 19438.
echo '"postgres" ""' > "$work/users.txt"
for mode in session:19436:200 transaction:19438:$POOL; do
  IFS=: read -r pool_mode port size <<< "$mode"
  cat > "$work/pgbouncer-$pool_mode.ini" <<INI
[databases]
* = host=127.0.0.1 port=19432
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $work/users.txt
pool_mode = $pool_mode
max_client_conn = 1000
default_pool_size = $size
logfile = $work/pgbouncer-$pool_mode.log
pidfile = $work/pgbouncer-$pool_mode.pid
INI
  [ "$(id -u)" = 0 ] && chown postgres: "$work/pgbouncer-$pool_mode.ini" "$work/users.txt"
  as_owner "$pgbouncer" "$work/pgbouncer-$pool_mode.ini" >/dev/null 2>&1 & pids+=($!)
  wait_port "$port"
done

# Transactions per second of pgbench "$@" on port $1.
tps() {
  local port=$1; shift
  "$pgbin/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -c "$CLIENTS" -j 2 -T "$DURATION" "$@" postgres 2>&1 \
    | awk '/^tps = / { printf "%.0f", $3; found = 1 } END { if (!found) exit 1 }'
}

printf '\npgbench, %s clients, %s s per run, scale 10, transaction pools of %s server connections\n' "$CLIENTS" "$DURATION" "$POOL"
printf '(one run after another on this machine; transactions per second)\n'
printf '%-24s %14s %14s %20s\n' "" "select-only" "TPC-B-like" "select-only -C"
declare -A result
for target in direct:19432 dblb-session:19433 pgbouncer-session:19436 dblb-transaction:19437 pgbouncer-transaction:19438; do
  name=${target%%:*} port=${target##*:}
  result[$name,S]=$(tps "$port" -S)
  result[$name,B]=$(tps "$port")
  result[$name,C]=$(tps "$port" -S -C)
  printf '%-24s %14s %14s %20s\n' "$name" "${result[$name,S]}" "${result[$name,B]}" "${result[$name,C]}"
done
for mode in session transaction; do
  for kind in S B C; do
    awk -v m="$mode" -v k="$kind" -v o="${result[dblb-$mode,$kind]}" -v p="${result[pgbouncer-$mode,$kind]}" -v d="${result[direct,$kind]}" \
      'BEGIN { name = (k == "S") ? "select-only" : (k == "B") ? "TPC-B-like" : "select-only -C"; printf "%-12s %-15s DBLB/PgBouncer %.2f   DBLB/direct %.2f   PgBouncer/direct %.2f\n", m, name, o / p, o / d, p / d }'
  done
done
